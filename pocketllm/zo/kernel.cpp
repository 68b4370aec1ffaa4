// Fused, counter-based perturbation noise for zeroth-order (MeZO-style) fine-tuning.
//
// Every value depends only on (key, global flat element index), so any chunk, row or
// thread split of a tensor regenerates identical numbers. The exact definition lives in
// pocketllm/zo/noise.py (the pure-torch reference is the spec this file is tested against):
//
//   lo = i mod 2^32, hi = i >> 32                       (i: global flat index)
//   a  = mix32(k ^ mix32(hi ^ 0x9E3779B9))              (per-(key, hi) subkeys, computed
//   b  = mix32(a ^ 0x85EBCA6B)                           once per block, not per element)
//   x  = lo ^ a
//   x ^= x >> 17; x *= 0xED5AD4BB; x += b              (triple32 finalizer with the second
//   x ^= x >> 11; x *= 0xAC4C1B51                        subkey injected after round one)
//   x ^= x >> 15; x *= 0x31848BAB; x ^= x >> 14;  h(k, i) = x
//   mix32 = the same finalizer without the key terms (triple32, C. Wellons).
//
//   rademacher: z = +1 if the top bit of h(k1, i) is 0 else -1.
//   gaussian:   u1 = ((h(k1,i) >> 8) + 1) / 2^24 in (0, 1], u2 = (h(k2,i) >> 8) / 2^24 in [0, 1)
//               z  = sqrt(-2 ln u1) * cos(2 pi u2)           (float32)
//
// Vectorisation: the per-element work is written as branch-free loops over fixed-size
// blocks (`#pragma omp simd`, compiled with -O3 -march=native), so GCC emits AVX2 /
// AVX-512 code. log and cos are short polynomials (no libm calls) accurate to ~1e-7.
// Threads: at::parallel_for (torch's OpenMP pool; the extension is built with -fopenmp
// and shares torch's libgomp).
//
// Rounding: fused ops compute `w + (c * z)` in float32 with separate multiply and add
// (built with -ffp-contract=off, so no FMA contraction), exactly like the torch reference,
// then round to the storage dtype with round-to-nearest-even like Tensor.to().

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <type_traits>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

constexpr int kBlock = 256;             // elements per generated block (1 KiB of z, L1-resident)
constexpr int64_t kGrain = 1 << 15;     // minimum elements per thread task
constexpr int kGaussian = 0;
constexpr int kRademacher = 1;

// ---------------------------------------------------------------- bit helpers

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// ---------------------------------------------------------------- hash

inline uint32_t mix32(uint32_t x) {  // triple32 (bias ~0.021)
  x ^= x >> 17;
  x *= 0xED5AD4BBu;
  x ^= x >> 11;
  x *= 0xAC4C1B51u;
  x ^= x >> 15;
  x *= 0x31848BABu;
  x ^= x >> 14;
  return x;
}

struct Subkeys {
  uint32_t a, b;
};

inline Subkeys subkeys(uint32_t k, uint32_t hi) {
  const uint32_t a = mix32(k ^ mix32(hi ^ 0x9E3779B9u));
  return {a, mix32(a ^ 0x85EBCA6Bu)};
}

inline uint32_t hash_lo(uint32_t lo, uint32_t a, uint32_t b) {
  uint32_t x = lo ^ a;
  x ^= x >> 17;
  x *= 0xED5AD4BBu;
  x += b;
  x ^= x >> 11;
  x *= 0xAC4C1B51u;
  x ^= x >> 15;
  x *= 0x31848BABu;
  x ^= x >> 14;
  return x;
}

// ---------------------------------------------------------------- float math

// ln(u) for u in [2^-24, 1] (normal, positive). Cephes logf polynomial, ~1 ulp.
inline float log_unit(float u) {
  const uint32_t bits = float_to_bits(u);
  float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 127);
  float m = bits_to_float((bits & 0x007FFFFFu) | 0x3F800000u);  // [1, 2)
  const bool big = m > 1.41421356237f;
  m = big ? m * 0.5f : m;  // [sqrt(1/2), sqrt(2))
  e = big ? e + 1.0f : e;
  const float x = m - 1.0f;  // exact
  const float z = x * x;
  float y = 7.0376836292e-2f;
  y = std::fma(y, x, -1.1514610310e-1f);
  y = std::fma(y, x, 1.1676998740e-1f);
  y = std::fma(y, x, -1.2420140846e-1f);
  y = std::fma(y, x, 1.4249322787e-1f);
  y = std::fma(y, x, -1.6668057665e-1f);
  y = std::fma(y, x, 2.0000714765e-1f);
  y = std::fma(y, x, -2.4999993993e-1f);
  y = std::fma(y, x, 3.3333331174e-1f);
  y = y * x * z;
  y = std::fma(e, -2.12194440e-4f, y);  // ln2 split in two parts for accuracy
  y = std::fma(z, -0.5f, y);
  return std::fma(e, 0.693359375f, x + y);
}

// cos(2 pi u) for u in [0, 1). The reduction is exact: u is a multiple of 2^-24.
inline float cos_2pi(float u) {
  const float a = std::fabs(u - 0.5f);             // cos(2 pi u) = -cos(2 pi a), a in [0, 0.5]
  const bool far = a > 0.25f;
  const float b = far ? 0.5f - a : a;               // b in [0, 0.25]
  const float b2 = b * b;
  // Taylor series of cos(2 pi b) in b^2 up to b^12: error < 7e-9 on [0, 0.25].
  float p = 7.9035364e0f;                           //  (2pi)^12 / 12!
  p = std::fma(p, b2, -2.6426257e1f);               // -(2pi)^10 / 10!
  p = std::fma(p, b2, 6.0244641e1f);                //  (2pi)^8 / 8!
  p = std::fma(p, b2, -8.5456817e1f);               // -(2pi)^6 / 6!
  p = std::fma(p, b2, 6.4939394e1f);                //  (2pi)^4 / 4!
  p = std::fma(p, b2, -1.9739209e1f);               // -(2pi)^2 / 2!
  p = std::fma(p, b2, 1.0f);
  return far ? p : -p;
}

inline float box_muller(uint32_t h1, uint32_t h2) {
  // Both conversions are exact (values < 2^24 + 1).
  const float u1 = static_cast<float>(static_cast<int32_t>((h1 >> 8) + 1u)) * 5.9604644775390625e-8f;
  const float u2 = static_cast<float>(static_cast<int32_t>(h2 >> 8)) * 5.9604644775390625e-8f;
  const float t = -2.0f * log_unit(u1);
  const float r = std::sqrt(t > 0.0f ? t : 0.0f);  // (not fmax: it does not vectorise)
  return r * cos_2pi(u2);
}

// ---------------------------------------------------------------- generation

struct Keys {
  uint32_t k1, k2;
};

// z[j] for global indices whose low words are lo0 .. lo0+len-1 (same high word; the block
// does not cross a 2^32 boundary). `s1`/`s2` are the subkeys of (k1, hi) / (k2, hi).
template <int DIST>
inline void gen_block(float* __restrict z, int len, uint32_t lo0, Subkeys s1, Subkeys s2) {
  if (DIST == kRademacher) {
#pragma omp simd
    for (int j = 0; j < len; ++j) {
      const uint32_t h = hash_lo(lo0 + static_cast<uint32_t>(j), s1.a, s1.b);
      z[j] = bits_to_float(0x3F800000u | (h & 0x80000000u));  // +-1.0f from the top bit
    }
  } else {
#pragma omp simd
    for (int j = 0; j < len; ++j) {
      const uint32_t lo = lo0 + static_cast<uint32_t>(j);
      z[j] = box_muller(hash_lo(lo, s1.a, s1.b), hash_lo(lo, s2.a, s2.b));
    }
  }
}

// Calls f(offset, len, z) for consecutive blocks covering tensor positions [begin, end),
// where global index = base + position and z holds the block's noise.
template <int DIST, typename F>
inline void for_each_block(uint64_t base, int64_t begin, int64_t end, Keys keys, F&& f) {
  alignas(64) float z[kBlock];
  int64_t p = begin;
  uint32_t cached_hi = 0;
  Subkeys s1{}, s2{};
  bool have = false;
  while (p < end) {
    const uint64_t g = base + static_cast<uint64_t>(p);
    const uint32_t hi = static_cast<uint32_t>(g >> 32);
    const uint32_t lo = static_cast<uint32_t>(g);
    if (!have || hi != cached_hi) {
      s1 = subkeys(keys.k1, hi);
      s2 = subkeys(keys.k2, hi);
      cached_hi = hi;
      have = true;
    }
    int64_t len = std::min<int64_t>(kBlock, end - p);
    len = std::min<int64_t>(len, (int64_t(1) << 32) - lo);  // stop at the 2^32 boundary
    if (len == kBlock) {
      gen_block<DIST>(z, kBlock, lo, s1, s2);  // constant trip count: no remainder loop
      f(p, kBlock, z);
    } else {
      gen_block<DIST>(z, static_cast<int>(len), lo, s1, s2);
      f(p, static_cast<int>(len), z);
    }
    p += len;
  }
}

inline float noise_scalar(int dist, Keys keys, uint64_t g) {
  const uint32_t hi = static_cast<uint32_t>(g >> 32), lo = static_cast<uint32_t>(g);
  const Subkeys s1 = subkeys(keys.k1, hi);
  const uint32_t h1 = hash_lo(lo, s1.a, s1.b);
  if (dist == kRademacher) return bits_to_float(0x3F800000u | (h1 & 0x80000000u));
  const Subkeys s2 = subkeys(keys.k2, hi);
  return box_muller(h1, hash_lo(lo, s2.a, s2.b));
}

// ---------------------------------------------------------------- storage dtypes

// Load/store between a storage type and float32, branch-free so loops vectorise.
struct F32 {
  using raw = float;
  static float load(float v) { return v; }
  static float store(float f) { return f; }
};

struct BF16 {
  using raw = uint16_t;
  static float load(uint16_t v) { return bits_to_float(static_cast<uint32_t>(v) << 16); }
  static uint16_t store(float f) {  // round to nearest even; NaN -> quiet NaN (as c10)
    const uint32_t u = float_to_bits(f);
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(f != f ? 0x7FC0u : r);
  }
};

struct F16 {
  using raw = _Float16;  // F16C / AVX-512 conversions (round to nearest even)
  static float load(_Float16 v) { return static_cast<float>(v); }
  static _Float16 store(float f) { return static_cast<_Float16>(f); }
};

// ---------------------------------------------------------------- dispatch helpers

inline int check_dist(int64_t dist) {
  TORCH_CHECK(dist == kGaussian || dist == kRademacher, "unknown dist id ", dist);
  return static_cast<int>(dist);
}

inline Keys make_keys(int64_t k1, int64_t k2) {
  TORCH_CHECK(k1 >= 0 && k1 <= 0xFFFFFFFFLL && k2 >= 0 && k2 <= 0xFFFFFFFFLL, "keys must be 32-bit");
  return {static_cast<uint32_t>(k1), static_cast<uint32_t>(k2)};
}

template <typename F>
void dispatch_dtype(const at::Tensor& t, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat: f(F32{}); break;
    case at::kBFloat16: f(BF16{}); break;
    case at::kHalf: f(F16{}); break;
    default: TORCH_CHECK(false, "unsupported dtype ", t.scalar_type(), " (float32, bfloat16, float16)");
  }
}

template <typename F>
void dispatch_dist(int dist, F&& f) {
  if (dist == kRademacher) {
    f(std::integral_constant<int, kRademacher>{});
  } else {
    f(std::integral_constant<int, kGaussian>{});
  }
}

template <typename S>
typename S::raw* raw_ptr(const at::Tensor& t) {
  return reinterpret_cast<typename S::raw*>(t.data_ptr());
}

inline void check_contig(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// ---------------------------------------------------------------- ops

void noise_out(const at::Tensor& out, int64_t k1, int64_t k2, int64_t start, int64_t dist_id) {
  check_contig(out, "out");
  TORCH_CHECK(out.scalar_type() == at::kFloat, "out must be float32");
  TORCH_CHECK(start >= 0, "start must be >= 0");
  const Keys keys = make_keys(k1, k2);
  const int dist = check_dist(dist_id);
  float* o = out.data_ptr<float>();
  const uint64_t base = static_cast<uint64_t>(start);
  dispatch_dist(dist, [&](auto d) {
    constexpr int D = decltype(d)::value;
    at::parallel_for(0, out.numel(), kGrain, [&](int64_t b, int64_t e) {
      for_each_block<D>(base, b, e, keys, [&](int64_t p, int len, const float* z) {
        std::memcpy(o + p, z, sizeof(float) * len);
      });
    });
  });
}

void noise_at(const at::Tensor& index, const at::Tensor& out, int64_t k1, int64_t k2, int64_t dist_id) {
  check_contig(index, "index");
  check_contig(out, "out");
  TORCH_CHECK(index.scalar_type() == at::kLong, "index must be int64");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.numel() == index.numel(), "bad out");
  const Keys keys = make_keys(k1, k2);
  const int dist = check_dist(dist_id);
  const int64_t* idx = index.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  for (int64_t j = 0; j < index.numel(); ++j) TORCH_CHECK(idx[j] >= 0, "indices must be >= 0");
  at::parallel_for(0, index.numel(), kGrain / 8, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) o[j] = noise_scalar(dist, keys, static_cast<uint64_t>(idx[j]));
  });
}

void add_noise(const at::Tensor& w, int64_t k1, int64_t k2, int64_t start, double coef, int64_t dist_id) {
  check_contig(w, "w");
  TORCH_CHECK(start >= 0, "start must be >= 0");
  const Keys keys = make_keys(k1, k2);
  const int dist = check_dist(dist_id);
  const float c = static_cast<float>(coef);
  const uint64_t base = static_cast<uint64_t>(start);
  dispatch_dtype(w, [&](auto s) {
    using S = decltype(s);
    auto* wp = raw_ptr<S>(w);
    dispatch_dist(dist, [&](auto d) {
      constexpr int D = decltype(d)::value;
      at::parallel_for(0, w.numel(), kGrain, [&](int64_t b, int64_t e) {
        for_each_block<D>(base, b, e, keys, [&](int64_t p, int len, const float* __restrict z) {
          auto* __restrict wb = wp + p;
#pragma omp simd
          for (int j = 0; j < len; ++j) wb[j] = S::store(S::load(wb[j]) + c * z[j]);
        });
      });
    });
  });
}

// out_plus = w + eps z, out_minus = w - eps z (z from `key`), optionally after the fused
// in-place update w += ucoef * z_u (z_u from the update key, same dist).
void perturb_pair(const at::Tensor& w, int64_t k1, int64_t k2, int64_t start, double eps, int64_t dist_id,
                  const at::Tensor& out_plus, const std::optional<at::Tensor>& out_minus, bool has_update,
                  int64_t uk1, int64_t uk2, double ucoef) {
  check_contig(w, "w");
  check_contig(out_plus, "out_plus");
  TORCH_CHECK(start >= 0, "start must be >= 0");
  TORCH_CHECK(out_plus.scalar_type() == w.scalar_type() && out_plus.numel() == w.numel(),
              "out_plus must match w in dtype and numel");
  const bool minus = out_minus.has_value();
  if (minus) {
    check_contig(*out_minus, "out_minus");
    TORCH_CHECK(out_minus->scalar_type() == w.scalar_type() && out_minus->numel() == w.numel(),
                "out_minus must match w in dtype and numel");
  }
  const Keys keys = make_keys(k1, k2);
  const Keys ukeys = make_keys(uk1, uk2);
  const int dist = check_dist(dist_id);
  const float ep = static_cast<float>(eps);
  const float uc = static_cast<float>(ucoef);
  const uint64_t base = static_cast<uint64_t>(start);
  dispatch_dtype(w, [&](auto s) {
    using S = decltype(s);
    using R = typename S::raw;
    R* wp = raw_ptr<S>(w);
    R* pp = raw_ptr<S>(out_plus);
    R* mp = minus ? raw_ptr<S>(*out_minus) : nullptr;
    dispatch_dist(dist, [&](auto d) {
      constexpr int D = decltype(d)::value;
      at::parallel_for(0, w.numel(), kGrain, [&](int64_t b, int64_t e) {
        // The update noise is generated block by block alongside the perturbation noise:
        // one block of z_u is applied, then the same block's z is used for the outputs.
        for (int64_t p0 = b; p0 < e; p0 += 16 * kBlock) {
          const int64_t p1 = std::min<int64_t>(e, p0 + 16 * kBlock);
          if (has_update) {
            for_each_block<D>(base, p0, p1, ukeys, [&](int64_t p, int len, const float* __restrict z) {
              R* __restrict wb = wp + p;
#pragma omp simd
              for (int j = 0; j < len; ++j) wb[j] = S::store(S::load(wb[j]) + uc * z[j]);
            });
          }
          for_each_block<D>(base, p0, p1, keys, [&](int64_t p, int len, const float* __restrict z) {
            const R* __restrict wb = wp + p;
            R* __restrict pb = pp + p;
            if (mp != nullptr) {
              R* __restrict mb = mp + p;
#pragma omp simd
              for (int j = 0; j < len; ++j) {
                const float wv = S::load(wb[j]);
                const float dz = ep * z[j];
                pb[j] = S::store(wv + dz);
                mb[j] = S::store(wv - dz);
              }
            } else {
#pragma omp simd
              for (int j = 0; j < len; ++j) pb[j] = S::store(S::load(wb[j]) + ep * z[j]);
            }
          });
        }
      });
    });
  });
}

// out[j, c] = w[rows[j], c] +- eps * z(rows[j] * C + c): rows of a perturbed table.
void perturb_rows(const at::Tensor& w, const at::Tensor& rows, int64_t k1, int64_t k2, double eps, int64_t dist_id,
                  const at::Tensor& out_plus, const std::optional<at::Tensor>& out_minus) {
  check_contig(w, "w");
  check_contig(rows, "rows");
  check_contig(out_plus, "out_plus");
  TORCH_CHECK(w.dim() == 2, "w must be 2-D");
  TORCH_CHECK(rows.scalar_type() == at::kLong, "rows must be int64");
  const int64_t R = w.size(0), C = w.size(1), N = rows.numel();
  TORCH_CHECK(out_plus.scalar_type() == w.scalar_type() && out_plus.numel() == N * C,
              "out_plus must have dtype of w and rows.numel() * C elements");
  const bool minus = out_minus.has_value();
  if (minus) {
    check_contig(*out_minus, "out_minus");
    TORCH_CHECK(out_minus->scalar_type() == w.scalar_type() && out_minus->numel() == N * C,
                "out_minus must have dtype of w and rows.numel() * C elements");
  }
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t j = 0; j < N; ++j) {
    TORCH_CHECK(rp[j] >= 0 && rp[j] < R, "row index ", rp[j], " out of range [0, ", R, ")");
  }
  const Keys keys = make_keys(k1, k2);
  const int dist = check_dist(dist_id);
  const float ep = static_cast<float>(eps);
  dispatch_dtype(w, [&](auto s) {
    using S = decltype(s);
    using Rw = typename S::raw;
    const Rw* wp = raw_ptr<S>(w);
    Rw* pp = raw_ptr<S>(out_plus);
    Rw* mp = minus ? raw_ptr<S>(*out_minus) : nullptr;
    dispatch_dist(dist, [&](auto d) {
      constexpr int D = decltype(d)::value;
      const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(C, 1));
      at::parallel_for(0, N, grain, [&](int64_t jb, int64_t je) {
        for (int64_t j = jb; j < je; ++j) {
          const int64_t r = rp[j];
          const Rw* __restrict wr = wp + r * C;
          Rw* __restrict pr = pp + j * C;
          Rw* __restrict mr = mp != nullptr ? mp + j * C : nullptr;
          // Positions are relative to the row start; global index = r * C + position.
          for_each_block<D>(static_cast<uint64_t>(r * C), 0, C, keys,
                            [&](int64_t p, int len, const float* __restrict z) {
                              if (mr != nullptr) {
#pragma omp simd
                                for (int c = 0; c < len; ++c) {
                                  const float wv = S::load(wr[p + c]);
                                  const float dz = ep * z[c];
                                  pr[p + c] = S::store(wv + dz);
                                  mr[p + c] = S::store(wv - dz);
                                }
                              } else {
#pragma omp simd
                                for (int c = 0; c < len; ++c) pr[p + c] = S::store(S::load(wr[p + c]) + ep * z[c]);
                              }
                            });
        }
      });
    });
  });
}

}  // namespace

std::string isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "generic";
#endif
}

// Registered as torch ops (torch.ops.pocketllm_zo.*): <torch/library.h> compiles in a
// fraction of the time of <torch/extension.h> (pybind11), and needs no Python module.
TORCH_LIBRARY(pocketllm_zo, m) {
  m.def("noise_out(Tensor(a!) out, int k1, int k2, int start, int dist) -> ()", &noise_out);
  m.def("noise_at(Tensor index, Tensor(a!) out, int k1, int k2, int dist) -> ()", &noise_at);
  m.def("add_noise(Tensor(a!) w, int k1, int k2, int start, float coef, int dist) -> ()", &add_noise);
  m.def("perturb_pair(Tensor(a!) w, int k1, int k2, int start, float eps, int dist, Tensor(b!) out_plus, "
        "Tensor(c!)? out_minus, bool has_update, int uk1, int uk2, float ucoef) -> ()",
        &perturb_pair);
  m.def("perturb_rows(Tensor w, Tensor rows, int k1, int k2, float eps, int dist, Tensor(a!) out_plus, "
        "Tensor(b!)? out_minus) -> ()",
        &perturb_rows);
  m.def("isa() -> str", &isa);
}
