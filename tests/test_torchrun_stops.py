"""Under torchrun, a job that loses a process or gets Ctrl-C ends with our sentences on every
rank and no traceback (``python -m codemae_cli.launch`` is torchrun with its own ending)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes import make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]


def _start(tmp_path, data):
    sets = [f"data.datasets=[{data}]", "model.preset=tiny", "model.img_size=32", "data.img_size=32",
            "model.patch_size=8", "model.ccl.num_heads=4", "model.okd.teacher=ema", "optim.batch_size=2",
            "optim.max_steps=100000", "run.device=cpu", "run.log_every=1", "run.tensorboard=false",
            "data.num_workers=0"]
    cmd = [sys.executable, "-m", "codemae_cli.launch", "--standalone", "--nproc_per_node=2", "-m", "codemae_cli",
           "pretrain", str(ROOT / "recipes" / "smoke.yaml"), "--output-dir", str(tmp_path / "run")]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    log = open(tmp_path / "log.txt", "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_training(proc, tmp_path, timeout=300.0):
    t0 = time.monotonic()
    while "step 1/" not in (tmp_path / "log.txt").read_text():
        assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
        assert time.monotonic() - t0 < timeout
        time.sleep(0.2)


def _workers(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return sorted(int(p) for p in out)


@pytest.mark.parametrize("stop", ["kill_one_rank", "ctrl_c"])
def test_torchrun_job_stops_with_sentences_not_tracebacks(tmp_path, stop):
    data = make_synthetic_dataset(tmp_path / "data", n_chips=16, tile=32, seed=5)
    proc = _start(tmp_path, data)
    try:
        _wait_for_training(proc, tmp_path)
        if stop == "kill_one_rank":
            os.kill(_workers(proc.pid)[-1], signal.SIGKILL)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = (tmp_path / "log.txt").read_text()
    assert "Traceback" not in log, log[-4000:]
    if stop == "kill_one_rank":
        assert proc.returncode == 1, log[-2000:]
        assert "rank 0 lost contact" in log or "Stopped (rank 0)" in log, log[-2000:]
        assert "Error: the torchrun job stopped: rank 1 ended first (signal SIGKILL)" in log, log[-2000:]
    else:
        assert proc.returncode == 130, log[-2000:]
        assert log.count("Interrupted.") == 2 and "Interrupted: torchrun stopped every process" in log, log[-2000:]
