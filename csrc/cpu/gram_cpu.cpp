// CPU im2col_gram: argument checks, choice of algorithm, registration.
#include "gram_cpu.h"

#include <ATen/ATen.h>
#include <c10/util/safe_numerics.h>
#include <c10/util/strides.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "corr_kernel.h"
#include "thread_count.h"

namespace consequential_ext::cpu {
namespace {

void check_pair(c10::IntArrayRef v, const char* name, int64_t min_value) {
  TORCH_CHECK(v.size() == 2, "im2col_gram: ", name, " must have 2 entries, got ", v);
  TORCH_CHECK(v[0] >= min_value && v[1] >= min_value, "im2col_gram: ", name, " must be >= ",
              min_value, ", got ", v);
}

enum class Algorithm { kAuto, kGrouped, kBlas, kShift, kTiled, kRows, kRuns };

// The automatic choice, cheapest first where it applies (measured: README, "Real models").
Algorithm choose(const at::Tensor& x, const PatchGeometry& g, int64_t patches, int64_t d,
                 int64_t out = 0) {
  const int64_t channels = x.size(1);
  if (g.groups > 1 && channels / g.groups < kCorrAlign) return Algorithm::kGrouped;
  if (gram_prefers_blas(patches, d)) return Algorithm::kBlas;
  // Stride 1 with few taps: the rows kernel (measured, 2 threads, CPU time, ×128: a
  // 3-channel 3×3 stem on 32×32 1.7 ms against the shift form's 8.1 and the tiled 6.9; 1×1
  // over 16 channels 1.0 against 14 tiled; 4 channels, D = 37, 6.3 against 8.4 shift; at
  // 8 channels, D = 73, the shift form is 1.8× faster).
  if (d <= kRowsMaxD && rows_applies(x, g, out)) return Algorithm::kRows;
  // Strided and 1×1 kernels have no shifts to share (1×1 over 160: the tiled kernel's
  // upper-triangle blocks 4.9 against the shift form's 9.5 ms, one thread): the runs
  // kernel where its column step is narrow (runs_applies), else the tiled one.
  if (g.sh == 1 && g.sw == 1 && g.kh * g.kw > 1) return Algorithm::kShift;
  return runs_applies(x, g) ? Algorithm::kRuns : Algorithm::kTiled;
}

PatchGeometry checked_geometry(const at::Tensor& x, c10::IntArrayRef kernel_size,
                               c10::IntArrayRef stride, c10::IntArrayRef padding,
                               c10::IntArrayRef dilation, int64_t groups, bool bias) {
  TORCH_CHECK(x.dim() == 4, "im2col_gram: x must be a 4-D (B, C, H, W) tensor, got ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "im2col_gram: x must be float16, bfloat16, float32 or float64, got ", dtype);
  check_pair(kernel_size, "kernel_size", 1);
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0,
              "im2col_gram: groups must be a positive divisor of C=", x.size(1), ", got ", groups);
  TORCH_CHECK(x.size(2) > 0 && x.size(3) > 0,
              "im2col_gram: x must have non-empty spatial dims (F.conv2d refuses them too), got ",
              x.sizes());
  // ops/_conv_args.py's bound: the padded input and the receptive field stay below 2^62, so
  // the sums and products below are exact in int64.
  constexpr int64_t kExtentLimit = int64_t{1} << 62;
  for (int i = 0; i < 2; ++i)
    TORCH_CHECK(padding[i] <= (kExtentLimit - 1 - x.size(2 + i)) / 2 &&
                    (kernel_size[i] == 1 ||
                     dilation[i] <= (kExtentLimit - 1) / (kernel_size[i] - 1)),
                "im2col_gram: padding and dilation*(kernel_size - 1) must keep the padded input "
                "and the receptive field below 2^62, got padding=", padding, ", dilation=",
                dilation, ", kernel_size=", kernel_size);
  const PatchGeometry g{kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0],
                        padding[1],     dilation[0],    dilation[1], groups,   bias};
  TORCH_CHECK(x.size(2) + 2 * g.ph >= g.dh * (g.kh - 1) + 1 &&
                  x.size(3) + 2 * g.pw >= g.dw * (g.kw - 1) + 1,
              "im2col_gram: kernel_size ", kernel_size, " (dilation ", dilation,
              ") does not fit the padded input ", x.sizes().slice(2), " + 2*", padding);
  int64_t patches = 0;  // B·Ho·Wo, counted by every kernel in int64
  TORCH_CHECK(!c10::mul_overflows(g.out_h(x.size(2)), g.out_w(x.size(3)), &patches) &&
                  !c10::mul_overflows(patches, x.size(0), &patches),
              "im2col_gram: the conv has more output positions than int64 counts (padding=",
              padding, ", stride=", stride, ")");
  return g;
}

int64_t gram_size(const at::Tensor& x, const PatchGeometry& g) {
  return x.size(1) / g.groups * g.kh * g.kw + (g.bias ? 1 : 0);
}

int64_t patch_count(const at::Tensor& x, const PatchGeometry& g) {
  return x.size(0) * g.out_h(x.size(2)) * g.out_w(x.size(3));
}

// float32 accumulation for every narrower dtype: a Gram of bf16/fp16 patches loses
// everything past 8 (11) mantissa bits and overflows fp16's range.
at::ScalarType accumulate_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The Gram of x for a geometry checked_geometry gave.
at::Tensor gram_with(const at::Tensor& x, const PatchGeometry& g, Algorithm algorithm) {
  keep_thread_count();
  const int64_t d = gram_size(x, g);
  // Every algorithm initialises every entry itself, on one thread (a parallel fill is a
  // thread hand-off that costs more than the fill on a busy machine).
  auto gram = at::empty({g.groups, d, d}, x.options().dtype(accumulate_type(x)));
  const int64_t patches = patch_count(x, g);
  if (x.numel() == 0) {  // every patch is zero; only the bias count survives
    gram.zero_();
    if (g.bias) gram.select(1, d - 1).select(1, d - 1).fill_(patches);
    return gram;
  }
  if (algorithm == Algorithm::kAuto) algorithm = choose(x, g, patches, d);
  const bool unit_stride = g.sh == 1 && g.sw == 1;
  TORCH_CHECK(algorithm != Algorithm::kShift || unit_stride,
              "im2col_gram: the shift algorithm needs stride 1, got [", g.sh, ", ", g.sw, "]");
  switch (algorithm) {
    case Algorithm::kGrouped: gram_grouped_cpu(x, g, gram); break;
    case Algorithm::kBlas: gram_blas_cpu(x, g, gram); break;
    case Algorithm::kShift: gram_shift_cpu(x, g, gram); break;
    case Algorithm::kRows: gram_rows_cpu(x, g, &gram); break;
    case Algorithm::kRuns: gram_runs_cpu(x, g, gram); break;
    default: gram_tiled_cpu(x, g, gram); break;
  }
  return gram;
}

// Whether the shift algorithm builds this Gram and G comes from the same pass: enough real
// channels on both sides that the 16-wide padding wastes little (measured, 2 threads, CPU
// time, G against oneDNN's weight-gradient pass: 64→64 on 8×8 ×128 0.76, 16→16 on 32×32
// 0.45–0.55, 16→32 on 16×16 1.03; 3→16 on 32×32 4.0 and 8→8 1.6, so not there).
bool shift_brings_grad(const at::Tensor& x, int64_t out_channels, const PatchGeometry& g,
                       int64_t patches, int64_t d) {
  const int64_t cg = x.size(1) / g.groups, og = out_channels / g.groups;
  const int64_t cp = round_up(cg, kCorrAlign), op = round_up(og, kCorrAlign);
  return choose(x, g, patches, d, out_channels) == Algorithm::kShift && cg >= kCorrAlign &&
         og >= kCorrAlign && 4 * cp * op <= 5 * cg * og;
}

// grad_output (B, out, Ho, Wo) of x's dtype for a conv of geometry g.
void check_grad_output(const at::Tensor& x, const at::Tensor& grad_output,
                       const PatchGeometry& g, const char* op) {
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == x.size(0) &&
                  grad_output.size(1) >= 1 && grad_output.size(1) % g.groups == 0 &&
                  grad_output.size(2) == g.out_h(x.size(2)) &&
                  grad_output.size(3) == g.out_w(x.size(3)),
              op, ": grad_output must be (B, out, Ho, Wo) = (", x.size(0),
              ", a positive multiple of groups=", g.groups, ", ", g.out_h(x.size(2)), ", ",
              g.out_w(x.size(3)), "), got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == x.scalar_type(), op,
              ": grad_output must have x's dtype ", x.scalar_type(), ", got ",
              grad_output.scalar_type());
}

// Which kernel gives G beside the Gram (kShift or kRows), else kAuto: ATen's conv backward.
// The rows kernel wherever it builds the Gram: its panel rows of dZ ran 2–14× faster than
// oneDNN's weight gradient there (3→16 3×3 on 32×32 ×128: 6.4 ms CPU for both against 17.7
// for the shift Gram and oneDNN's G; 16→64 1×1: 17 against 53). ops.conv_gram_brings_grad
// mirrors this.
Algorithm grad_algorithm(const at::Tensor& x, const at::Tensor& grad_output,
                         const PatchGeometry& g) {
  if (x.numel() == 0) return Algorithm::kAuto;
  const int64_t patches = patch_count(x, g), d = gram_size(x, g), out = grad_output.size(1);
  if (choose(x, g, patches, d, out) == Algorithm::kRows) return Algorithm::kRows;
  return shift_brings_grad(x, out, g, patches, d) ? Algorithm::kShift : Algorithm::kAuto;
}

// G (groups, out/groups, D) from ATen's conv backward (oneDNN), in x's accumulation type.
at::Tensor aten_weight_grad(const at::Tensor& x, const at::Tensor& grad_output,
                            const PatchGeometry& g) {
  const int64_t out = grad_output.size(1), groups = g.groups;
  const auto acc = accumulate_type(x);
  auto weight = at::empty({out, x.size(1) / groups, g.kh, g.kw}, x.options().dtype(acc));
  std::optional<at::IntArrayRef> bias_sizes;
  const std::vector<int64_t> bias_shape{out};
  if (g.bias) bias_sizes = bias_shape;
  // torch 2.13's oneDNN weight gradient of a 1×1 strided conv over 2–7 input channels,
  // computed channels_last, corrupts the heap (nn.Conv2d's backward too): that input, small,
  // goes NCHW (gradients.py's _hits_onednn_heap_bug, the same case; weight is NCHW here).
  const bool heap_bug =
      g.kh == 1 && g.kw == 1 && (g.sh > 1 || g.sw > 1) && x.size(1) >= 2 && x.size(1) < 8 &&
      x.strides() != at::IntArrayRef(c10::contiguous_strides(x.sizes()));
  const auto input = heap_bug ? x.clone(at::MemoryFormat::Contiguous) : x;
  auto [unused, grad_w, grad_b] = at::convolution_backward(
      grad_output.to(acc), input.to(acc), weight, bias_sizes, {g.sh, g.sw}, {g.ph, g.pw},
      {g.dh, g.dw}, false, {0, 0}, groups, {false, true, g.bias});
  auto grad = grad_w.reshape({groups, out / groups, -1});
  // ATen's conv backward of an empty input (C = 0) zeroes the bias gradient too; its column
  // multiplies the ones row, Σ dZ, whatever x holds.
  if (g.bias && x.numel() == 0) grad_b = grad_output.to(acc).sum({0, 2, 3});
  if (g.bias) grad = at::cat({grad, grad_b.reshape({groups, out / groups, 1})}, -1);
  return grad;
}

// The Gram and the weight gradient G = dZ Xᵀ of a conv's input x and output gradient
// grad_output: (gram (groups, D, D), grad (groups, out/groups, D), the bias column Σ dZ),
// both in x's accumulation type. G from the rows or shift kernel's own pass over x where
// grad_algorithm says so, else from ATen's conv backward (oneDNN).
std::tuple<at::Tensor, at::Tensor> conv_gram_grad_cpu(
    const at::Tensor& x, const at::Tensor& grad_output, c10::IntArrayRef kernel_size,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    bool bias) {
  const PatchGeometry g = checked_geometry(x, kernel_size, stride, padding, dilation, groups, bias);
  check_grad_output(x, grad_output, g, "conv_gram_grad");
  const Algorithm algorithm = grad_algorithm(x, grad_output, g);
  if (algorithm == Algorithm::kAuto)
    return {gram_with(x, g, Algorithm::kAuto), aten_weight_grad(x, grad_output, g)};
  keep_thread_count();
  const int64_t d = gram_size(x, g), out = grad_output.size(1);
  auto gram = at::empty({groups, d, d}, x.options().dtype(accumulate_type(x)));
  auto grad = at::empty({groups, out / groups, d}, x.options().dtype(accumulate_type(x)));
  if (algorithm == Algorithm::kRows)
    gram_rows_cpu(x, g, &gram, &grad_output, &grad);
  else
    gram_shift_cpu(x, g, gram, &grad_output, &grad);
  return {gram, grad};
}

// G alone, as conv_gram_grad_cpu gives it: the rows or shift kernel's pass without the
// Gram's products where grad_algorithm says so, else ATen's conv backward.
at::Tensor conv_weight_grad_cpu(const at::Tensor& x, const at::Tensor& grad_output,
                                c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                                c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                int64_t groups, bool bias) {
  const PatchGeometry g = checked_geometry(x, kernel_size, stride, padding, dilation, groups, bias);
  check_grad_output(x, grad_output, g, "conv_weight_grad");
  const Algorithm algorithm = grad_algorithm(x, grad_output, g);
  if (algorithm == Algorithm::kAuto) return aten_weight_grad(x, grad_output, g);
  keep_thread_count();
  auto grad = at::empty({groups, grad_output.size(1) / groups, gram_size(x, g)},
                        x.options().dtype(accumulate_type(x)));
  at::Tensor no_gram;
  if (algorithm == Algorithm::kRows)
    gram_rows_cpu(x, g, nullptr, &grad_output, &grad);
  else
    gram_shift_cpu(x, g, no_gram, &grad_output, &grad);
  return grad;
}

at::Tensor im2col_gram_cpu(const at::Tensor& x, c10::IntArrayRef kernel_size,
                           c10::IntArrayRef stride, c10::IntArrayRef padding,
                           c10::IntArrayRef dilation, int64_t groups, bool bias) {
  return gram_with(x, checked_geometry(x, kernel_size, stride, padding, dilation, groups, bias),
                   Algorithm::kAuto);
}

// One named algorithm instead of the automatic choice, for tests: every algorithm on every
// geometry it accepts, and the choice itself.
at::Tensor im2col_gram_algorithm_cpu(const at::Tensor& x, c10::IntArrayRef kernel_size,
                                     c10::IntArrayRef stride, c10::IntArrayRef padding,
                                     c10::IntArrayRef dilation, int64_t groups, bool bias,
                                     c10::string_view algorithm) {
  static const std::pair<const char*, Algorithm> names[] = {
      {"auto", Algorithm::kAuto},       {"grouped", Algorithm::kGrouped},
      {"blas", Algorithm::kBlas},       {"shift", Algorithm::kShift},
      {"tiled", Algorithm::kTiled},     {"rows", Algorithm::kRows},
      {"runs", Algorithm::kRuns}};
  for (const auto& [name, value] : names)
    if (algorithm == name)
      return gram_with(
          x, checked_geometry(x, kernel_size, stride, padding, dilation, groups, bias), value);
  TORCH_CHECK(false, "im2col_gram: algorithm must be one of auto, grouped, blas, shift, "
              "tiled, rows, runs; got '", algorithm, "'");
}

}  // namespace

TORCH_LIBRARY_IMPL(consequential_ext, CPU, m) {
  m.impl("im2col_gram", &im2col_gram_cpu);
  m.impl("_im2col_gram_algorithm", &im2col_gram_algorithm_cpu);
  m.impl("_conv_gram_grad", &conv_gram_grad_cpu);
  m.impl("_conv_weight_grad", &conv_weight_grad_cpu);
}

}  // namespace consequential_ext::cpu
