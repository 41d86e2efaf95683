// im2col Gram as one BLAS GEMM per group, for few patches per Gram entry (2×2 and 4×4 maps
// with hundreds of channels). There the Gram is a rank-P update whose cost is writing the
// D² outputs: GEMM splits the output between threads, while the shift and tiled kernels split
// the patches and then add one D² accumulator per thread. With P·kBlasRatio <= D the im2col
// matrix (P × D) is smaller than the Gram it produces, so materialising it costs less than
// the output itself.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "gram_cpu.h"
#include "mirror.h"

namespace consequential_ext::cpu {

void gram_blas_cpu(const at::Tensor& x, const PatchGeometry& g, at::Tensor& gram) {
  const int64_t Cg = x.size(1) / g.groups;
  const auto xa = x.to(gram.scalar_type());
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    // (B, Cg·kh·kw, L) in the (channel, i, j) row order of a Conv2d weight.
    auto cols = at::im2col(xa.narrow(1, grp * Cg, Cg), {g.kh, g.kw}, {g.dh, g.dw},
                           {g.ph, g.pw}, {g.sh, g.sw});
    auto rows = cols.transpose(1, 2).reshape({-1, cols.size(1)});
    if (g.bias) rows = at::cat({rows, at::ones({rows.size(0), 1}, rows.options())}, 1);
    auto out = gram.select(0, grp);
    at::mm_out(out, rows.t(), rows);
    // GEMM does not promise a bit-symmetric product (MKL on an AVX2-only CPU rounds the two
    // triangles differently), and the solve reads one triangle: copy the lower one up.
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "gram_blas_mirror", [&] {
      mirror_triangle(out.data_ptr<scalar_t>(), out.size(0), out.stride(0), Mirror::kLowerToUpper);
    });
  }
}

}  // namespace consequential_ext::cpu
