import subprocess
import sys

import pytest

from ops.cli import COMMAND_MODULES, build_parser, main


def test_help_lists_every_subcommand():
    help_text = build_parser().format_help()
    for name in COMMAND_MODULES:
        assert name in help_text


def test_building_the_parser_imports_no_heavy_library():
    code = (
        "import sys; from ops.cli import build_parser; build_parser(); "
        "heavy = [m for m in ('torch', 'faust', 'feast', 'diffusers', 'transformers') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_project_errors_become_exit_code_2_with_the_message(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PERFUSION_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    assert main(["models", "--models", str(tmp_path / "models"), "rollback", "v999999"]) == 2
    assert "error" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
