"""`codemae pretrain` end to end on a tiny generated dataset: outputs, refusals, NaN guard, and
exact resume after SIGKILL mid-epoch."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from fakes import make_synthetic_dataset
from safetensors.torch import load_file
from typer.testing import CliRunner

from codemae_cli.cli import app
from codemae_cli.train.checkpoint import read_checkpoint_meta

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes" / "smoke.yaml"
TINY = ["model.preset=tiny", "model.img_size=32", "data.img_size=32", "model.patch_size=8",
        "model.ccl.num_heads=4", "model.okd.teacher=ema", "optim.batch_size=2", "optim.lr=1e-3",
        "optim.warmup_epochs=1", "run.device=cpu", "run.precision=fp32", "run.log_every=2",
        "run.tensorboard=false", "data.num_workers=0", "data.pin_memory=false", "data.crop_scale=[0.5,1.0]"]


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    args = ["pretrain", str(SMOKE), "--output-dir", str(out), "--set", f"data.datasets=[{data}]"]
    for o in TINY + list(extra):
        args += ["--set", o]
    return args


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("pretrain") / "data", n_chips=8, tile=32, seed=3)


def test_pretrain_cli_outputs_and_refusals(data, tmp_path):
    runner = CliRunner()
    data = Path(shutil.copytree(data, tmp_path / "data"))  # its metadata changes below
    out = tmp_path / "run"
    same = ["optim.max_steps=4", "optim.clip_grad=1.0"]
    res = runner.invoke(app, _args(data, out, *same, "run.ckpt_every=2"))
    assert res.exit_code == 0, res.output
    assert "lr = 0.001" in res.output
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["model"]["preset"] == "tiny" and recipe["run"]["output_dir"] == str(out)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 4]
    for key in ("loss", "loss_self_optical", "loss_self_sar", "loss_cdr", "loss_okd", "loss_ccl", "lr", "pairs_per_s",
                "grad_norm"):
        assert all(key in r and r[key] == r[key] for r in rows), key
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    ck = out / "checkpoints" / "last"
    meta = json.loads((ck / "meta.json").read_text())
    ds_meta = json.loads((data / "metadata.json").read_text())
    assert meta["kind"] == "pretrain" and meta["step"] == 4 and meta["stats"] == ds_meta["stats"]
    assert meta["bands"]["optical"] == ds_meta["optical"]["bands"] and meta["recipe"]["optim"]["lr"] == 1e-3
    assert meta["torch_version"] and meta["codemae_version"] and meta["world_size"] == 1
    ranges = {m: ds_meta[m]["source_range"] for m in ("optical", "sar")}
    assert read_checkpoint_meta(ck).source_range == ranges  # the source scale of the OKD teacher / CDR targets
    from codemae_cli.config import from_dict
    from codemae_cli.model import build_model
    from codemae_cli.train.recipe import PretrainRecipe

    model = build_model(from_dict(PretrainRecipe, meta["recipe"]).model, 3, 2)
    model.load_state_dict(load_file(str(ck / "model.safetensors")), strict=True)

    res = runner.invoke(app, _args(data, out, *same))
    assert res.exit_code == 2 and "already holds checkpoints" in res.output and "--resume" in res.output
    res = runner.invoke(app, _args(data, out, *same, "optim.lr=2e-3") + ["--resume"])
    assert res.exit_code == 2 and "optim.lr" in res.output
    res = runner.invoke(app, _args(data, out, *same) + ["--resume"])
    assert res.exit_code == 0 and "nothing to do" in res.output
    # Continued, the run keeps the source scale it was trained at, whatever the dataset now records.
    ds_meta["sar"]["source_range"] = [-99.0, 99.0]
    (data / "metadata.json").write_text(json.dumps(ds_meta))
    res = runner.invoke(app, _args(data, out, "optim.max_steps=6", "optim.clip_grad=1.0") + ["--resume"])
    assert res.exit_code == 0, res.output
    resumed = read_checkpoint_meta(ck)
    assert resumed.raw["step"] == 6 and resumed.source_range == ranges


def test_pretrain_refuses_bad_datasets(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, _args(tmp_path / "missing", tmp_path / "r1"))
    assert res.exit_code == 2 and "does not exist" in res.output and "Traceback" not in res.output
    (tmp_path / "notdata").mkdir()
    res = runner.invoke(app, _args(tmp_path / "notdata", tmp_path / "r2"))
    assert res.exit_code == 2 and "not a prepared dataset" in res.output
    res = runner.invoke(app, _args(tmp_path / "notdata", tmp_path / "r3") + ["--resume"])
    assert res.exit_code == 2 and "no checkpoint to resume" in res.output
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_nan_guard_stops_and_keeps_last_good_checkpoint(data, tmp_path, monkeypatch):
    from codemae_cli.model.codemae import CoDeMAE
    from codemae_cli.train.engine import NonFiniteLossError
    from codemae_cli.train.pretrain import run_pretrain
    from codemae_cli.train.recipe import load_pretrain_recipe

    original = CoDeMAE.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        out = original(self, *a, **k)
        calls["n"] += 1
        if calls["n"] >= 3:  # the third step's loss is NaN
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(CoDeMAE, "forward", poisoned)
    recipe = load_pretrain_recipe(SMOKE, [f"data.datasets=[{data}]", *TINY, "optim.max_steps=6", "run.ckpt_every=2",
                                          "run.log_every=100"])
    with pytest.raises(NonFiniteLossError, match="NaN or infinite"):
        run_pretrain(recipe, output_dir=tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["step"] == 2
    state = load_file(str(tmp_path / "run" / "checkpoints" / "last" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values())


def _cli(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "codemae_cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(data, tmp_path):
    # 8 chips, batch 2: 4 steps per epoch; the kill lands after the step-3 checkpoint (mid-epoch).
    extra = ["optim.max_steps=9", "run.ckpt_every=3", "data.crop_scale=[0.2,1.0]"]
    full = _cli(_args(data, tmp_path / "full", *extra)[0:])
    killed_dir = tmp_path / "killed"
    victim = _cli(_args(data, killed_dir, *extra))
    meta = killed_dir / "checkpoints" / "last" / "meta.json"
    deadline = time.time() + 240
    while time.time() < deadline and victim.poll() is None:
        if meta.is_file() and json.loads(meta.read_text())["step"] >= 3:
            break
        time.sleep(0.02)
    assert victim.poll() is None, "the run finished before it could be killed: " + (victim.stdout.read() or "")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    step_at_kill = json.loads(meta.read_text())["step"]
    assert step_at_kill < 9

    resumed = _cli(_args(data, killed_dir, *extra) + ["--resume"])
    out_r, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out_r
    assert "resumed from" in out_r
    out_f, _ = full.communicate(timeout=300)
    assert full.returncode == 0, out_f

    a = load_file(str(tmp_path / "full" / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(killed_dir / "checkpoints" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    steps = [json.loads(x)["step"] for x in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 9
