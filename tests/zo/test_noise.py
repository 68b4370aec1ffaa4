"""Counter-based perturbation noise: compiled kernel vs the pure-torch reference (the spec),
chunk/thread invariance, statistics, keys, dispatch."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from pocketllm.zo import kernel, noise
from pocketllm.zo.noise import DISTS, reference

_M32 = 0xFFFFFFFF
KEY = noise.derive_key(1234, 5, 6)
UKEY = noise.derive_key(1234, 4, 6)
DTYPES = (torch.float32, torch.bfloat16)


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def kernel_ops():
    ops = kernel.try_load()
    if ops is None:
        pytest.skip(f"noise kernel could not be built: {kernel.load_error()}")
    return ops


@pytest.fixture
def cpp(kernel_ops, monkeypatch):
    """Public functions dispatch to the compiled kernel."""
    monkeypatch.delenv("POCKETLLM_ZO_BACKEND", raising=False)
    assert noise.backend() == "cpp"


def _weights(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g).to(dtype)


def _ulp_rtol(dtype: torch.dtype) -> float:
    return {torch.float32: 2.0**-22, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]


def assert_fused_close(got: torch.Tensor, want: torch.Tensor, dist: str) -> None:
    """Kernel vs reference for fused ops. Rademacher z is bit-exact, so are the results.
    Gaussian z differs by <1e-6 (polynomial log/cos), which can flip a rounding: allow one
    unit in the last place of the dtype, and only rarely."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if dist == "rademacher":
        assert torch.equal(got, want)
        return
    g, w = got.float(), want.float()
    torch.testing.assert_close(g, w, rtol=_ulp_rtol(got.dtype), atol=1e-6)
    if got.dtype != torch.float32:
        assert (g != w).float().mean().item() < 0.01


def _py_hash32(k: int, i: int) -> int:
    """The documented hash, written independently with Python ints."""
    def rounds(x: int, b: int | None = None) -> int:
        x ^= x >> 17
        x = (x * 0xED5AD4BB) & _M32
        if b is not None:
            x = (x + b) & _M32
        x ^= x >> 11
        x = (x * 0xAC4C1B51) & _M32
        x ^= x >> 15
        x = (x * 0x31848BAB) & _M32
        return x ^ (x >> 14)

    lo, hi = i & _M32, i >> 32
    a = rounds(k ^ rounds(hi ^ 0x9E3779B9))
    b = rounds(a ^ 0x85EBCA6B)
    return rounds(lo ^ a, b)


# ----------------------------------------------------------------------------- the spec

def test_reference_hash_matches_documented_formula():
    idx = [0, 1, 2, 255, 256, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**40 + 5, 2**62 + 12345]
    for k in (0, 1, 0xDEADBEEF, _M32):
        got = reference.hash32(k, torch.tensor(idx)).tolist()
        assert got == [_py_hash32(k, i) for i in idx]


def test_reference_golden_values():
    # Pins the spec: these numbers must never change (saved runs regenerate z from keys).
    assert noise.derive_key(0, 0, 0) == 2558736989570252433
    assert KEY == 12476354329786031108
    assert reference.hash32(0, torch.tensor([0, 1, 2**32])).tolist() == [1102774231, 2529610085, 1219307882]
    z = reference.noise(KEY, 2**32 - 2, 4, "gaussian")
    torch.testing.assert_close(z, torch.tensor([0.5968186260, 0.3731819391, -0.0501163900, -0.7327494025]))
    r = reference.noise(KEY, 2**32 - 2, 8, "rademacher")
    assert r.tolist() == [1.0, -1.0, -1.0, -1.0, 1.0, -1.0, 1.0, -1.0]


def test_gaussian_formula_from_hashes():
    k1, k2 = KEY & _M32, KEY >> 32
    idx = [0, 7, 2**32 + 3]
    z = reference.noise_at(KEY, torch.tensor(idx), "gaussian")
    for j, i in enumerate(idx):
        u1 = ((_py_hash32(k1, i) >> 8) + 1) / 2**24
        u2 = (_py_hash32(k2, i) >> 8) / 2**24
        assert z[j].item() == pytest.approx(math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2), abs=1e-6)


# ----------------------------------------------------------------------------- kernel == reference

@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("n,start", [(1, 0), (7, 3), (1000, 2**32 - 500), (1_000_003, 12345)])
def test_noise_matches_reference(cpp, dist, n, start):
    got, want = noise.noise(KEY, start, n, dist), reference.noise(KEY, start, n, dist)
    assert got.dtype == torch.float32 and got.shape == (n,)
    if dist == "rademacher":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("dist", DISTS)
def test_noise_at_matches_noise_and_reference(cpp, dist):
    start, n = 3 * 2**32 - 5000, 10_000  # crosses a 2^32 boundary (new subkeys)
    whole = noise.noise(KEY, start, n, dist)
    g = torch.Generator().manual_seed(1)
    pos = torch.randint(0, n, (40, 25), generator=g)
    got = noise.noise_at(KEY, pos + start, dist)
    assert got.shape == pos.shape
    assert torch.equal(got, whole[pos])  # scalar and vectorised paths agree bit for bit
    want = reference.noise_at(KEY, pos + start, dist)
    torch.testing.assert_close(got, want, rtol=0, atol=0 if dist == "rademacher" else 2e-6)


@pytest.mark.parametrize("dist", DISTS)
def test_chunked_equals_whole(cpp, dist):
    start, n = 2**32 - 777, 5000
    whole = noise.noise(KEY, start, n, dist)
    for k in (1, 255, 256, 777, 1001, 4999):
        parts = torch.cat([noise.noise(KEY, start, k, dist), noise.noise(KEY, start + k, n - k, dist)])
        assert torch.equal(parts, whole)
    row = torch.empty(2, n)[1]
    assert noise.noise(KEY, start, n, dist, out=row) is row
    assert torch.equal(row, whole)
    # fused ops on slices equal the op on the whole tensor
    w = _weights(n, torch.float32)
    a, b = w.clone(), w.clone()
    noise.add_noise_(a, KEY, start, 0.5, dist)
    noise.add_noise_(b[:777], KEY, start, 0.5, dist)
    noise.add_noise_(b[777:], KEY, start + 777, 0.5, dist)
    assert torch.equal(a, b)


def test_reference_chunked_equals_whole():
    for dist in DISTS:
        whole = reference.noise(KEY, 2**32 - 3, 10, dist)
        parts = torch.cat([reference.noise(KEY, 2**32 - 3, 4, dist), reference.noise(KEY, 2**32 + 1, 6, dist)])
        assert torch.equal(parts, whole)


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPES + (torch.float16,))
def test_add_noise_matches_reference(cpp, dist, dtype):
    w = _weights(20_011, dtype)
    got, want = w.clone(), w.clone()
    assert noise.add_noise_(got, KEY, 999, 0.37, dist) is got
    reference.add_noise_(want, KEY, 999, 0.37, dist)
    assert_fused_close(got, want, dist)
    assert not torch.equal(got, w)


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPES + (torch.float16,))
@pytest.mark.parametrize("update", [False, True])
@pytest.mark.parametrize("minus", [True, False])
def test_perturb_pair_matches_reference(cpp, dist, dtype, update, minus):
    w0 = _weights(59 * 209, dtype).view(59, 209)  # any shape, contiguous
    upd = dict(update_key=UKEY, update_coef=-0.25) if update else {}
    results = []
    for impl in (noise.perturb_pair, reference.perturb_pair):
        w = w0.clone()
        plus = torch.full_like(w, 7.0)
        mins = torch.full_like(w, 7.0) if minus else None
        impl(w, KEY, 2**32 - 100, 1e-2, dist, plus, mins, **upd)
        results.append((w, plus, mins))
    (w, plus, mins), (rw, rplus, rmins) = results
    assert_fused_close(w, rw, dist)
    if not update:
        assert torch.equal(w, w0)
    assert_fused_close(plus, rplus, dist)
    if minus:
        assert_fused_close(mins, rmins, dist)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rounding_exhaustive(cpp, dtype):
    # Every finite 16-bit pattern, through load -> w +- eps*z -> round (normal, subnormal,
    # overflow to inf, ties); rademacher z is exact, so results must match bit for bit.
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    w = bits.view(dtype)
    w = w[torch.isfinite(w.float())].contiguous()
    for eps in (0.0, 1e-7, 3e-3, 1.0, 1e4):
        got = [torch.empty_like(w) for _ in range(2)]
        want = [torch.empty_like(w) for _ in range(2)]
        noise.perturb_pair(w, KEY, 3, eps, "rademacher", *got)
        reference.perturb_pair(w, KEY, 3, eps, "rademacher", *want)
        for a, b in zip(got, want):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    nan = torch.full((40,), float("nan"), dtype=dtype)
    out = torch.empty_like(nan)
    noise.perturb_pair(nan, KEY, 0, 1.0, "gaussian", out, None)
    assert torch.isnan(out).all()


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_pair_update_equals_separate_ops(cpp, dist, dtype):
    w0 = _weights(30_001, dtype)
    fused, sep = w0.clone(), w0.clone()
    p1, m1, p2, m2 = (torch.empty_like(w0) for _ in range(4))
    noise.perturb_pair(fused, KEY, 64, 1e-3, dist, p1, m1, update_key=UKEY, update_coef=0.3)
    noise.add_noise_(sep, UKEY, 64, 0.3, dist)
    noise.perturb_pair(sep, KEY, 64, 1e-3, dist, p2, m2)
    assert torch.equal(fused, sep) and torch.equal(p1, p2) and torch.equal(m1, m2)
    # and from the definition: outputs are the stored (rounded) w +- eps z
    z = noise.noise(KEY, 64, w0.numel(), dist)
    eps = torch.tensor(1e-3, dtype=torch.float32)
    assert torch.equal(p1, (sep.float() + z * eps).to(dtype))
    assert torch.equal(m1, (sep.float() - z * eps).to(dtype))
    # a zero coefficient or no key means no update
    w = w0.clone()
    noise.perturb_pair(w, KEY, 64, 1e-3, dist, p1, None, update_key=UKEY, update_coef=0.0)
    assert torch.equal(w, w0)


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_rows(cpp, dist, dtype):
    rows_n, cols = 1000, 77  # odd width: rows straddle blocks
    w = _weights(rows_n * cols, dtype).view(rows_n, cols)
    g = torch.Generator().manual_seed(2)
    rows = torch.randint(0, rows_n, (3, 100), generator=g)  # repeats, any shape
    plus = torch.empty(3, 100, cols, dtype=dtype)
    mins = torch.empty_like(plus)
    noise.perturb_rows(w, rows, KEY, 0.01, dist, plus, mins)
    z = noise.noise(KEY, 0, w.numel(), dist).view(rows_n, cols)
    eps = torch.tensor(0.01, dtype=torch.float32)
    assert torch.equal(plus, (w.float() + z * eps).to(dtype)[rows])
    assert torch.equal(mins, (w.float() - z * eps).to(dtype)[rows])
    rplus, rmins = torch.empty_like(plus), torch.empty_like(plus)
    reference.perturb_rows(w, rows, KEY, 0.01, dist, rplus, rmins)
    assert_fused_close(plus, rplus, dist)
    assert_fused_close(mins, rmins, dist)
    only = torch.empty_like(plus)
    noise.perturb_rows(w, rows, KEY, 0.01, dist, only, None)
    assert torch.equal(only, plus)


@pytest.mark.parametrize("dist", DISTS)
def test_thread_count_independence(cpp, dist):
    n = 1_000_003
    w0 = _weights(n, torch.bfloat16)
    before = torch.get_num_threads()

    def run(threads: int) -> list[torch.Tensor]:
        torch.set_num_threads(threads)
        w, plus, mins = w0.clone(), torch.empty_like(w0), torch.empty_like(w0)
        noise.perturb_pair(w, KEY, 5, 1e-3, dist, plus, mins, update_key=UKEY, update_coef=0.1)
        return [noise.noise(KEY, 5, n, dist), w, plus, mins]

    try:
        one, many = run(1), run(max(2, before))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


@pytest.mark.parametrize("offset", [0, 1])  # 1: not 64-byte aligned -> regular stores
def test_large_outputs_streaming_path(cpp, offset):
    # >= 8 MiB of output takes the streaming-store path; compare with small chunks.
    n = (8 << 20) // 4 + 4321
    base = _weights(n + offset, torch.float32)
    w = base[offset:]
    plus = torch.empty(n + offset)[offset:]
    mins = torch.empty(n + offset)[offset:]
    noise.perturb_pair(w, KEY, 11, 1e-3, "gaussian", plus, mins)
    step = 300_007
    for s in range(0, n, step):
        e = min(n, s + step)
        p, m = torch.empty(e - s), torch.empty(e - s)
        noise.perturb_pair(w[s:e].clone(), KEY, 11 + s, 1e-3, "gaussian", p, m)
        assert torch.equal(plus[s:e], p) and torch.equal(mins[s:e], m)
    assert torch.equal(noise.noise(KEY, 11, n, "gaussian")[:1000], noise.noise(KEY, 11, 1000, "gaussian"))


# ----------------------------------------------------------------------------- statistics

N_STAT = 1_000_000


def test_gaussian_statistics():
    z = noise.noise(KEY, 0, N_STAT, "gaussian").double()
    # standard errors: mean 1/sqrt(n) = 1e-3, std 1/sqrt(2n) = 7e-4, kurtosis sqrt(24/n) = 5e-3,
    # P(|z| < 1) sqrt(p(1-p)/n) = 4.7e-4. Bounds are ~5 standard errors: a fixed key makes
    # the test deterministic, the margin keeps it meaningful for any key.
    assert abs(z.mean().item()) < 5e-3
    assert abs(z.std().item() - 1) < 4e-3
    assert abs(((z - z.mean()) ** 4).mean().item() / z.var().item() ** 2 - 3) < 0.03
    assert abs((z.abs() < 1).double().mean().item() - 0.682689) < 2.5e-3
    assert z.abs().max().item() < math.sqrt(48 * math.log(2)) + 1e-4  # 24-bit u1: |z| <= 5.77


def test_rademacher_statistics():
    z = noise.noise(KEY, 0, N_STAT, "rademacher")
    assert torch.equal(z.abs(), torch.ones_like(z))
    assert abs((z > 0).double().mean().item() - 0.5) < 2.5e-3  # 5 standard errors


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return (a @ b / (a.norm() * b.norm())).item()


@pytest.mark.parametrize("dist", DISTS)
def test_streams_uncorrelated(dist):
    # |corr| of independent streams has standard error 1/sqrt(n) = 1e-3
    z = noise.noise(noise.derive_key(0, 1, 0), 0, N_STAT, dist)
    others = [
        noise.noise(noise.derive_key(0, 2, 0), 0, N_STAT, dist),  # next step
        noise.noise(noise.derive_key(0, 1, 1), 0, N_STAT, dist),  # next parameter
        # raw key one bit apart in each 32-bit half (the halves k1, k2 are used separately:
        # keys sharing a half would share the rademacher signs / the gaussian angles)
        noise.noise(noise.derive_key(0, 1, 0) ^ (1 << 32 | 1), 0, N_STAT, dist),
        noise.noise(noise.derive_key(0, 1, 0), 1, N_STAT, dist),  # same key, shifted by one
        noise.noise(noise.derive_key(0, 1, 0), 2**32, N_STAT, dist),  # next high word
    ]
    for o in others:
        assert abs(_corr(z, o)) < 0.01
    assert abs(_corr(z[1:], z[:-1])) < 0.01


# ----------------------------------------------------------------------------- keys, API, dispatch

def test_derive_key():
    assert noise.derive_key(3, 4, 5) == noise.derive_key(3, 4, 5)
    keys = {noise.derive_key(s, t, i) for s in range(4) for t in range(50) for i in range(50)}
    assert len(keys) == 4 * 50 * 50
    assert all(0 <= k < 2**64 for k in keys)
    assert noise.derive_key(-1, 0, 0) == noise.derive_key(2**64 - 1, 0, 0)
    # roles are not interchangeable
    assert len({noise.derive_key(1, 2, 3), noise.derive_key(2, 1, 3), noise.derive_key(3, 2, 1)}) == 3


def test_add_noise_zero_coef_is_noop():
    w = torch.tensor([-0.0, 1.0, float("inf")])
    v = w._version
    noise.add_noise_(w, KEY, 0, 0.0)
    assert torch.equal(w.view(torch.int32), torch.tensor([-0.0, 1.0, float("inf")]).view(torch.int32))
    noise.add_noise_(w, KEY, 0, 1.0)
    assert w._version > v  # autograd sees the in-place change


def test_validation():
    w = torch.zeros(10)
    with pytest.raises(ValueError):
        noise.noise(KEY, 0, 4, "uniform")
    with pytest.raises(ValueError):
        noise.noise(2**64, 0, 4)
    with pytest.raises(ValueError):
        noise.noise(-1, 0, 4)
    with pytest.raises(ValueError):
        noise.noise(KEY, -1, 4)
    with pytest.raises(ValueError):
        noise.add_noise_(torch.zeros(4, 4).t(), KEY, 0, 1.0)
    with pytest.raises(TypeError):
        noise.add_noise_(torch.zeros(4, dtype=torch.int32), KEY, 0, 1.0)
    with pytest.raises(ValueError):
        noise.perturb_pair(w, KEY, 0, 1.0, "gaussian", torch.zeros(9), None)
    with pytest.raises(ValueError):
        noise.perturb_pair(w, KEY, 0, 1.0, "gaussian", torch.zeros(10, dtype=torch.bfloat16), None)
    with pytest.raises(ValueError, match="overlap"):
        noise.perturb_pair(w, KEY, 0, 1.0, "gaussian", w, None)
    assert noise.noise(KEY, 0, 0).numel() == 0
    noise.perturb_pair(torch.zeros(0), KEY, 0, 1.0, "gaussian", torch.zeros(0), torch.zeros(0))
    with pytest.raises(IndexError):
        noise.perturb_rows(torch.zeros(3, 2), torch.tensor([3]), KEY, 1.0, "gaussian", torch.zeros(2))


def test_backend_env_and_fallback(monkeypatch):
    monkeypatch.setenv("POCKETLLM_ZO_BACKEND", "torch")
    assert noise.backend() == "torch"
    monkeypatch.setenv("POCKETLLM_ZO_BACKEND", "bogus")
    with pytest.raises(ValueError):
        noise.backend()

    # a kernel that fails to build: one warning, then the reference; "cpp" makes it an error
    monkeypatch.setattr(kernel, "try_load", lambda: None)
    monkeypatch.setattr(kernel, "load_error", lambda: "RuntimeError: no compiler")
    monkeypatch.setattr(noise, "_warned", False)
    monkeypatch.delenv("POCKETLLM_ZO_BACKEND")
    with pytest.warns(RuntimeWarning, match="no compiler"):
        assert noise.backend() == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert noise.backend() == "torch"
        torch.testing.assert_close(noise.noise(KEY, 5, 3), reference.noise(KEY, 5, 3))
    monkeypatch.setenv("POCKETLLM_ZO_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="no compiler"):
        noise.backend()


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("POCKETLLM_CACHE", str(tmp_path))
    assert kernel.cache_dir() == tmp_path / "kernels"
    assert kernel.cache_dir().is_dir()
