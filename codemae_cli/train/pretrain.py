"""CoDe-MAE pretraining on the shared loop (:mod:`codemae_cli.train.loop`): CPU, one GPU, torchrun.

    run_dir = run_pretrain(load_pretrain_recipe("recipes/hr.yaml"))

Order of set-up (nanoGPT style): distributed from the environment -> refusals -> data -> build ->
to(device) -> optimizer -> (resume) -> compile -> DDP (the last two in the loop). This module
supplies the pretraining task: paired chips, the CoDe-MAE model and its step (one forward that
returns the weighted loss and its named terms), the EMA teacher update and what checkpoints
record. Every augmentation is drawn from (seed, epoch, position) and every masking from
(seed, rank, step, micro-batch), so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from codemae_cli.errors import UserError
from codemae_cli.train.loop import LoopSettings, Position, TrainLoop, TrainTask, left_out_note, plan_steps
from codemae_cli.train.recipe import PretrainRecipe

if TYPE_CHECKING:
    from codemae_cli.train.checkpoint import CheckpointMeta

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
    from codemae_cli.train.distributed import process_group

    with process_group(recipe.run.device) as dist:
        return _run(recipe, dist, resume, output_dir, echo)


def _resume_source(recipe: PretrainRecipe, run_dir: Path, resume: bool, dist) -> Optional[CheckpointMeta]:
    """The record of the checkpoint to resume from (None for a new run), after refusing bad set-ups."""
    from codemae_cli.config import to_dict
    from codemae_cli.train.checkpoint import read_checkpoint_meta, resolve_checkpoint

    if not recipe.data.datasets:
        raise UserError("data.datasets is empty: list one or more directories written by `codemae prepare`")
    existing = _checkpoints_in(run_dir)
    if existing and not resume:
        raise UserError(f"run directory '{run_dir}' already holds checkpoints; pass --resume to continue it "
                        "or choose another --output-dir")
    if not resume:
        return None
    if not existing:
        raise UserError(f"--resume was given but '{run_dir}' holds no checkpoint to resume from")
    # checkpoints/last, or the copy a save killed between its two renames moved aside.
    source = read_checkpoint_meta(resolve_checkpoint(run_dir, prefer=("last",)))
    meta = source.raw
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
    return source


class PretrainTask(TrainTask):
    """CoDe-MAE on paired chips: the data, model and optimizer of a pretraining run, and its step."""

    def __init__(self, recipe: PretrainRecipe, dist, say: Callable[[str], None], precision: str,
                 resumed: Optional[CheckpointMeta] = None):
        from codemae_cli.data.dataset import DeviceAugment, PairedBatchSampler, PairedChips, build_loader
        from codemae_cli.data.source_scale import SourceScale, sources_ranges
        from codemae_cli.model import build_model
        from codemae_cli.train.optim import WarmupCosine, build_optimizer, effective_batch, scaled_lr

        data, optim = recipe.data, recipe.optim
        self.recipe, self.dist = recipe, dist
        self.chips = PairedChips(data.datasets, data.split, data.img_size, crop_scale=data.crop_scale,
                                 hflip=data.hflip, train=True, seed=recipe.run.seed, augment_on=data.augment_on)
        self.device_augment = DeviceAugment(self.chips, dist.device) if data.augment_on == "device" else None
        if data.paired is not None:
            for src in self.chips.sources:
                src.paired = bool(data.paired)
        self.sampler = PairedBatchSampler(self.chips, optim.batch_size, weights=data.weights, shuffle=True,
                                          seed=recipe.run.seed, rank=dist.rank, world_size=dist.world_size,
                                          drop_last=True)
        self.loader = build_loader(self.chips, self.sampler, num_workers=data.num_workers,
                                   pin_memory=data.pin_memory and dist.device.type == "cuda")
        self.plan = plan_steps(self.sampler.batches_per_epoch, optim)
        rgb, luminance_rgb, self.rgb_record = _rgb_of_run(self.chips, recipe, resumed)
        self.model = build_model(recipe.model, self.chips.optical_bands, self.chips.sar_bands,
                                 rgb=rgb, luminance_rgb=luminance_rgb)
        # The OKD teacher and the HOG / ratio-gradient targets see each dataset at its source scale:
        # the one its metadata records, or in a resumed run the one the run has used so far.
        kept = [resumed.recorded_source_range(s.root) if resumed else None for s in self.chips.sources]
        self.source_ranges = sources_ranges(self.chips.sources, kept)
        self.model.set_source_scale(SourceScale.from_sources(self.chips.sources, self.source_ranges))
        self.model.to(dist.device)
        self.lr = scaled_lr(optim, dist.world_size, SAMPLES_PER_PAIR)
        self.effective_batch = effective_batch(optim, dist.world_size, SAMPLES_PER_PAIR)
        self.optimizer = build_optimizer(self.model, optim, self.lr)
        self.schedule = WarmupCosine(self.lr, optim.min_lr, self.plan.warmup_steps, self.plan.total_steps)
        self._describe(say, precision)

    def _describe(self, say: Callable[[str], None], precision: str) -> None:
        recipe, dist, optim, plan = self.recipe, self.dist, self.recipe.optim, self.plan
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        say(f"pretraining CoDe-MAE {recipe.model.backbone} '{recipe.model.preset}' ({n_params / 1e6:.1f} M trainable "
            f"parameters) on "
            f"{len(self.chips)} {recipe.data.split} pairs from {len(self.chips.sources)} dataset(s); "
            f"{dist.world_size} process(es) on {dist.device.type}, {precision}")
        pairs = optim.batch_size * optim.accum_steps * dist.world_size
        batch = (f"effective batch {pairs} pairs = {self.effective_batch} images ({optim.batch_size} pairs x "
                 f"{optim.accum_steps} accum x {dist.world_size} processes, x {SAMPLES_PER_PAIR} modalities)")
        if optim.lr is None:
            say(f"lr = blr {optim.blr:g} x {self.effective_batch} images / 256 = {self.lr:.4g}; {batch}")
        else:
            say(f"lr = {self.lr:.4g} (optim.lr); {batch}")
        if getattr(self.model, "init_report", None) is not None:
            say(self.model.init_report.summary())
        for line in self.model.describe_rgb():
            say(line)
        say(f"{plan.steps_per_epoch} steps per epoch, {plan.total_steps} steps in all, {plan.warmup_steps} warmup steps"
            f"{left_out_note(self.sampler)}")

    def step(self, model, batch) -> dict:
        non_blocking = self.dist.device.type == "cuda"
        batch = {k: v.to(self.dist.device, non_blocking=non_blocking) for k, v in batch.items()}
        if self.device_augment is not None:
            batch = self.device_augment(batch)
        out = model(batch["optical"], batch["sar"], paired=batch["paired"], source=batch["dataset"])
        return {"loss": out["loss"], **{f"loss_{n}": t for n, t in out["losses"].items()}}

    def after_update(self) -> None:
        self.model.update_teacher()

    def resume_extra(self) -> dict:
        return {"teacher": self.model.teacher_state_dict()}

    def load_resume_extra(self, extra: dict) -> None:
        if extra.get("teacher"):
            self.model.load_teacher_state_dict({k: v.to(self.dist.device) for k, v in extra["teacher"].items()})

    def checkpoint_meta(self, name: str, pos: Position) -> dict:
        from codemae_cli.config import to_dict
        from codemae_cli.train.checkpoint import data_provenance

        summary = self.chips.meta_summary()
        return {"kind": "pretrain", "recipe": to_dict(self.recipe), "bands": summary["bands"],
                "stats": summary["stats"], "datasets": summary["datasets"],
                **data_provenance([s.meta for s in self.chips.sources]),
                "backbone": getattr(self.recipe.model, "backbone", "vit"),
                "dataset_stats": [s.meta.get("stats") for s in self.chips.sources],
                "source_ranges": self.source_ranges,
                # Red, green, blue: the run's one decision, and the bands its timm / file teacher and
                # CDR's luminance read (a resumed run keeps them; train/checkpoint.py RGBRecord).
                "rgb_input": self._rgb_record(),
                "world_size": self.dist.world_size, "effective_batch": self.effective_batch, "lr": self.lr,
                "total_steps": self.plan.total_steps}

    def _rgb_record(self) -> dict:
        from codemae_cli.train.checkpoint import RGBRecord

        teacher = self.model.teacher_input.bands if self.model.teacher_input is not None else None
        return RGBRecord(self.rgb_record or self.model.rgb, teacher, self.model.rgb_bands, "rgb_input").to_meta()


def _rgb_of_run(chips, recipe: PretrainRecipe, resumed: Optional[CheckpointMeta]):
    """Where red, green, blue are among the optical bands, decided once for the run from the
    datasets' band names (data/raster.py choose_rgb): -> (the decision, the one CDR's luminance
    reads when a resumed run recorded another (else None), the recorded decision to keep writing
    (else None)). A resumed run keeps what it recorded, and is refused when the datasets' names
    now put red, green, blue elsewhere and the decision feeds the teacher or the luminance."""
    from codemae_cli.data.raster import choose_rgb
    from codemae_cli.model.targets import uses_luminance

    now = choose_rgb([(str(s.root), s.meta) for s in chips.sources], chips.optical_bands)
    if resumed is None:
        return now, None, None
    rec, n = resumed.rgb_input, chips.optical_bands
    okd, cdr = recipe.model.okd, recipe.model.cdr
    teacher_reads = okd.enabled and okd.teacher != "ema" and okd.teacher_bands is None
    luminance_reads = uses_luminance(cdr) and cdr.rgb_bands is None
    if rec.written == "rgb_input":
        kept, reads = rec.choice.bands, teacher_reads or luminance_reads
    else:  # older checkpoints: only the teacher read the band names
        kept, reads = rec.teacher_choice(now, n).bands, teacher_reads and rec.written == "teacher_input"
    if reads and now.conflict:
        raise UserError(now.conflict)
    if reads and now.source == "names" and kept is not None and now.bands != kept:
        raise UserError(f"the run being resumed read red, green, blue from optical bands {list(kept)}, but the "
                        f"datasets' band names put them at {list(now.bands)}; resume with the run's datasets or "
                        "start a new run")
    return rec.teacher_choice(now, n), rec.luminance_choice(now.names, n), rec.choice


def _run(recipe: PretrainRecipe, dist, resume: bool, output_dir, echo) -> Path:
    import torch

    from codemae_cli.train.engine import resolve_precision, set_seed

    say = (echo or print) if dist.is_main else (lambda *_: None)
    run_dir = Path(output_dir if output_dir is not None else recipe.run.output_dir)
    recipe.run.output_dir = str(run_dir)
    resume_from = _resume_source(recipe, run_dir, resume, dist)  # refuse bad set-ups before any write
    precision = resolve_precision(dist.device, recipe.run.precision)
    set_seed(recipe.run.seed, dist.rank)
    if dist.device.type == "cuda":
        # TF32 matmuls for the fp32 parts (losses, optimizer); bf16 autocast covers the rest.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    task = PretrainTask(recipe, dist, say, precision, resumed=resume_from)
    settings = LoopSettings.from_recipe(recipe, task.plan, precision, unit="pairs", description="pretrain")
    loop = TrainLoop(task, settings, dist, run_dir, recipe, say)
    pos = Position()
    if resume_from is not None:
        pos = loop.resume(resume_from.path)
        say(f"resumed from '{resume_from.path}' at step {pos.step} (epoch {pos.epoch}, batch {pos.batch})")
    try:
        ran = pos.step < settings.total_steps
        pos = loop.run(pos)
    finally:
        loop.close()
    if ran and dist.is_main:
        loop.logger.plot(run_dir / "loss_curve.png")
        say(f"done: {pos.step} steps; checkpoints in {loop.ckpt_root}, metrics in {loop.logger.path}, "
            f"loss curve {run_dir / 'loss_curve.png'}")
    return run_dir


__all__ = ["run_pretrain"]
