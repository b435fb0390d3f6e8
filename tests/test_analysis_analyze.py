"""``run_analyze`` / ``codemae analyze`` end to end on tiny checkpoints and a tiny testbed."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fakes import pretrain_checkpoint  # noqa: E402

from codemae_cli.analysis.testbed import OPTICAL_BANDS, SAR_BANDS, write_testbed  # noqa: E402


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    return write_testbed(tmp_path_factory.mktemp("tb") / "data", scenes=2, size=96, tile=32, seed=1,
                         write_tifs=False)


def _checkpoint(root, name, *, cdr: bool, degradation="channel", seed=0):
    """A pretraining checkpoint of run ``name`` (random weights) normalising with the dataset's stats."""
    from codemae_cli.data.shards import PreparedDataset

    stats = PreparedDataset(root / "data").stats if (root / "data").exists() else None
    return pretrain_checkpoint(root / name / "checkpoints" / "last", optical_bands=OPTICAL_BANDS, sar_bands=SAR_BANDS,
                               cdr=cdr, degradation=degradation, stats=stats, seed=seed)


def test_run_analyze_writes_json_and_plots(testbed, tmp_path):
    from codemae_cli.analysis.analyze import run_analyze

    a = _checkpoint(testbed.parent, "plain", cdr=False, seed=0)
    b = _checkpoint(testbed.parent, "withcdr", cdr=True, seed=1)
    out = tmp_path / "an"
    doc = run_analyze([a.parent.parent, b], testbed, out, split="val", max_chips=5, reconstructions=2)
    assert set(doc["checkpoints"]) == {"plain", "withcdr"}
    assert len(doc["chips"]) == 5
    for r in doc["checkpoints"].values():
        er = r["effective_rank"]
        assert 1.0 <= er["optical_tokens"] <= 192 and 1.0 <= er["sar_tokens"] <= 192
        assert 0.0 <= r["modality_gap"]["chips"] <= 2.0
        assert -1.0 <= r["similarity"]["chips"]["paired"] <= 1.0
        assert r["tokens"] == 5 * 4 * 4 and len(r["spectrum"]["optical"]) == min(5 * 16, 192)
        assert r["similarity_vs_ssim"]["spearman"] is None or -1 <= r["similarity_vs_ssim"]["spearman"] <= 1
    assert "reconstructions" not in doc["checkpoints"]["plain"]
    assert doc["checkpoints"]["withcdr"]["reconstructions"] == "reconstructions_withcdr.png"
    for f in ("analysis.json", "spectra.png", "similarity_vs_ssim.png", "reconstructions_withcdr.png"):
        assert (out / f).stat().st_size > 0
    assert json.loads((out / "analysis.json").read_text())["split"] == "val"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_cross_reconstructions_match_the_model_targets(testbed):
    from codemae_cli.analysis.analyze import cross_reconstructions, load_pretrained
    from codemae_cli.data.shards import PreparedDataset

    ck = _checkpoint(testbed.parent, "xrec", cdr=True, degradation="none", seed=2)
    model = load_pretrained(ck).model
    ds = PreparedDataset(testbed)
    x = np.stack([np.nan_to_num(ds.read(i)["optical"]) for i in range(2)])
    s = np.stack([np.nan_to_num(ds.read(i)["sar"]) for i in range(2)])
    rec = cross_reconstructions(model, x, s)
    # Non-degraded targets keep every band; images come back at the model's size.
    assert rec["sar_to_optical"]["target"].shape == (2, 4, 32, 32)
    assert rec["optical_to_sar"]["pred"].shape == (2, 2, 32, 32)
    assert rec["mask"].shape == (2, 32, 32) and 0 < rec["mask"].mean() < 1
    # Per-patch normalised targets (norm_pix over all values of a patch): zero patch mean.
    t = rec["optical_to_sar"]["target"][0, :, :8, :8]
    assert abs(t.mean()) < 1e-4


def test_analyze_cli_and_bad_input(testbed, tmp_path):
    from typer.testing import CliRunner

    from codemae_cli.cli import app

    ck = _checkpoint(testbed.parent, "cli", cdr=False, seed=3)
    runner = CliRunner()
    out = tmp_path / "cli_out"
    res = runner.invoke(app, ["analyze", str(ck), "--data", str(testbed), "-o", str(out), "--max-chips", "3",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "erank optical" in res.output and (out / "analysis.json").is_file()
    # Non-empty output without --overwrite: refused, nothing touched.
    res = runner.invoke(app, ["analyze", str(ck), "--data", str(testbed), "-o", str(out)])
    assert res.exit_code == 2 and "--overwrite" in res.output
    # Unknown split, missing checkpoint, not a dataset: one sentence, exit 2.
    res = runner.invoke(app, ["analyze", str(ck), "--data", str(testbed), "-o", str(tmp_path / "x"),
                              "--split", "nope"])
    assert res.exit_code == 2 and "no 'nope' chips" in res.output
    res = runner.invoke(app, ["analyze", str(tmp_path / "missing"), "--data", str(testbed), "-o", str(tmp_path / "y")])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(app, ["analyze", str(ck), "--data", str(tmp_path), "-o", str(tmp_path / "z")])
    assert res.exit_code == 2 and "not a prepared dataset" in res.output
    res = runner.invoke(app, ["analyze", str(ck), "--data", str(testbed), "-o", str(tmp_path / "w"), "--device", "gpu"])
    assert res.exit_code == 2 and "unknown device 'gpu'" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()
    assert not (tmp_path / "w").exists()


def test_checkpoint_that_does_not_match_its_recipe_is_refused(testbed):
    from codemae_cli.analysis.analyze import load_pretrained
    from codemae_cli.errors import UserError

    ck = _checkpoint(testbed.parent, "mismatch", cdr=False, seed=4)
    meta_path = ck / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["recipe"]["model"]["patch_size"] = 16  # the saved patch embedding is for 8-px patches
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not match the model"):
        load_pretrained(ck)
