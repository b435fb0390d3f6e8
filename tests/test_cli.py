"""The command line answers --help/--version without heavy imports, and maps bad input to exit 2."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from codemae_cli import __version__
from codemae_cli.cli import app


def test_version_and_help():
    runner = CliRunner()
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and __version__ in res.output
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for command in ("prepare", "pretrain", "finetune", "predict", "evaluate", "bench"):
        assert command in res.output


def test_help_does_not_import_torch_or_rasterio():
    code = (
        "import sys\n"
        "from codemae_cli.cli import app\n"
        "from typer.testing import CliRunner\n"
        "r = CliRunner().invoke(app, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('torch', 'rasterio', 'geopandas', 'timm') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"--help imported {out.stdout.strip()}"


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "codemae_cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and __version__ in out.stdout


def test_demo_checks_device_first_and_prints_copyable_commands(tmp_path, monkeypatch, capsys):
    """`codemae demo`: an unknown --device is refused before anything is written; each printed
    command stays on one line however narrow the terminal, so it can be copied and pasted."""
    import pytest

    from codemae_cli.commands import demo
    from codemae_cli.errors import UserError

    with pytest.raises(UserError, match="unknown device 'gpu'"):
        demo.run_demo(tmp_path / "d", device="gpu")
    assert not (tmp_path / "d").exists()

    monkeypatch.setenv("COLUMNS", "60")
    monkeypatch.setattr(demo.subprocess, "run", lambda argv: subprocess.CompletedProcess(argv, 0))
    demo.run_demo(tmp_path / "d")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("$ codemae ")]
    assert len(lines) == 5
    assert lines[0].startswith("$ codemae prepare --optical ") and lines[0].endswith(str((tmp_path / "d" / "data").resolve()))
