"""The source scale of a prepared dataset: its pixel values mapped to [0, 1] by a fixed,
recorded range, never by an image's own brightness.

The OKD teacher and the reference forms of the HOG and ratio-gradient CDR targets see images at
this scale (the reference code feeds them the 8-bit image / 255). ``codemae prepare`` records
``source_range: [lo, hi]`` per modality in ``metadata.json``; a stored value x (source units,
SAR in dB) maps to ``clip((x - lo) / (hi - lo), 0, 1)``.

Rules applied at prepare time:

    optical  [0, R]: R = ``--optical-range`` when given, else by the source dtype: uint8 -> 255,
             other integer dtypes -> the dtype's maximum (uint16 -> 65535, int16 -> 32767),
             floating point -> 1 (reflectance in [0, 1]). Data that uses fewer bits than its
             dtype (11- or 12-bit sensors in uint16, reflectance x 10^4) should pass
             ``--optical-range 2047`` / ``4095`` / ``10000``, or the teacher sees a dark image.
    sar      one window for all polarisations (their relative levels are kept, like an
             optical image's colour balance): [min_b(mean_b - 3 std_b), max_b(mean_b + 3 std_b)]
             over the train split, in dB.

Datasets prepared before ``source_range`` was recorded get the same rules from what they do
record (``source_dtype``; 8-bit when even that is missing; the SAR stats), with a warning.
Pretraining checkpoints record the range of each of their datasets (``source_ranges``): a
resumed run keeps them, and ``codemae analyze`` recomputes targets at them.

Normalised batches (what the model sees) go back to the source scale through one affine map
per dataset and band, ``x_src = x_norm * scale + offset`` (:class:`SourceScale`), which inverts
exactly the dataset normalisation of :mod:`codemae_cli.data.dataset`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from codemae_cli.errors import UserError

SAR_WINDOW_STDS = 3.0
SAR_RANGE_RULE = f"train mean -/+ {SAR_WINDOW_STDS:g} std (dB), joint"  # how sar_range_rule chooses


def optical_range_rule(dtype: Optional[str], override: Optional[float] = None) -> tuple[list[float], str]:
    """``([0, R], rule)`` for an optical source of ``dtype`` (see the module docstring)."""
    if override is not None:
        if not (math.isfinite(override) and override > 0):
            raise UserError(f"--optical-range must be a positive number, not {override}")
        return [0.0, float(override)], "--optical-range"
    if dtype is None:
        return [0.0, 255.0], "assumed 8-bit (source dtype not recorded)"
    dt = np.dtype(dtype)
    if dt.kind in "ui":
        return [0.0, float(np.iinfo(dt).max)], f"{dt.name} maximum"
    return [0.0, 1.0], f"{dt.name}: reflectance in [0, 1]"


def sar_range_rule(sar_stats: Optional[dict]) -> Optional[list[float]]:
    """The joint dB window mean -/+ 3 std over the polarisations; None without usable stats."""
    try:
        mean = np.asarray(sar_stats["mean"], dtype=np.float64)
        std = np.asarray(sar_stats["std"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        return None
    if mean.size == 0 or not (np.isfinite(mean).all() and np.isfinite(std).all()):
        return None
    lo = float((mean - SAR_WINDOW_STDS * std).min())
    hi = float((mean + SAR_WINDOW_STDS * std).max())
    return [lo, hi] if hi > lo else [lo, lo + 1.0]


def source_range_meta(rule: tuple[list[float], str]) -> dict:
    """``{"source_range": [lo, hi], "source_range_rule": text}`` as metadata.json stores it."""
    return {"source_range": rule[0], "source_range_rule": rule[1]}


def source_ranges(optical_dtype: Optional[str], stats: dict, optical_range: Optional[float] = None) -> dict:
    """What every dataset records: ``{"optical": {"source_range", "source_range_rule"}, "sar": {...}}``."""
    sar = sar_range_rule((stats or {}).get("sar"))
    return {
        "optical": source_range_meta(optical_range_rule(optical_dtype, optical_range)),
        "sar": source_range_meta((sar, SAR_RANGE_RULE)),
    }


def read_source_range(meta: dict, modality: str, where: str = "") -> tuple[float, float]:
    """The recorded ``source_range`` of ``modality``, or the prepare rule with a warning for
    datasets that predate it."""
    section = meta.get(modality) or {}
    rng = section.get("source_range")
    if rng is not None:
        lo, hi = (float(v) for v in rng)
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise UserError(f"dataset {where} records an invalid {modality} source_range {rng}")
        return lo, hi
    if modality == "optical":
        rng, rule = optical_range_rule(section.get("source_dtype"))
    else:
        rng, rule = sar_range_rule((meta.get("stats") or {}).get("sar")), SAR_RANGE_RULE
        if rng is None:
            rng, rule = [-30.0, 10.0], "a fixed -30..10 dB window (no SAR stats)"
    warnings.warn(f"dataset {where} records no {modality} source_range (prepared by an older codemae); "
                  f"using {rng[0]:g}..{rng[1]:g} ({rule}); re-run `codemae prepare` to record it", stacklevel=2)
    return float(rng[0]), float(rng[1])


def dataset_source_ranges(meta: dict, where: str = "") -> dict[str, list[float]]:
    """``{"optical": [lo, hi], "sar": [lo, hi]}`` of a dataset (what a checkpoint records)."""
    return {m: list(read_source_range(meta, m, where)) for m in ("optical", "sar")}


@dataclass
class SourceScale:
    """Per dataset (rows) and band (columns: optical bands, then SAR bands):
    ``x_src = x_norm * scale + offset`` takes a normalised value to the [0, 1] source scale."""

    scale: np.ndarray  # (n_datasets, C_opt + C_sar) float32
    offset: np.ndarray  # (n_datasets, C_opt + C_sar) float32
    optical_bands: int

    @classmethod
    def from_norms(cls, norms: Sequence, ranges: Sequence[dict], optical_bands: int) -> SourceScale:
        """One row per dataset from its normalisation (:class:`codemae_cli.data.stats.BandNorm`,
        optical bands then SAR bands) and its ``{"optical": [lo, hi], "sar": [lo, hi]}``:
        the exact inverse of that normalisation, divided by the range."""
        scales, offsets = [], []
        for norm, rng in zip(norms, ranges, strict=True):
            std, mean = norm.std.astype(np.float64), norm.mean.astype(np.float64)
            lo, span = np.empty_like(mean), np.empty_like(mean)
            for sl, modality in ((slice(0, optical_bands), "optical"), (slice(optical_bands, None), "sar")):
                a, b = (float(v) for v in rng[modality])
                lo[sl], span[sl] = a, b - a
            scales.append(std / span)
            offsets.append((mean - lo) / span)
        return cls(np.asarray(scales, dtype=np.float32), np.asarray(offsets, dtype=np.float32), int(optical_bands))

    @classmethod
    def from_sources(cls, sources: Sequence, ranges: Optional[Sequence[Optional[dict]]] = None) -> SourceScale:
        """From the dataset sources of :class:`codemae_cli.data.dataset.PairedChips` (their
        ``norm``, ``meta``, ``root``, ``n_opt``). ``ranges``: as :func:`sources_ranges` takes them.
        The normalisation undone is the dataset's stats in source units (SAR in dB): what a
        normalised value means, whatever units the shards store it in."""
        return cls.from_norms([src.norm for src in sources], sources_ranges(sources, ranges), int(sources[0].n_opt))


def sources_ranges(sources: Sequence, ranges: Optional[Sequence[Optional[dict]]] = None) -> list[dict]:
    """Per dataset source, ``{"optical": [lo, hi], "sar": [lo, hi]}``: the one given in ``ranges``
    (a resumed run keeps those its checkpoint recorded), else the one its metadata records."""
    ranges = list(ranges) if ranges is not None else [None] * len(sources)
    return [r if r is not None else dataset_source_ranges(src.meta, f"'{src.root}'")
            for src, r in zip(sources, ranges, strict=True)]


__all__ = ["SourceScale", "dataset_source_ranges", "optical_range_rule", "read_source_range", "sar_range_rule", "source_range_meta",
           "source_ranges", "sources_ranges"]
