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


def test_peak_rss_of_a_subprocess_is_its_own():
    """A benchmark subprocess reports its own peak memory, not the larger peak of its parent."""
    import subprocess
    import sys

    import numpy as np

    held = np.ones(96 * 2**20 // 8)  # the parent touches 96 MiB
    code = "from codemae_cli.bench.memory import peak_rss_kb; print(peak_rss_kb())"
    child_kb = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert held.sum() > 0 and 0 < child_kb < 64 * 1024
