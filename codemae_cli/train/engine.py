"""Small pieces the training loop (:mod:`codemae_cli.train.loop`) needs: precision/autocast,
seeding, the NaN/inf error, and deterministic per-step seeding that makes resumed runs repeat
the uninterrupted ones.
"""

from __future__ import annotations

import contextlib
import random

from codemae_cli.errors import UserError
from codemae_cli.train.checkpoint import unwrap_model  # noqa: F401  (re-exported for loops)


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; training stopped before anything was saved.

    The training loop all-reduces the condition, so every rank raises it at the same point:
    the command line prints it once (rank 0).
    """

    all_ranks = True


def resolve_precision(device, precision: str = "auto") -> str:
    """``auto`` -> bf16 on CUDA, fp32 elsewhere. bf16 and fp16 autocast also run on CPU (slowly;
    fp16 trains with a GradScaler wherever it runs, so a CPU run exercises the GPU's fp16 path)."""
    dev_type = getattr(device, "type", str(device).split(":")[0])
    if precision == "auto":
        return "bf16" if dev_type == "cuda" else "fp32"
    if precision not in ("bf16", "fp16", "fp32"):
        raise UserError(f"run.precision must be auto, bf16, fp16 or fp32, not {precision!r}")
    return precision


def autocast(device, precision: str = "auto"):
    """Autocast context for ``device`` (bf16 on GPU by default, plain fp32 on CPU)."""
    import torch

    prec = resolve_precision(device, precision)
    if prec == "fp32":
        return contextlib.nullcontext()
    dev_type = getattr(device, "type", str(device).split(":")[0])
    dtype = torch.bfloat16 if prec == "bf16" else torch.float16
    return torch.autocast(device_type=dev_type, dtype=dtype)


def set_seed(seed: int, rank: int = 0) -> int:
    """Seed Python, numpy and torch (all devices) with ``seed + rank``; returns the seed used."""
    import numpy as np
    import torch

    s = int(seed) + int(rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    return s


def step_seed(seed: int, rank: int, step: int, micro: int = 0) -> int:
    """A seed that depends only on (seed, rank, step, micro-batch): 63-bit, well mixed.

    Reseeding torch with it before each forward makes the random masking of a step independent
    of what ran before, so a run resumed at step k draws exactly what the uninterrupted run drew.
    """
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(rank) * 0xBF58476D1CE4E5B9
         + int(step) * 0x94D049BB133111EB + int(micro) * 0x2545F4914F6CDD1D) & (2**64 - 1)
    # splitmix64 finaliser
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x & (2**63 - 1)


def seed_step(seed: int, rank: int, step: int, micro: int = 0) -> None:
    import torch

    torch.manual_seed(step_seed(seed, rank, step, micro))


def device_sync(device) -> None:
    import torch

    if getattr(device, "type", "") == "cuda":
        torch.cuda.synchronize(device)


__all__ = [
    "NonFiniteLossError",
    "autocast",
    "device_sync",
    "resolve_precision",
    "seed_step",
    "set_seed",
    "step_seed",
    "unwrap_model",
]
