"""Access to the compiled extension fusedops._C (C++ CPU kernels, CUDA C++ kernels)."""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (importing it registers torch.ops.fusedops_C.*)

    ops = torch.ops.fusedops_C
    load_error: Exception | None = None
except ImportError as exc:  # a source checkout that was never built
    ops = None
    load_error = exc


def has_kernels(device_type: str) -> bool:
    """Whether the extension was built with kernels for this device type ("cpu", "cuda")."""
    if ops is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("fusedops_C::add_", key)


def why_missing(device_type: str) -> str:
    if ops is None:
        return f"the extension fusedops._C is not built ({load_error})"
    if device_type == "cuda":
        return ("fusedops._C was built without CUDA kernels (torch without CUDA, no nvcc, "
                "or FUSEDOPS_BUILD_CUDA=0 at build time)")
    return f"fusedops._C has no kernels for {device_type} tensors"


_overloads: dict = {}


def op(name: str):
    """torch.ops.fusedops_C.<name>.default, looked up once."""
    overload = _overloads.get(name)
    if overload is None:
        overload = _overloads[name] = getattr(ops, name).default
    return overload
