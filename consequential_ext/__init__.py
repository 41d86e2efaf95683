"""consequential_ext: consequence-aware (matched) weight gradients for PyTorch layers.

    import consequential_ext as cx
    model = cx.consequentialize(model)          # or cx.CLinear / cx.CConv2d directly
"""
from ._version import __version__
from . import distributed, functional, ops, optim
from ._validate import DEFAULT_RIDGE, RULES
from ._build_check import check_extension
from .amortize import amortize
from .convert import consequentialize
from .coverage import coverage
from .modules import CConv2d, CEmbedding, CLinear, CMultiheadAttention
from .modules import CConv1d, CConv3d, CConvTranspose1d, CConvTranspose2d, CConvTranspose3d
from .recurrent import CGRU, CGRUCell, CLSTM, CLSTMCell, CRNN, CRNNCell
from .registry import register_layer
from .norm import BackMatchBatchNorm1d, BackMatchBatchNorm2d

__all__ = ["__version__", "CLinear", "CConv2d", "consequentialize", "functional", "ops", "RULES",
           "DEFAULT_RIDGE", "BackMatchBatchNorm1d", "BackMatchBatchNorm2d", "optim", "amortize",
           "distributed", "register_layer", "coverage", "CEmbedding", "CMultiheadAttention"]
__all__ += ["CConv1d", "CConv3d", "CConvTranspose1d", "CConvTranspose2d", "CConvTranspose3d"]
__all__ += ["CRNN", "CLSTM", "CGRU", "CRNNCell", "CLSTMCell", "CGRUCell"]

check_extension()  # an extension built for another torch fails loudly here, naming both
