"""Process memory: peak resident set size, and resetting it after model loading.

Peak RSS is what decides whether a run fits on a device. Loading a model briefly needs more than
holding it, so the figure that tells the methods apart is the peak *after* loading: Linux lets a
process reset its high-water mark (writing 5 to /proc/self/clear_refs), which we do once the
model is in memory.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    """Current resident set size in MiB."""
    kb = _status_kb("VmRSS")
    if kb is None:
        import psutil
        return psutil.Process().memory_info().rss / 2**20
    return kb / 1024


def peak_rss_mb() -> float:
    """Peak resident set size since the process started or since `reset_peak()`, in MiB."""
    kb = _status_kb("VmHWM")
    if kb is None:  # not Linux: ru_maxrss (bytes on macOS, KiB elsewhere), never reset
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r / 2**20 if sys.platform == "darwin" else r / 1024
    return kb / 1024


def reset_peak() -> bool:
    """Make the peak equal the current RSS. Returns False where the OS does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
