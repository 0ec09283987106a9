"""Shared test helpers: backends to run, poisoning, the 2x-eager-error tolerance rule."""
from __future__ import annotations

import pytest
import torch

from fusedops import _backend

# (device, backend) pairs this machine can run; GPU pairs carry the gpu mark.
_PAIRS = [("cpu", "cpp"), ("cpu", "triton"), ("cuda", "cuda"), ("cuda", "triton")]


def backend_params():
    params = []
    for device, backend in _PAIRS:
        marks = [pytest.mark.gpu] if device == "cuda" else []
        params.append(pytest.param((device, backend), id=f"{device}-{backend}", marks=marks))
    return params


def require(device: str, backend: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not _backend.available(backend, device):
        pytest.skip(f"{backend} cannot run on {device} here: {_backend.why_unavailable(backend, device)}")


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so that an element a kernel fails to write fails the comparison."""
    return t.fill_(float("nan"))


def assert_close_rule(ours: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, *, atol: float = 0.0,
                      rtol: float = 0.0, name: str = "output") -> None:
    """flash-attn's rule: max|ours - ref| <= 2 max|eager - ref| + atol (+ rtol*max|ref|),
    with ref computed in float64. NaN anywhere in ours fails unless eager has NaN there."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    ours64, eager64, ref64 = ours.double(), eager.double(), ref.double()
    nan_ok = torch.isnan(eager64)
    assert torch.equal(torch.isnan(ours64), nan_ok), f"{name}: NaN where eager has none (unwritten?)"
    keep = ~nan_ok
    if keep.sum() == 0:
        return
    err_ours = (ours64 - ref64)[keep].abs().max().item()
    err_eager = (eager64 - ref64)[keep].abs().max().item()
    bound = 2 * err_eager + atol + rtol * ref64[keep].abs().max().item()
    assert err_ours <= bound, f"{name}: max error {err_ours:.3e} > bound {bound:.3e} (eager {err_eager:.3e})"
