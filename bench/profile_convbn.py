"""Where the time of the 4-block conv+BN+ReLU training step goes (CUDA only).

For each shape and implementation: device time per step (do_bench, median), host wall
per step (20 steps queued back to back, one sync), and a torch.profiler table of the
top ops by device time and by host time. Usage:
    python bench/profile_convbn.py OUT_FILE [shape labels, comma-separated]
"""
from __future__ import annotations

import contextlib
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fusedops import _backend
from fusedops.benchmark.convbn import GPU_SHAPES, _step, block_input, eager_blocks, fused_blocks


def host_wall(fn, steps=20) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / steps * 1e6, (t2 - t0) / steps * 1e6


def main():
    import triton.testing

    out = open(sys.argv[1], "w")
    labels = sys.argv[2].split(",") if len(sys.argv) > 2 else None
    dev = torch.device("cuda")
    rows = []
    for label, batch, cin, cout, hw, k, stride in GPU_SHAPES:
        if labels and label not in labels:
            continue
        torch.manual_seed(0)
        eager = eager_blocks(cin, cout, k, stride, dev)
        x = block_input(batch, cin, hw, dev, True)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            shape = eager(x).shape
        gout = torch.randn(shape, device=dev, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        impls = {"eager": (eager, None)}
        for mode in ("recompute", "fast"):
            impls[f"cuda:{mode}"] = (fused_blocks(eager, mode), "cuda")
        impls["triton:recompute"] = (impls["cuda:recompute"][0], "triton")
        for name, (model, backend) in impls.items():
            fn = _step(model, x, gout, True)
            with (_backend.use_backend(backend) if backend else contextlib.nullcontext()):
                for _ in range(3):
                    fn()
                dev_us = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e3
                queued, wall = host_wall(fn)
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        fn()
                    torch.cuda.synchronize()
            rows.append((label, name, dev_us, queued, wall))
            out.write(f"\n===== {label} {name}: do_bench {dev_us:.0f} us, host queue {queued:.0f} us/step, "
                      f"wall {wall:.0f} us/step\n")
            ka = prof.key_averages()
            out.write(ka.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
            out.write(ka.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
            out.flush()
    print(f"{'shape':24s} {'impl':18s} {'do_bench us':>11s} {'host us':>8s} {'wall us':>8s}")
    for r in rows:
        print(f"{r[0]:24s} {r[1]:18s} {r[2]:11.0f} {r[3]:8.0f} {r[4]:8.0f}")


if __name__ == "__main__":
    main()
