"""Peak resident memory of the running process, as the benchmarks report it."""

from __future__ import annotations

import resource


def peak_rss_kb() -> int:
    """Peak RSS of this process image in KiB (VmHWM on Linux).

    Not ``ru_maxrss``: Linux carries the parent's peak across fork + exec into it, so in a
    benchmark subprocess it reports the driver's memory when that was larger (a child of a
    300 MB driver reads 317 MB there and 10 MB in VmHWM). ``ru_maxrss`` elsewhere.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
