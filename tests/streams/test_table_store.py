"""JsonTableStore's changelog: each changed key logged once per flush, and a flush that returns only after the broker
acknowledged every record (so a batch's offsets are never committed ahead of its state)."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.table_store import JsonTableStore, decode_state, encode_state, flush_changelogs


class RecordingChangelog:
    """The changelog topic as the store uses it: ``send`` returns a future the test resolves as the broker would."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, bytes, bytes | None]] = []
        self.acks: list[asyncio.Future[None]] = []

    async def send(
        self, *, key: bytes, value: bytes | None, partition: int, **serializers: str
    ) -> asyncio.Future[None]:
        assert serializers == {"key_serializer": "raw", "value_serializer": "raw"}
        acknowledged: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sent.append((partition, key, value))
        self.acks.append(acknowledged)
        return acknowledged


class TableWithChangelog:
    """The two attributes of a Faust table that the store uses: its data and its changelog topic."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.changelog_topic = RecordingChangelog()


async def until_sent(changelog: RecordingChangelog, records: int) -> None:
    while len(changelog.sent) < records:
        await asyncio.sleep(0)


def test_a_flush_logs_each_changed_key_once_with_its_last_value_and_returns_after_every_acknowledgement() -> None:
    async def scenario() -> None:
        table = TableWithChangelog()
        store = JsonTableStore(table, partition=3)  # type: ignore[arg-type]
        store["i:a"] = {"status": "open"}
        store["i:b"] = 1
        store["i:a"] = {"status": "closed"}
        del store["i:b"]
        flush = asyncio.ensure_future(store.flush_changelog())
        await until_sent(table.changelog_topic, 2)
        assert table.changelog_topic.sent == [(3, b"i:a", b'{"status":"closed"}'), (3, b"i:b", None)]
        table.changelog_topic.acks[0].set_result(None)
        await asyncio.sleep(0.01)
        assert not flush.done(), "returned before the broker acknowledged the tombstone"
        table.changelog_topic.acks[1].set_result(None)
        assert await flush == 2
        assert await store.flush_changelog() == 0  # nothing changed since

    asyncio.run(scenario())


def test_a_refused_changelog_record_fails_the_flush() -> None:
    async def scenario() -> None:
        table = TableWithChangelog()
        store = JsonTableStore(table, partition=0)  # type: ignore[arg-type]
        store["w:0"] = 12.5
        flush = asyncio.ensure_future(store.flush_changelog())
        await until_sent(table.changelog_topic, 1)
        table.changelog_topic.acks[0].set_exception(RuntimeError("NotLeaderForPartition"))
        with pytest.raises(RuntimeError, match="NotLeaderForPartition"):
            await flush

    asyncio.run(scenario())


def test_flushing_several_stores_waits_for_all_of_them_and_counts_their_keys() -> None:
    async def scenario() -> None:
        tables = [TableWithChangelog(), TableWithChangelog()]
        stores = [JsonTableStore(table, partition=index) for index, table in enumerate(tables)]  # type: ignore[arg-type]
        stores[0]["d:x"] = {"fired": None}
        stores[1]["d:y"] = {"fired": "done"}
        stores[1]["w:1"] = 3.0
        flush = asyncio.ensure_future(flush_changelogs(stores))
        await until_sent(tables[1].changelog_topic, 2)
        await until_sent(tables[0].changelog_topic, 1)
        for ack in tables[1].changelog_topic.acks:
            ack.set_result(None)
        await asyncio.sleep(0.01)
        assert not flush.done()
        tables[0].changelog_topic.acks[0].set_result(None)
        assert await flush == 3

    asyncio.run(scenario())


def test_reads_decode_json_and_iteration_lists_every_key() -> None:
    table = TableWithChangelog()
    table.data[b"o:1"] = b'{"quantity": 2}'
    store: Any = JsonTableStore(table, partition=0)  # type: ignore[arg-type]
    assert store["o:1"] == {"quantity": 2}
    assert sorted(store) == ["o:1"] and len(store) == 1


def test_get_reads_like_indexing_and_gives_the_default_for_a_missing_key() -> None:
    table = TableWithChangelog()
    store: Any = JsonTableStore(table, partition=0)  # type: ignore[arg-type]
    store["i:a"] = {"status": "open", "due": 12.5}
    assert store.get("i:a") == store["i:a"] == {"status": "open", "due": 12.5}
    assert store.get("i:missing") is None and store.get("i:missing", 0) == 0
    table.data[b"i:a"] = b'{"status":"closed"}'  # rewritten by another partition's store: never read from the cache
    assert store.get("i:a") == {"status": "closed"}
    assert table.data[b"i:a"] == b'{"status":"closed"}' and store.get("i:b", "x") == "x"


def test_state_json_reads_back_what_the_standard_library_would_have_written() -> None:
    # orjson writes what it writes the same way (floats shortest, UTF-8 as it is) ...
    assert encode_state({"due": 12.5, "ids": ["a", "é"], "n": 3}) == '{"due":12.5,"ids":["a","é"],"n":3}'.encode()
    # ... and what it would write differently goes through json: infinity (orjson: null), None, an int key
    assert encode_state({"due": math.inf}) == b'{"due":Infinity}'
    assert encode_state({"order": None}) == b'{"order":null}'
    assert encode_state({1: [2]}) == b'{"1":[2]}'
    assert decode_state(b'{"due":Infinity}') == {"due": math.inf}  # written before orjson: still read
    assert decode_state(b'{"w":-Infinity,"x":[1e+16,0.00001]}') == {"w": -math.inf, "x": [1e16, 1e-05]}
    with pytest.raises(ValueError):
        decode_state(b'{"due":')
    with pytest.raises(ValueError, match="beyond the 64 bits"):
        encode_state({"n": [2**64]})  # orjson would read it back as a float


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text() | st.integers(), children, max_size=4),
    max_leaves=12,
)


@given(_JSON_VALUES)
def test_state_json_decodes_to_what_json_would_give(value: Any) -> None:
    expected = json.loads(json.dumps(value, separators=(",", ":")))
    decoded = decode_state(encode_state(value))
    # NaN is not equal to itself: compare the texts of the two decodings
    assert json.dumps(decoded, sort_keys=False) == json.dumps(expected, sort_keys=False)


def test_the_decoded_cache_is_bounded_and_a_value_pushed_out_reads_the_same() -> None:
    table = TableWithChangelog()
    store: Any = JsonTableStore(table, partition=0, decoded_max=2)  # type: ignore[arg-type]
    for index in range(5):
        store[f"k:{index}"] = {"n": index}
    table.data[b"k:raw"] = b'{"n":-1}'
    assert store["k:raw"] == {"n": -1}
    assert len(store._decoded) == 2  # the cache, not the table: every key is still held
    assert [store[f"k:{index}"] for index in range(5)] == [{"n": index} for index in range(5)]
    assert len(store._decoded) == 2 and len(store) == 6


def test_acknowledged_raises_the_producers_error_or_a_timeout_for_an_acknowledgement_that_never_comes() -> None:
    from streams.table_store import acknowledged

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        fine, failed, never = loop.create_future(), loop.create_future(), loop.create_future()
        fine.set_result("metadata")
        failed.set_exception(OSError("broker gone"))
        await acknowledged([fine], "one record")
        with pytest.raises(OSError, match="broker gone"):
            await acknowledged([fine, failed], "two records")
        with pytest.raises(TimeoutError, match="1 of 2 records not acknowledged"):
            await acknowledged([fine, never], "2 records", timeout_s=0.05)
        assert not never.cancelled()  # still the producer's

    asyncio.run(scenario())


def test_acknowledged_returns_only_once_acknowledgements_arriving_later_and_out_of_order_are_all_in() -> None:
    from streams.table_store import acknowledged

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        acks = [loop.create_future() for _ in range(5)]
        for delay, ack in zip([0.04, 0.01, 0.03, 0.0, 0.02], acks, strict=True):
            loop.call_later(delay, ack.set_result, None)
        await acknowledged(acks, "5 records")
        assert all(ack.done() for ack in acks)
        late_failure = [loop.create_future() for _ in range(3)]
        loop.call_later(0.0, late_failure[0].set_result, None)
        loop.call_later(0.02, late_failure[2].set_exception, OSError("not the leader"))
        loop.call_later(0.01, late_failure[1].set_result, None)
        with pytest.raises(OSError, match="not the leader"):
            await acknowledged(late_failure, "3 records")

    asyncio.run(scenario())
