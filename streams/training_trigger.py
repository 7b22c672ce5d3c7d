"""The training trigger: a TrainRequest per model version after N new group samples or T seconds, whichever first.

:class:`TrainingTrigger` is the pure logic over a ``MutableMapping`` store. Per model version it keeps the number of
requests already made (``sequence``), the samples counted since the last request and the wall-clock time the first
of them arrived. A sample counts once (dedupe by ``sample_id``, since the group builder may repeat a sample after a
crash). A request is due when ``samples_per_request`` samples are pending (reason ``count``) or when the first
pending sample has waited ``max_wait_s`` seconds (reason ``timeout``, checked on every sample and every tick).
``request_id`` is ``<model_version>-<sequence>``, so a replay that rebuilds the same state names its requests the
same way. Counted sample ids are forgotten ``dedupe_retention_s`` (wall clock) after they arrived, so the state
does not grow with every sample ever made. Requests are delivered two-phase like group samples: stored as
``emitting``, sent, then confirmed.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from perfusion.contracts.records import GroupSample, TrainRequest
from perfusion.settings import Settings

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

TABLE_NAME = "train-trigger"
BY_VERSION_SUFFIX = "-train-trigger-by-version"


class TrainingTriggerSettings(Settings):
    """When the trigger asks for a training update."""

    samples_per_request: int = Field(default=256, ge=1, description="new group samples that make a request due")
    max_wait_s: float = Field(
        default=300.0,
        gt=0.0,
        allow_inf_nan=False,
        description="seconds (wall clock) a pending sample waits at most before a request",
    )
    tick_s: float = Field(
        default=1.0, gt=0.0, allow_inf_nan=False, description="how often the timeout is checked without new samples"
    )
    dedupe_retention_s: float = Field(
        default=86_400.0,
        gt=0.0,
        allow_inf_nan=False,
        description="seconds (wall clock) a counted sample id is remembered to drop repeats; the group builder "
        "repeats a sample only right after a crash, so a day is ample",
    )


def by_version_topic_name(group_id: str) -> str:
    """The internal topic that carries ``(sample_id, model_version)`` of every group sample to the counter, keyed by
    model version (one partition counts each version)."""
    return group_id + BY_VERSION_SUFFIX


def version_key(model_version: str) -> str:
    return f"v:{model_version}"


def sample_key(sample_id: str) -> str:
    return f"s:{sample_id}"


class TrainingTrigger:
    """Counts samples per model version for one partition and decides when a TrainRequest is due."""

    def __init__(
        self,
        settings: TrainingTriggerSettings,
        store: MutableMapping[str, Any],
        partition: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.partition = partition
        self.counts: Counter[str] = Counter()
        self._store = store
        self._clock = clock
        self._resend: list[TrainRequest] | None = None  # found in the store on first use
        # Built from the store on first use, then kept up to date: this partition's version keys, and its counted
        # sample ids in order of arrival (wall-clock seconds, key), so that a tick touches neither the other keys
        # nor more than the sample ids it forgets.
        self._version_keys: set[str] | None = None
        self._remembered: deque[tuple[float, str]] = deque()

    def on_sample(self, sample_id: str, model_version: str) -> list[TrainRequest]:
        """Count one sample; returns the requests now due (send them, then :meth:`confirm`)."""
        requests = self._unconfirmed()
        self._ensure_index()
        key = sample_key(sample_id)
        if key in self._store:
            self.counts["duplicate_sample"] += 1
            return requests
        now = self._clock()
        self._store[key] = {"p": self.partition, "at": now}
        self._remembered.append((now, key))
        state = self._state(model_version)
        state["pending"] += 1
        if state["first_pending_at"] is None:
            state["first_pending_at"] = now
        requests.extend(self._maybe_request(model_version, state, now))
        self._store[version_key(model_version)] = state
        assert self._version_keys is not None
        self._version_keys.add(version_key(model_version))
        return requests

    def on_tick(self) -> list[TrainRequest]:
        """Requests whose oldest pending sample has waited ``max_wait_s``; forgets sample ids past retention."""
        requests = self._unconfirmed()
        self._ensure_index()
        assert self._version_keys is not None
        now = self._clock()
        self._forget_old_sample_ids(now)
        for key in sorted(self._version_keys):
            state = self._store.get(key)
            if state is None or not state["pending"]:
                continue
            state = {**state, "emitting": dict(state["emitting"])}
            due = self._maybe_request(key[2:], state, now)
            if due:
                self._store[key] = state
                requests.extend(due)
        return requests

    def remembered_sample_ids(self) -> int:
        self._ensure_index()
        return len(self._remembered)

    def _forget_old_sample_ids(self, now: float) -> None:
        horizon = now - self.settings.dedupe_retention_s
        while self._remembered and self._remembered[0][0] < horizon:
            _, key = self._remembered.popleft()
            stored = self._store.get(key)
            if stored is not None and stored.get("at", horizon) < horizon:
                del self._store[key]
                self.counts["sample_id_forgotten"] += 1

    def _ensure_index(self) -> None:
        if self._version_keys is not None:
            return
        self._version_keys = set()
        remembered: list[tuple[float, str]] = []
        for key in list(self._store):
            value = self._store[key]
            if not isinstance(value, dict) or value.get("p") != self.partition:
                continue
            if key.startswith("v:"):
                self._version_keys.add(key)
            elif key.startswith("s:"):
                remembered.append((float(value["at"]), key))
        self._remembered = deque(sorted(remembered))

    def confirm(self, requests: list[TrainRequest]) -> None:
        for request in requests:
            key = version_key(request.model_version)
            state = self._store.get(key)
            if state is not None and request.request_id in state["emitting"]:
                emitting = {rid: body for rid, body in state["emitting"].items() if rid != request.request_id}
                self._store[key] = {**state, "emitting": emitting}

    def _state(self, model_version: str) -> dict[str, Any]:
        stored = self._store.get(version_key(model_version))
        if stored is None:
            return {"p": self.partition, "sequence": 0, "pending": 0, "first_pending_at": None, "emitting": {}}
        return {**stored, "emitting": dict(stored["emitting"])}

    def _maybe_request(self, model_version: str, state: dict[str, Any], now: float) -> list[TrainRequest]:
        reason: Literal["count", "timeout"]
        if state["pending"] >= self.settings.samples_per_request:
            reason = "count"
        elif state["first_pending_at"] is not None and now - state["first_pending_at"] >= self.settings.max_wait_s:
            reason = "timeout"
        else:
            return []
        state["sequence"] += 1
        request = TrainRequest(
            request_id=f"{model_version}-{state['sequence']:06d}",
            model_version=model_version,
            new_samples=state["pending"],
            reason=reason,
            ts=now,
        )
        state["pending"] = 0
        state["first_pending_at"] = None
        state["emitting"][request.request_id] = request.model_dump(mode="json")
        self.counts[f"request_{reason}"] += 1
        return [request]

    def _unconfirmed(self) -> list[TrainRequest]:
        if self._resend is not None:
            return []
        self._resend = []
        for key in list(self._store):
            if key.startswith("v:") and self._store[key].get("p") == self.partition:
                for body in self._store[key]["emitting"].values():
                    self._resend.append(TrainRequest.model_validate(body, strict=False))
        return list(self._resend)


def routed_sample(sample: GroupSample) -> bytes:
    """What the group builder's stage sends the counter for each sample: the two fields it needs, not the whole
    sample (kilobytes)."""
    return json.dumps({"sample_id": sample.sample_id, "model_version": sample.model_version}).encode()


def read_routed_sample(raw: bytes) -> tuple[str, str]:
    routed = json.loads(raw)
    return str(routed["sample_id"]), str(routed["model_version"])
