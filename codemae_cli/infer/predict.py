"""Whole-scene sliding-window prediction into a georeferenced Cloud-Optimised GeoTIFF.

    summary = predict_scene(model_fn, "scene.tif", None, "mask.tif", window=512, overlap=128,
                            stats=meta["stats"], inputs="optical", class_names=["bg", "building"])

``model_fn(optical, sar) -> logits (B, K, h, w)`` takes normalised inputs (either may be None).

Stages (each a named piece a newcomer can open on its own):

| stage    | where                                  | what                                                |
|----------|----------------------------------------|-----------------------------------------------------|
| check    | :meth:`PredictRequest.check`           | outputs, inputs, sizes: one sentence on bad input   |
| layout   | ``infer/windows.py`` ``WindowGrid``    | window grid, vertical panels, tapers                |
| read     | ``infer/strips.py`` ``StripReader``    | strips read, normalised, batched, in threads        |
| model    | :func:`window_logits`                  | the model's answers, TTA flips (the model's thread) |
| blend    | ``infer/blend.py`` ``BandAccumulator`` | softmax, tapered sums over an open band of rows, in |
|          | :meth:`ScenePredictor.blend_batch`     | a blend thread (``infer/stage.py`` ``Stage``)       |
| write    | ``infer/writer.py`` ``PredictionWriter`` | class map + probabilities, in a writer thread     |
| publish  | :func:`publish_outputs`                | COG copies, polygons, renames onto the outputs      |

How memory stays bounded by a band of rows of a panel, never by the scene (height or width):
- the scene is cut into vertical panels of ``panel_width // stride`` window columns (a scene
  narrower than one panel is one panel); a panel runs every window of the global window grid
  that touches its columns (windows straddling a panel border run in both panels), so each
  output pixel gets exactly the windows and weights of a whole-width pass;
- within a panel windows are visited in raster order, in batches that span at most two
  consecutive window rows; the pixels of one window row are read as one strip of ``window`` rows
  and the panel's window columns (prefetched by reader threads while the model runs);
- the weighted probability sums live in segments of rows between window-row starts, at most
  ``window + stride`` rows of the panel's window span open at once, on the compute device;
- once no later window can touch a segment, its buffer (the panel's own columns) is handed as
  it is to the writer thread (division by the weight sum, class map, validity mask, windowed
  write into a tiled temporary GeoTIFF);
- at the end GDAL copies the temporary file into a COG with overviews beside the output and
  renames it onto the output path, so an error or Ctrl-C leaves nothing at the output path.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from codemae_cli.errors import UserError
from codemae_cli.infer.windows import WindowGrid, resolve_overlap

Inputs = Literal["optical", "sar", "both"]

#: Batches waiting for the blend stage at most (each holds the model's answers for one batch).
BLEND_DEPTH = 2

#: GDAL block cache (MB) while predicting, unless GDAL_CACHEMAX is set in the environment.
GDAL_CACHE_MB = 256

#: Default output columns per panel: the accumulator spans at most this plus about one window.
#: A scene at most this wide is one panel (no window runs twice).
PANEL_WIDTH = 8192


@dataclass
class PredictStats:
    """What an instrumented run observed (used by tests and the benchmark, reported in the summary)."""

    band_rows: int = 0  # rows a batch can touch at once: window + stride (two consecutive window rows)
    max_open_rows: int = 0  # most rows ever open at once (must stay <= band_rows)
    max_alloc_rows: int = 0  # most rows of the accumulator's segments allocated at once (< band_rows + window)
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


@dataclass
class PredictRequest:
    """A checked prediction request: where the outputs go and how the model is run."""

    out: Path
    prob_out: Path | None
    vec_out: Path | None
    inputs: str  # optical | sar | both
    num_classes: int | None
    nodata: int
    probabilities_dtype: str
    device: object  # torch.device
    autocast_dtype: object  # torch.bfloat16 on CUDA (precision auto/bf16), else None
    window: int
    overlap: int
    batch_size: int
    tta: bool
    panel_width: int | None
    class_names: list[str] | None

    @property
    def modalities(self) -> tuple[str, ...]:
        return {"optical": ("optical",), "sar": ("sar",), "both": ("optical", "sar")}[self.inputs]

    @classmethod
    def check(cls, optical_path, sar_path, out_path, *, inputs, window, overlap, batch_size, tta, nodata,
              probabilities, probabilities_dtype, vectorize, num_classes, class_names, panel_width, precision,
              device) -> PredictRequest:
        """Every cheap check before anything is opened; a bad value is one sentence (UserError)."""
        out, prob_out, vec_out = _output_paths(out_path, probabilities, vectorize)
        inputs = _check_inputs(optical_path, sar_path, inputs)
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
        dev, autocast_dtype = _device_precision(device, precision)
        return cls(out, prob_out, vec_out, inputs, num_classes, nodata, probabilities_dtype, dev, autocast_dtype,
                   window, resolve_overlap(window, overlap), batch_size, tta, panel_width, class_names)


def _output_paths(out_path, probabilities, vectorize) -> tuple[Path, Path | None, Path | None]:
    """The checked class-map, probabilities and vector output paths: writable into existing
    folders, and distinct (not one file, hard links included, nor one inside another)."""
    from codemae_cli.fsutil import check_distinct, check_writable

    if out_path is None:
        raise UserError("an output path is required")
    outputs = [(out_path, "the output"), (probabilities, "the probabilities output"),
               (vectorize, "the vector output")]
    checked = [check_writable(p, what, create_parents=False) if p else None for p, what in outputs]
    if vectorize:
        from codemae_cli.infer.vectorize import check_vector_path

        check_vector_path(vectorize)
    check_distinct(outputs)
    out, prob_out, vec_out = checked
    return out, prob_out, vec_out


def _check_inputs(optical_path, sar_path, inputs: str | None) -> str:
    """The model's inputs (default: the scenes given), each with its scene."""
    if inputs is None:
        inputs = "both" if (optical_path and sar_path) else ("optical" if optical_path else "sar")
    if inputs not in ("optical", "sar", "both"):
        raise UserError(f"inputs must be optical, sar or both, not '{inputs}'")
    if inputs in ("optical", "both") and not optical_path:
        raise UserError("this model needs an optical scene")
    if inputs in ("sar", "both") and not sar_path:
        raise UserError("this model needs a SAR scene: pass it with --sar")
    return inputs


def _device_precision(device, precision: str):
    """The compute device and its autocast dtype (bf16 on CUDA unless fp32 is asked for)."""
    import torch

    from codemae_cli.device import resolve_device

    if precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"precision must be auto, bf16 or fp32, not '{precision}'")
    dev = device if isinstance(device, torch.device) else resolve_device(device)  # once: callers may resolve it
    use_bf16 = dev.type == "cuda" and precision in ("auto", "bf16")
    return dev, torch.bfloat16 if use_bf16 else None


def window_logits(model_fn, optical, sar, tta: bool, autocast_dtype) -> list[tuple[tuple[int, ...], object]]:
    """The model's answer (B, K, h, w) for each flip of the inputs, as ``(flip dims, logits)``
    (one entry without TTA): the model's share of the work, nothing after it."""
    import torch

    flips = [(), (-1,), (-2,), (-2, -1)] if tta else [()]
    outs = []
    for dims in flips:
        o = optical.flip(dims) if (optical is not None and dims) else optical
        s = sar.flip(dims) if (sar is not None and dims) else sar
        x = o if o is not None else s
        with torch.autocast(device_type=x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model_fn(o, s)
        if logits.ndim != 4:
            raise UserError("the model returns one score per image, not a segmentation map, so it cannot map a scene")
        outs.append((dims, logits))
    return outs


def probs_from_logits(outs: list, window: int):
    """Softmax probabilities (B, K, window, window) float32 from :func:`window_logits`' answers,
    flipped back and averaged over the flips."""
    import torch
    import torch.nn.functional as F

    total = None
    for dims, logits in outs:
        if logits.shape[-2:] != (window, window):
            # heads that predict at a reduced resolution are upsampled to the window's pixels
            logits = F.interpolate(logits.float(), size=(window, window), mode="bilinear", align_corners=False)
        p = torch.softmax(logits.float(), dim=1)
        if dims:
            p = p.flip(dims)
        total = p if total is None else total + p
    return total / len(outs) if len(outs) > 1 else total


def window_probs(model_fn, optical, sar, window: int, tta: bool, autocast_dtype):
    """Softmax probabilities (B, K, window, window) float32, averaged over flips with TTA: the
    model and the softmax in one call, on the caller's thread."""
    return probs_from_logits(window_logits(model_fn, optical, sar, tta, autocast_dtype), window)


@dataclass(frozen=True)
class WindowAt:
    """A window of the global grid: its window row index and its top-left pixel."""

    ri: int
    row: int
    col: int


def window_batches(rows: list[int], cols: list[int], batch_size: int) -> Iterator[list[WindowAt]]:
    """Windows in raster order, ``batch_size`` at a time, a batch spanning at most two window rows
    (so the open band is ``window + stride`` rows)."""
    pending: list[WindowAt] = []
    for ri, r in enumerate(rows):
        for c in cols:
            if pending and (len(pending) >= batch_size or ri > pending[0].ri + 1):
                yield pending
                pending = []
            pending.append(WindowAt(ri, r, c))
    if pending:
        yield pending


class ScenePredictor:
    """Drives the panels: strips in, the model on this thread, blending and writing in stages beside it.

    The model's thread only runs the model (:func:`window_logits`); each batch's answers go to the
    blend stage (softmax, flips, tapered sums, finished rows), which hands finished rows to the
    writer stage: three threads in a pipeline, each call in order, so the model never waits for
    the work after it.
    """

    def __init__(self, model_fn: Callable, req: PredictRequest, layout: WindowGrid, panels: list, reader, acc,
                 writer, blend, *, instrument: PredictStats):
        self.model_fn = model_fn
        self.req = req
        self.layout, self.panels = layout, panels
        self.reader, self.acc, self.writer, self.blend = reader, acc, writer, blend
        self.st = instrument

    @classmethod
    def open(cls, model_fn: Callable, req: PredictRequest, scene, temps: list[Path], *, readers: int, tags,
             class_colors, instrument: PredictStats, stack: ExitStack) -> ScenePredictor:
        """Layout, reader threads, blend and writer stages and the accumulator for an open scene
        (closed by ``stack``: the blend stage first, then the writer, then the readers)."""
        from codemae_cli.infer.blend import BandAccumulator
        from codemae_cli.infer.stage import Stage
        from codemae_cli.infer.strips import StripReader
        from codemae_cli.infer.writer import PredictionWriter

        st = instrument
        layout = WindowGrid(scene.grid.height, scene.grid.width, req.window, req.overlap)
        panels = layout.panels(req.panel_width)
        st.band_rows, st.windows = layout.band_rows, len(layout)
        st.panels = [(pn.x0, pn.x1, pn.p0, pn.p1) for pn in panels]
        reader = StripReader(scene, layout, req.device, readers=readers, instrument=st)
        stack.callback(reader.close)
        writer = PredictionWriter(req.out, scene.grid, temps, nodata=req.nodata, tags=tags,
                                  class_names=req.class_names, class_colors=class_colors)
        stack.callback(writer.abort)
        blend = Stage("codemae-blend", depth=BLEND_DEPTH)
        stack.callback(blend.abort)
        acc = BandAccumulator(layout, req.device, instrument=st)
        return cls(model_fn, req, layout, panels, reader, acc, writer, blend, instrument=st)

    def run_panels(self, progress: bool) -> None:
        """Panels outer, row bands inner (the temporary GeoTIFF takes writes in any order); returns
        once every row is blended and handed to the writer."""
        with ExitStack() as bar_stack:
            total = sum(len(self.layout.row_starts) * len(pn.col_starts) for pn in self.panels)
            advance = _progress(progress, total, bar_stack)
            for pn in self.panels:
                self.run_panel(pn, advance)
            self.blend.close()

    def run_panel(self, panel, advance: Callable[[int], None]) -> None:
        self.blend.submit(self.acc.start_panel, panel)
        for batch in self.reader.panel_batches(panel, window_batches(self.layout.row_starts, panel.col_starts,
                                                                     self.req.batch_size)):
            self.run_batch(batch)
            advance(len(batch.windows))
        self.blend.submit(self.finish_rows, self.layout.padded_height)

    def run_batch(self, batch) -> None:
        """One :class:`~codemae_cli.infer.strips.BatchInputs` through the model; its answers to the blend stage."""
        import torch

        with torch.inference_mode():
            outs = window_logits(self.model_fn, batch.x.get("optical"), batch.x.get("sar"), self.req.tta,
                                 self.req.autocast_dtype)
        # only what blending needs travels on: the windows, the new strips' validity, the answers
        valid = [(s.row, s.valid) for s in batch.new_strips]
        self.blend.submit(self.blend_batch, batch.windows, valid, outs)
        self.st.batches += 1
        self.st.windows_run += len(batch.windows)

    def blend_batch(self, windows: list[WindowAt], valid: list, outs: list) -> None:
        """In the blend stage: finish the rows above the batch, place the validity, softmax, blend."""
        import torch

        with torch.inference_mode():
            # every window of earlier window rows is done: the rows above this batch are final
            self.finish_rows(self.layout.row_starts[windows[0].ri])
            for row, ok in valid:
                self.acc.place_valid(row, ok)
            p = probs_from_logits(outs, self.layout.window)
            if self.acc.classes is None:
                self.first_answer(int(p.shape[1]))
            self.acc.add(p, [(w.row, w.col) for w in windows])

    def finish_rows(self, upto: int) -> None:
        """Rows above ``upto`` are final: to the writer."""
        for rows in self.acc.finish(upto):
            self.writer.put(rows)

    def first_answer(self, k: int) -> None:
        """The model's class count is known: check it, allocate the band, open the probabilities."""
        if self.req.num_classes is not None and k != self.req.num_classes:
            raise UserError(f"the model predicts {k} classes but {self.req.num_classes} class names were given")
        if k > self.req.nodata:
            raise UserError(f"a uint8 class map holds at most {self.req.nodata} classes, the model predicts {k}")
        self.acc.allocate(k)
        if self.req.prob_out is not None:
            self.writer.open_probabilities(self.req.prob_out, k, self.req.probabilities_dtype)


def publish_outputs(req: PredictRequest, writer, counts: np.ndarray, temps: list[Path], *,
                    min_area: float, simplify: float, cog_blocksize: int, overview_resampling: str) -> dict | None:
    """COG copies of the temporary files, polygons from the class map, then renames onto the outputs."""
    from codemae_cli.infer.cog import temp_sibling, write_cog

    grid = writer.grid
    if int(counts[req.nodata]) == grid.height * grid.width:
        raise UserError("every pixel of the input scene(s) is nodata, so there is nothing to predict")
    cog = temp_sibling(req.out, ".cog.tif")
    temps.append(cog)
    write_cog(writer.class_tmp, cog, overview_resampling=overview_resampling, blocksize=cog_blocksize)
    prob_cog = None
    if writer.prob_tmp is not None:
        prob_cog = temp_sibling(req.prob_out, ".cog.tif")
        temps.append(prob_cog)
        write_cog(writer.prob_tmp, prob_cog, overview_resampling="average", blocksize=cog_blocksize)
    vectors = None
    if req.vec_out is not None:
        from codemae_cli.infer.vectorize import vectorize_classes

        vectors = vectorize_classes(cog, req.vec_out, class_names=req.class_names, min_area=min_area, simplify=simplify)
    os.replace(cog, req.out)
    if prob_cog is not None:
        os.replace(prob_cog, req.prob_out)
    return vectors


def _progress(enabled: bool, total: int, stack: ExitStack) -> Callable[[int], None]:
    """A progress bar's ``advance(n)`` (a no-op when disabled); the bar stops with ``stack``."""
    if not enabled:
        return lambda n: None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True)
    task = bar.add_task("windows", total=total)
    bar.start()
    stack.callback(bar.stop)
    return lambda n: bar.advance(task, n)


def _gdal_env(stack: ExitStack) -> None:
    if "GDAL_CACHEMAX" not in os.environ:
        # GDAL's block cache defaults to 5 % of RAM and would keep every tile of the scene
        # it has read or written until then: cap it so memory does not grow with the scene.
        import rasterio

        stack.enter_context(rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB))


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
    bands: dict | None = None,
    input_nodata: dict | None = None,
) -> dict:
    """Predict a whole scene with ``model_fn`` and write a class-map COG at ``out_path``.

    ``readers``: threads reading strips ahead of the model (each with its own GDAL handles).
    ``panel_width``: about this many output columns per vertical panel (memory grows with it, not with the scene;
    ``None`` = the whole width in one panel). Windows straddling a panel border run twice.
    ``bands``: per modality, the 1-based bands of the scene the model reads (``--optical-bands`` at prepare).
    ``input_nodata``: per modality, the scene's nodata as ``--nodata-*`` takes it (None: the file's own).
    ``instrument``: a :class:`PredictStats` filled with what the run observed (band sizes, flushes).
    Returns a summary dict (path, size, CRS, nodata, pixels per class, seconds, Mpx/s, ...).
    Raises :class:`UserError` for bad input; on any error nothing is left at the output paths.
    """
    from codemae_cli.infer.cog import remove_quietly
    from codemae_cli.infer.strips import SceneInputs

    t0 = time.perf_counter()
    req = PredictRequest.check(optical_path, sar_path, out_path, inputs=inputs, window=window, overlap=overlap,
                               batch_size=batch_size, tta=tta, nodata=nodata, probabilities=probabilities,
                               probabilities_dtype=probabilities_dtype, vectorize=vectorize, num_classes=num_classes,
                               class_names=class_names, panel_width=panel_width, precision=precision, device=device)
    st = instrument if instrument is not None else PredictStats()
    scene = SceneInputs(optical_path, sar_path, sar_scale, req.modalities, stats, bands=bands or {},
                        nodata=input_nodata or {})
    temps: list[Path] = []
    with ExitStack() as stack:  # unwinds in reverse: writer, reader, sources, temporaries, GDAL settings
        _gdal_env(stack)
        stack.callback(lambda: remove_quietly(*temps))
        stack.callback(scene.close)
        scene.open()
        predictor = ScenePredictor.open(model_fn, req, scene, temps, readers=readers, tags=tags,
                                        class_colors=class_colors, instrument=st, stack=stack)
        predictor.run_panels(progress)
        counts = predictor.writer.close()
        vectors = publish_outputs(req, predictor.writer, counts, temps, min_area=min_area, simplify=simplify,
                                  cog_blocksize=cog_blocksize, overview_resampling=overview_resampling)
    return scene_summary(req, predictor, counts, time.perf_counter() - t0, vectors)


def scene_summary(req: PredictRequest, predictor: ScenePredictor, counts: np.ndarray, seconds: float,
                  vectors) -> dict:
    """What :func:`predict_scene` returns: the output, its grid, pixels per class, speed."""
    grid, k, st = predictor.writer.grid, predictor.acc.classes or 0, predictor.st
    names = list(req.class_names or ())
    h, w = grid.height, grid.width
    return {
        "path": str(req.out),
        "bytes": req.out.stat().st_size,
        "width": w,
        "height": h,
        "crs": grid.crs.to_string(),
        "transform": list(grid.transform)[:6],
        "nodata": req.nodata,
        "nodata_pixels": int(counts[req.nodata]),
        "pixels_per_class": {names[i] if i < len(names) else str(i): int(counts[i]) for i in range(k)},
        "num_classes": predictor.acc.classes,
        "inputs": req.inputs,
        "window": req.window,
        "overlap": req.overlap,
        "windows": st.windows,
        "batches": st.batches,
        "band_rows": st.band_rows,
        "device": str(req.device),
        "tta": req.tta,
        "seconds": seconds,
        "mpx_per_s": h * w / 1e6 / max(seconds, 1e-9),
        "probabilities": str(req.prob_out) if req.prob_out is not None else None,
        "vectors": vectors,
    }


__all__ = ["PANEL_WIDTH", "PredictRequest", "PredictStats", "ScenePredictor", "predict_scene", "probs_from_logits",
           "publish_outputs", "scene_summary", "window_batches", "window_logits", "window_probs"]
