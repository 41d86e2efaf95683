"""The curated mutants of ``make mutate`` (tools/mutate.py): realistic single-line bugs in the
math, the rules and the kernels, each with the tests that should catch it.

A mutant names its file and an exact source snippet that must occur exactly once; the runner
replaces it and fails loudly when the snippet is gone or ambiguous, so mutants survive
edits elsewhere in the file and are updated when the code they target changes. ``tests``
are pytest arguments (files or node ids), the most specific first: the run stops at the
first failure and reports it. How to add mutants for a new feature: docs/mutation.md.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str        # <module>.<what goes wrong>
    path: str        # relative to the repository root
    find: str        # exact source text, present exactly once
    replace: str
    tests: tuple     # pytest arguments that should fail
    why: str = ""    # the bug it stands for (issue survivors say so)


def _m(name, path, find, replace, *tests, why=""):
    return Mutant(name, path, find, replace, tuple(tests), why)


PY = "consequential_ext/"
FUNCTIONAL = "tests/test_functional.py"
GEOMETRY = "tests/test_geometry_axes.py"
DEGENERATE = "tests/test_degenerate_signals.py"
AMP_SIDES = "tests/test_amp_sides.py"
DISPATCH = "tests/test_dispatch.py"
CPU_KERNELS = "tests/test_cpu_kernels.py"
EMULATION = "tests/test_cuda_emulation.py"

MUTANTS = [
    # ---- matching.py: G (A + λI)⁻¹ -------------------------------------------------------
    _m("matching.linear-column-gram-unnormalised", PY + "matching.py",
       "gram = rows @ rows.T / n", "gram = rows @ rows.T",
       "tests/test_properties.py", FUNCTIONAL),
    _m("matching.conv-N-counts-patches", PY + "matching.py",
       "PendingGram(build(batch), batch.shape[0], group)",
       "PendingGram(build(batch), batch.shape[0] * per_sample, group)",
       FUNCTIONAL, why="N for convolutions"),
    _m("matching.conv-column-N-counts-patches", PY + "matching.py",
       "cols.transpose(1, 2) @ cols / b", "cols.transpose(1, 2) @ cols / p",
       "tests/test_properties.py", GEOMETRY),
    _m("matching.bias-row-zero", PY + "matching.py",
       "rows.new_ones(rows.shape[:-1] + (1,))", "rows.new_zeros(rows.shape[:-1] + (1,))",
       FUNCTIONAL, why="the bias row"),
    _m("matching.side-choice-inverted", PY + "matching.py",
       'return "row" if row <= column else "column"',
       'return "row" if row >= column else "column"',
       "tests/test_properties.py", AMP_SIDES),
    _m("matching.conv-autocast-guard-dropped", PY + "matching.py",
       "@_autocast_off\ndef matched_conv2d", "def matched_conv2d",
       AMP_SIDES, "tests/test_amp.py", why="issue survivor 4"),
    _m("matching.linear-autocast-guard-dropped", PY + "matching.py",
       "@_autocast_off\ndef matched_linear", "def matched_linear",
       AMP_SIDES, "tests/test_amp.py"),
    _m("matching.amortizer-on-column-side", PY + "matching.py",
       "if group is not None or (amortizer is not None and not amortizer.exact_when_cheaper):",
       "if group is not None:",
       "tests/test_amortize.py"),
    _m("matching.column-signal-order", PY + "matching.py",
       "permute(1, 2, 0, 3).reshape(groups, og, p)", "permute(1, 2, 3, 0).reshape(groups, og, p)",
       "tests/test_properties.py", GEOMETRY),
    _m("matching.conv-bias-grad-halved", PY + "matching.py",
       "grad = torch.cat([grad, grad_bias.reshape(groups, -1, 1)], dim=-1)",
       "grad = torch.cat([grad, grad_bias.reshape(groups, -1, 1) / 2], dim=-1)",
       FUNCTIONAL),

    # ---- gradients.py: per-kind backward primitives --------------------------------------
    _m("gradients.same-extra-pad-axes-swapped", PY + "gradients.py",
       "for before, after, sym in reversed(list(zip(pads[0::2], pads[1::2], symmetric))):",
       "for before, after, sym in list(zip(pads[0::2], pads[1::2], symmetric)):",
       GEOMETRY, FUNCTIONAL, why="issue survivor 1: H and W swapped in the F.pad order"),
    _m("gradients.same-extra-on-the-left", PY + "gradients.py",
       "pads += [total // 2, total - total // 2]", "pads += [total - total // 2, total // 2]",
       GEOMETRY, FUNCTIONAL, why="'same' padding splits"),
    _m("gradients.crop-axes-swapped", PY + "gradients.py",
       "grad_x.shape[2 + i] - self.extra[2 * (dims - 1 - i) + 1])", "grad_x.shape[2 + i] - self.extra[2 * i + 1])",
       GEOMETRY, "tests/test_backmatch.py"),
    _m("gradients.layerwise-c-of-padded-input", PY + "gradients.py",
       "conv2d_input_factor(self.weight, self.groups, self.input.shape[2:],",
       "conv2d_input_factor(self.weight, self.groups, self.x.shape[2:],",
       GEOMETRY, "tests/test_layerwise.py"),
    _m("gradients.bn-no-eps", PY + "gradients.py",
       "self.std = (self.var + eps).sqrt()", "self.std = self.var.sqrt()",
       "tests/test_backmatch.py", DEGENERATE),
    _m("gradients.bn-bp-drops-variance-term", PY + "gradients.py",
       " \\\n                - self.x_hat * (self.gy * self.x_hat).mean(self.dims, keepdim=True)", "",
       DEGENERATE, "tests/test_layerwise.py"),
    _m("gradients.bn-beta-grad-mean", PY + "gradients.py",
       "grad_bias = self.gy.sum(self.dims)", "grad_bias = self.gy.mean(self.dims)",
       DEGENERATE, "tests/test_backmatch.py"),

    # ---- rules.py: the rule table ---------------------------------------------------------
    _m("rules.backmatch-sends-bp-signal", PY + "rules.py",
       "        return layer.matched_input_signal()", "        return layer.input_grad()",
       "tests/test_backmatch.py"),
    _m("rules.layerwise-weights-without-s", PY + "rules.py",
       "        return layer.layerwise_weight_grads()", "        return layer.plain_weight_grads()",
       "tests/test_layerwise.py"),
    _m("rules.layerwise-bn-column-norm", PY + "rules.py",
       "else layerwise.row_mean_sq(producer)", "else layerwise.column_mean_sq(producer)",
       "tests/test_layerwise.py"),
    _m("rules.layerwise-leaves-batchnorm-alone", PY + "rules.py",
       'name = "backmatch-layerwise"\n    changes_batchnorm = True',
       'name = "backmatch-layerwise"\n    changes_batchnorm = False',
       "tests/test_layerwise.py"),

    # ---- backmatch.py: paper 2's matched signals ------------------------------------------
    _m("backmatch.linear-row-norms", PY + "backmatch.py",
       "column_sq = weight.to(work).square().sum(0)", "column_sq = weight.to(work).square().sum(1)",
       "tests/test_backmatch.py"),
    _m("backmatch.conv-norm-not-squared", PY + "backmatch.py",
       "    sq = weight.to(work).square()", "    sq = weight.to(work).abs()",
       "tests/test_backmatch.py", GEOMETRY),
    _m("backmatch.bn-times-gamma", PY + "backmatch.py",
       "else _divide_or_zero(std.to(work), weight.to(work))", "else std.to(work) * weight.to(work)",
       "tests/test_backmatch.py"),

    # ---- layerwise.py: Algorithm 1 --------------------------------------------------------
    _m("layerwise.sharing-not-clamped", PY + "layerwise.py",
       "return (reached / (batch * channels)).clamp_min(1.0)",
       "return reached / (batch * channels)",
       DEGENERATE, "tests/test_layerwise.py", why="issue survivor 2: the layer-wise sharing factor"),
    _m("layerwise.sharing-counts-every-location", PY + "layerwise.py",
       "reached = torch.count_nonzero(grad_output)", "reached = torch.tensor(grad_output.numel())",
       "tests/test_layerwise.py", DEGENERATE),
    _m("layerwise.row-mean-over-inputs", PY + "layerwise.py",
       "square().sum() / weight.shape[0]", "square().sum() / weight.shape[1]",
       "tests/test_layerwise.py"),
    _m("layerwise.column-mean-ignores-groups", PY + "layerwise.py",
       "square().sum() / (weight.shape[1] * groups)", "square().sum() / weight.shape[1]",
       "tests/test_layerwise.py", GEOMETRY),
    _m("layerwise.input-factor-without-s", PY + "layerwise.py",
       "column_mean_sq(weight, groups) * sharing / (input_hw[0] * input_hw[1])",
       "column_mean_sq(weight, groups) / (input_hw[0] * input_hw[1])",
       "tests/test_layerwise.py"),
    _m("layerwise.bn-times-gamma", PY + "layerwise.py",
       "var = var / gamma.detach()", "var = var * gamma.detach()",
       "tests/test_layerwise.py", DEGENERATE),
    _m("layerwise.producer-through-branches", PY + "layerwise.py",
       "node = inputs[0] if len(inputs) == 1 else None", "node = inputs[0] if inputs else None",
       "tests/test_layerwise.py"),
    _m("layerwise.linear-weight-grad-in-autocast", PY + "layerwise.py",
       "with torch.autocast(gy.device.type, enabled=False):", "if True:",
       AMP_SIDES),

    # ---- norm.py ---------------------------------------------------------------------------
    _m("norm.eval-without-running-stats", PY + "norm.py",
       "batch_stats = self.training or (self.running_mean is None and self.running_var is None)",
       "batch_stats = self.training",
       DEGENERATE, "tests/test_backmatch.py"),

    # ---- distributed.py: the Gram all-reduce ----------------------------------------------
    _m("distributed.count-not-summed", PY + "distributed.py",
       "gram.new_full((1,), float(count))", "gram.new_full((1,), 1.0)",
       "tests/test_distributed.py", why="the DDP count"),
    _m("distributed.local-gram-unnormalised", PY + "distributed.py",
       "return self._gram / self._count", "return self._gram",
       FUNCTIONAL),
    _m("distributed.gram-sync-flag-ignored", PY + "distributed.py",
       "if not _enabled or not dist.is_available()", "if not dist.is_available()",
       "tests/test_distributed.py"),

    # ---- amortize.py (its stable part) ----------------------------------------------------
    _m("amortize.ema-weight-swapped", PY + "amortize.py",
       "torch.lerp(gram, self.gram,", "torch.lerp(self.gram, gram,",
       "tests/test_amortize.py", why="the EMA weight"),

    # ---- ops: the reference spec and the dispatcher ---------------------------------------
    _m("reference.accumulates-in-input-dtype", PY + "ops/reference.py",
       "return torch.float64 if dtype == torch.float64 else torch.float32", "return dtype",
       "tests/test_amp.py", AMP_SIDES, "tests/test_properties.py"),
    _m("reference.im2col-bias-row-zero", PY + "ops/reference.py",
       "cols.new_ones(groups, 1, cols.shape[-1])", "cols.new_zeros(groups, 1, cols.shape[-1])",
       "tests/test_ops.py", GEOMETRY),
    _m("reference.escalated-ridge-unused", PY + "ops/reference.py",
       "torch.linalg.cholesky_ex(a + lam * eye)", "torch.linalg.cholesky_ex(a + ridge * eye)",
       "tests/test_ops.py"),
    _m("ops.channels-last-to-reference", PY + "ops/__init__.py",
       'backend = backend_for("im2col_gram", x, getattr(_forced, "name", None))',
       'backend = backend_for("im2col_gram", x, getattr(_forced, "name", None)) '
       'if x.is_contiguous() else "reference"',
       DISPATCH, why="issue survivor 3: the dispatcher's silent fall-back"),
    _m("ops.strided-solve-to-reference", PY + "ops/__init__.py",
       'backend = backend_for("ridge_solve", gram, getattr(_forced, "name", None))',
       'backend = backend_for("ridge_solve", gram, getattr(_forced, "name", None)) '
       'if grad.is_contiguous() else "reference"',
       DISPATCH),
    _m("ops.reference-first", PY + "ops/_backends.py",
       'return names + ["reference"]', 'return ["reference"] + names',
       DISPATCH, CPU_KERNELS),

    # ---- csrc/cpu: compiled CPU kernels (rebuilt per mutant) ------------------------------
    _m("cpu.shift-border-strip-window-inverted", "csrc/cpu/gram_shift_cpu.cpp",
       "if (cc > 0 && !cols.inside(cols.border[cc - 1], j)) continue;",
       "if (cc > 0 && cols.inside(cols.border[cc - 1], j)) continue;",
       CPU_KERNELS + "::test_gram_matches_reference", why="shift-form border columns"),
    _m("cpu.shift-core-columns-all", "csrc/cpu/gram_shift_cpu.cpp",
       "std::min(cols.core1, W - g.dw * t) * bc", "std::min(W, W - g.dw * t) * bc",
       CPU_KERNELS + "::test_gram_matches_reference",
       why="the core run must leave the border columns to their strips"),
    _m("cpu.shift-group-offset-dropped", "csrc/cpu/gram_shift_cpu.cpp",
       "src + (b0 + b) * sb + grp * Cg * sc + y * sy", "src + (b0 + b) * sb + y * sy",
       CPU_KERNELS + "::test_every_algorithm_matches_reference",
       why="group offsets in the C++ Gram (the automatic choice sends groups of < 16 "
           "channels to the grouped kernel, so the shift form runs on them by name)"),
    _m("cpu.shift-bias-count-of-pixels", "csrc/cpu/gram_shift_cpu.cpp",
       "G[d0 * D + d0] = static_cast<acc_t>(B * Ho * Wo);",
       "G[d0 * D + d0] = static_cast<acc_t>(B * H * W);",
       CPU_KERNELS + "::test_gram_matches_reference"),
    _m("cpu.narrow-variant-drops-last-columns", "csrc/cpu/corr_kernel.cpp",
       "corr_tiles<T, W, 4, 2>(out, ldo, L, R, M, N, n_outer, os, n_inner, ld);",
       "corr_tiles<T, W, 4, 2>(out, ldo, L, R, M, N - 2 * V, n_outer, os, n_inner, ld);",
       "tests/test_cpu_isa.py",
       why="the AVX2 and portable variants, which the rest of the suite reaches only on "
           "machines without AVX-512"),
    _m("cpu.tiled-no-mirror", "csrc/cpu/gram_tiled_cpu.cpp",
       "out[grp][p][q] = out[grp][q][p] = acc[p * Dp + q];", "out[grp][p][q] = acc[p * Dp + q];",
       CPU_KERNELS + "::test_gram_matches_reference", why="tile mirroring"),
    _m("cpu.tiled-right-border-off-by-one", "csrc/cpu/gram_tiled_cpu.cpp",
       "if (y < 0 || y >= H || xx < 0 || xx >= W) {", "if (y < 0 || y >= H || xx < 0 || xx > W) {",
       CPU_KERNELS + "::test_gram_matches_reference", GEOMETRY),
    _m("cpu.blas-bias-column-of-twos", "csrc/cpu/gram_blas_cpu.cpp",
       "at::ones({rows.size(0), 1}, rows.options())",
       "at::full({rows.size(0), 1}, 2, rows.options())",
       CPU_KERNELS + "::test_gram_few_patches_matches_reference", why="the GEMM path's bias row"),
    _m("cpu.blas-group-offset-dropped", "csrc/cpu/gram_blas_cpu.cpp",
       "xa.narrow(1, grp * Cg, Cg)", "xa.narrow(1, 0, Cg)",
       CPU_KERNELS + "::test_gram_few_patches_matches_reference"),
    _m("cpu.blas-for-every-shape", "csrc/cpu/gram_cpu.h",
       "return patches * kBlasRatio <= d;", "return true;",
       CPU_KERNELS + "::test_automatic_choice_is_one_of_the_algorithms",
       why="the automatic choice of algorithm"),
    _m("cpu.shift-form-for-row-stride-only", "csrc/cpu/gram_cpu.cpp",
       "return g.sh == 1 && g.sw == 1 ? Algorithm::kShift", "return g.sh == 1 ? Algorithm::kShift",
       GEOMETRY, CPU_KERNELS),
    _m("cpu.out-w-from-padding-h", "csrc/cpu/gram_cpu.h",
       "int64_t out_w(int64_t w) const { return (w + 2 * pw",
       "int64_t out_w(int64_t w) const { return (w + 2 * ph",
       GEOMETRY, CPU_KERNELS),
    _m("cpu.solve-escalation-step", "csrc/cpu/ridge_solve_cpu.cpp",
       "++attempt, lam *= 10.0)", "++attempt, lam *= 9.0)",
       CPU_KERNELS + "::test_ridge_solve_escalates_records_and_warns_once",
       why="the CPU escalation"),
    _m("cpu.solve-ridge-times-D", "csrc/cpu/ridge_solve_cpu.cpp",
       "a.diagonal(0, -2, -1).add_(lam);", "a.diagonal(0, -2, -1).add_(lam * d);",
       CPU_KERNELS + "::test_ridge_solve_matches_linalg_solve", why="ridge scaling"),
    _m("cpu.lapack-solve-skips-first-system", "csrc/cpu/lapack_solve.cpp",
       "for (int64_t s = lo; s < hi && ok; ++s) one(s);",
       "for (int64_t s = lo + 1; s < hi && ok; ++s) one(s);",
       CPU_KERNELS, why="the batched direct LAPACK loop"),
    _m("cpu.lanes-ridge-dropped", "csrc/cpu/ridge_solve_lanes.cpp",
       "const T diag = i == j ? lam : T(0);", "const T diag = T(0);",
       "tests/test_cpu_solve_lanes.py", why="the ridge the lane solver adds as it loads"),
    _m("cpu.lanes-load-from-next-system", "csrc/cpu/ridge_solve_lanes.cpp",
       "src[l] = a + (s0 + std::min(l, lanes - 1)) * d * d;",
       "src[l] = a + (s0 + std::min(l + 1, lanes - 1)) * d * d;",
       "tests/test_cpu_solve_lanes.py", why="which system each lane loads"),
    _m("cpu.shift-gram-mirror-untransposed", "csrc/cpu/gram_shift_cpu.cpp",
       "for (int64_t c2 = 0; c2 < Cg; ++c2) dst[c2 * kk] = b[c2 * Cg];",
       "for (int64_t c2 = 0; c2 < Cg; ++c2) dst[c2 * kk] = b[c2];",
       CPU_KERNELS, why="the mirrored blocks of the permutation to (channel, i, j) order"),
    _m("cpu.corr-kernel-drops-last-pixel", "csrc/cpu/corr_kernel.cpp",
       "for (int64_t k = 0; k < n_inner; ++k, l += ld, r += ld)",
       "for (int64_t k = 0; k + 1 < n_inner; ++k, l += ld, r += ld)",
       CPU_KERNELS + "::test_gram_matches_reference"),

    # ---- layer kinds beyond Linear/Conv2d, the registry and the coverage report -----------
    _m("embedding.no-ridge", PY + "gradients.py",
       "scale = pending.wait() + self.ridge", "scale = pending.wait()",
       "tests/test_embedding.py", why="the embedding's (count/N + λ)"),
    _m("embedding.N-counts-sequences", PY + "gradients.py",
       "pending = distributed.PendingGram(counts.to(work), self.indices.numel(),",
       "pending = distributed.PendingGram(counts.to(work), self.indices.shape[0],",
       "tests/test_embedding.py", why="N of an embedding: every index"),
    _m("conv3d.fold-ridge-not-scaled", PY + "gradients.py",
       "self.has_bias, self.ridge / depth,", "self.has_bias, self.ridge,",
       "tests/test_conv_nd.py", why="Conv3d's fold over output depth"),
    _m("conv-transpose.bias-without-ridge", PY + "gradients.py",
       "/ (locations + self.ridge))", "/ locations)",
       "tests/test_conv_transpose.py", why="the transposed bias on its constant input"),
    _m("attention.value-projection-on-key-rows", PY + "functional.py",
       "project(key, w_k, b_k), project(value, w_v, b_v)",
       "project(key, w_k, b_k), project(key, w_v, b_v)",
       "tests/test_attention.py", why="each projection on its own input"),
    _m("registry.transposed-weight-ignored", PY + "functional.py",
       "view = weight.t() if transposed else weight", "view = weight",
       "tests/test_registry.py", why="Conv1D's (in, out) weight"),
    _m("coverage.vectors-counted-as-weight-matrices", PY + "coverage.py",
       "if name in matched or not any(p.dim() >= 2 for p in own):",
       "if name in matched or not any(p.dim() >= 1 for p in own):",
       "tests/test_registry.py", why="the report lists weight matrices only"),

    # ---- csrc/cuda: run through the host emulation ----------------------------------------
    _m("cuda.mirror-index", "csrc/cuda/gram_cuda.cu",
       "out[i] = out[i + (col - row) * (dim - 1)];", "out[i] = out[i + (col - row) * dim];",
       EMULATION + "::test_gram_matches_reference"),
    _m("cuda.shift-diagonal-block-skipped", "csrc/cuda/gram_cuda.cu",
       "(shift_y > 0 || (shift_y == 0 && shift_x > 0))) return;",
       "(shift_y > 0 || (shift_y == 0 && shift_x >= 0))) return;",
       EMULATION + "::test_gram_matches_reference"),
    _m("cuda.patch-right-border-off-by-one", "csrc/cuda/gram_cuda.cu",
       "ix < 0 || ix >= geo.width) return Acc(0);", "ix < 0 || ix > geo.width) return Acc(0);",
       EMULATION + "::test_gram_matches_reference"),
    _m("cuda.out-w-from-padding-y", "csrc/cuda/gram_cuda.cu",
       "geo.out_w = (p.width + 2 * p.pad_x", "geo.out_w = (p.width + 2 * p.pad_y",
       EMULATION + "::test_gram_matches_reference"),
    _m("cuda.cholesky-without-ridge", "csrc/cuda/ridge_solve_cuda.cu",
       "g[i] + (r == c ? ridge : T(0));", "g[i] + (r == c ? T(0) : T(0));",
       EMULATION + "::test_ridge_solve_matches_reference"),

    # ---- ops/triton: run through the Triton interpreter -----------------------------------
    _m("triton.column-shift-from-padding-h", PY + "ops/triton/gram.py",
       "dx = (kk % KW) * DW - PW", "dx = (kk % KW) * DW - PH",
       "tests/test_triton.py::test_im2col_gram_float32_ieee_matches_unfold"),
    _m("triton.row-stride-from-column-stride", PY + "ops/triton/gram.py",
       "iy0 = (q // OW) * SH", "iy0 = (q // OW) * SW",
       "tests/test_triton.py::test_im2col_gram_float32_ieee_matches_unfold"),
    _m("triton.cholesky-without-ridge", PY + "ops/triton/solve.py",
       "tl.where(r < D, ridge, 1.0)", "tl.where(r < D, 0.0 * ridge, 1.0)",
       "tests/test_triton.py::test_ridge_solve_matches_linalg_solve"),
]
