"""fusedops: fused Triton / CUDA C++ / C++ CPU kernels for PyTorch training.

Every op is a torch.library op in the `fusedops` namespace (torch.ops.fusedops.*) with a
fake kernel, so torch.compile(fullgraph=True) traces it; this module exposes them as
plain functions. Backend choice: see fusedops.use_backend and FUSEDOPS_BACKEND.
"""
from . import _backend, reference
from ._backend import BACKENDS, FallbackWarning, current_backend, use_backend
from .converter import ConvertReport, convert
from .ops import add_, foreach_add_

__version__ = "0.1.0"


def backend_for(op: str, device_type: str) -> str:
    """The backend that `op` ("add_", "foreach_add_", …) runs on tensors of `device_type`
    now (honours FUSEDOPS_BACKEND and use_backend)."""
    if op not in _backend.REGISTRY:
        raise ValueError(f"backend_for: unknown op {op!r}; known: {', '.join(_backend.REGISTRY)}")
    return _backend.REGISTRY[op].backend_for(device_type)


__all__ = ["BACKENDS", "ConvertReport", "FallbackWarning", "add_", "convert", "backend_for", "current_backend",
           "foreach_add_", "reference", "use_backend"]

from .ops import add_layer_norm_act, add_rms_norm_act, layer_norm_act, rms_norm_act  # noqa: E402

__all__ += ["add_layer_norm_act", "add_rms_norm_act", "layer_norm_act", "rms_norm_act"]
from . import nn  # noqa: E402  (fused modules; registers their converter rules)

__all__ += ["nn"]
