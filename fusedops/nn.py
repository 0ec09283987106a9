"""fusedops.nn: drop-in fused modules."""
from .nn_convbn import ConvBNAct2d, FoldedConvAct2d  # noqa: F401
