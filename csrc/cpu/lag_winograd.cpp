// Lag correlations of a 3×3 Gram's core in Winograd form: the tile transforms and the
// shifts' recovery (the maths: lag_winograd.h).
#include "lag_winograd.h"

#include <algorithm>
#include <cstddef>
#include <cstring>

#include "corr_kernel.h"
#include "gram_cpu.h"
#include "simd.h"

namespace consequential_ext::cpu {
namespace {

// All 50 transformed panels of a K-block together stay within half of this CPU's L2 (1 MiB),
// so the 25 correlations read them from cache.
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

// The transformed panels of tiles [t0, t0 + nt) (row-major over the region's tiles, each
// with its bc images) into A (a-side) and R (b-side): point pt's panel at pt·ps, row
// (tile − t0)·bc + image at that times Cs; W-byte vectors of channels.
template <typename T, int W>
__attribute__((always_inline)) inline void transform_any(T* A, T* R, int64_t ps, const T* Z,
                                                         const T* zero, int64_t H, int64_t Wd,
                                                         int64_t Wz, int64_t bc, int64_t Cs,
                                                         int64_t Cp, int64_t y0, int64_t x0,
                                                         int64_t ntx, int64_t t0, int64_t nt) {
  using vec = typename Vec<T, W>::type;
  constexpr int V = W / sizeof(T);
  const T half = T(0.5);
  for (int64_t tile = t0; tile < t0 + nt; ++tile) {
    const int64_t y = y0 + 2 * (tile / ntx), x = x0 + 2 * (tile % ntx);
    // the b window: rows y … y + 3, columns x − 2 … x + 3 (the a tile is its [0, 2) × [2, 4));
    // a pixel outside the image reads the zero vector for every image
    const T* base[4][6];
    int64_t step[4][6];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 6; ++j) {
        const int64_t yy = y + i, xx = x - 2 + j;
        const bool inside = yy < H && xx >= 0 && xx < Wd;
        base[i][j] = inside ? Z + (yy * Wz + xx) * bc * Cs : zero;
        step[i][j] = inside ? Cs : 0;
      }
    // Without channel padding past Cp the tile's bc images are one run of bc·Cs elements in
    // Z and in every panel, transformed as one; else image by image, the Cp channels each.
    const bool one_run = Cs == Cp;
    for (int64_t b = 0; b < (one_run ? 1 : bc); ++b) {
    const int64_t kk = (tile - t0) * bc + b, len = one_run ? bc * Cs : Cp;
    const T* p[4][6];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 6; ++j) p[i][j] = base[i][j] + b * step[i][j];
    T* a = A + kk * Cs;
    T* r = R + kk * Cs;
    auto put = [&](T* base, int pt, int64_t c, const vec& v) {
      std::memcpy(base + pt * ps + c, &v, sizeof(vec));
    };
    for (int64_t c = 0; c < len; c += V) {
      vec v[4][6];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 6; ++j) std::memcpy(&v[i][j], p[i][j] + c, sizeof(vec));
      // F(2, 3) ⊗ F(2, 3): points 0 … 15 (the a tile is the window's columns 2, 3)
      a_points_3x3<2>(v, half, [&](int pt, const vec& x) { put(a, pt, c, x); });
      b_points_3x3<2>(v, [&](int pt, const vec& x) { put(r, pt, c, x); });
      // F(2, 2) ⊗ F(2, 2) on the b window's rows 1 … 3, columns 0 … 2: points 16 … 24
      vec ag[2][3], bg[3][3];
      for (int i = 0; i < 2; ++i) {
        const vec a0 = v[i][2], a1 = v[i][3];
        ag[i][0] = a0, ag[i][1] = a0 + a1, ag[i][2] = a1;
      }
      for (int i = 0; i < 3; ++i) {
        const vec b0 = v[i + 1][0], b1 = v[i + 1][1], b2 = v[i + 1][2];
        bg[i][0] = b0 - b1, bg[i][1] = b1, bg[i][2] = b2 - b1;
      }
      for (int j = 0; j < 3; ++j) {
        const vec a0 = ag[0][j], a1 = ag[1][j];
        put(a, 16 + j, c, a0);
        put(a, 19 + j, c, a0 + a1);
        put(a, 22 + j, c, a1);
        const vec b0 = bg[0][j], b1 = bg[1][j], b2 = bg[2][j];
        put(r, 16 + j, c, b0 - b1);
        put(r, 19 + j, c, b1);
        put(r, 22 + j, c, b2 - b1);
      }
    }
    }
  }
}

#define CX_LAG_VARIANT(NAME, W, ATTR)                                                           \
  template <typename T>                                                                         \
  ATTR void NAME(T* A, T* R, int64_t ps, const T* Z, const T* zero, int64_t H, int64_t Wd,      \
                 int64_t Wz, int64_t bc, int64_t Cs, int64_t Cp, int64_t y0, int64_t x0,        \
                 int64_t ntx, int64_t t0, int64_t nt) {                                         \
    transform_any<T, W>(A, R, ps, Z, zero, H, Wd, Wz, bc, Cs, Cp, y0, x0, ntx, t0, nt);          \
  }
CX_LAG_VARIANT(transform_avx512, 64, __attribute__((target("avx512f"))))
CX_LAG_VARIANT(transform_avx2, 32, __attribute__((target("avx2,fma"))))
CX_LAG_VARIANT(transform_portable, 16, )
#undef CX_LAG_VARIANT

// Point products over a region's tiles, in K-blocks of whole tiles (bc panel rows each):
// transform(A, R, ps, zero, t0, nt) writes the block's a-side and b-side panels (point pt's at
// pt·ps; zero: bc·Cs zeros, the partners outside the image), then one correlation per point
// adds into M (points blocks of m × Cp, leading dimension Cp).
template <typename T, typename Transform>
void points_over_tiles(T* M, int points, int64_t m, int64_t Cp, int64_t tiles, int64_t bc,
                       int64_t Cs, Transform transform) {
  const int64_t kb = std::max<int64_t>(16, kPanelBytes / (2 * points * Cs * sizeof(T)));
  const int64_t tb = std::max<int64_t>(1, kb / bc), ps = tb * bc * Cs;
  T* const A = scratch<T, 7>(2 * points * ps + bc * Cs);
  T* const R = A + points * ps;
  T* const zero = R + points * ps;
  std::fill(zero, zero + bc * Cs, T(0));
  for (int64_t t0 = 0; t0 < tiles; t0 += tb) {
    const int64_t nt = std::min(tb, tiles - t0);
    transform(A, R, ps, zero, t0, nt);
    for (int pt = 0; pt < points; ++pt)
      corr_accumulate(M + pt * m * Cp, Cp, A + pt * ps, R + pt * ps, m, Cp, 1, 0, nt * bc, Cs);
  }
}

template <typename T>
void points_impl(T* M, const T* Z, int64_t H, int64_t W, int64_t Wz, int64_t bc, int64_t Cs,
                 int64_t Cp, int64_t y0, int64_t y1, int64_t x0, int64_t x1) {
  const int64_t ntx = (x1 - x0) / 2, tiles = (y1 - y0) / 2 * ntx;
  const Isa isa = cpu_isa();
  points_over_tiles(M, kLagPoints, Cp, Cp, tiles, bc, Cs,
                    [&](T* A, T* R, int64_t ps, const T* zero, int64_t t0, int64_t nt) {
    if (isa == Isa::kAvx512)
      transform_avx512<T>(A, R, ps, Z, zero, H, W, Wz, bc, Cs, Cp, y0, x0, ntx, t0, nt);
    else if (isa == Isa::kAvx2)
      transform_avx2<T>(A, R, ps, Z, zero, H, W, Wz, bc, Cs, Cp, y0, x0, ntx, t0, nt);
    else
      transform_portable<T>(A, R, ps, Z, zero, H, W, Wz, bc, Cs, Cp, y0, x0, ntx, t0, nt);
  });
}

// G's panels of output tiles [t0, t0 + nt): a-side from the output gradient's copy Zy (the
// tile's 2 × 2 pixels, Oc channels), b-side from x's copy Z (rows y − ph … y − ph + 3,
// columns x − pw … x − pw + 3, Cc channels; zero outside the image); 16 points each.
template <typename T, int W>
__attribute__((always_inline)) inline void grad_transform_any(
    T* A, T* R, int64_t ps, const T* Zy, const T* Z, const T* zero, int64_t H, int64_t Wd,
    int64_t Wz, int64_t bc, int64_t Cs, int64_t Oc, int64_t Cc, int64_t ph, int64_t pw,
    int64_t ntx, int64_t t0, int64_t nt) {
  using vec = typename Vec<T, W>::type;
  constexpr int V = W / sizeof(T);
  const T half = T(0.5);
  auto put = [&](T* base, int pt, int64_t c, const vec& v) {
    std::memcpy(base + pt * ps + c, &v, sizeof(vec));
  };
  for (int64_t tile = t0; tile < t0 + nt; ++tile) {
    const int64_t y = 2 * (tile / ntx), x = 2 * (tile % ntx);
    const T* base[4][4];
    int64_t step[4][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        const int64_t yy = y - ph + i, xx = x - pw + j;
        const bool inside = yy >= 0 && yy < H && xx >= 0 && xx < Wd;
        base[i][j] = inside ? Z + (yy * Wz + xx) * bc * Cs : zero;
        step[i][j] = inside ? Cs : 0;
      }
    const T* ay = Zy + (y * Wz + x) * bc * Cs;
    for (int64_t b = 0; b < bc; ++b) {
      const int64_t kk = (tile - t0) * bc + b;
      T* a = A + kk * Cs;
      T* r = R + kk * Cs;
      const T* q = ay + b * Cs;
      for (int64_t c = 0; c < Oc; c += V) {
        vec v[2][2];
        std::memcpy(&v[0][0], q + c, sizeof(vec));
        std::memcpy(&v[0][1], q + bc * Cs + c, sizeof(vec));
        std::memcpy(&v[1][0], q + Wz * bc * Cs + c, sizeof(vec));
        std::memcpy(&v[1][1], q + (Wz + 1) * bc * Cs + c, sizeof(vec));
        a_points_3x3<0>(v, half, [&](int pt, const vec& x) { put(a, pt, c, x); });
      }
      for (int64_t c = 0; c < Cc; c += V) {
        vec w[4][4];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) std::memcpy(&w[i][j], base[i][j] + b * step[i][j] + c, sizeof(vec));
        b_points_3x3<0>(w, [&](int pt, const vec& x) { put(r, pt, c, x); });
      }
    }
  }
}

#define CX_GRAD_VARIANT(NAME, W, ATTR)                                                          \
  template <typename T>                                                                         \
  ATTR void NAME(T* A, T* R, int64_t ps, const T* Zy, const T* Z, const T* zero, int64_t H,     \
                 int64_t Wd, int64_t Wz, int64_t bc, int64_t Cs, int64_t Oc, int64_t Cc,        \
                 int64_t ph, int64_t pw, int64_t ntx, int64_t t0, int64_t nt) {                 \
    grad_transform_any<T, W>(A, R, ps, Zy, Z, zero, H, Wd, Wz, bc, Cs, Oc, Cc, ph, pw, ntx, t0, \
                             nt);                                                               \
  }
CX_GRAD_VARIANT(grad_transform_avx512, 64, __attribute__((target("avx512f"))))
CX_GRAD_VARIANT(grad_transform_avx2, 32, __attribute__((target("avx2,fma"))))
CX_GRAD_VARIANT(grad_transform_portable, 16, )
#undef CX_GRAD_VARIANT

template <typename T>
void grad_points_impl(T* M, const T* Zy, const T* Z, int64_t H, int64_t W, int64_t Wz,
                      int64_t bc, int64_t Cs, int64_t Op, int64_t Cp, int64_t ph, int64_t pw,
                      int64_t y1, int64_t x1) {
  const int64_t ntx = x1 / 2, tiles = y1 / 2 * ntx;
  const Isa isa = cpu_isa();
  points_over_tiles(M, kGradPoints, Op, Cp, tiles, bc, Cs,
                    [&](T* A, T* R, int64_t ps, const T* zero, int64_t t0, int64_t nt) {
    if (isa == Isa::kAvx512)
      grad_transform_avx512<T>(A, R, ps, Zy, Z, zero, H, W, Wz, bc, Cs, Op, Cp, ph, pw, ntx, t0, nt);
    else if (isa == Isa::kAvx2)
      grad_transform_avx2<T>(A, R, ps, Zy, Z, zero, H, W, Wz, bc, Cs, Op, Cp, ph, pw, ntx, t0, nt);
    else
      grad_transform_portable<T>(A, R, ps, Zy, Z, zero, H, W, Wz, bc, Cs, Op, Cp, ph, pw, ntx, t0,
                                 nt);
  });
}

// Which points, with which coefficient, make up each lag: per axis, F(2, 3)'s lags 0, 1, 2
// and F(2, 2)'s lags 0, 1.
constexpr int kLag3[3][4] = {{1, 1, 1, 0}, {0, 1, -1, 0}, {0, 1, 1, 1}};
constexpr int kLag2[2][3] = {{1, 1, 0}, {0, 1, 1}};

// out += coefficient · point's block (cell entries); nothing for a zero coefficient.
template <typename T>
void add_point(T* out, const T* point, int coefficient, int64_t cell) {
  if (coefficient == 0) return;
  const T w = static_cast<T>(coefficient);
  for (int64_t e = 0; e < cell; ++e) out[e] += w * point[e];
}

template <typename T>
void from_points_impl(T* out, const T* M, int64_t Cp, int64_t s, int64_t t) {
  const int64_t cell = Cp * Cp;
  std::fill(out, out + cell, T(0));
  auto add = [&](int pt, int coefficient) { add_point(out, M + pt * cell, coefficient, cell); };
  if (t >= 0) {  // F(2, 3) ⊗ F(2, 3)
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) add(i * 4 + j, kLag3[s][i] * kLag3[t][j]);
  } else {  // F(2, 2) ⊗ F(2, 2) on the window moved by (+1, −2): s ∈ {1, 2}, t ∈ {−2, −1}
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) add(16 + i * 3 + j, kLag2[s - 1][i] * kLag2[t + 2][j]);
  }
}

template <typename T>
void grad_from_points_impl(T* g, const T* M, int64_t cell) {
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) {
      T* out = g + (i * 3 + j) * cell;
      for (int pr = 0; pr < 4; ++pr)
        for (int pc = 0; pc < 4; ++pc)
          add_point(out, M + (pr * 4 + pc) * cell, kLag3[i][pr] * kLag3[j][pc], cell);
    }
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
void grad_from_points(float* g, const float* M, int64_t cell) { grad_from_points_impl(g, M, cell); }
void grad_from_points(double* g, const double* M, int64_t cell) { grad_from_points_impl(g, M, cell); }

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
void lag_from_points(float* out, const float* M, int64_t Cp, int64_t s, int64_t t) {
  from_points_impl(out, M, Cp, s, t);
}
void lag_from_points(double* out, const double* M, int64_t Cp, int64_t s, int64_t t) {
  from_points_impl(out, M, Cp, s, t);
}

}  // namespace consequential_ext::cpu
