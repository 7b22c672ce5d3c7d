"""The bare Faust agent: the ceiling a Faust worker with the stream worker's settings can reach, for
``perfusion bench streams``.

``python -m ops.bench.bare_faust [worker flags] [--parse event|json]`` builds the worker's own Faust app
(:func:`streams.app.create_app`: same broker, commit interval, session timeout, topic partitions, topics and offset
reset) from :class:`~streams.settings.StreamSettings` read as ``perfusion worker`` reads them, with no agent of the
worker's and under its own consumer group (``app_id`` ``perfusion-bare-faust`` unless ``--app-id`` says otherwise).
One agent reads ``perfusion.events`` in micro-batches of the worker's size and window
(``stream.take_events(push_batch_max, within=push_batch_within_s)``, as the events agent does) and only parses each
message:

- ``event`` (the default): :func:`perfusion.contracts.records.parse_event`, the bounded JSON decode and the
  pydantic validation the events agent's gate runs on every message before any stage, nothing after;
- ``json``: ``json.loads`` alone.

After each batch it counts the batch's messages in the worker's own ``perfusion_worker_events_total`` (served on
``/metrics`` with ``--http-port``), so that the benchmark times the bare agent and the worker alike. Invalid
messages are counted too (``dead_letter``) but not sent anywhere. Stop it with SIGTERM, like the worker.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from perfusion.settings import add_flags, flag_overrides
from streams.settings import StreamSettings

if TYPE_CHECKING:
    from faust.streams import Stream
    from faust.types import StreamT

    from streams.app import StreamApp

log = logging.getLogger(__name__)

BARE_APP_ID = "perfusion-bare-faust"
PARSERS = ("event", "json")


def event_parser(parse: str) -> Callable[[bytes], object]:
    """What the bare agent does to each message's bytes; raises on an invalid one."""
    if parse == "json":
        return json.loads
    if parse == "event":
        from perfusion.contracts.records import parse_event

        return lambda raw: parse_event(raw, now=time.time())
    raise ValueError(f"parse must be one of {PARSERS}, got {parse!r}")


def bare_app(settings: StreamSettings, parse: str = "event") -> StreamApp:
    """The worker's Faust app with no worker agent and one bare agent on ``perfusion.events``."""
    from streams.app import create_app

    stream_app = create_app(settings, agent_modules=())
    parse_one = event_parser(parse)
    finished = stream_app.metrics.events

    async def bare(stream: StreamT[bytes]) -> None:
        async for batch in cast("Stream[bytes]", stream).take_events(
            settings.push_batch_max, within=settings.push_batch_within_s
        ):
            invalid = 0
            for event in batch:
                try:
                    parse_one(event.value)
                except Exception:  # counted, as the worker's gate would count what it dead-letters
                    invalid += 1
            finished.labels(outcome="folded").inc(len(batch) - invalid)
            if invalid:
                finished.labels(outcome="dead_letter").inc(invalid)

    stream_app.app.agent(stream_app.topics.events, name="bare-events")(bare)
    return stream_app


def run_bare(stream_app: StreamApp, loglevel: str) -> None:
    """Run the app until a signal stops it, as :func:`streams.app.run_worker` runs the worker (topics ensured, no
    progress spinner), without opening Feast: the bare agent pushes nothing."""
    from faust.worker import Worker

    stream_app.ensure_topics()
    worker = Worker(stream_app.app, loglevel=loglevel, quiet=True)
    # As in run_worker: the spinner would set the root logger to DEBUG and every debug call would build a record.
    worker.spinner = None
    worker.execute_from_commandline()


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ops.bench.bare_faust",
        description="A Faust app with the stream worker's settings whose one agent only parses perfusion.events.",
    )
    add_flags(parser, StreamSettings)
    parser.add_argument("--loglevel", default="warning", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--parse", default="event", choices=PARSERS, help="what the agent does to each message")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = argument_parser().parse_args(argv)
    overrides: dict[str, Any] = flag_overrides(args, StreamSettings)
    overrides.setdefault("app_id", BARE_APP_ID)
    settings = StreamSettings.from_env(**overrides)
    run_bare(bare_app(settings, args.parse), loglevel=args.loglevel)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
