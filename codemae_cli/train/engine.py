"""Small pieces every training loop needs: precision/autocast, seeding, a NaN/inf guard, and
deterministic per-step seeding that makes resumed runs repeat the uninterrupted ones.
"""

from __future__ import annotations

import contextlib
import random

from codemae_cli.errors import UserError
from codemae_cli.train.checkpoint import unwrap_model  # noqa: F401  (re-exported for loops)


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; training stopped before anything was saved."""


def resolve_precision(device, precision: str = "auto") -> str:
    """``auto`` -> bf16 on CUDA, fp32 elsewhere; fp16 only on CUDA (bf16 autocast also runs on CPU)."""
    dev_type = getattr(device, "type", str(device).split(":")[0])
    if precision == "auto":
        return "bf16" if dev_type == "cuda" else "fp32"
    if precision == "fp16" and dev_type != "cuda":
        raise UserError("run.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
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


def check_finite(loss, step: int, where: str = "") -> None:
    """Stop with a clear message when ``loss`` is NaN/inf (forces a device sync: call on log steps)."""
    import math

    value = float(loss.detach().float().item()) if hasattr(loss, "detach") else float(loss)
    if not math.isfinite(value):
        extra = f" {where}" if where else ""
        raise NonFiniteLossError(
            f"the loss became {value} at step {step}; training stopped and the last good checkpoint"
            f"{extra} is untouched (lower the learning rate or set optim.clip_grad)")


class FiniteGuard:
    """Accumulate a 'some loss was not finite' flag on the device without syncing every step.

    ``update(loss)`` each micro-step; ``check(step)`` on log steps and before every checkpoint.
    """

    def __init__(self):
        self._bad = None
        self._first = None

    def update(self, loss) -> None:
        import torch

        bad = ~torch.isfinite(loss.detach())
        self._bad = bad if self._bad is None else (self._bad | bad)

    def check(self, step: int, where: str = "") -> None:
        if self._bad is not None and bool(self._bad.item()):
            extra = f" {where}" if where else ""
            raise NonFiniteLossError(
                f"the loss became NaN or infinite at or before step {step}; training stopped and the last "
                f"good checkpoint{extra} is untouched (lower the learning rate or set optim.clip_grad)")


def device_sync(device) -> None:
    import torch

    if getattr(device, "type", "") == "cuda":
        torch.cuda.synchronize(device)


__all__ = [
    "FiniteGuard",
    "NonFiniteLossError",
    "autocast",
    "check_finite",
    "device_sync",
    "resolve_precision",
    "seed_step",
    "set_seed",
    "step_seed",
    "unwrap_model",
]
