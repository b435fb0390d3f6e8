"""torchrun with one sentence instead of the launcher's traceback.

    python -m codemae_cli.launch --standalone --nproc_per_node=8 -m codemae_cli pretrain recipes/hr.yaml

Takes exactly torchrun's arguments and runs torchrun itself (``torch.distributed.run``). Plain
``torchrun`` works just as well; only its own ending differs: when a process of the job fails it
has already printed our sentence ("Error: ..."), and torchrun then prints a ``ChildFailedError``
traceback of its own; on Ctrl-C every process prints "Interrupted." and torchrun a
``SignalException`` traceback. This entry point replaces those two tracebacks with one line.
"""

from __future__ import annotations

import sys
from typing import Optional


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
        rank, failure = err.get_first_failure()
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        print(f"Error: the torchrun job stopped: rank {rank} ended first ({how}); its message, if any, is above.",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
