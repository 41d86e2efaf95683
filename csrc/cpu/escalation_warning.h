// The one-per-process warning that a ridge had to be escalated, shared by every backend.
#pragma once

namespace consequential_ext::cpu {

// Emits the warning through consequential_ext.ops.reference.warn_escalated, so it is a
// Python RuntimeWarning (TORCH_WARN from an operator called through torch.ops only reaches
// stderr) and the "once per process" flag is the one the reference backend uses. Safe from
// any thread; throws c10::Error if Python raises (e.g. warnings turned into errors).
void warn_ridge_escalated(double ridge, double escalated);

}  // namespace consequential_ext::cpu
