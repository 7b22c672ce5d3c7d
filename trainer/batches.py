"""The trainer's collator: group samples + user vectors + pixels -> flat candidate tensors with group ids and grades.

A batch of G impressions holds N = sum of their K candidates, flattened: every per-candidate tensor has N rows and
``group_ids`` says which impression a row belongs to, which is what the objectives in ``perfusion.objectives``
take. Groups of different K therefore share a batch without padding rows that the losses would have to mask.
Per-group values (prompt, sample id) are lists of length G, indexed by ``group_ids``.

Pure: no model, no Kafka, no Feast. The loop reads pixels and user vectors, this module only arranges them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from perfusion.contracts.records import GroupSample
from perfusion.errors import PerfusionError


class BatchError(PerfusionError):
    """The samples, user vectors and pixels handed to the collator do not fit together."""


@dataclass(frozen=True)
class GroupBatch:
    """G impressions with N candidates in total."""

    sample_ids: list[str]  # [G]
    prompts: list[str]  # [G]
    image_ids: list[str]  # [N]
    images: Tensor  # [N, 3, H, W] float32 in [-1, 1]
    user_vectors: Tensor  # [N, U] float32, the impression's user vector repeated for each of its candidates
    labels: Tensor  # [N] long grades: 0 none, 1 click (or merchant select), 2 order
    group_ids: Tensor  # [N] long in 0..G-1, the row's impression
    positions: Tensor  # [N] long, the slot the candidate was shown in

    @property
    def num_groups(self) -> int:
        return len(self.sample_ids)

    @property
    def num_candidates(self) -> int:
        return len(self.image_ids)

    def to(self, device: torch.device | str) -> GroupBatch:
        return GroupBatch(
            sample_ids=self.sample_ids,
            prompts=self.prompts,
            image_ids=self.image_ids,
            images=self.images.to(device),
            user_vectors=self.user_vectors.to(device),
            labels=self.labels.to(device),
            group_ids=self.group_ids.to(device),
            positions=self.positions.to(device),
        )


def pixels_to_tensor(pixels: NDArray[np.uint8]) -> Tensor:
    """(H, W, 3) uint8 in 0..255 -> (3, H, W) float32 in [-1, 1], the range the diffusion model works in."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise BatchError(f"pixels must be an (H, W, 3) uint8 array, got {pixels.dtype} {pixels.shape}")
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() / 127.5 - 1.0


def collate_groups(
    samples: Sequence[GroupSample],
    user_vectors: Sequence[Sequence[float]],
    pixels: Mapping[str, NDArray[np.uint8]],
) -> GroupBatch:
    """Arrange ``samples`` (with ``user_vectors[i]`` the vector of ``samples[i]``'s user) into one flat batch.

    ``pixels`` maps every candidate's image id to its (H, W, 3) uint8 image; all images must share one size.
    Candidates keep the order of their sample (sorted by the position they were shown in).
    """
    if not samples:
        raise BatchError("cannot collate an empty list of group samples; wait until the buffer holds some")
    if len(user_vectors) != len(samples):
        raise BatchError(f"need one user vector per sample: {len(samples)} samples, {len(user_vectors)} vectors")
    user_dim = len(user_vectors[0])
    image_rows: list[Tensor] = []
    user_rows: list[Sequence[float]] = []
    image_ids: list[str] = []
    labels: list[int] = []
    group_ids: list[int] = []
    positions: list[int] = []
    image_shape: tuple[int, ...] | None = None
    for group_index, (sample, user_vector) in enumerate(zip(samples, user_vectors, strict=True)):
        if len(user_vector) != user_dim:
            raise BatchError(
                f"user vector of sample {sample.sample_id!r} has {len(user_vector)} values, the first had "
                f"{user_dim}; build every vector with the same user_vector()"
            )
        for candidate in sorted(sample.candidates, key=lambda c: c.position):
            if candidate.image_id not in pixels:
                raise BatchError(
                    f"no pixels for image {candidate.image_id!r} of sample {sample.sample_id!r}; "
                    "read every candidate through the image store before collating"
                )
            image = pixels_to_tensor(pixels[candidate.image_id])
            if image_shape is None:
                image_shape = tuple(image.shape)
            elif tuple(image.shape) != image_shape:
                raise BatchError(
                    f"image {candidate.image_id!r} is {tuple(image.shape)}, others are {image_shape}; "
                    "the image store must render every image at the model's resolution"
                )
            image_rows.append(image)
            user_rows.append(user_vector)
            image_ids.append(candidate.image_id)
            labels.append(candidate.grade)
            group_ids.append(group_index)
            positions.append(candidate.position)
    return GroupBatch(
        sample_ids=[sample.sample_id for sample in samples],
        prompts=[sample.prompt for sample in samples],
        image_ids=image_ids,
        images=torch.stack(image_rows),
        user_vectors=torch.tensor(user_rows, dtype=torch.float32).reshape(len(user_rows), user_dim),
        labels=torch.tensor(labels, dtype=torch.long),
        group_ids=torch.tensor(group_ids, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
    )
