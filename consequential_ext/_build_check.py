"""Import-time check that the compiled extension matches the running torch.

An extension built against another torch release fails in obscure ways (undefined symbols,
wrong dispatch); say so plainly instead, naming both versions (as pytorch_scatter does).
Without a compiled extension at all, the pure-PyTorch reference ops serve and nothing is
checked.
"""
from __future__ import annotations

import importlib

import torch

_REBUILD = ("rebuild it against the running torch: `pip install --no-build-isolation .` or "
            "`python setup.py build_ext --inplace`")


def _release(version: str) -> str:
    # The local part (+cpu, +cu128) does not change the C++ ABI of the CPU operators; a
    # CUDA build on a CPU torch fails to load and is reported by check_extension.
    return version.split("+", 1)[0]


def check_versions(built: str, running: str) -> None:
    """ImportError unless ``built`` and ``running`` are the same torch release."""
    if _release(built) != _release(running):
        raise ImportError(f"consequential_ext._C was built against torch {built}, but torch "
                          f"{running} is running; {_REBUILD}")


def check_extension() -> None:
    name = f"{__package__}._C"
    try:
        # import_module, not ``from . import _C``: the latter turns a missing _C into a plain
        # ImportError ("cannot import name"), indistinguishable from one that fails to load.
        importlib.import_module(name)  # registers the operators
    except ImportError as error:
        if isinstance(error, ModuleNotFoundError) and error.name == name:
            return  # no compiled extension: the reference ops serve
        raise ImportError(f"consequential_ext._C failed to load under torch {torch.__version__} "
                          f"({error}); {_REBUILD}") from error
    check_versions(torch.ops.consequential_ext.built_with_torch(), torch.__version__)
