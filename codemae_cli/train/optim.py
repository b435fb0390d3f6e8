"""AdamW with decay only on weight matrices, the MAE learning-rate scaling rule, and a
per-iteration warmup + cosine schedule.

    groups = param_groups(model, cfg.weight_decay)
    lr = scaled_lr(cfg, world_size, samples_per_item=2)   # pretraining: optical + SAR
    opt = build_optimizer(groups, cfg, lr)
    sched = WarmupCosine(lr, cfg.min_lr, warmup_steps, total_steps)
    sched.apply(opt, step)        # before every optimizer step
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from codemae_cli.errors import UserError

# Parameter names that never get weight decay whatever their shape: positional embeddings,
# learned tokens (cls / mask / register) and normalisation layers.
_NO_DECAY_KEYWORDS = ("pos_embed", "position", "token", "norm", "relative_position", "gamma", "ls1", "ls2")


def _no_decay(name: str, param) -> bool:
    if param.ndim <= 1 or name.endswith(".bias"):
        return True
    lname = name.lower()
    return any(k in lname for k in _NO_DECAY_KEYWORDS)


def param_groups(model, weight_decay: float, lr_scale: dict | None = None) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed group.

    No decay on norms, biases, position embeddings, learned tokens and any 1-D parameter
    (MAE / timm convention). Frozen parameters (e.g. a distillation teacher) are skipped.
    ``lr_scale`` optionally maps a parameter name to a multiplier stored as the group's
    ``lr_scale`` (layer-wise decay in fine-tuning); :class:`WarmupCosine` honours it.
    """
    buckets: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = float(lr_scale.get(name, 1.0)) if lr_scale else 1.0
        buckets.setdefault((_no_decay(name, p), scale), []).append(p)
    groups = []
    for (no_decay, scale), params in sorted(buckets.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        groups.append({"params": params, "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale})
    if not groups:
        raise UserError("the model has no trainable parameters")
    return groups


def effective_batch(cfg, world_size: int, samples_per_item: int = 1) -> int:
    """Images seen per optimizer step over all processes."""
    return int(cfg.batch_size) * int(cfg.accum_steps) * int(world_size) * int(samples_per_item)


def scaled_lr(cfg, world_size: int, samples_per_item: int = 1) -> float:
    """``cfg.lr`` when set, else ``blr * effective_batch / 256`` (MAE linear scaling rule).

    Pretraining passes ``samples_per_item=2`` because an optical-SAR pair is two images for the
    shared trunk.
    """
    if cfg.lr is not None:
        return float(cfg.lr)
    return float(cfg.blr) * effective_batch(cfg, world_size, samples_per_item) / 256.0


def build_optimizer(model_or_groups, cfg, lr: float):
    """AdamW over ``param_groups`` (or the groups given), fused kernels when all params are on CUDA."""
    import torch

    if isinstance(model_or_groups, torch.nn.Module):
        groups = param_groups(model_or_groups, cfg.weight_decay)
    else:
        groups = list(model_or_groups)
    params: Iterable = [p for g in groups for p in g["params"]]
    on_cuda = all(p.is_cuda for p in params)
    kwargs = {"lr": lr, "betas": tuple(cfg.betas), "weight_decay": cfg.weight_decay}
    if on_cuda:
        kwargs["fused"] = True
    for g in groups:
        g.setdefault("lr_scale", 1.0)
    return torch.optim.AdamW(groups, **kwargs)


class WarmupCosine:
    """Linear warmup from 0 to ``base_lr`` over ``warmup_steps``, then cosine to ``min_lr``.

    Stateless in the step (the engine stores the step in the resume state), so resuming only
    needs the step number.
    """

    def __init__(self, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int):
        if total_steps < 1:
            raise UserError("the schedule needs at least one step")
        self.base_lr = float(base_lr)
        self.min_lr = float(min_lr)
        self.warmup_steps = max(0, int(warmup_steps))
        self.total_steps = int(total_steps)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * step / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer, step: int) -> float:
        """Set every group's lr for ``step`` (times its ``lr_scale``) and return the base value."""
        lr = self.lr_at(step)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def state_dict(self) -> dict:
        return {"base_lr": self.base_lr, "min_lr": self.min_lr, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps}


__all__ = ["WarmupCosine", "build_optimizer", "effective_batch", "param_groups", "scaled_lr"]
