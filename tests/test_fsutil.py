"""The one atomic directory swap (fsutil.staged_directory), used by checkpoints, analyses and
testbeds: the folder it replaces is never lost, whatever moment the writing process dies at."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from codemae_cli.fsutil import moved_aside, staged_directory, sweep_stale

ROOT = Path(__file__).resolve().parents[1]


def _folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "a.txt").write_text(text)
    return path


def _write(out: Path, text: str) -> None:
    with staged_directory(out) as tmp:
        (tmp / "a.txt").write_text(text)


def test_replaces_a_folder_and_leaves_nothing_beside_it(tmp_path):
    out = tmp_path / "out"
    _write(out, "one")
    _write(out, "two")
    assert (out / "a.txt").read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_write_or_a_failed_swap_keeps_the_old_folder(tmp_path, monkeypatch):
    out = _folder(tmp_path / "out", "old")
    with pytest.raises(KeyboardInterrupt):
        with staged_directory(out) as tmp:
            (tmp / "a.txt").write_text("half")
            raise KeyboardInterrupt
    assert (out / "a.txt").read_text() == "old"
    # The second rename (staging folder -> out) fails: the old folder is put back, not lost.
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".out.tmp-") and Path(target) == out:
            raise OSError("disk gone")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="disk gone"):
        _write(out, "new")
    assert (out / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_process_killed_between_the_two_renames_loses_nothing(tmp_path):
    out = _folder(tmp_path / "out", "old")
    # The writer dies (os._exit: no cleanup runs) right after moving the old folder aside.
    script = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from codemae_cli.fsutil import staged_directory
        real_rename = Path.rename
        def rename(self, target):
            real_rename(self, target)
            if Path(target).name.startswith(".out.old-"):
                os._exit(9)
        Path.rename = rename
        with staged_directory(Path({str(out)!r})) as tmp:
            (tmp / "a.txt").write_text("new")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env={"PYTHONPATH": str(ROOT)})
    assert proc.wait() == 9
    assert not out.exists()
    aside = moved_aside(out)
    assert aside is not None and aside.name == f".out.old-{proc.pid}"
    assert (aside / "a.txt").read_text() == "old"  # a reader finds the complete old folder
    # The next write (or sweep) puts it back first; a failing write then leaves it in place.
    lines: list[str] = []
    assert sweep_stale(out, log=lines.append) != []
    assert (out / "a.txt").read_text() == "old" and moved_aside(out) is None
    assert any("restored" in line for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # its staging folder was swept too
    _write(out, "new")
    assert (out / "a.txt").read_text() == "new"


def test_a_moved_aside_copy_is_superseded_when_the_folder_exists(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = _folder(tmp_path / "out", "current")
    _folder(tmp_path / f".out.old-{dead.pid}", "older")
    assert moved_aside(out) is None  # out exists: nothing to recover
    _write(out, "new")
    assert (out / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
