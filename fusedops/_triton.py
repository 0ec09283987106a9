"""Lazy access to the Triton kernels (fusedops.triton_kernels).

`import fusedops` never imports triton: a kernel module is imported on first use, so the
package works without triton (those paths then say why they are unavailable).
On CPU tensors the Triton kernels run only under the Triton interpreter, which must be
switched on (TRITON_INTERPRET=1) before the first kernel module is imported.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

_modules: dict = {}


def installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def can_run(device_type: str) -> bool:
    if not installed():
        return False
    return device_type == "cuda" or (device_type == "cpu" and interpreting())


def why_missing(device_type: str) -> str:
    if not installed():
        return "triton is not installed (pip install triton)"
    if device_type == "cpu":
        return "Triton kernels run on CPU tensors only under the interpreter: set TRITON_INTERPRET=1 before importing fusedops"
    return f"Triton kernels do not run on {device_type} tensors"


def kernels(family: str):
    """The fusedops.triton_kernels.<family> module (imported on first use)."""
    mod = _modules.get(family)
    if mod is None:
        mod = _modules[family] = importlib.import_module(f"fusedops.triton_kernels.{family}")
    return mod
