"""Benchmarks of the 8-bit optimizers: one optimizer step over a GPT-2-medium-like set of
96 tensors (16 layers x [ln, qkv, proj, ln, fc, fc2] at d=1024: 201.4M parameters) on
GPU — a d=64 version of the same structure on CPU — in fp32 and bf16.

Bytes per case are the 8-bit optimizer's own traffic: per parameter p read + write, g
read, each 8-bit state read + write (1 B each way), plus 2 x 4 B of absmax per 256 —
AdamW8bit fp32: 16 B (+0.06), bf16: 10 B; Lion8bit / SGD8bit fp32: 14 B. Rows of
torch's fp32-state AdamW in the same case are therefore shown at the 8-bit byte count;
the case "... torch own bytes" rates them by their own traffic (28 B per fp32 param).
State bytes per parameter are in each case's params (state_B_per_param) and printed."""
from __future__ import annotations

import sys

import torch

from .. import _backend
from ..optim import AdamW8bit, Lion8bit, SGD8bit
from .harness import Case, Impl, family


def gpt2_medium_shapes(device_type: str) -> list:
    d = 1024 if device_type == "cuda" else 64
    shapes = []
    for _ in range(16):
        shapes += [(d,), (3 * d, d), (d, d), (d,), (4 * d, d), (d, 4 * d)]
    assert len(shapes) == 96
    return shapes


def _state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


def _make(params_like, dtype, device):
    ps = [torch.nn.Parameter(torch.randn(s, device=device, dtype=torch.float32).mul_(0.02).to(dtype))
          for s in params_like]
    for p in ps:
        p.grad = torch.randn_like(p).mul_(1e-3)
    return ps


def _impl(opt, backend=None):
    def fn():
        opt.step()
    return Impl(fn, backend=backend)


def _fused_backends(device):
    names = ["triton", "cuda"] if device.type == "cuda" else ["cpp"]
    return [b for b in names if _backend.available(b, device.type)]


def _peers(ps, kind):
    """bitsandbytes / torchao 8-bit optimizers on the same params, when importable."""
    out = {}
    if ps[0].device.type != "cuda":
        return out
    try:
        import bitsandbytes as bnb
        cls = {"adamw": bnb.optim.AdamW8bit, "lion": bnb.optim.Lion8bit}.get(kind)
        if cls is not None:
            out["bitsandbytes 8bit"] = cls(ps)
    except Exception as exc:  # noqa: BLE001  a peer that cannot load is reported, not fatal
        sys.stderr.write(f"bitsandbytes unavailable: {type(exc).__name__}: {exc}\n")
    if kind == "adamw":
        try:
            from torchao.optim import AdamW8bit as AoAdamW8bit
            out["torchao 8bit"] = AoAdamW8bit(ps)
        except Exception as exc:  # noqa: BLE001
            sys.stderr.write(f"torchao unavailable: {type(exc).__name__}: {exc}\n")
    return out


@family("optim8bit")
def optim_cases(ctx) -> list:
    cases = []
    device = ctx.device
    shapes = gpt2_medium_shapes(device.type)
    numel = sum(torch.Size(s).numel() for s in shapes)
    for dtype in ctx.dtypes:
        esize = torch.empty(0, dtype=dtype).element_size()
        dname = str(dtype).replace("torch.", "")
        ps = _make(shapes, dtype, device)
        absmax_bytes = 4 * sum(-(-torch.Size(s).numel() // 256) for s in shapes)
        kinds = [("adamw", AdamW8bit, dict(lr=1e-4), 2)]
        if dtype == torch.float32:
            kinds += [("lion", Lion8bit, dict(lr=1e-5), 1), ("sgd", SGD8bit, dict(lr=1e-4, momentum=0.9), 1)]
        for kind, cls, kw, nstates in kinds:
            impls, state_b = {}, {}
            ours = cls(ps, **kw)
            ours.step()  # creates the states
            state_b["fusedops"] = _state_bytes(ours) / numel
            for b in _fused_backends(device):
                impls[f"fusedops:{b}"] = _impl(ours, b)
            torch_opt = {}
            if kind == "adamw":
                torch_opt["torch AdamW foreach"] = torch.optim.AdamW(ps, lr=1e-4, foreach=True)
                torch_opt["torch AdamW fused"] = torch.optim.AdamW(ps, lr=1e-4, fused=True)
            elif kind == "sgd":
                torch_opt["torch SGD foreach"] = torch.optim.SGD(ps, lr=1e-4, momentum=0.9, foreach=True)
            for label, opt in {**torch_opt, **_peers(ps, kind)}.items():
                try:
                    opt.step()
                    state_b[label] = _state_bytes(opt) / numel
                    impls[label] = _impl(opt)
                except Exception as exc:  # noqa: BLE001
                    sys.stderr.write(f"{label}: failed: {type(exc).__name__}: {exc}\n")
            nbytes = numel * (3 * esize + 2 * nstates) + 2 * nstates * absmax_bytes
            sys.stderr.write(f"optim8bit {kind} {dname}: state bytes/param "
                             + ", ".join(f"{k} {v:.3f}" for k, v in state_b.items()) + "\n")
            # speed-up against torch's optimizer; torch has no Lion: against fusedops' first backend
            # (the row's baseline field and the table's legend say which)
            base = next((k for k in impls if k.startswith("torch")), next(iter(impls)))
            name = f"{kind} 96 tensors {numel / 1e6:.2f}M {dname}"
            cases.append(Case("optim8bit", name, {"kind": kind, "numel": numel, "tensors": len(shapes),
                                                  "dtype": str(dtype), "state_B_per_param": state_b},
                              nbytes, impls, baseline=base))
            if torch_opt:  # torch's optimizers rated by their own traffic (fp32-state moments)
                own = numel * (3 * esize + 2 * nstates * esize)
                cases.append(Case("optim8bit", f"{name} torch own bytes", {"kind": kind, "numel": numel,
                                  "dtype": str(dtype)}, own, {k: _impl(o) for k, o in torch_opt.items()},
                                  baseline=next(iter(torch_opt))))
    return cases
