"""The trainer's bounded replay buffer of group samples: dedupe by sample id, recency-weighted sampling.

Each buffered sample keeps where it came from (topic, partition, offset), the user vector read for it as of its
impression time, and its arrival number. Sampling weights decay with the number of samples that arrived after it,

    weight = 0.5 ** ((newest_arrival - arrival) / half_life),

so the newest feedback dominates an update while older groups still regularise it. Batches are drawn without
replacement (Efraimidis-Spirakis keys), so one batch never holds the same impression twice.

Deduplication remembers more ids than the buffer holds (``dedupe_window``): a sample evicted from the buffer has
been trained on, and a replay of it must still be refused. The remembered ids are what a published manifest
stores, so a restarted trainer refuses the same replays (:meth:`ReplayBuffer.remember`).
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from perfusion.contracts.records import GroupSample
from perfusion.errors import ConfigError


@dataclass(frozen=True)
class BufferedSample:
    """A group sample as the trainer holds it."""

    sample: GroupSample
    user_vector: tuple[float, ...]
    topic: str
    partition: int
    offset: int
    arrival: int  # 0 for the first sample this buffer ever accepted, then 1, 2, ...

    @property
    def sample_id(self) -> str:
        return self.sample.sample_id


class ReplayBuffer:
    """At most ``capacity`` samples (oldest evicted first), each sample id accepted at most once."""

    def __init__(self, capacity: int, recency_half_life: float, dedupe_window: int) -> None:
        if capacity < 1:
            raise ConfigError(f"capacity must be at least 1, got {capacity}")
        if not recency_half_life > 0:
            raise ConfigError(f"recency_half_life must be positive, got {recency_half_life}")
        if dedupe_window < capacity:
            raise ConfigError(f"dedupe_window ({dedupe_window}) must be at least capacity ({capacity})")
        self.capacity = capacity
        self.recency_half_life = recency_half_life
        self.dedupe_window = dedupe_window
        self._entries: OrderedDict[str, BufferedSample] = OrderedDict()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._next_arrival = 0
        self._new_ids: list[str] = []

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._entries

    def has_seen(self, sample_id: str) -> bool:
        """Whether this id was accepted before (buffered now, evicted, or remembered from a manifest)."""
        return sample_id in self._seen

    def add(
        self, sample: GroupSample, user_vector: Sequence[float], topic: str = "", partition: int = 0, offset: int = -1
    ) -> bool:
        """Buffer ``sample`` and count it as new; False (and nothing changes) when its id was seen before."""
        if sample.sample_id in self._seen:
            return False
        entry = BufferedSample(
            sample=sample,
            user_vector=tuple(float(value) for value in user_vector),
            topic=topic,
            partition=partition,
            offset=offset,
            arrival=self._next_arrival,
        )
        self._next_arrival += 1
        self._entries[sample.sample_id] = entry
        self._new_ids.append(sample.sample_id)
        self._remember_one(sample.sample_id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return True

    def remember(self, sample_ids: Iterable[str]) -> None:
        """Mark ids as already trained (e.g. from the serving version's manifest) so that replays are refused."""
        for sample_id in sample_ids:
            self._remember_one(sample_id)

    def _remember_one(self, sample_id: str) -> None:
        self._seen[sample_id] = None
        self._seen.move_to_end(sample_id)
        while len(self._seen) > self.dedupe_window:
            self._seen.popitem(last=False)

    def remembered_ids(self) -> list[str]:
        """Every remembered id, oldest first (at most ``dedupe_window``)."""
        return list(self._seen)

    @property
    def new_sample_ids(self) -> list[str]:
        """Ids accepted since the last :meth:`mark_trained`, in arrival order (some may be evicted already)."""
        return list(self._new_ids)

    def mark_trained(self) -> None:
        """The new samples went into a published version: they no longer count as new."""
        self._new_ids.clear()

    def entries(self) -> list[BufferedSample]:
        """The buffered samples, oldest first."""
        return list(self._entries.values())

    def weights(self) -> list[float]:
        """Sampling weight of each buffered sample, aligned with :meth:`entries`; the newest has weight 1."""
        newest = self._next_arrival - 1
        return [0.5 ** ((newest - entry.arrival) / self.recency_half_life) for entry in self._entries.values()]

    def draw(self, count: int, rng: random.Random) -> list[BufferedSample]:
        """Up to ``count`` distinct samples, each drawn with probability proportional to its weight."""
        if count < 1:
            raise ConfigError(f"count must be at least 1, got {count}")
        entries = self.entries()
        if count >= len(entries):
            return entries
        # Efraimidis-Spirakis: the count largest keys log(u) / w are a weighted draw without replacement.
        keyed = [(math.log(1.0 - rng.random()) / weight, index) for index, weight in enumerate(self.weights())]
        keyed.sort(reverse=True)
        return [entries[index] for _, index in keyed[:count]]
