"""Registers and spills of the Triton norm backward's default launch shapes, compiled offline
for sm_90 (no GPU needed; the compiler's bundled cuobjdump reads the cubin):

    python bench/triton_regs.py --n 1024,2048,4096,8192,16384 [--act gelu_tanh] [--rms]

Compiled as a launch specialises the kernel: pointers and the integer arguments that are
multiples of 16 (M, N, the row strides; the zero strides of an absent ds) marked
16-divisible, a unit column stride of dy as the constant 1. Without those
marks the counts are much higher (4096 on 8 warps: 204 registers instead of 128) and say
nothing about the launched kernel. Shapes from `bwd_config` for 32768 rows of bf16 (a LayerNorm
with weight and bias, or --rms with weight only)."""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fusedops.triton_kernels import norm as tn  # noqa: E402

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def usage(fn, ptr_types: dict, consts: dict, div16: set, warps: int, stages: int) -> str:
    sig = {}
    for a in fn.arg_names:
        sig[a] = "constexpr" if a in consts else ptr_types.get(a, "i32")
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in sig
             if sig[a].startswith("*") or a in div16}
    kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=warps, num_stages=stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(t.split(":") for t in out.split() if t.count(":") == 1 and t.split(":")[1].isdigit())
    return f"{fields.get('REG', '?')} registers, {fields.get('STACK', '?')} bytes of stack"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="1024,2048,4096,8192,16384")
    ap.add_argument("--act", default="gelu_tanh", choices=list(tn.ACT_CODES))
    ap.add_argument("--rms", action="store_true")
    args = ap.parse_args()
    m = 32768
    for n in (int(t) for t in args.n.split(",")):
        cfg = tn.bwd_config(n, m, has_b=not args.rms)
        flags = dict(RMS=args.rms, HAS_W=True, HAS_B=not args.rms, ACT=tn.ACT_CODES[args.act])
        div16 = {"sds_r", "sds_c"} | ({"M"} if m % 16 == 0 else set())  # (no ds: zero strides)
        div16 |= {a for a in ("N", "sdy_r", "sxs", "sdx") if n % 16 == 0}
        onchip_ptrs = {**{a: "*bf16" for a in ("DY", "XS", "W", "B", "DS", "DX")},
                       **{a: "*fp32" for a in ("MEAN", "RSTD", "DWP", "DBP")}}
        if cfg.twopass:
            fn = tn.norm_act_bwd_sums_kernel
            ptrs = {**{a: "*bf16" for a in ("DY", "XS", "W", "B")},
                    **{a: "*fp32" for a in ("MEAN", "RSTD", "DWP", "DBP", "C1", "C2")}}
            consts = dict(ROWS=cfg.rows, BLOCK_N=cfg.block_n, STAGES=cfg.stages, PREFETCH=cfg.prefetch, sdy_c=1,
                          **flags)
            what = "two-pass first pass"
        elif cfg.split > 1:
            fn = tn.norm_act_bwd_split_kernel
            ptrs = {**onchip_ptrs, "XCH": "*i64"}
            consts = dict(BLOCK_N=cfg.block_n, HAS_DS=False, SPLIT=cfg.split, W_IN_LOOP=cfg.w_in_loop, sdy_c=1,
                          **flags)
            what = f"split, {cfg.split} programs a row"
        else:
            fn = tn.norm_act_bwd_kernel
            ptrs = onchip_ptrs
            consts = dict(ROWS=cfg.rows, BLOCK_N=cfg.block_n, HAS_DS=False, STAGES=cfg.stages,
                          W_IN_LOOP=cfg.w_in_loop, ROW_ACC=cfg.row_acc, PREFETCH=cfg.prefetch, sdy_c=1, **flags)
            what = "on-chip backward"
        print(f"N={n}: {what}, {cfg.rows} x {cfg.block_n} on {cfg.num_warps} warps, {cfg.stages} stage(s)"
              f"{', prefetch' if cfg.prefetch else ''}{', w/b per row' if cfg.w_in_loop else ''}: "
              f"{usage(fn, ptrs, consts, div16, cfg.num_warps, cfg.stages)}", flush=True)


if __name__ == "__main__":
    main()
