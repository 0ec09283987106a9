"""Benchmarks of the in-place add family: add_ over sizes and dtypes, foreach_add_ over a
transformer's parameter shapes, and the host wall time of a small launch-bound add_."""
from __future__ import annotations

import torch

import fusedops

from .. import _backend
from .harness import Case, Impl, compile_fn, family

DEFAULT_SIZES = {"cuda": [1 << k for k in range(16, 29, 2)], "cpu": [1 << k for k in range(12, 23, 2)]}


def fused_impls(device: torch.device, fn) -> dict:
    """fusedops under every backend that can run on this device."""
    names = ["triton", "cuda"] if device.type == "cuda" else ["cpp"]
    return {f"fusedops:{b}": Impl(fn, backend=b) for b in names if _backend.available(b, device.type)}


def compiled(ctx, fn):
    # static shapes on GPU (what a training job gets); dynamic on CPU to keep compiles few.
    # Timed as Impl(compiled=True): Dynamo is reset before each case (see harness).
    return compile_fn(fn, dynamic=not ctx.cuda)


def _size_label(n: int) -> str:
    return f"2^{n.bit_length() - 1}" if n > 0 and n & (n - 1) == 0 else str(n)


@family("add_")
def add_cases(ctx) -> list:
    cases = []
    for dtype in ctx.dtypes:
        comp = compiled(ctx, lambda a, b: a.add_(b)) if ctx.compile else None
        for n in ctx.sizes or DEFAULT_SIZES[ctx.device.type]:
            x = torch.randn(n, device=ctx.device, dtype=dtype)
            y = torch.randn(n, device=ctx.device, dtype=dtype)
            impls = {"eager": Impl(lambda x=x, y=y: x.add_(y))}
            if comp is not None:
                impls["torch.compile"] = Impl(lambda x=x, y=y: comp(x, y), compiled=True)
            impls.update(fused_impls(ctx.device, lambda x=x, y=y: fusedops.add_(x, y)))
            name = f"n={_size_label(n)} {str(dtype).replace('torch.', '')}"
            cases.append(Case("add_", name, {"n": n, "dtype": str(dtype)}, 3 * n * x.element_size(), impls))
    # Small, launch-bound: host wall time per call of the default backend vs eager.
    x = torch.randn(4096, device=ctx.device)
    y = torch.randn(4096, device=ctx.device)
    cases.append(Case("add_", "n=4096 fp32 wall/call", {"n": 4096, "dtype": "torch.float32"}, 0,
                      {"eager": Impl(lambda: x.add_(y)), "fusedops:default": Impl(lambda: fusedops.add_(x, y))},
                      timer="wall"))
    return cases


def transformer_shapes(device_type: str) -> list:
    """200 parameter shapes of a GPT-2-medium-like model (16 layers, d=1024; 254M
    parameters) on GPU; the same structure at d=128 on CPU."""
    d, vocab, ctx_len = (1024, 50257, 1024) if device_type == "cuda" else (128, 5000, 256)
    shapes = [(vocab, d), (ctx_len, d)]
    for _ in range(16):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    shapes += [(d,), (d,), (d, d), (d,), (2, d), (2,)]
    assert len(shapes) == 200
    return shapes


@family("foreach_add_")
def foreach_cases(ctx) -> list:
    cases = []
    shapes = transformer_shapes(ctx.device.type)
    for dtype in ctx.dtypes:
        xs = [torch.randn(s, device=ctx.device, dtype=dtype) for s in shapes]
        ys = [torch.randn(s, device=ctx.device, dtype=dtype) for s in shapes]
        numel = sum(x.numel() for x in xs)

        def loop(xs=xs, ys=ys):
            for x, y in zip(xs, ys):
                x.add_(y)

        impls = {"eager": Impl(lambda xs=xs, ys=ys: torch._foreach_add_(xs, ys)),
                 "python loop": Impl(loop)}
        if ctx.compile:
            comp = compiled(ctx, lambda a, b: torch._foreach_add_(a, b))
            impls["torch.compile"] = Impl(lambda xs=xs, ys=ys: comp(xs, ys), compiled=True)
        impls.update(fused_impls(ctx.device, lambda xs=xs, ys=ys: fusedops.foreach_add_(xs, ys)))
        name = f"200 tensors {numel / 1e6:.0f}M {str(dtype).replace('torch.', '')}"
        cases.append(Case("foreach_add_", name, {"tensors": len(xs), "numel": numel, "dtype": str(dtype)},
                          3 * numel * xs[0].element_size(), impls, baseline="eager"))
    return cases
