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


def test_itpn_model_info_and_bench_on_cpu():
    result = runner.invoke(app, ["model", "--preset", "base", "--backbone", "itpn"])
    assert result.exit_code == 0, result.output
    assert "77.8 M" in result.output and "81.5 M" in result.output  # encoder, encoder + pyramid neck
    result = runner.invoke(app, ["bench", "model", "--backbone", "itpn", "--preset", "tiny", "--batch", "2",
                                 "--img-size", "32", "--patch-size", "8", "--steps", "1", "--warmup", "1",
                                 "--teacher", "ema", "--device", "cpu", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "itpn preset tiny" in result.output and "CoDe-MAE" in result.output and "plain MAE" in result.output
    result = runner.invoke(app, ["bench", "model", "--backbone", "itpn", "--preset", "small", "--device", "cpu"])
    assert result.exit_code == 2 and "unknown preset 'small' for the itpn backbone" in result.output


def test_import_weights_and_convert_commands(tmp_path):
    import torch
    from itpn_reference import reference_state

    state = reference_state(seed=1)
    torch.save({"model": state}, tmp_path / "ref.pth")
    out = tmp_path / "paper"
    result = runner.invoke(app, ["model", "import-weights", str(tmp_path / "ref.pth"), "-o", str(out),
                                 "--optical-bands", "R,G,B"])
    assert result.exit_code == 0, result.output
    assert "imported iTPN 'tiny'" in result.output and (out / "checkpoints" / "last" / "model.safetensors").is_file()
    assert "distillation-head" in result.output  # a 48-d teacher has no timm model: those heads are dropped
    again = runner.invoke(app, ["model", "import-weights", str(tmp_path / "ref.pth"), "-o", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    bad = runner.invoke(app, ["model", "import-weights", str(tmp_path / "ref.pth"), "-o", str(tmp_path / "x"),
                              "--optical-bands", "R,G"])
    assert bad.exit_code == 2 and "3 optical band(s) but 2 names" in bad.output
    assert not (tmp_path / "x" / "checkpoints" / "last").exists()
    conv = runner.invoke(app, ["model", "convert", str(tmp_path / "ref.pth"), "-o", str(tmp_path / "ref.safetensors")])
    assert conv.exit_code == 0, conv.output
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "ref.safetensors"))["blocks.0.mlp.fc1.weight"],
                       state["blocks.0.mlp.fc1.weight"])
