"""Whole-scene sliding-window prediction into a georeferenced Cloud-Optimised GeoTIFF.

    summary = predict_scene(model_fn, "scene.tif", None, "mask.tif", window=512, overlap=128,
                            stats=meta["stats"], inputs="optical", class_names=["bg", "building"])

``model_fn(optical, sar) -> logits (B, K, h, w)`` takes normalised inputs (either may be None).

How memory stays bounded by a band of rows of a panel, never by the scene (height or width):
- the scene is cut into vertical panels of ``panel_width // stride`` window columns (a scene
  narrower than one panel is one panel); a panel runs every window of the global window grid
  that touches its columns (windows straddling a panel border run in both panels), so each
  output pixel gets exactly the windows and weights of a whole-width pass;
- within a panel windows are visited in raster order; the pixels of one window row are read as
  one strip of ``window`` rows and the panel's window columns (windowed reads, prefetched in
  background threads while the model runs);
- the blended probabilities live in an accumulator of ``window + stride`` rows by the panel's
  window span on the compute device (a batch may hold windows of two consecutive window rows,
  never three); the weight sum is separable (every window row has the same column windows), so
  it is two global 1-D vectors;
- once no later window can touch a row, the panel's columns of the row are finished: normalised
  by the weight sum, arg-maxed, masked with the input validity, written with a windowed write
  into a tiled temporary GeoTIFF, and the accumulator slides down;
- at the end GDAL copies the temporary file into a COG with overviews beside the output and
  renames it onto the output path, so an error or Ctrl-C leaves nothing at the output path.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from codemae_cli.device import resolve_device
from codemae_cli.errors import UserError
from codemae_cli.infer.windows import WindowGrid, resolve_overlap

Inputs = Literal["optical", "sar", "both"]

#: GDAL block cache (MB) while predicting, unless GDAL_CACHEMAX is set in the environment.
GDAL_CACHE_MB = 256

#: Default output columns per panel: the accumulator spans at most this plus about one window.
PANEL_WIDTH = 4096

#: Probabilities written as uint8 are ``round(p * PROB_SCALE)``; 255 stays free for nodata.
PROB_SCALE = 254


@dataclass
class PredictStats:
    """What an instrumented run observed (used by tests and the benchmark, reported in the summary)."""

    band_rows: int = 0  # rows allocated in the accumulator
    max_open_rows: int = 0  # most rows ever open at once (must stay <= band_rows)
    max_strip_rows: int = 0  # most rows read in one strip
    max_strip_cols: int = 0  # most columns read in one strip (<= the widest panel span)
    strips_read: int = 0
    windows: int = 0  # windows of the global grid
    windows_run: int = 0  # windows through the model (those straddling a panel border count twice)
    batches: int = 0
    rows_written: int = 0  # panel rows written (each scene row once per panel)
    acc_cols: int = 0  # most columns ever allocated in the accumulator (the widest panel span)
    max_open_cols: int = 0  # most accumulator columns a window ever touched (must stay <= acc_cols)
    panels: list[tuple[int, int, int, int]] = field(default_factory=list)  # (x0, x1, p0, p1) per panel
    flushes: list[tuple[int, int]] = field(default_factory=list)  # (first row, n rows) written, per panel


def _norm_stats(stats: dict | None, modality: str, bands: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean/std of a modality as (C, 1, 1) float32, checked against the scene's band count."""
    if stats is None or stats.get(modality) is None:
        return np.zeros((bands, 1, 1), np.float32), np.ones((bands, 1, 1), np.float32)
    mean = np.asarray(stats[modality]["mean"], dtype=np.float32).reshape(-1)
    std = np.asarray(stats[modality]["std"], dtype=np.float32).reshape(-1)
    if mean.size != bands:
        name = "SAR" if modality == "sar" else modality
        raise UserError(f"the {name} scene has {bands} band(s) but the model expects {mean.size}")
    std = np.where(std > 0, std, 1.0).astype(np.float32)  # a constant band must not divide by zero
    return mean.reshape(-1, 1, 1), std.reshape(-1, 1, 1)


def _pad_to(x: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Reflect-pad the last two axes up to (rows, cols): a scene smaller than a window."""
    pr, pc = rows - x.shape[-2], cols - x.shape[-1]
    if pr <= 0 and pc <= 0:
        return x
    pad = [(0, 0)] * (x.ndim - 2) + [(0, max(pr, 0)), (0, max(pc, 0))]
    # numpy's "symmetric" repeats the edge pixel and, unlike "reflect", accepts a 1-pixel axis
    return np.pad(x, pad, mode="symmetric")


def _probs(model_fn, optical, sar, window: int, tta: bool, autocast_dtype):
    """Softmax probabilities (B, K, window, window) float32, averaged over flips with TTA."""
    import torch
    import torch.nn.functional as F

    flips = [(), (-1,), (-2,), (-2, -1)] if tta else [()]
    total = None
    for dims in flips:
        o = optical.flip(dims) if (optical is not None and dims) else optical
        s = sar.flip(dims) if (sar is not None and dims) else sar
        x = o if o is not None else s
        with torch.autocast(device_type=x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model_fn(o, s)
        if logits.ndim != 4:
            raise UserError("the model returns one score per image, not a segmentation map, so it cannot map a scene")
        if logits.shape[-2:] != (window, window):
            # heads that predict at a reduced resolution are upsampled to the window's pixels
            logits = F.interpolate(logits.float(), size=(window, window), mode="bilinear", align_corners=False)
        p = torch.softmax(logits.float(), dim=1)
        if dims:
            p = p.flip(dims)
        total = p if total is None else total + p
    return total / len(flips)


def _colormap(class_colors) -> Optional[dict]:
    if not class_colors:
        return None
    cmap = {}
    for i, color in enumerate(class_colors):
        if color is None:
            continue
        if isinstance(color, str):
            c = color.lstrip("#")
            if len(c) != 6:
                continue
            rgb = tuple(int(c[k : k + 2], 16) for k in (0, 2, 4))
        else:
            rgb = tuple(int(v) for v in list(color)[:3])
        cmap[i] = (*rgb, 255)
    return cmap or None


def predict_scene(
    model_fn: Callable,
    optical_path: str | Path | None = None,
    sar_path: str | Path | None = None,
    out_path: str | Path | None = None,
    *,
    window: int = 256,
    overlap: float | int = 64,
    batch_size: int = 8,
    stats: dict | None = None,
    inputs: Inputs | None = None,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    class_colors: list | None = None,
    device=None,
    tta: bool = False,
    probabilities: str | Path | None = None,
    probabilities_dtype: Literal["uint8", "float32"] = "uint8",
    vectorize: str | Path | None = None,
    min_area: float = 0.0,
    simplify: float = 0.0,
    tags: dict | None = None,
    nodata: int = 255,
    sar_scale: str = "db",
    precision: Literal["auto", "bf16", "fp32"] = "auto",
    cog_blocksize: int = 512,
    overview_resampling: str = "mode",
    progress: bool = False,
    readers: int = 2,
    panel_width: int | None = PANEL_WIDTH,
    instrument: PredictStats | None = None,
) -> dict:
    """Predict a whole scene with ``model_fn`` and write a class-map COG at ``out_path``.

    ``readers``: threads reading strips ahead of the model (each with its own GDAL handles).
    ``panel_width``: about this many output columns per vertical panel (memory grows with it, not with the scene;
    ``None`` = the whole width in one panel). Windows straddling a panel border run twice.
    ``instrument``: a :class:`PredictStats` filled with what the run observed (band sizes, flushes).
    Returns a summary dict (path, size, CRS, nodata, pixels per class, seconds, Mpx/s, ...).
    Raises :class:`UserError` for bad input; on any error nothing is left at the output paths.
    """
    import torch

    from codemae_cli.infer.cog import TiledWriter, check_output_path, remove_quietly, temp_sibling, write_cog
    from codemae_cli.infer.sources import OpticalSource, SarSource

    t0 = time.perf_counter()
    if out_path is None:
        raise UserError("an output path is required")
    out = check_output_path(out_path)
    prob_out = check_output_path(probabilities, "probabilities output") if probabilities else None
    vec_out = check_output_path(vectorize, "vector output") if vectorize else None
    named = [p.resolve() for p in (out, prob_out, vec_out) if p is not None]
    if len(set(named)) != len(named):
        raise UserError("the class map, probabilities and vector outputs must be different files")
    if inputs is None:
        inputs = "both" if (optical_path and sar_path) else ("optical" if optical_path else "sar")
    if inputs not in ("optical", "sar", "both"):
        raise UserError(f"inputs must be optical, sar or both, not '{inputs}'")
    if inputs in ("optical", "both") and not optical_path:
        raise UserError("this model needs an optical scene")
    if inputs in ("sar", "both") and not sar_path:
        raise UserError("this model needs a SAR scene: pass it with --sar")
    if batch_size < 1:
        raise UserError("the batch size must be at least 1")
    if not 0 <= nodata <= 255:
        raise UserError("the class-map nodata value must fit in uint8 (0-255)")
    if probabilities_dtype not in ("uint8", "float32"):
        raise UserError("probabilities can be written as uint8 or float32 only")
    if num_classes is None and class_names:
        num_classes = len(class_names)
    if num_classes is not None and not 1 <= num_classes <= nodata:
        raise UserError(f"class ids must lie below the nodata value {nodata}, so at most {nodata} classes fit")
    if panel_width is not None and panel_width < 1:
        raise UserError("the panel width must be at least 1 pixel")
    if precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"precision must be auto, bf16 or fp32, not '{precision}'")
    dev = resolve_device(device)
    use_bf16 = dev.type == "cuda" and precision in ("auto", "bf16")
    autocast_dtype = torch.bfloat16 if use_bf16 else None
    ov = resolve_overlap(window, overlap)
    st = instrument if instrument is not None else PredictStats()

    sources: dict = {}
    reader_sources: list = []
    tmp_paths: list[Path] = []
    writers: list = []
    pool: ThreadPoolExecutor | None = None
    stack = ExitStack()
    try:
        if "GDAL_CACHEMAX" not in os.environ:
            # GDAL's block cache defaults to 5 % of RAM and would keep every tile of the scene
            # it has read or written until then: cap it so memory does not grow with the scene.
            import rasterio

            stack.enter_context(rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB))
        # ---- inputs on one reference grid -----------------------------------------------------
        if inputs in ("optical", "both"):
            sources["optical"] = OpticalSource(optical_path)
        if inputs in ("sar", "both"):
            ref = sources["optical"].grid if "optical" in sources else None
            sources["sar"] = SarSource(sar_path, scale=sar_scale, ref=ref)
        ref_src = sources["optical"] if "optical" in sources else sources["sar"]
        grid = ref_src.grid
        H, W = grid.height, grid.width
        norm = {m: _norm_stats(stats, m, s.bands) for m, s in sources.items()}
        wg = WindowGrid(H, W, window, ov)
        rows, cols = wg.row_starts, wg.col_starts
        Hp, Wp, band = wg.padded_height, wg.padded_width, wg.band_rows
        st.band_rows = band
        st.windows = len(rows) * len(cols)
        panels = wg.panels(panel_width)
        st.panels = [(pn.x0, pn.x1, pn.p0, pn.p1) for pn in panels]
        windows_total = sum(len(rows) * len(pn.col_starts) for pn in panels)
        cur = {"panel": panels[0]}  # the panel being predicted

        # ---- strips: read by worker threads, a few window rows ahead ---------------------------
        # GDAL datasets must not be shared between threads, so each reader thread opens its own.
        # Strips stay in the file's dtype (uint8 is 4x smaller than float32, on the host and on
        # the way to the device); normalisation happens per batch on the device.
        local = threading.local()
        lock = threading.Lock()

        def thread_sources() -> dict:
            own = getattr(local, "sources", None)
            if own is None:
                own = {}
                if "optical" in sources:
                    own["optical"] = OpticalSource(optical_path)
                if "sar" in sources:
                    own["sar"] = SarSource(sar_path, scale=sar_scale, ref=grid if inputs == "both" else None)
                with lock:
                    reader_sources.extend(own.values())
                local.sources = own
            return own

        def load_strip(ri: int, pn) -> dict:
            r = rows[ri]
            n = min(window, H - r)  # fewer rows only when the scene is shorter than a window
            c0, c1 = pn.p0, min(pn.p1, W)  # p1 > W only for a scene narrower than a window
            out_s: dict = {}
            valid = np.ones((n, c1 - c0), dtype=bool)
            for m, src in thread_sources().items():
                data, ok = src.read_strip(r, n, c0, c1)
                if data.dtype not in (np.uint8, np.int16, np.float32):
                    data = data.astype(np.float32)
                out_s[m] = np.ascontiguousarray(_pad_to(data, window, pn.span))
                valid &= ok
            out_s["valid"] = np.ascontiguousarray(_pad_to(valid, window, pn.span))
            out_s["rows"] = n
            out_s["cols"] = c1 - c0
            return out_s

        n_readers = max(1, min(int(readers), len(rows)))
        pool = ThreadPoolExecutor(max_workers=n_readers, thread_name_prefix="codemae-read")
        futures: dict = {}
        strips: dict = {}

        def strip(ri: int) -> dict:
            if ri not in strips:
                # keep every reader busy: at most n_readers strips in flight beyond this one
                for k in range(ri, ri + n_readers + 1):
                    if k < len(rows) and k not in futures and k not in strips:
                        futures[k] = pool.submit(load_strip, k, cur["panel"])
                s = futures.pop(ri).result()
                st.strips_read += 1
                st.max_strip_rows = max(st.max_strip_rows, s["rows"])
                st.max_strip_cols = max(st.max_strip_cols, s["cols"])
                to_dev = {}
                for m in sources:
                    t = torch.from_numpy(s[m])
                    if dev.type == "cuda":
                        t = t.pin_memory()
                    to_dev[m] = t.to(dev, non_blocking=True)
                to_dev["valid"] = torch.from_numpy(s["valid"]).to(dev, non_blocking=True)
                strips[ri] = to_dev
                # put this strip's validity into the open band (rows shared with the previous
                # strip get the same values again)
                off = rows[ri] - state["top"]
                valid_buf[off : off + window] = to_dev["valid"]
            return strips[ri]

        # ---- accumulator over the open band of rows --------------------------------------------
        state = {"top": 0}
        acc = None  # (K, band, panel span): weighted probabilities, allocated per panel once K is known
        valid_buf = None  # (band, panel span)
        wy = {r: torch.from_numpy(wg.weight_1d(r, Hp)).to(dev) for r in rows}
        wx = {c: torch.from_numpy(wg.weight_1d(c, Wp)).to(dev) for c in cols}
        # Every window row holds the same column windows, so the weight sum is separable:
        # sum_r sum_c wy_r(y) wx_c(x) = Wy(y) * Wx(x). Two 1-D vectors replace a band-sized buffer.
        wy_sum = torch.zeros(Hp, dtype=torch.float32, device=dev)
        wx_sum = torch.zeros(Wp, dtype=torch.float32, device=dev)
        for r in rows:
            wy_sum[r : r + window] += wy[r]
        for c in cols:
            wx_sum[c : c + window] += wx[c]
        norm_dev = {m: (torch.from_numpy(mean).to(dev), torch.from_numpy(std).to(dev)) for m, (mean, std) in norm.items()}
        counts = None
        K = num_classes

        tmp_cls = temp_sibling(out, ".part.tif")
        tmp_paths.append(tmp_cls)
        tag_all = {"codemae_product": "class_map", "nodata": nodata}
        tag_all.update(tags or {})
        if class_names:
            tag_all["class_names"] = json.dumps(list(class_names))
        cls_writer = TiledWriter(
            tmp_cls, grid, 1, "uint8", nodata, tags=tag_all, descriptions=["class"],
            colormap=_colormap(class_colors),
        )
        writers.append(cls_writer)
        prob_writer = None
        tmp_prob = None

        def open_prob_writer(k: int):
            nonlocal prob_writer, tmp_prob
            tmp_prob = temp_sibling(prob_out, ".part.tif")
            tmp_paths.append(tmp_prob)
            names = list(class_names) if class_names else [str(i) for i in range(k)]
            ptags = dict(tag_all, codemae_product="class_probabilities")
            if probabilities_dtype == "uint8":
                ptags["scale"] = f"1/{PROB_SCALE}"
                prob_writer = TiledWriter(tmp_prob, grid, k, "uint8", 255, tags=ptags,
                                          descriptions=[f"p_{n}" for n in names], scales=[1.0 / PROB_SCALE] * k)
            else:
                prob_writer = TiledWriter(tmp_prob, grid, k, "float32", float("nan"), tags=ptags,
                                          descriptions=[f"p_{n}" for n in names])
            writers.append(prob_writer)

        def flush(upto: int) -> None:
            """Finish the panel's rows [top, upto): normalise, arg-max, mask, write; slide the band down."""
            nonlocal counts
            top = state["top"]
            upto = min(upto, Hp)
            n = upto - top
            if n <= 0:
                return
            m = min(upto, H) - top  # padded rows below the scene are never written
            pn = cur["panel"]
            a0, a1 = pn.x0 - pn.p0, pn.x1 - pn.p0  # the panel's own columns in the accumulator
            if m > 0 and acc is not None:
                a = acc[:, :m, a0:a1]
                wts = wy_sum[top : top + m, None] * wx_sum[None, pn.x0 : pn.x1]  # > 0: every pixel is covered
                ok = valid_buf[:m, a0:a1]
                p = a / wts
                cls = p.argmax(dim=0).to(torch.uint8)
                cls = torch.where(ok, cls, torch.full_like(cls, nodata))
                binc = torch.bincount(cls.reshape(-1).to(torch.int64), minlength=256)
                counts = binc if counts is None else counts + binc
                cls_writer.write_rows(top, cls.cpu().numpy(), col=pn.x0)
                if prob_writer is not None:
                    if probabilities_dtype == "uint8":
                        q = torch.round(p * PROB_SCALE).to(torch.uint8)
                        q = torch.where(ok.unsqueeze(0), q, torch.full_like(q, 255))
                    else:
                        q = torch.where(ok.unsqueeze(0), p, torch.full_like(p, float("nan")))
                    prob_writer.write_rows(top, q.cpu().numpy(), col=pn.x0)
                st.rows_written += m
                st.flushes.append((top, m))
            # slide the open band: rows [upto, top + band) move to the top, the rest is cleared
            keep = band - n
            if keep > 0:
                if acc is not None:
                    acc[:, :keep] = acc[:, n:].clone()
                valid_buf[:keep] = valid_buf[n:].clone()
            if acc is not None:
                acc[:, max(keep, 0) :] = 0
            valid_buf[max(keep, 0) :] = False
            state["top"] = upto

        def run_batch(batch: list[tuple[int, int, int]]) -> None:
            nonlocal acc, K
            first_ri = batch[0][0]
            flush(rows[first_ri])  # every window of earlier rows is done: those rows are final
            for ri in [k for k in strips if k < first_ri]:
                del strips[ri]
            top = state["top"]
            xs = {m: [] for m in sources}
            oks = []
            for ri, _r, c in batch:
                s = strip(ri)
                x = c - cur["panel"].p0
                for m in sources:
                    xs[m].append(s[m][:, :, x : x + window])
                oks.append(s["valid"][:, x : x + window])
            ok = torch.stack(oks).unsqueeze(1)  # (B, 1, win, win)
            x_in = {}
            for m in sources:
                mean, std = norm_dev[m]
                x = (torch.stack(xs[m]).float() - mean) / std  # (B, C, win, win)
                x_in[m] = x.masked_fill(~ok, 0.0)  # invalid pixels become the mean: no NaN enters the model
            opt = x_in.get("optical")
            sar = x_in.get("sar")
            with torch.inference_mode():
                p = _probs(model_fn, opt, sar, window, tta, autocast_dtype)  # (B, K, win, win)
            if acc is None:
                if K is not None and p.shape[1] != K:
                    raise UserError(f"the model predicts {p.shape[1]} classes but {K} class names were given")
                K = int(p.shape[1])
                if K > nodata:
                    raise UserError(f"a uint8 class map holds at most {nodata} classes, the model predicts {K}")
                acc = torch.zeros(K, band, cur["panel"].span, dtype=torch.float32, device=dev)
                st.acc_cols = max(st.acc_cols, acc.shape[2])
                if prob_out is not None:
                    open_prob_writer(K)
            p0 = cur["panel"].p0
            for i, (_ri, r, c) in enumerate(batch):
                off, x = r - top, c - p0
                st.max_open_rows = max(st.max_open_rows, off + window)
                st.max_open_cols = max(st.max_open_cols, x + window)
                if off + window > band or x < 0 or x + window > acc.shape[2]:  # never: batching/panel rules
                    raise RuntimeError("window outside the open band of the panel")
                w2 = wy[r][:, None] * wx[c][None, :]  # (win, win) separable taper
                acc[:, off : off + window, x : x + window] += p[i] * w2
            st.batches += 1
            st.windows_run += len(batch)

        def start_panel(pn) -> None:
            """Open a panel: an empty band over its window span, no strips (reads of the last panel are done)."""
            nonlocal acc, valid_buf
            for f in futures.values():
                f.cancel()
            for f in futures.values():
                if not f.cancelled():
                    f.result()  # the previous panel ran all its windows, so normally nothing is left
            futures.clear()
            strips.clear()
            cur["panel"] = pn
            state["top"] = 0
            valid_buf = None
            valid_buf = torch.zeros(band, pn.span, dtype=torch.bool, device=dev)
            if acc is not None and acc.shape[2] == pn.span:
                acc.zero_()
            elif acc is not None:
                acc = None  # free the previous panel's band before allocating this one
                acc = torch.zeros(K, band, pn.span, dtype=torch.float32, device=dev)
                st.acc_cols = max(st.acc_cols, pn.span)

        bar = None
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            bar = Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                           transient=True)
            task = bar.add_task("windows", total=windows_total)
            bar.start()
        try:
            for pn in panels:  # panels outer, row bands inner: the temp GeoTIFF takes writes in any order
                start_panel(pn)
                pending: list[tuple[int, int, int]] = []
                for ri, r in enumerate(rows):
                    for c in pn.col_starts:
                        # a batch spans at most two consecutive window rows: band = window + stride
                        if pending and (len(pending) >= batch_size or ri > pending[0][0] + 1):
                            run_batch(pending)
                            if bar is not None:
                                bar.advance(task, len(pending))
                            pending = []
                        pending.append((ri, r, c))
                if pending:
                    run_batch(pending)
                    if bar is not None:
                        bar.advance(task, len(pending))
                flush(Hp)
        finally:
            if bar is not None:
                bar.stop()
        for w in writers:
            w.close()

        # ---- validity of the result, then COGs, vectors, renames ------------------------------
        counts_np = counts.cpu().numpy() if counts is not None else np.zeros(256, dtype=np.int64)
        n_nodata = int(counts_np[nodata])
        if n_nodata == H * W:
            raise UserError("every pixel of the input scene(s) is nodata, so there is nothing to predict")
        tmp_cog = temp_sibling(out, ".cog.tif")
        tmp_paths.append(tmp_cog)
        write_cog(tmp_cls, tmp_cog, overview_resampling=overview_resampling, blocksize=cog_blocksize)
        tmp_prob_cog = None
        if prob_writer is not None:
            tmp_prob_cog = temp_sibling(prob_out, ".cog.tif")
            tmp_paths.append(tmp_prob_cog)
            write_cog(tmp_prob, tmp_prob_cog, overview_resampling="average", blocksize=cog_blocksize)
        vec_summary = None
        if vec_out is not None:
            from codemae_cli.infer.vectorize import vectorize_classes

            vec_summary = vectorize_classes(tmp_cog, vec_out, class_names=class_names, min_area=min_area,
                                            simplify=simplify)
        os.replace(tmp_cog, out)
        if tmp_prob_cog is not None:
            os.replace(tmp_prob_cog, prob_out)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for w in writers:
            try:
                w.close()
            except Exception:  # closing after an error must not hide the error
                pass
        for s in [*sources.values(), *reader_sources]:
            s.close()
        remove_quietly(*tmp_paths)
        stack.close()

    seconds = time.perf_counter() - t0
    names = list(class_names) if class_names else [str(i) for i in range(K or 0)]
    per_class = {names[i] if i < len(names) else str(i): int(counts_np[i]) for i in range(K or 0)}
    return {
        "path": str(out),
        "bytes": out.stat().st_size,
        "width": W,
        "height": H,
        "crs": grid.crs.to_string(),
        "transform": list(grid.transform)[:6],
        "nodata": nodata,
        "nodata_pixels": n_nodata,
        "pixels_per_class": per_class,
        "num_classes": K,
        "inputs": inputs,
        "window": window,
        "overlap": ov,
        "windows": st.windows,
        "batches": st.batches,
        "band_rows": st.band_rows,
        "device": str(dev),
        "tta": tta,
        "seconds": seconds,
        "mpx_per_s": H * W / 1e6 / max(seconds, 1e-9),
        "probabilities": str(prob_out) if prob_out is not None else None,
        "vectors": vec_summary,
    }


__all__ = ["PANEL_WIDTH", "PROB_SCALE", "PredictStats", "predict_scene"]
