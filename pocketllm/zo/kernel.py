"""Build and load the fused noise kernel (``kernel.cpp``) as a torch C++ extension.

The extension registers torch ops (``torch.ops.pocketllm_zo.*``). It is compiled once
with ``torch.utils.cpp_extension.load`` (-O3 -march=native -fopenmp) into a cache
directory and loaded directly (no ninja run) afterwards, so loading an already-built
kernel takes well under a second.

Cache: ``$POCKETLLM_CACHE/kernels`` if set, else ``~/.cache/pocketllm/kernels``. Each
build lives in a sub-directory keyed by a hash of the source, the compiler flags, the
torch and Python versions and the CPU (``-march=native`` code must not run on another
CPU model that shares the cache), so a stale or foreign binary is never picked up.

``python -m pocketllm.zo.kernel`` builds the kernel; ``benchmarks/noise_kernel.py`` times
its ops against ``torch.Tensor.normal_``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

EXT_NAME = "pocketllm_zo_kernel"
OPS_NAMESPACE = "pocketllm_zo"  # TORCH_LIBRARY name in kernel.cpp
SOURCE = Path(__file__).with_name("kernel.cpp")
EXTRA_CFLAGS = [
    "-O3",
    "-march=native",
    "-fopenmp",  # at::parallel_for is inline OpenMP: without this it runs serially
    "-ffp-contract=off",  # w + c*z as a separate multiply and add, like the torch reference
    "-fno-math-errno",  # lets sqrt/fma vectorise
    "-fno-trapping-math",
]
EXTRA_LDFLAGS = ["-fopenmp"]  # resolves to libgomp.so.1, the runtime torch already loaded

_STALE_LOCK_S = 600.0  # a build takes ~15 s; a lock file this old is left over from a crash

_lock = threading.Lock()
_module: Any | None = None
_error: str | None = None


def cache_dir() -> Path:
    """The kernel cache root (created on demand)."""
    root = os.environ.get("POCKETLLM_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "pocketllm"
    path = base / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cpu_signature() -> str:
    """CPU model and ISA flags (what -march=native depends on)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "cpu family", "model\t"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def build_dir() -> Path:
    """Directory of the build matching this source, flags, torch, Python and CPU."""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), repr(EXTRA_CFLAGS + EXTRA_LDFLAGS).encode(),
                 torch.__version__.encode(), sys.version.encode(), _cpu_signature().encode()):
        h.update(part)
        h.update(b"\0")
    path = cache_dir() / f"{EXT_NAME}-{h.hexdigest()[:16]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _ops() -> Any:
    return getattr(torch.ops, OPS_NAMESPACE)


def _import_built(path: Path) -> Any | None:
    """Load an already-built library without invoking ninja (the fast path)."""
    so = path / f"{EXT_NAME}.so"
    lock = path / "lock"  # torch's FileBaton: a build is in progress
    try:
        if time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
            lock.unlink()  # left by a killed build; torch would wait on it forever
    except FileNotFoundError:
        pass
    if not so.is_file() or lock.exists():
        return None
    torch.ops.load_library(str(so))
    return _ops()


def load(verbose: bool = False) -> Any:
    """Return the kernel's op namespace (``torch.ops.pocketllm_zo``), building it first if
    needed. Raises on failure."""
    global _module, _error
    with _lock:
        if _module is not None:
            return _module
        path = build_dir()
        module = None
        try:
            module = _import_built(path)
        except OSError:
            module = None  # corrupt or incompatible binary: rebuild below
        if module is None:
            from torch.utils.cpp_extension import load as cpp_load

            # is_python_module=False: the library registers torch ops (TORCH_LIBRARY) and
            # is loaded with torch.ops.load_library.
            cpp_load(
                name=EXT_NAME,
                sources=[str(SOURCE)],
                extra_cflags=EXTRA_CFLAGS,
                extra_ldflags=EXTRA_LDFLAGS,
                build_directory=str(path),
                verbose=verbose,
                is_python_module=False,
            )
            module = _ops()
        _module, _error = module, None
        return module


def try_load() -> Any | None:
    """Like :func:`load` but returns None on failure (see :func:`load_error`). Cached."""
    global _error
    if _module is not None:
        return _module
    if _error is not None:
        return None
    try:
        return load()
    except Exception as exc:  # compiler missing, build error, import error, ...
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        # A build error's message is the whole compiler log: keep its first error line.
        errors = [ln for ln in lines if "error:" in ln.lower()]
        detail = errors[0] if errors else (lines[-1] if lines else "")
        _error = f"{type(exc).__name__}: {detail}"[:500]
        return None


def load_error() -> str | None:
    """Why the last :func:`try_load` failed, or None."""
    return _error


def _main() -> None:
    """Build the kernel (what `make install` runs) and say where it is; a failed build exits 1.
    Timings of the ops: `python benchmarks/noise_kernel.py` (this module sits below noise.py
    and does not import it)."""
    print(f"cache: {cache_dir()}")
    t0 = time.perf_counter()
    try:
        mod = load(verbose="-v" in sys.argv)
    except Exception as exc:
        print(f"build failed: {exc}")
        raise SystemExit(1)
    print(f"kernel: {build_dir()} (isa {mod.isa()}), load {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    _main()
