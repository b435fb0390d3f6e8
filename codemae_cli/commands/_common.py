"""What every command module shares: the wrapper that turns bad input into one sentence.

It lives beside the commands (not in ``cli.py``) so that imports run one way only: ``cli.py``
registers the command modules, and the command modules never import ``cli.py``.
"""

from __future__ import annotations

import errno
import functools
import inspect
import os
from collections.abc import Callable

import typer

from codemae_cli.errors import UserError


def _reflow(doc: str | None) -> str | None:
    """Join the hard-wrapped lines of each docstring paragraph, so rich wraps help text to the
    terminal instead of breaking it at the source's line ends; indented blocks stay as they are."""
    if not doc:
        return doc
    paragraphs = []
    for para in inspect.cleandoc(doc).split("\n\n"):
        lines = para.splitlines()
        if any(line.startswith((" ", "-", "*")) for line in lines):
            paragraphs.append(para)
        else:
            paragraphs.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(paragraphs)


def _is_worker_rank() -> bool:
    """A torchrun process other than rank 0."""
    return os.environ.get("RANK", "0").strip() not in ("", "0")


def _under_torchrun() -> bool:
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


class StoppedByLauncher(BaseException):
    """torchrun ends the job's other processes with SIGTERM when one of them stops (or on Ctrl-C).

    A BaseException, like KeyboardInterrupt, so that every ``finally`` and staging cleanup runs."""


def _on_sigterm(signum, frame):
    raise StoppedByLauncher()


def _launcher_handler(on: bool) -> None:
    """Under torchrun, turn the launcher's SIGTERM into a quiet, cleaned-up exit with one sentence
    while the command runs; after it (its sentence printed), a SIGTERM ends the process silently."""
    import signal
    import threading

    if _under_torchrun() and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm if on else signal.SIG_DFL)


def _lost_peer(err: BaseException) -> bool:
    """A collective that failed because another rank of the job is gone (gloo/NCCL/store errors)."""
    import sys

    if not _under_torchrun():
        return False
    dist = sys.modules.get("torch.distributed")
    dist_error = getattr(dist, "DistError", None) if dist is not None else None
    if dist_error is not None and isinstance(err, dist_error):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(k in text for k in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL", "Gloo", "gloo",
        "ProcessGroup", "timed out", "Socket Timeout"))


# Faults of the filesystem the user can fix (permissions, a full or read-only disk): one sentence.
_FS_ERRNOS = (errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT)


def _rank() -> str:
    return os.environ.get("RANK", "0").strip() or "0"


def cli_command(fn: Callable) -> Callable:
    """Wrap a command so a :class:`UserError` becomes one sentence on stderr and exit code 2.

    A model refusing its input (:class:`~codemae_cli.model.errors.ModelInputError`, a
    ``ValueError``) is the user's input too, and is reported the same way. An error that every
    rank of a torchrun job raises together (``all_ranks``) is printed by rank 0 only.
    """
    from codemae_cli.model.errors import ModelInputError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _launcher_handler(True)
        try:
            return fn(*args, **kwargs)
        except (UserError, ModelInputError) as err:
            if not (getattr(err, "all_ranks", False) and _is_worker_rank()):
                typer.echo(f"Error: {err}", err=True)
            raise typer.Exit(code=getattr(err, "exit_code", 2)) from None
        except KeyboardInterrupt:
            typer.echo("Interrupted.", err=True)
            raise typer.Exit(code=130) from None
        except StoppedByLauncher:
            typer.echo(f"Stopped (rank {_rank()}): torchrun ended the job because another of its processes "
                       "stopped; that process's message, if any, is above.", err=True)
            raise typer.Exit(code=143) from None
        except Exception as err:
            if isinstance(err, OSError) and err.errno in _FS_ERRNOS:
                where = f" '{err.filename}'" if err.filename else ""
                typer.echo(f"Error: cannot use{where}: {os.strerror(err.errno).lower()}.", err=True)
                raise typer.Exit(code=2) from None
            if not _lost_peer(err):
                raise
            typer.echo(f"Error: rank {_rank()} lost contact with the other processes of this torchrun job: one of "
                       "them stopped (its message, if any, is above) or the network between them failed.", err=True)
            raise typer.Exit(code=1) from None
        finally:
            _launcher_handler(False)

    wrapper.__doc__ = _reflow(fn.__doc__)
    return wrapper


__all__ = ["cli_command"]
