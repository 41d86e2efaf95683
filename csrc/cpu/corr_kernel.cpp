// Register-tiled outer-product accumulation: each tile keeps MR × (NV vectors) partial sums
// in registers over the whole K run, so every loaded R vector feeds MR FMAs and every L
// scalar (broadcast) feeds NV. BLAS handles this skinny, huge-K shape (C × C output,
// K = pixels·batch) poorly, which is the shape every shifted channel correlation has.
#include "corr_kernel.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <immintrin.h>
#include <stdexcept>
#include <string>

#include "simd.h"

namespace consequential_ext::cpu {
namespace {

// One MR × (NV vectors) tile of out, over runs [o0, o1) of rows [k0, k1) each: the partial
// sums stay in registers for the whole range and are added into out once.
template <typename T, int W, int MR, int NV>
__attribute__((always_inline)) inline void corr_tile(T* out, int64_t ldo, const T* L, const T* R,
                                                     int64_t o0, int64_t o1, int64_t os,
                                                     int64_t k0, int64_t k1, int64_t ld) {
  using vec = typename Vec<T, W>::type;
  constexpr int V = W / sizeof(T);
  vec acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = vec{};
  for (int64_t o = o0; o < o1; ++o) {
    const T* l = L + o * os + k0 * ld;
    const T* r = R + o * os + k0 * ld;
    for (int64_t k = k0; k < k1; ++k, l += ld, r += ld) {
      vec rv[NV];
      for (int v = 0; v < NV; ++v) std::memcpy(&rv[v], r + v * V, sizeof(vec));
      for (int m = 0; m < MR; ++m) {
        const T lm = l[m];
        for (int v = 0; v < NV; ++v) acc[m][v] += lm * rv[v];
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    T* o_row = out + m * ldo;
    for (int v = 0; v < NV; ++v) {
      vec cur;
      std::memcpy(&cur, o_row + v * V, sizeof(vec));
      cur += acc[m][v];
      std::memcpy(o_row + v * V, &cur, sizeof(vec));
    }
  }
}

// The K rows go in blocks of kBlockRows, each swept column strip by column strip: a strip of
// R and the L rows under it stay in L1 while every tile of the strip reads them. Where a
// block's L panel outgrows kBlockedPanelBytes, whole runs per tile, row strip by row strip
// (the blocked order then re-reads L from L2 per strip); likewise for a single column strip,
// whose rows are each one cache line (16 wide: 4 % faster). One thread, AVX2, the two orders
// interleaved: 64 × 64 × 256 +25–31 %, 128 and 256 wide +5–13 %, 512 wide (whole runs) −4–8 %
// blocked; L1 misses (valgrind's cachegrind, 32 KiB 8-way) 1.5–6× fewer blocked on 16…256-wide
// panels, as long as the row stride is not a multiple of 512 bytes (gram_shift_cpu.cpp pads
// it): that maps a strip onto a few cache sets.
constexpr int64_t kBlockRows = 64, kBlockedPanelBytes = 64 * 1024;

// Rows [0, M) (a multiple of 4) go in tiles of MR, the last one or two in tiles of 4 where
// MR = 6 does not divide M (16: 6, 6, 4): the rows up to this go in MR-row tiles.
template <int MR>
inline int64_t full_tile_rows(int64_t M) {
  return MR != 6 || M % 6 == 0 ? M : M - (M % 6 == 4 ? 4 : 8);
}

template <typename T, int W, int MR, int NV>
__attribute__((always_inline)) inline void corr_tiles(T* out, int64_t ldo, const T* L, const T* R,
                                                      int64_t M, int64_t N, int64_t n_outer,
                                                      int64_t os, int64_t n_inner, int64_t ld) {
  constexpr int64_t NW = NV * (W / sizeof(T));
  const int64_t M6 = full_tile_rows<MR>(M);
  auto sweep = [&](int64_t o0, int64_t o1, int64_t k0, int64_t k1) {
    for (int64_t n0 = 0; n0 < N; n0 += NW) {
      int64_t m0 = 0;
      for (; m0 < M6; m0 += MR)
        corr_tile<T, W, MR, NV>(out + m0 * ldo + n0, ldo, L + m0, R + n0, o0, o1, os, k0, k1, ld);
      for (; m0 < M; m0 += 4)
        corr_tile<T, W, 4, NV>(out + m0 * ldo + n0, ldo, L + m0, R + n0, o0, o1, os, k0, k1, ld);
    }
  };
  if (N <= NW || M * kBlockRows * int64_t{sizeof(T)} > kBlockedPanelBytes) {
    int64_t m0 = 0;
    for (; m0 < M6; m0 += MR)
      for (int64_t n0 = 0; n0 < N; n0 += NW)
        corr_tile<T, W, MR, NV>(out + m0 * ldo + n0, ldo, L + m0, R + n0, 0, n_outer, os, 0,
                                n_inner, ld);
    for (; m0 < M; m0 += 4)
      for (int64_t n0 = 0; n0 < N; n0 += NW)
        corr_tile<T, W, 4, NV>(out + m0 * ldo + n0, ldo, L + m0, R + n0, 0, n_outer, os, 0,
                               n_inner, ld);
  } else if (n_inner >= kBlockRows) {  // blocks within each run
    for (int64_t o = 0; o < n_outer; ++o)
      for (int64_t k0 = 0; k0 < n_inner; k0 += kBlockRows)
        sweep(o, o + 1, k0, std::min(k0 + kBlockRows, n_inner));
  } else {  // blocks of whole runs
    const int64_t runs = std::max<int64_t>(1, kBlockRows / std::max<int64_t>(n_inner, 1));
    for (int64_t o0 = 0; o0 < n_outer; o0 += runs)
      sweep(o0, std::min(o0 + runs, n_outer), 0, n_inner);
  }
}

// 64-byte registers (32 of them): two vectors wide when N allows (more FMAs per broadcast),
// else one vector and taller tiles. 32 or 16 bytes (16 registers): 6 × 2 vectors, 12
// accumulators beside two loaded vectors and a broadcast (with 4 × 2, 8 accumulators, the
// FMAs' latency showed: 16 × 16 outputs over 64 rows, one AVX2 thread, ~48 against ~68
// GFLOP/s, 64 × 64 over 32 rows ~58 against ~62). M is a multiple of 16, so 8 and 16 divide
// it and 6 with a tail of 4-row tiles; N is a multiple of 16 elements, so two 32- or 16-byte
// vectors always divide it.
template <typename T, int W>
__attribute__((always_inline)) inline void corr_any(T* out, int64_t ldo, const T* L, const T* R,
                                                    int64_t M, int64_t N, int64_t n_outer,
                                                    int64_t os, int64_t n_inner, int64_t ld) {
  constexpr int V = W / sizeof(T);
  if constexpr (W < 64)
    corr_tiles<T, W, 6, 2>(out, ldo, L, R, M, N, n_outer, os, n_inner, ld);
  else if (N % (2 * V) == 0)
    corr_tiles<T, W, 8, 2>(out, ldo, L, R, M, N, n_outer, os, n_inner, ld);
  else
    corr_tiles<T, W, 16, 1>(out, ldo, L, R, M, N, n_outer, os, n_inner, ld);
}

// An MR × NR tile of row dot products, lanes along the rows: every loaded B vector feeds MR
// FMAs and every A vector NR; each of the MR·NR sums is reduced across lanes once, at the end.
template <typename T, int W, int MR, int NR>
__attribute__((always_inline)) inline void dot_tile(T* out, int64_t ldo, const T* A, const T* B,
                                                    int64_t ld, int64_t K) {
  using vec = typename Vec<T, W>::type;
  constexpr int V = W / sizeof(T);
  vec acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = vec{};
  for (int64_t k = 0; k < K; k += V) {
    vec a[MR];  // unrolled: a loop left in place copied each vector through the stack
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) std::memcpy(&a[m], A + m * ld + k, sizeof(vec));
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) {
      vec b;
      std::memcpy(&b, B + n * ld + k, sizeof(vec));
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) acc[m][n] += a[m] * b;
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) {
      T sum = 0;
      for (int l = 0; l < V; ++l) sum += acc[m][n][l];
      out[m * ldo + n] += sum;
    }
}

template <typename T, int W>
__attribute__((always_inline)) inline void dots_any(T* out, int64_t ldo, const T* A, const T* B,
                                                    int64_t ld, int64_t M, int64_t N, int64_t K,
                                                    bool upper) {
  // 12 accumulators beside 3 + 1 vectors: AVX2's 16 registers.
  constexpr int MR = kDotRowAlign, NR = kDotColAlign;
  for (int64_t m0 = 0; m0 < M; m0 += MR)
    for (int64_t n0 = upper ? m0 / NR * NR : 0; n0 < N; n0 += NR)
      dot_tile<T, W, MR, NR>(out + m0 * ldo + n0, ldo, A + m0 * ld, B + n0 * ld, ld, K);
}

// Up to NV lane vectors at once, two accumulators each (the FMA latency, not the loads,
// bounds a single chain over a short batch).
template <typename T, int W, int NV>
__attribute__((always_inline)) inline void lane_tile(T* out, const T* L, const T* R, int64_t n,
                                                     int64_t ls, int64_t rs) {
  using vec = typename Vec<T, W>::type;
  constexpr int V = W / sizeof(T);
  vec acc0[NV], acc1[NV];
  for (int v = 0; v < NV; ++v) acc0[v] = acc1[v] = vec{};
  int64_t k = 0;
  for (; k + 1 < n; k += 2) {
    for (int v = 0; v < NV; ++v) {
      vec l0, r0, l1, r1;
      std::memcpy(&l0, L + k * ls + v * V, sizeof(vec));
      std::memcpy(&r0, R + k * rs + v * V, sizeof(vec));
      std::memcpy(&l1, L + (k + 1) * ls + v * V, sizeof(vec));
      std::memcpy(&r1, R + (k + 1) * rs + v * V, sizeof(vec));
      acc0[v] += l0 * r0;
      acc1[v] += l1 * r1;
    }
  }
  for (; k < n; ++k)
    for (int v = 0; v < NV; ++v) {
      vec l0, r0;
      std::memcpy(&l0, L + k * ls + v * V, sizeof(vec));
      std::memcpy(&r0, R + k * rs + v * V, sizeof(vec));
      acc0[v] += l0 * r0;
    }
  for (int v = 0; v < NV; ++v) {
    const vec sum = acc0[v] + acc1[v];
    std::memcpy(out + v * V, &sum, sizeof(vec));
  }
}

template <typename T, int W>
__attribute__((always_inline)) inline void lane_any(T* out, const T* L, const T* R, int64_t n,
                                                    int64_t ls, int64_t rs, int64_t lanes) {
  constexpr int V = W / sizeof(T);
  int64_t l = 0;
  for (; l + 4 * V <= lanes; l += 4 * V) lane_tile<T, W, 4>(out + l, L + l, R + l, n, ls, rs);
  for (; l < lanes; l += V) lane_tile<T, W, 1>(out + l, L + l, R + l, n, ls, rs);
}

template <typename T>
__attribute__((always_inline)) inline void add_any(T* out, int64_t ldo, const T* in, int64_t ldi,
                                                   int64_t M, int64_t N) {
  for (int64_t m = 0; m < M; ++m) {
    T* __restrict o = out + m * ldo;
    const T* __restrict i = in + m * ldi;
    for (int64_t n = 0; n < N; ++n) o[n] += i[n];
  }
}

// NV vectors of columns summed over the rows in registers, two accumulators each (the add
// latency, not the loads, bounds one chain: a row's sum runs over hundreds of rows).
template <typename T, int W, int NV>
__attribute__((always_inline)) inline void sum_block(T* out, const T* in, int64_t n, int64_t ld) {
  using vec = typename Vec<T, W>::type;
  constexpr int V = W / sizeof(T);
  vec acc0[NV], acc1[NV];
  for (int v = 0; v < NV; ++v) acc0[v] = acc1[v] = vec{};
  int64_t r = 0;
  for (; r + 1 < n; r += 2)
    for (int v = 0; v < NV; ++v) {
      vec a, b;
      std::memcpy(&a, in + r * ld + v * V, sizeof(vec));
      std::memcpy(&b, in + (r + 1) * ld + v * V, sizeof(vec));
      acc0[v] += a;
      acc1[v] += b;
    }
  for (; r < n; ++r)
    for (int v = 0; v < NV; ++v) {
      vec a;
      std::memcpy(&a, in + r * ld + v * V, sizeof(vec));
      acc0[v] += a;
    }
  for (int v = 0; v < NV; ++v) {
    const vec sum = acc0[v] + acc1[v];
    std::memcpy(out + v * V, &sum, sizeof(vec));
  }
}

template <typename T, int W>
__attribute__((always_inline)) inline void sum_rows_any(T* out, const T* in, int64_t n, int64_t ld,
                                                        int64_t N) {
  constexpr int V = W / sizeof(T);
  int64_t c = 0;
  for (; c + 4 * V <= N; c += 4 * V) sum_block<T, W, 4>(out + c, in + c, n, ld);
  for (; c + V <= N; c += V) sum_block<T, W, 1>(out + c, in + c, n, ld);
  for (; c < N; ++c) {
    T sum = 0;
    for (int64_t r = 0; r < n; ++r) sum += in[r * ld + c];
    out[c] = sum;
  }
}

#define CX_CORR_VARIANT(NAME, W, ATTR)                                                           \
  template <typename T>                                                                          \
  ATTR void NAME(T* out, int64_t ldo, const T* L, const T* R, int64_t M, int64_t N,              \
                 int64_t n_outer, int64_t os, int64_t n_inner, int64_t ld) {                     \
    corr_any<T, W>(out, ldo, L, R, M, N, n_outer, os, n_inner, ld);                              \
  }                                                                                              \
  template <typename T>                                                                          \
  ATTR void NAME##_lanes(T* out, const T* L, const T* R, int64_t n, int64_t ls, int64_t rs,      \
                         int64_t lanes) {                                                        \
    lane_any<T, W>(out, L, R, n, ls, rs, lanes);                                                 \
  }                                                                                              \
  template <typename T>                                                                          \
  ATTR void NAME##_add(T* out, int64_t ldo, const T* in, int64_t ldi, int64_t M, int64_t N) {    \
    add_any<T>(out, ldo, in, ldi, M, N);                                                         \
  }                                                                                              \
  template <typename T>                                                                          \
  ATTR void NAME##_dots(T* out, int64_t ldo, const T* A, const T* B, int64_t ld, int64_t M,       \
                        int64_t N, int64_t K, bool upper) {                                       \
    dots_any<T, W>(out, ldo, A, B, ld, M, N, K, upper);                                          \
  }                                                                                              \
  template <typename T>                                                                          \
  ATTR void NAME##_sum_rows(T* out, const T* in, int64_t n, int64_t ld, int64_t N) {             \
    sum_rows_any<T, W>(out, in, n, ld, N);                                                        \
  }
CX_CORR_VARIANT(corr_avx512, 64, __attribute__((target("avx512f"))))
CX_CORR_VARIANT(corr_avx2, 32, __attribute__((target("avx2,fma"))))
CX_CORR_VARIANT(corr_portable, 16, )
#undef CX_CORR_VARIANT

// Three rounds of shuffles, each interleaving pairs of rows at twice the previous width:
// after the first two each 128-bit lane holds 4 rows of one column, the last two move lanes.
// (GCC 12 warns inside its own headers that these intrinsics' undefined pass-through vector
// is uninitialised; it is never read.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f"))) void transpose16_avx512(const float* src, int64_t ld,
                                                           float* const* dst) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);      // per lane: a0 b0 a1 b1
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);  //           a2 b2 a3 b3
  }
  for (int i = 0; i < 16; i += 4) {                 // per lane k: column 4k + m of rows i..i+3
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int h = 0; h < 16; h += 8)                   // rows h..h+7: columns m, m + 8 / m + 4, m + 12
    for (int m = 0; m < 4; ++m) {
      t[h + m] = _mm512_shuffle_f32x4(r[h + m], r[h + 4 + m], 0x88);
      t[h + 4 + m] = _mm512_shuffle_f32x4(r[h + m], r[h + 4 + m], 0xDD);
    }
  for (int m = 0; m < 8; ++m) {
    _mm512_storeu_ps(dst[m], _mm512_shuffle_f32x4(t[m], t[8 + m], 0x88));
    _mm512_storeu_ps(dst[m + 8], _mm512_shuffle_f32x4(t[m], t[8 + m], 0xDD));
  }
}

// The same in three rounds for 8 × 8 (unpack, shuffle, then swapping 128-bit lanes).
__attribute__((target("avx2"))) void transpose8_avx2(const float* src, int64_t ld,
                                                     float* const* dst) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int m = 0; m < 4; ++m) {
    _mm256_storeu_ps(dst[m], _mm256_permute2f128_ps(r[m], r[4 + m], 0x20));
    _mm256_storeu_ps(dst[m + 4], _mm256_permute2f128_ps(r[m], r[4 + m], 0x31));
  }
}
#pragma GCC diagnostic pop

Isa detect_isa() {
  Isa best = Isa::kPortable;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f"))
    best = Isa::kAvx512;
  else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    best = Isa::kAvx2;
#endif
  const char* asked = std::getenv("CX_CPU_ISA");
  if (!asked || !*asked) return best;
  const std::string name(asked);
  const Isa want = name == "portable" ? Isa::kPortable
                   : name == "avx2"   ? Isa::kAvx2
                   : name == "avx512" ? Isa::kAvx512
                                      : throw std::invalid_argument(
                                            "CX_CPU_ISA must be portable, avx2 or avx512, not '" +
                                            name + "'");
  if (static_cast<int>(want) < static_cast<int>(best))
    throw std::invalid_argument("CX_CPU_ISA=" + name + ": this CPU does not run it");
  return want;
}

template <typename T>
void corr_dispatch(T* out, int64_t ldo, const T* L, const T* R, int64_t M, int64_t N,
                   int64_t n_outer, int64_t os, int64_t n_inner, int64_t ld) {
  switch (cpu_isa()) {
    case Isa::kAvx512: return corr_avx512<T>(out, ldo, L, R, M, N, n_outer, os, n_inner, ld);
    case Isa::kAvx2: return corr_avx2<T>(out, ldo, L, R, M, N, n_outer, os, n_inner, ld);
    default: return corr_portable<T>(out, ldo, L, R, M, N, n_outer, os, n_inner, ld);
  }
}

template <typename T>
void lane_dispatch(T* out, const T* L, const T* R, int64_t n, int64_t ls, int64_t rs,
                   int64_t lanes) {
  switch (cpu_isa()) {
    case Isa::kAvx512: return corr_avx512_lanes<T>(out, L, R, n, ls, rs, lanes);
    case Isa::kAvx2: return corr_avx2_lanes<T>(out, L, R, n, ls, rs, lanes);
    default: return corr_portable_lanes<T>(out, L, R, n, ls, rs, lanes);
  }
}

template <typename T>
void add_dispatch(T* out, int64_t ldo, const T* in, int64_t ldi, int64_t M, int64_t N) {
  switch (cpu_isa()) {
    case Isa::kAvx512: return corr_avx512_add<T>(out, ldo, in, ldi, M, N);
    case Isa::kAvx2: return corr_avx2_add<T>(out, ldo, in, ldi, M, N);
    default: return corr_portable_add<T>(out, ldo, in, ldi, M, N);
  }
}

template <typename T>
void dots_dispatch(T* out, int64_t ldo, const T* A, const T* B, int64_t ld, int64_t M, int64_t N,
                   int64_t K, bool upper) {
  switch (cpu_isa()) {
    case Isa::kAvx512: return corr_avx512_dots<T>(out, ldo, A, B, ld, M, N, K, upper);
    case Isa::kAvx2: return corr_avx2_dots<T>(out, ldo, A, B, ld, M, N, K, upper);
    default: return corr_portable_dots<T>(out, ldo, A, B, ld, M, N, K, upper);
  }
}

template <typename T>
void sum_rows_dispatch(T* out, const T* in, int64_t n, int64_t ld, int64_t N) {
  switch (cpu_isa()) {
    case Isa::kAvx512: return corr_avx512_sum_rows<T>(out, in, n, ld, N);
    case Isa::kAvx2: return corr_avx2_sum_rows<T>(out, in, n, ld, N);
    default: return corr_portable_sum_rows<T>(out, in, n, ld, N);
  }
}

}  // namespace

Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

void add_block(float* out, int64_t ldo, const float* in, int64_t ldi, int64_t M, int64_t N) {
  add_dispatch<float>(out, ldo, in, ldi, M, N);
}
void add_block(double* out, int64_t ldo, const double* in, int64_t ldi, int64_t M, int64_t N) {
  add_dispatch<double>(out, ldo, in, ldi, M, N);
}

void row_dots(float* out, int64_t ldo, const float* A, const float* B, int64_t ld, int64_t M,
              int64_t N, int64_t K, bool upper) {
  dots_dispatch<float>(out, ldo, A, B, ld, M, N, K, upper);
}
void row_dots(double* out, int64_t ldo, const double* A, const double* B, int64_t ld, int64_t M,
              int64_t N, int64_t K, bool upper) {
  dots_dispatch<double>(out, ldo, A, B, ld, M, N, K, upper);
}

void sum_rows(float* out, const float* in, int64_t n, int64_t ld, int64_t N) {
  sum_rows_dispatch<float>(out, in, n, ld, N);
}
void sum_rows(double* out, const double* in, int64_t n, int64_t ld, int64_t N) {
  sum_rows_dispatch<double>(out, in, n, ld, N);
}

int64_t transpose_width() {
  switch (cpu_isa()) {
    case Isa::kAvx512: return 16;
    case Isa::kAvx2: return 8;
    default: return 0;
  }
}

void transpose_block(const float* src, int64_t ld, float* const* dst) {
  switch (cpu_isa()) {
    case Isa::kAvx512: return transpose16_avx512(src, ld, dst);
    case Isa::kAvx2: return transpose8_avx2(src, ld, dst);
    default: throw std::logic_error("transpose_block: no register transpose on this CPU");
  }
}

void lane_dot(float* out, const float* L, const float* R, int64_t n, int64_t ls, int64_t rs,
              int64_t lanes) {
  lane_dispatch<float>(out, L, R, n, ls, rs, lanes);
}
void lane_dot(double* out, const double* L, const double* R, int64_t n, int64_t ls, int64_t rs,
              int64_t lanes) {
  lane_dispatch<double>(out, L, R, n, ls, rs, lanes);
}

void corr_accumulate(float* out, int64_t ldo, const float* L, const float* R, int64_t M, int64_t N,
                     int64_t n_outer, int64_t os, int64_t n_inner, int64_t ld) {
  corr_dispatch<float>(out, ldo, L, R, M, N, n_outer, os, n_inner, ld);
}
void corr_accumulate(double* out, int64_t ldo, const double* L, const double* R, int64_t M,
                     int64_t N, int64_t n_outer, int64_t os, int64_t n_inner, int64_t ld) {
  corr_dispatch<double>(out, ldo, L, R, M, N, n_outer, os, n_inner, ld);
}

}  // namespace consequential_ext::cpu
