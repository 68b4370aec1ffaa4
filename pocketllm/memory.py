"""Process memory: peak resident set size, and resetting it after model loading.

Peak RSS is what decides whether a run fits on a device. Loading a model briefly needs more than
holding it, so the figure that tells the methods apart is the peak *after* loading: Linux lets a
process reset its high-water mark (writing 5 to /proc/self/clear_refs), which we do once the
model is in memory. A method's peak is measured in a process of its own (`run_in_fresh_process`).

Imports nothing of pocketllm: every layer may use it.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
# the measured workload, run as a module in a child process (never imported here: it is the
# package's top layer, this module its bottom)
WORKLOAD = "pocketllm.workload"


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


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_tuned = False


def _mallopt(*settings: tuple[int, int]) -> bool:
    """glibc's mallopt(param, value) for each setting; False (nothing done) off Linux, with
    POCKETLLM_MALLOC_TUNE=0, or on a libc without mallopt (musl)."""
    import ctypes
    import os
    if os.environ.get("POCKETLLM_MALLOC_TUNE", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all([libc.mallopt(param, value) == 1 for param, value in settings])
    except (OSError, AttributeError):
        return False


def tune_allocator(mmap_threshold_mb: int = 32, trim_threshold_mb: int = 1024) -> bool:
    """Keep freed activation buffers in the heap instead of returning them to the OS.

    With glibc's defaults a tensor of a few MB (an MLP activation at batch 16 x 64) is mmapped
    when allocated and unmapped when freed, so every forward page-faults its activations in
    again and the kernel zeroes them: 230k faults (900 MB zeroed) per forward of the default
    model at 16 x 64, which made a 16-row forward cost more than two 8-row ones
    (benchmarks/results/zo_step.md). Serving such sizes from the heap (mmap threshold 32 MB,
    glibc's maximum) and not trimming the heap's top below 1 GB removes them: 0 faults, the
    same peak RSS (the heap's high-water mark is the peak anyway). Applied once per process;
    returns whether it applied."""
    global _tuned
    if not _tuned:
        _tuned = _mallopt((_M_MMAP_THRESHOLD, mmap_threshold_mb << 20),
                          (_M_TRIM_THRESHOLD, trim_threshold_mb << 20))
    return _tuned


def limit_arenas(n: int = 1) -> bool:
    """At most `n` glibc malloc arenas. A split-mode device runs its forward in one thread and
    gRPC plus the private-label head pass in others; with an arena per thread each keeps its own
    freed memory, and the device peaked 70 MB higher (benchmarks/results/split.md: 997 -> 926
    MB with labels sent, 1085 -> 1024 MB with private labels, inference 924). Call before the
    threads start. Returns whether it applied."""
    return _mallopt((_M_ARENA_MAX, n))


def server_allocator(mmap_threshold_kb: int = 128) -> bool:
    """A long-running server's heap: one arena (`limit_arenas`), and a *fixed* mmap threshold,
    so every tensor above it (a side network's wider weights and moments, a step's
    activations) is its own mapping, returned to the OS when freed. glibc's dynamic threshold
    would instead move such sizes into the heap after the first free, where sessions evicted and
    reloaded amid steps leave holes the heap keeps (`trim_heap` returns the rest). Returns
    whether it applied."""
    return _mallopt((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, mmap_threshold_kb << 10))


def trim_heap() -> bool:
    """glibc's malloc_trim(0): give the heap's free pages back to the OS (after a server drops
    a session). False where unavailable."""
    import ctypes
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def run_in_fresh_process(method: str, **kw) -> dict:
    """`python -m pocketllm.workload --method method --k v ...` in a fresh process (so its peak
    RSS is its own): `method` is inference, naive-zo or a registered method, `kw` the workload's
    flags (trainable, model, dtype, batch_size, seq, steps, warmup, ...) and the method's
    settings (a bool as --k / --no-k, a list as its items). Returns the JSON it prints;
    RuntimeError with the child's stderr if it fails."""
    cmd = [sys.executable, "-m", WORKLOAD, "--method", method]
    for k, v in kw.items():
        name = k.replace("_", "-")
        if isinstance(v, bool):
            cmd.append(f"--{name}" if v else f"--no-{name}")
        else:
            cmd += [f"--{name}", *map(str, v if isinstance(v, (list, tuple)) else [v])]
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
