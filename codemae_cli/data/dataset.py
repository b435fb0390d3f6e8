"""Torch datasets over prepared chips (``codemae prepare`` output), for pretraining and fine-tuning.

    chips = PairedChips([PreparedDataset("data/a"), PreparedDataset("data/b")], "train", 224)
    sampler = PairedBatchSampler(chips, batch_size=128, weights=[2, 1], seed=0,
                                 rank=dist.rank, world_size=dist.world_size)
    loader = build_loader(chips, sampler, num_workers=4, pin_memory=True)
    for epoch in ...: sampler.set_epoch(epoch); for batch in loader: ...

Each item is a dict of tensors: ``optical`` (Co,H,W) and ``sar`` (Cs,H,W) float32 normalised with
their dataset's per-band stats (NaN -> 0 after normalisation), ``valid`` (H,W) bool (both
modalities valid), ``label`` (H,W) int64 with 255 = ignore (``with_labels``), ``dataset`` (int64),
``paired`` (bool) and ``index`` (int64, global index).

The random crop + flip of a pair is IDENTICAL for optical, SAR and label: the three are cut from
the same window and resized with the same weights. Randomness is drawn from a per-sample seed
that the batch sampler derives from (seed, epoch, position), never from worker RNG state, so a
run is reproducible whatever the number of workers and resumes exactly mid-epoch.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from codemae_cli.data.shards import SAR_NODATA
from codemae_cli.data.stats import BandNorm
from codemae_cli.errors import UserError

IGNORE_INDEX = 255
_MASK64 = 2**64 - 1


def _mix(*values: int) -> int:
    """Hash integers into one 63-bit seed (splitmix64 steps); cheap and well distributed."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        x ^= x >> 31
        x = x * 0x94D049BB133111EB & _MASK64
        x ^= x >> 29
    return x & (2**63 - 1)


class SampleDraws:
    """Uniform draws from a counter-based hash of one sample's seed (splitmix64 of
    ``(seed, k)``): the part of ``np.random.Generator`` the augmentation uses, without
    building a generator per sample (which costs more than the draws)."""

    __slots__ = ("seed", "n")

    def __init__(self, seed: int):
        self.seed, self.n = int(seed), 0

    def random(self) -> float:
        """Uniform in [0, 1) with 53 random bits."""
        self.n += 1
        return (_mix(self.seed, self.n) >> 10) / 9007199254740992.0

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.random()

    def integers(self, low: int, high: int) -> int:
        """Uniform integer in [low, high)."""
        return low + min(int(self.random() * (high - low)), high - low - 1)


def open_datasets(datasets: Sequence) -> list:
    """PreparedDataset objects from paths (or PreparedDataset objects, passed through)."""
    from codemae_cli.data.shards import PreparedDataset

    out = []
    for d in datasets:
        if isinstance(d, (str, os.PathLike)):
            p = Path(d)
            if not p.exists():
                raise UserError(f"dataset directory '{p}' does not exist (run `codemae prepare` first)")
            if not p.is_dir():
                raise UserError(f"dataset '{p}' is not a directory written by `codemae prepare`")
            d = PreparedDataset(p)
        out.append(d)
    return out


def random_resized_crop_params(rng, height: int, width: int,
                               scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a RandomResizedCrop window (torchvision's algorithm); ``rng`` is a
    :class:`SampleDraws` or an ``np.random.Generator``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: the largest centred window within the ratio range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _Source:
    """What a worker needs of one prepared dataset: shard paths, row lookup, stats. Picklable."""

    def __init__(self, ds, split: str, with_labels: bool):
        self.root = Path(ds.root)
        meta = ds.meta
        self.meta = meta
        self.paired = bool(meta.get("paired", True))
        self.tile = int(meta["tile"])
        rows = np.asarray(ds.indices(split), dtype=np.int64)
        self.rows = rows
        self.shard = ds.shard_column[rows]
        self.offset = ds.offset_column[rows]
        # Chips valid everywhere in both modalities (most of them) skip every nodata test.
        self.whole = self._whole(ds.index, rows)
        self.layout = ds.layout
        stats = meta.get("stats") or {}
        try:
            norm = BandNorm.from_stats(stats["optical"]).concat(BandNorm.from_stats(stats["sar"]))
        except (KeyError, TypeError, ValueError):
            raise UserError(f"dataset '{self.root}' has no per-band stats in metadata.json; re-run `codemae prepare`") from None
        self.n_opt = int(meta["optical"]["count"])
        self.n_sar = int(meta["sar"]["count"])
        if norm.bands != self.n_opt + self.n_sar:
            raise UserError(f"dataset '{self.root}' stats do not match its band counts")
        self.norm = norm  # in source units (SAR in dB), optical bands then SAR bands
        # Normalisation in STORED units (fixed-point SAR counts, integer optical), so the loader and
        # DeviceAugment normalise what they copy out of the maps without decoding it first:
        # (q * step - mean) / std == (q - mean / step) * (step / std).
        step = np.ones(norm.bands, np.float64)
        step[self.n_opt:] = self.layout.sar_step
        self.mean = (norm.mean / step).astype(np.float32)
        self.inv_std = (norm.scale * step).astype(np.float32)
        self.with_labels = with_labels
        if with_labels and not meta.get("labels"):
            raise UserError(f"dataset '{self.root}' has no labels (prepare it with --labels)")
        self.maps = ds.maps  # the dataset's per-process shard memory maps

    @staticmethod
    def _whole(index, rows: np.ndarray) -> np.ndarray:
        if "valid_optical" not in index or "valid_sar" not in index:
            return np.zeros(len(rows), dtype=bool)
        return ((index["valid_optical"].to_numpy(dtype=np.float64) >= 1.0)
                & (index["valid_sar"].to_numpy(dtype=np.float64) >= 1.0))[rows]

    def optical_invalid(self, k: int, off: int, rows: slice, cols: slice) -> np.ndarray | None:
        """(h, w) bool, True where the optical crop is nodata, from the packed validity bits
        (integer shards); None for float shards, whose nodata is NaN."""
        if not self.layout.optical_mask:
            return None
        bits = np.unpackbits(self.maps.array("optical_valid", k)[off, rows], axis=-1, count=self.tile)
        return bits[:, cols] == 0

    def sar_invalid(self, k: int, off: int, rows: slice, cols: slice) -> np.ndarray | None:
        """(Cs, h, w) bool, True where the SAR crop is nodata, for fixed-point shards; None for
        float shards, whose nodata is NaN."""
        if not self.layout.sar_fixed_point:
            return None
        return self.maps.array("sar", k)[off, :, rows, cols] == SAR_NODATA


def _fill_nodata(src: _Source, k: int, off: int, rows: slice, cols: slice, x: np.ndarray) -> np.ndarray:
    """Set the nodata of the normalised crop ``x`` (C, h, w) to 0 (the band's mean) in place:
    NaN of float shards, the validity bits of integer optical, the sentinel of fixed-point SAR.
    Returns the pair's validity (h, w): both modalities valid."""
    co = src.n_opt
    bad = ~np.isfinite(x)
    bad_opt = src.optical_invalid(k, off, rows, cols)
    if bad_opt is not None:
        bad[:co] |= bad_opt
    bad_sar = src.sar_invalid(k, off, rows, cols)
    if bad_sar is not None:
        bad[co:] |= bad_sar
    x[bad] = 0.0
    return ~(bad[:co].any(0) | bad[co:].any(0))


def _lanes(a: np.ndarray):
    """A C-contiguous float32 (n, H, L) array as the channels-last (n, L, H, 1) tensor on the same
    memory: torch's channels-last bilinear kernel then interpolates along H with the L values of
    a row as vector lanes, where its planar kernel computes one output value at a time."""
    import torch

    n, H, L = a.shape
    return torch.from_numpy(a).as_strided((n, L, H, 1), (H * L, 1, L, L))


def _resize_rows(src: np.ndarray, dst: np.ndarray) -> None:
    """Bilinear resize (``align_corners=False``) of axis 1 of ``src`` (n, H, L) into ``dst`` (n, H2, L)."""
    import torch

    torch._C._nn.upsample_bilinear2d(_lanes(src), [dst.shape[1], 1], False, None, None, out=_lanes(dst))


class _Window(NamedTuple):
    dataset: int
    src: _Source
    shard: int
    offset: int
    box: tuple[int, int, int, int]  # top, left, h, w
    flip: bool
    whole: bool  # valid everywhere in both modalities (from the index)


class PairedChips:
    """Optical/SAR(/label) chips of one split of one or several prepared datasets.

    A torch map-style dataset: ``chips[i]`` (global index, augmentation seeded from
    ``(seed, epoch, i)``) or ``chips[(i, sample_seed)]`` (what :class:`PairedBatchSampler` yields).
    ``train=False`` is deterministic: the whole chip resized to ``img_size``, no flip.
    ``augment_on="device"``: items are the raw tiles with their crop window (``box``) and
    ``flip`` flag instead; :class:`DeviceAugment` applies the same augmentation to the batch on
    the training device (needs one tile size across datasets).
    """

    def __init__(self, datasets: Sequence, split: str = "train", img_size: int = 224,
                 crop_scale=(0.2, 1.0), hflip: bool = True, train: bool = True, with_labels: bool = False,
                 ratio=(3 / 4, 4 / 3), seed: int = 0, augment_on: str = "loader"):
        if not datasets:
            raise UserError("no datasets given (set data.datasets to one or more `codemae prepare` outputs)")
        opened = open_datasets(datasets)
        self.split = split
        self.img_size = int(img_size)
        self.crop_scale = tuple(float(s) for s in crop_scale)
        self.ratio = tuple(float(r) for r in ratio)
        self.hflip = bool(hflip)
        self.train = bool(train)
        self.with_labels = bool(with_labels)
        self.seed = int(seed)
        self.epoch = 0
        if augment_on not in ("loader", "device"):
            raise UserError(f"augment_on must be 'loader' or 'device', not {augment_on!r}")
        self.augment_on = augment_on
        self.sources = [_Source(ds, split, with_labels) for ds in opened]
        first = self.sources[0]
        for s in self.sources[1:]:
            if s.n_opt != first.n_opt:
                raise UserError(f"datasets '{first.root}' and '{s.root}' have different optical band counts "
                                f"({first.n_opt} vs {s.n_opt}); mixed datasets need the same bands")
            if s.n_sar != first.n_sar:
                raise UserError(f"datasets '{first.root}' and '{s.root}' have different SAR band counts "
                                f"({first.n_sar} vs {s.n_sar}); mixed datasets need the same bands")
            for mod in ("optical", "sar"):
                a, b = first.meta[mod].get("bands"), s.meta[mod].get("bands")
                if a and b and list(a) != list(b):
                    warnings.warn(f"{mod} band names differ between '{first.root}' ({a}) and '{s.root}' ({b}); "
                                  "they are mixed by position", stacklevel=2)
        self.sizes = [len(s.rows) for s in self.sources]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        if self.offsets[-1] == 0:
            names = ", ".join(str(s.root) for s in self.sources)
            raise UserError(f"no chips in split '{split}' of {names}")
        self.optical_bands = first.n_opt
        self.sar_bands = first.n_sar
        if augment_on == "device" and len({src.tile for src in self.sources}) > 1:
            raise UserError("augment_on=device needs datasets with the same tile size "
                            f"({', '.join(f'{src.root}: {src.tile}' for src in self.sources)})")

    # ---------------------------------------------------------------------------------------
    def __getstate__(self):  # spawned workers: scratch buffers are per process
        state = self.__dict__.copy()
        state.pop("_scratch_bufs", None)
        return state

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def paired_flags(self) -> list[bool]:
        return [s.paired for s in self.sources]

    def locate(self, index: int) -> tuple[int, int]:
        """Global index -> (dataset number, position within that dataset's split)."""
        d = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return d, int(index - self.offsets[d])

    def chip_id(self, index: int) -> str:
        d, p = self.locate(index)
        src = self.sources[d]
        return str(src.meta.get("name", src.root.name)) + f"#{int(src.rows[p])}"

    def meta_summary(self) -> dict:
        """Bands and stats of the (first) dataset, for checkpoint metadata."""
        m = self.sources[0].meta
        return {
            "bands": {"optical": list(m["optical"].get("bands") or []), "sar": list(m["sar"].get("bands") or [])},
            "stats": m.get("stats"),
            "datasets": [str(s.root) for s in self.sources],
        }

    # ---------------------------------------------------------------------------------------
    def _key(self, key) -> tuple[int, int]:
        if isinstance(key, tuple):
            index, sample_seed = int(key[0]), int(key[1])
        else:
            index = int(key)
            sample_seed = _mix(self.seed, self.epoch, index)
        if not 0 <= index < len(self):
            raise IndexError(f"chip {index} out of range 0..{len(self) - 1}")
        return index, sample_seed

    def __getitem__(self, key) -> dict:
        """Load, crop, flip, normalise and resize one pair (and its label).

        The same code as a batch (:meth:`__getitems__`) of one: item ``j`` of a batch is
        bit-identical to ``chips[key_j]``.
        """
        return self.__getitems__([key])[0]

    def __getitems__(self, keys) -> ChipBatch:
        """A whole batch, written straight into ONE preallocated tensor per output key.

        What ``DataLoader`` calls with a batch's keys (automatic batching): no per-sample
        tensors and no collate copy. In a worker the batch tensors are allocated in shared
        memory up front, so the DataLoader sends them without another copy. Returns a
        :class:`ChipBatch` (a sequence of per-sample dicts, so ``default_collate`` still works);
        :func:`collate_chips` (what :func:`build_loader` uses) passes its tensors through.
        """
        keys = list(keys)
        if not keys:
            raise IndexError("an empty batch")
        parsed = [self._key(k) for k in keys]
        if self.augment_on == "device":
            return self._raw_batch(parsed)
        return self._loader_batch(parsed)

    def _window(self, index: int, sample_seed: int) -> _Window:
        """Where one sample comes from and how it is cropped and flipped."""
        d, p = self.locate(index)
        src = self.sources[d]
        tile = src.tile
        flip = False
        if self.train:
            rng = SampleDraws(sample_seed)
            top, left, h, w = random_resized_crop_params(rng, tile, tile, self.crop_scale, self.ratio)
            flip = self.hflip and bool(rng.random() < 0.5)
        else:
            top, left, h, w = 0, 0, tile, tile
        return _Window(d, src, int(src.shard[p]), int(src.offset[p]), (top, left, h, w), flip, bool(src.whole[p]))

    def _scratch(self, name: str, n: int, dtype) -> np.ndarray:
        """A per-process reusable flat buffer of at least ``n`` items (fresh pages are costly)."""
        cache = self.__dict__.setdefault("_scratch_bufs", {})
        if cache.get("_pid") != os.getpid():  # a forked worker gets its own
            cache.clear()
            cache["_pid"] = os.getpid()
        buf = cache.get(name)
        if buf is None or buf.size < n or buf.dtype != np.dtype(dtype):
            buf = cache[name] = np.empty(n, dtype=dtype)
        return buf[:n]

    def _loader_batch(self, parsed) -> ChipBatch:
        import torch

        B, S = len(parsed), self.img_size
        co, cs = self.optical_bands, self.sar_bands
        spec = [("optical", (B, co, S, S), torch.float32), ("sar", (B, cs, S, S), torch.float32),
                ("valid", (B, S, S), torch.bool)]
        if self.with_labels:
            spec.append(("label", (B, S, S), torch.int64))
        bufs, tag = _batch_buffers(spec)
        valid, label = bufs["valid"], bufs.get("label")
        valid.fill_(True)
        opt_np, sar_np = bufs["optical"].numpy(), bufs["sar"].numpy()
        meta = np.empty((3, B), dtype=np.int64)  # dataset, paired, index
        for j, (index, sample_seed) in enumerate(parsed):
            win = self._window(index, sample_seed)
            meta[:, j] = (win.dataset, win.src.paired, index)
            self._augment_into(win, opt_np[j], sar_np[j], valid[j], label[j] if label is not None else None)
        out = {"optical": bufs["optical"], "sar": bufs["sar"], "valid": valid}
        return self._batch(out, meta, label, tag)

    def _augment_into(self, win: _Window, opt: np.ndarray, sar: np.ndarray, valid, label) -> None:
        """Crop, flip, normalise and resize one pair straight into its batch slots
        ``opt`` (Co, S, S), ``sar`` (Cs, S, S) (numpy views), ``valid`` (S, S) and ``label`` (S, S)."""
        import torch

        S, co = self.img_size, self.optical_bands
        src, k, off = win.src, win.shard, win.offset
        top, left, h, w = win.box
        rows, cols = slice(top, top + h), slice(left, left + w)
        x = self._scratch("x", (co + self.sar_bands) * h * w, np.float32).reshape(-1, h, w)  # (Co+Cs, h, w)
        # Copy out of the map (any stored dtype) and subtract the mean in one pass, then scale in
        # place: normalising before the resize keeps nodata handling exact (filled with the mean).
        np.subtract(src.maps.array("optical", k)[off, :, rows, cols], src.mean[:co, None, None], out=x[:co])
        np.subtract(src.maps.array("sar", k)[off, :, rows, cols], src.mean[co:, None, None], out=x[co:])
        np.multiply(x, src.inv_std[:, None, None], out=x)
        # The index says which chips have nodata at all: masks only for those.
        v = None if win.whole else _fill_nodata(src, k, off, rows, cols, x)                # (h, w)
        resize = (h, w) != (S, S)
        if not resize:
            np.copyto(opt, x[:co, :, ::-1] if win.flip else x[:co])
            np.copyto(sar, x[co:, :, ::-1] if win.flip else x[co:])
        elif h > 1.5 * S or w > 1.5 * S:
            # Antialiasing only pays when shrinking a lot; at <= 1.5x it is invisible and 3x slower.
            xs = np.ascontiguousarray(x[:, :, ::-1]) if win.flip else x
            for part, out in ((xs[:co], opt), (xs[co:], sar)):
                n = part.shape[0]
                torch._C._nn._upsample_bilinear2d_aa(torch.from_numpy(part).view(n, 1, h, w), [S, S], False,
                                                     None, None, out=torch.from_numpy(out).view(n, 1, S, S))
        else:  # one modality at a time: the scratch planes then stay in the core's cache
            self._resize_separable(x[:co], win.flip, opt)
            self._resize_separable(x[co:], win.flip, sar)
        if v is not None:
            vt = torch.from_numpy(np.ascontiguousarray(v[:, ::-1]) if win.flip else v)
            if resize:
                vt = torch.nn.functional.interpolate(vt[None, None].float(), size=(S, S), mode="bilinear",
                                                     align_corners=False)[0, 0] > 0.5
            valid.copy_(vt)                                                               # (S, S)
        if label is not None:
            fcols = slice(left + w - 1, left - 1 if left > 0 else None, -1) if win.flip else cols
            # Fancy indexing of the memmap already copies; np.array makes it writable for torch.
            lab = torch.from_numpy(np.array(src.maps.array("label", k)[off, rows, fcols]))
            if resize:
                lab = torch.nn.functional.interpolate(lab[None, None], size=(S, S), mode="nearest-exact")[0, 0]
            label.copy_(lab)                                                              # (S, S) int64

    def _resize_separable(self, x: np.ndarray, flip: bool, out: np.ndarray) -> None:
        """Bilinear resize (``align_corners=False``, as ``F.interpolate``) of the bands ``x``
        (n, h, w), flipped left-right when ``flip``, into the batch slot ``out`` (n, S, S).

        Two one-axis passes of torch's channels-last kernel (:func:`_resize_rows`), each with
        the rows of a plane as its vector lanes; the flip is folded into the transpose before the
        first pass (a reversed read), and the second pass writes the batch slot directly. About
        half the time of torch's planar kernel here (docs/performance.md); the values agree with
        it to float rounding (a few 1e-7 of the normalised value).
        """
        n, h, w = x.shape
        S = out.shape[-1]
        xt = x.transpose(0, 2, 1)                                                         # (n, w, h) view
        t = self._scratch("t", n * w * h, np.float32).reshape(n, w, h)
        np.copyto(t, xt[:, ::-1] if flip else xt)                                         # columns as rows
        y = self._scratch("y", n * S * h, np.float32).reshape(n, S, h)
        _resize_rows(t, y)                                                                # along the columns
        t = self._scratch("t", n * h * S, np.float32).reshape(n, h, S)
        np.copyto(t, y.transpose(0, 2, 1))                                                # (n, h, S)
        _resize_rows(t, out)                                                              # along the rows

    def _batch(self, out: dict, meta: np.ndarray, label, tag) -> ChipBatch:
        """The per-sample bookkeeping, labels and the worker's buffer tag, added to a batch."""
        out.update(self._meta_tensors(meta))
        if label is not None:
            out["label"] = label
        if tag is not None:
            out[_SLOT_KEY] = tag
        return ChipBatch(out)

    @staticmethod
    def _meta_tensors(meta: np.ndarray) -> dict:
        import torch

        return {
            "dataset": torch.from_numpy(meta[0].copy()),                                  # (B,) int64
            "paired": torch.from_numpy(meta[1] != 0),                                     # (B,) bool
            "index": torch.from_numpy(meta[2].copy()),                                    # (B,) int64
        }

    def _raw_batch(self, parsed) -> ChipBatch:
        """``augment_on="device"``: the whole raw tiles plus their crop window and flip flag.

        One copy out of the memory map per modality and sample, straight into the batch
        tensor; normalisation, crop, resize and flip run batched on the training device
        (:class:`DeviceAugment`).
        """
        import torch

        B = len(parsed)
        T = self.sources[0].tile
        spec = [("optical", (B, self.optical_bands, T, T), torch.float32),                 # (B, Co, T, T)
                ("sar", (B, self.sar_bands, T, T), torch.float32)]                        # (B, Cs, T, T)
        if self.with_labels:
            spec.append(("label", (B, T, T), torch.uint8))                                # (B, T, T)
        bufs, tag = _batch_buffers(spec)
        opt, sar, label = bufs["optical"], bufs["sar"], bufs.get("label")
        opt_np, sar_np = opt.numpy(), sar.numpy()
        lab_np = label.numpy() if label is not None else None
        box = np.empty((B, 4), dtype=np.float32)                                          # x1 y1 x2 y2
        flips = np.empty(B, dtype=bool)
        meta = np.empty((3, B), dtype=np.int64)
        for j, (index, sample_seed) in enumerate(parsed):
            d, src, k, off, (top, left, h, w), flip, whole = self._window(index, sample_seed)
            meta[:, j] = (d, src.paired, index)
            box[j] = (left, top, left + w, top + h)
            flips[j] = flip
            np.copyto(opt_np[j], src.maps.array("optical", k)[off], casting="same_kind")
            np.copyto(sar_np[j], src.maps.array("sar", k)[off], casting="same_kind")
            if not whole:  # integer shards: nodata from the validity bits / sentinel, as NaN for DeviceAugment
                bad_opt = src.optical_invalid(k, off, slice(None), slice(None))
                if bad_opt is not None:
                    opt_np[j][:, bad_opt] = np.nan
                bad_sar = src.sar_invalid(k, off, slice(None), slice(None))
                if bad_sar is not None:
                    sar_np[j][bad_sar] = np.nan
            if lab_np is not None:
                np.copyto(lab_np[j], src.maps.array("label", k)[off], casting="unsafe")
        out = {"optical": opt, "sar": sar, "box": torch.from_numpy(box), "flip": torch.from_numpy(flips)}
        return self._batch(out, meta, label, tag)


def _batch_empty(shape: tuple, dtype):
    """An uninitialised batch tensor: in shared memory inside a DataLoader worker (the batch then
    crosses to the main process without the copy the DataLoader would make), else an ordinary
    numpy-backed one (numpy asks the kernel for huge pages for large arrays: fewer page faults)."""
    import torch

    if torch.utils.data.get_worker_info() is not None:
        numel = math.prod(shape)
        proto = torch.empty(0, dtype=dtype)
        storage = proto._typed_storage()._new_shared(numel, device=proto.device)
        return proto.new(storage).view(shape)
    return torch.from_numpy(np.empty(shape, dtype=torch.empty(0, dtype=dtype).numpy().dtype))


_SLOT_KEY = "_pool_slot"
_POOL = None  # the _SlotPool of this DataLoader worker process (set by build_loader's worker init)


class _SlotPool:
    """Batch buffers a :func:`build_loader` worker (shared memory) or, with no workers, the main
    process reuses instead of allocating fresh ones per batch (first-touch page faults of fresh
    memory cost more than the whole augmentation on some machines).

    A slot is reused only after the main process says the batch it carried is no longer
    referenced: the worker issues a fresh ticket with each batch (tag ``(worker, slot,
    ticket)``) and the main process (:class:`_ChipLoader`) writes that ticket into the shared
    ``board`` once the consumer dropped every reference to the batch. Tickets start at a random
    base per process, so a release from an earlier worker incarnation never matches. Slots never
    released stay busy (a new batch then gets fresh memory): a wrong release cannot happen.
    """

    def __init__(self, board, worker_id: int):
        self.board = board.numpy()  # (n_slots,) int64, shared with the main process
        self.worker_id = int(worker_id)
        self.slots: list = []       # [(spec, {name: tensor}, ticket issued)]
        self.next_ticket = int.from_bytes(os.urandom(6), "little") + 1

    def take(self, spec):
        key = tuple((n, tuple(sh), dt) for n, sh, dt in spec)
        for s, (k, bufs, ticket) in enumerate(self.slots):
            if k == key and int(self.board[s]) == ticket:
                return bufs, self._issue(s, k, bufs)
        bufs = {n: _batch_empty(sh, dt) for n, sh, dt in spec}
        if len(self.slots) < len(self.board):
            s = len(self.slots)
            self.slots.append(None)
            return bufs, self._issue(s, key, bufs)
        return bufs, None

    def _issue(self, s: int, key, bufs):
        ticket = self.next_ticket
        self.next_ticket += 1
        self.slots[s] = (key, bufs, ticket)
        return (self.worker_id, s, ticket)


def _batch_buffers(spec):
    """``({name: tensor}, tag)``: pooled shared-memory buffers inside a :func:`build_loader`
    worker (tag identifies the slot), else fresh ones (tag ``None``)."""
    if _POOL is not None and _POOL_PID == os.getpid():
        return _POOL.take(spec)
    return {n: _batch_empty(sh, dt) for n, sh, dt in spec}, None


_POOL_PID = None
_END = object()  # end of a loader's batches


@contextlib.contextmanager
def _pool_active(pool):
    """Let :func:`_batch_buffers` in this process take buffers from ``pool`` (None: no change)."""
    global _POOL, _POOL_PID
    if pool is None:
        yield
        return
    saved = _POOL, _POOL_PID
    _POOL, _POOL_PID = pool, os.getpid()
    try:
        yield
    finally:
        _POOL, _POOL_PID = saved


class ChipBatch(Sequence):
    """What :meth:`PairedChips.__getitems__` returns: the batch as one dict of tensors
    (``.batch``), seen as a sequence of per-sample dicts (views) so generic collate functions
    still work. :func:`collate_chips` returns ``.batch`` itself (no copy)."""

    __slots__ = ("batch",)

    def __init__(self, batch: dict):
        self.batch = batch

    def __len__(self) -> int:
        return int(self.batch["index"].shape[0])

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(len(self)))]
        if not -len(self) <= j < len(self):
            raise IndexError(j)
        return {k: v[j] for k, v in self.batch.items() if k != _SLOT_KEY}


def collate_chips(data):
    """Collate function of :func:`build_loader`: a :class:`ChipBatch` passes through as its
    batch dict; anything else goes to ``default_collate``."""
    if isinstance(data, ChipBatch):
        return data.batch
    from torch.utils.data import default_collate

    return default_collate(data)


class DeviceAugment:
    """Normalise, crop, resize and flip a batch of raw tiles on its device (``augment_on=device``).

    The CPU loader then only copies tiles out of the memory maps, so one worker feeds thousands
    of pairs/s. Geometry is the loader's: ``roi_align`` with ``aligned=True`` samples the crop
    exactly like bilinear ``interpolate(align_corners=False)`` (adaptive sampling averages when
    shrinking, like antialiasing); optical, SAR and the validity mask go through ONE call, so a
    pair stays identical; labels use nearest (floor of the sample centre).
    """

    def __init__(self, chips: PairedChips, device):
        import torch

        self.img_size = chips.img_size
        self.co = chips.optical_bands
        self.mean = torch.tensor(np.stack([s.mean for s in chips.sources]), device=device)        # (n_ds, C)
        self.inv_std = torch.tensor(np.stack([s.inv_std for s in chips.sources]), device=device)  # (n_ds, C)

    def __call__(self, batch: dict) -> dict:
        import torch
        from torchvision.ops import roi_align

        co, S = self.co, self.img_size
        x = torch.cat([batch["optical"], batch["sar"]], 1).float()                      # (B, C, T, T)
        B = x.shape[0]
        d = batch["dataset"].to(x.device)
        x = (x - self.mean[d][:, :, None, None]) * self.inv_std[d][:, :, None, None]
        bad = ~torch.isfinite(x)
        valid = ~(bad[:, :co].any(1) | bad[:, co:].any(1))                               # (B, T, T)
        x = x.masked_fill(bad, 0.0)
        stack = torch.cat([x, valid[:, None].to(x.dtype)], 1)                             # (B, C+1, T, T)
        box = batch["box"].to(x.device, torch.float32)                                    # (B, 4)
        rois = torch.cat([torch.arange(B, device=x.device, dtype=torch.float32)[:, None], box], 1)
        out = roi_align(stack, rois, output_size=S, spatial_scale=1.0, sampling_ratio=0, aligned=True)
        flip = batch["flip"].to(x.device)[:, None, None, None]
        out = torch.where(flip, out.flip(-1), out)                                        # (B, C+1, S, S)
        res = {k: v for k, v in batch.items() if k not in ("box", "flip")}
        res["optical"] = out[:, :co]
        res["sar"] = out[:, co:-1]
        res["valid"] = out[:, -1] > 0.5
        if "label" in batch:
            lab = batch["label"].to(x.device)
            centres = (torch.arange(S, device=x.device, dtype=torch.float32) + 0.5) / S   # (S,)
            ys = (box[:, 1:2] + centres[None] * (box[:, 3:4] - box[:, 1:2])).floor().long()
            xs = (box[:, 0:1] + centres[None] * (box[:, 2:3] - box[:, 0:1])).floor().long()
            T = lab.shape[-1]
            ys, xs = ys.clamp_(0, T - 1), xs.clamp_(0, T - 1)
            lab = lab[torch.arange(B, device=x.device)[:, None, None], ys[:, :, None], xs[:, None, :]]
            res["label"] = torch.where(flip[:, 0], lab.flip(-1), lab).long()             # (B, S, S)
        return res


class PairedBatchSampler:
    """Batches of ``(index, sample_seed)`` for one rank: weighted mix, pairing-pure, sharded.

    - ``weights`` (one per dataset): share of each dataset in an epoch; ``None`` = by size (every
      chip once per epoch). An epoch has ``num_samples`` items (default: all chips).
    - Every batch holds only paired or only unpaired chips (the model's cross-modal losses need
      the whole batch to agree); all ranks see the same kind at the same step.
    - Each global batch of ``batch_size * world_size`` is split between ranks
      (DistributedSampler-style); ``set_epoch`` reshuffles; ``set_epoch(e, start_batch=k)``
      resumes at batch ``k`` of epoch ``e``.
    - ``drop_last=False`` (the default): every chip of an epoch is served exactly once; the
      last batch of each pairing group is smaller (split evenly between ranks; only when it
      holds fewer chips than there are ranks, a rank gets a repeated chip so none is empty).
      ``drop_last=True``: full batches only; the ``left_out`` chips per epoch that do not fill
      a batch (a different random subset each epoch) are not served, and a warning says how
      many when there are any.
    """

    def __init__(self, chips: PairedChips, batch_size: int, weights: Sequence[float] | None = None,
                 shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False, num_samples: int | None = None):
        if batch_size < 1:
            raise UserError("batch size must be at least 1")
        self.chips = chips
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        sizes = np.asarray(chips.sizes, dtype=np.int64)
        total = int(num_samples) if num_samples else int(sizes.sum())
        if weights is None:
            quotas = sizes.copy() if not num_samples else np.round(sizes / sizes.sum() * total).astype(np.int64)
        else:
            w = np.asarray(weights, dtype=np.float64)
            if len(w) != len(sizes):
                raise UserError(f"{len(w)} dataset weights given for {len(sizes)} datasets")
            if np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
                raise UserError("dataset weights must be non-negative numbers with a positive sum")
            w = np.where(sizes > 0, w, 0.0)
            if w.sum() <= 0:
                raise UserError("every dataset with a positive weight is empty in this split")
            quotas = np.round(w / w.sum() * total).astype(np.int64)
        self.quotas = quotas
        self.epoch = 0
        self.start_batch = 0
        global_batch = self.batch_size * self.world_size
        per_group = {}
        for flag, q in zip(chips.paired_flags, quotas, strict=True):
            per_group[flag] = per_group.get(flag, 0) + int(q)
        if self.drop_last:
            self._n_global = sum(n // global_batch for n in per_group.values())
            self.left_out = sum(n % global_batch for n in per_group.values())
        else:
            self._n_global = sum(math.ceil(n / global_batch) for n in per_group.values())
            self.left_out = 0
        if self._n_global == 0:
            raise UserError(f"the split has {int(sizes.sum())} chips, fewer than one batch of {global_batch} "
                            f"({self.batch_size} per process x {self.world_size} processes); lower the batch size")

    def __len__(self) -> int:
        return self._n_global - self.start_batch

    @property
    def batches_per_epoch(self) -> int:
        return self._n_global

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = int(epoch)
        self.start_batch = max(0, min(int(start_batch), self._n_global))
        self.chips.set_epoch(epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start_batch": self.start_batch}

    def _epoch_batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng(_mix(self.seed, self.epoch, 0xB47C4))
        groups: dict[bool, list[np.ndarray]] = {}
        for d, (flag, q) in enumerate(zip(self.chips.paired_flags, self.quotas, strict=True)):
            n = int(self.chips.sizes[d])
            if q <= 0 or n == 0:
                continue
            if self.shuffle:
                reps = [rng.permutation(n) for _ in range(int(q) // n)]
                rest = int(q) % n
                if rest:
                    reps.append(rng.permutation(n)[:rest])
                local = np.concatenate(reps) if reps else np.empty(0, np.int64)
            else:
                local = np.resize(np.arange(n), int(q))
            groups.setdefault(flag, []).append(local + int(self.chips.offsets[d]))
        global_batch = self.batch_size * self.world_size
        batches = []
        for flag in sorted(groups):
            items = np.concatenate(groups[flag])
            if self.shuffle:
                items = items[rng.permutation(len(items))]
            n_full = len(items) // global_batch
            for b in range(n_full):
                batches.append(items[b * global_batch:(b + 1) * global_batch])
            rest = items[n_full * global_batch:]
            if len(rest) and not self.drop_last:
                if len(rest) < self.world_size:  # every rank needs a chip: repeat the fewest possible
                    rest = np.concatenate([rest, np.resize(items, self.world_size - len(rest))])
                batches.append(rest)
        if self.shuffle:
            order = rng.permutation(len(batches))
            batches = [batches[i] for i in order]
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = self._epoch_batches()
        B = self.batch_size
        for b in range(self.start_batch, len(batches)):
            if len(batches[b]) == B * self.world_size:
                mine = batches[b][self.rank * B:(self.rank + 1) * B]
            else:  # the short last batch of a group: split evenly between the ranks
                mine = np.array_split(batches[b], self.world_size)[self.rank]
            base = b * B * self.world_size + self.rank * B
            yield [(int(i), _mix(self.seed, self.epoch, base + j)) for j, i in enumerate(mine)]


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive numpy/python seeds from torch's per-worker seed."""
    import random

    import torch

    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def _worker_init(worker_id: int, board=None) -> None:
    import torch

    global _POOL, _POOL_PID
    # Resizing runs in each worker: one thread each, or workers fight over cores.
    torch.set_num_threads(1)
    seed_worker(worker_id)
    if board is not None:
        _POOL, _POOL_PID = _SlotPool(board[worker_id], worker_id), os.getpid()


@functools.cache
def _chip_loader_class():
    import sys

    import torch

    # A private torch function: without it (another torch release) buffers are simply not reused.
    _storage_Use_Count = getattr(torch._C, "_storage_Use_Count", None)

    class _ChipLoader(torch.utils.data.DataLoader):
        """A DataLoader that hands pooled batch buffers back once released: the workers' (shared
        memory) or, with ``num_workers=0``, the main process's own (``main_pool``).

        A batch is released when nothing but this loader references its tensors: no other
        Python reference to the tensor objects and no other tensor (view) on their storage.
        """

        def __init__(self, *args, board=None, main_pool: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self._board = board.numpy() if board is not None else None
            # With no workers, __getitems__ runs in this process while this loader fetches.
            self._pool = _SlotPool(board[0], 0) if main_pool and board is not None else None
            self._held: list = []

        def _release(self) -> None:
            keep = []
            for tag, tensors in self._held:
                w, s, ticket = (int(v) for v in tag)
                # Main process: the pool's own buffer tensors (the batch may be pinned copies).
                bufs = tensors if tensors is not None else self._pool.slots[s][1].values()
                # 3 Python refs: the list (or the pool's dict), the loop variable, getrefcount's
                # argument; storage use count 2: the tensor and the temporary storage object.
                if all(sys.getrefcount(t) <= 3 and _storage_Use_Count(t.untyped_storage()._cdata) <= 2
                       for t in bufs):
                    self._board[w, s] = ticket
                else:
                    keep.append((tag, tensors))
                del tensors, bufs
            self._held = keep

        def _hold(self, tag, batch: dict) -> None:
            if self._pool is not None:
                self._held.append((tag, None))
                return
            shared = [v for v in batch.values() if isinstance(v, torch.Tensor) and v.is_shared()]
            if len(shared) == 0:  # pinned copies: the shared buffers are already dropped
                w, s, ticket = (int(v) for v in tag)
                self._board[w, s] = ticket
            else:
                self._held.append((tag, shared))

        def __iter__(self):
            batches = super().__iter__()
            while True:
                self._release()
                with _pool_active(self._pool):
                    batch = next(batches, _END)
                if batch is _END:
                    break
                tag = batch.pop(_SLOT_KEY, None) if isinstance(batch, dict) else None
                if tag is not None and self._board is not None:
                    self._hold(tag, batch)
                yield batch
                del batch
            self._release()

    return _ChipLoader


def pool_slots(prefetch_factor: int) -> int:
    """Reusable batch buffers per :func:`build_loader` worker (or main process, prefetch 0):
    enough for the batches in flight (prefetch) plus those the consumer still holds."""
    return int(prefetch_factor) + 3


def build_loader(chips: PairedChips, batch_sampler: PairedBatchSampler, num_workers: int = 4,
                 pin_memory: bool = True, prefetch_factor: int = 4, persistent_workers: bool = True):
    """A DataLoader over ``chips`` driven by ``batch_sampler`` with seeded, single-thread workers.

    Batches are built whole by :meth:`PairedChips.__getitems__` into buffers reused once the
    consumer has dropped a batch: shared memory in the workers, the main process's own with
    ``num_workers=0`` (3 batches' worth)."""
    import torch

    kwargs = {}
    board = None
    if num_workers > 0:
        kwargs.update(prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
                      worker_init_fn=_worker_init)
    if hasattr(torch._C, "_storage_Use_Count"):
        slots = pool_slots(prefetch_factor if num_workers > 0 else 0)
        board = torch.zeros((max(num_workers, 1), slots), dtype=torch.int64)
        if num_workers > 0:
            board.share_memory_()
            kwargs.update(worker_init_fn=functools.partial(_worker_init, board=board))
    return _chip_loader_class()(
        chips, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate_chips,
        pin_memory=bool(pin_memory) and torch.cuda.is_available(), board=board, main_pool=num_workers == 0,
        **kwargs)


__all__ = [
    "ChipBatch",
    "DeviceAugment",
    "IGNORE_INDEX",
    "PairedBatchSampler",
    "PairedChips",
    "SampleDraws",
    "build_loader",
    "collate_chips",
    "open_datasets",
    "pool_slots",
    "random_resized_crop_params",
]
