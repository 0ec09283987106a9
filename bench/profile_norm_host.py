"""Host time of the norm ops on a launch-bound shape (16x4096 bf16, LN+GELU(tanh)): wall
clock per call of fwd and fwd+bwd for eager and each fusedops backend; the Triton forward
kernel launched as `kernel[grid](...)`, through fusedops' launch helper and through its
compiled kernel's own launcher (the JIT's per-call binding and cache-key work), and the
allocation calls the Python paths use; then a torch.profiler table of one backend's fwd+bwd
(CPU-side time per op / launch) and a cProfile table of the Python side (200 calls: divide
by 200).

    python bench/profile_norm_host.py [--backend triton|cuda] [--rows 16 --n 4096]"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import fusedops
from fusedops.benchmark.harness import time_wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--n", type=int, default=4096)
    args = ap.parse_args()
    dev = torch.device("cuda")
    m, n = args.rows, args.n
    x = torch.randn(m, n, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.rand(n, device=dev) + 0.5).to(torch.bfloat16).requires_grad_()
    b = torch.randn(n, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(m, n, device=dev, dtype=torch.bfloat16)

    def eager():
        y = F.gelu(F.layer_norm(x, (n,), w, b, 1e-5), approximate="tanh")
        torch.autograd.grad([y], [x, w, b], [g])

    def fused():
        y = fusedops.layer_norm_act(x, w, b, 1e-5, "gelu_tanh")
        torch.autograd.grad([y], [x, w, b], [g])

    def fused_fwd():
        with torch.no_grad():
            fusedops.layer_norm_act(x, w, b, 1e-5, "gelu_tanh")

    print(f"eager fwd+bwd: {time_wall(eager, dev, 500) * 1e6:.1f} µs/call (host wall)")
    for be in ("triton", "cuda"):
        with fusedops.use_backend(be):
            print(f"fusedops:{be} fwd: {time_wall(fused_fwd, dev, 500) * 1e6:.1f} µs/call, "
                  f"fwd+bwd: {time_wall(fused, dev, 500) * 1e6:.1f} µs/call")
    launch_and_allocations(x.detach(), w.detach(), b.detach(), dev)
    with fusedops.use_backend(args.backend):
        for _ in range(20):
            fused()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(50):
                fused()
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    # Python-level breakdown (where the host time of one fwd+bwd goes)
    import cProfile
    import pstats
    with fusedops.use_backend(args.backend):
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(200):
            fused()
        torch.cuda.synchronize()
        pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(30)


def launch_and_allocations(x, w, b, dev) -> None:
    """Host µs a call of one Triton forward launch (three forms) and of the allocations."""
    import triton

    from fusedops.triton_kernels import norm as tn
    from fusedops.triton_kernels._launch import launch
    m, n = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(m, device=dev)
    rstd = torch.empty(m, device=dev)
    act = tn.ACT_CODES["gelu_tanh"]
    block = triton.next_power_of_2(n)
    rows, warps = tn.fwd_shape(block, m)
    args = (x, x, x, y, w, b, mean, rstd, m, n, n, 0, 0, n, 1e-5)
    meta = dict(ROWS=rows, BLOCK_N=block, num_warps=warps, RMS=False, HAS_W=True, HAS_B=True,
                HAS_R=False, ACT=act)
    grid = ((m + rows - 1) // rows, 1, 1)
    compiled = tn.norm_act_fwd_kernel.warmup(*args, grid=grid, **meta)
    all_args = list(args) + [rows, block, False, True, True, False, act]  # the constexprs, in order
    runner = compiled[grid]
    stream = torch.cuda.current_stream(dev).cuda_stream
    rows_out = {
        "triton_kernels.norm.fwd (launch + args)":
            lambda: tn.fwd(x, None, None, y, w, b, mean, rstd, 1e-5, "gelu_tanh", False),
        "kernel[grid](...)": lambda: tn.norm_act_fwd_kernel[grid](*args, **meta),
        "launch(kernel, grid, ...) (fusedops)": lambda: launch(tn.norm_act_fwd_kernel, grid, *args, **meta),
        "compiled[grid](...)": lambda: runner(*all_args),
        "compiled.run(...), stream fixed": lambda: compiled.run(
            grid[0], 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *all_args),
        "torch.empty_like(x)": lambda: torch.empty_like(x),
        "torch.empty(shape, dtype=, device=)": lambda: torch.empty(x.shape, dtype=x.dtype, device=x.device),
        "x.new_empty(shape, dtype=)": lambda: x.new_empty(x.shape, dtype=x.dtype),
    }
    for name, fn in rows_out.items():
        print(f"{name:42s} {time_wall(fn, dev, 300) * 1e6:8.1f} µs/call (host wall)")


if __name__ == "__main__":
    main()
