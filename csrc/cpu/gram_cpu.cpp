// CPU im2col_gram: argument checks, choice of algorithm, registration.
#include "gram_cpu.h"

#include <torch/library.h>

#include "corr_kernel.h"

namespace consequential_ext::cpu {
namespace {

void check_pair(c10::IntArrayRef v, const char* name, int64_t min_value) {
  TORCH_CHECK(v.size() == 2, "im2col_gram: ", name, " must have 2 entries, got ", v);
  TORCH_CHECK(v[0] >= min_value && v[1] >= min_value, "im2col_gram: ", name, " must be >= ",
              min_value, ", got ", v);
}

enum class Algorithm { kAuto, kGrouped, kBlas, kShift, kTiled };

// The automatic choice, cheapest first where it applies (measured: README, "Real models").
Algorithm choose(const at::Tensor& x, const PatchGeometry& g, int64_t patches, int64_t d) {
  if (g.groups > 1 && x.size(1) / g.groups < kCorrAlign) return Algorithm::kGrouped;
  if (gram_prefers_blas(patches, d)) return Algorithm::kBlas;
  // 1×1 has no shifts to share, and the tiled kernel's upper-triangle blocks are faster
  // (32×160×16×16, one thread: 4.9 against 9.5 ms; two: 7.6 against 9.3 ms CPU).
  return g.sh == 1 && g.sw == 1 && g.kh * g.kw > 1 ? Algorithm::kShift : Algorithm::kTiled;
}

at::Tensor gram_with(const at::Tensor& x, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                     c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                     bool bias, Algorithm algorithm) {
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
  const PatchGeometry g{kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0],
                        padding[1],     dilation[0],    dilation[1], groups,   bias};
  TORCH_CHECK(x.size(2) + 2 * g.ph >= g.dh * (g.kh - 1) + 1 &&
                  x.size(3) + 2 * g.pw >= g.dw * (g.kw - 1) + 1,
              "im2col_gram: kernel_size ", kernel_size, " (dilation ", dilation,
              ") does not fit the padded input ", x.sizes().slice(2), " + 2*", padding);

  const int64_t d = x.size(1) / groups * g.kh * g.kw + (bias ? 1 : 0);
  // float32 accumulation for every narrower dtype: a Gram of bf16/fp16 patches loses
  // everything past 8 (11) mantissa bits and overflows fp16's range.
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  // Every algorithm initialises every entry itself, on one thread (a parallel fill is a
  // thread hand-off that costs more than the fill on a busy machine).
  auto gram = at::empty({groups, d, d}, x.options().dtype(acc));
  const int64_t patches = x.size(0) * g.out_h(x.size(2)) * g.out_w(x.size(3));
  if (x.numel() == 0) {  // every patch is zero; only the bias count survives
    gram.zero_();
    if (bias) gram.select(1, d - 1).select(1, d - 1).fill_(patches);
    return gram;
  }
  if (algorithm == Algorithm::kAuto) algorithm = choose(x, g, patches, d);
  const bool unit_stride = g.sh == 1 && g.sw == 1;
  TORCH_CHECK(algorithm != Algorithm::kShift || unit_stride,
              "im2col_gram: the shift algorithm needs stride 1, got ", stride);
  switch (algorithm) {
    case Algorithm::kGrouped: gram_grouped_cpu(x, g, gram); break;
    case Algorithm::kBlas: gram_blas_cpu(x, g, gram); break;
    case Algorithm::kShift: gram_shift_cpu(x, g, gram); break;
    default: gram_tiled_cpu(x, g, gram); break;
  }
  return gram;
}

at::Tensor im2col_gram_cpu(const at::Tensor& x, c10::IntArrayRef kernel_size,
                           c10::IntArrayRef stride, c10::IntArrayRef padding,
                           c10::IntArrayRef dilation, int64_t groups, bool bias) {
  return gram_with(x, kernel_size, stride, padding, dilation, groups, bias, Algorithm::kAuto);
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
      {"tiled", Algorithm::kTiled}};
  for (const auto& [name, value] : names)
    if (algorithm == name)
      return gram_with(x, kernel_size, stride, padding, dilation, groups, bias, value);
  TORCH_CHECK(false, "im2col_gram: algorithm must be one of auto, grouped, blas, shift, "
              "tiled; got '", algorithm, "'");
}

}  // namespace

TORCH_LIBRARY_IMPL(consequential_ext, CPU, m) {
  m.impl("im2col_gram", &im2col_gram_cpu);
  m.impl("_im2col_gram_algorithm", &im2col_gram_algorithm_cpu);
}

}  // namespace consequential_ext::cpu
