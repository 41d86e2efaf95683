// Lag correlations of a 3×3 Gram's core in Winograd form: the tile transforms and the
// shifts' recovery (the maths: lag_winograd.h).
#include "lag_winograd.h"

#include <algorithm>
#include <array>
#include <cstddef>
#include <vector>

#include "corr_kernel.h"
#include "gram_cpu.h"
#include "simd.h"

namespace consequential_ext::cpu {
namespace {

// The transformed panels of a K-block (up to 36 a-side and 61 b-side) together stay within
// half of this CPU's L2 (1 MiB), so the correlations read them from cache.
constexpr int64_t kPanelBytes = int64_t{1} << 19;

// F(2, 3) ⊗ F(2, 3)'s 16 points of a 2 × 2 a-side tile (per axis [a0, (a0 + a1)/2,
// (a0 − a1)/2, −a1]) and of a 4 × 4 b-side window (per axis [b0 − b2, b1 + b2, b2 − b1,
// b1 − b3]), read from v's columns C0 on, each handed to put(point, value) as soon as it is
// made (point = row point · 4 + column point; fewer live registers than arrays of points).
template <int C0, typename vec, typename T, size_t R, size_t C, typename Put>
__attribute__((always_inline)) inline void a_points_3x3(const vec (&v)[R][C], T half, Put put) {
  vec rows[2][4];
  for (int i = 0; i < 2; ++i) {
    const vec a0 = v[i][C0], a1 = v[i][C0 + 1];
    rows[i][0] = a0, rows[i][1] = (a0 + a1) * half, rows[i][2] = (a0 - a1) * half, rows[i][3] = -a1;
  }
  for (int j = 0; j < 4; ++j) {
    const vec a0 = rows[0][j], a1 = rows[1][j];
    put(j, a0), put(4 + j, (a0 + a1) * half), put(8 + j, (a0 - a1) * half), put(12 + j, -a1);
  }
}
template <int C0, typename vec, size_t R, size_t C, typename Put>
__attribute__((always_inline)) inline void b_points_3x3(const vec (&v)[R][C], Put put) {
  vec rows[4][4];
  for (int i = 0; i < 4; ++i) {
    const vec b0 = v[i][C0], b1 = v[i][C0 + 1], b2 = v[i][C0 + 2], b3 = v[i][C0 + 3];
    rows[i][0] = b0 - b2, rows[i][1] = b1 + b2, rows[i][2] = b2 - b1, rows[i][3] = b1 - b3;
  }
  for (int j = 0; j < 4; ++j) {
    const vec b0 = rows[0][j], b1 = rows[1][j], b2 = rows[2][j], b3 = rows[3][j];
    put(j, b0 - b2), put(4 + j, b1 + b2), put(8 + j, b2 - b1), put(12 + j, b1 - b3);
  }
}

// F(4, 3) in its weight-gradient form (the maths: lag_winograd.h): per axis, a 4-value a-side
// at the points 0, 1, −1, 2, −2, ∞ and a 6-value b-side times Lavin & Gray's Bᵀ; integer
// coefficients, the lags' 1/24 multiples left to the recovery, once per call.
template <typename vec>
__attribute__((always_inline)) inline void a_axis_6(const vec& a0, const vec& a1, const vec& a2,
                                                    const vec& a3, vec (&out)[6]) {
  const vec e = a0 + a2, o = a1 + a3, e4 = a0 + a2 * 4, o4 = a1 * 2 + a3 * 8;
  out[0] = a0, out[1] = e + o, out[2] = e - o, out[3] = e4 + o4, out[4] = e4 - o4, out[5] = a3;
}
template <typename vec>
__attribute__((always_inline)) inline void b_axis_6(const vec& b0, const vec& b1, const vec& b2,
                                                    const vec& b3, const vec& b4, const vec& b5,
                                                    vec (&out)[6]) {
  const vec t1 = b4 - b2 * 4, t2 = b3 - b1 * 4, t3 = b4 - b2, t4 = (b3 - b1) * 2;
  out[0] = b0 * 4 - b2 * 5 + b4, out[1] = t1 + t2, out[2] = t1 - t2;
  out[3] = t3 + t4, out[4] = t3 - t4, out[5] = b1 * 4 - b3 * 5 + b5;
}
// F(4, 3) ⊗ F(4, 3)'s 36 points of a 4 × 4 a-side tile and of a 6 × 6 b-side window, read from
// v's columns C0 on and handed to put(point, value), point = row point · 6 + column point (as
// a_points_3x3 / b_points_3x3 for 2 × 2 tiles): the Gram's 4 × 4 tiles and G's share them.
template <int C0, typename vec, size_t R, size_t C, typename Put>
__attribute__((always_inline)) inline void a_points_f43(const vec (&v)[R][C], Put put) {
  vec rows[4][6], col[6];
  for (int i = 0; i < 4; ++i) a_axis_6(v[i][C0], v[i][C0 + 1], v[i][C0 + 2], v[i][C0 + 3], rows[i]);
  for (int j = 0; j < 6; ++j) {
    a_axis_6(rows[0][j], rows[1][j], rows[2][j], rows[3][j], col);
    for (int i = 0; i < 6; ++i) put(i * 6 + j, col[i]);
  }
}
template <int C0, typename vec, size_t R, size_t C, typename Put>
__attribute__((always_inline)) inline void b_points_f43(const vec (&w)[R][C], Put put) {
  vec rows[6][6], col[6];
  for (int i = 0; i < 6; ++i)
    b_axis_6(w[i][C0], w[i][C0 + 1], w[i][C0 + 2], w[i][C0 + 3], w[i][C0 + 4], w[i][C0 + 5],
             rows[i]);
  for (int j = 0; j < 6; ++j) {
    b_axis_6(rows[0][j], rows[1][j], rows[2][j], rows[3][j], rows[4][j], rows[5][j], col);
    for (int i = 0; i < 6; ++i) put(i * 6 + j, col[i]);
  }
}

// F(4, 2)'s b-side (5 values) at the points 0, 1, −1, 2, ∞ (rows of V⁻ᵀ scaled to integers;
// the a-side is F(4, 3)'s without the point −2, the lags' 1/6 multiples left to the recovery).
template <typename vec>
__attribute__((always_inline)) inline void b_axis_5(const vec& b0, const vec& b1, const vec& b2,
                                                    const vec& b3, const vec& b4, vec (&out)[5]) {
  const vec d = b3 - b1;
  out[0] = b0 * 2 - b2 * 2 + d, out[1] = b1 * 2 + b2 - b3, out[2] = b2 * 3 - b1 * 2 - b3;
  out[3] = d, out[4] = b4 - b2 - d * 2;
}

// A window of N × M pixels from (y, x) in a chunk copy Z (pixel (y, x) of image b at
// Z + ((y·Wz + x)·bc + b)·Cs): each pixel's first image and the step to the next; a pixel
// outside the H × Wd image reads the zero vector for every image (step 0).
template <typename T, int N, int M>
__attribute__((always_inline)) inline void window_pixels(const T* (&base)[N][M],
                                                         int64_t (&step)[N][M], const T* Z,
                                                         const T* zero, int64_t y, int64_t x,
                                                         int64_t H, int64_t Wd, int64_t Wz,
                                                         int64_t bc, int64_t Cs) {
  for (int i = 0; i < N; ++i)
    for (int j = 0; j < M; ++j) {
      const int64_t yy = y + i, xx = x + j;
      const bool inside = yy >= 0 && yy < H && xx >= 0 && xx < Wd;
      base[i][j] = inside ? Z + (yy * Wz + xx) * bc * Cs : zero;
      step[i][j] = inside ? Cs : 0;
    }
}

// One channel vector of a 2 × 2 tile's points from its b window w (rows y … y + 3, columns
// x − 2 … x + 3; the a tile is its rows 0, 1, columns 2, 3): F(2, 3) ⊗ F(2, 3), points 0 … 15,
// and F(2, 2) ⊗ F(2, 2) on the window's rows 1 … 3, columns 0 … 2, points 16 … 24; put_a /
// put_r(point, vector) store the a-side and b-side points.
template <typename vec, typename T, typename PutA, typename PutR>
__attribute__((always_inline)) inline void tile2_points(const vec (&w)[4][6], T half,
                                                        PutA put_a, PutR put_r) {
  a_points_3x3<2>(w, half, put_a);
  b_points_3x3<2>(w, put_r);
  vec ag[2][3], bg[3][3];
  for (int i = 0; i < 2; ++i) {
    const vec a0 = w[i][2], a1 = w[i][3];
    ag[i][0] = a0, ag[i][1] = a0 + a1, ag[i][2] = a1;
  }
  for (int i = 0; i < 3; ++i) {
    const vec b0 = w[i + 1][0], b1 = w[i + 1][1], b2 = w[i + 1][2];
    bg[i][0] = b0 - b1, bg[i][1] = b1, bg[i][2] = b2 - b1;
  }
  for (int j = 0; j < 3; ++j) {
    const vec a0 = ag[0][j], a1 = ag[1][j];
    put_a(16 + j, a0), put_a(19 + j, a0 + a1), put_a(22 + j, a1);
    const vec b0 = bg[0][j], b1 = bg[1][j], b2 = bg[2][j];
    put_r(16 + j, b0 - b1), put_r(19 + j, b1), put_r(22 + j, b2 - b1);
  }
}

// The same for a 4 × 4 tile (window rows y … y + 5, columns x − 2 … x + 5; the a tile its rows
// 0 … 3, columns 2 … 5): F(4, 3) ⊗ F(4, 3) on the window's columns 2 … 7 (a and b points
// 0 … 35: the 9 shifts t ≥ 0); F(4, 2) ⊗ F(4, 2) on rows 1 … 5, columns 0 … 4 (b points
// 36 … 60: the 4 shifts t < 0), whose a-side points are F(4, 3)'s without the point −2
// (kLagAOf4).
template <typename vec, typename PutA, typename PutR>
__attribute__((always_inline)) inline void tile4_points(const vec (&w)[6][8], PutA put_a,
                                                        PutR put_r) {
  a_points_f43<2>(w, put_a);
  b_points_f43<2>(w, put_r);
  vec r5[5][5], col5[5];
  for (int i = 1; i < 6; ++i) b_axis_5(w[i][0], w[i][1], w[i][2], w[i][3], w[i][4], r5[i - 1]);
  for (int j = 0; j < 5; ++j) {
    b_axis_5(r5[0][j], r5[1][j], r5[2][j], r5[3][j], r5[4][j], col5);
    for (int i = 0; i < 5; ++i) put_r(36 + i * 5 + j, col5[i]);
  }
}

// The transformed panels of the S × S tiles [t0, t0 + nt) of a region from (y0, x0), ntx tiles
// a row (row-major, each with its bc images), into A (a-side) and R (b-side): point pt's panel
// at pt·ps, row (tile − t0)·bc + image at that times Cs; W-byte vectors of channels.
template <typename T, int W, int S>
__attribute__((always_inline)) inline void lag_transform(T* A, T* R, int64_t ps, const T* Z,
                                                         const T* zero, int64_t H, int64_t Wd,
                                                         int64_t Wz, int64_t bc, int64_t Cs,
                                                         int64_t Cp, int64_t y0, int64_t x0,
                                                         int64_t ntx, int64_t t0, int64_t nt) {
  using vec = typename Vec<T, W>::type;
  constexpr int V = W / sizeof(T), N = S + 2, M = S + 4;  // the b window's rows and columns
  for (int64_t tile = t0; tile < t0 + nt; ++tile) {
    const int64_t y = y0 + S * (tile / ntx), x = x0 + S * (tile % ntx);
    const T* base[N][M];
    int64_t step[N][M];
    window_pixels(base, step, Z, zero, y, x - 2, H, Wd, Wz, bc, Cs);
    // Without channel padding past Cp the tile's bc images are one run of bc·Cs elements in
    // Z and in every panel, transformed as one; else image by image, the Cp channels each.
    const bool one_run = Cs == Cp;
    for (int64_t b = 0; b < (one_run ? 1 : bc); ++b) {
      const int64_t kk = (tile - t0) * bc + b, len = one_run ? bc * Cs : Cp;
      T* const a = A + kk * Cs;
      T* const r = R + kk * Cs;
      for (int64_t c = 0; c < len; c += V) {
        vec w[N][M];
#pragma GCC unroll 64
        for (int i = 0; i < N; ++i)
#pragma GCC unroll 64
          for (int j = 0; j < M; ++j) load_vec<T, W>(w[i][j], base[i][j] + b * step[i][j] + c);
        auto put_a = [&](int pt, const vec& v) { store_vec<T, W>(a + pt * ps + c, v); };
        auto put_r = [&](int pt, const vec& v) { store_vec<T, W>(r + pt * ps + c, v); };
        if constexpr (S == 2)
          tile2_points(w, T(0.5), put_a, put_r);
        else
          tile4_points(w, put_a, put_r);
      }
    }
  }
}

#define CX_LAG_VARIANT(NAME, W, ATTR)                                                           \
  template <typename T, int S>                                                                  \
  ATTR void NAME(T* A, T* R, int64_t ps, const T* Z, const T* zero, int64_t H, int64_t Wd,      \
                 int64_t Wz, int64_t bc, int64_t Cs, int64_t Cp, int64_t y0, int64_t x0,        \
                 int64_t ntx, int64_t t0, int64_t nt) {                                         \
    lag_transform<T, W, S>(A, R, ps, Z, zero, H, Wd, Wz, bc, Cs, Cp, y0, x0, ntx, t0, nt);       \
  }
CX_LAG_VARIANT(transform_avx512, 64, __attribute__((target("avx512f"))))
CX_LAG_VARIANT(transform_avx2, 32, __attribute__((target("avx2,fma"))))
CX_LAG_VARIANT(transform_portable, 16, )
#undef CX_LAG_VARIANT

// Point products over a region's tiles, in K-blocks of whole tiles (bc panel rows each):
// transform(A, R, ps, zero, t0, nt) writes the block's a-side panels (a_points of them) and
// b-side panels (points; point pt's at pt·ps; zero: bc·Cs zeros, the partners outside the
// image), then one correlation per point, of a-side panel a_of[pt] (pt where a_of is null)
// with b-side panel pt, adds into M (points blocks of m × Cp, leading dimension Cp).
template <typename T, typename Transform>
void points_over_tiles(T* M, int points, int a_points, const int* a_of, int64_t m, int64_t Cp,
                       int64_t tiles, int64_t bc, int64_t Cs, Transform transform) {
  if (tiles == 0) return;
  const int64_t panels = points + a_points;
  const int64_t kb = std::max<int64_t>(16, kPanelBytes / (panels * Cs * sizeof(T)));
  // Panels an odd number of cache lines apart: where bc·Cs is a multiple of 4 KiB (64
  // channels, 32 images a chunk: two threads on 128 images) the transform's stores, one per
  // panel and channel vector, would share address bits 0–11 with each other and with the
  // window's loads, and every load would wait on them (4K aliasing): 128×64×8×8 on two
  // threads, the transforms' perf samples −32 %.
  const int64_t tb = std::max<int64_t>(1, kb / bc), line = 64 / sizeof(T);
  const int64_t ps = round_up(tb * bc * Cs, 2 * line) + line;
  T* const A = scratch<T, 7>(panels * ps + bc * Cs);
  T* const R = A + a_points * ps;
  T* const zero = R + points * ps;
  std::fill(zero, zero + bc * Cs, T(0));
  for (int64_t t0 = 0; t0 < tiles; t0 += tb) {
    const int64_t nt = std::min(tb, tiles - t0);
    transform(A, R, ps, zero, t0, nt);
    for (int pt = 0; pt < points; ++pt)
      corr_accumulate(M + pt * m * Cp, Cp, A + (a_of ? a_of[pt] : pt) * ps, R + pt * ps, m, Cp,
                      1, 0, nt * bc, Cs);
  }
}

// F(4, 2) ⊗ F(4, 2)'s a-side points among F(4, 3) ⊗ F(4, 3)'s: per axis 0, 1, −1, 2, ∞ are
// F(4, 3)'s points 0, 1, 2, 3, 5.
constexpr int kAxis42[5] = {0, 1, 2, 3, 5};
constexpr auto kLagAOf4 = [] {
  std::array<int, kLagPoints4> of{};
  for (int pt = 0; pt < 36; ++pt) of[pt] = pt;
  for (int i = 0; i < 5; ++i)
    for (int j = 0; j < 5; ++j) of[36 + i * 5 + j] = kAxis42[i] * 6 + kAxis42[j];
  return of;
}();

// The lag points of the 2 × 2 or 4 × 4 (S) tiles of [ry0, ry1) × [rx0, rx1) into M.
template <int S, typename T>
void lag_points_region(T* M, const T* Z, int64_t H, int64_t W, int64_t Wz, int64_t bc,
                       int64_t Cs, int64_t Cp, int64_t ry0, int64_t ry1, int64_t rx0,
                       int64_t rx1) {
  const int64_t ntx = (rx1 - rx0) / S, tiles = (ry1 - ry0) / S * ntx;
  const Isa isa = cpu_isa();
  const int points = S == 2 ? kLagPoints2 : kLagPoints4;
  points_over_tiles(M, points, S == 2 ? points : 36, S == 2 ? nullptr : kLagAOf4.data(), Cp, Cp,
                    tiles, bc, Cs,
                    [&](T* A, T* R, int64_t ps, const T* zero, int64_t t0, int64_t nt) {
    if (isa == Isa::kAvx512)
      transform_avx512<T, S>(A, R, ps, Z, zero, H, W, Wz, bc, Cs, Cp, ry0, rx0, ntx, t0, nt);
    else if (isa == Isa::kAvx2)
      transform_avx2<T, S>(A, R, ps, Z, zero, H, W, Wz, bc, Cs, Cp, ry0, rx0, ntx, t0, nt);
    else
      transform_portable<T, S>(A, R, ps, Z, zero, H, W, Wz, bc, Cs, Cp, ry0, rx0, ntx, t0, nt);
  });
}

// [y0, y1) × [x0, x1): 4 × 4 tiles from (y0, x0) as far as they fit (points 0 … 60), 2 × 2
// tiles over the strips left (points 61 … 85).
template <typename T>
void points_impl(T* M, const T* Z, int64_t H, int64_t W, int64_t Wz, int64_t bc, int64_t Cs,
                 int64_t Cp, int64_t y0, int64_t y1, int64_t x0, int64_t x1) {
  const int64_t y4 = y0 + (y1 - y0) / 4 * 4, x4 = x0 + (x1 - x0) / 4 * 4;
  T* const M2 = M + kLagPoints4 * Cp * Cp;
  lag_points_region<4>(M, Z, H, W, Wz, bc, Cs, Cp, y0, y4, x0, x4);
  lag_points_region<2>(M2, Z, H, W, Wz, bc, Cs, Cp, y0, y4, x4, x1);
  lag_points_region<2>(M2, Z, H, W, Wz, bc, Cs, Cp, y4, y1, x0, x1);
}

// G's panels of output tiles [t0, t0 + nt) of a region from (y0, x0), ntx tiles a row, in
// S × S tiles (S = 2: F(2, 3) ⊗ F(2, 3), 16 points; S = 4: F(4, 3) ⊗ F(4, 3), 36 points):
// a-side from the output gradient's copy Zy (the tile's pixels, Oc channels), b-side from x's
// copy Z (rows y − ph … y − ph + S + 1, columns likewise, Cc channels; zero outside the image).
template <typename T, int W, int S>
__attribute__((always_inline)) inline void grad_transform_any(
    T* A, T* R, int64_t ps, const T* Zy, const T* Z, const T* zero, int64_t H, int64_t Wd,
    int64_t Wz, int64_t bc, int64_t Cs, int64_t Oc, int64_t Cc, int64_t ph, int64_t pw,
    int64_t y0, int64_t x0, int64_t ntx, int64_t t0, int64_t nt) {
  using vec = typename Vec<T, W>::type;
  constexpr int V = W / sizeof(T), N = S + 2;  // the b window's side
  const T half = T(0.5);
  auto put = [&](T* base, int pt, int64_t c, const vec& v) { store_vec<T, W>(base + pt * ps + c, v); };
  for (int64_t tile = t0; tile < t0 + nt; ++tile) {
    const int64_t y = y0 + S * (tile / ntx), x = x0 + S * (tile % ntx);
    const T* base[N][N];
    int64_t step[N][N];
    window_pixels(base, step, Z, zero, y - ph, x - pw, H, Wd, Wz, bc, Cs);
    const T* ay = Zy + (y * Wz + x) * bc * Cs;
    // As in lag_transform: without channel padding past Oc and Cc, one run of bc·Cs elements.
    const bool one_run = Oc == Cs && Cc == Cs;
    const int64_t a_len = one_run ? bc * Cs : Oc, b_len = one_run ? bc * Cs : Cc;
    for (int64_t b = 0; b < (one_run ? 1 : bc); ++b) {
      const int64_t kk = (tile - t0) * bc + b;
      T* a = A + kk * Cs;
      T* r = R + kk * Cs;
      const T* q = ay + b * Cs;
      for (int64_t c = 0; c < a_len; c += V) {
        vec v[S][S];
#pragma GCC unroll 16
        for (int i = 0; i < S; ++i)
#pragma GCC unroll 16
          for (int j = 0; j < S; ++j) load_vec<T, W>(v[i][j], q + (i * Wz + j) * bc * Cs + c);
        auto put_a = [&](int pt, const vec& x) { put(a, pt, c, x); };
        if constexpr (S == 2)
          a_points_3x3<0>(v, half, put_a);
        else
          a_points_f43<0>(v, put_a);
      }
      for (int64_t c = 0; c < b_len; c += V) {
        vec w[N][N];
#pragma GCC unroll 64
        for (int i = 0; i < N; ++i)
#pragma GCC unroll 64
          for (int j = 0; j < N; ++j) load_vec<T, W>(w[i][j], base[i][j] + b * step[i][j] + c);
        auto put_r = [&](int pt, const vec& x) { put(r, pt, c, x); };
        if constexpr (S == 2)
          b_points_3x3<0>(w, put_r);
        else
          b_points_f43<0>(w, put_r);
      }
    }
  }
}

#define CX_GRAD_VARIANT(NAME, W, ATTR)                                                          \
  template <typename T, int S>                                                                  \
  ATTR void NAME(T* A, T* R, int64_t ps, const T* Zy, const T* Z, const T* zero, int64_t H,     \
                 int64_t Wd, int64_t Wz, int64_t bc, int64_t Cs, int64_t Oc, int64_t Cc,        \
                 int64_t ph, int64_t pw, int64_t y0, int64_t x0, int64_t ntx, int64_t t0,       \
                 int64_t nt) {                                                                  \
    grad_transform_any<T, W, S>(A, R, ps, Zy, Z, zero, H, Wd, Wz, bc, Cs, Oc, Cc, ph, pw, y0,   \
                                x0, ntx, t0, nt);                                               \
  }
CX_GRAD_VARIANT(grad_transform_avx512, 64, __attribute__((target("avx512f"))))
CX_GRAD_VARIANT(grad_transform_avx2, 32, __attribute__((target("avx2,fma"))))
CX_GRAD_VARIANT(grad_transform_portable, 16, )
#undef CX_GRAD_VARIANT

// G's points over the output region [ry0, ry1) × [rx0, rx1) (sides multiples of S) in S × S
// tiles, into M's blocks (16 or 36 of Op × Cp).
template <int S, typename T>
void grad_points_region(T* M, const T* Zy, const T* Z, int64_t H, int64_t W, int64_t Wz,
                        int64_t bc, int64_t Cs, int64_t Op, int64_t Cp, int64_t ph, int64_t pw,
                        int64_t ry0, int64_t ry1, int64_t rx0, int64_t rx1) {
  const int64_t ntx = (rx1 - rx0) / S, tiles = (ry1 - ry0) / S * ntx;
  const Isa isa = cpu_isa();
  const int points = S == 2 ? kGradPoints2 : kGradPoints4;
  points_over_tiles(M, points, points, nullptr, Op, Cp, tiles, bc, Cs,
                    [&](T* A, T* R, int64_t ps, const T* zero, int64_t t0, int64_t nt) {
    if (isa == Isa::kAvx512)
      grad_transform_avx512<T, S>(A, R, ps, Zy, Z, zero, H, W, Wz, bc, Cs, Op, Cp, ph, pw, ry0,
                                  rx0, ntx, t0, nt);
    else if (isa == Isa::kAvx2)
      grad_transform_avx2<T, S>(A, R, ps, Zy, Z, zero, H, W, Wz, bc, Cs, Op, Cp, ph, pw, ry0,
                                rx0, ntx, t0, nt);
    else
      grad_transform_portable<T, S>(A, R, ps, Zy, Z, zero, H, W, Wz, bc, Cs, Op, Cp, ph, pw,
                                    ry0, rx0, ntx, t0, nt);
  });
}

// [0, y1) × [0, x1): 4 × 4 tiles over [0, y4) × [0, x4) (points 0 … 35), 2 × 2 tiles over the
// strips left (points 36 … 51).
template <typename T>
void grad_points_impl(T* M, const T* Zy, const T* Z, int64_t H, int64_t W, int64_t Wz,
                      int64_t bc, int64_t Cs, int64_t Op, int64_t Cp, int64_t ph, int64_t pw,
                      int64_t y1, int64_t x1) {
  const int64_t y4 = y1 / 4 * 4, x4 = x1 / 4 * 4;
  T* const M2 = M + kGradPoints4 * Op * Cp;
  grad_points_region<4>(M, Zy, Z, H, W, Wz, bc, Cs, Op, Cp, ph, pw, 0, y4, 0, x4);
  grad_points_region<2>(M2, Zy, Z, H, W, Wz, bc, Cs, Op, Cp, ph, pw, 0, y4, x4, x1);
  grad_points_region<2>(M2, Zy, Z, H, W, Wz, bc, Cs, Op, Cp, ph, pw, y4, y1, 0, x1);
}

// Which points, with which coefficient, make up each lag: per axis, F(2, 3)'s lags 0, 1, 2
// and F(2, 2)'s lags 0, 1.
constexpr int kLag3[3][4] = {{1, 1, 1, 0}, {0, 1, -1, 0}, {0, 1, 1, 1}};
constexpr int kLag2[2][3] = {{1, 1, 0}, {0, 1, 1}};

// F(4, 3)'s lags 0, 1, 2 from its 6 points, in 24ths.
constexpr int kLag4x24[3][6] = {{6, -4, -4, 1, 1, 0}, {0, -4, 4, 2, -2, 0}, {0, -4, -4, 4, 4, 24}};
// F(4, 2)'s lags 0, 1 from its 5 points, in 6ths.
constexpr int kLag42x6[2][5] = {{3, 3, 1, 1, 0}, {0, 3, -1, 2, 6}};

// out += coefficient · point's block (cell entries); nothing for a zero coefficient.
template <typename T>
void add_point(T* out, const T* point, T coefficient, int64_t cell) {
  if (coefficient == 0) return;
  for (int64_t e = 0; e < cell; ++e) out[e] += coefficient * point[e];
}

// out[s][t] += scale · Σ_{i,j} coef[s][i]·coef[t][j]·(point (i, j)'s block) over n entries,
// for the lags s, t < L whose out is not null, from a P × P grid of points (block (i, j) at
// M + (i·P + j)·cell): separably, the columns' lags first (P·L blocks into tmp), then the rows'.
template <typename T, int L, int P>
void lags_from_grid(T* const (&out)[L][L], const T* M, const int (&coef)[L][P], T scale,
                    int64_t cell, int64_t n, std::vector<T>& tmp) {
  tmp.assign(static_cast<size_t>(P * L) * n, T(0));
  for (int i = 0; i < P; ++i)
    for (int t = 0; t < L; ++t)
      for (int j = 0; j < P; ++j)
        add_point(tmp.data() + (i * L + t) * n, M + (i * P + j) * cell, T(coef[t][j]), n);
  for (int s = 0; s < L; ++s)
    for (int t = 0; t < L; ++t)
      if (out[s][t])
        for (int i = 0; i < P; ++i)
          add_point(out[s][t], tmp.data() + (i * L + t) * n, scale * T(coef[s][i]), n);
}

// Which of a region's two tilings have tiles: 4 × 4 ones, and 2 × 2 ones in the strips left.
PointBlocks point_blocks(int64_t rows, int64_t cols, int64_t points4, int64_t points2) {
  const int64_t y4 = rows / 4 * 4, x4 = cols / 4 * 4;
  const bool four = y4 > 0 && x4 > 0, two = rows > 0 && cols > 0 && (y4 < rows || x4 < cols);
  return {four ? 0 : points4, two ? points4 + points2 : points4};
}

// The lags from all four grids: F(4, 3) (in 24ths) and F(2, 3) for t ≥ 0, F(4, 2) (in 6ths)
// and F(2, 2) for t < 0 (their lags s − 1, t + 2); a grid outside `used` adds nothing.
template <typename T>
void from_points_impl(T* const (&out)[3][5], const T* M, int64_t cell, int64_t n,
                      PointBlocks used) {
  const T* const M2 = M + kLagPoints4 * cell;
  for (int s = 0; s < 3; ++s)
    for (int t = 0; t < 5; ++t)
      if (out[s][t]) std::fill(out[s][t], out[s][t] + n, T(0));
  T* const ahead[3][3] = {{out[0][2], out[0][3], out[0][4]},
                          {out[1][2], out[1][3], out[1][4]},
                          {out[2][2], out[2][3], out[2][4]}};
  T* const behind[2][2] = {{out[1][0], out[1][1]}, {out[2][0], out[2][1]}};
  std::vector<T> tmp;
  if (used.begin == 0) {
    lags_from_grid(ahead, M, kLag4x24, T(1) / T(576), cell, n, tmp);
    lags_from_grid(behind, M + 36 * cell, kLag42x6, T(1) / T(36), cell, n, tmp);
  }
  if (used.end == kLagPoints) {
    lags_from_grid(ahead, M2, kLag3, T(1), cell, n, tmp);
    lags_from_grid(behind, M2 + 16 * cell, kLag2, T(1), cell, n, tmp);
  }
}

template <typename T>
void grad_from_points_impl(T* g, const T* M, int64_t cell, int64_t n, PointBlocks used) {
  T* const out[3][3] = {{g, g + cell, g + 2 * cell},
                        {g + 3 * cell, g + 4 * cell, g + 5 * cell},
                        {g + 6 * cell, g + 7 * cell, g + 8 * cell}};
  std::vector<T> tmp;
  if (used.begin == 0) lags_from_grid(out, M, kLag4x24, T(1) / T(576), cell, n, tmp);
  if (used.end == kGradPoints)
    lags_from_grid(out, M + kGradPoints4 * cell, kLag3, T(1), cell, n, tmp);
}

}  // namespace

void grad_points_accumulate(float* M, const float* Zy, const float* Z, int64_t H, int64_t W,
                            int64_t Wz, int64_t bc, int64_t Cs, int64_t Op, int64_t Cp,
                            int64_t ph, int64_t pw, int64_t y1, int64_t x1) {
  grad_points_impl(M, Zy, Z, H, W, Wz, bc, Cs, Op, Cp, ph, pw, y1, x1);
}
void grad_points_accumulate(double* M, const double* Zy, const double* Z, int64_t H, int64_t W,
                            int64_t Wz, int64_t bc, int64_t Cs, int64_t Op, int64_t Cp,
                            int64_t ph, int64_t pw, int64_t y1, int64_t x1) {
  grad_points_impl(M, Zy, Z, H, W, Wz, bc, Cs, Op, Cp, ph, pw, y1, x1);
}
void grad_from_points(float* g, const float* M, int64_t cell, int64_t n, PointBlocks used) {
  grad_from_points_impl(g, M, cell, n, used);
}
void grad_from_points(double* g, const double* M, int64_t cell, int64_t n, PointBlocks used) {
  grad_from_points_impl(g, M, cell, n, used);
}
PointBlocks lag_point_blocks(int64_t rows, int64_t cols) {
  return point_blocks(rows, cols, kLagPoints4, kLagPoints2);
}
PointBlocks grad_point_blocks(int64_t rows, int64_t cols) {
  return point_blocks(rows, cols, kGradPoints4, kGradPoints2);
}

void lag_points_accumulate(float* M, const float* Z, int64_t H, int64_t W, int64_t Wz,
                           int64_t bc, int64_t Cs, int64_t Cp, int64_t y0, int64_t y1,
                           int64_t x0, int64_t x1) {
  points_impl(M, Z, H, W, Wz, bc, Cs, Cp, y0, y1, x0, x1);
}
void lag_points_accumulate(double* M, const double* Z, int64_t H, int64_t W, int64_t Wz,
                           int64_t bc, int64_t Cs, int64_t Cp, int64_t y0, int64_t y1,
                           int64_t x0, int64_t x1) {
  points_impl(M, Z, H, W, Wz, bc, Cs, Cp, y0, y1, x0, x1);
}
void lags_from_points(float* const (&out)[3][5], const float* M, int64_t cell, int64_t n,
                      PointBlocks used) {
  from_points_impl(out, M, cell, n, used);
}
void lags_from_points(double* const (&out)[3][5], const double* M, int64_t cell, int64_t n,
                      PointBlocks used) {
  from_points_impl(out, M, cell, n, used);
}

}  // namespace consequential_ext::cpu
