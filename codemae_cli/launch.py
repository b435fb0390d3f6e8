"""torchrun with one sentence instead of the launcher's traceback.

    python -m codemae_cli.launch --standalone --nproc_per_node=8 -m codemae_cli pretrain recipes/hr.yaml

Takes exactly torchrun's arguments and runs torchrun itself (``torch.distributed.run``). Plain
``torchrun`` works just as well; only its own ending differs: when a process of the job fails it
has already printed our sentence ("Error: ..."), and torchrun then prints a ``ChildFailedError``
traceback of its own; on Ctrl-C every process prints "Interrupted." and torchrun a
``SignalException`` traceback. This entry point replaces those two tracebacks with one line.
"""

from __future__ import annotations

import signal
import sys
from typing import Optional

# How a process ends when it stops because another one did: "Interrupted." (130), "Stopped" (143),
# or the launcher's own SIGTERM/SIGINT after its sentence; "lost contact" exits with 1, as an
# uncaught error does, so exit code 1 is only maybe an echo.
_ECHO_EXITS = (130, 143, -signal.SIGTERM, -signal.SIGINT)


def _first_failure(failures: dict):
    """The rank that ended first. torchrun stamps each failure in whole seconds, when it notices it:
    a rank that lost contact with a killed one often ends within the same second, so among equal
    stamps an ending that cannot be an echo of another's (a signal such as SIGKILL, a crash) wins."""
    def order(item):
        rank, failure = item
        echo = 2 if failure.exitcode in _ECHO_EXITS else 1 if failure.exitcode == 1 else 0
        return failure.timestamp, echo, rank

    return min(failures.items(), key=order)


def main(argv: Optional[list[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except SignalException:
        print("Interrupted: torchrun stopped every process of the job.", file=sys.stderr)
        return 130
    except ChildFailedError as err:
        rank, failure = _first_failure(err.failures)
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        print(f"Error: the torchrun job stopped: rank {rank} ended first ({how}); its message, if any, is above.",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
