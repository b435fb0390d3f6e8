"""How many CPU threads torch uses: ``--threads`` on the commands that compute.

torch starts one thread per core it sees. On a machine that other work keeps busy, or under
torchrun with several processes per node, that oversubscribes the cores and every step waits
on the slowest thread (a fine-tuning step on a busy 2-core machine ran about 4x slower with the
default than with one thread). The default here: the physical cores available to this process,
shared between the processes of this node, minus the cores other work is using (1-minute load
average), at least 1. ``OMP_NUM_THREADS``, when set, is respected as the default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from codemae_cli.device import env_int
from codemae_cli.errors import UserError


@dataclass
class ThreadChoice:
    threads: int
    reason: str  # one clause for the log line


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads counted once)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    try:
        cpu, phys = None, "0"
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "processor":
                    cpu = int(value)
                elif key == "physical id":
                    phys = value
                elif key == "core id" and cpu in allowed:
                    cores.add((phys, value))
    except OSError:
        pass
    return max(1, min(len(cores) or len(allowed), len(allowed)))


def choose_threads(requested: Optional[int] = None) -> ThreadChoice:
    if requested is not None:
        if requested < 1:
            raise UserError(f"--threads must be at least 1, not {requested}")
        return ThreadChoice(requested, "--threads")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return ThreadChoice(int(env), "OMP_NUM_THREADS")
    cores = physical_cores()
    per_node = max(1, env_int("LOCAL_WORLD_SIZE", 1))
    share = max(1, cores // per_node)
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # unavailable, or not on this platform
        load = 0.0
    busy = int(round(load))
    free = max(1, len(os.sched_getaffinity(0)) - busy) if hasattr(os, "sched_getaffinity") else share
    threads = max(1, min(share, free))
    why = f"{cores} physical core(s)" + (f" / {per_node} processes" if per_node > 1 else "")
    if threads < share:
        why += f", machine busy (load {load:.1f})"
    return ThreadChoice(threads, why)


def apply_threads(requested: Optional[int] = None, echo=None) -> int:
    """Set torch's intra-op threads (and OMP_NUM_THREADS for processes started later)."""
    import torch

    choice = choose_threads(requested)
    torch.set_num_threads(choice.threads)
    os.environ["OMP_NUM_THREADS"] = str(choice.threads)
    if echo is not None:
        hint = "" if choice.reason == "--threads" else "; --threads N to change"
        echo(f"CPU threads: {choice.threads} (from {choice.reason}{hint})")
    return choice.threads


__all__ = ["ThreadChoice", "apply_threads", "choose_threads", "physical_cores"]
