"""Host (CPU-side) time of one conv+BN+ReLU block's training step, fused vs eager, on
tiny tensors so that the kernels cost next to nothing: what is left is Python, autograd
and dispatch, the same on any device. Minima of repeated short runs (shared machines
are noisy). Also counts the aten ops of one fused step (allocations, copies).
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

    def step(model):
        def run():
            xx = x.to(torch.bfloat16) if autocast else x
            xx.requires_grad_()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                out = model(xx)
            out.backward(gout.to(out.dtype))
        return run

    rows = {"eager": step(eager)}
    for mode in ("recompute", "fast"):
        rows[f"fused {mode}"] = step(fused_blocks(eager, mode))
    base = None
    for name, fn in rows.items():
        us = best_us(fn)
        base = us if base is None else base
        print(f"{name:18s} {us:8.1f} us/step  (+{us - base:.1f} over eager)")
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


if __name__ == "__main__":
    main()
