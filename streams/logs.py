"""The worker's JSON logs (``json_logs``): one object per line, for a log shipper to index.

Every line holds ``ts`` (epoch seconds), ``level``, ``logger`` and ``message``; a line whose message names where a
record was read (a :class:`~streams.dead_letters.MessagePosition` among its arguments, printed as
``topic[partition]@offset``) also holds ``topic``, ``partition`` and ``offset``, and one with an exception holds
``exception``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from streams.dead_letters import MessagePosition


class JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        position = _position_of(record.args)
        if position is not None:
            line.update(topic=position.topic, partition=position.partition, offset=position.offset)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def _position_of(args: Any) -> MessagePosition | None:
    values = args.values() if isinstance(args, Mapping) else (args or ())
    return next((value for value in values if isinstance(value, MessagePosition)), None)


def json_logging_config(loglevel: str) -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` configuration: every record of ``loglevel`` and above, as JSON, to
    standard error."""
    level = loglevel.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.{JsonLogFormatter.__name__}"}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
                "level": level,
            }
        },
        "root": {"level": level, "handlers": ["default"]},
    }
