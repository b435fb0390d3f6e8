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


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """16 random chips, read by both jobs (each writes its run elsewhere)."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("torchrun") / "data", n_chips=16, tile=32, seed=5)


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


def _wait_for_training(proc, tmp_path, timeout=180.0):
    t0 = time.monotonic()
    while "step 1/" not in (tmp_path / "log.txt").read_text():
        assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
        assert time.monotonic() - t0 < timeout
        time.sleep(0.2)


def _worker_of_rank(pid: int, rank: int) -> int:
    """The launcher's child process that runs ``rank`` (by its RANK variable, not by pid order)."""
    for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(child)
    raise AssertionError(f"no process of rank {rank} under the launcher {pid}")


@pytest.mark.parametrize("stop", ["kill_one_rank", "ctrl_c"])
def test_torchrun_job_stops_with_sentences_not_tracebacks(tmp_path, data, stop):
    proc = _start(tmp_path, data)
    try:
        _wait_for_training(proc, tmp_path)
        if stop == "kill_one_rank":
            os.kill(_worker_of_rank(proc.pid, 1), signal.SIGKILL)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)  # a rank that ignored the launcher's SIGTERM gets SIGKILL after 30 s
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


# A rank of a torchrun job that gets the launcher's next signal while it prints its sentence: the
# SIGTERM torchrun sends once it sees the peer gone, or the Ctrl-C it forwards to every process.
_LATE_SIGNAL = """
import os, signal, typer
from codemae_cli.commands._common import cli_command

echo = typer.echo

def echo_after_a_signal(*args, **kwargs):
    os.kill(os.getpid(), signal.{late})
    echo(*args, **kwargs)

typer.echo = echo_after_a_signal

@cli_command
def run():
    {first}

typer.run(run)
"""


@pytest.mark.parametrize("first, late, ending", [
    ("raise RuntimeError('Read error: Connection reset by peer')", "SIGTERM", (1, "Error: rank 0 lost contact")),
    ("raise KeyboardInterrupt", "SIGINT", (130, "Interrupted.")),
    ("os.kill(os.getpid(), signal.SIGTERM)", "SIGTERM", (143, "Stopped (rank 0)")),
], ids=["sigterm_while_reporting_a_lost_peer", "ctrl_c_forwarded_while_interrupted", "second_sigterm"])
def test_a_late_launcher_signal_never_adds_a_traceback(first, late, ending):
    env = dict(os.environ, PYTHONPATH=str(ROOT), WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    done = subprocess.run([sys.executable, "-c", _LATE_SIGNAL.format(first=first, late=late)], env=env,
                          capture_output=True, text=True, timeout=60)
    out = (done.stdout + done.stderr).strip()
    assert "Traceback" not in out, out
    assert done.returncode == ending[0] and out.startswith(ending[1]) and "\n" not in out, out


def test_launch_names_the_killed_rank_when_its_peer_ended_in_the_same_second():
    from types import SimpleNamespace

    from codemae_cli.launch import _first_failure

    same_second = {0: SimpleNamespace(timestamp=100, exitcode=1), 1: SimpleNamespace(timestamp=100, exitcode=-9)}
    assert _first_failure(same_second)[0] == 1
    stopped = {0: SimpleNamespace(timestamp=100, exitcode=143), 1: SimpleNamespace(timestamp=100, exitcode=1)}
    assert _first_failure(stopped)[0] == 1
    earlier = {0: SimpleNamespace(timestamp=99, exitcode=1), 1: SimpleNamespace(timestamp=100, exitcode=-9)}
    assert _first_failure(earlier)[0] == 0
