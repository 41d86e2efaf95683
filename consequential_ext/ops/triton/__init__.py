"""Triton kernels of the fused ops (chosen by the dispatcher for CUDA tensors).

Importing this package defines the kernels and registers them with ``torch.library``
(namespace ``consequential_ext_triton``, so ``torch.compile`` traces into them) but never
touches a GPU. ``TRITON_INTERPRET=1`` runs them on CPU tensors (CI).
"""
from .gram import im2col_gram, linear_gram
from .shift import im2col_gram_shift
from .solve import cholesky, ridge_solve

__all__ = ["im2col_gram", "im2col_gram_shift", "linear_gram", "cholesky", "ridge_solve"]
