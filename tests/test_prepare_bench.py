"""`codemae bench prepare` runs end to end on a tiny scene (a smoke test, not a timing)."""

from __future__ import annotations

from typer.testing import CliRunner

from codemae_cli.cli import app


def test_bench_prepare_smoke():
    res = CliRunner().invoke(app, ["bench", "prepare", "--size", "256", "--tile", "128"])
    assert res.exit_code == 0, res.output
    assert "rasterio baseline" in res.output and "codemae prepare" in res.output
    assert "prepare / baseline: wall" in res.output
    bad = CliRunner().invoke(app, ["bench", "prepare", "--size", "64", "--tile", "128"])
    assert bad.exit_code == 2 and "at least one tile" in bad.output
