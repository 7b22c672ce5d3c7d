"""``perfusion schemas export``: the JSON Schema of every record that crosses Kafka, one file per record kind.

The schemas are generated from the records of :mod:`perfusion.contracts.records` (pydantic), so they say what a
reader of this code accepts: ``schema_version`` is ``1`` or ``"1.<minor>"``, and a field the schema does not name
is allowed (readers ignore it; a newer minor may add it). ``docs/schemas/`` holds the committed export, with
``index.json`` naming each file's record, topic and key (other files of the folder are not the export's); a test
checks that it equals a fresh export, and ``--check`` does the same from the command line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEFAULT_FOLDER = Path(__file__).resolve().parents[2] / "docs" / "schemas"
INDEX_FILE = "index.json"
# Draft of the JSON Schema dialect pydantic generates.
DIALECT = "https://json-schema.org/draft/2020-12/schema"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "schemas",
        help="export the JSON Schema of every Kafka record",
        description="Writes one JSON Schema per record kind (inbound events by kind, outbound records by name) and "
        "an index to docs/schemas/ (or --out), generated from perfusion/contracts/records.py.",
    )
    actions = parser.add_subparsers(dest="schemas_action", metavar="ACTION", required=True)
    export = actions.add_parser("export", help="write the schemas (or, with --check, compare them)")
    export.add_argument("--out", type=Path, default=DEFAULT_FOLDER, help=f"folder to write (default {DEFAULT_FOLDER})")
    export.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 when the folder differs from a fresh export"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    files = exported_files()
    folder: Path = args.out
    if args.check:
        stale = differing_files(folder, files)
        if stale:
            print(f"{folder}: {', '.join(stale)} differ from a fresh export; run `perfusion schemas export`")
            return 1
        print(f"{folder}: {len(files)} files, each equal to a fresh export")
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():  # a file of a record that is gone is left for --check to name
        (folder / name).write_text(text)
    print(f"wrote {len(files)} files to {folder}")
    return 0


def differing_files(folder: Path, files: dict[str, str]) -> list[str]:
    """Names of the export's files that are missing from ``folder`` or differ there, and of files its index names
    that a fresh export no longer has. Other files of the folder (the evaluation's results schema) are not ours."""
    names = set(files) | _indexed_files(folder)
    return sorted(name for name in names if _read(folder / name) != files.get(name))


def _indexed_files(folder: Path) -> set[str]:
    text = _read(folder / INDEX_FILE)
    try:
        index = json.loads(text) if text is not None else {}
        return {str(entry["file"]) for entry in index.get("records", [])}
    except (ValueError, TypeError, KeyError, AttributeError):
        return set()  # an unreadable index differs from the fresh one, which says so


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, IsADirectoryError):
        return None


def exported_files() -> dict[str, str]:
    """File name -> JSON text of every record's schema and of the index, deterministic."""
    from perfusion.contracts import records
    from perfusion.contracts.topics import (
        DEAD_LETTERS,
        DESIGN_DEMAND,
        EVENTS,
        GROUP_DROPS,
        GROUP_SAMPLES,
        MODEL_UPDATES,
        PRODUCTION_ORDERS,
        TRAIN_REQUESTS,
    )

    events = (records.DesignCreated, records.Impression, records.Click, records.Order, records.Return, records.Select)
    kinds: list[tuple[str, type[records.Record], str, str]] = [
        (f"event-{record.model_fields['kind'].default}", record, EVENTS, "user_id") for record in events
    ]
    kinds += [
        ("dead-letter", records.DeadLetter, DEAD_LETTERS, "topic[partition]@offset of the message"),
        ("group-sample", records.GroupSample, GROUP_SAMPLES, "sample_id"),
        ("group-drop", records.GroupDrop, GROUP_DROPS, "sample_id, or sample_id/user_id of an orphan follow-up"),
        ("production-order", records.ProductionOrder, PRODUCTION_ORDERS, "design_id"),
        ("design-demand", records.DesignDemand, DESIGN_DEMAND, "design_id"),
        ("train-request", records.TrainRequest, TRAIN_REQUESTS, "request_id"),
        ("model-updated", records.ModelUpdated, MODEL_UPDATES, "version"),
    ]
    files: dict[str, str] = {}
    index: list[dict[str, str]] = []
    for name, record, topic, key in kinds:
        schema = _open_objects(record.model_json_schema(mode="validation"))
        schema = {"$schema": DIALECT, "$id": f"{name}.json", **schema}
        files[f"{name}.json"] = _text(schema)
        index.append({"file": f"{name}.json", "record": record.__name__, "topic": topic, "key": key})
    files[INDEX_FILE] = _text(
        {
            "schema_version": {
                "written": records.SCHEMA_VERSION,
                "reader_major": records.SCHEMA_MAJOR,
                "reader_minor": records.SCHEMA_MINOR,
                "rule": records.VERSION_RULE,
            },
            "unknown_fields": "ignored by readers from the wire; refused in records built in code and by the "
            "generator service's POST /events",
            "topics_take_the_prefix": "each topic name is prefixed with the loop's topic_prefix",
            "records": index,
        }
    )
    return files


def _open_objects(schema: Any) -> Any:
    """The schema with every ``additionalProperties: false`` removed: readers ignore fields they do not know."""
    if isinstance(schema, dict):
        return {
            key: _open_objects(value)
            for key, value in schema.items()
            if not (key == "additionalProperties" and value is False)
        }
    if isinstance(schema, list):
        return [_open_objects(item) for item in schema]
    return schema


def _text(value: object) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
