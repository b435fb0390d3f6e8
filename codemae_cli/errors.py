"""User-facing errors: one clear sentence, exit code 2, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (missing file, wrong recipe key, mismatched checkpoint...).

    The CLI prints ``str(err)`` as one sentence on stderr and exits with code 2.
    Raise it from the importable core too; callers from Python get a normal exception.
    """

    exit_code = 2


def fail(message: str) -> UserError:
    """Return a UserError so call sites read ``raise fail("...")``."""
    return UserError(message)
