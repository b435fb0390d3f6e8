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


def _checkpoint(root, name, *, cdr: bool, degradation="channel", seed=0, source_range=None):
    """A pretraining checkpoint of run ``name`` (random weights) normalising with the dataset's stats."""
    from codemae_cli.data.shards import PreparedDataset

    stats = PreparedDataset(root / "data").stats if (root / "data").exists() else None
    return pretrain_checkpoint(root / name / "checkpoints" / "last", optical_bands=OPTICAL_BANDS, sar_bands=SAR_BANDS,
                               cdr=cdr, degradation=degradation, stats=stats, seed=seed, source_range=source_range)


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


def test_sar_gradient_targets_at_the_source_scale_the_checkpoint_records(testbed):
    """A saved sar_gradient model's cross targets are recomputed on the stored chips at the run's
    recorded source range: (stored - lo) / (hi - lo), not the normalised values clamped."""
    from codemae_cli.analysis.analyze import (
        _unpatchify,
        cross_reconstructions,
        load_pretrained,
        normalise_chips,
        set_source_scale,
    )
    from codemae_cli.data.shards import PreparedDataset
    from codemae_cli.model.targets import degraded_target

    ds = PreparedDataset(testbed)
    rng = {"optical": [0.0, 3000.0], "sar": [-35.0, 5.0]}
    ck = _checkpoint(testbed.parent, "sargrad", cdr=True, degradation="sar_gradient", seed=5, source_range=rng)
    pre = load_pretrained(ck)
    assert pre.meta.source_range == rng
    assert set_source_scale(pre.model, pre.meta, ds.stats, ds.meta) == "checkpoint"
    raw_o = np.stack([ds.read(i)["optical"] for i in range(2)])
    raw_s = np.stack([ds.read(i)["sar"] for i in range(2)])
    o, s = normalise_chips(raw_o, ds.stats["optical"]), normalise_chips(raw_s, ds.stats["sar"])
    rec = cross_reconstructions(pre.model, o, s)

    def target(raw, stats, lo, hi):
        mean = np.asarray(stats["mean"], np.float32)[None, :, None, None]
        src = np.clip((np.where(np.isfinite(raw), raw, mean) - lo) / (hi - lo), 0, 1)  # nodata: the band mean
        t = degraded_target(torch.from_numpy(s), "sar", "sar_gradient", 8, None, pre.model.cfg.norm_pix_loss,
                            torch.from_numpy(src.astype(np.float32)))
        return _unpatchify(t, 8, 32)

    exact = target(raw_s, ds.stats["sar"], *rng["sar"])
    np.testing.assert_allclose(rec["optical_to_sar"]["target"], exact, rtol=1e-4, atol=1e-4)
    identity = _unpatchify(degraded_target(torch.from_numpy(s), "sar", "sar_gradient", 8, None,
                                           pre.model.cfg.norm_pix_loss), 8, 32)
    assert np.abs(exact - identity).max() > 1e-2  # the normalised values clamped would be another target


def test_older_checkpoints_take_the_source_scale_of_the_dataset_analysed(testbed):
    from codemae_cli.analysis.analyze import analyse_checkpoint, load_analysis_chips, load_pretrained
    from codemae_cli.data.shards import PreparedDataset

    ds = PreparedDataset(testbed)
    ck = _checkpoint(testbed.parent, "oldsrc", cdr=True, degradation="sar_gradient", seed=6)
    assert load_pretrained(ck).meta.source_range is None
    chips = load_analysis_chips(ds, "val", 2)
    r = analyse_checkpoint(ck, chips, ds.stats, reconstructions=1, dataset_meta=ds.meta).metrics
    assert r["source_scale"] == "dataset"
    assert analyse_checkpoint(ck, chips, ds.stats, reconstructions=0).metrics["source_scale"] == "identity"
