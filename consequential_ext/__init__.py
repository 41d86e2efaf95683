"""consequential_ext: consequence-aware (matched) weight gradients for PyTorch layers."""
from ._version import __version__
from . import ops

__all__ = ["__version__", "ops"]
