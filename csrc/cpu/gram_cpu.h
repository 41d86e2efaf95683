// Internal interface between the CPU im2col_gram entry point and its algorithms.
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace consequential_ext::cpu {

// One convolution's patch geometry (per spatial axis: kernel, stride, padding, dilation).
struct PatchGeometry {
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t groups;
  bool bias;
  int64_t out_h(int64_t h) const { return (h + 2 * ph - dh * (kh - 1) - 1) / sh + 1; }
  int64_t out_w(int64_t w) const { return (w + 2 * pw - dw * (kw - 1) - 1) / sw + 1; }
};

// Both fill gram (groups, D, D), D = C/groups·kh·kw (+1 with bias), in acc_t (float for
// every input dtype but double). x: (B, C, H, W) of any dtype and strides.
// Stride-1 convolutions: shifted channel correlations + border corrections (exact). With
// grad_output (B, out, Ho, Wo) of x's dtype, also the weight gradient G = dZ Xᵀ into grad
// (groups, out/groups, D) from the same copy of x (bias column: Σ dZ); with gram undefined,
// G alone.
void gram_shift_cpu(const at::Tensor& x, const PatchGeometry& g, at::Tensor& gram,
                    const at::Tensor* grad_output = nullptr, at::Tensor* grad = nullptr);
// Any stride / dilation (and 1×1): im2col in cache-sized tiles of patches, upper triangle only.
void gram_tiled_cpu(const at::Tensor& x, const PatchGeometry& g, at::Tensor& gram);
// Any stride and dilation dh, undilated rows (dw = 1): each kernel row of a patch is one run
// of kw·Cg in a zero-padded pixel-major copy of the image, correlated in place
// (gram_runs_cpu.cpp); runs_applies: where it is chosen over the tiled kernel (dw = 1, few
// channels a column step, a run padded to whole vectors wasting ≤ 1/4).
void gram_runs_cpu(const at::Tensor& x, const PatchGeometry& g, at::Tensor& gram);
bool runs_applies(const at::Tensor& x, const PatchGeometry& g);
// Few channels per group (depthwise, small groups), any stride: groups in SIMD lanes,
// per tap difference one pass of batch products and strided prefix sums.
void gram_grouped_cpu(const at::Tensor& x, const PatchGeometry& g, at::Tensor& gram);
// Stride 1, few taps: a tap-major patch panel per chunk of output rows, its rows' dot products
// (gram_rows_cpu.cpp); with grad_output also G into grad (gram may then be null: G alone).
void gram_rows_cpu(const at::Tensor& x, const PatchGeometry& g, at::Tensor* gram,
                   const at::Tensor* grad_output = nullptr, at::Tensor* grad = nullptr);
// The largest D (taps + bias) gram_rows_cpu is chosen for.
constexpr int64_t kRowsMaxD = 48;
// One chunk's panel: ~256 KiB of float, L2-resident while the tiles read it.
constexpr int64_t kPanelElems = int64_t{1} << 16;
// Whether gram_rows_cpu can take x (with `out` output channels for G): stride 1, and one
// output row of the panel (taps, bias and dZ's channels) within a chunk.
bool rows_applies(const at::Tensor& x, const PatchGeometry& g, int64_t out);
// Very few patches per Gram entry, any geometry: im2col and one GEMM per group
// (gram_blas_cpu.cpp).
void gram_blas_cpu(const at::Tensor& x, const PatchGeometry& g, at::Tensor& gram);
// Whether gram_blas_cpu is the faster choice for this many patches (B·Ho·Wo) and this D.
// Measured on the AVX-512 machine (2 threads, CPU time; README, "Since 590d7c9"): at
// 32·P ≤ D the GEMM takes 0.6–1.5× the other kernel's time (the D × D output dominates:
// 32×512×2×2, 8×256×2×2, 32×512×4×4 stride 2); above it 1.1–9× (the shift form on
// 32×256×4×4: 2.9× faster, on 8×128×4×4 1.2×; the tiled one on 8×256×8×8 stride 2 and
// 32×1280×2×2 1×1: 1.1–2.5×). The earlier 4·P ≤ D, set on another machine before
// the shift kernel's copy changes, sent 32×256×4×4 to the GEMM.
constexpr int64_t kBlasRatio = 32;
inline bool gram_prefers_blas(int64_t patches, int64_t d) { return patches * kBlasRatio <= d; }

// Rows (or columns) padded to whole 64-byte vectors for the correlation micro-kernel.
inline int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// This thread's scratch buffer number Slot, at least n elements, contents unspecified. It
// keeps its memory between calls: a Gram per layer per step would otherwise map and fault
// in megabytes of fresh pages each time (measured: ~12% of a 128-channel 8×8 Gram).
template <typename T, int Slot>
T* scratch(size_t n) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

}  // namespace consequential_ext::cpu
