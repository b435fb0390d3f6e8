"""Training logs: metrics.jsonl (one JSON object per line), TensorBoard, a loss-curve PNG, and a
rich progress bar with items/s and ETA.

Only the main process writes; other ranks get a logger that does nothing, so call sites need
no ``if is_main`` around every line.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from codemae_cli.fsutil import staged_file

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Append metrics to ``run_dir/metrics.jsonl`` and TensorBoard (``run_dir/tb``)."""

    def __init__(self, run_dir, is_main: bool = True, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.path = self.run_dir / METRICS_FILE
        self._tb = None
        self._fh = None
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))
            except Exception:  # tensorboard is optional: the JSONL log is the record
                self._tb = None

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after ``step`` (a resumed run repeats them from its checkpoint)."""
        if not self.is_main or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if int(rec.get("step", 0)) <= step:
                keep.append(line)
        with staged_file(self.path) as tmp:
            tmp.write_text("".join(k + "\n" for k in keep))

    def log(self, step: int, metrics: dict, split: str = "train") -> None:
        if not self.is_main:
            return
        rec = {"step": int(step), "split": split, "time": round(time.time(), 3)}
        for k, v in metrics.items():
            if hasattr(v, "item"):
                v = v.item()
            rec[k] = v
        if self._fh is None:
            self._fh = open(self.path, "a", buffering=1)
        self._fh.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if k in ("step", "split", "time") or not isinstance(v, (int, float)) or isinstance(v, bool):
                    continue
                self._tb.add_scalar(f"{split}/{k}", v, step)

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def plot(self, path=None) -> Path | None:
        """Loss curves (every key containing 'loss', per split) to a PNG; returns its path."""
        if not self.is_main:
            return None
        records = self.read()
        if not records:
            return None
        plt = pyplot()
        path = Path(path) if path is not None else self.run_dir / "loss_curve.png"
        series: dict[tuple[str, str], tuple[list, list]] = {}
        for rec in records:
            for k, v in rec.items():
                if "loss" not in k or not isinstance(v, (int, float)) or not math.isfinite(v):
                    continue
                xs, ys = series.setdefault((rec.get("split", "train"), k), ([], []))
                xs.append(rec["step"])
                ys.append(v)
        if not series:
            return None
        fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
        for (split, k), (xs, ys) in sorted(series.items()):
            style = "-" if split == "train" else "--"
            ax.plot(xs, ys, style, label=f"{split}/{k}", linewidth=2 if k == "loss" else 1)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(self.run_dir.name)
        if all(y > 0 for _, ys in series.values() for y in ys):
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return save_figure(fig, path)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


class TrainProgress:
    """A rich progress bar over optimizer steps showing items/s (e.g. pairs/s) and ETA.

        with TrainProgress(total_steps, items_per_step=256, unit="pairs", start=step) as bar:
            bar.advance(step, "loss 0.53")
    """

    def __init__(self, total_steps: int, items_per_step: int, unit: str = "items", start: int = 0,
                 enabled: bool = True, description: str = "train"):
        self.total = int(total_steps)
        self.items_per_step = int(items_per_step)
        self.unit = unit
        self.enabled = enabled
        self.start_step = int(start)
        self.description = description
        self._progress = None
        self._task = None
        self._t0 = None
        self._rate = 0.0

    def __enter__(self):
        self._t0 = time.perf_counter()
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
                TextColumn("{task.fields[post]}"), transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.total, completed=self.start_step,
                                                 rate="", post="")
        return self

    @property
    def rate(self) -> float:
        """Items per second since the bar started (resumed steps excluded)."""
        return self._rate

    def advance(self, step: int, postfix: str = "") -> None:
        done = step - self.start_step
        elapsed = time.perf_counter() - self._t0
        if done > 0 and elapsed > 0:
            self._rate = done * self.items_per_step / elapsed
        if self._progress is not None:
            self._progress.update(self._task, completed=step, rate=f"{self._rate:,.1f} {self.unit}/s", post=postfix)
            if postfix and not self._progress.console.is_terminal:
                # Logs and batch jobs get one line per logging step instead of a live bar.
                left = (self.total - step) * self.items_per_step / self._rate if self._rate > 0 else float("nan")
                eta = time.strftime("%H:%M:%S", time.gmtime(left)) if math.isfinite(left) else "?"
                self._progress.console.print(f"{self.description} step {step}/{self.total}  "
                                             f"{self._rate:,.1f} {self.unit}/s  ETA {eta}  {postfix}")

    def print(self, msg: str) -> None:
        if self._progress is not None:
            self._progress.console.print(msg)
        elif self.enabled:
            print(msg, flush=True)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> Path:
    """Save ``fig`` as PNG beside ``path`` and rename it over ``path`` (a kill leaves the old
    figure or the new, never half of one); the figure is closed. Returns ``path``."""
    path = Path(path)
    try:
        with staged_file(path, ".png") as tmp:
            fig.savefig(tmp)
    finally:
        pyplot().close(fig)
    return path


__all__ = ["METRICS_FILE", "MetricsLogger", "TrainProgress", "pyplot", "save_figure"]
