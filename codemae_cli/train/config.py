"""Recipe sections shared by pretraining and fine-tuning (data, optimisation, run)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from codemae_cli.errors import UserError


@dataclass
class DataConfig:
    """Where the prepared chips come from and how they are augmented."""

    datasets: list[str] = field(default_factory=list)  # prepared dataset directories
    weights: Optional[list[float]] = None  # sampling weights of the datasets (default: by size)
    split: str = "train"
    val_split: str = "val"
    img_size: int = 224
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop scale, identical for a pair
    hflip: bool = True
    paired: Optional[bool] = None  # None: from the dataset metadata
    num_workers: int = 4
    pin_memory: bool = True
    # Where crop/resize/flip/normalisation run: "loader" (CPU workers) or "device" (batched on the
    # training device; the workers only copy tiles out of the shards, for fast GPUs).
    augment_on: Literal["loader", "device"] = "loader"

    def validate(self) -> None:
        if self.img_size < 1:
            raise UserError("data.img_size must be at least 1 pixel")
        if self.num_workers < 0:
            raise UserError("data.num_workers must be 0 (load in the main process) or more")
        if self.weights is not None and any(w < 0 for w in self.weights):
            raise UserError("data.weights must not be negative")
        if self.weights is not None and len(self.weights) != len(self.datasets):
            raise UserError("data.weights must have one weight per entry of data.datasets")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise UserError("data.crop_scale must satisfy 0 < min <= max <= 1")


@dataclass
class OptimConfig:
    """AdamW with per-iteration warmup then cosine decay."""

    blr: float = 1.5e-4  # base lr; lr = blr * effective_batch / 256 unless `lr` is set
    lr: Optional[float] = None
    min_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    batch_size: int = 128  # per process
    accum_steps: int = 1
    epochs: int = 800
    warmup_epochs: float = 15
    max_steps: Optional[int] = None  # stop early (smoke runs, benchmarks)
    clip_grad: Optional[float] = None

    def validate(self) -> None:
        # Checked when the recipe is read, so a typo costs no data loading or model building.
        if self.batch_size < 1 or self.accum_steps < 1 or self.epochs < 1:
            raise UserError("optim.batch_size, optim.accum_steps and optim.epochs must be at least 1")
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"optim.lr must be positive, not {self.lr:g}")
        if not self.blr > 0:
            raise UserError(f"optim.blr must be positive, not {self.blr:g}")
        if self.min_lr < 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise UserError("optim.min_lr, optim.weight_decay and optim.warmup_epochs must not be negative")
        if not all(0 <= b < 1 for b in self.betas):
            raise UserError("optim.betas must both lie in [0, 1)")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError("optim.max_steps must be at least 1 (or null)")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise UserError("optim.clip_grad must be positive (or null for no clipping)")


@dataclass
class RunConfig:
    """Where outputs go and how the engine runs."""

    output_dir: str = "runs/pretrain"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    compile: bool = False
    ckpt_every: int = 1000  # steps; checkpoints/last is rewritten (atomically) this often and at the end
    keep_every: Optional[int] = None  # also keep checkpoints/step_XXXXXXXX this often (steps)
    log_every: int = 20  # steps
    tensorboard: bool = True
    progress: bool = True  # rich progress bar (pairs/s, ETA) on the main process

    def validate(self) -> None:
        if self.ckpt_every < 1 or self.log_every < 1:
            raise UserError("run.ckpt_every and run.log_every must be at least 1 step")
        if self.keep_every is not None and self.keep_every < 1:
            raise UserError("run.keep_every must be at least 1 step (or null)")
