"""Recipes load strictly, overrides apply, shipped recipes are valid and say what they claim."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from codemae_cli.cli import app
from codemae_cli.errors import UserError
from codemae_cli.train.recipe import PretrainRecipe, load_pretrain_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def test_reference_recipe_holds_the_paper_settings():
    r = load_pretrain_recipe(RECIPES / "hr.yaml")
    assert (r.model.preset, r.model.img_size, r.model.patch_size, r.model.mask_ratio) == ("base", 224, 16, 0.75)
    assert (r.optim.blr, tuple(r.optim.betas), r.optim.weight_decay) == (1.5e-4, (0.9, 0.95), 0.05)
    assert (r.optim.warmup_epochs, r.optim.epochs, r.optim.batch_size) == (15, 800, 128)
    assert tuple(r.data.crop_scale) == (0.2, 1.0) and r.data.hflip
    assert r.model.okd.enabled and r.model.okd.teacher_model.startswith("vit_large_patch16_dinov3")
    assert r.model.ccl.mode == "conditioned" and r.model.cdr.enabled and r.model.cdr.degradation == "channel"
    assert r.run.precision == "auto"


@pytest.mark.parametrize("name,okd,ccl,cdr", [
    ("mae", False, "off", False), ("rigid", False, "rigid", False), ("fullcross", False, "off", True)])
def test_baseline_recipes(name, okd, ccl, cdr):
    r = load_pretrain_recipe(RECIPES / "baselines" / f"{name}.yaml")
    assert (r.model.okd.enabled, r.model.ccl.mode, r.model.cdr.enabled) == (okd, ccl, cdr)
    if name == "fullcross":
        assert r.model.cdr.degradation == "none"
    # Everything but the switches and the output directory equals the reference recipe.
    ref = yaml.safe_load((RECIPES / "hr.yaml").read_text())
    mine = yaml.safe_load((RECIPES / "baselines" / f"{name}.yaml").read_text())
    assert mine["optim"] == ref["optim"] and mine["data"] == ref["data"]
    trunk = [k for k in ref["model"] if k not in ("okd", "ccl", "cdr")]  # backbone, preset, init_weights, ...
    assert {k: mine["model"].get(k) for k in trunk} == {k: ref["model"][k] for k in trunk}
    assert r.model.backbone == "itpn"


def test_smoke_recipe_is_tiny_on_cpu():
    r = load_pretrain_recipe(RECIPES / "smoke.yaml")
    assert r.model.preset == "tiny" and r.run.device == "cpu" and r.model.okd.teacher == "ema"
    assert r.optim.max_steps is not None and r.optim.max_steps <= 100


def test_overrides_and_strictness():
    r = load_pretrain_recipe(RECIPES / "hr.yaml", ["optim.blr=1e-4", "model.ccl.mode=off",
                                                   "data.datasets=[a, b]", "run.compile=false"])
    assert r.optim.blr == 1e-4 and r.model.ccl.mode == "off" and r.data.datasets == ["a", "b"] and not r.run.compile
    with pytest.raises(UserError, match="did you mean 'optim.blr'"):
        load_pretrain_recipe(RECIPES / "hr.yaml", ["optim.blrr=1"])
    with pytest.raises(UserError, match="must be equal"):
        load_pretrain_recipe(RECIPES / "hr.yaml", ["model.img_size=96"])
    with pytest.raises(UserError, match="ckpt_every"):
        load_pretrain_recipe(None, ["run.ckpt_every=0"])
    assert isinstance(load_pretrain_recipe(None), PretrainRecipe)


def test_cli_print_recipe_and_bad_key(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["pretrain", str(RECIPES / "smoke.yaml"), "--set", "optim.epochs=3", "--print-recipe"])
    assert res.exit_code == 0, res.output
    printed = yaml.safe_load(res.output)
    assert printed["optim"]["epochs"] == 3 and printed["model"]["preset"] == "tiny"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  presett: tiny\n")
    res = runner.invoke(app, ["pretrain", str(bad)])
    assert res.exit_code == 2 and "unknown recipe key 'model.presett'" in res.output and "preset" in res.output
    res = runner.invoke(app, ["pretrain", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_recipe_of_the_other_command_is_named_as_such():
    """`pretrain recipes/seg.yaml` / `finetune recipes/hr.yaml`: say which command the recipe is for."""
    from codemae_cli.config import load_recipe
    from codemae_cli.tasks.config import FinetuneRecipe

    with pytest.raises(UserError, match="is a fine-tuning recipe .*codemae finetune"):
        load_pretrain_recipe(RECIPES / "seg.yaml")
    with pytest.raises(UserError, match="looks like a pretraining recipe .*codemae pretrain"):
        load_recipe(RECIPES / "hr.yaml", FinetuneRecipe)
    # a fine-tuning recipe with a typo keeps the plain message, with the full dotted suggestion
    with pytest.raises(UserError, match=r"^unknown recipe key 'optim.lrr'; did you mean 'optim.lr'\?$"):
        load_recipe(RECIPES / "seg.yaml", FinetuneRecipe, ["optim.lrr=1"])
