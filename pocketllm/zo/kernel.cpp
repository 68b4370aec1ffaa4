// Fused, counter-based perturbation noise for zeroth-order (MeZO-style) fine-tuning.
//
// Every value depends only on (key, global flat element index), so any chunk, row or
// thread split of a tensor regenerates identical numbers. The definition lives in
// pocketllm/zo/noise.py, whose pure-torch reference is the spec this file is tested
// against:
//
//   lo = i mod 2^32, hi = i >> 32                       (i: global flat index)
//   a  = mix32(k ^ mix32(hi ^ 0x9E3779B9))              (subkeys of (k, hi): computed once
//   b  = mix32(a ^ 0x85EBCA6B)                           per 2^32 elements, not per element)
//   x  = lo ^ a
//   x ^= x >> 17; x *= 0xED5AD4BB; x += b              (triple32 finaliser, C. Wellons, with
//   x ^= x >> 11; x *= 0xAC4C1B51                        the second subkey injected after
//   x ^= x >> 15; x *= 0x31848BAB; x ^= x >> 14         round one);  h(k, i) = x
//   mix32 = the same finaliser without the key terms.
//
//   rademacher: z = +1 if the top bit of h(k1, i) is 0 else -1.
//   gaussian:   u1 = ((h(k1,i) >> 8) + 1) / 2^24 in (0, 1], u2 = (h(k2,i) >> 8) / 2^24 in [0, 1)
//               z  = sqrt(-2 ln u1) * cos(2 pi u2)           (float32)
//
// Speed. The work is split into blocks of kBlock elements: a block of z is generated into
// an L1-resident buffer by a branch-free loop (`#pragma omp simd`, -O3 -march=native ->
// AVX-512 / AVX2), then a second simple loop applies it to the tensors. log and cos are
// short polynomials (no libm calls): |z error| < 1e-6. Threads: at::parallel_for over
// whole blocks (torch's OpenMP pool; built with -fopenmp, sharing torch's libgomp).
// Large float32 outputs are written with non-temporal (streaming) stores: they skip the
// read-for-ownership of the destination lines (~40% of perturb_pair's memory traffic) and
// do not flush the cache with data nobody reads soon.
//
// Rounding. Fused ops compute `w + (c * z)` in float32 with a separate multiply and add
// (built with -ffp-contract=off, so no FMA contraction), exactly like the reference, then
// round to the storage dtype to nearest even like Tensor.to().

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

// Hot helpers must be inlined into the simd loops, or the loops stay scalar.
#if defined(__GNUC__)
#define PL_INLINE inline __attribute__((always_inline))
#else
#define PL_INLINE inline
#endif

namespace {

constexpr int kBlock = 256;               // elements per block (1 KiB of float z, stays in L1)
constexpr int64_t kGrainBlocks = 64;      // >= 16k elements per thread task
// Outputs of at least this many bytes use streaming stores (tunable for benchmarks).
std::atomic<int64_t> g_stream_bytes{8 << 20};
constexpr int kGaussian = 0;
constexpr int kRademacher = 1;

// ---------------------------------------------------------------- bit helpers

PL_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

PL_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// ---------------------------------------------------------------- hash

PL_INLINE uint32_t mix32(uint32_t x) {  // triple32: bias ~0.021, one of the best known 3-round
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

PL_INLINE uint32_t hash_lo(uint32_t lo, Subkeys s) {
  uint32_t x = lo ^ s.a;
  x ^= x >> 17;
  x *= 0xED5AD4BBu;
  x += s.b;
  x ^= x >> 11;
  x *= 0xAC4C1B51u;
  x ^= x >> 15;
  x *= 0x31848BABu;
  x ^= x >> 14;
  return x;
}

// ---------------------------------------------------------------- gaussian

// sqrt(-2 ln u1) * cos(2 pi u2) from the two hashes; branch-free so it vectorises.
PL_INLINE float box_muller(uint32_t h1, uint32_t h2) {
  // --- radius. v = 2^24 u1 = (h1 >> 8) + 1 in [1, 2^24] converts to float exactly.
  // Split u1 = 2^e * m with m in [sqrt(1/2), sqrt(2)) by integer arithmetic on the bits
  // (subtracting 24 from the exponent divides by 2^24 for free), then
  // log2(u1) = e + x Q(x), x = m - 1, Q a degree-7 minimax fit (rel. error 2e-7).
  const float v = static_cast<float>(static_cast<int32_t>((h1 >> 8) + 1u));
  const int32_t ix = static_cast<int32_t>(float_to_bits(v) - (0x3F3504F3u + (24u << 23)));
  const float e = static_cast<float>(ix >> 23);  // arithmetic shift: floor
  const float x = bits_to_float((static_cast<uint32_t>(ix) & 0x007FFFFFu) + 0x3F3504F3u) - 1.0f;
  float q = -1.4580993354e-1f;
  q = std::fma(q, x, 2.3404178023e-1f);
  q = std::fma(q, x, -2.4887716770e-1f);
  q = std::fma(q, x, 2.8709879518e-1f);
  q = std::fma(q, x, -3.6023962498e-1f);
  q = std::fma(q, x, 4.8092323542e-1f);
  q = std::fma(q, x, -7.2135281563e-1f);
  q = std::fma(q, x, 1.4426949024e0f);
  const float t = std::fma(q, x, e) * -1.3862943611f;  // -2 ln u1 = -2 ln2 log2 u1 >= 0
  const float r = std::sqrt(t > 0.0f ? t : 0.0f);        // (not fmax: it does not vectorise)

  // --- angle. With w = h2 >> 8 (u2 = w / 2^24), c = w - 2^23 gives
  // cos(2 pi u2) = -cos(2 pi |c| / 2^24); fold |c| in [0, 2^23] to b in [0, 2^22] around the
  // quarter period (cos(pi - y) = -cos y). All of this is exact integer arithmetic.
  const int32_t c = static_cast<int32_t>(h2 >> 8) - (1 << 23);
  const int32_t a = c < 0 ? -c : c;
  const int32_t d = (1 << 22) - a;                    // < 0 iff past the quarter period
  const int32_t bi = d < 0 ? (1 << 23) - a : a;
  const float b = static_cast<float>(bi) * 5.9604644775390625e-8f;  // exact: * 2^-24
  const float s = b * b;
  // cos(2 pi b) on [0, 1/4], degree-4 minimax polynomial in b^2 (abs. error 5e-8).
  float p = 5.6242725372e1f;
  p = std::fma(p, s, -8.5240379333e1f);
  p = std::fma(p, s, 6.4934593201e1f);
  p = std::fma(p, s, -1.9739171982e1f);
  p = std::fma(p, s, 9.9999994040e-1f);
  const uint32_t flip = ~static_cast<uint32_t>(d) & 0x80000000u;  // negate unless past
  return r * bits_to_float(float_to_bits(p) ^ flip);
}

// ---------------------------------------------------------------- generation

struct Keys {
  uint32_t k1, k2;
};

// Subkeys for the current high word, recomputed only when it changes (every 2^32 elements).
struct KeyCache {
  Keys keys;
  uint32_t hi = 0;
  bool valid = false;
  Subkeys s1{}, s2{};

  explicit KeyCache(Keys k) : keys(k) {}
  void at(uint32_t h) {
    if (!valid || h != hi) {
      s1 = subkeys(keys.k1, h);
      s2 = subkeys(keys.k2, h);
      hi = h;
      valid = true;
    }
  }
};

// z[j] for low words lo0 + j, j < len (one high word). N > 0 fixes the trip count at
// compile time (full blocks: no remainder loop).
template <int DIST, int N>
PL_INLINE void gen_run(float* __restrict z, int len, uint32_t lo0, Subkeys s1, Subkeys s2) {
  const int n = N > 0 ? N : len;
  if constexpr (DIST == kRademacher) {
#pragma omp simd
    for (int j = 0; j < n; ++j) {
      const uint32_t h = hash_lo(lo0 + static_cast<uint32_t>(j), s1);
      z[j] = bits_to_float(0x3F800000u | (h & 0x80000000u));  // +-1.0f from the top bit
    }
  } else {
#pragma omp simd
    for (int j = 0; j < n; ++j) {
      const uint32_t lo = lo0 + static_cast<uint32_t>(j);
      z[j] = box_muller(hash_lo(lo, s1), hash_lo(lo, s2));
    }
  }
}

// z[0 .. len) for global indices g0 .. g0 + len - 1 (len <= kBlock; may cross 2^32).
template <int DIST>
inline void gen(float* __restrict z, int len, uint64_t g0, KeyCache& kc) {
  const uint32_t lo = static_cast<uint32_t>(g0);
  kc.at(static_cast<uint32_t>(g0 >> 32));
  const uint64_t room = (uint64_t(1) << 32) - lo;  // elements left in this high word
  if (len == kBlock && room >= uint64_t(kBlock)) {
    gen_run<DIST, kBlock>(z, kBlock, lo, kc.s1, kc.s2);
    return;
  }
  const int first = static_cast<int>(std::min<uint64_t>(len, room));
  gen_run<DIST, 0>(z, first, lo, kc.s1, kc.s2);
  if (first < len) {
    kc.at(static_cast<uint32_t>(g0 >> 32) + 1);
    gen_run<DIST, 0>(z + first, len - first, 0u, kc.s1, kc.s2);
  }
}

inline float noise_scalar(int dist, Keys keys, uint64_t g) {
  const uint32_t hi = static_cast<uint32_t>(g >> 32), lo = static_cast<uint32_t>(g);
  const uint32_t h1 = hash_lo(lo, subkeys(keys.k1, hi));
  if (dist == kRademacher) return bits_to_float(0x3F800000u | (h1 & 0x80000000u));
  return box_muller(h1, hash_lo(lo, subkeys(keys.k2, hi)));
}

// ---------------------------------------------------------------- storage dtypes

// Load/store between a storage type and float32, branch-free so loops vectorise.
struct F32 {
  using raw = float;
  static constexpr at::ScalarType type = at::kFloat;
  PL_INLINE static float load(float v) { return v; }
  PL_INLINE static float store(float f) { return f; }
};

struct BF16 {
  using raw = uint16_t;
  static constexpr at::ScalarType type = at::kBFloat16;
  PL_INLINE static float load(uint16_t v) { return bits_to_float(static_cast<uint32_t>(v) << 16); }
  PL_INLINE static uint16_t store(float f) {  // round to nearest even; NaN -> quiet NaN (as c10)
    const uint32_t u = float_to_bits(f);
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(f != f ? 0x7FC0u : r);
  }
};

struct F16 {
  // IEEE half <-> float with integer bit tricks (after F. Giesen's "half_to_float" and
  // "float_to_half_fast3_rtne"): every case is computed and selected branch-free, so the
  // loops vectorise (GCC does not vectorise _Float16 conversions without AVX512-FP16).
  // Round to nearest even, overflow to inf, subnormals, NaN -> quiet NaN: as c10::Half.
  using raw = uint16_t;
  static constexpr at::ScalarType type = at::kHalf;
  PL_INLINE static float load(uint16_t h) {
    const uint32_t em = (static_cast<uint32_t>(h) & 0x7FFFu) << 13;  // exponent+mantissa
    const uint32_t exp = em & 0x0F800000u;
    const uint32_t normal = em + ((127u - 15u) << 23);
    const uint32_t infnan = normal + ((128u - 16u) << 23);
    // zero / subnormal: let the FPU normalise (2^-14 * mantissa)
    const uint32_t sub = float_to_bits(bits_to_float(normal + (1u << 23)) - bits_to_float(113u << 23));
    const uint32_t o = exp == 0x0F800000u ? infnan : (exp == 0 ? sub : normal);
    return bits_to_float(o | ((static_cast<uint32_t>(h) & 0x8000u) << 16));
  }
  PL_INLINE static uint16_t store(float f) {
    uint32_t u = float_to_bits(f);
    const uint32_t sign = u & 0x80000000u;
    u ^= sign;
    // |f| >= 65520 rounds to inf; NaN -> 0x7E00
    const uint32_t big = u > 0x7F800000u ? 0x7E00u : 0x7C00u;
    // |f| < 2^-14: add a magic number so the FPU rounds to a subnormal half (RNE)
    const uint32_t magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    const uint32_t sub = float_to_bits(bits_to_float(u) + bits_to_float(magic)) - magic;
    // normal: rebias the exponent and round the mantissa to nearest even
    const uint32_t norm = (u + ((15u - 127u) << 23) + 0xFFFu + ((u >> 13) & 1u)) >> 13;
    const uint32_t o = u >= ((127u + 16u) << 23) ? big : (u < (113u << 23) ? sub : norm);
    return static_cast<uint16_t>(o | (sign >> 16));
  }
};

// ---------------------------------------------------------------- streaming stores

// Copy one block to `dst` with non-temporal stores. dst must be 64-byte aligned and
// `bytes` a multiple of 64 (true for full blocks of an aligned output).
inline void stream_copy(void* __restrict dst, const void* __restrict src, size_t bytes) {
#if defined(__AVX512F__)
  for (size_t o = 0; o < bytes; o += 64) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(static_cast<char*>(dst) + o),
                        _mm512_load_si512(static_cast<const char*>(src) + o));
  }
#elif defined(__AVX__)
  for (size_t o = 0; o < bytes; o += 32) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(static_cast<char*>(dst) + o),
                        _mm256_load_si256(reinterpret_cast<const __m256i*>(static_cast<const char*>(src) + o)));
  }
#elif defined(__SSE2__)
  for (size_t o = 0; o < bytes; o += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(static_cast<char*>(dst) + o),
                     _mm_load_si128(reinterpret_cast<const __m128i*>(static_cast<const char*>(src) + o)));
  }
#else
  std::memcpy(dst, src, bytes);
#endif
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();  // order the weakly-ordered streaming stores before the threads join
#endif
}

// Where one output block is written: straight into the tensor, or (streaming) into an
// aligned L1 buffer that is then streamed out.
template <typename R, bool STREAM>
struct OutBlock {
  alignas(64) R buf[STREAM ? kBlock : 1];
  R* base;
  explicit OutBlock(R* b) : base(b) {}
  R* target(int64_t p) { return STREAM ? buf : base + p; }
  void commit(int64_t p, int len) {
    if constexpr (STREAM) {
      if (len == kBlock) {
        stream_copy(base + p, buf, sizeof(R) * kBlock);
      } else {
        std::memcpy(base + p, buf, sizeof(R) * len);
      }
    }
  }
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

template <typename F>
void dispatch_bool(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

inline void check_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void check_out(const at::Tensor& out, const at::Tensor& w, int64_t numel, const char* name) {
  check_tensor(out, name);
  TORCH_CHECK(out.scalar_type() == w.scalar_type() && out.numel() == numel, name, " must have dtype ",
              w.scalar_type(), " and ", numel, " elements");
}

inline bool aligned64(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 63u) == 0; }

// Streaming stores pay off for outputs far larger than the cache.
// Measured on Zen 4 (134.5M elements, 2 threads): streaming cuts float32 perturb_pair
// (rademacher) from ~0.064 to ~0.043 s, but makes bfloat16 slower (0.029 -> 0.034 s), so
// it is used for 4-byte elements only.
inline bool use_streaming(int64_t numel, size_t elem_size, std::initializer_list<const void*> ptrs) {
  if (elem_size < 4) return false;
  if (numel * static_cast<int64_t>(elem_size) < g_stream_bytes.load(std::memory_order_relaxed)) return false;
  for (const void* p : ptrs) {
    if (p != nullptr && !aligned64(p)) return false;
  }
  return true;
}

// Runs f(state, p, len) over consecutive blocks [p, p + len) covering [0, n), in parallel
// over whole blocks (so streaming stores of full blocks stay aligned). `state = init()` is
// made once per thread task (the key caches: subkeys are then derived once per task).
template <typename Init, typename F>
void parallel_blocks(int64_t n, bool fence, const Init& init, const F& f) {
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, nblocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    auto state = init();
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t p = blk * kBlock;
      f(state, p, static_cast<int>(std::min<int64_t>(kBlock, n - p)));
    }
    if (fence) stream_fence();
  });
}

// ---------------------------------------------------------------- ops

void noise_out(const at::Tensor& out, int64_t k1, int64_t k2, int64_t start, int64_t dist_id) {
  check_tensor(out, "out");
  TORCH_CHECK(out.scalar_type() == at::kFloat, "out must be float32");
  TORCH_CHECK(start >= 0, "start must be >= 0");
  const Keys keys = make_keys(k1, k2);
  float* o = out.data_ptr<float>();
  const uint64_t base = static_cast<uint64_t>(start);
  const bool stream = use_streaming(out.numel(), sizeof(float), {o});
  dispatch_dist(check_dist(dist_id), [&](auto d) {
    constexpr int D = decltype(d)::value;
    dispatch_bool(stream, [&](auto st) {
      constexpr bool ST = decltype(st)::value;
      const auto init = [&] { return KeyCache(keys); };
      parallel_blocks(out.numel(), ST, init, [&](KeyCache& kc, int64_t p, int len) {
        OutBlock<float, ST> ob(o);
        gen<D>(ob.target(p), len, base + p, kc);
        ob.commit(p, len);
      });
    });
  });
}

void noise_at(const at::Tensor& index, const at::Tensor& out, int64_t k1, int64_t k2, int64_t dist_id) {
  check_tensor(index, "index");
  check_tensor(out, "out");
  TORCH_CHECK(index.scalar_type() == at::kLong, "index must be int64");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.numel() == index.numel(),
              "out must be float32 with index.numel() elements");
  const Keys keys = make_keys(k1, k2);
  const int dist = check_dist(dist_id);
  const int64_t* idx = index.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const int64_t n = index.numel();
  for (int64_t j = 0; j < n; ++j) TORCH_CHECK(idx[j] >= 0, "indices must be >= 0");
  at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) o[j] = noise_scalar(dist, keys, static_cast<uint64_t>(idx[j]));
  });
}

void add_noise(const at::Tensor& w, int64_t k1, int64_t k2, int64_t start, double coef, int64_t dist_id) {
  check_tensor(w, "w");
  TORCH_CHECK(start >= 0, "start must be >= 0");
  const Keys keys = make_keys(k1, k2);
  const float c = static_cast<float>(coef);
  const uint64_t base = static_cast<uint64_t>(start);
  dispatch_dtype(w, [&](auto s) {
    using S = decltype(s);
    using R = typename S::raw;
    R* wp = reinterpret_cast<R*>(w.data_ptr());
    dispatch_dist(check_dist(dist_id), [&](auto d) {
      constexpr int D = decltype(d)::value;
      const auto init = [&] { return KeyCache(keys); };
      parallel_blocks(w.numel(), false, init, [&](KeyCache& kc, int64_t p, int len) {
        alignas(64) float z[kBlock];
        gen<D>(z, len, base + p, kc);
        R* __restrict wb = wp + p;
#pragma omp simd
        for (int j = 0; j < len; ++j) wb[j] = S::store(S::load(wb[j]) + c * z[j]);
      });
    });
  });
}

// out_plus = w + eps z, out_minus = w - eps z (z from k1/k2), optionally after the fused
// in-place update w += ucoef * z_u (z_u from uk1/uk2, same dist). One pass over memory.
void perturb_pair(const at::Tensor& w, int64_t k1, int64_t k2, int64_t start, double eps, int64_t dist_id,
                  const at::Tensor& out_plus, const std::optional<at::Tensor>& out_minus, bool has_update,
                  int64_t uk1, int64_t uk2, double ucoef) {
  check_tensor(w, "w");
  TORCH_CHECK(start >= 0, "start must be >= 0");
  const int64_t n = w.numel();
  check_out(out_plus, w, n, "out_plus");
  const bool minus = out_minus.has_value();
  if (minus) check_out(*out_minus, w, n, "out_minus");
  const Keys keys = make_keys(k1, k2);
  const Keys ukeys = make_keys(uk1, uk2);
  const float ep = static_cast<float>(eps);
  const float uc = static_cast<float>(ucoef);
  const uint64_t base = static_cast<uint64_t>(start);
  dispatch_dtype(w, [&](auto s) {
    using S = decltype(s);
    using R = typename S::raw;
    R* wp = reinterpret_cast<R*>(w.data_ptr());
    R* pp = reinterpret_cast<R*>(out_plus.data_ptr());
    R* mp = minus ? reinterpret_cast<R*>(out_minus->data_ptr()) : nullptr;
    const bool stream = use_streaming(n, sizeof(R), {pp, mp});
    dispatch_dist(check_dist(dist_id), [&](auto d) {
      constexpr int D = decltype(d)::value;
      dispatch_bool(stream, [&](auto st) {
        constexpr bool ST = decltype(st)::value;
        dispatch_bool(has_update, [&](auto up) {
          constexpr bool UP = decltype(up)::value;
          const auto init = [&] { return std::make_pair(KeyCache(keys), KeyCache(ukeys)); };
          parallel_blocks(n, ST, init, [&](std::pair<KeyCache, KeyCache>& kcs, int64_t p, int len) {
            alignas(64) float z[kBlock];
            alignas(64) float zu[kBlock];  // (unused without the update)
            gen<D>(z, len, base + p, kcs.first);
            if constexpr (UP) gen<D>(zu, len, base + p, kcs.second);
            R* __restrict wb = wp + p;
            OutBlock<R, ST> plus(pp);
            R* __restrict pb = plus.target(p);
            if (mp != nullptr) {
              OutBlock<R, ST> mins(mp);
              R* __restrict mb = mins.target(p);
#pragma omp simd
              for (int j = 0; j < len; ++j) {
                float wv = S::load(wb[j]);
                if constexpr (UP) {
                  const R nw = S::store(wv + uc * zu[j]);
                  wb[j] = nw;
                  wv = S::load(nw);  // outputs are computed from the stored (rounded) value
                }
                const float dz = ep * z[j];
                pb[j] = S::store(wv + dz);
                mb[j] = S::store(wv - dz);
              }
              mins.commit(p, len);
            } else {
#pragma omp simd
              for (int j = 0; j < len; ++j) {
                float wv = S::load(wb[j]);
                if constexpr (UP) {
                  const R nw = S::store(wv + uc * zu[j]);
                  wb[j] = nw;
                  wv = S::load(nw);
                }
                pb[j] = S::store(wv + ep * z[j]);
              }
            }
            plus.commit(p, len);
          });
        });
      });
    });
  });
}

// out[j, c] = w[rows[j], c] +- eps * z(rows[j] * C + c): rows of a perturbed table.
void perturb_rows(const at::Tensor& w, const at::Tensor& rows, int64_t k1, int64_t k2, double eps,
                  int64_t dist_id, const at::Tensor& out_plus, const std::optional<at::Tensor>& out_minus) {
  check_tensor(w, "w");
  check_tensor(rows, "rows");
  TORCH_CHECK(w.dim() == 2, "w must be 2-D");
  TORCH_CHECK(rows.scalar_type() == at::kLong, "rows must be int64");
  const int64_t R = w.size(0), C = w.size(1), N = rows.numel();
  check_out(out_plus, w, N * C, "out_plus");
  const bool minus = out_minus.has_value();
  if (minus) check_out(*out_minus, w, N * C, "out_minus");
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t j = 0; j < N; ++j) {
    TORCH_CHECK(rp[j] >= 0 && rp[j] < R, "row index ", rp[j], " out of range [0, ", R, ")");
  }
  const Keys keys = make_keys(k1, k2);
  const float ep = static_cast<float>(eps);
  dispatch_dtype(w, [&](auto s) {
    using S = decltype(s);
    using Raw = typename S::raw;
    const Raw* wp = reinterpret_cast<const Raw*>(w.data_ptr());
    Raw* pp = reinterpret_cast<Raw*>(out_plus.data_ptr());
    Raw* mp = minus ? reinterpret_cast<Raw*>(out_minus->data_ptr()) : nullptr;
    dispatch_dist(check_dist(dist_id), [&](auto d) {
      constexpr int D = decltype(d)::value;
      const int64_t grain = std::max<int64_t>(1, (kGrainBlocks * kBlock) / std::max<int64_t>(C, 1));
      at::parallel_for(0, N, grain, [&](int64_t jb, int64_t je) {
        alignas(64) float z[kBlock];
        KeyCache kc(keys);
        for (int64_t j = jb; j < je; ++j) {
          const int64_t r = rp[j];
          for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
            const int len = static_cast<int>(std::min<int64_t>(kBlock, C - c0));
            gen<D>(z, len, static_cast<uint64_t>(r * C + c0), kc);
            const Raw* __restrict wb = wp + r * C + c0;
            Raw* __restrict pb = pp + j * C + c0;
            if (mp != nullptr) {
              Raw* __restrict mb = mp + j * C + c0;
#pragma omp simd
              for (int c = 0; c < len; ++c) {
                const float wv = S::load(wb[c]);
                const float dz = ep * z[c];
                pb[c] = S::store(wv + dz);
                mb[c] = S::store(wv - dz);
              }
            } else {
#pragma omp simd
              for (int c = 0; c < len; ++c) pb[c] = S::store(S::load(wb[c]) + ep * z[c]);
            }
          }
        }
      });
    });
  });
}

int64_t set_stream_bytes(int64_t bytes) { return g_stream_bytes.exchange(bytes); }

std::string isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "generic";
#endif
}

}  // namespace

// Registered as torch ops (torch.ops.pocketllm_zo.*): <torch/library.h> compiles in a
// fraction of the time of <torch/extension.h> (pybind11) and needs no Python module.
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
  m.def("set_stream_bytes(int bytes) -> int", &set_stream_bytes);
}
