"""Host (CPU-side) time of one conv+BN+ReLU block's training step, fused vs eager, on
tiny tensors so that the kernels cost next to nothing: what is left is Python, autograd
and dispatch, the same on any device; then the step split into forward, backward() and the
fused Function's own backward, beside what one Python autograd node costs on the device.
Minima of repeated short runs (shared machines are noisy). Also counts the aten ops of
one fused step (allocations, copies).
    python bench/host_convbn.py [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import time
from collections import Counter

import torch

from fusedops.benchmark.convbn import eager_blocks, fused_blocks


def best_us(fn, reps=15, steps=100) -> float:
    for _ in range(10):
        fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, (time.perf_counter() - t0) / steps)
    return best * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.set_num_threads(1)  # host time, not intra-op parallelism (and no spinning on a shared box)
    torch.manual_seed(0)
    eager = eager_blocks(4, 4, 3, 1, dev)[:3]  # one block
    x = torch.randn(2, 4, 4, 4, device=dev).to(memory_format=torch.channels_last)
    gout = torch.randn(2, 4, 4, 4, device=dev).to(memory_format=torch.channels_last)
    autocast = dev.type == "cuda"

    def step(model, backend=None):
        def run():
            with backend_of(run):
                xx = x.to(torch.bfloat16) if autocast else x
                xx.requires_grad_()
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                    out = model(xx)
                out.backward(gout.to(out.dtype))
        run.model, run.x, run.gout, run.autocast, run.backend = model, x, gout, autocast, backend
        return run

    rows = {"eager": step(eager)}
    for mode in ("recompute", "fast"):
        rows[f"fused {mode}"] = step(fused_blocks(eager, mode))
    if dev.type == "cuda":  # the Triton kernels (the default on CUDA is the CUDA C++ step)
        rows["fused recompute triton"] = step(fused_blocks(eager, "recompute"), "triton")
    base = None
    for name, fn in rows.items():
        us = best_us(fn)
        base = us if base is None else base
        print(f"{name:18s} {us:8.1f} us/step  (+{us - base:.1f} over eager)")
    split(dev, rows)
    breakdown(dev, autocast)
    from torch.profiler import ProfilerActivity, profile
    for name in ("eager", "fused recompute"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            rows[name]()
        counts = Counter()
        for e in prof.events():
            if e.name in ("aten::empty", "aten::empty_strided", "aten::empty_like", "aten::_to_copy",
                          "aten::zeros", "aten::fill_", "aten::copy_", "aten::convolution_backward",
                          "aten::convolution", "aten::contiguous", "aten::clone"):
                counts[e.name] += 1
        print(name, dict(sorted(counts.items())))
    for name in ("fused recompute", "fused recompute triton"):
        if name in rows:
            python_profile(rows[name], name)


def backend_of(run):
    """The use_backend block of a row's forced backend (a no-op block where none is)."""
    import contextlib

    import fusedops
    return fusedops.use_backend(run.backend) if run.backend else contextlib.nullcontext()


def python_profile(run, name: str, steps: int = 300) -> None:
    """cProfile of the fused step: which Python functions hold its host time (own time,
    the top rows; cProfile's overhead inflates every row alike). On CUDA autograd runs the
    fused Function's backward on the device's worker thread: Python 3.12's cProfile (on
    sys.monitoring) sees it, with own times mixed across the two threads; older Pythons'
    sees this thread only."""
    import cProfile
    import pstats
    for _ in range(10):
        run()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        run()
    prof.disable()
    rows = sorted(pstats.Stats(prof).stats.items(), key=lambda kv: -kv[1][2])[:22]
    print(f"cProfile, {name}, {steps} steps: own µs a step, calls a step, function")
    for (fname, line, func), (_cc, nc, tt, _ct, _callers) in rows:
        where = f"{fname.rsplit('/', 2)[-2:][-1]}:{line}" if line else fname
        print(f"  {tt / steps * 1e6:8.1f} {nc / steps:6.1f}  {func} ({where})")


def split(dev, rows: dict) -> None:
    """Where a step's host time goes: the forward call, the backward() call, and inside the
    latter the time spent in the fused Function's Python backward (the rest of backward()
    is the autograd engine: its nodes, allocations, and on CUDA the hand-over to the
    device's worker thread, which must take the GIL for a Python node). Against a trivial
    Python Function and a C++ node on the same device: what one Python node costs there."""
    from fusedops import nn_convbn
    inside = [0.0]
    orig = nn_convbn._ConvBNActTrain.backward

    def timed(ctx, *grads):
        t0 = time.perf_counter()
        try:
            return orig(ctx, *grads)
        finally:
            inside[0] += time.perf_counter() - t0

    class Trivial(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            return g

    t = torch.randn(2, 4, 4, 4, device=dev, requires_grad=True)
    g = torch.randn_like(t)
    print(f"  {'trivial Python Function fwd+bwd':44s} {best_us(lambda: Trivial.apply(t).backward(g)):8.1f} us")
    print(f"  {'t.clone() fwd+bwd (a C++ node)':44s} {best_us(lambda: t.clone().backward(g)):8.1f} us")
    nn_convbn._ConvBNActTrain.backward = staticmethod(timed)
    try:
        for name, run in rows.items():
            fwd = bwd = 0.0
            for _ in range(10):
                run()
            inside[0] = 0.0
            steps = 300
            for _ in range(steps):  # the step of main()'s rows, its two halves timed apart
                with backend_of(run):
                    xx = run.x.to(torch.bfloat16) if run.autocast else run.x
                    xx.requires_grad_()
                    t0 = time.perf_counter()
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=run.autocast):
                        out = run.model(xx)
                    t1 = time.perf_counter()
                    out.backward(run.gout.to(out.dtype))
                    t2 = time.perf_counter()
                fwd, bwd = fwd + t1 - t0, bwd + t2 - t1
            k = 1e6 / steps
            print(f"  {name:18s} forward {fwd * k:7.1f} us, backward() {bwd * k:7.1f} us "
                  f"(in the fused Function's backward: {inside[0] * k:6.1f} us)")
    finally:
        nn_convbn._ConvBNActTrain.backward = orig


def breakdown(dev, autocast: bool) -> None:
    """Host µs of the pieces of one block's step: forward alone (module, autograd Function,
    native op) and the single calls it is made of, against eager's."""
    import torch.nn.functional as F
    from fusedops.nn_convbn import ConvBNAct2d
    from fusedops.ops import batchnorm as bnops
    dt = torch.bfloat16 if autocast else torch.float32
    x = torch.randn(2, 4, 4, 4, device=dev, dtype=dt).to(memory_format=torch.channels_last).requires_grad_()
    # the modules as in the step above: fp32 parameters, run under autocast on CUDA
    eager = eager_blocks(4, 4, 3, 1, dev)[:3]
    fused = ConvBNAct2d.from_modules(eager[0], eager[1], torch.nn.ReLU())

    def amp(module):
        def run():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                return module(x)
        return run

    w = eager[0].weight.detach().to(dt)
    g32, b32 = bnops.affine32(None, None, 4, x)
    c = [1, 1]
    op = bnops.op_train_fwd()
    xd = x.detach()
    rm, rv = torch.zeros(4, device=dev), torch.ones(4, device=dev)
    bwd = bnops.op_train_bwd()
    _, mean, invstd, _, y = op(xd, w, c, c, c, 1, 1e-5, g32, b32, 1, 0.01, 0.0, None, None)
    gz = torch.randn_like(y)
    class Lean(torch.autograd.Function):  # the op in a Function with no checks: the machinery's own cost
        @staticmethod
        def forward(ctx, x, w, g, b):
            z, mean, invstd, var, y = op(x, w, c, c, c, 1, 1e-5, g32, b32, 1, 0.01, 0.0, None, None)
            ctx.save_for_backward(x, w, mean, invstd, g, b)
            ctx.mark_non_differentiable(mean, var)
            ctx.set_materialize_grads(False)
            return z, mean, var

        @staticmethod
        def backward(ctx, dz, _dm, _dv):
            return None, None, None, None

    wp = w.clone().requires_grad_()
    rows = {
        "eager fwd (conv, bn, relu modules)": amp(eager),
        "lean autograd.Function around the op": lambda: Lean.apply(x, wp, g32, b32),
        "fused fwd (module)": amp(fused),
        "F.conv2d": lambda: F.conv2d(xd, w, None, 1, 1),
        "F.batch_norm (train)": lambda: F.batch_norm(xd, None, None, None, None, True),
        "torch.relu": lambda: torch.relu(xd),
        "conv_bn_act_fwd op": lambda: op(xd, w, c, c, c, 1, 1e-5, g32, b32, 1, 0.01, 0.0, None, None),
        "conv_bn_act_fwd op + running update": lambda: op(xd, w, c, c, c, 1, 1e-5, g32, b32, 1, 0.01, 0.1, rm, rv),
        "conv_bn_act_bwd op (recompute)": lambda: bwd(gz, xd, w, None, c, c, c, 1, mean, invstd, g32, b32, 1, 0.01, 3),
        "conv_bn_act_bwd op (recompute, dW, split)": lambda: bwd(gz, xd, w, None, c, c, c, 1, mean, invstd, g32, b32,
                                                                 1, 0.01, 6),
        "F.conv_transpose2d (the split's dX)": lambda: F.conv_transpose2d(gz, w, None, 1, 1),
        "aten.convolution_backward": lambda: torch.ops.aten.convolution_backward(
            gz, xd, w, None, c, c, c, False, [0, 0], 1, [True, True, False]),
        "aten.convolution_backward (dW only)": lambda: torch.ops.aten.convolution_backward(
            gz, xd, w, None, c, c, c, False, [0, 0], 1, [False, True, False]),
        "torch.empty(4)": lambda: torch.empty(4, device=dev),
    }
    for name, fn in rows.items():
        print(f"  {name:44s} {best_us(fn, reps=10, steps=200):8.1f} us")


if __name__ == "__main__":
    main()
