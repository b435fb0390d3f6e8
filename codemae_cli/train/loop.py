"""The one training loop of pretraining and fine-tuning.

    with process_group(recipe.run.device) as dist:
        task = MyTask(recipe, dist)                     # data, model, optimizer, schedule
        loop = TrainLoop(task, settings, dist, run_dir, recipe)
        pos = loop.resume(checkpoint) if resume else Position()
        loop.run(pos)

A task supplies its pieces (:class:`TrainTask`) and ``step(model, batch) -> losses``; the loop
does everything else, the same way for both:

    micro-batch   seed_step -> autocast(task.step) -> scaler.scale(loss / accum).backward()
                  (under no_sync except on the last micro-batch: one all-reduce per step)
    update        schedule -> unscale + clip -> scaler.step -> scaler.update -> task.after_update
    bookkeeping   log means over micro-batches and ranks -> checkpoints every ckpt_every steps,
                  every keep_every steps, at the end (and, for tasks that ask, every epoch end)

A loss that is not finite on any rank sets a flag that is all-reduced on logging steps and
before every checkpoint: every rank raises the same :class:`NonFiniteLossError` at the same
point, so none hangs in a collective and the last good checkpoint is never overwritten.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from codemae_cli.errors import UserError
from codemae_cli.train.engine import NonFiniteLossError


@dataclass
class Position:
    """Where a run stands: optimizer steps done, epoch, micro-batches consumed in that epoch."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass
class StepPlan:
    """How many optimizer steps an epoch and the whole run have."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def left_out_note(sampler) -> str:
    """The start-up line's note on chips a full-batches-only epoch leaves out (empty when none)."""
    n = int(getattr(sampler, "left_out", 0))
    return f"; full batches only: {n} chips per epoch left out, a different random subset each epoch" if n else ""


def plan_steps(batches_per_epoch: int, optim) -> StepPlan:
    """Whole optimizer steps per epoch (leftover micro-batches of an epoch are not used)."""
    steps_per_epoch = batches_per_epoch // optim.accum_steps
    if steps_per_epoch < 1:
        raise UserError(f"an epoch has {batches_per_epoch} batches, fewer than optim.accum_steps "
                        f"({optim.accum_steps}); lower optim.accum_steps or optim.batch_size")
    total = optim.epochs * steps_per_epoch
    if optim.max_steps is not None:
        total = min(total, optim.max_steps)
    warmup = min(int(round(optim.warmup_epochs * steps_per_epoch)), total)
    return StepPlan(steps_per_epoch, total, warmup)


@dataclass
class LoopSettings:
    """What the loop needs from the recipe (built by :meth:`from_recipe`)."""

    total_steps: int
    steps_per_epoch: int
    accum_steps: int = 1
    precision: str = "fp32"  # resolved: bf16 | fp16 | fp32
    clip_grad: Optional[float] = None
    seed: int = 0
    log_every: int = 20
    ckpt_every: int = 1000
    keep_every: Optional[int] = None
    compile: bool = False
    progress: bool = True
    tensorboard: bool = True
    unit: str = "items"  # what a batch row is, for rates: pairs, chips
    batch_size: int = 1  # rows of one micro-batch on one rank
    description: str = "train"
    save_each_epoch: bool = False  # also write checkpoints/last at every epoch end (after end_epoch)

    @classmethod
    def from_recipe(cls, recipe, plan: StepPlan, precision: str, **kw) -> LoopSettings:
        o, r = recipe.optim, recipe.run
        return cls(total_steps=plan.total_steps, steps_per_epoch=plan.steps_per_epoch, accum_steps=o.accum_steps,
                   precision=precision, clip_grad=o.clip_grad or None, seed=r.seed, log_every=r.log_every,
                   ckpt_every=r.ckpt_every, keep_every=r.keep_every, compile=r.compile, progress=r.progress,
                   tensorboard=r.tensorboard, batch_size=o.batch_size, **kw)

    @property
    def batches_per_epoch(self) -> int:
        return self.steps_per_epoch * self.accum_steps


class TrainTask:
    """What a task gives the loop: set ``model`` (unwrapped), ``optimizer``, ``schedule``,
    ``sampler`` and ``loader`` in the task's set-up, and implement :meth:`step` and
    :meth:`checkpoint_meta`. The other hooks are optional."""

    model = None
    optimizer = None
    schedule = None
    sampler = None
    loader = None

    def step(self, model, batch) -> dict:
        """Forward one micro-batch through ``model`` (the wrapped training model); return named
        scalar losses, ``"loss"`` being the one to backpropagate. Runs under autocast."""
        raise NotImplementedError

    def checkpoint_meta(self, name: str, pos: Position) -> dict:
        """meta.json of checkpoint ``name`` ("last", "best", "step_..."); step and epoch are added."""
        raise NotImplementedError

    def after_update(self) -> None:
        """After each optimizer step (an EMA teacher update)."""

    def resume_extra(self) -> dict:
        """Task state for the resume file (tensors allowed)."""
        return {}

    def load_resume_extra(self, extra: dict) -> None:
        """Inverse of :meth:`resume_extra` (extra holds the loop's keys too)."""

    def end_epoch(self, loop: TrainLoop, pos: Position, epoch: int) -> None:
        """After epoch ``epoch`` ends (or the run ends inside it): validation, best checkpoint."""


def wrap_model(model, dist, compile: bool = False):
    """compile, then DDP: the module that trains (checkpoints save ``model`` itself)."""
    import torch

    train_model = torch.compile(model) if compile else model
    if dist.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Every trainable parameter gets a gradient every step (tasks freeze what their inputs
        # never reach), so no find_unused_parameters and its extra pass over the graph.
        train_model = DDP(train_model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                          **_buffer_sync(model))
    return train_model


def trains_buffers(model) -> bool:
    """Whether training changes a buffer of ``model``: the running statistics of a norm layer
    that tracks them (BatchNorm, SyncBatchNorm). Every other buffer of the project's models is a
    fixed table (sin-cos positions, a teacher's input statistics, the source-scale map)."""
    return any(getattr(m, "track_running_stats", False) and getattr(m, "running_mean", None) is not None
               for m in model.modules())


def _buffer_sync(model) -> dict:
    """DDP's buffer options for ``model``: buffers reach every rank from rank 0 at the start, and
    again before every forward only when training changes them. Rebroadcasting fixed buffers
    copies them in place each step: a broadcast per step, and a bumped version counter that
    makes the iTPN rebuild its cached resampled position table every step."""
    import torch.distributed as torch_dist

    if trains_buffers(model):
        return {}
    if _ddp_has_forward_sync_buffers():
        return {"forward_sync_buffers": False}
    for buf in model.buffers():  # older torch: broadcast_buffers=False skips the start's sync too
        torch_dist.broadcast(buf, src=0)
    return {"broadcast_buffers": False}


def _ddp_has_forward_sync_buffers() -> bool:
    """Whether DDP takes ``forward_sync_buffers`` (torch >= 2.13; it replaces broadcast_buffers)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    return "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters


class TrainLoop:
    """One loop for every task; see the module docstring for the stages."""

    def __init__(self, task: TrainTask, settings: LoopSettings, dist, run_dir, recipe=None,
                 say: Optional[Callable[[str], None]] = None):
        import torch

        self.task, self.s, self.dist = task, settings, dist
        self.run_dir = Path(run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.recipe = recipe
        self.say = say if (say is not None and dist.is_main) else (lambda *_: None)
        # fp16 needs loss scaling (small gradients underflow); with bf16/fp32 it is a pass-through.
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=settings.precision == "fp16")
        self._bad = torch.zeros((), device=dist.device)  # non-finite losses seen on this rank
        self.has_checkpoint = False
        self.logger = None
        self.train_model = None
        self._sums: dict = {}
        self._n_sum = 0
        self._grad_norm = None
        self._params = None  # the optimizer's parameters, flat, for clipping (built on first use)
        self._lr = 0.0
        self._t_log, self._step_log = time.perf_counter(), 0

    # -- resume -----------------------------------------------------------------------------------
    def resume(self, ckpt) -> Position:
        """Load weights, optimizer, scaler, RNG and the task's extra state; return the position."""
        from codemae_cli.train.checkpoint import load_resume, load_weights, resolve_checkpoint, restore_rng

        path = resolve_checkpoint(ckpt, prefer=("last", "best"))  # weights and resume state: one directory
        try:
            self.task.model.load_state_dict(load_weights(path), strict=True)
        except RuntimeError:
            raise UserError(f"checkpoint '{ckpt}' does not match the model of this recipe") from None
        res = load_resume(path, optimizer=self.task.optimizer)
        extra = res["extra"]
        # "batch": the name fine-tuning runs of codemae 0.1 used for the position in the epoch.
        pos = Position(int(extra["step"]), int(extra["epoch"]), int(extra.get("batch_in_epoch", extra.get("batch", 0))))
        if extra.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(extra["scaler"])
        self.task.load_resume_extra(extra)
        if self.dist.is_main:
            restore_rng(res.get("rng"))
        self.has_checkpoint = True
        return pos

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, pos: Position) -> Position:
        """Train from ``pos`` to ``total_steps``; returns the final position."""
        from codemae_cli.train.logging import TrainProgress

        s = self.s
        if pos.step >= s.total_steps:
            self.say(f"nothing to do: the run already reached step {pos.step} of {s.total_steps}")
            return pos
        self.train_model = wrap_model(self.task.model, self.dist, s.compile)
        self._open_outputs(pos)
        self._t_log, self._step_log = time.perf_counter(), pos.step
        rows_per_step = s.batch_size * s.accum_steps * self.dist.world_size
        with TrainProgress(s.total_steps, rows_per_step, unit=s.unit, start=pos.step,
                           enabled=self.dist.is_main and s.progress, description=s.description) as bar:
            while pos.step < s.total_steps:
                epoch = pos.epoch
                self.task.sampler.set_epoch(epoch, start_batch=pos.batch)
                self.train_model.train()
                self._epoch(pos, bar)
                self.check_finite(pos)
                self.task.end_epoch(self, pos, epoch)
                if s.save_each_epoch:  # after end_epoch, so these hold the epoch's validation
                    self.save("last", pos)
                    if self._keep_due(pos):
                        self.save(f"step_{pos.step:08d}", pos)
        return pos

    def _epoch(self, pos: Position, bar) -> None:
        """Micro-batches of one epoch until it is used up or the run reaches its last step."""
        s, epoch, micro = self.s, pos.epoch, 0
        for batch in self.task.loader:
            last_micro = micro == s.accum_steps - 1
            self._micro_step(batch, pos.step, micro, sync=last_micro)
            pos.batch += 1
            micro += 1
            if not last_micro:
                continue
            micro = 0
            self._update(pos.step)
            pos.step += 1
            if pos.batch >= s.batches_per_epoch:
                pos.epoch, pos.batch = epoch + 1, 0
            self._bookkeeping(pos, bar, epoch_end=pos.epoch != epoch or pos.step >= s.total_steps)
            if pos.epoch != epoch or pos.step >= s.total_steps:
                return
        # The loader ran dry inside a step (cannot happen with whole steps per epoch): move on.
        pos.epoch, pos.batch = epoch + 1, 0

    def _micro_step(self, batch, step: int, micro: int, sync: bool) -> None:
        from codemae_cli.train.engine import autocast, seed_step

        # Every random draw of a micro-batch (masking, drop-path, modality dropout) comes from
        # (seed, rank, step, micro): a resumed run repeats the uninterrupted one exactly.
        seed_step(self.s.seed, self.dist.rank, step, micro)
        # Gradients are all-reduced only on the last micro-batch of the step.
        no_sync = self.train_model.no_sync() if (self.dist.distributed and not sync) else contextlib.nullcontext()
        with no_sync:
            with autocast(self.dist.device, self.s.precision):
                losses = self.task.step(self.train_model, batch)
            self.scaler.scale(losses["loss"] / self.s.accum_steps).backward()
        self._accumulate(losses)

    def _accumulate(self, losses: dict) -> None:
        import torch

        # Device-side sums only: the host waits for them on logging steps, never every step.
        self._bad = self._bad + (~torch.isfinite(losses["loss"].detach())).float()
        for k, v in losses.items():
            v = v.detach().float()
            self._sums[k] = self._sums[k] + v if k in self._sums else v
        self._n_sum += 1

    def _update(self, step: int) -> None:
        import torch

        opt = self.task.optimizer
        self._lr = self.task.schedule.apply(opt, step)
        if self.s.clip_grad:
            self.scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
            self._grad_norm = torch.nn.utils.clip_grad_norm_(self._clip_params(), self.s.clip_grad)
        self.scaler.step(opt)  # skipped by the scaler when fp16 gradients overflowed
        self.scaler.update()
        opt.zero_grad(set_to_none=True)
        self.task.after_update()

    def _clip_params(self) -> list:
        """The optimizer's parameters as one flat list, built once (the groups never change)."""
        if self._params is None:
            self._params = [p for g in self.task.optimizer.param_groups for p in g["params"]]
        return self._params

    def _bookkeeping(self, pos: Position, bar, epoch_end: bool) -> None:
        s = self.s
        if pos.step % s.log_every == 0 or pos.step == s.total_steps or pos.step == 1:
            self._log(pos, bar)
        else:
            bar.advance(pos.step)
        if epoch_end and s.save_each_epoch:
            return  # the epoch-end saves come after end_epoch
        if pos.step % s.ckpt_every == 0 or pos.step == s.total_steps:
            self.save("last", pos)
        if self._keep_due(pos):
            self.save(f"step_{pos.step:08d}", pos)

    def _keep_due(self, pos: Position) -> bool:
        return bool(self.s.keep_every) and pos.step % self.s.keep_every == 0

    def _log(self, pos: Position, bar) -> None:
        from codemae_cli.train.distributed import all_reduce_mean

        self.check_finite(pos)
        # The only host syncs of the loop: means over the micro-batches since the last log, then
        # over ranks (every rank holds the same keys, reduced in the same order).
        metrics = {k: float(all_reduce_mean(v / self._n_sum).item()) for k, v in sorted(self._sums.items())}
        now = time.perf_counter()
        rows = (pos.step - self._step_log) * self.s.batch_size * self.s.accum_steps * self.dist.world_size
        metrics.update({"lr": self._lr, "epoch": pos.epoch, f"{self.s.unit}_per_s": rows / max(now - self._t_log, 1e-9)})
        if self._grad_norm is not None:
            metrics["grad_norm"] = float(self._grad_norm.item())
        self._t_log, self._step_log = now, pos.step
        self.logger.log(pos.step, metrics)
        self._sums, self._n_sum = {}, 0
        bar.advance(pos.step, f"loss {metrics['loss']:.4f}")

    # -- outputs ----------------------------------------------------------------------------------
    def _open_outputs(self, pos: Position) -> None:
        from codemae_cli.config import save_recipe
        from codemae_cli.train.logging import MetricsLogger

        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.recipe is not None:
                save_recipe(self.recipe, self.run_dir / "recipe.yaml")
        self.logger = MetricsLogger(self.run_dir, self.dist.is_main, tensorboard=self.s.tensorboard)
        if pos.step:
            self.logger.truncate_after(pos.step)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()

    def check_finite(self, pos: Position) -> None:
        """Stop every rank together when any rank's loss was NaN or infinite (a collective)."""
        from codemae_cli.train.distributed import all_reduce_mean

        if float(all_reduce_mean(self._bad.clone()).item()) > 0:
            kept = (f"the last good checkpoint in '{self.ckpt_root}' is untouched" if self.has_checkpoint
                    else "no checkpoint had been written yet")
            raise NonFiniteLossError(f"the loss became NaN or infinite at or before step {pos.step}; training "
                                     f"stopped and {kept} (lower the learning rate or set optim.clip_grad)")

    def save(self, name: str, pos: Position, with_resume: bool = True) -> None:
        """Write checkpoint ``name`` (rank 0), after all ranks agree every loss so far was finite."""
        from codemae_cli.train.checkpoint import save_checkpoint
        from codemae_cli.train.distributed import barrier

        self.check_finite(pos)
        if self.dist.is_main:
            extra = None
            if with_resume:
                extra = {"step": pos.step, "epoch": pos.epoch, "batch_in_epoch": pos.batch,
                         "schedule": self.task.schedule.state_dict(),
                         "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                         **self.task.resume_extra()}
            meta = {**self.task.checkpoint_meta(name, pos), "step": pos.step, "epoch": pos.epoch}
            save_checkpoint(self.ckpt_root / name, self.task.model, meta,
                            optimizer=self.task.optimizer if with_resume else None, resume_extra=extra)
        barrier()
        self.has_checkpoint = True


__all__ = ["LoopSettings", "Position", "StepPlan", "TrainLoop", "TrainTask", "plan_steps", "wrap_model"]
