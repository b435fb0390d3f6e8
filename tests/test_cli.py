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
