// Operator schemas of consequential_ext: declared once here; every backend adds its
// kernels with TORCH_LIBRARY_IMPL(consequential_ext, <Backend>, m) beside its sources.
// Python-side fake (meta) implementations live in consequential_ext/ops/_fake.py.
#include <Python.h>
#include <torch/library.h>

#include <vector>

#include "escalation.h"

extern "C" {
// An empty module: importing consequential_ext._C runs the static registrations below
// (no pybind11 needed, so the extension can use the limited API).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(consequential_ext, m) {
  // Σ over every patch (im2col column) of patch ⊗ patch, unnormalised, per group:
  // (groups, D, D) with D = C_in/groups · kh · kw (+1 for a trailing constant-1 row when
  // bias). Accumulated in float32 (float64 for float64 input).
  m.def("im2col_gram(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups, bool bias) -> Tensor");
  // im2col_gram with one named CPU algorithm (auto, grouped, blas, shift, tiled)
  // instead of the automatic choice: for tests.
  m.def("_im2col_gram_algorithm(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups, bool bias, str algorithm) -> Tensor");
  // im2col_gram and the weight gradient G = dZ Xᵀ per group (groups, out/groups, D; bias
  // column Σ dZ): from the same pass over x where the CPU's shift algorithm builds the Gram
  // and brings G, elsewhere from ATen's conv backward. grad_output has x's dtype.
  m.def("_conv_gram_grad(Tensor x, Tensor grad_output, int[2] kernel_size, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups, bool bias) -> (Tensor, Tensor)");
  // _conv_gram_grad's G alone (the shift algorithm's pass without the Gram where it brings G,
  // elsewhere ATen's conv backward).
  m.def("_conv_weight_grad(Tensor x, Tensor grad_output, int[2] kernel_size, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups, bool bias) -> Tensor");
  // grad @ (gram + ridge·I)⁻¹ for a batch of systems: gram (..., D, D) symmetric PSD,
  // grad (..., M, D). Cholesky; on a failed factorisation of finite input the ridge is
  // escalated (×10) with one warning; non-finite input gives non-finite output. Output
  // is cast to out_dtype (default: grad's dtype).
  m.def("ridge_solve(Tensor gram, Tensor grad, float ridge, ScalarType? out_dtype=None) -> Tensor");
  // The torch version this extension was compiled against (checked at import).
  m.def("built_with_torch() -> str");
  // [requested, escalated] ridges of this thread's escalations since its last call (then
  // forgotten): per thread, so that one thread's solve is never reported by another's.
  m.def("take_ridge_escalations() -> float[]");
}

namespace consequential_ext {
namespace {
// Per thread: the kernels note from the thread that called ridge_solve (never from inside a
// parallel region), and ops.ridge_solve takes the record right after, on the same thread. A
// process-global record let a concurrent thread's take report (or merge away) this one's.
thread_local std::vector<double> escalations;  // flattened (requested, escalated) pairs

std::string built_with_torch() { return CX_TORCH_VERSION; }

std::vector<double> take_ridge_escalations() {
  std::vector<double> out;
  out.swap(escalations);
  return out;
}
}  // namespace

void note_ridge_escalation(double requested, double escalated) {
  if (escalations.size() < 64) {  // a record, not a log: the first few are enough to warn
    escalations.push_back(requested);
    escalations.push_back(escalated);
  }
}
}  // namespace consequential_ext

TORCH_LIBRARY_IMPL(consequential_ext, CompositeExplicitAutograd, m) {
  m.impl("built_with_torch", &consequential_ext::built_with_torch);
  m.impl("take_ridge_escalations", &consequential_ext::take_ridge_escalations);
}
