"""Sweep the launch shapes of the Triton norm backward's dW/dB partial-row sum
(`partials_sum_kernel`) on the (partial rows, N) that the real backward leaves on this GPU
(LN+GELU(tanh), bf16, 32768 rows, N = 1024, 4096, 8192 by default): device time with L2
flushed (triton.testing.do_bench, launch included), each candidate's dW and dB checked
against fp64 sums of the partial rows.

    python bench/sweep_partials_sum.py [--n 1024,4096,8192]

A shape is columns a program (c), partial rows a step (p), warps (w), pipeline stages (s);
"default" is the shape `_finalize` picks. In-graph times: bench/norm_kernels.py with
FUSEDOPS_NORM_FINALIZE="c,p,w,s"."""
from __future__ import annotations

import argparse

import torch
import triton.testing

import fusedops
from fusedops.triton_kernels import norm as tn
from fusedops.triton_kernels._launch import cdiv

CANDIDATES = [(c, p, w, s) for c in (16, 32, 64) for p in (16, 32, 64) for w in (2, 4) for s in (1, 3)]


def partial_shapes(ns: list[int]) -> list[tuple[int, int]]:
    """(partial rows, N) of one real LN+GELU(tanh) backward per N."""
    shapes = []
    orig = tn._finalize

    def record(dwp, dbp, dw, db, n):
        shapes.append(((dwp if dwp is not None else dbp).shape[0], n))
        return orig(dwp, dbp, dw, db, n)

    tn._finalize = record
    try:
        with fusedops.use_backend("triton"):
            for n in ns:
                x = torch.randn(32768, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                w = torch.ones(n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                b = torch.zeros(n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                y = fusedops.layer_norm_act(x, w, b, 1e-5, "gelu_tanh")
                torch.autograd.grad([y], [x, w, b], [torch.randn_like(y)])
    finally:
        tn._finalize = orig
    return shapes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="1024,4096,8192")
    args = ap.parse_args()
    for p, n in partial_shapes([int(t) for t in args.n.split(",")]):
        dwp, dbp = torch.randn(p, n, device="cuda"), torch.randn(p, n, device="cuda")
        ref_w, ref_b = dwp.double().sum(0), dbp.double().sum(0)
        dw = torch.empty(n, device="cuda", dtype=torch.bfloat16)
        db = torch.empty_like(dw)
        res = []
        for cand in [None, *CANDIDATES]:
            if cand is None:
                name, fn = "default", (lambda: tn._finalize(dwp, dbp, dw, db, n))
            else:
                c, bp, w, s = cand
                if c > n:
                    continue
                meta = dict(HAS_W=True, HAS_B=True, BLOCK_P=bp, BLOCK_C=c, num_warps=w, num_stages=s)
                name = f"c{c} p{bp} w{w} s{s}"
                fn = (lambda c=c, meta=meta: tn.partials_sum_kernel[(cdiv(n, c),)](dwp, dbp, dw, db, p, n, **meta))
            dw.fill_(float("nan"))
            db.fill_(float("nan"))
            fn()
            torch.cuda.synchronize()
            err = max(((out.double() - ref).abs() / (ref.abs() + 1)).max().item()
                      for out, ref in ((dw, ref_w), (db, ref_b)))
            if not err < 1e-2:
                print(f"WRONG {name}: {err}")
                continue
            res.append((triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3, name))
        default = next((t for t, nm in res if nm == "default"), float("nan"))
        res.sort()
        print(f"p={p} n={n}: default {default:.2f} us; best " + ", ".join(f"{t:.2f} {nm}" for t, nm in res[:5]))
        print("   all: " + ", ".join(f"{nm} {t:.2f}" for t, nm in sorted(res, key=lambda r: r[1])), flush=True)


if __name__ == "__main__":
    main()
