"""An ordered background stage: calls run one after another in a thread of their own.

    stage = Stage("codemae-blend", depth=2)
    stage.submit(fn, *args)      # queued; waits while ``depth`` calls are still pending
    stage.drain()                # every call done (the first error among them is raised here)
    stage.close()                # drain, then end the thread
    stage.abort()                # after an error elsewhere: drop what waits, join the thread

Prediction is a pipeline of such stages beside the model's thread (blending, then writing), so
the model never waits for the work after it. The bound keeps memory to ``depth`` waiting
calls (and what their arguments hold); an error in a call is raised in the submitting thread
by the next ``submit`` or by ``drain``, in submission order, so the first failure is the one
reported.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class Stage:
    """Calls run in submission order in one thread, at most ``depth`` waiting at once."""

    def __init__(self, name: str, depth: int = 2):
        self.depth = max(1, int(depth))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: deque[Future] = deque()
        self._failed = False

    def submit(self, fn: Callable, *args) -> None:
        """Queue ``fn(*args)``; raise the error of an earlier call if one failed."""
        self._settle(keep=self.depth - 1)
        self._pending.append(self._pool.submit(self._call, fn, *args))

    def drain(self) -> None:
        """Wait for every queued call; raise the first error among them."""
        self._settle(keep=0)

    def close(self) -> None:
        """Drain, then end the thread."""
        self.drain()
        self._pool.shutdown(wait=True)

    def abort(self) -> None:
        """Drop the calls not started, wait for the running one, end the thread (errors are dropped)."""
        self._failed = True
        for f in self._pending:
            f.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _settle(self, keep: int) -> None:
        while len(self._pending) > keep:
            self._pending.popleft().result()

    def _call(self, fn: Callable, *args) -> None:
        if self._failed:  # a call after a failed one would work on a broken state: skip it
            return
        try:
            fn(*args)
        except BaseException:
            self._failed = True
            raise


__all__ = ["Stage"]
