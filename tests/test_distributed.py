"""`codemae pretrain` under torchrun with 2 CPU processes (gloo): one command for every layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
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


def _fixed_buffers_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One rank of a 2-process gloo job: three optimizer steps of a tiny iTPN CoDe-MAE wrapped as
    DDP wrapped it before (buffers rebroadcast every forward), as ``wrap_model`` wraps it now,
    and as ``wrap_model`` wraps it with a torch older than DDP's ``forward_sync_buffers``."""
    import torch.distributed as torch_dist
    from fakes import random_pair, tiny_model_config
    from torch.nn.parallel import DistributedDataParallel as DDP

    from codemae_cli.model import build_model, itpn
    from codemae_cli.train import loop
    from codemae_cli.train.distributed import DistInfo

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)  # the older-torch way
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    dist = DistInfo(rank, rank, 2, torch.device("cpu"), rank == 0)
    resamplings = [0]
    resample = itpn.reference_pos_embed

    def counted(*args, **kwargs):
        resamplings[0] += 1
        return resample(*args, **kwargs)

    itpn.reference_pos_embed = counted
    has_option = loop._ddp_has_forward_sync_buffers
    report = {}
    for way in ("every_forward", "wrap_model", "wrap_model_older_torch"):
        loop._ddp_has_forward_sync_buffers = (lambda: False) if way == "wrap_model_older_torch" else has_option
        torch.manual_seed(0)
        model = build_model(tiny_model_config(backbone="itpn", okd={"teacher": "ema"}), 4, 2)
        wrapped = DDP(model) if way == "every_forward" else loop.wrap_model(model, dist)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(100 + rank)  # each rank its own masks and data
        resamplings[0], losses = 0, []
        for step in range(3):
            out = wrapped(*random_pair(B=2, seed=10 * step + rank))
            out["loss"].backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(out["loss"].item())
        state = {k: v.tolist() for k, v in model.state_dict().items()}
        report[way] = {"losses": losses, "resamplings": resamplings[0], "state": state,
                       "rebroadcasts": bool(wrapped.broadcast_buffers)}
    bn = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    report["batchnorm_rebroadcasts"] = bool(loop.wrap_model(bn, dist).broadcast_buffers)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    torch_dist.destroy_process_group()


def test_fixed_buffers_are_not_rebroadcast_and_training_is_unchanged(tmp_path):
    """Under DDP a model whose buffers training never changes (sin-cos tables, no BatchNorm) is
    not rebroadcast every forward: the same losses and weights as with the rebroadcast, and the
    iTPN's resampled position table is computed once, not every step. A model with BatchNorm
    running statistics keeps the rebroadcast.

    (With the rebroadcast, torch 2.6 to 2.12 bump the table's version counter every forward, so
    the table was resampled every step; newer torch keeps the counter, so the reference run's
    count depends on the installed torch and is not asserted.)"""
    import torch.multiprocessing as mp

    from codemae_cli.model import build_model
    from codemae_cli.tasks.heads import build_head
    from codemae_cli.train.loop import trains_buffers

    sys.path.insert(0, str(Path(__file__).parent))  # the spawned ranks import this module
    mp.spawn(_fixed_buffers_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        before, now, older = report["every_forward"], report["wrap_model"], report["wrap_model_older_torch"]
        assert before["rebroadcasts"] and not now["rebroadcasts"] and not older["rebroadcasts"]
        assert now["resamplings"] == older["resamplings"] == 1
        for way in (now, older):
            assert way["losses"] == before["losses"] and way["state"] == before["state"]
        assert report["batchnorm_rebroadcasts"]
    assert report["wrap_model"]["state"] == json.loads((tmp_path / "rank0.json").read_text())["wrap_model"]["state"]
    from fakes import tiny_model_config
    assert not trains_buffers(build_model(tiny_model_config(backbone="itpn", okd={"teacher": "ema"}), 4, 2))
    assert trains_buffers(build_head("classification", "linear", 64, 5))  # the linear probe's BatchNorm
