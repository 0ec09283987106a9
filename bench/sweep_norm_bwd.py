"""Sweep launch shapes of the Triton norm backward (or, with --fwd, forward) on the GPU
(device time of that kernel alone, cold L2) and print the best per N next to the default.

    python bench/sweep_norm_bwd.py                       # LN+GELU(tanh), bf16, 32768 rows
    python bench/sweep_norm_bwd.py --rms --act silu --n 4096,16384
    python bench/sweep_norm_bwd.py --fwd --n 768,1024,2048

A backward config is rows,warps,stages[,programs per SM] or, for rows of 16384, 2p:rows,column
chunk,warps,stages (see triton_kernels/norm.py BwdConfig), a forward one rows,warps; floor = bytes (backward: read s,
dy + write dx; forward: read x + write y) / copy bandwidth. Each candidate's outputs are
checked against the default's (outputs poisoned with NaN before each candidate runs): a
candidate that differs by more than rounding is reported and left out of the ranking."""
from __future__ import annotations

import argparse

import torch
import triton.testing

from fusedops.benchmark.harness import copy_bandwidth
from fusedops.triton_kernels import norm as tk

CANDIDATES = {
    # fewer warps a tile (more elements a thread) won the forward at 768-2048; per_sm caps the
    # dW/dB partial rows that more resident programs bring
    "small": ["4,8,1", "8,8,1", "2,4,1", "4,8,2", "8,16,1", "16,16,1", "4,4,1", "2,2,1", "1,2,1", "1,1,1", "4,2,1",
              "2,2,2", "2,2,1,8", "2,4,1,4"],
    "mid": ["1,8,1", "2,16,1", "1,8,2", "1,4,1", "2,8,1", "1,16,1"],
    "big": ["1,16,1", "1,16,2", "1,32,1", "2,32,1"],
    # the two-pass backward's first pass ("2p:rows,column chunk,warps,stages"); chunks of 256
    # on as many warps as rows: a row per warp, its two sums without a barrier
    "huge": ["2p:8,256,8,2", "2p:16,256,16,2", "2p:8,256,8,3", "2p:4,512,8,2", "2p:1,4096,8,3", "2p:2,2048,8,2",
             "2p:4,1024,8,2", "2p:2,4096,16,2", "2p:4,2048,16,2", "2p:8,1024,16,2"],
}
FWD_CANDIDATES = ["1,2", "1,4", "2,2", "2,4", "2,8", "4,4", "4,8", "8,8", "8,16", "16,16"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="768,1024,2048,4096,8192,16384")
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--rms", action="store_true")
    ap.add_argument("--act", default="gelu_tanh")
    ap.add_argument("--fwd", action="store_true", help="sweep the forward instead")
    ap.add_argument("--configs", help="';'-separated candidates instead of the built-in list")
    ap.add_argument("--device", default="cuda", help="(cpu: the script's own check, under TRITON_INTERPRET=1)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    bw = copy_bandwidth(dev)
    print(f"copy {bw / 1e9:.0f} GB/s")
    for n in [int(t) for t in args.n.split(",")]:
        m = args.rows
        x = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
        dy = torch.randn_like(x)
        w = (torch.rand(n, device=dev) + 0.5).to(torch.bfloat16)
        b = None if args.rms else torch.randn(n, device=dev, dtype=torch.bfloat16)
        y = torch.empty_like(x)
        mean = None if args.rms else torch.empty(m, device=dev)
        rstd = torch.empty(m, device=dev)
        tk.fwd(x, None, None, y, w, b, mean, rstd, 1e-5, args.act, args.rms)
        dx = torch.empty_like(x)
        floor = (2 if args.fwd else 3) * m * n * 2 / bw * 1e6
        block = triton.next_power_of_2(n)
        group = "small" if block <= 2048 else "mid" if block <= 4096 else "big" if block <= 8192 else "huge"
        results = []
        expected = None
        pool = args.configs.split(";") if args.configs else FWD_CANDIDATES if args.fwd else CANDIDATES[group]
        for cfg in [None] + pool:
            if args.fwd:
                tk._FWD_OVERRIDE = cfg

                def fn():  # -> the outputs
                    tk.fwd(x, None, None, y, w, b, mean, rstd, 1e-5, args.act, args.rms)
                    return [t for t in (y, mean, rstd) if t is not None]
                default = "default {},{}".format(*tk.fwd_shape(block, m))
            else:
                tk._BWD_OVERRIDE = cfg

                def fn():
                    return [dx] + [g for g in tk.bwd(dy, x, w, b, mean, rstd, None, dx, args.act, args.rms)
                                   if g is not None]
                default = f"default {tk.bwd_config(n, m, b is not None)}"
            try:
                for t in (y, mean, rstd) if args.fwd else (dx,):
                    if t is not None:
                        t.fill_(float("nan"))
                got = [t.float().clone() for t in fn()]
                if expected is None:
                    expected = got
                bad = _mismatch(got, expected)
                if bad:
                    print(f"  N={n} {cfg}: WRONG OUTPUT ({bad}); left out")
                    continue
                t = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
            except Exception as exc:  # a config that does not compile or launch
                print(f"  N={n} {cfg}: failed {type(exc).__name__}: {str(exc)[:100]}")
                continue
            label = cfg or default
            results.append((t, label))
            print(f"  N={n:6d} {label}: {t:8.1f} µs  ({floor / t * 100:5.1f}% of floor {floor:.1f} µs)", flush=True)
        tk._FWD_OVERRIDE = None
        tk._BWD_OVERRIDE = None
        best = min(results)
        print(f"N={n}: best {best[1]} {best[0]:.1f} µs; default {results[0][0]:.1f} µs\n", flush=True)


def _mismatch(got, expected) -> str:
    """'' when every output matches the default's up to rounding (a different summation
    order: bf16 dx a few ulps, fp32 statistics and dW/dB sums ~1e-3 relative), else what
    differs."""
    for i, (g, e) in enumerate(zip(got, expected)):
        if g.shape != e.shape or not torch.isfinite(g).all():
            return f"output {i}: not written or not finite"
        scale = e.abs().max().item() or 1.0
        err = (g - e).abs().max().item() / scale
        if err > 2e-2:
            return f"output {i}: max |diff| {err:.2e} of its largest value"
    return ""


if __name__ == "__main__":
    main()
