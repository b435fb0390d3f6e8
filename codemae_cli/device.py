"""Which torch device a device name means: the one place that reads ``--device`` / ``run.device``.

It sits below every room (data, model, train, tasks, infer, analysis, bench all may use it), so
prediction, analyses and benchmarks resolve devices without importing the training engine.
"""

from __future__ import annotations

import os

from codemae_cli.errors import UserError


def env_int(name: str, default: int) -> int:
    """An integer environment variable (torchrun's RANK, LOCAL_RANK, WORLD_SIZE); ``default`` when
    unset or blank, a one-sentence refusal when it is not an integer."""
    raw = os.environ.get(name, "").strip()
    if raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} must be an integer") from None


def rank_from_env() -> int:
    """This process's rank in a torchrun job (``RANK``); 0 when it runs alone."""
    return env_int("RANK", 0)


def resolve_device(device: str = "auto", local_rank: int = 0):
    """``auto`` -> cuda:<local_rank> when a GPU exists, else cpu; ``cuda`` -> cuda:<local_rank>."""
    import torch

    device = str(device or "auto").strip().lower()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        index = device.partition(":")[2]
        if device != "cuda" and not (device.startswith("cuda:") and index.isdigit()):
            raise UserError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N")
        if not torch.cuda.is_available():
            raise UserError(f"device '{device}' was requested but no CUDA GPU is available; use the cpu device")
        if device == "cuda":
            return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        idx = int(index)
        if idx >= torch.cuda.device_count():
            raise UserError(f"device '{device}' does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
        return torch.device("cuda", idx)
    if device == "cpu":
        return torch.device("cpu")
    if device == "mps":
        return torch.device("mps")
    raise UserError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N")


__all__ = ["env_int", "rank_from_env", "resolve_device"]
