"""Registers a Triton launcher as a ``torch.library`` operator.

Compiled Triton kernels go through ``torch.library.triton_op`` (+ ``wrap_triton`` in the
launcher), so ``torch.compile`` traces into the kernel and Inductor can schedule it.
Under ``TRITON_INTERPRET=1`` the kernels are interpreted Python that cannot run on fake
tensors, so the same launcher becomes an opaque ``custom_op`` with an explicit fake:
CI still checks schema, fake shapes and ``torch.compile(fullgraph=True)`` capture.
"""
from __future__ import annotations

import contextlib
import sys

import torch
from torch.library import triton_op


def is_interpreted(kernel) -> bool:
    """True when TRITON_INTERPRET=1 made ``kernel`` interpreted Python."""
    # triton.jit imports the interpreter only under TRITON_INTERPRET=1; importing it here
    # would need numpy, which a minimal install (torch + triton) does not have.
    interpreter = sys.modules.get("triton.runtime.interpreter")
    return interpreter is not None and isinstance(kernel, interpreter.InterpretedFunction)


def check_device(op, name, tensor, kernel):
    """Compiled kernels need CUDA tensors; interpreted ones run on CPU tensors."""
    if tensor.device.type != "cuda" and not is_interpreted(kernel):
        raise ValueError(f"{op}: {name} must be a CUDA tensor for the Triton kernels (got "
                         f"{tensor.device}; CPU tensors run only under TRITON_INTERPRET=1)")


def on_device_of(tensor):
    """Context that makes ``tensor``'s GPU the current device: a Triton launch runs on the
    current device and its current stream, so a tensor on another GPU (cuda:1 while cuda:0 is
    current) would fail to launch or be read unordered with its own stream (the CUDA backend's
    binding takes a CUDAGuard for the same reason)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def register_kernel_op(name, launcher, *, fake, kernels):
    """``launcher`` (type-annotated; its schema is inferred) as operator ``name``."""
    if any(is_interpreted(kernel) for kernel in kernels):
        op = torch.library.custom_op(name, launcher, mutates_args=())
        op.register_fake(fake)
        return op
    return triton_op(name, launcher, mutates_args=())
