"""What every command module shares: the wrapper that turns bad input into one sentence.

It lives beside the commands (not in ``cli.py``) so that imports run one way only: ``cli.py``
registers the command modules, and the command modules never import ``cli.py``.
"""

from __future__ import annotations

import errno
import functools
import inspect
import os
import signal
from collections.abc import Callable

import typer

from codemae_cli.device import env_int, rank_from_env
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
    try:
        return rank_from_env() != 0
    except UserError:  # a malformed RANK is reported where it is read, not while reporting
        return False


def _under_torchrun() -> bool:
    try:
        return env_int("WORLD_SIZE", 1) > 1
    except UserError:  # as for RANK: reported where it is read
        return False


class StoppedByLauncher(BaseException):
    """torchrun ends the job's other processes with SIGTERM when one of them stops (or on Ctrl-C).

    A BaseException, like KeyboardInterrupt, so that every ``finally`` and staging cleanup runs."""


# Launcher signals that arrived after the first one, while the command was already ending.
_late_signals: list[int] = []


def _on_launcher_signal(signum, frame):
    """The first SIGTERM or SIGINT of the launcher ends the command; the ones after it are only
    noted (torchrun forwards a Ctrl-C the process already got, then sends SIGTERM), so that none
    can break into the sentence being printed with a second exception and its traceback."""
    _launcher_handler("ending")
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise StoppedByLauncher()


def _note_late_signal(signum, frame):
    _late_signals.append(signum)


def _launcher_handler(state: str) -> None:
    """Under torchrun: ``"armed"`` while the command runs (the launcher's SIGTERM and SIGINT end it
    quietly, cleanups run, one sentence); ``"ending"`` while it reports how it ended (signals are
    noted, never raised); ``"done"`` after it (a signal ends the process silently)."""
    import threading

    if not (_under_torchrun() and threading.current_thread() is threading.main_thread()):
        return
    handler = {"armed": _on_launcher_signal, "ending": _note_late_signal, "done": signal.SIG_DFL}[state]
    if state == "armed":
        _late_signals.clear()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)


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
    try:
        return str(rank_from_env())
    except UserError:
        return "?"


def _ending(err: BaseException, model_error: type) -> typer.Exit | None:
    """Print the one sentence for how a command ended and return the exit to raise, or None for an
    exception that is not the user's (or a plain exit), which is raised as it is."""
    if isinstance(err, (UserError, model_error)):
        if not (getattr(err, "all_ranks", False) and _is_worker_rank()):
            typer.echo(f"Error: {err}", err=True)
        return typer.Exit(code=getattr(err, "exit_code", 2))
    if isinstance(err, typer.Exit) or not isinstance(err, (Exception, KeyboardInterrupt, StoppedByLauncher)):
        return None
    if isinstance(err, OSError) and err.errno in _FS_ERRNOS:
        where = f" '{err.filename}'" if err.filename else ""
        typer.echo(f"Error: cannot use{where}: {os.strerror(err.errno).lower()}.", err=True)
        return typer.Exit(code=2)
    # A Ctrl-C that the other process acted on first shows here as a lost peer; the SIGINT noted
    # while ending (a pending one is handled at the call to _lost_peer) says what happened.
    if isinstance(err, KeyboardInterrupt) or (_lost_peer(err) and signal.SIGINT in _late_signals):
        typer.echo("Interrupted.", err=True)
        return typer.Exit(code=130)
    if isinstance(err, StoppedByLauncher):
        typer.echo(f"Stopped (rank {_rank()}): torchrun ended the job because another of its processes "
                   "stopped; that process's message, if any, is above.", err=True)
        return typer.Exit(code=143)
    if not _lost_peer(err):
        return None
    typer.echo(f"Error: rank {_rank()} lost contact with the other processes of this torchrun job: one of "
               "them stopped (its message, if any, is above) or the network between them failed.", err=True)
    return typer.Exit(code=1)


def cli_command(fn: Callable) -> Callable:
    """Wrap a command so a :class:`UserError` becomes one sentence on stderr and exit code 2.

    A model refusing its input (:class:`~codemae_cli.model.errors.ModelInputError`, a
    ``ValueError``) is the user's input too, and is reported the same way. An error that every
    rank of a torchrun job raises together (``all_ranks``) is printed by rank 0 only.
    """
    from codemae_cli.model.errors import ModelInputError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _launcher_handler("armed")
        try:
            try:
                return fn(*args, **kwargs)
            except BaseException as err:
                _launcher_handler("ending")
                ending = _ending(err, ModelInputError)
                if ending is None:
                    raise
                raise ending from None
        except (KeyboardInterrupt, StoppedByLauncher) as err:
            # The launcher's signal came while the first exception was being caught; the handler
            # is already "ending", so no further signal can interrupt this one.
            raise _ending(err, ModelInputError) from None
        finally:
            _launcher_handler("done")

    wrapper.__doc__ = _reflow(fn.__doc__)
    return wrapper


THREADS_HELP = ("CPU threads for the maths (default: the physical cores, fewer on a busy machine or per torchrun "
                "process; OMP_NUM_THREADS also sets it).")


def start_training_run(cfg, inputs: Callable[[], list], *, print_recipe: bool, threads, echo: Callable) -> bool:
    """What ``pretrain`` and ``finetune`` do before training, in this order: print the resolved
    recipe (and stop: False), check the files the recipe names (preflight), guard the run folder
    against the datasets and ``inputs()`` (``(path, what)`` pairs, resolved only after preflight
    has checked those files), set torch's CPU threads. True when the run may start (inside
    ``fsutil.cleaned_on_refusal(cfg.run.output_dir)``)."""
    from codemae_cli.config import dump_recipe
    from codemae_cli.fsutil import guard_run_dir
    from codemae_cli.preflight import preflight
    from codemae_cli.threads import apply_threads

    if print_recipe:
        typer.echo(dump_recipe(cfg))
        return False
    preflight(cfg, echo=echo)
    guard_run_dir(cfg.run.output_dir, [*((d, "the dataset") for d in cfg.data.datasets), *inputs()])
    apply_threads(threads, echo=echo)
    return True


__all__ = ["THREADS_HELP", "cli_command", "start_training_run"]
