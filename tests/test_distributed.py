"""`codemae pretrain` under torchrun with 2 CPU processes (gloo): one command for every layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from fakes import make_synthetic_dataset
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_two_cpu_processes(tmp_path):
    data = make_synthetic_dataset(tmp_path / "data", n_chips=8, tile=32, seed=5)
    out = tmp_path / "run"
    sets = [f"data.datasets=[{data}]", "model.preset=tiny", "model.img_size=32", "data.img_size=32",
            "model.patch_size=8", "model.ccl.num_heads=4", "model.okd.teacher=ema", "optim.batch_size=2",
            "optim.max_steps=3", "optim.accum_steps=2", "run.device=cpu", "run.ckpt_every=2", "run.log_every=1",
            "run.tensorboard=false", "data.num_workers=0", "data.augment_on=device"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "codemae_cli", "pretrain", str(ROOT / "recipes" / "smoke.yaml"), "--output-dir", str(out)]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # Only rank 0 prints the set-up: the lr line appears once, with 2 processes counted.
    assert res.stdout.count("2 process(es) on cpu") == 1
    meta = json.loads((out / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 3
    assert meta["effective_batch"] == 2 * 2 * 2 * 2  # pairs x modalities x accum x processes
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in rows)
    state = load_file(str(out / "checkpoints" / "last" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values())


def test_resolve_device_is_the_one_place_that_reads_device_names():
    import pytest
    import torch

    from codemae_cli.device import resolve_device
    from codemae_cli.errors import UserError

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cpu", "cuda")
    for bad in ("gpu", "cuda:abc", "cuda0"):
        with pytest.raises(UserError, match="unknown device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda:0")
