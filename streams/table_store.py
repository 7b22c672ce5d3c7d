"""Faust table helpers shared by the group, demand and training-trigger agents.

:class:`JsonTableStore` is the ``MutableMapping`` view of a raw-bytes Faust table that the pure logic
(:mod:`streams.grouping`, :mod:`streams.demand`, the training trigger) reads and writes: values are JSON, and
changes go to the changelog partition the caller names (the partition of the events being processed), so state
stays co-partitioned with the topic it was computed from. A key written many times in one micro-batch is logged
once: the agent awaits :meth:`JsonTableStore.flush_changelog` at the end of each batch, before its events are
acknowledged, and that call returns only once the broker has acknowledged every changelog record. So the changelog
runs ahead of the committed offsets, and a killed worker restores at least the state its committed events made.

Why not Faust's own buffered ``Table.send_changelog``: Faust flushes that buffer before committing offsets, but its
flush returns when no buffered message went out for 0.1 s (``ProducerBuffer.flush_atmost``). On a loaded machine
offsets could then be committed for events whose state changes had not reached the changelog, and a worker killed
at that moment would restore older state than its committed offsets imply.
:func:`send_and_wait` is the first half of the agents' two-phase delivery: an output is confirmed in its table
only after the broker acknowledged it.

Every store of one table reads through the same table, so its decoded-value cache checks that the raw bytes it
decoded are still the ones in the table (one identity comparison): a key that another partition's store rewrote
or deleted is read as it is now, never from a stale cache. A broker that refuses a send or a changelog record is
retried with backoff (:func:`streams.liveness.retry_until_done`): an outage delays a batch and loses nothing.

A store can also undo: :meth:`JsonTableStore.rollback` puts back every key changed since the last
:meth:`JsonTableStore.checkpoint`, so that an event a stage could not process leaves no half-made change behind.

Faust is not imported here at runtime: the app is passed in.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import Awaitable, Iterable, Iterator, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from streams.liveness import retry_until_done

if TYPE_CHECKING:
    import faust
    from faust.types import TableT, TopicT
    from mode.types.signals import BaseSignalT


# json.dumps with separators builds an encoder per call; the group builder writes a state per event.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))


def encode_state(value: Any) -> bytes:
    """``value`` as compact JSON that decodes to what :mod:`json`'s text of it decodes to, written by orjson where
    that holds. Integers must fit in 64 bits (orjson reads longer ones as floats): ValueError otherwise.

    orjson writes an impression's state (a few hundred floats) about four times faster than :mod:`json`, but it
    writes a non-finite float as ``null`` where :mod:`json` writes ``Infinity``, and refuses keys that are not
    strings where :mod:`json` writes them as strings. So a value whose orjson text holds a ``null`` (a None, or a
    float that is not finite) or that orjson refuses is written by :mod:`json` instead: one byte search, and the
    states the worker writes per event hold no null."""
    try:
        raw = orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError: a key that is not a string, an integer beyond 64 bits
        raw = b"null"
    if b"null" not in raw:
        return raw
    _check_integers(value)
    return _COMPACT_JSON.encode(value).encode()


_INTEGER_RANGE = range(-(2**63), 2**64)  # what orjson.loads reads back as an int


def _check_integers(value: Any) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and value not in _INTEGER_RANGE:
        raise ValueError(f"a table state holds the integer {value}, beyond the 64 bits it is read back with")
    if isinstance(value, dict):
        for item in value.values():  # keys are written as strings
            _check_integers(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_integers(item)


def decode_state(raw: bytes) -> Any:
    """The value :func:`encode_state` wrote: orjson, or :mod:`json` for what only it reads (``Infinity``, ``NaN``)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


ACK_TIMEOUT_S = 30.0
"""Seconds to wait for the broker's acknowledgements of one send before sending again. Seen on a loaded machine,
right after a worker created its changelog topics: 12 of 25 records of one changelog partition never acknowledged
(the producer's own timeout is 20 minutes), which stalled the events agent; sent again, they were acknowledged at
once. Records go again under the same keys, so a resend is at most a duplicate."""

DECODED_VALUES_MAX = 50_000
"""Most decoded values a :class:`JsonTableStore` keeps. Unbounded, the cache held every value a store had read: at a
million demand records it was most of the worker's 2.2 GB (docs/streams-performance.md); a value pushed out is
decoded again when next read."""


class JsonTableStore(MutableMapping[str, Any]):
    """One partition's view of a raw-bytes Faust table as a mapping of str keys to JSON values.

    Reads see every key the worker holds; writes and deletes change the table at once and are logged to changelog
    ``partition`` by :meth:`flush_changelog`, once per key however often it changed. Decoded values are cached per
    key together with the bytes they came from, at most ``decoded_max`` of them (the oldest decoded go first):
    callers replace values, never mutate them in place.
    """

    def __init__(self, table: TableT, partition: int, decoded_max: int = DECODED_VALUES_MAX) -> None:
        self.table = table
        self.partition = partition
        self._decoded_max = decoded_max
        self._decoded: dict[str, tuple[bytes, Any]] = {}  # key -> (the raw bytes decoded, the value)
        self._unlogged: dict[bytes, None] = {}  # keys changed since the last flush, in order of first change
        self._undo: dict[bytes, bytes | None] = {}  # raw value of each key before its first change since checkpoint

    def __getitem__(self, key: str) -> Any:
        return self._decoded_value(key, self.table.data[key.encode()])

    def get(self, key: str, default: Any = None) -> Any:
        """``self[key]``, or ``default`` for a key the table does not hold (one lookup, not the mapping mixin's
        exception round trip: the group builder reads a state per event)."""
        raw = self.table.data.get(key.encode())
        return default if raw is None else self._decoded_value(key, raw)

    def _decoded_value(self, key: str, raw: bytes) -> Any:
        cached = self._decoded.get(key)
        if cached is not None and cached[0] is raw:
            return cached[1]
        value = decode_state(raw)
        self._cache(key, raw, value)
        return value

    def _cache(self, key: str, raw: bytes, value: Any) -> None:
        decoded = self._decoded
        decoded[key] = (raw, value)
        if len(decoded) > self._decoded_max:
            del decoded[next(iter(decoded))]  # dicts keep insertion order: the oldest entry

    def __setitem__(self, key: str, value: Any) -> None:
        encoded = key.encode()
        self._remember_for_undo(encoded)
        raw = encode_state(value)
        self.table.data[encoded] = raw
        self._cache(key, raw, value)
        self._unlogged[encoded] = None

    def __delitem__(self, key: str) -> None:
        encoded = key.encode()
        self._remember_for_undo(encoded)
        del self.table.data[encoded]
        self._decoded.pop(key, None)
        self._unlogged[encoded] = None

    def _remember_for_undo(self, encoded: bytes) -> None:
        if encoded not in self._undo:
            self._undo[encoded] = self.table.data.get(encoded)

    def checkpoint(self) -> None:
        """Make the current values the ones :meth:`rollback` returns to."""
        self._undo.clear()

    def rollback(self) -> None:
        """Put back every key changed since the last checkpoint (the changelog logs the restored values)."""
        for encoded, raw in self._undo.items():
            if raw is None:
                self.table.data.pop(encoded, None)
            else:
                self.table.data[encoded] = raw
            self._unlogged[encoded] = None
        self._undo.clear()

    async def flush_changelog(self) -> int:
        """Log each key changed since the last flush with its current value (None, a tombstone, once deleted) and
        wait until the broker has acknowledged all of them; returns how many. On a failure the keys stay due for
        the next flush."""
        keys, self._unlogged = self._unlogged, {}
        changelog = self.table.changelog_topic
        try:
            pending = [
                await changelog.send(
                    key=key,
                    value=self.table.data.get(key),
                    partition=self.partition,
                    key_serializer="raw",
                    value_serializer="raw",
                )
                for key in keys
            ]
            await acknowledged(pending, f"{len(pending)} changelog records (partition {self.partition})")
        except BaseException:
            self._unlogged = {**keys, **self._unlogged}
            raise
        return len(keys)

    def __iter__(self) -> Iterator[str]:
        return (key.decode() for key in list(self.table.data.keys()))

    def __len__(self) -> int:
        return len(self.table.data)


async def flush_changelogs(stores: Iterable[JsonTableStore]) -> int:
    """:meth:`JsonTableStore.flush_changelog` on every store at once (one wait for the broker, not one per store),
    retried until the broker took every record; returns how many keys were logged. The stores' current values
    become their checkpoint."""
    stores = list(stores)

    async def flush_all() -> int:
        return sum(await asyncio.gather(*(store.flush_changelog() for store in stores)))

    logged = await retry_until_done("changelog flush", flush_all)
    for store in stores:
        store.checkpoint()
    return logged


def raw_table(app: faust.App, name: str, partitions: int) -> TableT:
    """A changelog-backed table whose keys and values travel as raw bytes (the agents encode JSON themselves)."""
    return app.Table(name, key_type=bytes, value_type=bytes, partitions=partitions)


def internal_topic(app: faust.App, name: str, partitions: int) -> TopicT:
    """A raw-bytes topic the app creates itself (a repartition topic); one object per name and app, so that the
    stage that writes it and the agent that reads it share it."""
    declared = _INTERNAL_TOPICS.setdefault(app, {})
    if name not in declared:
        declared[name] = app.topic(
            name,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=partitions,
            internal=True,
        )
    return declared[name]


_INTERNAL_TOPICS: weakref.WeakKeyDictionary[Any, dict[str, TopicT]] = weakref.WeakKeyDictionary()


def forget_on_rebalance(app: faust.App, per_partition: MutableMapping[Any, Any]) -> None:
    """Drop the per-partition objects (or caches of table values) whenever partitions move: the next owner rebuilds
    them from the table."""

    def forget(sender: Any, /, *args: Any, signal: BaseSignalT[Any], **kwargs: Any) -> None:
        per_partition.clear()

    app.on_partitions_revoked.connect(forget)
    app.on_partitions_assigned.connect(forget)


Send = tuple["TopicT", bytes, bytes | None] | tuple["TopicT", bytes, bytes | None, int]
"""(topic, key, value) or (topic, key, value, partition): one record to send, bytes as they go (value None: a
tombstone)."""


async def send_and_wait(sends: Sequence[Send]) -> None:
    """Send every record and wait until the broker has acknowledged all of them; all of them again after a broker
    error (downstream keys are deterministic, so a repeat is a duplicate under the same key)."""
    if not sends:
        return

    async def send_all() -> None:
        pending = []
        for topic, key, value, *partition in sends:
            pending.append(
                await topic.send(
                    key=key,
                    value=value,
                    partition=partition[0] if partition else None,
                    key_serializer="raw",
                    value_serializer="raw",
                )
            )
        await acknowledged(pending, f"{len(pending)} records")

    await retry_until_done(f"sending {len(sends)} records", send_all)


async def acknowledged(pending: Sequence[Awaitable[Any]], what: str, timeout_s: float = ACK_TIMEOUT_S) -> None:
    """Wait for every acknowledgement in ``pending``, raising the first error among them (in order), or TimeoutError
    (which :func:`~streams.liveness.retry_until_done` retries) when they are not all in after ``timeout_s``. The
    futures left are not cancelled: the producer still owns them.

    One wait per acknowledgement not in yet, in order, rather than one :func:`asyncio.wait` over all of them: a
    produce response acknowledges a whole batch of records at once, so after the first wait most of the others are
    already done, and :func:`asyncio.wait` adds and removes a callback on each of the (thousands of) futures, which
    cost the worker about 6% of its CPU."""
    if not pending:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    futures = [asyncio.ensure_future(ack) for ack in pending]  # a future passes through as it is
    for index, future in enumerate(futures):
        if not future.done():
            await asyncio.wait([future], timeout=max(0.0, deadline - loop.time()))
            if not future.done():
                left = sum(1 for waiting in futures[index:] if not waiting.done())
                raise TimeoutError(f"{left} of {what} not acknowledged in {timeout_s:g} s")
        future.result()  # the producer's error, if it failed
