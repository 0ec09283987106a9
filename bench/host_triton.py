"""Host time of the Triton norm path on CUDA (16x4096 bf16, LN+GELU(tanh)): the public
call per backend, a `kernel[grid](...)` launch against launches of the compiled kernel
(its runner, and its run() with the stream and metadata decided once), and the
allocation calls the Python paths use (harness.time_wall: best of 5 loops of
back-to-back calls).
    python bench/host_triton.py
"""
from __future__ import annotations

import torch

import fusedops
from fusedops import _backend
from fusedops.benchmark.harness import time_wall
from fusedops.triton_kernels import norm as tn


def wall_us(fn) -> float:
    return time_wall(fn, torch.device("cuda"), calls=300) * 1e6


def main():
    dev = "cuda"
    m, n = 16, 4096
    x = torch.randn(m, n, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(n, device=dev, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(n, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)

    def fwd_bwd():
        y = fusedops.layer_norm_act(x, w, b, 1e-5, "gelu_tanh")
        torch.autograd.grad([y], [x, w, b], [dy])

    def fwd():
        with torch.no_grad():
            fusedops.layer_norm_act(x, w, b, 1e-5, "gelu_tanh")

    xd, wd, bd = x.detach(), w.detach(), b.detach()
    y = torch.empty_like(xd)
    mean = torch.empty(m, device=dev)
    rstd = torch.empty(m, device=dev)
    act = tn.ACT_CODES["gelu_tanh"]
    block = 4096
    rows = tn._rows_per_program(block, m)
    args = (xd, xd, xd, y, wd, bd, mean, rstd, m, n, n, 0, 0, n, 1e-5)
    meta = dict(ROWS=rows, BLOCK_N=block, num_warps=tn._warps(rows * block), RMS=False, HAS_W=True,
                HAS_B=True, HAS_R=False, ACT=act)
    grid = ((m + rows - 1) // rows, 1, 1)
    compiled = tn.norm_act_fwd_kernel.warmup(*args, grid=grid, **meta)
    all_args = list(args) + [rows, block, False, True, True, False, act]  # the constexprs, in order
    runner = compiled[grid]
    stream = torch.cuda.current_stream().cuda_stream

    res = {}
    for be in ("triton", "cuda"):
        with _backend.use_backend(be):
            res[f"{be}: layer_norm_act fwd (no grad)"] = wall_us(fwd)
            res[f"{be}: layer_norm_act fwd+bwd"] = wall_us(fwd_bwd)
    res["triton_kernels.norm.fwd (launch + args)"] = wall_us(
        lambda: tn.fwd(xd, None, None, y, wd, bd, mean, rstd, 1e-5, "gelu_tanh", False))
    res["kernel[grid](...)"] = wall_us(lambda: tn.norm_act_fwd_kernel[grid](*args, **meta))
    res["compiled[grid](...)"] = wall_us(lambda: runner(*all_args))
    res["compiled.run(...), stream fixed"] = wall_us(
        lambda: compiled.run(grid[0], 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None,
                             *all_args))
    res["torch.empty_like(x)"] = wall_us(lambda: torch.empty_like(xd))
    res["torch.empty(shape, dtype=, device=)"] = wall_us(
        lambda: torch.empty(xd.shape, dtype=torch.bfloat16, device=xd.device))
    res["x.new_empty(shape, dtype=)"] = wall_us(lambda: xd.new_empty(xd.shape, dtype=torch.bfloat16))
    for k, v in res.items():
        print(f"{k:42s} {v:8.1f} us")


if __name__ == "__main__":
    main()
