"""``perfusion schemas export``: the committed JSON Schemas of the records equal a fresh export, and say what readers
accept (any minor of major 1, unknown fields allowed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ops.cli import main
from ops.commands.schemas import DEFAULT_FOLDER, INDEX_FILE, differing_files, exported_files
from perfusion.contracts.records import Click, DeadLetter


def test_the_committed_schemas_equal_a_fresh_export() -> None:
    stale = differing_files(DEFAULT_FOLDER, exported_files())
    assert not stale, f"docs/schemas/ is stale ({', '.join(stale)}): run `perfusion schemas export` and commit it"


def test_every_record_kind_has_a_file_and_the_index_names_them() -> None:
    files = exported_files()
    index = json.loads(files[INDEX_FILE])
    named = {entry["file"] for entry in index["records"]}
    assert named == set(files) - {INDEX_FILE}
    assert {"event-click.json", "event-impression.json", "dead-letter.json", "group-sample.json"} <= named
    assert index["schema_version"]["written"] == 1


@pytest.mark.parametrize("name", sorted(set(exported_files()) - {INDEX_FILE}))
def test_a_schema_allows_unknown_fields_and_states_the_version_rule(name: str) -> None:
    schema = json.loads(exported_files()[name])
    assert '"additionalProperties": false' not in json.dumps(schema)  # readers ignore fields they do not know
    version = schema["properties"]["schema_version"]
    integer, text = version["anyOf"]
    assert integer == {"const": 1, "type": "integer"} and version["default"] == 1
    pattern = re.compile(text["pattern"])
    assert pattern.search("1.4") and pattern.search("1.0")
    assert not pattern.search("2.0") and not pattern.search("1") and not pattern.search("1.x")
    assert "a new major changes or removes one" in version["description"]


def test_the_schemas_name_the_fields_of_the_records() -> None:
    files = exported_files()
    for name, record in (("event-click.json", Click), ("dead-letter.json", DeadLetter)):
        schema = json.loads(files[name])
        assert set(schema["properties"]) == set(record.model_fields)
        assert set(schema["required"]) == {field for field, info in record.model_fields.items() if info.is_required()}


def test_the_command_writes_and_checks_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schemas", "export", "--out", str(tmp_path)]) == 0
    assert main(["schemas", "export", "--out", str(tmp_path), "--check"]) == 0
    (tmp_path / "unrelated.json").write_text("{}")  # not the export's: left alone, not reported
    (tmp_path / "event-click.json").write_text("{}")
    assert main(["schemas", "export", "--out", str(tmp_path), "--check"]) == 1
    assert "event-click.json differ" in capsys.readouterr().out
