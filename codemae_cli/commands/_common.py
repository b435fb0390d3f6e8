"""What every command module shares: the wrapper that turns bad input into one sentence.

It lives beside the commands (not in ``cli.py``) so that imports run one way only: ``cli.py``
registers the command modules, and the command modules never import ``cli.py``.
"""

from __future__ import annotations

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


def cli_command(fn: Callable) -> Callable:
    """Wrap a command so a :class:`UserError` becomes one sentence on stderr and exit code 2.

    A model refusing its input (:class:`~codemae_cli.model.errors.ModelInputError`, a
    ``ValueError``) is the user's input too, and is reported the same way. An error that every
    rank of a torchrun job raises together (``all_ranks``) is printed by rank 0 only.
    """
    from codemae_cli.model.errors import ModelInputError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, ModelInputError) as err:
            if not (getattr(err, "all_ranks", False) and _is_worker_rank()):
                typer.echo(f"Error: {err}", err=True)
            raise typer.Exit(code=getattr(err, "exit_code", 2)) from None
        except KeyboardInterrupt:
            typer.echo("Interrupted.", err=True)
            raise typer.Exit(code=130) from None

    wrapper.__doc__ = _reflow(fn.__doc__)
    return wrapper


__all__ = ["cli_command"]
