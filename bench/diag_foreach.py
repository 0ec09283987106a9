"""Diagnostic: host time per call vs GPU kernel time of foreach_add_ (eager, CUDA C++,
Triton) over the 200 transformer tensors, to tell launch overhead from kernel speed.
Run on a GPU machine after `bash bench/gpu_run.sh OUT build`: python3 bench/diag_foreach.py"""
import time

import torch

import fusedops
from fusedops.benchmark.add import transformer_shapes

for dtype in (torch.float32, torch.bfloat16):
    xs = [torch.randn(s, device="cuda", dtype=dtype) for s in transformer_shapes("cuda")]
    ys = [torch.randn(s, device="cuda", dtype=dtype) for s in transformer_shapes("cuda")]
    runs = {"eager": lambda: torch._foreach_add_(xs, ys)}
    for b in ("cuda", "triton"):
        def f(b=b):
            with fusedops.use_backend(b):
                fusedops.foreach_add_(xs, ys)
        runs[b] = f
    for name, fn in runs.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        # host: time to enqueue, with the GPU kept busy so that no call waits on it
        torch.cuda._sleep(200_000_000)
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        host = (time.perf_counter() - t0) / 20 * 1e6
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        total = sum(e.device_time for e in kern) / 5
        names = sorted({e.name[:60] for e in kern})
        print(f"{str(dtype):15s} {name:7s} host {host:8.1f} us/call  gpu {total:8.1f} us/call  kernels/call {len(kern) / 5:.0f}  {names}")
