"""fusedops: fused Triton / CUDA C++ / C++ CPU kernels for PyTorch training.

Every op is a torch.library op in the `fusedops` namespace (torch.ops.fusedops.*) with a
fake kernel, so torch.compile(fullgraph=True) traces it; this module exposes them as
plain functions. Backend choice: see fusedops.use_backend and FUSEDOPS_BACKEND.
"""
from . import _backend, reference
from ._backend import BACKENDS, FallbackWarning, current_backend, use_backend
from .converter import ConvertReport, convert
from .ops import (add_, add_layer_norm_act, add_rms_norm_act, blockwise_dequantize, blockwise_quantize, foreach_add_,
                  layer_norm_act, optimizer_step_8bit_, rms_norm_act)
from . import converter_convbn  # noqa: F401  (registers the Conv2d → BatchNorm2d rule)
from . import nn, optim  # nn registers the norm converter rules
from . import converter_norm  # noqa: F401  (registers the norm → Linear rule: autocast_output)
from .nn_convbn import fold_conv_bn

__version__ = "0.1.0"


def backend_for(op: str, device_type: str, size: int | None = None) -> str:
    """The backend that `op` ("add_", "foreach_add_", …) runs on tensors of `device_type`
    now (honours FUSEDOPS_BACKEND and use_backend); `size` (e.g. a norm's hidden size) for
    ops whose CUDA default depends on it."""
    if op not in _backend.REGISTRY:
        raise ValueError(f"backend_for: unknown op {op!r}; known: {', '.join(_backend.REGISTRY)}")
    return _backend.REGISTRY[op].backend_for(device_type, size)


__all__ = ["BACKENDS", "ConvertReport", "FallbackWarning", "add_", "add_layer_norm_act", "add_rms_norm_act",
           "backend_for", "blockwise_dequantize", "blockwise_quantize", "convert", "current_backend",
           "fold_conv_bn", "foreach_add_", "layer_norm_act", "nn", "optim", "optimizer_step_8bit_", "reference",
           "rms_norm_act", "use_backend"]
