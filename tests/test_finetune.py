"""Fine-tuning contracts on generated scenes: a SAR-separable task is learned, every input mode
runs, checkpoints reload for prediction, pretrained weights load, bad checkpoints are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
rasterio = pytest.importorskip("rasterio")

from fakes import pretrain_checkpoint  # noqa: E402
from rasters import write_raster  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from codemae_cli.cli import app  # noqa: E402
from codemae_cli.config import from_dict, to_dict  # noqa: E402
from codemae_cli.errors import UserError  # noqa: E402
from codemae_cli.tasks.config import FinetuneRecipe  # noqa: E402

torch.set_num_threads(1)
runner = CliRunner()


def _water_land_scene(root: Path) -> dict:
    """A generated 128 x 128 scene (seed 11: water, bare fields and a town) with a two-class
    label: water (0) vs land (1). The classes are far apart in SAR backscatter (-24 dB against
    -15 to -6 dB), so a SAR-only model must learn them."""
    from codemae_cli.data.synth import WATER, write_scene_pair

    scene = write_scene_pair(root / "raw", 128, 128, seed=11, labels=True)
    with rasterio.open(scene["labels"]) as src:
        cls = src.read(1)
    binary = np.where(cls == WATER, 0, 1).astype(np.uint8)
    path = write_raster(root / "raw" / "water_land.tif", binary, like=scene["labels"])
    return {"optical": scene["optical"], "sar": scene["sar"], "labels": path, "water": float((binary == 0).mean())}


@pytest.fixture(scope="module")
def water_land(tmp_path_factory) -> Path:
    from codemae_cli.data.prepare import run_prepare

    root = tmp_path_factory.mktemp("water_land")
    scene = _water_land_scene(root)
    assert 0.3 < scene["water"] < 0.7  # both classes well represented
    out = root / "prepared"
    run_prepare(out=str(out), optical=[str(scene["optical"])], sar=[str(scene["sar"])], labels=str(scene["labels"]),
                classes="water,land", tile=16, block=1, split="0.75,0.25,0", seed=0, quicklook=False)
    return out


def _recipe(data: Path, out: Path, **task) -> FinetuneRecipe:
    raw = {
        "data": {"datasets": [str(data)], "num_workers": 0, "crop_scale": [0.6, 1.0], "img_size": 16},
        "model": {"preset": "tiny", "img_size": 16, "patch_size": 4, "drop_path": 0.0},
        "task": {"from_scratch": True, "head": "fpn", "neck_dim": 32, **task},
        "optim": {"batch_size": 8, "epochs": 1, "lr": 2e-3, "warmup_epochs": 0},
        "run": {"output_dir": str(out), "device": "cpu", "log_every": 1, "tensorboard": False, "seed": 0},
    }
    return from_dict(FinetuneRecipe, raw)


def _tiny_pretrain_checkpoint(path: Path, optical_bands: int = 4, sar_bands: int = 2, preset: str = "tiny") -> Path:
    """A CoDe-MAE pretraining checkpoint as the pretraining engine writes it (untrained weights)."""
    return pretrain_checkpoint(path, optical_bands=[f"B{i}" for i in range(optical_bands)],
                               sar_bands=[f"P{i}" for i in range(sar_bands)], preset=preset, img_size=16,
                               patch_size=4, ccl=None, seed=None)


def test_sar_only_learns_water_vs_land(water_land, tmp_path):
    """Stated target: validation mIoU >= 0.85 after 3 short epochs (18 steps) from scratch on CPU."""
    from codemae_cli.tasks.finetune import run_finetune

    recipe = _recipe(water_land, tmp_path / "run", inputs="sar")
    recipe.optim.epochs = 3
    result = run_finetune(recipe)
    best = result["best_metrics"]
    assert best["miou"] >= 0.85, best
    assert best["oa"] >= 0.90
    assert len(best["iou"]) == 2 and best["classes"] == ["water", "land"]
    run = Path(result["run_dir"])
    for name in ("recipe.yaml", "metrics.jsonl", "loss_curve.png", "val_curve.png"):
        assert (run / name).is_file(), name
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["split"] == "val"]
    assert len(val) == 3 and "iou/water" in val[0]
    meta = json.loads((run / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["kind"] == "finetune" and meta["task"] == "segmentation" and meta["inputs"] == "sar"
    assert [c["name"] for c in meta["classes"]] == ["water", "land"]
    assert all(len(c["color"]) == 3 for c in meta["classes"])
    assert set(meta["stats"]) == {"optical", "sar"} and len(meta["stats"]["sar"]["mean"]) == 2
    assert meta["img_size"] == 16 and meta["bands"]["sar"] == ["VV", "VH"]
    assert meta["metrics"]["miou"] == pytest.approx(best["miou"])


@pytest.mark.parametrize("inputs", ["optical", "sar", "both"])
def test_every_input_mode_trains_and_reloads(water_land, tmp_path, inputs):
    from codemae_cli.tasks import build_task_model_from_checkpoint
    from codemae_cli.tasks.finetune import run_finetune

    extra = {"modality_dropout": 0.5, "head": "upernet"} if inputs == "both" else {}
    recipe = _recipe(water_land, tmp_path / "run", inputs=inputs, **extra)
    recipe.optim.max_steps = 2
    result = run_finetune(recipe)
    assert 0.0 <= result["best_metrics"]["miou"] <= 1.0
    model, meta = build_task_model_from_checkpoint(result["run_dir"])
    assert meta.inputs == inputs and not model.training
    # the record: what the training data was (the generated scene's SAR is linear power)
    assert meta.sar_scale == "linear" and meta.band_selection == {"optical": None, "sar": None}
    assert meta.backbone == "vit" and meta.preset == "tiny" and meta.img_size == 16 and meta.patch_size == 4
    opt, sar = torch.randn(1, 4, 32, 32), torch.randn(1, 2, 32, 32)
    with torch.no_grad():
        if inputs == "both":
            full = model(optical=opt, sar=sar)
            assert model(optical=opt).shape == model(sar=sar).shape == full.shape == (1, 2, 32, 32)
        else:
            out = model(optical=opt if inputs == "optical" else None, sar=sar if inputs == "sar" else None)
            assert out.shape == (1, 2, 32, 32)


def test_classification_single_and_multilabel(water_land, tmp_path):
    from codemae_cli.tasks.finetune import run_finetune

    single = _recipe(water_land, tmp_path / "single", kind="classification", head="pool", best_metric="top1",
                     inputs="both")
    single.optim.max_steps = 2
    m = run_finetune(single)["best_metrics"]
    assert 0.0 <= m["top1"] <= 1.0 and len(m["iou"]) == 2
    multi = _recipe(water_land, tmp_path / "multi", kind="classification", multilabel=True, head="pool",
                    best_metric="micro_map", inputs="optical")
    multi.optim.max_steps = 2
    m = run_finetune(multi)["best_metrics"]
    assert 0.0 <= m["micro_map"] <= 1.0 and len(m["ap"]) == 2


def test_linear_probe_keeps_the_pretrained_encoder_frozen(water_land, tmp_path):
    from codemae_cli.tasks.finetune import run_finetune
    from codemae_cli.train.checkpoint import load_checkpoint

    ckpt = _tiny_pretrain_checkpoint(tmp_path / "pre")
    recipe = _recipe(water_land, tmp_path / "probe", inputs="sar", head="linear", linear_probe=True,
                     from_scratch=False, pretrained=str(ckpt))
    recipe.optim.optimizer = "sgd"
    recipe.optim.lr = 0.5
    recipe.optim.weight_decay = 0.0
    recipe.optim.max_steps = 3
    result = run_finetune(recipe)
    report = result["load_report"]
    assert report["loaded"] > 0 and report["missing"] == [] and report["unexpected"] == []
    pre, _ = load_checkpoint(ckpt)
    post, meta = load_checkpoint(Path(result["run_dir"]) / "checkpoints" / "last")
    assert meta["linear_probe"] is True
    for k, v in pre.items():
        if k.startswith("encoder."):
            assert torch.equal(post[k], v), k


def test_pretrained_weights_are_loaded_before_training(water_land, tmp_path):
    from codemae_cli.tasks.model_io import (
        build_task_model,
        encoder_state_from_checkpoint,
        load_encoder_weights,
    )
    from codemae_cli.train.checkpoint import load_weights, read_checkpoint_meta

    meta = read_checkpoint_meta(_tiny_pretrain_checkpoint(tmp_path / "pre"))
    state = load_weights(meta.path)
    recipe = _recipe(water_land, tmp_path / "run", inputs="both", from_scratch=False, pretrained="x")
    model, cfg = build_task_model(recipe, 4, 2, 2, meta)
    assert cfg.preset == "tiny" and cfg.patch_size == 4
    report = load_encoder_weights(model.encoder, encoder_state_from_checkpoint(state))
    assert report.missing == [] and report.unexpected == []
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, state["encoder." + k]), k


def test_bad_checkpoints_are_one_sentence_errors(water_land, tmp_path):
    import yaml

    def finetune(pretrained, *sets):
        recipe = _recipe(water_land, tmp_path / "run", inputs="both", from_scratch=False, pretrained=str(pretrained))
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(to_dict(recipe)))
        return runner.invoke(app, ["finetune", str(path), *sum((["--set", s] for s in sets), [])])

    not_ckpt = tmp_path / "empty"
    not_ckpt.mkdir()
    (not_ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    (not_ckpt / "meta.json").write_text(json.dumps({"codemae_version": "0.1.0", "kind": "pretrain"}))
    wrong_bands = _tiny_pretrain_checkpoint(tmp_path / "three_bands", optical_bands=3)
    good = _tiny_pretrain_checkpoint(tmp_path / "good")
    cases = [
        (finetune(tmp_path / "missing"), "does not exist"),
        (finetune(not_ckpt), "corrupt"),
        (finetune(wrong_bands), "3 optical band"),
        (finetune(good, "model.preset=small"), "preset 'tiny'"),
    ]
    for result, needle in cases:
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("Error:")]
        assert len(lines) == 1 and needle in lines[0], result.output
    assert not (tmp_path / "run").exists()  # nothing half-written
    # a pretraining checkpoint is not a fine-tuned model
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(good), "--data", str(water_land), "--split", "val"])
    assert result.exit_code == 2 and "not a fine-tuned model" in result.output


def test_recipe_validation_errors():
    with pytest.raises(UserError, match="linear_probe"):
        from_dict(FinetuneRecipe, {"data": {"datasets": ["d"]}, "task": {"linear_probe": True}})
    # a recipe written for both inputs (recipes/seg.yaml) runs with one: modality dropout is moot there
    sar = from_dict(FinetuneRecipe, {"data": {"datasets": ["d"]}, "task": {"inputs": "sar", "modality_dropout": 0.3}})
    assert sar.task.modality_dropout == 0.0
    from codemae_cli.config import load_recipe

    seg = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "seg.yaml", FinetuneRecipe, ["task.inputs=sar"])
    assert seg.task.inputs == "sar" and seg.task.modality_dropout == 0.0
    # from scratch without a size: the small preset (said loudly in the log), not the 86 M base
    from codemae_cli.tasks.model_io import encoder_config

    scratch = from_dict(FinetuneRecipe, {"data": {"datasets": ["d"]}, "task": {"from_scratch": True}})
    assert scratch.model.preset is None and encoder_config(scratch).preset == "small"
    for bad, needle in (({"lr": -1e-3}, "optim.lr must be positive"), ({"blr": 0}, "optim.blr"),
                        ({"betas": [0.9, 1.0]}, "optim.betas"), ({"clip_grad": 0}, "optim.clip_grad"),
                        ({"weight_decay": -0.1}, "must not be negative"), ({"momentum": 1.5}, "optim.momentum")):
        with pytest.raises(UserError, match=needle):
            from_dict(FinetuneRecipe, {"data": {"datasets": ["d"]}, "optim": bad})
    with pytest.raises(UserError, match="best_metric"):
        from_dict(FinetuneRecipe, {"data": {"datasets": ["d"]}, "task": {"kind": "classification", "multilabel": True}})
    with pytest.raises(UserError, match="did you mean"):
        from_dict(FinetuneRecipe, {"data": {"datasets": ["d"]}, "task": {"input": "sar"}})


def test_cli_finetune_then_evaluate(water_land, tmp_path):
    import yaml

    recipe = _recipe(water_land, tmp_path / "run", inputs="both", modality_dropout=0.3)
    path = tmp_path / "seg.yaml"
    path.write_text(yaml.safe_dump(to_dict(recipe)))
    result = runner.invoke(app, ["finetune", str(path), "--set", "optim.max_steps=2"])
    assert result.exit_code == 0, result.output
    assert "best validation" in result.output
    again = runner.invoke(app, ["finetune", str(path)])
    assert again.exit_code == 2 and "--resume" in again.output
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(tmp_path / "run"), "--data", str(water_land),
                                 "--split", "val", "--inputs", "sar", "--json", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert metrics["inputs"] == "sar" and metrics["split"] == "val"
    assert np.asarray(metrics["confusion"]).sum() == sum(metrics["support"]) > 0


def test_resume_mid_epoch_repeats_the_uninterrupted_run(water_land, tmp_path):
    import shutil

    from codemae_cli.tasks.finetune import run_finetune
    from codemae_cli.train.checkpoint import load_checkpoint

    recipe = _recipe(water_land, tmp_path / "full", inputs="both", modality_dropout=0.5)
    recipe.optim.epochs = 2
    recipe.run.keep_every = 3  # keeps checkpoints/step_00000003 (mid-epoch, with resume state)
    full = run_finetune(recipe)
    ckpts = Path(full["run_dir"]) / "checkpoints"
    # a step kept at an epoch end (6 steps per epoch) is written after that epoch's validation
    at_epoch_end = json.loads((ckpts / "step_00000006" / "meta.json").read_text())
    assert at_epoch_end["epoch"] == 1 and at_epoch_end["best"]["epoch"] == 1 and "miou" in at_epoch_end["metrics"]
    # an interrupted copy: only the step-3 checkpoint survives as "last"
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpts / "step_00000003", cut / "checkpoints" / "last")
    recipe.run.output_dir = str(cut)
    resumed = run_finetune(recipe, resume=True)
    assert resumed["steps"] == full["steps"]
    a, _ = load_checkpoint(ckpts / "last")
    b, _ = load_checkpoint(cut / "checkpoints" / "last")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["best_metrics"]["miou"] == pytest.approx(full["best_metrics"]["miou"])


# -- the shared training loop under fine-tuning: finite-loss guard, fp16 scaler, process group --

_POISONED_CLI = '''
import os
import sys

from codemae_cli.tasks import evaluate

_loss, _calls = evaluate.task_loss, [0]


def poisoned(*args, **kwargs):
    # one rank only: its third training loss is NaN
    loss = _loss(*args, **kwargs)
    _calls[0] += 1
    return loss * float("nan") if os.environ["RANK"] == "1" and _calls[0] == 3 else loss


evaluate.task_loss = poisoned
from codemae_cli.cli import main  # noqa: E402

sys.argv = ["codemae", *sys.argv[1:]]
main()
'''


def test_two_gloo_ranks_stop_together_on_one_ranks_nan(water_land, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    import yaml
    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    recipe = _recipe(water_land, tmp_path / "run", inputs="sar")
    recipe.optim.batch_size = 4  # 2 ranks x 4 chips: 6 steps in the first epoch
    recipe.run.ckpt_every = 2
    recipe.run.log_every = 100  # the guard must act at the step-4 checkpoint, not at a log step
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(to_dict(recipe)))
    (tmp_path / "poisoned_cli.py").write_text(_POISONED_CLI)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(root))
        procs.append(subprocess.Popen([sys.executable, str(tmp_path / "poisoned_cli.py"), "finetune",
                                       str(tmp_path / "r.yaml")], cwd=root, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = [p.communicate(timeout=300) for p in procs]
    text = "".join(o + e for o, e in outs)
    assert [p.returncode for p in procs] == [2, 2], text[-3000:]
    errors = [ln for ln in text.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "NaN or infinite at or before step 4" in errors[0], text[-3000:]
    assert "last good checkpoint" in errors[0] and "Traceback" not in text
    last = tmp_path / "run" / "checkpoints" / "last"
    assert json.loads((last / "meta.json").read_text())["step"] == 2
    assert all(torch.isfinite(v).all() for v in load_file(str(last / "model.safetensors")).values())


def test_nan_before_any_checkpoint_says_so(water_land, tmp_path, monkeypatch):
    from codemae_cli.tasks import evaluate
    from codemae_cli.tasks.finetune import run_finetune
    from codemae_cli.train.engine import NonFiniteLossError

    monkeypatch.setattr(evaluate, "task_loss", lambda *a, **k: torch.tensor(float("inf"), requires_grad=True))
    recipe = _recipe(water_land, tmp_path / "run", inputs="sar")
    with pytest.raises(NonFiniteLossError, match="step 1; training stopped and no checkpoint had been written"):
        run_finetune(recipe)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fp16_on_cpu_uses_a_grad_scaler_and_leaves_the_callers_process_group(water_land, tmp_path, monkeypatch):
    import torch.distributed as tdist

    from codemae_cli.tasks.finetune import run_finetune

    scaled = []
    scale = torch.amp.GradScaler.scale
    monkeypatch.setattr(torch.amp.GradScaler, "scale",
                        lambda self, x: scaled.append(self.is_enabled()) or scale(self, x))
    recipe = _recipe(water_land, tmp_path / "run", inputs="sar")
    recipe.run.precision = "fp16"
    recipe.optim.max_steps = 2
    recipe.optim.batch_size = 2  # fp16 kernels are slow on a CPU; the scaler is what is checked
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        result = run_finetune(recipe)
        assert tdist.is_initialized()  # a group the caller made is the caller's to end
    finally:
        tdist.destroy_process_group()
    assert scaled == [True, True]  # one scaled backward per step
    resume = json.loads((Path(result["run_dir"]) / "checkpoints" / "last" / "resume.json").read_text())
    assert resume["extra"]["scaler"]["scale"] > 0  # the scaler's state is part of the resume state
    assert result["steps"] == 2 and 0.0 <= result["best_metrics"]["miou"] <= 1.0
