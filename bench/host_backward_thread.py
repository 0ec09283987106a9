"""Host time of one tiny conv+BN+ReLU block's training step with the backward on the
autograd engine's CUDA worker thread (torch's default) and on the calling thread
(torch.autograd.set_multithreading_enabled(False)), eager against ConvBNAct2d: tiny
tensors, so the device does next to nothing and the step is host time. Also a
conv_transpose2d timed on the main thread and inside a Python backward. Minima over
interleaved rounds (shared hosts are noisy). CUDA only:
    python bench/host_backward_thread.py
"""
from __future__ import annotations

import threading
import time

import torch
import torch.nn.functional as F

import host_convbn  # (bench/, beside this script)
from fusedops.benchmark.convbn import eager_blocks, fused_blocks


def best_us(fn, reps=15, steps=100) -> float:
    """host_convbn's timer, the device drained before and after."""
    torch.cuda.synchronize()
    us = host_convbn.best_us(fn, reps, steps)
    torch.cuda.synchronize()
    return us


def conv_transpose_where(dev) -> None:
    """One small conv_transpose2d from the main thread, and inside a Python Function's
    backward with the backward on the worker thread or on the calling thread."""
    x = torch.randn(2, 4, 4, 4, device=dev, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    w = torch.randn(4, 4, 3, 3, device=dev, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    s = [1, 1]

    def ct():
        return F.conv_transpose2d(x, w, None, s, s, [0, 0], 1, s)

    inside = []

    class Probe(torch.autograd.Function):
        forward = staticmethod(lambda ctx, t: t.clone())

        @staticmethod
        def backward(ctx, g):  # runs on the thread the engine picks
            t0 = time.perf_counter()
            for _ in range(10):
                ct()
            inside.append((time.perf_counter() - t0) / 10)
            return g

    t = torch.randn(4, device=dev, requires_grad=True)
    print(f"conv_transpose2d main thread        {best_us(ct):7.1f} us")
    for mt in (True, False):
        torch.autograd.set_multithreading_enabled(mt)
        inside.clear()
        best_us(lambda: Probe.apply(t).sum().backward(), reps=5, steps=50)
        v = sorted(inside)[len(inside) // 10] * 1e6
        print(f"conv_transpose2d in a backward (multithreading={mt}): {v:7.1f} us")
    torch.autograd.set_multithreading_enabled(True)


def main():
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = False
    print("threads:", [th.name for th in threading.enumerate()])
    conv_transpose_where(dev)
    torch.manual_seed(0)
    eager = eager_blocks(4, 4, 3, 1, dev)[:3]  # one block
    xs = torch.randn(2, 4, 4, 4, device=dev).to(memory_format=torch.channels_last)
    gout = torch.randn(2, 4, 4, 4, device=dev, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    models = {"eager": eager, "recompute": fused_blocks(eager, "recompute"), "fast": fused_blocks(eager, "fast")}

    def step(model):
        def run():
            xx = xs.to(torch.bfloat16).requires_grad_()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(xx)
            out.backward(gout)
        return run

    res = {}
    for _ in range(8):  # interleaved rounds; the minimum of each setting
        for mt in (True, False):
            torch.autograd.set_multithreading_enabled(mt)
            for k, m in models.items():
                res[(mt, k)] = min(res.get((mt, k), float("inf")), best_us(step(m), reps=4, steps=40))
    torch.autograd.set_multithreading_enabled(True)
    for mt in (True, False):
        print(f"multithreading={mt}: " + ", ".join(f"{k} {res[(mt, k)]:7.1f}" for k in models))


if __name__ == "__main__":
    main()
