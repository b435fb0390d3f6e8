"""``codemae ablate``: pretrain the CoDe-MAE variants on the testbed with the same budget and
seeds, probe each on SAR-only, optical-only and bi-modal segmentation, analyse the
representations, and write one table (Markdown + JSON) with means and standard deviations.

Every (variant, seed) cell is a directory ``OUT/cells/<variant>/seed<k>/`` holding the
pretraining run, the three probe runs, the analysis and ``result.json``. ``result.json`` is
written last and atomically, so an interrupted ablation restarted with the same command skips
the finished cells and redoes only the one it was in.

Variants are recipe overrides of the pretraining recipe (each component is a switch):

    mae        plain joint MAE with a shared trunk (no OKD, no CCL, no CDR)
    okd        + optical-anchored distillation (EMA teacher at the tiny/small scales)
    ccl        + conditioned contrast (cross-attention buffer before InfoNCE)
    cdr        + cross-modal degraded reconstruction ("channel" degradation)
    codemae    OKD + CCL + CDR
    rigid      + rigid contrast on the encoder features (CROMA-like), no buffer
    full_xrec  + full, non-degraded cross reconstruction (msGFM-like)

Variants run on request only (``--variants NAME``): the reference code's other CDR
degradations under its names, codemae's own variants of them, and its reproduction switches
(docs/architecture.md, "codemae and the reference code"):

    cdr_spatial, cdr_dual, cdr_hog, cdr_sar_gradient, cdr_median   reference degradations
    cdr_spatial_mean, cdr_dual_mean, cdr_hog_cells                   codemae's variants
    rigid_ref      rigid contrast where the reference puts it (decoder-embedding projection),
                   negatives gathered without gradient
    codemae_ref    codemae with the reference's switches: no-grad gather, learnable positions
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from codemae_cli.errors import UserError
from codemae_cli.fsutil import check_writable, staged_file, sweep_stale

VARIANTS: dict[str, list[str]] = {
    "mae": ["model.okd.enabled=false", "model.ccl.mode=off", "model.cdr.enabled=false"],
    "okd": ["model.okd.enabled=true", "model.ccl.mode=off", "model.cdr.enabled=false"],
    "ccl": ["model.okd.enabled=false", "model.ccl.mode=conditioned", "model.cdr.enabled=false"],
    "cdr": ["model.okd.enabled=false", "model.ccl.mode=off", "model.cdr.enabled=true",
            "model.cdr.degradation=channel"],
    "codemae": ["model.okd.enabled=true", "model.ccl.mode=conditioned", "model.cdr.enabled=true",
                "model.cdr.degradation=channel"],
    "rigid": ["model.okd.enabled=false", "model.ccl.mode=rigid", "model.cdr.enabled=false"],
    "full_xrec": ["model.okd.enabled=false", "model.ccl.mode=off", "model.cdr.enabled=true",
                  "model.cdr.degradation=none"],
}
DEFAULT_VARIANTS = tuple(VARIANTS)  # the paper's switches: what an ablation runs by default
_CDR_ONLY = ["model.okd.enabled=false", "model.ccl.mode=off", "model.cdr.enabled=true"]
VARIANTS.update({f"cdr_{d}": _CDR_ONLY + [f"model.cdr.degradation={d}"]
                 for d in ("spatial", "dual", "hog", "sar_gradient", "median", "spatial_mean", "dual_mean", "hog_cells")})
VARIANTS["rigid_ref"] = VARIANTS["rigid"] + ["model.ccl.rigid_on=decoder_embed", "model.ccl.gather_grad=false"]
VARIANTS["codemae_ref"] = VARIANTS["codemae"] + ["model.ccl.gather_grad=false", "model.pos_embed=learnable"]
INPUTS = ("sar", "optical", "both")


@dataclass
class Scale:
    """Everything that sets the cost of one ablation cell."""

    # testbed
    scenes: int
    scene_size: int
    tile: int
    # model and pretraining
    preset: str
    img_size: int
    patch_size: int
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    okd_teacher: str  # "ema" on CPU; a timm name with weights on a GPU machine
    # probing
    probe_steps: int
    probe_batch: int
    probe_lr: float
    linear_probe: bool = True
    # "cached": linear probe on frozen features computed once per chip (analysis/probe.py);
    # "finetune": the full `codemae finetune` engine (with augmentation) for each probe.
    probe_engine: str = "cached"
    analysis_chips: int = 48
    device: str = "auto"
    extra_pretrain: list[str] = field(default_factory=list)
    extra_probe: list[str] = field(default_factory=list)


SCALES: dict[str, Scale] = {
    # A few minutes per variant on two busy CPU cores: tiny ViT, 32-px chips, short schedules.
    "tiny": Scale(scenes=6, scene_size=192, tile=32, preset="tiny", img_size=32, patch_size=8,
                  pretrain_steps=120, pretrain_batch=16, pretrain_lr=1e-3, okd_teacher="ema",
                  probe_steps=100, probe_batch=32, probe_lr=0.05, analysis_chips=36, device="cpu"),
    # Tens of minutes per variant on a workstation CPU, a minute or two on any GPU.
    "small": Scale(scenes=16, scene_size=256, tile=64, preset="tiny", img_size=64, patch_size=8,
                   pretrain_steps=1500, pretrain_batch=64, pretrain_lr=1e-3, okd_teacher="ema",
                   probe_steps=600, probe_batch=64, probe_lr=0.01, analysis_chips=128),
    # The documented GPU configuration: a small ViT on 128-px chips with a longer schedule and
    # the probes trained by the fine-tuning engine (SGD, the paper's linear-probe protocol).
    "gpu": Scale(scenes=64, scene_size=512, tile=128, preset="small", img_size=128, patch_size=16,
                 pretrain_steps=20000, pretrain_batch=128, pretrain_lr=1.5e-3, okd_teacher="ema",
                 probe_steps=3000, probe_batch=128, probe_lr=0.1, probe_engine="finetune",
                 analysis_chips=256, device="cuda"),
}


def _replace_text(path: Path, text: str) -> None:
    """Write ``text`` beside ``path`` and rename it over ``path``: a kill leaves the old file or the new."""
    with staged_file(path) as tmp:
        tmp.write_text(text)


def _atomic_json(path: Path, obj) -> None:
    _replace_text(path, json.dumps(obj, indent=2))


def _torch_device(name: str) -> str:
    """The recipe's device name for the probes and analyses: ``auto`` picks CUDA when present."""
    from codemae_cli.device import resolve_device

    return str(resolve_device(name))


def _finite(v) -> Optional[float]:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


# --------------------------------------------------------------------------------------------
# one cell
# --------------------------------------------------------------------------------------------
def pretrain_overrides(variant: str, scale: Scale, dataset: Path, out: Path, seed: int) -> list[str]:
    over = [
        f"data.datasets=[{json.dumps(str(dataset))}]",
        f"data.img_size={scale.img_size}",
        "data.num_workers=0",
        "data.pin_memory=false",
        f"model.preset={scale.preset}",
        f"model.img_size={scale.img_size}",
        f"model.patch_size={scale.patch_size}",
        f"optim.batch_size={scale.pretrain_batch}",
        f"optim.lr={scale.pretrain_lr}",
        f"optim.max_steps={scale.pretrain_steps}",
        # One epoch of warmup, then cosine decay to the end of the step budget.
        "optim.warmup_epochs=1",
        f"run.output_dir={json.dumps(str(out))}",
        f"run.seed={seed}",
        f"run.device={scale.device}",
        "run.tensorboard=false",
        f"run.ckpt_every={scale.pretrain_steps}",
    ]
    over += VARIANTS[variant]
    if "model.okd.enabled=true" in VARIANTS[variant]:
        over.append(f"model.okd.teacher={scale.okd_teacher}")
    return over + list(scale.extra_pretrain)


def probe_overrides(inputs: str, scale: Scale, dataset: Path, pretrained: Path, out: Path, seed: int) -> list[str]:
    over = [
        f"data.datasets=[{json.dumps(str(dataset))}]",
        f"data.img_size={scale.img_size}",
        "data.num_workers=0",
        "data.pin_memory=false",
        f"model.img_size={scale.img_size}",
        "model.drop_path=0.0",
        f"task.inputs={inputs}",
        "data.val_split=test",  # scored on held-out chips; no model selection on them (last model)
        f"task.pretrained={json.dumps(str(pretrained))}",
        "task.kind=segmentation",
        f"optim.batch_size={scale.probe_batch}",
        f"optim.lr={scale.probe_lr}",
        f"optim.max_steps={scale.probe_steps}",
        "optim.warmup_epochs=0",
        f"run.output_dir={json.dumps(str(out))}",
        f"run.seed={seed}",
        f"run.device={scale.device}",
        "run.tensorboard=false",
    ]
    if scale.linear_probe:
        # The paper's protocol: frozen encoder, BatchNorm without affine + linear head, SGD.
        over += ["task.linear_probe=true", "task.head=linear", "optim.optimizer=sgd", "optim.weight_decay=0.0"]
    return over + list(scale.extra_probe)


def _epochs_for(steps: int, chips: int, batch: int) -> int:
    """Enough epochs to reach ``steps`` (max_steps stops it): the schedules see one budget."""
    per_epoch = max(1, chips // max(1, batch))
    return max(1, math.ceil(steps / per_epoch))


def _cached_probes(run_dir: Path, ds, scale: Scale, seed: int, cell_dir: Path, log) -> dict:
    """Three linear probes (SAR, optical, both) on frozen features, scored on the test split."""
    from codemae_cli.analysis.analyze import load_pretrained
    from codemae_cli.analysis.probe import chip_arrays, encode, linear_probe, probe_inputs

    done = cell_dir / "probes.json"
    if done.is_file():
        return json.loads(done.read_text())
    device = _torch_device(scale.device)
    pre = load_pretrained(run_dir, device=device)
    model, stats = pre.model, pre.meta.stats or ds.stats
    classes = ds.classes
    feats, labels = {}, {}
    for split in ("train", "test"):
        idx = ds.indices(split)
        if idx.size == 0:
            raise UserError(f"the testbed has no '{split}' chips to probe on")
        opt, sar, lab = chip_arrays(ds, idx, stats)
        feats[split] = encode(model, opt, sar, device=device)
        labels[split] = lab
    probes = {}
    for inputs in INPUTS:
        log(f"linear probe on {inputs} input ({scale.probe_steps} steps, cached features)")
        m = linear_probe(probe_inputs(feats["train"], inputs), labels["train"], probe_inputs(feats["test"], inputs),
                         labels["test"], len(classes), steps=scale.probe_steps, batch_size=scale.probe_batch,
                         lr=scale.probe_lr, seed=seed, class_names=classes, device=device)
        probes[inputs] = {k: v for k, v in m.items() if k != "confusion"}
    _atomic_json(done, probes)
    return probes


def _finetune_probes(run_dir: Path, dataset: Path, n_train: int, scale: Scale, seed: int, cell_dir: Path, log) -> dict:
    """Three probes through the fine-tuning engine; the final model is scored on the test split."""
    from codemae_cli.config import load_recipe
    from codemae_cli.tasks.config import FinetuneRecipe
    from codemae_cli.tasks.finetune import run_finetune

    probes: dict[str, dict] = {}
    for inputs in INPUTS:
        p_dir = cell_dir / f"probe_{inputs}"
        done = p_dir / "probe.json"
        if done.is_file():
            probes[inputs] = json.loads(done.read_text())
            continue
        log(f"probing on {inputs} input with the fine-tuning engine")
        shutil.rmtree(p_dir, ignore_errors=True)  # a half-finished probe restarts from scratch
        over = probe_overrides(inputs, scale, dataset, run_dir, p_dir, seed)
        over.append(f"optim.epochs={_epochs_for(scale.probe_steps, n_train, scale.probe_batch)}")
        ft = run_finetune(load_recipe(None, FinetuneRecipe, over))
        # The last model, not the best-on-validation one: no selection on the scored split.
        metrics = {k: v for k, v in (ft.get("last_metrics") or {}).items() if k != "confusion"}
        probes[inputs] = metrics
        _atomic_json(done, metrics)
    return probes


def run_cell(variant: str, seed: int, scale: Scale, dataset: Path, cell_dir: Path,
             log: Callable[[str], None] = print) -> dict:
    """Pretrain one variant with one seed, probe it three ways, analyse it; returns the result."""
    from codemae_cli.analysis.analyze import run_analyze
    from codemae_cli.config import load_recipe
    from codemae_cli.data.shards import PreparedDataset
    from codemae_cli.train.pretrain import run_pretrain
    from codemae_cli.train.recipe import PretrainRecipe

    result_path = cell_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    t0 = time.perf_counter()
    ds = PreparedDataset(dataset)
    n_train = len(ds.indices("train"))

    pre_dir = cell_dir / "pretrain"
    over = pretrain_overrides(variant, scale, dataset, pre_dir, seed)
    over.append(f"optim.epochs={_epochs_for(scale.pretrain_steps, n_train, scale.pretrain_batch)}")
    recipe = load_recipe(None, PretrainRecipe, over)
    # A cell interrupted mid-pretraining resumes from its last checkpoint.
    resume = (pre_dir / "checkpoints" / "last").is_dir()
    log(f"[{variant} seed {seed}] pretraining {scale.pretrain_steps} steps" + (" (resuming)" if resume else ""))
    run_dir = Path(run_pretrain(recipe, resume=resume))
    t_pre = time.perf_counter() - t0

    if scale.probe_engine == "cached":
        probes = _cached_probes(run_dir, ds, scale, seed, cell_dir, log=lambda m: log(f"[{variant} seed {seed}] {m}"))
    else:
        probes = _finetune_probes(run_dir, dataset, n_train, scale, seed, cell_dir,
                                  log=lambda m: log(f"[{variant} seed {seed}] {m}"))

    log(f"[{variant} seed {seed}] analysing representations")
    an_dir = cell_dir / "analysis"
    doc = run_analyze([run_dir], dataset, an_dir, split="val", max_chips=scale.analysis_chips,
                      reconstructions=4, device=_torch_device(scale.device), overwrite=True)
    (r,) = doc["checkpoints"].values()
    result = {
        "variant": variant,
        "seed": seed,
        "miou": {k: _finite(probes[k].get("miou")) for k in INPUTS},
        "oa": {k: _finite(probes[k].get("oa")) for k in INPUTS},
        "erank_optical": r["effective_rank"]["optical_tokens"],
        "erank_sar": r["effective_rank"]["sar_tokens"],
        "modality_gap": r["modality_gap"]["chips"],
        "paired_cos": r["similarity"]["chips"]["paired"],
        "unpaired_cos": r["similarity"]["chips"]["unpaired"],
        "retrieval_top1": r["similarity"]["chips"]["retrieval_top1"],
        "sim_ssim_spearman": r["similarity_vs_ssim"]["spearman"],
        "pretrain_seconds": round(t_pre, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    _atomic_json(result_path, result)
    return result


# --------------------------------------------------------------------------------------------
# table
# --------------------------------------------------------------------------------------------
COLUMNS = [
    # (key in the aggregated row, header, format)
    ("miou.sar", "mIoU SAR", "{:.1f}"),
    ("miou.optical", "mIoU optical", "{:.1f}"),
    ("miou.both", "mIoU both", "{:.1f}"),
    ("erank_optical", "erank opt", "{:.1f}"),
    ("erank_sar", "erank SAR", "{:.1f}"),
    ("modality_gap", "gap", "{:.2f}"),
    ("paired_cos", "cos paired", "{:.2f}"),
    ("unpaired_cos", "cos unpaired", "{:.2f}"),
    ("retrieval_top1", "retrieval@1", "{:.2f}"),
    ("sim_ssim_spearman", "rho(cos,SSIM)", "{:.2f}"),
]


def _get(result: dict, key: str):
    node = result
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return _finite(node)


def aggregate(results: Sequence[dict], variants: Sequence[str]) -> dict:
    """Mean and std over seeds (ddof=1 when there are two or more) of every column, per variant."""
    table: dict[str, dict] = {}
    for v in variants:
        rows = [r for r in results if r["variant"] == v]
        if not rows:
            continue
        entry = {"seeds": sorted(r["seed"] for r in rows)}
        for key, _, _ in COLUMNS:
            vals = [x for x in (_get(r, key) for r in rows) if x is not None]
            if key.startswith("miou."):
                # metrics come as fractions; the table speaks in percent like the papers do
                vals = [100 * x if x <= 1.0 else x for x in vals]
            if vals:
                entry[key] = {
                    "mean": float(np.mean(vals)),
                    "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                    "n": len(vals),
                }
        table[v] = entry
    return table


def render_markdown(table: dict, scale_name: str, scale: Scale, machine: str) -> str:
    head = "| variant | seeds | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    sep = "|" + "---|" * (len(COLUMNS) + 2)
    lines = [
        f"Ablation on the codemae testbed, scale `{scale_name}` ({machine}): "
        f"{scale.scenes} scenes of {scale.scene_size} px, {scale.tile}-px chips, preset `{scale.preset}`, "
        f"patch {scale.patch_size}, {scale.pretrain_steps} pretraining steps x batch {scale.pretrain_batch}, "
        f"{'linear probe' if scale.linear_probe else 'fine-tuning'} ({scale.probe_engine}) {scale.probe_steps} steps, "
        f"OKD teacher `{scale.okd_teacher}`. Mean +- std over seeds; mIoU in percent on the held-out test "
        "split; representation metrics on the val chips.",
        "",
        head,
        sep,
    ]
    for v, entry in table.items():
        cells = []
        for key, _, fmt in COLUMNS:
            s = entry.get(key)
            cells.append("n/a" if s is None else f"{fmt.format(s['mean'])} +- {fmt.format(s['std'])}")
        lines.append(f"| {v} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _machine(device: str) -> str:
    import platform

    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CUDA (unavailable)"
    return f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), {torch.get_num_threads()} torch threads"


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def run_ablation(
    out_dir: str | Path,
    *,
    scale: str = "tiny",
    seeds: int = 3,
    variants: Optional[Sequence[str]] = None,
    overrides: Optional[dict] = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run (or resume) the ablation in ``out_dir``; returns the aggregated table as a dict.

    ``overrides``: replace fields of the chosen :class:`Scale` (e.g. ``{"pretrain_steps": 5}``
    for a smoke run). The testbed is rendered once into ``out_dir/testbed`` and shared by all
    cells; its parameters are recorded in ``out_dir/ablation.json`` and a resumed run with a
    different scale is refused rather than mixing results.
    """
    if scale not in SCALES:
        raise UserError(f"unknown scale '{scale}'; choose one of {', '.join(SCALES)}")
    variants = list(variants or DEFAULT_VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"unknown variant '{unknown[0]}'; choose from {', '.join(VARIANTS)}")
    if seeds < 1:
        raise UserError("--seeds must be at least 1")
    sc = Scale(**{**asdict(SCALES[scale]), **(overrides or {})})
    if sc.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"scale '{scale}' runs on a CUDA GPU and none is available; use --scale tiny or small")

    out = check_writable(out_dir, "the ablation folder", folder=True)
    config_path = out / "ablation.json"
    if out.is_dir() and any(out.iterdir()) and not config_path.is_file():
        raise UserError(f"the ablation folder '{out}' is not empty and holds no ablation; choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    sweep_stale(config_path)
    config = {"scale": scale, "params": asdict(sc)}
    if config_path.is_file():
        previous = json.loads(config_path.read_text())
        if previous.get("params") != config["params"]:
            raise UserError(f"'{out}' holds an ablation with other settings (scale '{previous.get('scale')}'); "
                            "use a new output directory")
    else:
        _atomic_json(config_path, config)

    dataset = out / "testbed"
    if not (dataset / "metadata.json").is_file():
        from codemae_cli.analysis.testbed import write_testbed

        log(f"rendering the testbed: {sc.scenes} scenes of {sc.scene_size} px into {dataset}")
        write_testbed(dataset, scenes=sc.scenes, size=sc.scene_size, tile=sc.tile, seed=0)

    results = []
    for seed in range(seeds):
        for v in variants:
            cell = out / "cells" / v / f"seed{seed}"
            results.append(run_cell(v, seed, sc, dataset, cell, log=log))
            table = aggregate(results, variants)
            _write_table(out, table, scale, sc)  # the table grows as cells finish
    table = aggregate(results, variants)
    _write_table(out, table, scale, sc)
    return table


def _write_table(out: Path, table: dict, scale_name: str, sc: Scale) -> None:
    machine = _machine(sc.device)
    md = render_markdown(table, scale_name, sc, machine)
    _replace_text(out / "table.md", md)
    _atomic_json(out / "table.json", {"scale": scale_name, "machine": machine, "params": asdict(sc),
                                      "columns": [k for k, _, _ in COLUMNS], "variants": table})


__all__ = ["COLUMNS", "DEFAULT_VARIANTS", "INPUTS", "SCALES", "Scale", "VARIANTS", "aggregate", "render_markdown", "run_ablation",
           "run_cell"]
