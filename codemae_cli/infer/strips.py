"""Reading a scene ahead of the model: strips of window rows, normalised, in background threads.

    reader = StripReader(scene, layout, device, readers=2)
    for b in reader.panel_batches(panel, batches):   # BatchInputs, assembled ahead in a thread
        model(b.x["optical"], ...)

A strip is the pixels of one window row (``window`` rows) under a panel's window columns. Reader
threads read the next strips while the model runs: each thread opens its own GDAL handles
(datasets must not be shared between threads), reads, pads a scene smaller than a window,
normalises and zeroes invalid pixels (so no NaN ever enters the model); a feeder thread moves
strips to the device and cuts and stacks each batch's windows, so the model's thread only runs
the model.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from codemae_cli.errors import UserError


@dataclass
class SceneInputs:
    """The scene(s) a model reads, on one reference grid, with their normalisation."""

    optical_path: str | Path | None
    sar_path: str | Path | None
    sar_scale: str
    modalities: tuple[str, ...]  # ("optical",), ("sar",) or ("optical", "sar")
    stats: dict | None = None
    bands: dict = field(default_factory=dict)  # modality -> 1-based bands chosen at prepare (None: all)
    nodata: dict = field(default_factory=dict)  # modality -> nodata override as --nodata-* takes it (None: the file's)
    sources: dict = field(default_factory=dict)  # modality -> source opened by the main thread
    norm: dict = field(default_factory=dict)  # modality -> (mean, std) as (C, 1, 1) float32

    def open(self) -> None:
        """Open every source once (the main thread's handles): the grid, band counts, checks."""
        self.sources = self.open_sources()
        self.norm = {m: norm_stats(self.stats, m, s.bands) for m, s in self.sources.items()}

    def open_sources(self) -> dict:
        """Fresh handles on the scene(s); SAR is placed on the optical grid when both are read."""
        from codemae_cli.infer.sources import OpticalSource, SarSource

        own: dict = {}
        try:
            if "optical" in self.modalities:
                own["optical"] = OpticalSource(self.optical_path, indexes=self.bands.get("optical"),
                                               nodata=self.nodata.get("optical"))
            if "sar" in self.modalities:
                grid = own["optical"].grid if "optical" in own else None
                own["sar"] = SarSource(self.sar_path, scale=self.sar_scale, ref=grid, indexes=self.bands.get("sar"),
                                       nodata=self.nodata.get("sar"))
        except BaseException:
            for s in own.values():
                s.close()
            raise
        return own

    @property
    def grid(self):
        """The reference grid: the optical scene's, or the SAR scene's for SAR-only models."""
        first = self.sources["optical"] if "optical" in self.sources else self.sources["sar"]
        return first.grid

    def close(self) -> None:
        for s in self.sources.values():
            s.close()
        self.sources = {}


def norm_stats(stats: dict | None, modality: str, bands: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean/std of a modality as (C, 1, 1) float32, checked against the scene's band count."""
    from codemae_cli.data.stats import BandNorm

    norm = BandNorm.from_stats(stats.get(modality) if stats else None, bands)
    if norm.bands != bands:
        name = "SAR" if modality == "sar" else modality
        raise UserError(f"the {name} scene has {bands} band(s) but the model expects {norm.bands}")
    return norm.mean.reshape(-1, 1, 1), norm.std.reshape(-1, 1, 1)


def pad_to(x: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Reflect-pad the last two axes up to (rows, cols): a scene smaller than a window."""
    pr, pc = rows - x.shape[-2], cols - x.shape[-1]
    if pr <= 0 and pc <= 0:
        return x
    pad = [(0, 0)] * (x.ndim - 2) + [(0, max(pr, 0)), (0, max(pc, 0))]
    # numpy's "symmetric" repeats the edge pixel and, unlike "reflect", accepts a 1-pixel axis
    return np.pad(x, pad, mode="symmetric")


@dataclass
class Strip:
    """One window row of a panel: model inputs (C, window, span) per modality and validity (window, span)."""

    row: int  # first scene row
    rows: int  # scene rows read (fewer than the window only for a scene shorter than it)
    cols: int  # scene columns read
    x: dict  # modality -> normalised float32 tensor, invalid pixels 0 (the mean)
    valid: object  # bool tensor


class StripReader:
    """Strips of a panel read ``readers`` window rows ahead of the model, in background threads."""

    def __init__(self, scene: SceneInputs, layout, device, readers: int = 2, instrument=None):
        self.scene = scene
        self.layout = layout
        self.rows = layout.row_starts
        self.device = device
        self.instrument = instrument
        self.n_readers = max(1, min(int(readers), len(self.rows)))
        self.pool = ThreadPoolExecutor(max_workers=self.n_readers, thread_name_prefix="codemae-read")
        self.local = threading.local()
        self.lock = threading.Lock()
        self.thread_sources: list = []  # every reader thread's handles, closed at the end
        self.futures: dict[int, Future] = {}
        self.strips: dict[int, Strip] = {}
        self.panel = None
        self.feeder: BatchFeeder | None = None

    def panel_batches(self, panel, batches: Iterable[list]) -> BatchFeeder:
        """The panel's batches, assembled ahead of the model (see :class:`BatchFeeder`)."""
        self.start_panel(panel)
        self.feeder = BatchFeeder(self, batches)
        return self.feeder

    def start_panel(self, panel) -> None:
        """Forget the previous panel's strips (its windows are all done) and read this one's."""
        if self.feeder is not None:
            self.feeder.stop()
            self.feeder = None
        for f in self.futures.values():
            f.cancel()
        for f in self.futures.values():
            if not f.cancelled():
                f.result()
        self.futures.clear()
        self.strips.clear()
        self.panel = panel

    def get(self, ri: int) -> Strip:
        """The strip of window row ``ri`` on the device, keeping every reader busy with the next ones."""
        if ri in self.strips:
            return self.strips[ri]
        for k in range(ri, min(ri + self.n_readers + 1, len(self.rows))):
            if k not in self.futures and k not in self.strips:
                self.futures[k] = self.pool.submit(self._load, k, self.panel)
        s = self.futures.pop(ri).result()
        if self.instrument is not None:
            st = self.instrument
            st.strips_read += 1
            st.max_strip_rows = max(st.max_strip_rows, s.rows)
            st.max_strip_cols = max(st.max_strip_cols, s.cols)
        s.x = {m: _to_device(t, self.device) for m, t in s.x.items()}
        s.valid = _to_device(s.valid, self.device)
        self.strips[ri] = s
        return s

    def drop_before(self, ri: int) -> None:
        """Free the strips of window rows above ``ri``: no later window reads them."""
        for k in [k for k in self.strips if k < ri]:
            del self.strips[k]

    def _sources(self) -> dict:
        own = getattr(self.local, "sources", None)
        if own is None:
            own = self.scene.open_sources()
            with self.lock:
                self.thread_sources.extend(own.values())
            self.local.sources = own
        return own

    def _load(self, ri: int, panel) -> Strip:
        """Read, pad, normalise (in a reader thread: numpy and torch release the GIL)."""
        import torch

        lay = self.layout
        r, window = self.rows[ri], lay.window
        n = min(window, lay.height - r)  # fewer rows only when the scene is shorter than a window
        c0, c1 = panel.p0, min(panel.p1, lay.width)  # p1 > width only for a scene narrower than a window
        raw: dict = {}
        valid = np.ones((n, c1 - c0), dtype=bool)
        for m, src in self._sources().items():
            data, ok = src.read_strip(r, n, c0, c1)
            arr = np.ascontiguousarray(pad_to(data.astype(np.float32, copy=False), window, panel.span))
            raw[m] = arr if arr.flags.writeable else arr.copy()  # normalised in place below
            valid &= ok
        ok_t = torch.from_numpy(np.ascontiguousarray(pad_to(valid, window, panel.span)))
        x = {}
        for m, data in raw.items():
            mean, std = self.scene.norm[m]
            # in place: the sources return a new array per read
            t = torch.from_numpy(data).sub_(torch.from_numpy(mean)).div_(torch.from_numpy(std))
            x[m] = t.masked_fill_(~ok_t, 0.0)  # invalid pixels become the mean: no NaN enters the model
        return Strip(row=r, rows=n, cols=c1 - c0, x=x, valid=ok_t)

    def close(self) -> None:
        if self.feeder is not None:
            self.feeder.stop()
        self.pool.shutdown(wait=True, cancel_futures=True)
        for s in self.thread_sources:
            s.close()
        self.thread_sources = []


@dataclass
class BatchInputs:
    """One batch ready for the model, with the strips it is the first to use."""

    windows: list  # WindowAt of each window, in raster order
    x: dict  # modality -> (B, C, window, window) tensor on the device
    new_strips: list[Strip]  # strips no earlier batch used: their validity goes into the band first


class BatchFeeder:
    """Assembles a panel's batches ``depth`` ahead of the model, in one thread.

    Cutting the windows out of their strips and stacking them is a copy of the whole batch, so it
    runs here, beside the model, like the reads. Iterate to get :class:`BatchInputs` in order; an
    error in the thread is raised by the iteration; ``stop`` ends the thread early.
    """

    _END = object()

    def __init__(self, reader: StripReader, batches: Iterable[list], depth: int = 2):
        self.reader = reader
        self.batches = batches
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="codemae-batch", daemon=True)
        self.thread.start()

    def __iter__(self) -> Iterator[BatchInputs]:
        while True:
            item = self.queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _run(self) -> None:
        try:
            seen: set[int] = set()
            for batch in self.batches:
                self._put(self._assemble(batch, seen))
                if self.stopped.is_set():
                    return
            self._put(self._END)
        except BaseException as err:  # handed to the consumer
            self._put(err)

    def _assemble(self, batch: list, seen: set[int]) -> BatchInputs:
        import torch

        reader = self.reader
        reader.drop_before(batch[0].ri)  # no later window reads the rows above this batch
        strips, new = {}, []
        for w in batch:
            if w.ri not in strips:
                strips[w.ri] = reader.get(w.ri)
                if w.ri not in seen:
                    seen.add(w.ri)
                    new.append(strips[w.ri])
        win, p0 = reader.layout.window, reader.panel.p0
        x = {m: torch.stack([strips[w.ri].x[m][:, :, w.col - p0 : w.col - p0 + win] for w in batch])
             for m in reader.scene.modalities}
        return BatchInputs(batch, x, new)

    def _put(self, item) -> None:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


def _to_device(t, device):
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


__all__ = ["BatchFeeder", "BatchInputs", "SceneInputs", "Strip", "StripReader", "norm_stats", "pad_to"]
