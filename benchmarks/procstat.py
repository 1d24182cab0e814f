"""Memory of the running process, read from /proc/self/status: one reader for every benchmark."""
from __future__ import annotations

import resource


def status_mb(field: str) -> float | None:
    """``field`` of /proc/self/status (``VmRSS``, ``VmHWM``, ...) in MB; None where there is no /proc."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: unlike ru_maxrss it does not carry over the RSS of
    the parent that forked it before exec), MB."""
    peak = status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
