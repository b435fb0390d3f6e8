"""The ablation runner: table maths, the fast linear probe, and a one-cell smoke run with resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from codemae_cli.analysis.ablation import (
    COLUMNS,
    DEFAULT_VARIANTS,
    SCALES,
    VARIANTS,
    aggregate,
    render_markdown,
)


def _result(variant, seed, miou_sar, erank=10.0):
    return {"variant": variant, "seed": seed, "miou": {"sar": miou_sar, "optical": 0.5, "both": None},
            "erank_optical": erank, "erank_sar": erank, "modality_gap": 0.1, "paired_cos": 0.5,
            "unpaired_cos": 0.2, "retrieval_top1": 0.3, "sim_ssim_spearman": float("nan")}


def test_variants_are_the_papers_switches():
    assert set(DEFAULT_VARIANTS) == {"mae", "okd", "ccl", "cdr", "codemae", "rigid", "full_xrec"}
    # the reference code's forms and switches can be named
    assert "model.cdr.degradation=hog" in VARIANTS["cdr_hog"]
    assert "model.ccl.rigid_on=decoder_embed" in VARIANTS["rigid_ref"]
    assert {"model.ccl.gather_grad=false", "model.pos_embed=learnable"} <= set(VARIANTS["codemae_ref"])
    from codemae_cli.config import apply_overrides, from_dict
    from codemae_cli.train.recipe import PretrainRecipe

    for over in VARIANTS.values():  # every variant is a valid recipe override
        from_dict(PretrainRecipe, apply_overrides({}, over)).model.validate()
    assert "model.ccl.mode=rigid" in VARIANTS["rigid"]
    assert "model.cdr.degradation=none" in VARIANTS["full_xrec"]
    assert all(any(o.startswith("model.okd.enabled") for o in v) for v in VARIANTS.values())
    # Every variant's overrides build a valid pretraining recipe at every scale.
    from codemae_cli.analysis.ablation import pretrain_overrides
    from codemae_cli.config import load_recipe
    from codemae_cli.train.recipe import PretrainRecipe

    for _name, sc in SCALES.items():
        for v in VARIANTS:
            r = load_recipe(None, PretrainRecipe, pretrain_overrides(v, sc, "/x", "/y", 0))
            assert r.model.preset == sc.preset and r.optim.max_steps == sc.pretrain_steps


def test_aggregate_means_std_and_missing_values():
    rows = [_result("mae", 0, 0.40), _result("mae", 1, 0.50), _result("mae", 2, 0.60), _result("okd", 0, 0.7, 12.0)]
    t = aggregate(rows, ["mae", "okd", "ccl"])
    assert set(t) == {"mae", "okd"}  # variants without results are left out, not invented
    assert t["mae"]["miou.sar"]["mean"] == pytest.approx(50.0)  # fractions become percent
    assert t["mae"]["miou.sar"]["std"] == pytest.approx(10.0)  # sample std over seeds (ddof=1)
    assert t["okd"]["miou.sar"]["std"] == 0.0 and t["okd"]["erank_optical"]["mean"] == 12.0
    assert "miou.both" not in t["mae"] and "sim_ssim_spearman" not in t["mae"]  # None / NaN skipped
    md = render_markdown(t, "tiny", SCALES["tiny"], "test machine")
    assert "| mae | 3 | 50.0 +- 10.0 |" in md and "n/a" in md
    assert md.count("\n|") == 2 + 2  # header, separator, two variants
    assert len(md.splitlines()[2].split("|")) == len(COLUMNS) + 4


def test_linear_probe_learns_a_separable_task():
    torch = pytest.importorskip("torch")
    from codemae_cli.analysis.probe import linear_probe

    rng = np.random.default_rng(0)
    n, d, h = 40, 8, 4
    labels_tok = rng.integers(0, 3, size=(n, h, h))
    feats = rng.normal(0, 0.1, size=(n, d, h, h)).astype(np.float32)
    for k in range(3):  # class k lifts feature channel k
        feats[:, k][labels_tok == k] += 2.0
    labels = labels_tok.repeat(4, 1).repeat(4, 2).astype(np.uint8)  # 4-px patches
    labels[0, 0, 0] = 255  # ignored
    m = linear_probe(feats[:30], labels[:30], feats[30:], labels[30:], 3, steps=150, lr=0.05, seed=0)
    assert m["miou"] > 0.8
    noise = rng.normal(size=(n, d, h, h)).astype(np.float32)  # features unrelated to the labels
    chance = linear_probe(noise[:30], labels[:30], noise[30:], labels[30:], 3, steps=50, seed=0)
    assert chance["miou"] < m["miou"] - 0.3
    del torch


@pytest.mark.slow
def test_ablation_smoke_one_cell_and_resume(tmp_path):
    pytest.importorskip("torch")
    from typer.testing import CliRunner

    from codemae_cli.analysis.ablation import run_ablation
    from codemae_cli.cli import app

    tiny = {"scenes": 2, "scene_size": 96, "tile": 32, "pretrain_steps": 2, "pretrain_batch": 4,
            "probe_steps": 5, "probe_batch": 4, "analysis_chips": 4}
    out = tmp_path / "abl"
    table = run_ablation(out, scale="tiny", seeds=1, variants=["cdr"], overrides=tiny, log=lambda m: None)
    assert set(table) == {"cdr"}
    row = table["cdr"]
    for k in ("miou.sar", "miou.optical", "miou.both"):
        assert 0.0 <= row[k]["mean"] <= 100.0
    assert row["erank_optical"]["mean"] >= 1.0
    res = json.loads((out / "cells" / "cdr" / "seed0" / "result.json").read_text())
    assert res["variant"] == "cdr" and not math.isnan(res["modality_gap"])
    assert (out / "cells" / "cdr" / "seed0" / "analysis" / "reconstructions_pretrain.png").is_file()
    md = (out / "table.md").read_text()
    assert "| cdr | 1 |" in md and json.loads((out / "table.json").read_text())["variants"]["cdr"]

    # Resume: the finished cell is skipped (its result file is not rewritten).
    stamp = (out / "cells" / "cdr" / "seed0" / "result.json").stat().st_mtime_ns
    run_ablation(out, scale="tiny", seeds=1, variants=["cdr"], overrides=tiny, log=lambda m: None)
    assert (out / "cells" / "cdr" / "seed0" / "result.json").stat().st_mtime_ns == stamp

    # Other settings in the same directory are refused rather than mixed in.
    runner = CliRunner()
    res = runner.invoke(app, ["ablate", "-o", str(out), "--scale", "tiny", "--seeds", "1", "-v", "cdr"])
    assert res.exit_code == 2 and "other settings" in res.output
    res = runner.invoke(app, ["ablate", "-o", str(tmp_path / "b"), "-v", "nope"])
    assert res.exit_code == 2 and "unknown variant 'nope'" in res.output
    res = runner.invoke(app, ["ablate", "-o", str(tmp_path / "c"), "--scale", "huge"])
    assert res.exit_code == 2 and "unknown scale" in res.output
