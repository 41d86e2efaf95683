// Ridge escalations seen by the compiled ridge_solve kernels. C++ warnings do not reach
// Python's `warnings` through torch.ops, so kernels record here and the Python wrapper
// (consequential_ext/ops/__init__.py) takes the record and warns once.
#pragma once

namespace consequential_ext {
// Record, for the calling thread, that a factorisation needed `escalated` instead of
// `requested`; call it from the thread that called ridge_solve, not from a parallel region.
void note_ridge_escalation(double requested, double escalated);
}  // namespace consequential_ext
