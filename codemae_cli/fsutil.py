"""Writing a whole output directory so that it appears complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staged_directory(out: str | Path) -> Iterator[Path]:
    """Yield a hidden sibling of ``out`` to write into; on success it replaces ``out``.

    On any exception (KeyboardInterrupt included) the staging directory is removed and ``out``
    is left as it was, so a failed run leaves nothing half-written."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
