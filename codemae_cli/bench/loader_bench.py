"""Loader benchmark: pairs/s delivered from memory-mapped shards, one worker and scaling.

    codemae bench loader [--dataset DIR] [--workers 0,1,2,4] [--img-size 224]

Without ``--dataset`` a synthetic prepared dataset (random optical/SAR chips in the exact
``codemae prepare`` format: uint8 optical with its validity bits, SAR in 1/256 dB counts) is written to
a temporary directory first. The baseline in the same run is the raw memmap read of whole chips
(no crop, resize, normalisation): the ceiling the augmentation pipeline is compared against.

No TorchGeo-shaped baseline is printed: it would need TorchGeo (or a GeoTIFF-window reader
written here to imitate it) as a dependency. The measured comparison and its settings are in
docs/performance.md.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from codemae_cli.errors import UserError


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


PREFETCH = 4  # batches in flight per worker


def _warmup_batches(workers: int, prefetch: int) -> int:
    """Batches served before timing: 2, plus for each worker as many as it has reusable batch
    buffers, so the timing sees the steady state where a worker reuses its shared-memory
    buffers instead of the one-off first touch of new ones."""
    from codemae_cli.data.dataset import pool_slots

    return 2 + workers * pool_slots(prefetch)


def _raw_memmap_rate(chips, n: int) -> float:
    """Baseline: whole-chip copies straight from the memory maps (no augmentation)."""
    src = chips.sources[0]
    count = min(n, len(src.rows))
    for p in range(count):  # warm the page cache and the maps
        np.array(src.maps.array("optical", int(src.shard[p]))[int(src.offset[p])])
    t0 = time.perf_counter()
    done = 0
    while done < n:
        p = done % len(src.rows)
        k, off = int(src.shard[p]), int(src.offset[p])
        np.array(src.maps.array("optical", k)[off])
        np.array(src.maps.array("sar", k)[off])
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

    from codemae_cli.bench.synthetic import write_synthetic_dataset
    from codemae_cli.data.dataset import PairedBatchSampler, PairedChips, build_loader

    workers = workers if workers is not None else [0, 1, 2, 4]
    if any(w < 0 for w in workers):
        raise UserError("--workers must list non-negative integers")
    tmp = None
    if dataset is None:
        tmp = tempfile.TemporaryDirectory(prefix="codemae-loader-bench-")
        echo(f"writing a synthetic dataset of {chips} chips ({tile} px, 3 uint8 optical + 2 SAR bands in 1/256 dB) "
             f"to {tmp.name} ...")
        root = write_synthetic_dataset(Path(tmp.name) / "data", n_chips=chips, tile=tile, shard_size=256)
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
        echo(f"timing {batches} batches after {_warmup_batches(0, PREFETCH)} warm-up batches in the main process, "
             f"{_warmup_batches(1, PREFETCH)} with 1 worker, +{_warmup_batches(1, PREFETCH) - 2} per further worker "
             "(until each worker's reusable batch buffers exist)")
        results: dict = {"baseline_raw_pairs_per_s": base}
        for mode in modes:
            ds = PairedChips([root], "train", img_size=img_size, train=True, augment_on=mode)
            results[mode] = {}
            what = ("crop+flip+normalise+resize in the loader" if mode == "loader"
                    else "tile copy in the loader; augmentation on the device")
            for w in workers:
                warmup = _warmup_batches(w, PREFETCH)
                sampler = PairedBatchSampler(ds, bs, shuffle=True, seed=0,
                                             num_samples=max(len(ds), bs * (batches + warmup + PREFETCH * w + 2)))
                loader = build_loader(ds, sampler, num_workers=w, pin_memory=False, prefetch_factor=PREFETCH)
                rate, cpu_rate, n = _time_loader(loader, batches, warmup=warmup)
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


__all__ = ["run_loader_bench"]
