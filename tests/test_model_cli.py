"""CLI: `codemae bench model` and `codemae model info`, bad input, and import hygiene."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from codemae_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_bench_model_runs_on_cpu_with_tiny_preset():
    result = runner.invoke(app, ["bench", "model", "--preset", "tiny", "--batch", "2", "--img-size", "32",
                                 "--patch-size", "8", "--steps", "1", "--warmup", "1", "--teacher", "ema",
                                 "--device", "cpu", "--threads", "1"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "CoDe-MAE" in out and "plain MAE" in out
    assert "pairs/s" in out and "TFLOP/s" in out and "peak" in out
    assert "x plain-MAE step" in out


def test_bench_model_bad_input_exit_2():
    result = runner.invoke(app, ["bench", "model", "--preset", "huge", "--device", "cpu"])
    assert result.exit_code == 2
    assert "Error: unknown preset 'huge'" in result.output
    result = runner.invoke(app, ["bench", "model", "--preset", "tiny", "--img-size", "30", "--device", "cpu"])
    assert result.exit_code == 2 and "not divisible" in result.output
    result = runner.invoke(app, ["bench", "model", "--preset", "tiny", "--teacher", "dino", "--device", "cpu"])
    assert result.exit_code == 2 and "--teacher" in result.output


def test_model_info_lists_presets():
    result = runner.invoke(app, ["model", "info", "--optical-bands", "4", "--sar-bands", "2"])
    assert result.exit_code == 0, result.output
    for name in ("tiny", "small", "base", "large"):
        assert name in result.output
    assert "8x512" in result.output


def test_model_and_bench_import_neither_rasterio_nor_cli_stack():
    # One interpreter: recipe loading needs no torch; the model and the bench pull in neither
    # rasterio/geopandas (absent on bare GPU machines) nor the CLI stack.
    code = ("import sys; from codemae_cli.model.config import ModelConfig; assert 'torch' not in sys.modules; "
            "import codemae_cli.model.codemae, codemae_cli.model.flops, codemae_cli.bench.model_bench; "
            "bad = [m for m in ('rasterio', 'geopandas', 'typer', 'rich') if m in sys.modules]; "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
