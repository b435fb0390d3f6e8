"""Fine-tuning and linear probing: one readable training loop on the shared engine pieces.

    result = run_finetune(load_recipe("recipes/seg.yaml", FinetuneRecipe))
    result["best_metrics"]["miou"]

The same code runs on a CPU, one GPU, or under ``torchrun`` (DDP, gradients synced once per
optimizer step, bf16 autocast on GPU). Every epoch ends with a validation pass (per-class IoU,
mIoU, F1, OA; or mAP for multi-label classification), ``checkpoints/last`` (with resume state)
and, when the chosen metric improved, ``checkpoints/best``.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

from codemae_cli.errors import UserError

_SCALAR_KEYS = ("loss", "miou", "mf1", "oa", "macc", "kappa", "top1", "micro_map", "macro_map", "micro_f1",
                "macro_f1")


def _scalars(metrics: dict, names: list[str]) -> dict:
    """Flat scalars for logs: summary numbers plus per-class IoU/F1 (or AP) by class name."""
    out = {k: metrics[k] for k in _SCALAR_KEYS if k in metrics}
    for key in ("iou", "ap"):
        for name, v in zip(names, metrics.get(key, []), strict=False):
            out[f"{key}/{name}"] = v
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def _band_names(ds_meta: dict, modality: str) -> list[str]:
    m = ds_meta[modality]
    names = list(m.get("bands") or [])
    return names if len(names) == int(m["count"]) else [f"{modality}_{i + 1}" for i in range(int(m["count"]))]


def _load_pretrained(recipe):
    """``(state, meta)`` of the pretrained checkpoint, or ``(None, None)`` from scratch."""
    from codemae_cli.train.checkpoint import load_checkpoint

    t = recipe.task
    if t.from_scratch:
        return None, None
    if not t.pretrained:
        raise UserError("task.pretrained is not set; give a pretrain checkpoint or set task.from_scratch=true")
    state, meta = load_checkpoint(t.pretrained)
    if meta.get("kind") not in ("pretrain", "finetune"):
        raise UserError(f"'{t.pretrained}' is not a CoDe-MAE pretrain checkpoint (kind: {meta.get('kind')!r})")
    return state, meta


def _check_bands(pre_meta: dict, bands: dict, inputs: str) -> None:
    """Refuse a checkpoint whose band counts differ from the data for a modality the task uses."""
    pre_bands = pre_meta.get("bands") or {}
    for mod in ("optical", "sar"):
        if inputs not in (mod, "both") or mod not in pre_bands:
            continue
        want, have = len(pre_bands[mod]), len(bands[mod])
        if want != have:
            raise UserError(f"the checkpoint was pretrained on {want} {mod} band(s) but the data has {have}")


def run_finetune(recipe, resume: bool = False, console=None) -> dict:
    """Train a task model as the recipe says; returns ``dict(run_dir, best_metrics, best_epoch, ...)``."""
    import torch

    from codemae_cli.config import save_recipe, to_dict
    from codemae_cli.tasks.data import open_datasets, resolve_classes, task_loader, train_loader
    from codemae_cli.tasks.evaluate import evaluate_model, task_loss
    from codemae_cli.tasks.metrics import is_better
    from codemae_cli.tasks.model import find_unused_parameters
    from codemae_cli.tasks.model_io import (
        build_task_model,
        encoder_state_from_checkpoint,
        load_encoder_weights,
    )
    from codemae_cli.train.checkpoint import (
        has_resume,
        load_checkpoint,
        load_resume,
        read_meta,
        save_checkpoint,
        unwrap_model,
    )
    from codemae_cli.train.distributed import barrier, cleanup_distributed, init_distributed
    from codemae_cli.train.engine import FiniteGuard, autocast, resolve_precision, seed_step, set_seed
    from codemae_cli.train.logging import MetricsLogger, TrainProgress
    from codemae_cli.train.optim import WarmupCosine, build_optimizer, param_groups, scaled_lr

    t, o, r = recipe.task, recipe.optim, recipe.run
    dist = init_distributed(r.device)
    try:
        device = dist.device
        precision = resolve_precision(device, r.precision)

        def say(msg: str) -> None:
            if dist.is_main:
                (console.print if console is not None else print)(msg)

        run_dir = Path(r.output_dir)
        ckpt_dir = run_dir / "checkpoints"
        if resume:
            if not has_resume(ckpt_dir / "last"):
                raise UserError(f"nothing to resume in '{run_dir}' (no checkpoints/last with resume state)")
        elif (ckpt_dir / "last").exists() or (ckpt_dir / "best").exists():
            raise UserError(f"'{run_dir}' already holds a fine-tuning run; pass --resume to continue it or set "
                            "run.output_dir to a new directory")
        set_seed(r.seed, dist.rank)

        # ---- data ------------------------------------------------------------------------
        dsets = open_datasets(recipe.data.datasets)
        classes = resolve_classes(dsets, t)
        names = [c["name"] for c in classes]
        num_classes = len(classes)
        train_dl, sampler, chips = train_loader(dsets, recipe, dist.rank, dist.world_size)
        val_dl = task_loader(dsets, recipe.data.val_split, recipe, rank=dist.rank, world_size=dist.world_size)
        ds_meta = dsets[0].meta
        bands = {"optical": _band_names(ds_meta, "optical"), "sar": _band_names(ds_meta, "sar")}

        # ---- model -----------------------------------------------------------------------
        if resume:
            # The encoder is rebuilt as it was trained; its weights come from checkpoints/last.
            last_meta = read_meta(ckpt_dir / "last")
            pre_state, pre_meta = None, {"encoder_config": last_meta["encoder_config"]}
        else:
            pre_state, pre_meta = _load_pretrained(recipe)
            if pre_meta is not None:
                _check_bands(pre_meta, bands, t.inputs)
        model, enc_cfg = build_task_model(recipe, chips.optical_bands, chips.sar_bands, num_classes, pre_meta)
        # What the chosen inputs never touch is frozen: DDP runs without find_unused_parameters.
        unused = find_unused_parameters(model, chips.optical_bands, chips.sar_bands, 2 * enc_cfg.patch_size)
        for name, p in model.named_parameters():
            if name in unused:
                p.requires_grad_(False)
        report = None
        if pre_state is not None:
            used = {n[len("encoder."):] for n, p in model.named_parameters()
                    if n.startswith("encoder.") and n not in unused}
            if t.linear_probe:  # a frozen encoder has no gradients to tell: go by the input modality
                other = {"optical": "patch_embed.sar.", "sar": "patch_embed.optical.", "both": None}[t.inputs]
                used = {k for k in model.encoder.state_dict() if other is None or not k.startswith(other)}
            report = load_encoder_weights(model.encoder, encoder_state_from_checkpoint(pre_state), used=used,
                                          source=str(t.pretrained))
            say(f"pretrained encoder: {report.loaded} tensors loaded from {t.pretrained}; "
                f"{len(report.missing)} missing, {len(report.unexpected)} unexpected, {len(report.skipped)} skipped"
                + (f" (missing: {', '.join(report.missing[:6])}{' ...' if len(report.missing) > 6 else ''})"
                   if report.missing else ""))
        elif resume:
            report = _LoadedReport(last_meta.get("load_report"))
        else:
            say(f"encoder: preset '{enc_cfg.preset}' from scratch (random initialisation)")
        model.to(device)
        if dist.distributed and device.type == "cuda" and t.linear_probe:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics over all GPUs
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_total = sum(p.numel() for p in model.parameters())
        say(f"task model: {t.kind} ({'linear probe' if t.linear_probe else t.head}), inputs {t.inputs}, "
            f"{num_classes} classes, {n_train / 1e6:.2f} M trainable / {n_total / 1e6:.2f} M parameters")

        # ---- optimisation ----------------------------------------------------------------
        lr = scaled_lr(o, dist.world_size)
        groups = param_groups(model, o.weight_decay)
        if o.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=lr, momentum=o.momentum)
        else:
            optimizer = build_optimizer(groups, o, lr)
        steps_per_epoch = max(1, sampler.batches_per_epoch // o.accum_steps)
        total_steps = o.epochs * steps_per_epoch
        if o.max_steps is not None:
            total_steps = min(total_steps, o.max_steps)
        sched = WarmupCosine(lr, o.min_lr, round(o.warmup_epochs * steps_per_epoch), total_steps)
        class_weights = (torch.tensor(t.class_weights, dtype=torch.float32, device=device)
                         if t.class_weights is not None else None)

        start_epoch, start_batch, step = 0, 0, 0
        best_value, best_epoch, best_metrics = None, None, None
        if resume:
            state, meta = load_checkpoint(ckpt_dir / "last")
            unwrap_model(model).load_state_dict(state)
            res = load_resume(ckpt_dir / "last", optimizer=optimizer, restore_rng_state=True)
            extra = res["extra"]
            start_epoch, start_batch, step = int(extra["epoch"]), int(extra["batch"]), int(extra["step"])
            best_value = extra.get("best_value")
            best_epoch = extra.get("best_epoch")
            best_metrics = (meta.get("best") or {}).get("metrics")
            say(f"resuming at epoch {start_epoch + 1}, step {step}")

        train_model = model
        if r.compile:
            train_model = torch.compile(train_model)
        if dist.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)

        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_recipe(recipe, run_dir / "recipe.yaml")
        logger = MetricsLogger(run_dir, is_main=dist.is_main, tensorboard=r.tensorboard)
        if resume:
            logger.truncate_after(step)

        def meta_for(epoch: int, batch: int, metrics: dict | None) -> dict:
            return {
                "kind": "finetune", "task": t.kind, "multilabel": t.multilabel, "inputs": t.inputs,
                "classes": classes, "ignore_index": t.ignore_index, "bands": bands,
                "stats": ds_meta.get("stats"), "img_size": recipe.model.img_size,
                "patch_size": enc_cfg.patch_size, "preset": enc_cfg.preset, "encoder_config": to_dict(enc_cfg),
                "modality_dropout": t.modality_dropout, "linear_probe": t.linear_probe,
                "pretrained": t.pretrained, "load_report": report.as_dict() if report else None,
                "datasets": [str(d.root) for d in dsets], "recipe": to_dict(recipe),
                "step": step, "epoch": epoch, "batch": batch, "metrics": metrics or {},
                "best": {"metric": t.best_metric, "value": best_value, "epoch": best_epoch, "metrics": best_metrics},
            }

        def save(name: str, epoch: int, batch: int, metrics: dict | None, with_resume: bool) -> None:
            if dist.is_main:
                extra = {"epoch": epoch, "batch": batch, "step": step, "best_value": best_value,
                         "best_epoch": best_epoch} if with_resume else None
                save_checkpoint(ckpt_dir / name, model, meta_for(epoch, batch, metrics),
                                optimizer=optimizer if with_resume else None, resume_extra=extra)
            barrier()

        # ---- loop ------------------------------------------------------------------------
        guard = FiniteGuard()
        last_metrics = None
        done = step >= total_steps
        micro = 0
        t0 = time.perf_counter()
        items = o.batch_size * o.accum_steps * dist.world_size
        with TrainProgress(total_steps, items, unit="chips", start=step, enabled=dist.is_main and r.progress,
                           description="finetune") as bar:
            for epoch in range(start_epoch, o.epochs):
                if done:
                    break
                sampler.set_epoch(epoch, start_batch=start_batch if epoch == start_epoch else 0)
                train_model.train()
                batch_idx = sampler.start_batch
                for batch in train_dl:
                    optical, sar, label = _inputs(batch, device, t.ignore_index)
                    sync = (micro + 1) % o.accum_steps == 0
                    ctx = train_model.no_sync() if dist.distributed and not sync else contextlib.nullcontext()
                    seed_step(r.seed, dist.rank, step, micro)  # dropout / modality dropout repeat on resume
                    with ctx:
                        with autocast(device, precision):
                            logits = train_model(optical=optical, sar=sar)
                        loss = task_loss(logits, label, t, num_classes, class_weights)
                        guard.update(loss)
                        (loss / o.accum_steps).backward()
                    micro += 1
                    batch_idx += 1
                    if not sync:
                        continue
                    micro = 0
                    if o.clip_grad:
                        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], o.clip_grad)
                    cur_lr = sched.apply(optimizer, step)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    if step % r.log_every == 0 or step == total_steps:
                        guard.check(step)
                        logger.log(step, {"loss": float(loss.detach()), "lr": cur_lr, "epoch": epoch})
                    bar.advance(step, f"loss {float(loss.detach()):.4f}" if step % r.log_every == 0 else "")
                    if step % r.ckpt_every == 0 and batch_idx < sampler.batches_per_epoch:
                        guard.check(step)
                        save("last", epoch, batch_idx, last_metrics, with_resume=True)
                    if r.keep_every and step % r.keep_every == 0:
                        save(f"step_{step:08d}", epoch, batch_idx, last_metrics, with_resume=True)
                    if step >= total_steps:
                        done = True
                        break
                guard.check(step)
                # ---- validation at the end of every epoch (and of a max_steps run) ------------
                metrics = evaluate_model(model, val_dl, t, num_classes, device, precision, class_names=names,
                                         class_weights=class_weights)
                last_metrics = _summary(metrics)
                logger.log(step, _scalars(metrics, names) | {"epoch": epoch + 1}, split="val")
                value = metrics.get(t.best_metric)
                improved = is_better(t.best_metric, value, best_value)
                if improved:
                    best_value, best_epoch, best_metrics = value, epoch + 1, _summary(metrics)
                say(f"epoch {epoch + 1}/{o.epochs}  step {step}  val loss {metrics['loss']:.4f}  "
                    f"{t.best_metric} {100 * value:.2f}" + ("  (best)" if improved else ""))
                finished_epoch = not done or batch_idx >= sampler.batches_per_epoch
                save("last", epoch + 1 if finished_epoch else epoch, 0 if finished_epoch else batch_idx,
                     last_metrics, with_resume=True)
                if improved:
                    save("best", epoch + 1, 0, best_metrics, with_resume=False)
                if dist.is_main:
                    logger.plot()
                    _plot_val(logger, run_dir / "val_curve.png", t.best_metric)
        logger.close()
        elapsed = time.perf_counter() - t0
        if best_metrics is None and last_metrics is not None:
            best_metrics = last_metrics
        say(f"done: {step} steps in {elapsed:.1f} s; best {t.best_metric} "
            f"{100 * (best_value or float('nan')):.2f} at epoch {best_epoch}; run in {run_dir}")
        return {"run_dir": str(run_dir), "best_metrics": best_metrics, "best_epoch": best_epoch,
                "last_metrics": last_metrics, "steps": step, "seconds": elapsed,
                "load_report": report.as_dict() if report else None}
    finally:
        cleanup_distributed()


class _LoadedReport:
    """The load report of the original run, carried into the checkpoints of a resumed run."""

    def __init__(self, data):
        self.data = data

    def as_dict(self):
        return self.data

    def __bool__(self):
        return self.data is not None


def _inputs(batch, device, ignore_index):
    from codemae_cli.tasks.data import batch_inputs

    return batch_inputs(batch, device, ignore_index)


def _summary(metrics: dict) -> dict:
    """Metrics without the bulky confusion matrix (kept in evaluate's JSON instead)."""
    return {k: v for k, v in metrics.items() if k != "confusion"}


def _plot_val(logger, path: Path, metric: str) -> None:
    """Validation curve of the chosen metric (and loss) per epoch, beside the loss curves."""
    recs = [rec for rec in logger.read() if rec.get("split") == "val" and rec.get(metric) is not None]
    if not recs:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [rec["epoch"] for rec in recs]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(epochs, [100 * rec[metric] for rec in recs], "o-", label=f"val {metric} (%)")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} (%)")
    ax2 = ax.twinx()
    ax2.plot(epochs, [rec["loss"] for rec in recs], "s--", color="tab:red", label="val loss")
    ax2.set_ylabel("val loss")
    ax.grid(True, alpha=0.3)
    fig.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


__all__ = ["run_finetune"]
