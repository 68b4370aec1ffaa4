"""Seeded, counter-based perturbation noise for zeroth-order (MeZO-style) steps.

A ZO step regenerates its perturbation ``z`` from a key instead of storing it. Every
value depends only on ``(key, i)`` where ``i`` is the element's *global flat index*, so a
parameter can be generated whole, in chunks, by rows, in any order and on any number of
threads with identical results.

Definition (all arithmetic mod 2**32 unless noted)::

    key in [0, 2**64):   k1 = key & 0xFFFFFFFF,  k2 = key >> 32
    mix32(x):            x ^= x >> 17; x *= 0xED5AD4BB; x ^= x >> 11; x *= 0xAC4C1B51
                         x ^= x >> 15; x *= 0x31848BAB; x ^= x >> 14      (triple32)
    h(k, i):             lo = i & 0xFFFFFFFF,  hi = i >> 32
                         a = mix32(k ^ mix32(hi ^ 0x9E3779B9))            (subkeys of (k, hi))
                         b = mix32(a ^ 0x85EBCA6B)
                         x = lo ^ a
                         x ^= x >> 17; x *= 0xED5AD4BB; x += b
                         x ^= x >> 11; x *= 0xAC4C1B51
                         x ^= x >> 15; x *= 0x31848BAB; x ^= x >> 14;     h = x

    rademacher:  z(i) = +1 if h(k1, i) < 2**31 else -1                (top bit; k2 unused)
    gaussian:    u1 = ((h(k1, i) >> 8) + 1) / 2**24   in (0, 1]        (never 0)
                 u2 =  (h(k2, i) >> 8)      / 2**24   in [0, 1)
                 z(i) = sqrt(-2 ln u1) * cos(2 pi u2)                    (float32 result)

The subkeys only change every 2**32 elements, so the compiled kernel computes them once
per block and the per-element cost is one 3-multiply hash (two for gaussian). Taking 24
bits makes the int -> float conversion exact; the gaussian tail is cut at
sqrt(48 ln 2) = 5.77 (probability ~8e-9 per element for a true normal).

Fused ops compute in float32 -- ``w + (c * z)`` with ``c`` rounded to float32, a separate
multiply and add -- and round the result to the tensor's dtype (float32, bfloat16,
float16) to nearest even, as ``Tensor.to`` does.

Backends: the compiled kernel (``kernel.cpp``, see :mod:`pocketllm.zo.kernel`) when it
builds, else the pure-torch reference in :data:`reference`. ``POCKETLLM_ZO_BACKEND=torch``
forces the reference; ``=cpp`` makes a kernel build failure an error. The reference
implements the same hash with int64 tensor ops and evaluates log/cos in float64 (it is
the spec): rademacher values and fused results agree bit for bit, gaussian ``z`` agrees
to ~1e-6 absolute (polynomial log/cos in the kernel), so gaussian fused results can
differ in the last unit of the dtype.

Keys must be well mixed (use :func:`derive_key`): the two 32-bit halves are used
separately, so keys sharing ``k1`` give the same rademacher signs, and keys sharing
``k2`` the same gaussian angles (correlation pi/4 ~ 0.79).
"""

from __future__ import annotations

import math
import os
import warnings
from types import SimpleNamespace
from typing import Any

import torch

from pocketllm.zo import kernel as _kernel_build

__all__ = [
    "DISTS",
    "derive_key",
    "splitmix64",
    "noise",
    "noise_at",
    "add_noise_",
    "perturb_pair",
    "perturb_rows",
    "backend",
    "reference",
]

DISTS = ("gaussian", "rademacher")
_DIST_ID = {"gaussian": 0, "rademacher": 1}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_MAX_INDEX = 2**63  # global indices are int64 in the kernel and the reference


# ----------------------------------------------------------------------------- keys

def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def splitmix64(x: int) -> int:
    """The splitmix64 mix of ``x`` mod 2**64 (a bijection on 64-bit ints): how keys are made
    from seeds, here for callers that derive their own (``zo.log.KeySpace``)."""
    return _splitmix64(int(x) & _M64)


def derive_key(seed: int, step: int, index: int) -> int:
    """A well-mixed 64-bit key for (run seed, step, parameter index).

    ``splitmix64(splitmix64(splitmix64(seed) ^ step) ^ index)`` with every input taken
    mod 2**64 (negative ints wrap). Each stage is a bijection, so keys are distinct for
    distinct steps (or indices) under a fixed prefix, and unrelated otherwise.
    """
    x = _splitmix64(int(seed) & _M64)
    x = _splitmix64(x ^ (int(step) & _M64))
    return _splitmix64(x ^ (int(index) & _M64))


def _split_key(key: int) -> tuple[int, int]:
    key = int(key)
    if not 0 <= key <= _M64:
        raise ValueError(f"key must be in [0, 2**64), got {key}")
    return key & _M32, key >> 32


def _check_dist(dist: str) -> int:
    try:
        return _DIST_ID[dist]
    except KeyError:
        raise ValueError(f"dist must be one of {DISTS}, got {dist!r}") from None


def _check_range(start: int, n: int) -> None:
    if start < 0 or n < 0 or start + n > _MAX_INDEX:
        raise ValueError(f"indices [{start}, {start + n}) must lie in [0, 2**63)")


def _check_tensor(t: torch.Tensor, name: str) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {_DTYPES}")


def _span(t: torch.Tensor) -> tuple[int, int]:
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def _check_out(out: torch.Tensor, w: torch.Tensor, numel: int, name: str) -> None:
    _check_tensor(out, name)
    if out.dtype != w.dtype or out.numel() != numel:
        raise ValueError(f"{name} must have dtype {w.dtype} and {numel} elements, "
                         f"got {out.dtype} with {out.numel()}")
    (a0, a1), (b0, b1) = _span(out), _span(w)
    if out.numel() and w.numel() and a0 < b1 and b0 < a1:
        raise ValueError(f"{name} must not overlap w")


# ----------------------------------------------------------------------------- reference

def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), without overflowing int64."""
    lo, hi = c & 0xFFFF, c >> 16
    # * 2**16 rather than << 16: the same value, and a core ATen op (an exported program)
    return (x * lo + ((x * hi) & 0xFFFF) * 0x10000) & _M32


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    # Values stay in [0, 2**32), so int64's arithmetic >> acts as a logical shift.
    return x >> s


def _mix32(x: torch.Tensor, shr=_shr) -> torch.Tensor:
    # `shr`: how x >> s is computed (an exported program divides: pocketllm.engines.program)
    x = x ^ shr(x, 17)
    x = _mul32(x, 0xED5AD4BB)
    x = x ^ shr(x, 11)
    x = _mul32(x, 0xAC4C1B51)
    x = x ^ shr(x, 15)
    x = _mul32(x, 0x31848BAB)
    return x ^ shr(x, 14)


def _subkeys(k: int, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(key, high word) subkeys a, b."""
    a = _mix32(_mix32(hi ^ 0x9E3779B9) ^ k)
    return a, _mix32(a ^ 0x85EBCA6B)


def _hash32(k: int, index: torch.Tensor) -> torch.Tensor:
    """h(k, i) for a 32-bit key and int64 indices >= 0; int64 result in [0, 2**32)."""
    index = index.to(torch.int64)
    lo, hi = index & _M32, index >> 32
    # Subkeys depend on (k, hi) only: compute them once per distinct high word.
    a: torch.Tensor | int
    b: torch.Tensor | int
    if index.numel() and int(hi.min()) == int(hi.max()):  # the usual case: one high word
        a, b = _subkeys(k, torch.tensor([int(hi.min())]))
        a, b = int(a), int(b)
    else:
        his, inverse = torch.unique(hi, return_inverse=True)
        a, b = _subkeys(k, his)
        a, b = a[inverse], b[inverse]
    return _hash_lo(lo, a, b)


def _hash_lo(lo: torch.Tensor, a, b, shr=_shr) -> torch.Tensor:
    """h's per-element part: low words `lo` under subkeys a, b (ints or broadcastable int64
    tensors). Plain int64 tensor ops, so an exported program (pocketllm.engines.program)
    generates the same bits."""
    x = lo ^ a
    x = x ^ shr(x, 17)
    x = (_mul32(x, 0xED5AD4BB) + b) & _M32
    x = x ^ shr(x, 11)
    x = _mul32(x, 0xAC4C1B51)
    x = x ^ shr(x, 15)
    x = _mul32(x, 0x31848BAB)
    return x ^ shr(x, 14)


def _torch_noise_at(key: int, index: torch.Tensor, dist: str = "gaussian") -> torch.Tensor:
    """Reference: float32 z at int64 flat indices (any shape)."""
    k1, k2 = _split_key(key)
    dist_id = _check_dist(dist)
    if index.numel() and int(index.min()) < 0:
        raise ValueError("indices must be >= 0")
    h1 = _hash32(k1, index)
    if dist_id == _DIST_ID["rademacher"]:
        return (1 - 2 * (h1 >> 31)).to(torch.float32)
    h2 = _hash32(k2, index)
    u1 = ((h1 >> 8) + 1).to(torch.float64) * 2.0**-24
    u2 = (h2 >> 8).to(torch.float64) * 2.0**-24
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).to(torch.float32)


def _torch_noise(key: int, start: int, n: int, dist: str = "gaussian") -> torch.Tensor:
    """Reference: float32 z for flat indices start .. start+n-1."""
    _check_range(start, n)
    return _torch_noise_at(key, torch.arange(start, start + n, dtype=torch.int64), dist)


def _f32(c: float) -> torch.Tensor:
    return torch.tensor(c, dtype=torch.float32)


@torch.no_grad()
def _torch_add_noise_(w: torch.Tensor, key: int, start: int, coef: float,
                      dist: str = "gaussian") -> torch.Tensor:
    """Reference: w = round_dtype(w + coef * z), in place."""
    _check_tensor(w, "w")
    if coef == 0:
        return w
    z = _torch_noise(key, start, w.numel(), dist)
    flat = w.view(-1)
    flat.copy_((flat.float() + z * _f32(coef)).to(w.dtype))
    return w


@torch.no_grad()
def _torch_perturb_pair(w: torch.Tensor, key: int, start: int, eps: float, dist: str,
                        out_plus: torch.Tensor, out_minus: torch.Tensor | None,
                        update_key: int | None = None, update_coef: float = 0.0) -> None:
    """Reference for :func:`perturb_pair`."""
    _check_tensor(w, "w")
    _check_out(out_plus, w, w.numel(), "out_plus")
    if out_minus is not None:
        _check_out(out_minus, w, w.numel(), "out_minus")
    if update_key is not None and update_coef != 0:
        _torch_add_noise_(w, update_key, start, update_coef, dist)
    wf = w.reshape(-1).float()
    d = _torch_noise(key, start, w.numel(), dist) * _f32(eps)
    out_plus.view(-1).copy_((wf + d).to(w.dtype))
    if out_minus is not None:
        out_minus.view(-1).copy_((wf - d).to(w.dtype))


@torch.no_grad()
def _torch_perturb_rows(w: torch.Tensor, rows: torch.Tensor, key: int, eps: float, dist: str,
                        out_plus: torch.Tensor, out_minus: torch.Tensor | None = None) -> None:
    """Reference for :func:`perturb_rows`."""
    _check_rows(w, rows, out_plus, out_minus)
    n_cols = w.shape[1]
    r = rows.reshape(-1)
    index = r[:, None] * n_cols + torch.arange(n_cols, dtype=torch.int64)
    d = _torch_noise_at(key, index, dist) * _f32(eps)
    wf = w[r].float()
    out_plus.view(-1).copy_((wf + d).to(w.dtype).view(-1))
    if out_minus is not None:
        out_minus.view(-1).copy_((wf - d).to(w.dtype).view(-1))


def _check_rows(w: torch.Tensor, rows: torch.Tensor, out_plus: torch.Tensor,
                out_minus: torch.Tensor | None) -> None:
    _check_tensor(w, "w")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D, got shape {tuple(w.shape)}")
    if rows.dtype != torch.int64 or rows.device.type != "cpu":
        raise TypeError("rows must be a CPU int64 tensor")
    numel = rows.numel() * w.shape[1]
    _check_out(out_plus, w, numel, "out_plus")
    if out_minus is not None:
        _check_out(out_minus, w, numel, "out_minus")
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= w.shape[0]):
        raise IndexError(f"rows must lie in [0, {w.shape[0]})")


#: The pure-torch reference implementation (the spec the kernel is tested against).
reference = SimpleNamespace(
    hash32=_hash32,
    subkeys=_subkeys,
    hash_lo=_hash_lo,
    noise=_torch_noise,
    noise_at=_torch_noise_at,
    add_noise_=_torch_add_noise_,
    perturb_pair=_torch_perturb_pair,
    perturb_rows=_torch_perturb_rows,
)


# ----------------------------------------------------------------------------- dispatch

_warned = False


def _kernel() -> Any | None:
    """The compiled kernel, or None when the torch reference should be used."""
    global _warned
    mode = os.environ.get("POCKETLLM_ZO_BACKEND", "").strip().lower()
    if mode == "torch":
        return None
    if mode not in ("", "auto", "cpp"):
        raise ValueError(f"POCKETLLM_ZO_BACKEND must be 'torch', 'cpp' or unset, got {mode!r}")
    mod = _kernel_build.try_load()
    if mod is None:
        why = _kernel_build.load_error()
        if mode == "cpp":
            raise RuntimeError(f"POCKETLLM_ZO_BACKEND=cpp but the noise kernel failed to build: {why}")
        if not _warned:
            _warned = True
            warnings.warn(f"pocketllm: compiled noise kernel unavailable ({why}); "
                          "using the slow pure-torch reference", RuntimeWarning, stacklevel=3)
    return mod


def backend() -> str:
    """``"cpp"`` if the compiled kernel is in use, else ``"torch"``."""
    return "cpp" if _kernel() is not None else "torch"


def _bump(*tensors: torch.Tensor | None) -> None:
    # The kernel writes through raw pointers: tell autograd the tensors changed.
    for t in tensors:
        if t is not None:
            torch.autograd.graph.increment_version(t)


def noise(key: int, start: int, n: int, dist: str = "gaussian", *,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 z for global flat indices ``start .. start+n-1`` (written into ``out``, a
    contiguous float32 tensor of ``n`` elements, if given)."""
    if out is not None and (out.dtype != torch.float32 or out.numel() != n
                            or not out.is_contiguous() or out.device.type != "cpu"):
        raise ValueError(f"out must be a contiguous CPU float32 tensor of {n} elements")
    mod = _kernel()
    if mod is None:
        z = _torch_noise(key, start, n, dist)
        return z if out is None else out.view(-1).copy_(z).view_as(out)
    k1, k2 = _split_key(key)
    dist_id = _check_dist(dist)
    _check_range(start, n)
    if out is None:
        out = torch.empty(n, dtype=torch.float32)
    mod.noise_out(out, k1, k2, start, dist_id)
    _bump(out)
    return out


def noise_at(key: int, index: torch.Tensor, dist: str = "gaussian") -> torch.Tensor:
    """float32 z at arbitrary int64 global flat indices (result has ``index``'s shape)."""
    mod = _kernel()
    if mod is None:
        return _torch_noise_at(key, index, dist)
    k1, k2 = _split_key(key)
    dist_id = _check_dist(dist)
    idx = index.to(torch.int64).contiguous()
    out = torch.empty(idx.shape, dtype=torch.float32)
    mod.noise_at(idx, out, k1, k2, dist_id)
    return out


def add_noise_(w: torch.Tensor, key: int, start: int, coef: float,
               dist: str = "gaussian") -> torch.Tensor:
    """In place ``w += coef * z``; ``w`` is contiguous and its flat index 0 is global index
    ``start``. Computed in float32, rounded to ``w.dtype``. Returns ``w``."""
    mod = _kernel()
    if mod is None:
        return _torch_add_noise_(w, key, start, coef, dist)
    k1, k2 = _split_key(key)
    dist_id = _check_dist(dist)
    _check_tensor(w, "w")
    _check_range(start, w.numel())
    if coef != 0:
        mod.add_noise(w, k1, k2, start, float(coef), dist_id)
        _bump(w)
    return w


def perturb_pair(w: torch.Tensor, key: int, start: int, eps: float, dist: str,
                 out_plus: torch.Tensor, out_minus: torch.Tensor | None,
                 update_key: int | None = None, update_coef: float = 0.0) -> None:
    """Write ``out_plus = w + eps*z`` and ``out_minus = w - eps*z`` (z from ``key``) in one pass.

    If ``update_key`` is given and ``update_coef != 0``, first apply the previous step's
    update in place, ``w += update_coef * z_update`` (rounded to ``w.dtype``); the outputs
    are computed from the stored, updated ``w``. ``out_minus=None`` writes only
    ``out_plus``. Outputs: contiguous, ``w``'s dtype and numel (any shape).
    """
    mod = _kernel()
    if mod is None:
        _torch_perturb_pair(w, key, start, eps, dist, out_plus, out_minus, update_key, update_coef)
        return
    k1, k2 = _split_key(key)
    dist_id = _check_dist(dist)
    _check_tensor(w, "w")
    _check_range(start, w.numel())
    _check_out(out_plus, w, w.numel(), "out_plus")
    if out_minus is not None:
        _check_out(out_minus, w, w.numel(), "out_minus")
    has_update = update_key is not None and update_coef != 0
    uk1, uk2 = _split_key(update_key) if has_update else (0, 0)
    mod.perturb_pair(w, k1, k2, start, float(eps), dist_id, out_plus, out_minus,
                     has_update, uk1, uk2, float(update_coef))
    _bump(w if has_update else None, out_plus, out_minus)


def perturb_rows(w: torch.Tensor, rows: torch.Tensor, key: int, eps: float, dist: str,
                 out_plus: torch.Tensor, out_minus: torch.Tensor | None = None) -> None:
    """Rows of a perturbed table: ``out_plus[j, c] = w[rows[j], c] + eps * z(rows[j]*C + c)``
    (``out_minus`` with ``-eps``; may be None). ``w`` is a contiguous (R, C) table (global
    index 0 is ``w[0, 0]``), ``rows`` int64 of any shape, outputs ``rows.numel() * C``
    elements (e.g. shaped ``(*rows.shape, C)``) -- an embedding lookup of ``w +- eps*z``.
    """
    mod = _kernel()
    if mod is None:
        _torch_perturb_rows(w, rows, key, eps, dist, out_plus, out_minus)
        return
    k1, k2 = _split_key(key)
    dist_id = _check_dist(dist)
    _check_rows(w, rows, out_plus, out_minus)
    mod.perturb_rows(w, rows.reshape(-1).contiguous(), k1, k2, float(eps), dist_id,
                     out_plus, out_minus)
    _bump(out_plus, out_minus)
