"""The trainer's collator, tested without a model: flat candidates, group ids, grades, pixels in [-1, 1]."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perfusion.attributes import DESCRIPTOR_DIM
from perfusion.contracts.records import GradedCandidate, GroupSample
from trainer.batches import BatchError, collate_groups, pixels_to_tensor


def group_sample(sample_id: str, grades_by_position: dict[int, int], prompt: str = "a red t-shirt") -> GroupSample:
    # Candidates are listed in reverse position order on purpose: the collator sorts by position.
    return GroupSample(
        sample_id=sample_id,
        user_id=f"user-{sample_id}",
        design_id="design-1",
        prompt=prompt,
        model_version="base",
        impression_ts=1_700_000_000.0,
        candidates=[
            GradedCandidate(
                image_id=f"{sample_id}-p{position}", position=position, descriptor=[0.0] * DESCRIPTOR_DIM, grade=grade
            )
            for position, grade in sorted(grades_by_position.items(), reverse=True)
        ],
    )


def pixels_for(*samples: GroupSample, size: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        candidate.image_id: rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        for sample in samples
        for candidate in sample.candidates
    }


def test_variable_k_groups_flatten_with_group_ids_grades_and_user_rows() -> None:
    first = group_sample("a", {0: 2, 1: 0, 2: 1})
    second = group_sample("b", {0: 0, 1: 1}, prompt="a blue dress")
    pixels = pixels_for(first, second)
    batch = collate_groups([first, second], [[1.0, 2.0], [3.0, 4.0]], pixels)
    assert batch.num_groups == 2 and batch.num_candidates == 5
    assert batch.sample_ids == ["a", "b"]
    assert batch.prompts == ["a red t-shirt", "a blue dress"]
    assert batch.image_ids == ["a-p0", "a-p1", "a-p2", "b-p0", "b-p1"]
    assert batch.labels.tolist() == [2, 0, 1, 0, 1]
    assert batch.group_ids.tolist() == [0, 0, 0, 1, 1]
    assert batch.positions.tolist() == [0, 1, 2, 0, 1]
    assert batch.user_vectors.tolist() == [[1.0, 2.0]] * 3 + [[3.0, 4.0]] * 2
    assert batch.images.shape == (5, 3, 4, 4)
    assert batch.images.dtype == torch.float32 and batch.labels.dtype == torch.long
    expected_first = torch.from_numpy(pixels["a-p0"]).permute(2, 0, 1).float() / 127.5 - 1.0
    assert torch.equal(batch.images[0], expected_first)


def test_pixels_map_to_minus_one_and_one() -> None:
    black_and_white = np.zeros((2, 2, 3), dtype=np.uint8)
    black_and_white[0, 0] = 255
    tensor = pixels_to_tensor(black_and_white)
    assert tensor.shape == (3, 2, 2)
    assert tensor[:, 0, 0].tolist() == [1.0, 1.0, 1.0]
    assert tensor[:, 1, 1].tolist() == [-1.0, -1.0, -1.0]


def test_missing_pixels_name_the_image() -> None:
    sample = group_sample("a", {0: 1, 1: 0})
    pixels = pixels_for(sample)
    del pixels["a-p1"]
    with pytest.raises(BatchError, match="a-p1"):
        collate_groups([sample], [[0.0]], pixels)


def test_mixed_image_sizes_are_refused() -> None:
    first, second = group_sample("a", {0: 1}), group_sample("b", {0: 0})
    pixels = {**pixels_for(first, size=4), **pixels_for(second, size=8)}
    with pytest.raises(BatchError, match="resolution"):
        collate_groups([first, second], [[0.0], [0.0]], pixels)


def test_user_vectors_must_align_with_samples() -> None:
    first, second = group_sample("a", {0: 1}), group_sample("b", {0: 0})
    pixels = pixels_for(first, second)
    with pytest.raises(BatchError, match="one user vector per sample"):
        collate_groups([first, second], [[0.0]], pixels)
    with pytest.raises(BatchError, match="has 2 values"):
        collate_groups([first, second], [[0.0], [0.0, 1.0]], pixels)


def test_empty_and_non_uint8_inputs_are_refused() -> None:
    with pytest.raises(BatchError, match="empty"):
        collate_groups([], [], {})
    with pytest.raises(BatchError, match="uint8"):
        pixels_to_tensor(np.zeros((2, 2, 3), dtype=np.float32))
