"""Labelled chips for fine-tuning and evaluation, on top of :mod:`codemae_cli.data.dataset`.

Training uses the same :class:`PairedChips` + :class:`PairedBatchSampler` as pretraining (identical
crop/flip for optical, SAR and label; resumable mid-epoch). Validation and evaluation read every
chip of a split once, whole and unaugmented, each rank a disjoint share (no padding duplicates,
so the summed confusion matrix counts each pixel once).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from codemae_cli.errors import UserError
from codemae_cli.tasks.config import DEFAULT_COLORS


def open_datasets(datasets: Sequence) -> list:
    from codemae_cli.data.dataset import open_datasets as _open

    if not datasets:
        raise UserError("no datasets given (set data.datasets to one or more `codemae prepare` outputs)")
    return _open(datasets)


def dataset_classes(ds) -> list[str]:
    """Class names by id (ids 0..max) of a labelled prepared dataset."""
    labels = ds.meta.get("labels")
    if not labels:
        raise UserError(f"dataset '{ds.root}' has no labels (prepare it with --labels)")
    raw = labels.get("classes") or {}
    try:
        by_id = {int(k): str(v) for k, v in raw.items()}
    except (TypeError, ValueError, AttributeError):
        raise UserError(f"dataset '{ds.root}' has malformed class names in metadata.json") from None
    if not by_id:
        raise UserError(f"dataset '{ds.root}' lists no label classes")
    return [by_id.get(i, f"class_{i}") for i in range(max(by_id) + 1)]


def resolve_classes(dsets, task) -> list[dict]:
    """``[{"name", "color"}]`` from the recipe (names/colours) checked against the datasets."""
    names = dataset_classes(dsets[0])
    for ds in dsets[1:]:
        other = dataset_classes(ds)
        if other != names:
            raise UserError(f"datasets '{dsets[0].root}' and '{ds.root}' have different classes "
                            f"({', '.join(names)} vs {', '.join(other)})")
    if task.classes:
        if len(task.classes) != len(names):
            raise UserError(f"task.classes lists {len(task.classes)} classes but the dataset has {len(names)} "
                            f"({', '.join(names)})")
        specs = [(c.name, c.color) for c in task.classes]
    else:
        specs = [(n, None) for n in names]
    out = []
    for i, (name, color) in enumerate(specs):
        color = list(color) if color is not None else list(DEFAULT_COLORS[i % len(DEFAULT_COLORS)])
        out.append({"name": name, "color": [int(c) for c in color]})
    if task.class_weights is not None and len(task.class_weights) != len(out):
        raise UserError(f"task.class_weights has {len(task.class_weights)} weights for {len(out)} classes")
    if task.ignore_index < len(out):
        raise UserError(f"task.ignore_index {task.ignore_index} is a class id; use a value >= {len(out)} (255)")
    return out


def train_loader(dsets, recipe, rank: int = 0, world_size: int = 1):
    """``(loader, sampler, chips)`` of the training split with augmentation."""
    from codemae_cli.data.dataset import PairedBatchSampler, PairedChips, build_loader

    d = recipe.data
    chips = PairedChips(dsets, split=d.split, img_size=recipe.model.img_size, crop_scale=d.crop_scale,
                        hflip=d.hflip, train=True, with_labels=True, seed=recipe.run.seed)
    sampler = PairedBatchSampler(chips, batch_size=recipe.optim.batch_size, weights=d.weights, shuffle=True,
                                 seed=recipe.run.seed, rank=rank, world_size=world_size, drop_last=True)
    loader = build_loader(chips, sampler, num_workers=d.num_workers, pin_memory=d.pin_memory)
    return loader, sampler, chips


def task_loader(dsets, split: str, recipe, train: bool = False, batch_size: Optional[int] = None,
                num_workers: Optional[int] = None, rank: int = 0, world_size: int = 1):
    """A loader over every chip of ``split`` (whole chips resized to the model size), rank-sharded."""
    import torch

    from codemae_cli.data.dataset import PairedChips

    chips = PairedChips(dsets, split=split, img_size=recipe.model.img_size, train=train, with_labels=True,
                        seed=recipe.run.seed)
    share = torch.utils.data.Subset(chips, list(range(rank, len(chips), world_size)))
    workers = recipe.data.num_workers if num_workers is None else num_workers
    return torch.utils.data.DataLoader(share, batch_size=batch_size or recipe.optim.batch_size, shuffle=False,
                                       num_workers=workers, pin_memory=torch.cuda.is_available(),
                                       drop_last=False)


def batch_inputs(batch: dict, device, ignore_index: int, drop: Optional[str] = None):
    """``(optical, sar, label)`` on ``device``; label ignored wherever an input is nodata.

    ``drop`` ("optical" | "sar") leaves one modality out, to test a bi-modal model without it.
    Masking by the joint validity keeps the scored pixels identical whatever the inputs, so
    optical-only, SAR-only and bi-modal results are comparable.
    """
    optical = batch["optical"].to(device, non_blocking=True) if drop != "optical" else None
    sar = batch["sar"].to(device, non_blocking=True) if drop != "sar" else None
    label = batch["label"].to(device, non_blocking=True).long()
    valid = batch.get("valid")
    if valid is not None:
        label = label.masked_fill(~valid.to(device, non_blocking=True).bool(), ignore_index)
    return optical, sar, label


__all__ = ["batch_inputs", "dataset_classes", "open_datasets", "resolve_classes", "task_loader", "train_loader"]
