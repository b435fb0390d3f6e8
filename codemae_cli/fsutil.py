"""Writing outputs without ever destroying what the user has.

One guard for every command that writes (:func:`guard_outputs`):

- an output may not be, contain, or lie inside any input the command reads (scenes, SAR,
  labels, references, checkpoints, run and data folders), compared after resolving links;
- an output's folder must be creatable and writable, checked before any work;
- an existing output is replaced only when the toolkit wrote it (its ``ours`` test: a marker,
  tags or layout), and, for commands that have the flag, only with ``--overwrite``.

Temporary files are named ``.NAME.tmp-PID...`` next to the output (:func:`temp_sibling`), so the
next run writing to the same place can remove the ones whose process is gone
(:func:`sweep_stale`) and name them in one line. :func:`staged_directory` writes a whole
directory so that it appears complete or not at all, and never loses the folder it replaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from codemae_cli.device import rank_from_env
from codemae_cli.errors import UserError

PathLike = Union[str, Path]


@dataclass(frozen=True)
class Place:
    """A path a command reads or writes, with the words that name it in a message."""

    path: Path
    what: str  # "the output", "--json", "the SAR scene", "the checkpoint"

    @property
    def real(self) -> Path:
        return Path(os.path.realpath(os.path.expanduser(self.path)))


def _places(items: Iterable) -> list[Place]:
    out = []
    for item in items:
        if isinstance(item, Place):
            out.append(item)
        elif item is not None and item[0] is not None and str(item[0]) != "":
            out.append(Place(Path(item[0]), item[1]))
    return out


def _same(a: Place, b: Place) -> bool:
    if a.real == b.real:
        return True
    try:  # hard links: the same file under two names
        return os.path.samefile(a.real, b.real)
    except OSError:
        return False


# ----------------------------------------------------------------------------- the guard
def check_distinct(outputs: Iterable, inputs: Iterable = ()) -> None:
    """Refuse an output that is, contains or lies inside an input, or that is another output.

    ``outputs`` and ``inputs`` hold :class:`Place` or ``(path, what)`` pairs; ``None`` paths
    are skipped. Paths are compared after resolving symbolic links.
    """
    ins = _places(inputs)
    seen: list[Place] = []
    for out in _places(outputs):
        for other in ins:
            if _same(out, other):
                raise UserError(f"{out.what} '{out.path}' is the same file as {other.what} '{other.path}'; "
                                "writing there would destroy it, so choose another path")
            if other.real.is_relative_to(out.real):
                raise UserError(f"{out.what} '{out.path}' contains {other.what} '{other.path}'; "
                                "writing there would destroy it, so choose another path")
            if out.real.is_relative_to(other.real):
                raise UserError(f"{out.what} '{out.path}' lies inside {other.what} '{other.path}'; "
                                "choose a path outside it")
        for other in seen:
            if _same(out, other):
                relation = "is the same file as"
            elif out.real.is_relative_to(other.real):
                relation = "lies inside"
            elif other.real.is_relative_to(out.real):
                relation = "contains"
            else:
                continue
            raise UserError(f"{out.what} '{out.path}' {relation} {other.what} '{other.path}'; "
                            "give each output its own path")
        seen.append(out)


def check_writable(path: PathLike, what: str = "the output", *, folder: bool = False,
                   create_parents: bool = True) -> Path:
    """Refuse, before any work, an output that cannot be written: one sentence, no traceback.

    ``folder``: the output is a directory (else a file). ``create_parents``: missing parent
    folders will be created (else the parent must exist: no silent mkdir of a typo).
    """
    p = Path(path).expanduser()
    if p.exists() or p.is_symlink():
        if folder and not p.is_dir():
            raise UserError(f"{what} '{p}' is a file, not a folder; choose a folder path")
        if not folder and p.is_dir():
            raise UserError(f"{what} '{p}' is a directory, not a file path")
    parent = p.parent if str(p.parent) else Path(".")
    if not create_parents and not parent.is_dir():
        if parent.exists():
            raise UserError(f"cannot write {what} '{p}': '{parent}' is a file, not a folder")
        raise UserError(f"the directory of {what} '{p}' does not exist")
    probe = p if (folder and p.is_dir()) else parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot write {what} '{p}': '{probe}' is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {what} '{p}': the folder '{probe}' is not writable")
    return p


def check_replaceable(path: PathLike, what: str, ours: Callable[[Path], bool], *,
                      overwrite: Optional[bool] = None, maker: str = "codemae") -> None:
    """An existing output is replaced only if the toolkit wrote it.

    ``ours(path)`` recognises the toolkit's own output (marker file, tags or layout).
    ``overwrite``: ``None`` for commands without an ``--overwrite`` flag (their own earlier
    output is replaced as before); ``False`` refuses any existing, non-empty output.
    """
    p = Path(path).expanduser()
    if not (p.exists() or p.is_symlink()):
        return
    if p.is_dir() and not any(p.iterdir()):
        return
    if overwrite is False:
        raise UserError(f"{what} '{p}' already exists; pass --overwrite to replace it")
    if not ours(p):
        raise UserError(f"refusing to replace {what} '{p}': it was not written by {maker}; "
                        "choose another path or move it away first")


def guard_outputs(outputs: Iterable, inputs: Iterable = (), *, folder: bool = False,
                  create_parents: bool = True) -> None:
    """The output-path guard: :func:`check_distinct` then :func:`check_writable` for each output."""
    outs = _places(outputs)
    check_distinct(outs, inputs)
    for out in outs:
        check_writable(out.path, out.what, folder=folder, create_parents=create_parents)


def is_run_dir(path: PathLike) -> bool:
    """A pretraining or fine-tuning run folder: its recipe, metrics log or checkpoints."""
    p = Path(path)
    return any((p / name).exists() for name in ("recipe.yaml", "metrics.jsonl", "checkpoints"))


def guard_run_dir(run_dir: PathLike, inputs: Iterable = ()) -> Path:
    """The run folder of pretrain / finetune: not an input, not inside one, not containing one;
    a folder or creatable; if it is not empty, a codemae run (whose own rules decide between a
    new run and ``--resume``)."""
    p = Path(run_dir).expanduser()
    guard_outputs([(p, "the run folder")], inputs, folder=True)
    if p.is_dir() and any(p.iterdir()) and not is_run_dir(p):
        raise UserError(f"the run folder '{p}' is not empty and holds no codemae run; "
                        "choose a new or empty folder (run.output_dir or --output-dir)")
    return p


def topmost_missing(path: PathLike) -> Optional[Path]:
    """The top-most folder of ``path`` that does not exist yet (what creating it would add), or None."""
    p = Path(path).expanduser().absolute()
    if p.exists():
        return None
    while not p.parent.exists():
        p = p.parent
    return p


@contextlib.contextmanager
def cleaned_on_refusal(folder: PathLike) -> Iterator[None]:
    """Remove what a run adds to ``folder`` when it refuses its input (a UserError) before it has
    written anything worth keeping (a checkpoint, a logged metric): a refusal leaves nothing.

    Under torchrun only rank 0 removes (it is the rank that writes)."""
    p = Path(folder).expanduser()
    top = topmost_missing(p)
    before = set(os.listdir(p)) if p.is_dir() else set()
    try:
        yield
    except UserError:
        if rank_from_env() == 0 and p.is_dir():
            added = [p / n for n in set(os.listdir(p)) - before]
            kept = [a for a in added if a.name in ("checkpoints", "metrics.jsonl")
                    and (a.is_file() and a.stat().st_size > 0 or a.is_dir() and any(a.iterdir()))]
            for a in [] if kept else [top] if top is not None else added:
                if a.is_dir():
                    shutil.rmtree(a, ignore_errors=True)
                else:
                    a.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- recognising our outputs
def read_json_object(path: PathLike) -> dict:
    """A JSON object from ``path``, or ``{}`` when it is missing, unreadable or not an object."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def is_codemae_raster(path: PathLike) -> bool:
    """A GeoTIFF written by codemae (predict, synth): it carries a ``codemae_product`` tag."""
    try:
        import rasterio

        with rasterio.Env(), rasterio.open(path) as ds:
            return "codemae_product" in ds.tags()
    except Exception:  # not a raster at all: not ours
        return False


def is_codemae_vectors(path: PathLike) -> bool:
    """A GeoPackage written by ``predict --vectorize``: a ``predictions`` layer with class columns."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
        try:
            names = {r[0] for r in con.execute("SELECT table_name FROM gpkg_contents")}
            if "predictions" not in names:
                return False
            cols = {r[1] for r in con.execute("PRAGMA table_info(predictions)")}
            return {"class_id", "class_name"} <= cols
        finally:
            con.close()
    except sqlite3.Error:
        return False


def is_metrics_json(path: PathLike) -> bool:
    """A metrics file written by ``codemae evaluate --json``."""
    doc = read_json_object(path)
    return "classes" in doc and "support" in doc


# ----------------------------------------------------------------------------- temporary files
_TMP = "tmp-"
_OLD = "old-"  # an output moved aside by staged_directory until its replacement is in place


def temp_sibling(path: PathLike, suffix: str = "") -> Path:
    """A hidden, unique path next to ``path`` (same filesystem: rename is atomic).

    The name ``.NAME.tmp-PID-XXXXXX<suffix>`` records the writing process, so a later run can
    tell a leftover of a killed run from a file another live run is writing.
    """
    p = Path(path)
    return p.with_name(f".{p.name}.{_TMP}{os.getpid()}-{uuid.uuid4().hex[:6]}{suffix}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def notice(message: str) -> None:
    """One line on stderr that is not an error (e.g. a stale temporary file removed)."""
    print(message, file=sys.stderr, flush=True)


def sweep_stale(path: PathLike, log: Callable[[str], None] = notice) -> list[Path]:
    """Clear what killed runs left next to ``path``; name each in one line.

    Temporaries ``.NAME.tmp-PID...`` and ``NAME.tmp-PID...`` (files or folders) whose process is
    gone are removed. A folder that :func:`staged_directory` moved aside (``.NAME.old-PID``) is
    put back as ``NAME`` when ``NAME`` is missing (the run died between its two renames: the old
    output is never lost), and removed when ``NAME`` exists (superseded). A live process's
    temporaries and everything else are left alone. Returns the paths removed or put back.
    """
    p = Path(path).expanduser()
    parent = p.parent if str(p.parent) else Path(".")
    if not p.name or not parent.is_dir():
        return []
    pattern = re.compile(rf"^\.?{re.escape(p.name)}\.({_TMP}|{_OLD})(\d+)(?:[-.].*)?$")
    swept = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    stale = [(e, m) for e in entries if (m := pattern.match(e.name)) and not _pid_alive(int(m.group(2)))]
    # Moved-aside folders first, the newest first: it is the one to put back when NAME is missing.
    stale.sort(key=lambda em: (em[1].group(1) != _OLD, -_mtime(em[0])))
    for entry, m in stale:
        pid = m.group(2)
        try:
            if m.group(1) == _OLD and not (p.exists() or p.is_symlink()):
                entry.rename(p)
                swept.append(entry)
                log(f"restored '{p}' from '{entry.name}', where a stopped run (process {pid}) had moved it aside")
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        swept.append(entry)
        what = "an old copy superseded by" if m.group(1) == _OLD else "a temporary left by"
        log(f"removed '{entry}', {what} a stopped run (process {pid})")
    return swept


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


def moved_aside(out: PathLike, complete: Callable[[Path], bool] = Path.is_dir) -> Optional[Path]:
    """The copy of ``out`` that a :func:`staged_directory` killed between its two renames left
    moved aside (``.NAME.old-PID``), when ``out`` itself is missing and the copy passes
    ``complete``; else None. For readers: nothing is renamed (writers put it back through
    :func:`sweep_stale`)."""
    out = Path(out)
    if out.exists() or not out.parent.is_dir():
        return None
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.{_OLD}\d+$")
    cands = [c for c in out.parent.iterdir() if pattern.match(c.name) and complete(c)]
    return max(cands, key=_mtime) if cands else None


@contextlib.contextmanager
def staged_directory(out: PathLike) -> Iterator[Path]:
    """Yield a hidden sibling of ``out`` to write into; on success it replaces ``out``.

    The one atomic directory swap (checkpoints, analyses, testbeds): the new folder is written
    beside ``out``; an existing ``out`` is renamed aside (``.NAME.old-PID``), the new one renamed
    into place, and only then is the old one removed. A kill at any moment leaves the old folder
    or the new one, complete, under ``out`` or moved aside (:func:`moved_aside` finds it, the next
    write puts it back). On any exception (KeyboardInterrupt included) the staging directory is
    removed and ``out`` is left as it was. Leftovers of killed runs next to ``out`` are cleared
    first (:func:`sweep_stale`)."""
    out = Path(out)
    sweep_stale(out)
    tmp = out.with_name(f".{out.name}.{_TMP}{os.getpid()}")
    old = out.with_name(f".{out.name}.{_OLD}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if old.exists():  # this process's own leftover (sweep_stale spares live processes)
        if out.exists() or out.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(out)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists() or out.is_symlink():
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not (out.exists() or out.is_symlink()):
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_file(out: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a hidden sibling of the file ``out`` to write; on success it replaces ``out``.

    On any exception (KeyboardInterrupt included) the sibling is removed and ``out`` is left as
    it was. ``suffix``: an extension for writers that pick the format from the name (".png")."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out, suffix)
    try:
        yield tmp
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- weights files
def check_safetensors(path: PathLike, what: str = "weights file") -> Path:
    """Refuse a file that is not safetensors (a pickle renamed, a truncated download) in one
    sentence, by reading its 8-byte header length and JSON header only: nothing is unpickled."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{what} '{p}' does not exist" if not p.exists() else f"{what} '{p}' is not a file")
    size = p.stat().st_size
    try:
        with open(p, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            ok = 2 <= n <= size - 8 and n <= 100_000_000
            doc = json.loads(f.read(n)) if ok else None
    except (OSError, ValueError, UnicodeDecodeError):
        doc = None
    if not isinstance(doc, dict):
        raise UserError(f"{what} '{p}' is not a safetensors file (only safetensors weights are read, never "
                        "pickles); convert it with safetensors.torch.save_file")
    return p
