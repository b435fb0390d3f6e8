"""CoDe-MAE pretraining: one readable loop for CPU, one GPU and torchrun (many GPUs, many nodes).

    run_dir = run_pretrain(load_pretrain_recipe("recipes/hr.yaml"))

Order of set-up (nanoGPT style): distributed from the environment -> data -> build -> to(device)
-> optimizer -> (resume) -> compile -> DDP. Gradients are accumulated over ``optim.accum_steps``
micro-batches under ``no_sync`` so they are all-reduced once per optimizer step. Every random
draw of a step (masking, drop-path) comes from a seed of (seed, rank, step, micro-batch) and
every augmentation from (seed, epoch, position), so a resumed run repeats the uninterrupted one
exactly.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from codemae_cli.errors import UserError
from codemae_cli.train.recipe import PretrainRecipe

SAMPLES_PER_PAIR = 2  # optical + SAR both pass through the shared trunk


def _checkpoints_in(run_dir: Path) -> list[Path]:
    ck = run_dir / "checkpoints"
    if not ck.is_dir():
        return []
    return sorted(p for p in ck.iterdir() if p.is_dir() and (p / "model.safetensors").is_file())


def _diff_recipes(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        path = f"{prefix}{k}"
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _diff_recipes(va, vb, path + ".")
        elif va != vb:
            keys.append(path)
    return keys


# Recipe keys that may change between a run and its resumption without breaking exactness of
# what was already trained (where outputs go, how often to log, when to stop).
_RESUME_FREE = ("run.output_dir", "run.log_every", "run.ckpt_every", "run.keep_every", "run.tensorboard",
                "run.progress", "data.num_workers", "data.pin_memory", "optim.max_steps", "data.datasets")


def run_pretrain(recipe: PretrainRecipe, resume: bool = False, output_dir: Optional[str | Path] = None,
                 echo: Optional[Callable[[str], None]] = None) -> Path:
    """Pretrain CoDe-MAE as ``recipe`` says; returns the run directory.

    ``resume`` continues from ``<run dir>/checkpoints/last`` (optimizer, schedule, RNG, sampler
    position, EMA teacher). ``output_dir`` overrides ``recipe.run.output_dir``.
    """
    import torch

    from codemae_cli.train.distributed import cleanup_distributed, init_distributed, is_dist

    owns_group = not is_dist()
    dist = init_distributed(recipe.run.device)
    try:
        return _run(recipe, dist, resume, output_dir, echo)
    finally:
        if owns_group:
            cleanup_distributed()
        if dist.device.type == "cuda":
            torch.cuda.empty_cache()


def _run(recipe: PretrainRecipe, dist, resume: bool, output_dir, echo) -> Path:
    import torch

    from codemae_cli.config import save_recipe, to_dict
    from codemae_cli.data.dataset import DeviceAugment, PairedBatchSampler, PairedChips, build_loader
    from codemae_cli.model import build_model
    from codemae_cli.train.checkpoint import (
        load_checkpoint,
        load_resume,
        read_meta,
        resolve_checkpoint,
        save_checkpoint,
    )
    from codemae_cli.train.distributed import all_reduce_mean, barrier
    from codemae_cli.train.engine import NonFiniteLossError, autocast, resolve_precision, seed_step, set_seed
    from codemae_cli.train.logging import MetricsLogger, TrainProgress
    from codemae_cli.train.optim import WarmupCosine, build_optimizer, effective_batch, scaled_lr

    data, optim, run = recipe.data, recipe.optim, recipe.run
    is_main = dist.is_main
    say = (echo or print) if is_main else (lambda *_: None)
    run_dir = Path(output_dir if output_dir is not None else run.output_dir)
    recipe.run.output_dir = str(run_dir)
    ckpt_root = run_dir / "checkpoints"

    # -- refuse bad set-ups before writing anything ----------------------------------------------
    if not data.datasets:
        raise UserError("data.datasets is empty: list one or more directories written by `codemae prepare`")
    existing = _checkpoints_in(run_dir)
    if existing and not resume:
        raise UserError(f"run directory '{run_dir}' already holds checkpoints; pass --resume to continue it "
                        "or choose another --output-dir")
    if resume and not existing:
        raise UserError(f"--resume was given but '{run_dir}' holds no checkpoint to resume from")
    resume_from = None
    if resume:
        # checkpoints/last, or the copy a save killed between its two renames moved aside.
        resume_from = resolve_checkpoint(run_dir, prefer=("last",))
        meta = read_meta(resume_from)
        if meta.get("kind") != "pretrain":
            raise UserError(f"'{run_dir}' is not a pretraining run (its checkpoint kind is {meta.get('kind')!r})")
        changed = [k for k in _diff_recipes(meta.get("recipe", {}), to_dict(recipe))
                   if not any(k == f or k.startswith(f + ".") for f in _RESUME_FREE)]
        if changed:
            raise UserError(f"the recipe differs from the one of the run being resumed in {', '.join(changed)}; "
                            "resume with the same recipe or start a new run")
        if int(meta.get("world_size", dist.world_size)) != dist.world_size:
            raise UserError(f"the run was trained with {meta['world_size']} processes and cannot resume exactly "
                            f"with {dist.world_size}; use the same number of processes")

    precision = resolve_precision(dist.device, run.precision)
    set_seed(run.seed, dist.rank)
    if dist.device.type == "cuda":
        # TF32 matmuls for the fp32 parts (losses, optimizer); bf16 autocast covers the rest.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # -- data -------------------------------------------------------------------------------------
    chips = PairedChips(data.datasets, data.split, data.img_size, crop_scale=data.crop_scale, hflip=data.hflip,
                        train=True, seed=run.seed, augment_on=data.augment_on)
    device_augment = DeviceAugment(chips, dist.device) if data.augment_on == "device" else None
    if data.paired is not None:
        for src in chips.sources:
            src.paired = bool(data.paired)
    sampler = PairedBatchSampler(chips, optim.batch_size, weights=data.weights, shuffle=True, seed=run.seed,
                                 rank=dist.rank, world_size=dist.world_size, drop_last=True)
    loader = build_loader(chips, sampler, num_workers=data.num_workers,
                          pin_memory=data.pin_memory and dist.device.type == "cuda")
    steps_per_epoch = sampler.batches_per_epoch // optim.accum_steps
    if steps_per_epoch < 1:
        raise UserError(f"an epoch has {sampler.batches_per_epoch} batches, fewer than optim.accum_steps "
                        f"({optim.accum_steps}); lower optim.accum_steps or optim.batch_size")
    total_steps = optim.epochs * steps_per_epoch
    if optim.max_steps is not None:
        total_steps = min(total_steps, optim.max_steps)
    warmup_steps = min(int(round(optim.warmup_epochs * steps_per_epoch)), total_steps)

    # -- model, optimizer, schedule ---------------------------------------------------------------
    model = build_model(recipe.model, chips.optical_bands, chips.sar_bands).to(dist.device)
    lr = scaled_lr(optim, dist.world_size, SAMPLES_PER_PAIR)
    eff = effective_batch(optim, dist.world_size, SAMPLES_PER_PAIR)
    optimizer = build_optimizer(model, optim, lr)
    schedule = WarmupCosine(lr, optim.min_lr, warmup_steps, total_steps)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"pretraining CoDe-MAE '{recipe.model.preset}' ({n_params / 1e6:.1f} M trainable parameters) on "
        f"{len(chips)} {data.split} pairs from {len(chips.sources)} dataset(s); {dist.world_size} process(es) on "
        f"{dist.device.type}, {precision}")
    if optim.lr is None:
        say(f"lr = blr {optim.blr:g} x effective batch {eff} ({optim.batch_size} pairs x {SAMPLES_PER_PAIR} "
            f"modalities x {optim.accum_steps} accum x {dist.world_size} processes) / 256 = {lr:.4g}")
    else:
        say(f"lr = {lr:.4g} (optim.lr; effective batch {eff})")
    say(f"{steps_per_epoch} steps per epoch, {total_steps} steps in all, {warmup_steps} warmup steps")

    # fp16 needs loss scaling; with bf16/fp32 the scaler is a pass-through.
    scaler = torch.amp.GradScaler(dist.device.type, enabled=precision == "fp16")
    step, epoch, batch_in_epoch = 0, 0, 0
    if resume:
        state, _ = load_checkpoint(resume_from)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError:
            raise UserError(f"checkpoint '{resume_from}' does not match the model of this recipe") from None
        res = load_resume(resume_from, optimizer=optimizer)
        extra = res["extra"]
        step, epoch, batch_in_epoch = int(extra["step"]), int(extra["epoch"]), int(extra["batch_in_epoch"])
        if extra.get("scaler"):
            scaler.load_state_dict(extra["scaler"])
        if extra.get("teacher"):
            model.load_teacher_state_dict({k: v.to(dist.device) for k, v in extra["teacher"].items()})
        from codemae_cli.train.checkpoint import restore_rng

        if is_main:
            restore_rng(res.get("rng"))
        say(f"resumed from '{resume_from}' at step {step} (epoch {epoch}, batch {batch_in_epoch})")
    if step >= total_steps:
        say(f"nothing to do: the run already reached step {step} of {total_steps}")
        return run_dir

    train_model = model
    if run.compile:
        train_model = torch.compile(model)
    if dist.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Every parameter gets a gradient every step (unpaired batches weight their losses by
        # zero rather than skipping them), so no find_unused_parameters and its extra pass.
        train_model = DDP(train_model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)

    # -- outputs ----------------------------------------------------------------------------------
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")
    logger = MetricsLogger(run_dir, is_main, tensorboard=run.tensorboard)
    if resume:
        logger.truncate_after(step)
    summary = chips.meta_summary()
    base_meta = {
        "kind": "pretrain",
        "recipe": to_dict(recipe),
        "bands": summary["bands"],
        "stats": summary["stats"],
        "datasets": summary["datasets"],
        "dataset_stats": [s.meta.get("stats") for s in chips.sources],
        "world_size": dist.world_size,
        "effective_batch": eff,
        "lr": lr,
        "total_steps": total_steps,
    }

    def save(name: str) -> None:
        # All ranks agree that no loss went non-finite before anything is written.
        check_finite_all()
        if is_main:
            save_checkpoint(ckpt_root / name, model, {**base_meta, "step": step, "epoch": epoch}, optimizer=optimizer,
                            resume_extra={"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                                          "teacher": model.teacher_state_dict(), "schedule": schedule.state_dict(),
                                          "scaler": scaler.state_dict() if scaler.is_enabled() else {}})
        barrier()

    bad = torch.zeros((), device=dist.device)

    def check_finite_all() -> None:
        flag = all_reduce_mean(bad.clone())
        if float(flag.item()) > 0:
            raise NonFiniteLossError(
                f"the loss became NaN or infinite at or before step {step}; training stopped and the last good "
                f"checkpoint in '{ckpt_root}' is untouched (lower the learning rate or set optim.clip_grad)")

    # -- loop -------------------------------------------------------------------------------------
    accum = optim.accum_steps
    pairs_per_step = optim.batch_size * accum * dist.world_size
    device, non_blocking = dist.device, dist.device.type == "cuda"
    sums: dict = {}
    n_sum = 0
    grad_norm = None
    t_log, step_log = time.perf_counter(), step
    train_model.train()
    with TrainProgress(total_steps, pairs_per_step, unit="pairs", start=step,
                       enabled=is_main and run.progress, description="pretrain") as bar:
        while step < total_steps:
            sampler.set_epoch(epoch, start_batch=batch_in_epoch)
            micro = 0
            for batch in loader:
                batch = {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}
                if device_augment is not None:
                    batch = device_augment(batch)
                optical, sar, paired = batch["optical"], batch["sar"], batch["paired"]
                seed_step(run.seed, dist.rank, step, micro)
                last_micro = micro == accum - 1
                # Gradients are all-reduced only on the last micro-batch of the step.
                sync = contextlib.nullcontext() if (last_micro or not dist.distributed) else train_model.no_sync()
                with sync:
                    with autocast(device, precision):
                        out = train_model(optical, sar, paired=paired)
                    scaler.scale(out["loss"] / accum).backward()
                loss = out["loss"].detach()
                bad = bad + (~torch.isfinite(loss)).float()
                for k, v in (("loss", loss), *((f"loss_{n}", t.detach()) for n, t in out["losses"].items())):
                    sums[k] = sums[k] + v.float() if k in sums else v.float()
                n_sum += 1
                batch_in_epoch += 1
                micro += 1
                if not last_micro:
                    continue
                micro = 0
                lr_now = schedule.apply(optimizer, step)
                if optim.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                model.update_teacher()
                step += 1
                epoch_done = batch_in_epoch >= steps_per_epoch * accum
                if epoch_done:
                    epoch, batch_in_epoch = epoch + 1, 0

                if step % run.log_every == 0 or step == total_steps or step == 1:
                    check_finite_all()
                    # The only host syncs of the loop: averaged over micro-batches and ranks.
                    metrics = {k: float(all_reduce_mean(v / n_sum).item()) for k, v in sorted(sums.items())}
                    now = time.perf_counter()
                    rate = (step - step_log) * pairs_per_step / max(now - t_log, 1e-9)
                    t_log, step_log = now, step
                    metrics.update(lr=lr_now, epoch=epoch, pairs_per_s=rate)
                    if grad_norm is not None:
                        metrics["grad_norm"] = float(grad_norm.item())
                    logger.log(step, metrics)
                    sums, n_sum = {}, 0
                    bar.advance(step, f"loss {metrics['loss']:.4f}")
                else:
                    bar.advance(step)
                if step % run.ckpt_every == 0 or step == total_steps:
                    save("last")
                if run.keep_every and step % run.keep_every == 0:
                    save(f"step_{step:08d}")
                if step >= total_steps or epoch_done:
                    break
            else:
                # The loader ran dry mid-step (cannot happen with whole steps per epoch); move on.
                epoch, batch_in_epoch = epoch + 1, 0
    if is_main:
        logger.plot(run_dir / "loss_curve.png")
        say(f"done: {step} steps; checkpoints in {ckpt_root}, metrics in {logger.path}, "
            f"loss curve {run_dir / 'loss_curve.png'}")
    logger.close()
    return run_dir


__all__ = ["run_pretrain"]
