"""Fine-tuning and linear probing: the fine-tuning task on the shared loop (:mod:`codemae_cli.train.loop`).

    result = run_finetune(load_recipe("recipes/seg.yaml", FinetuneRecipe))
    result["best_metrics"]["miou"]

The same code runs on a CPU, one GPU, or under ``torchrun`` (DDP, gradients synced once per
optimizer step, bf16 autocast on GPU, fp16 with a GradScaler). Every epoch ends with a validation
pass (per-class IoU, mIoU, F1, OA; or mAP for multi-label classification), ``checkpoints/last``
(with resume state) and, when the chosen metric improved, ``checkpoints/best``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from codemae_cli.errors import UserError
from codemae_cli.train.loop import LoopSettings, Position, TrainLoop, TrainTask, left_out_note, plan_steps

if TYPE_CHECKING:
    from codemae_cli.train.checkpoint import CheckpointMeta

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
    """``(state, record)`` of the pretrained checkpoint (its weights and its
    :class:`~codemae_cli.train.checkpoint.CheckpointMeta`), or ``(None, None)`` from scratch."""
    from codemae_cli.train.checkpoint import load_weights, read_checkpoint_meta

    t = recipe.task
    if t.from_scratch:
        return None, None
    if not t.pretrained:
        raise UserError("task.pretrained is not set; give a pretrain checkpoint or set task.from_scratch=true")
    meta = read_checkpoint_meta(t.pretrained)
    if meta.kind not in ("pretrain", "finetune"):
        raise UserError(f"'{t.pretrained}' is not a CoDe-MAE pretrain checkpoint (kind: {meta.kind!r})")
    return load_weights(meta.path), meta


def _check_bands(pre: CheckpointMeta, bands: dict, inputs: str) -> None:
    """Refuse a checkpoint whose band counts differ from the data for a modality the task uses."""
    pre_bands = pre.bands
    for mod in ("optical", "sar"):
        if inputs not in (mod, "both") or mod not in pre_bands:
            continue
        want, have = len(pre_bands[mod]), len(bands[mod])
        if want != have:
            raise UserError(f"the checkpoint was pretrained on {want} {mod} band(s) but the data has {have}")


def run_finetune(recipe, resume: bool = False, console=None) -> dict:
    """Train a task model as the recipe says; returns ``dict(run_dir, best_metrics, best_epoch, ...)``."""
    from codemae_cli.train.distributed import process_group

    with process_group(recipe.run.device) as dist:
        return _run(recipe, dist, resume, console)


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    from codemae_cli.train.checkpoint import has_resume

    ckpt_dir = run_dir / "checkpoints"
    kind = _run_kind(ckpt_dir)
    if kind == "pretrain":
        raise UserError(f"'{run_dir}' holds a pretraining run; set run.output_dir to a new directory for the "
                        "fine-tuning run (and task.pretrained to this one to start from it)")
    if resume:
        if not has_resume(ckpt_dir / "last"):
            raise UserError(f"nothing to resume in '{run_dir}' (no checkpoints/last with resume state)")
    elif (ckpt_dir / "last").exists() or (ckpt_dir / "best").exists():
        raise UserError(f"'{run_dir}' already holds a fine-tuning run; pass --resume to continue it or set "
                        "run.output_dir to a new directory")


def _run_kind(ckpt_dir: Path) -> str | None:
    """The kind ("pretrain" / "finetune") recorded by the run's checkpoints, if any."""
    from codemae_cli.train.checkpoint import is_checkpoint_dir, read_checkpoint_meta

    for name in ("last", "best"):
        ckpt = ckpt_dir / name
        if is_checkpoint_dir(ckpt):
            return read_checkpoint_meta(ckpt).kind
    return None


def _run(recipe, dist, resume: bool, console) -> dict:
    from codemae_cli.train.engine import resolve_precision, set_seed

    def say(msg: str) -> None:
        if dist.is_main:
            (console.print if console is not None else print)(msg)

    run_dir = Path(recipe.run.output_dir)
    _check_run_dir(run_dir, resume)
    precision = resolve_precision(dist.device, recipe.run.precision)
    set_seed(recipe.run.seed, dist.rank)
    task = FinetuneTask(recipe, dist, say, precision, resume_from=run_dir / "checkpoints" / "last" if resume else None)
    settings = LoopSettings.from_recipe(recipe, task.plan, precision, unit="chips", description="finetune",
                                        save_each_epoch=True)
    loop = TrainLoop(task, settings, dist, run_dir, recipe, say)
    pos = Position()
    if resume:
        pos = loop.resume(run_dir / "checkpoints" / "last")
        say(f"resuming at epoch {pos.epoch + 1}, step {pos.step}")
    t0 = time.perf_counter()
    try:
        pos = loop.run(pos)
    finally:
        loop.close()
    elapsed = time.perf_counter() - t0
    best_metrics = task.best_metrics if task.best_metrics is not None else task.last_metrics
    say(f"done: {pos.step} steps in {elapsed:.1f} s; best {recipe.task.best_metric} "
        f"{100 * (task.best_value or float('nan')):.2f} at epoch {task.best_epoch}; run in {run_dir}")
    return {"run_dir": str(run_dir), "best_metrics": best_metrics, "best_epoch": task.best_epoch,
            "last_metrics": task.last_metrics, "steps": pos.step, "seconds": elapsed,
            "load_report": task.report.as_dict() if task.report else None}


class FinetuneTask(TrainTask):
    """A task model on labelled chips: data, model, optimizer, the step, validation every epoch."""

    def __init__(self, recipe, dist, say, precision: str, resume_from: Optional[Path] = None):
        self.recipe, self.dist, self.say, self.precision = recipe, dist, say, precision
        self.best_value = self.best_epoch = self.best_metrics = self.last_metrics = None
        self._data()
        self._model(resume_from)
        self._optimisation()

    def _data(self) -> None:
        from codemae_cli.tasks.data import open_datasets, resolve_classes, task_loader, train_loader

        recipe, dist = self.recipe, self.dist
        self.dsets = open_datasets(recipe.data.datasets)
        self.classes = resolve_classes(self.dsets, recipe.task)
        self.names = [c["name"] for c in self.classes]
        self.loader, self.sampler, self.chips = train_loader(self.dsets, recipe, dist.rank, dist.world_size)
        self.val_dl = task_loader(self.dsets, recipe.data.val_split, recipe, rank=dist.rank,
                                  world_size=dist.world_size)
        ds_meta = self.dsets[0].meta
        self.bands = {"optical": _band_names(ds_meta, "optical"), "sar": _band_names(ds_meta, "sar")}

    def _model(self, resume_from: Optional[Path]) -> None:
        """Build the task model, freeze what the inputs never reach, load the pretrained encoder."""
        import torch

        from codemae_cli.tasks.model import find_unused_parameters
        from codemae_cli.tasks.model_io import build_task_model
        from codemae_cli.train.checkpoint import read_checkpoint_meta

        t, dist = self.recipe.task, self.dist
        if resume_from is not None:
            # The encoder is rebuilt as it was trained (the record's encoder_config); its weights
            # come from checkpoints/last.
            last = pre = read_checkpoint_meta(resume_from)
            pre_state = None
            self.best_metrics = last.best.metrics
        else:
            pre_state, pre = _load_pretrained(self.recipe)
            if pre is not None:
                _check_bands(pre, self.bands, t.inputs)
        model, self.enc_cfg = build_task_model(self.recipe, self.chips.optical_bands, self.chips.sar_bands,
                                               len(self.classes), pre)
        # What the chosen inputs never touch is frozen: DDP runs without find_unused_parameters.
        unused = find_unused_parameters(model, self.chips.optical_bands, self.chips.sar_bands,
                                        2 * self.enc_cfg.patch_size)
        for name, p in model.named_parameters():
            if name in unused:
                p.requires_grad_(False)
        if pre_state is not None:
            self.report = self._load_encoder(model, pre_state, unused)
        elif resume_from is not None:
            self.report = _LoadedReport(last.load_report)
        else:
            self.report = None
            self.say(f"encoder: preset '{self.enc_cfg.preset}' from scratch (random initialisation)")
            if self.recipe.model.preset is None:
                self.say(f"NOTE: model.preset is not set, so the encoder is the '{self.enc_cfg.preset}' preset; "
                         "set model.preset=tiny|small|base|large to choose its size")
        model.to(dist.device)
        if dist.distributed and dist.device.type == "cuda" and t.linear_probe:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BN statistics over all GPUs
        self.model = model
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_total = sum(p.numel() for p in model.parameters())
        self.say(f"task model: {t.kind} ({'linear probe' if t.linear_probe else t.head}), inputs {t.inputs}, "
                 f"{len(self.classes)} classes, {n_train / 1e6:.2f} M trainable / {n_total / 1e6:.2f} M parameters")

    def _load_encoder(self, model, pre_state: dict, unused: set):
        from codemae_cli.tasks.model_io import encoder_state_from_checkpoint, load_encoder_weights

        t = self.recipe.task
        used = {n[len("encoder."):] for n, p in model.named_parameters()
                if n.startswith("encoder.") and n not in unused}
        if t.linear_probe:  # a frozen encoder has no gradients to tell: go by the input modality
            other = {"optical": "patch_embed.sar.", "sar": "patch_embed.optical.", "both": None}[t.inputs]
            used = {k for k in model.encoder.state_dict() if other is None or not k.startswith(other)}
        report = load_encoder_weights(model.encoder, encoder_state_from_checkpoint(pre_state), used=used,
                                      source=str(t.pretrained))
        missing = report.missing
        self.say(f"pretrained encoder: {report.loaded} tensors loaded from {t.pretrained}; "
                 f"{len(missing)} missing, {len(report.unexpected)} unexpected, {len(report.skipped)} skipped"
                 + (f" (missing: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''})" if missing else ""))
        return report

    def _optimisation(self) -> None:
        import torch

        from codemae_cli.train.optim import WarmupCosine, build_optimizer, param_groups, scaled_lr

        o, t, dist = self.recipe.optim, self.recipe.task, self.dist
        lr = scaled_lr(o, dist.world_size)
        groups = param_groups(self.model, o.weight_decay)
        if o.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=lr, momentum=o.momentum)
        else:
            self.optimizer = build_optimizer(groups, o, lr)
        self.plan = plan_steps(self.sampler.batches_per_epoch, o)
        self.schedule = WarmupCosine(lr, o.min_lr, self.plan.warmup_steps, self.plan.total_steps)
        self.class_weights = (torch.tensor(t.class_weights, dtype=torch.float32, device=dist.device)
                              if t.class_weights is not None else None)
        chips = o.batch_size * o.accum_steps * dist.world_size
        self.say(f"lr {lr:.4g}; effective batch {chips} chips ({o.batch_size} x {o.accum_steps} accum x "
                 f"{dist.world_size} processes); {self.plan.steps_per_epoch} steps per epoch, "
                 f"{self.plan.total_steps} in all{left_out_note(self.sampler)}")

    # -- what the loop calls ----------------------------------------------------------------------
    def step(self, model, batch) -> dict:
        from codemae_cli.tasks.data import batch_inputs
        from codemae_cli.tasks.evaluate import task_loss

        optical, sar, label = batch_inputs(batch, self.dist.device, self.recipe.task.ignore_index)
        logits = model(optical=optical, sar=sar)
        return {"loss": task_loss(logits, label, self.recipe.task, len(self.classes), self.class_weights)}

    def resume_extra(self) -> dict:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch}

    def load_resume_extra(self, extra: dict) -> None:
        self.best_value, self.best_epoch = extra.get("best_value"), extra.get("best_epoch")

    def end_epoch(self, loop, pos, epoch: int) -> None:
        """Validation (per-class IoU, mIoU, F1, OA or mAP), the best checkpoint, the curves."""
        from codemae_cli.tasks.evaluate import evaluate_model
        from codemae_cli.tasks.metrics import is_better

        t = self.recipe.task
        metrics = evaluate_model(self.model, self.val_dl, t, len(self.classes), self.dist.device, self.precision,
                                 class_names=self.names, class_weights=self.class_weights)
        self.last_metrics = _summary(metrics)
        loop.logger.log(pos.step, _scalars(metrics, self.names) | {"epoch": epoch + 1}, split="val")
        value = metrics.get(t.best_metric)
        improved = is_better(t.best_metric, value, self.best_value)
        if improved:
            self.best_value, self.best_epoch, self.best_metrics = value, epoch + 1, _summary(metrics)
        self.say(f"epoch {epoch + 1}/{self.recipe.optim.epochs}  step {pos.step}  val loss {metrics['loss']:.4f}  "
                 f"{t.best_metric} {100 * value:.2f}" + ("  (best)" if improved else ""))
        if improved:
            loop.save("best", pos, with_resume=False)
        if self.dist.is_main:
            loop.logger.plot()
            _plot_val(loop.logger, loop.run_dir / "val_curve.png", t.best_metric)

    def checkpoint_meta(self, name: str, pos) -> dict:
        """meta.json, read back as :class:`~codemae_cli.train.checkpoint.CheckpointMeta`."""
        from codemae_cli.config import to_dict
        from codemae_cli.train.checkpoint import data_provenance

        t, recipe, enc = self.recipe.task, self.recipe, self.enc_cfg
        return {
            "kind": "finetune", "task": t.kind, "multilabel": t.multilabel, "inputs": t.inputs,
            "classes": self.classes, "ignore_index": t.ignore_index, "bands": self.bands,
            "stats": self.dsets[0].meta.get("stats"), "img_size": recipe.model.img_size,
            # SAR units and input bands of the training data: predict reads a scene the same way
            **data_provenance([d.meta for d in self.dsets]),
            "backbone": getattr(enc, "backbone", "vit"),
            "patch_size": enc.patch_size, "preset": enc.preset, "encoder_config": to_dict(enc),
            "modality_dropout": t.modality_dropout, "linear_probe": t.linear_probe,
            "pretrained": t.pretrained, "load_report": self.report.as_dict() if self.report else None,
            "datasets": [str(d.root) for d in self.dsets], "recipe": to_dict(recipe), "batch": pos.batch,
            "metrics": (self.best_metrics if name == "best" else self.last_metrics) or {},
            "best": {"metric": t.best_metric, "value": self.best_value, "epoch": self.best_epoch,
                     "metrics": self.best_metrics},
        }


class _LoadedReport:
    """The load report of the original run, carried into the checkpoints of a resumed run."""

    def __init__(self, data):
        self.data = data

    def as_dict(self):
        return self.data

    def __bool__(self):
        return self.data is not None


def _summary(metrics: dict) -> dict:
    """Metrics without the bulky confusion matrix (kept in evaluate's JSON instead)."""
    return {k: v for k, v in metrics.items() if k != "confusion"}


def _plot_val(logger, path: Path, metric: str) -> None:
    """Validation curve of the chosen metric (and loss) per epoch, beside the loss curves."""
    recs = [rec for rec in logger.read() if rec.get("split") == "val" and rec.get(metric) is not None]
    if not recs:
        return
    from codemae_cli.train.logging import pyplot, save_figure

    plt = pyplot()
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
    save_figure(fig, path)


__all__ = ["run_finetune"]
