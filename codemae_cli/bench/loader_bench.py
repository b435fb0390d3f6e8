"""Loader benchmark: pairs/s delivered from memory-mapped shards, one worker and scaling.

    codemae bench loader [--dataset DIR] [--workers 0,1,2,4] [--img-size 224]

Without ``--dataset`` a synthetic prepared dataset (random optical/SAR chips in the exact
``codemae prepare`` format) is written to a temporary directory first. The baseline in the
same run is the raw memmap read of whole chips (no crop, resize, normalisation): the ceiling
the augmentation pipeline is compared against.
"""

from __future__ import annotations

import json
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from codemae_cli.errors import UserError


def make_synthetic_dataset(root, n_chips: int = 64, tile: int = 256, optical_bands: int = 3,
                           sar_bands: int = 2, labels: bool = False, paired: bool = True,
                           n_val: int = 0, seed: int = 0, nodata_fraction: float = 0.0,
                           shard_size: int = 1024) -> Path:
    """Write a random dataset in the ``codemae prepare`` format (docs/architecture.md, 1).

    Optical chips look like 8-bit reflectance, SAR like dB backscatter; ``nodata_fraction`` of
    each chip's rows are NaN in the SAR. Stats are computed from the train chips. For tests and
    benchmarks only: the chips have no real content.
    """
    import geopandas as gpd
    from shapely.geometry import box

    from codemae_cli import __version__
    from codemae_cli.data.shards import FORMAT, FORMAT_VERSION, ShardWriter, shard_name

    root = Path(root)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    writer = ShardWriter(root / "shards", tile=tile, optical_bands=optical_bands, sar_bands=sar_bands,
                         labels=labels, shard_size=shard_size, prefix="part")
    rows = []
    res = 4.5
    per_row = max(1, int(np.ceil(np.sqrt(n_chips))))
    opt_sum = np.zeros(optical_bands)
    opt_sq = np.zeros(optical_bands)
    sar_sum = np.zeros(sar_bands)
    sar_sq = np.zeros(sar_bands)
    opt_n = 0
    sar_n = np.zeros(sar_bands)
    yy, xx = np.mgrid[0:tile, 0:tile].astype(np.float32) / tile
    for i in range(n_chips):
        split = "val" if i >= n_chips - n_val else "train"
        # Smooth structure plus noise so crops of different chips differ visibly.
        phase = rng.uniform(0, 6.28, size=3)
        base = np.sin(6 * xx + phase[0]) * np.cos(5 * yy + phase[1])
        opt = np.stack([80 + 60 * base + rng.normal(0, 10, (tile, tile)) + 20 * b for b in range(optical_bands)])
        sar = np.stack([-12 + 4 * base + rng.normal(0, 2, (tile, tile)) - 5 * b for b in range(sar_bands)])
        opt = opt.astype(np.float32)
        sar = sar.astype(np.float32)
        if nodata_fraction > 0:
            sar[:, : int(tile * nodata_fraction)] = np.nan
        lab = (base > 0).astype(np.uint8) if labels else None
        if labels:
            lab[:2] = 255
        part, offset = writer.write(opt, sar, lab)
        r, c = divmod(i, per_row)
        x0, y0 = 500000 + c * tile * res, 5750000 - r * tile * res
        rows.append({"chip_id": f"synth_{i:05d}", "geometry": box(x0, y0 - tile * res, x0 + tile * res, y0),
                     "scene_id": "synth", "optical_src": "synthetic", "sar_src": "synthetic",
                     "row": r * tile, "col": c * tile, "valid_optical": 1.0,
                     "valid_sar": float(np.isfinite(sar).all(0).mean()), "valid_joint": float(np.isfinite(sar).all(0).mean()),
                     "split": split, "shard": part, "offset": offset})
        if split == "train":
            opt_sum += opt.reshape(optical_bands, -1).sum(1)
            opt_sq += (opt.astype(np.float64) ** 2).reshape(optical_bands, -1).sum(1)
            opt_n += tile * tile
            s = sar.reshape(sar_bands, -1)
            ok = np.isfinite(s)
            sar_sum += np.where(ok, s, 0).sum(1)
            sar_sq += np.where(ok, s.astype(np.float64) ** 2, 0).sum(1)
            sar_n += ok.sum(1)
    parts = writer.close()
    for k, part in enumerate(parts):
        for modality, path in part["files"].items():
            Path(path).rename(root / "shards" / shard_name(modality, k))
    opt_mean = opt_sum / max(opt_n, 1)
    sar_mean = sar_sum / np.maximum(sar_n, 1)
    stats = {
        "optical": {"mean": opt_mean.tolist(), "std": np.sqrt(np.maximum(opt_sq / max(opt_n, 1) - opt_mean**2, 1e-12)).tolist()},
        "sar": {"mean": sar_mean.tolist(), "std": np.sqrt(np.maximum(sar_sq / np.maximum(sar_n, 1) - sar_mean**2, 1e-12)).tolist()},
    }
    crs = "EPSG:32631"
    gdf = gpd.GeoDataFrame(rows, geometry="geometry", crs=crs)
    gdf.to_file(root / "index.gpkg", layer="chips", driver="GPKG")
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "codemae_version": __version__,
        "tile": tile, "stride": tile, "crs": gdf.crs.to_wkt(), "res": [res, res], "ref": "optical",
        "paired": paired,
        "optical": {"bands": [f"B{b + 1}" for b in range(optical_bands)], "count": optical_bands,
                    "source_dtype": "uint8", "nodata": None},
        "sar": {"bands": ["VV", "VH", "HH", "HV"][:sar_bands] if sar_bands <= 4 else [f"S{b + 1}" for b in range(sar_bands)],
                "count": sar_bands, "scale": "db", "input_scale": "db"},
        "labels": {"source": "synthetic", "classes": {"0": "background", "1": "foreground"}, "ignore_index": 255}
        if labels else None,
        "stats": stats,
        "splits": {"train": n_chips - n_val, "val": n_val, "test": 0},
        "scenes": [{"scene_id": "synth", "optical": "synthetic", "sar": "synthetic", "labels": None}],
        "dropped": {}, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "synthetic": True,
    }
    (root / "metadata.json").write_text(json.dumps(meta, indent=2))
    return root


def _children_cpu_seconds() -> float | None:
    """CPU seconds used so far by the live child processes (loader workers); Linux only."""
    import os

    me = os.getpid()
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for pid in entries:
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:  # field 4: parent pid; 14/15: user/system ticks
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _time_loader(loader, max_batches: int, warmup: int) -> tuple[float, float | None, int]:
    """(pairs/s wall, pairs per CPU-second of the process(es) doing the loading, pairs).

    The CPU-second rate is what one uncontended core would deliver; on a shared machine the
    wall-clock rate understates it.
    """
    it = iter(loader)
    n_items = 0
    for _ in range(warmup):
        next(it)
    workers = loader.num_workers > 0
    t0, c0 = time.perf_counter(), (_children_cpu_seconds() if workers else time.process_time())
    for _ in range(max_batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        n_items += int(batch["optical"].shape[0])
    dt = time.perf_counter() - t0
    c1 = _children_cpu_seconds() if workers else time.process_time()
    # Workers keep prefetching while the main process times: their CPU covers a few extra batches.
    cpu_rate = None if (c0 is None or c1 is None or c1 <= c0) else n_items / (c1 - c0)
    return n_items / max(dt, 1e-9), cpu_rate, n_items


def _raw_memmap_rate(chips, n: int) -> float:
    """Baseline: whole-chip copies straight from the memory maps (no augmentation)."""
    src = chips.sources[0]
    count = min(n, len(src.rows))
    for p in range(count):  # warm the page cache and the maps
        np.array(src.array("optical", int(src.shard[p]))[int(src.offset[p])])
    t0 = time.perf_counter()
    done = 0
    while done < n:
        p = done % len(src.rows)
        k, off = int(src.shard[p]), int(src.offset[p])
        np.array(src.array("optical", k)[off])
        np.array(src.array("sar", k)[off])
        done += 1
    return done / max(time.perf_counter() - t0, 1e-9)


def _device_augment_rate(chips, batch_size: int, device: str, reps: int = 10) -> float:
    """Pairs/s of the batched on-device crop/resize/flip/normalise (``augment_on=device``)."""
    import torch
    from torch.utils.data import default_collate

    from codemae_cli.data.dataset import DeviceAugment

    aug = DeviceAugment(chips, device)
    batch = default_collate([chips[(i % len(chips), i)] for i in range(batch_size)])
    batch = {k: v.to(device) for k, v in batch.items()}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    aug(batch)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        aug(batch)
    sync()
    return reps * batch_size / max(time.perf_counter() - t0, 1e-9)


def run_loader_bench(dataset: str | None = None, workers: list[int] | None = None, img_size: int = 224,
                     batch_size: int = 64, batches: int = 30, chips: int = 256, tile: int = 256,
                     modes: tuple[str, ...] = ("loader", "device"), echo=print) -> dict:
    """Measure pairs/s from shards for each augmentation mode and worker count.

    ``loader`` mode: crop, flip, normalise and resize in the worker (what a CPU-only run uses);
    ``device`` mode: the worker only copies tiles, the batched augmentation runs on the training
    device (timed separately). Returns the numbers it printed.
    """
    import os

    import torch

    from codemae_cli.data.dataset import PairedBatchSampler, PairedChips, build_loader

    workers = workers if workers is not None else [0, 1, 2, 4]
    if any(w < 0 for w in workers):
        raise UserError("--workers must list non-negative integers")
    tmp = None
    if dataset is None:
        tmp = tempfile.TemporaryDirectory(prefix="codemae-loader-bench-")
        echo(f"writing a synthetic dataset of {chips} chips ({tile} px, 3 optical + 2 SAR bands) to {tmp.name} ...")
        root = make_synthetic_dataset(Path(tmp.name) / "data", n_chips=chips, tile=tile, shard_size=256)
    else:
        root = Path(dataset)
    try:
        torch.set_num_threads(1)  # one core per loader process, like a worker
        base_chips = PairedChips([root], "train", img_size=img_size, train=True)
        bs = min(batch_size, len(base_chips))
        echo(f"dataset {root}: {len(base_chips)} train chips, tile {base_chips.sources[0].tile} px -> {img_size} px "
             f"crops, batch {bs}, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
        base = _raw_memmap_rate(base_chips, n=max(200, bs * 4))
        echo(f"baseline  raw memmap whole-chip read, no augmentation: {base:,.0f} pairs/s")
        results: dict = {"baseline_raw_pairs_per_s": base}
        for mode in modes:
            ds = PairedChips([root], "train", img_size=img_size, train=True, augment_on=mode)
            results[mode] = {}
            what = ("crop+flip+normalise+resize in the loader" if mode == "loader"
                    else "tile copy in the loader; augmentation on the device")
            for w in workers:
                sampler = PairedBatchSampler(ds, bs, shuffle=True, seed=0,
                                             num_samples=max(len(ds), bs * (batches + 4 + 2 * w)))
                loader = build_loader(ds, sampler, num_workers=w, pin_memory=False, prefetch_factor=4)
                rate, cpu_rate, n = _time_loader(loader, batches, warmup=max(2, 2 * w))
                del loader
                results[mode][w] = {"pairs_per_s": rate, "pairs_per_cpu_s": cpu_rate}
                label = "main process" if w == 0 else f"{w} worker{'s' if w > 1 else ''}"
                who = "main-process" if w == 0 else "worker"
                extra = f", {cpu_rate:,.0f} pairs per {who} CPU-second" if cpu_rate else ""
                echo(f"{mode:<7} {label:>14}: {rate:,.0f} pairs/s ({n} pairs{extra}; {what})")
            if mode == "device":
                dev = "cuda" if torch.cuda.is_available() else "cpu"
                rate = _device_augment_rate(ds, bs, dev)
                results["device_augment_pairs_per_s"] = rate
                echo(f"device  augmentation on {dev}: {rate:,.0f} pairs/s (batched roi_align, batch {bs})")
        return results
    finally:
        if tmp is not None:
            tmp.cleanup()


__all__ = ["make_synthetic_dataset", "run_loader_bench"]
