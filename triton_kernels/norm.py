"""LayerNorm / RMSNorm + activation (+ residual add) kernels, forward and backward.

Forward, per row of s (s = x, or s = x + r rounded to x's dtype and stored):
    mean = sum(s)/N, rstd = 1/sqrt(sum((s-mean)^2)/N + eps)   (RMSNorm: mean = 0)
    y = act((s - mean) * rstd * w + b)
The row is held on chip (BLOCK_N = next_pow2(N)), several rows per program when N is
small; mean/rstd are stored in fp32. Rows longer than `NormConfig.max_block` take a
looped path (three passes over the row in chunks: mean, variance, output): correct for
any N, slower.

Backward, recomputing xhat and z = xhat*w + b from the saved statistics (no activation
output is saved):
    dz = dy * act'(z), g = dz * w
    ds = rstd * (g - mean(g) - xhat * mean(g * xhat))      (RMSNorm: no mean(g) term)
One persistent kernel (`norm_act_bwd_kernel`): P = SMs x resident programs, each owning a
contiguous range of row blocks (ROWS x BLOCK_N tiles, ~16 elements a thread), reading s
and dy once and writing dx once, accumulating dW = sum(dz * xhat), dB = sum(dz) in fp32
registers and writing one partial row; rows of 16384 split the accumulators over two
programs (`norm_act_bwd_split_kernel`); `partials_sum_kernel` sums the P partial rows in a
fixed order (deterministic, no atomics). Small problems run one program that writes dW/dB
directly. Rows longer than `CONFIG.bwd_max_block` take the looped kernels.
All math in fp32 (bf16/fp16 upcast right after tl.load); gelu_tanh through exp (as a sigmoid).
"""
from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

from ._activations import gelu_tanh, gelu_tanh_grad
from ._config import INTERPRET, sm_count
from ._launch import cdiv, launch, next_power_of_2

if INTERPRET:
    # The interpreter hands scalar kernel arguments over as 1-element 1-D numpy arrays and
    # converts them with int(), which numpy >= 2.4 refuses for ndim > 0: a loop bounded by
    # a runtime argument (`for i in range(0, n, BLOCK)`) then fails. Convert the one element.
    from triton.runtime import interpreter as _interpreter

    if not getattr(_interpreter, "_fusedops_index_patch", False):
        _patch_tensor = _interpreter._patch_lang_tensor

        def _patch_lang_tensor(tensor, scope):
            _patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        _interpreter._patch_lang_tensor = _patch_lang_tensor
        _interpreter._fusedops_index_patch = True

ACT_CODES = {"identity": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}


@dataclasses.dataclass
class NormConfig:
    max_block: int          # longest row held on chip; longer rows take the looped path
    loop_block: int         # chunk of the looped path
    row_elems: int          # rows per program: ROWS * BLOCK_N ~ row_elems (small N)
    max_rows: int           # at most this many rows per program
    bwd_programs_per_sm: int
    interp_programs: int    # backward programs under the interpreter
    bwd_max_block: int = 16384   # longest row of the on-chip backward; longer: looped kernels
    split_block: int = 16384     # rows this long: the long-row backward (`long_rows`)
    long_rows: str = "reload"    # "reload": one program a row range, pipelined loads, the row read
    #                              twice instead of held beside dW/dB; "split": the column-split kernel


CONFIG = (NormConfig(max_block=65536, loop_block=4096, row_elems=1 << 16, max_rows=64, bwd_programs_per_sm=1,
                     interp_programs=4)
          if INTERPRET else
          NormConfig(max_block=65536, loop_block=4096, row_elems=2048, max_rows=16, bwd_programs_per_sm=4,
                     interp_programs=4))


# The interpreter converts fp32 -> bf16 by truncation (the GPU rounds to nearest even, as
# torch does); under the interpreter the kernels round to nearest even by hand first.
_RNE_BY_HAND = tl.constexpr(INTERPRET)


@triton.jit
def _to(x, DT: tl.constexpr):
    """x (fp32) rounded to DT, to nearest even."""
    if _RNE_BY_HAND:
        if DT == tl.bfloat16:
            u = x.to(tl.uint32, bitcast=True)
            u = u + 0x7FFF + ((u >> 16) & 1)
            x = ((u >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(DT)


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        z = gelu_tanh(z)
    elif ACT == 4:
        z = z / (1.0 + tl.exp(-z))
    return z


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        d = tl.full(z.shape, 1.0, tl.float32)
    elif ACT == 1:
        d = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 2:
        d = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 3:
        d = gelu_tanh_grad(z)
    else:
        sg = 1.0 / (1.0 + tl.exp(-z))
        d = sg * (1.0 + z * (1.0 - sg))
    return d


@triton.jit
def _load_s(X, R, rows64, cols, mask, sx, sr, HAS_R: tl.constexpr):
    """The norm input s (fp32): x, or x + r rounded to x's dtype."""
    x = tl.load(X + rows64[:, None] * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_R:
        r = tl.load(R + rows64[:, None] * sr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = _to(x + r, X.dtype.element_ty).to(tl.float32)
    return x


@triton.jit
def norm_act_fwd_kernel(X, R, S, Y, W, B, MEAN, RSTD, M, N, sx, sr, ss, sy, eps,
                        ROWS: tl.constexpr, BLOCK_N: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr,
                        HAS_B: tl.constexpr, HAS_R: tl.constexpr, ACT: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    s = _load_s(X, R, rows64, cols, mask, sx, sr, HAS_R)
    if HAS_R:
        tl.store(S + rows64[:, None] * ss + cols[None, :], _to(s, S.dtype.element_ty), mask=mask)
    if RMS:
        xc = s
    else:
        mean = tl.sum(s, axis=1) / N
        xc = tl.where(mask, s - mean[:, None], 0.0)
        tl.store(MEAN + rows64, mean, mask=rmask)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
    tl.store(RSTD + rows64, rstd, mask=rmask)
    z = xc * rstd[:, None]
    if HAS_W:
        z = z * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        z = z + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    y = _act(z, ACT)
    tl.store(Y + rows64[:, None] * sy + cols[None, :], _to(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def norm_act_fwd_looped_kernel(X, R, S, Y, W, B, MEAN, RSTD, M, N, sx, sr, ss, sy, eps,
                               BLOCK_N: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr,
                               HAS_B: tl.constexpr, HAS_R: tl.constexpr, ACT: tl.constexpr):
    # One row per program, in chunks: pass 1 mean, pass 2 variance (two-pass, stable),
    # pass 3 output. s is recomputed from x (+ r) in each pass and stored in the last.
    row = tl.program_id(0)
    rows64 = (row + tl.arange(0, 1)).to(tl.int64)
    rmask = rows64 < M
    mean = tl.zeros((1,), tl.float32)
    if not RMS:
        acc = tl.zeros((1, BLOCK_N), tl.float32)
        for c0 in range(0, N, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            mask = rmask[:, None] & (cols < N)[None, :]
            acc += _load_s(X, R, rows64, cols, mask, sx, sr, HAS_R)
        mean = tl.sum(acc, axis=1) / N
        tl.store(MEAN + rows64, mean, mask=rmask)
    acc = tl.zeros((1, BLOCK_N), tl.float32)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        mask = rmask[:, None] & (cols < N)[None, :]
        xc = tl.where(mask, _load_s(X, R, rows64, cols, mask, sx, sr, HAS_R) - mean[:, None], 0.0)
        acc += xc * xc
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / N + eps)
    tl.store(RSTD + rows64, rstd, mask=rmask)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        mask = rmask[:, None] & cmask[None, :]
        s = _load_s(X, R, rows64, cols, mask, sx, sr, HAS_R)
        if HAS_R:
            tl.store(S + rows64[:, None] * ss + cols[None, :], _to(s, S.dtype.element_ty), mask=mask)
        z = (s - mean[:, None]) * rstd[:, None]
        if HAS_W:
            z = z * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            z = z + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows64[:, None] * sy + cols[None, :], _to(_act(z, ACT), Y.dtype.element_ty), mask=mask)


@triton.jit
def _dz_xhat(XS, DY, W, B, MEAN, RSTD, rows64, rmask, cols, cmask, mask, sxs, sdy_r, sdy_c,
             RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr):
    """(dz, xhat) of a tile, recomputed from the saved statistics; 0 outside mask."""
    x = tl.load(XS + rows64[:, None] * sxs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows64, mask=rmask, other=0.0)
    if not RMS:
        x = x - tl.load(MEAN + rows64, mask=rmask, other=0.0)[:, None]
    xhat = tl.where(mask, x * rstd[:, None], 0.0)
    z = xhat
    if HAS_W:
        z = z * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        z = z + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    dy = tl.load(DY + rows64[:, None] * sdy_r + cols[None, :] * sdy_c, mask=mask, other=0.0).to(tl.float32)
    dz = tl.where(mask, dy * _act_grad(z, ACT), 0.0)
    return dz, xhat


@triton.jit
def _load_param(P, cols, cmask, HAS: tl.constexpr):
    if HAS:
        v = tl.load(P + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        v = tl.zeros(cols.shape, tl.float32)
    return v


@triton.jit
def _bwd_tile(XS, DY, w, bias, mean, rstd, rows64, cols, mask, sxs, sdy_r, sdy_c, EVICT: tl.constexpr,
              HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr):
    """(dz, xhat) of a tile of rows from s and dy; 0 outside mask."""
    x = tl.load(XS + rows64[:, None] * sxs + cols[None, :], mask=mask, other=0.0, eviction_policy=EVICT)
    dy = tl.load(DY + rows64[:, None] * sdy_r + cols[None, :] * sdy_c, mask=mask, other=0.0, eviction_policy=EVICT)
    xhat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
    z = xhat
    if HAS_W:
        z = z * w[None, :]
    if HAS_B:
        z = z + bias[None, :]
    dz = tl.where(mask, dy.to(tl.float32) * _act_grad(z, ACT), 0.0)
    return dz, xhat


@triton.jit
def norm_act_bwd_kernel(DY, XS, W, B, MEAN, RSTD, DS, DX, DWP, DBP, M, N, blocks_per_prog,
                        sdy_r, sdy_c, sxs, sds_r, sds_c, sdx,
                        ROWS: tl.constexpr, BLOCK_N: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr,
                        HAS_B: tl.constexpr, HAS_DS: tl.constexpr, ACT: tl.constexpr, STAGES: tl.constexpr,
                        W_IN_LOOP: tl.constexpr, RELOAD: tl.constexpr):
    # Persistent: program p owns the row blocks [p*blocks_per_prog, (p+1)*blocks_per_prog)
    # of ROWS rows each (a contiguous range of rows), reads s and dy once, writes dx once,
    # and accumulates dW = sum(dz*xhat), dB = sum(dz) in fp32 registers; at the end one
    # row of partials (fp32, or directly the parameter dtype when the grid is one program).
    # w and b are loaded once per program; the loop's loads are pipelined STAGES deep.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    if not W_IN_LOOP:
        w = _load_param(W, cols, cmask, HAS_W)
        bias = _load_param(B, cols, cmask, HAS_B)
    dw_acc = tl.zeros((ROWS, BLOCK_N), tl.float32)
    db_acc = tl.zeros((ROWS, BLOCK_N), tl.float32)
    first = pid * blocks_per_prog
    for i in tl.range(0, blocks_per_prog, num_stages=STAGES):
        rows = (first + i) * ROWS + tl.arange(0, ROWS)
        rmask = rows < M
        rows64 = rows.to(tl.int64)
        mask = rmask[:, None] & cmask[None, :]
        rstd = tl.load(RSTD + rows64, mask=rmask, other=0.0)
        if RMS:
            mean = tl.zeros((ROWS,), tl.float32)
        else:
            mean = tl.load(MEAN + rows64, mask=rmask, other=0.0)
        if W_IN_LOOP:  # long rows: w, b re-read per row block (L1/L2 hits) to free registers
            wv = _load_param(W, cols, cmask, HAS_W)
            bv = _load_param(B, cols, cmask, HAS_B)
        else:
            wv = w
            bv = bias
        # keep s and dy in L1 for the second read when RELOAD
        dz, xhat = _bwd_tile(XS, DY, wv, bv, mean, rstd, rows64, cols, mask, sxs, sdy_r, sdy_c,
                             "evict_last" if RELOAD else "", HAS_W, HAS_B, ACT)
        if HAS_W:
            dw_acc += dz * xhat
            g = dz * wv[None, :]
        else:
            g = dz
        if HAS_B:
            db_acc += dz
        c2 = tl.sum(g * xhat, axis=1) / N
        if RMS:
            c1 = tl.zeros((ROWS,), tl.float32)
        else:
            c1 = tl.sum(g, axis=1) / N
        if RELOAD:
            # rows too long to keep xhat and g in registers beside the dW/dB accumulators:
            # recompute them from a second read of s and dy (L1/L2 hits, no DRAM traffic)
            dz, xhat = _bwd_tile(XS, DY, wv, bv, mean, rstd, rows64, cols, mask, sxs, sdy_r, sdy_c,
                                 "evict_first", HAS_W, HAS_B, ACT)
            g = dz * wv[None, :] if HAS_W else dz
        dx = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + rows64[:, None] * sds_r + cols[None, :] * sds_c, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64[:, None] * sdx + cols[None, :], _to(dx, DX.dtype.element_ty), mask=mask)
    if HAS_W:
        tl.store(DWP + pid.to(tl.int64) * N + cols, _to(tl.sum(dw_acc, axis=0), DWP.dtype.element_ty), mask=cmask)
    if HAS_B:
        tl.store(DBP + pid.to(tl.int64) * N + cols, _to(tl.sum(db_acc, axis=0), DBP.dtype.element_ty), mask=cmask)


@triton.jit
def norm_act_bwd_split_kernel(DY, XS, W, B, MEAN, RSTD, DS, DX, DWP, DBP, M, N, blocks_per_prog,
                              sdy_r, sdy_c, sxs, sds_r, sds_c, sdx,
                              BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr,
                              HAS_B: tl.constexpr, HAS_DS: tl.constexpr, ACT: tl.constexpr):
    # Long rows (16384): the dW and dB accumulators of a whole row do not fit the registers
    # beside the row (32 warps: 64 registers a thread), so SPLIT programs share each row
    # range: all of them read the whole row for the two row sums (the same rows at the same
    # time: the second read is an L2 hit), then each re-reads its 1/SPLIT of the columns
    # (an L1 hit), accumulates dW/dB for those columns and writes their dx.
    pid = tl.program_id(0)
    part = tl.program_id(1)
    HALF: tl.constexpr = BLOCK_N // SPLIT
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    colsh = part * HALF + tl.arange(0, HALF)
    cmaskh = colsh < N
    dw_acc = tl.zeros((1, HALF), tl.float32)
    db_acc = tl.zeros((1, HALF), tl.float32)
    first = pid * blocks_per_prog
    for i in range(0, blocks_per_prog):
        rows = first + i + tl.arange(0, 1)
        rmask = rows < M
        rows64 = rows.to(tl.int64)
        rstd = tl.load(RSTD + rows64, mask=rmask, other=0.0)
        if RMS:
            mean = tl.zeros((1,), tl.float32)
        else:
            mean = tl.load(MEAN + rows64, mask=rmask, other=0.0)
        mask = rmask[:, None] & cmask[None, :]
        wv = _load_param(W, cols, cmask, HAS_W)
        bv = _load_param(B, cols, cmask, HAS_B)
        dz, xhat = _bwd_tile(XS, DY, wv, bv, mean, rstd, rows64, cols, mask, sxs, sdy_r, sdy_c, "evict_last",
                             HAS_W, HAS_B, ACT)
        g = dz * wv[None, :] if HAS_W else dz
        c2 = tl.sum(g * xhat, axis=1) / N
        if RMS:
            c1 = tl.zeros((1,), tl.float32)
        else:
            c1 = tl.sum(g, axis=1) / N
        maskh = rmask[:, None] & cmaskh[None, :]
        wh = _load_param(W, colsh, cmaskh, HAS_W)
        bh = _load_param(B, colsh, cmaskh, HAS_B)
        dz, xhat = _bwd_tile(XS, DY, wh, bh, mean, rstd, rows64, colsh, maskh, sxs, sdy_r, sdy_c, "evict_first",
                             HAS_W, HAS_B, ACT)
        if HAS_W:
            dw_acc += dz * xhat
            g = dz * wh[None, :]
        else:
            g = dz
        if HAS_B:
            db_acc += dz
        dx = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + rows64[:, None] * sds_r + colsh[None, :] * sds_c, mask=maskh, other=0.0).to(tl.float32)
        tl.store(DX + rows64[:, None] * sdx + colsh[None, :], _to(dx, DX.dtype.element_ty), mask=maskh)
    if HAS_W:
        tl.store(DWP + pid.to(tl.int64) * N + colsh, _to(tl.sum(dw_acc, axis=0), DWP.dtype.element_ty), mask=cmaskh)
    if HAS_B:
        tl.store(DBP + pid.to(tl.int64) * N + colsh, _to(tl.sum(db_acc, axis=0), DBP.dtype.element_ty), mask=cmaskh)


@triton.jit
def partials_sum_kernel(DWP, DBP, DW, DB, P, N, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # dW (dB) = sum over the P fp32 partial rows, in a fixed order (a fixed-shape tile
    # accumulation then a fixed reduction tree: deterministic), written in the parameter
    # dtype. Grid: column blocks.
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < N
    acc_w = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    acc_b = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for p0 in range(0, P, BLOCK_P):
        prow = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        mask = (prow < P)[:, None] & cmask[None, :]
        offs = prow[:, None] * N + cols[None, :]
        if HAS_W:
            acc_w += tl.load(DWP + offs, mask=mask, other=0.0)
        if HAS_B:
            acc_b += tl.load(DBP + offs, mask=mask, other=0.0)
    if HAS_W:
        tl.store(DW + cols, _to(tl.sum(acc_w, axis=0), DW.dtype.element_ty), mask=cmask)
    if HAS_B:
        tl.store(DB + cols, _to(tl.sum(acc_b, axis=0), DB.dtype.element_ty), mask=cmask)


@triton.jit
def norm_act_bwd_looped_kernel(DY, XS, W, B, MEAN, RSTD, DS, DX, M, N, sdy_r, sdy_c, sxs, sds_r, sds_c, sdx,
                               BLOCK_N: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr,
                               HAS_B: tl.constexpr, HAS_DS: tl.constexpr, ACT: tl.constexpr):
    # dx of one long row: pass 1 the two row sums, pass 2 dx. dW/dB: norm_act_dwdb_kernel.
    rows64 = (tl.program_id(0) + tl.arange(0, 1)).to(tl.int64)
    rmask = rows64 < M
    acc1 = tl.zeros((1, BLOCK_N), tl.float32)
    acc2 = tl.zeros((1, BLOCK_N), tl.float32)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        mask = rmask[:, None] & cmask[None, :]
        dz, xhat = _dz_xhat(XS, DY, W, B, MEAN, RSTD, rows64, rmask, cols, cmask, mask, sxs, sdy_r, sdy_c,
                            RMS, HAS_W, HAS_B, ACT)
        if HAS_W:
            dz = dz * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        acc1 += dz
        acc2 += dz * xhat
    c1 = tl.sum(acc1, axis=1) / N
    c2 = tl.sum(acc2, axis=1) / N
    rstd = tl.load(RSTD + rows64, mask=rmask, other=0.0)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        mask = rmask[:, None] & cmask[None, :]
        dz, xhat = _dz_xhat(XS, DY, W, B, MEAN, RSTD, rows64, rmask, cols, cmask, mask, sxs, sdy_r, sdy_c,
                            RMS, HAS_W, HAS_B, ACT)
        if HAS_W:
            dz = dz * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if RMS:
            dx = dz - xhat * c2[:, None]
        else:
            dx = dz - c1[:, None] - xhat * c2[:, None]
        dx = dx * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + rows64[:, None] * sds_r + cols[None, :] * sds_c, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64[:, None] * sdx + cols[None, :], _to(dx, DX.dtype.element_ty), mask=mask)


@triton.jit
def norm_act_dwdb_kernel(DY, XS, W, B, MEAN, RSTD, DWP, DBP, M, N, rows_per_prog, sdy_r, sdy_c, sxs,
                         BLOCK_N: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                         ACT: tl.constexpr):
    # Grid (P, column chunks): dW/dB partials of the looped path; program (p, c) sums its
    # row range over one chunk of columns.
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    dw_acc = tl.zeros((1, BLOCK_N), tl.float32)
    db_acc = tl.zeros((1, BLOCK_N), tl.float32)
    row_start = pid * rows_per_prog
    for i in range(0, rows_per_prog):
        rows64 = (row_start + i + tl.arange(0, 1)).to(tl.int64)
        rmask = rows64 < M
        mask = rmask[:, None] & cmask[None, :]
        dz, xhat = _dz_xhat(XS, DY, W, B, MEAN, RSTD, rows64, rmask, cols, cmask, mask, sxs, sdy_r, sdy_c,
                            RMS, HAS_W, HAS_B, ACT)
        dw_acc += dz * xhat
        db_acc += dz
    if HAS_W:
        tl.store(DWP + pid.to(tl.int64) * N + cols, tl.sum(dw_acc, axis=0), mask=cmask)
    if HAS_B:
        tl.store(DBP + pid.to(tl.int64) * N + cols, tl.sum(db_acc, axis=0), mask=cmask)


# ---- launch helpers ------------------------------------------------------------------------

def _warps(elems: int) -> int:
    return max(1, min(16 if elems <= 16384 else 32, elems // 512))


def _rows_per_program(n_block: int, m: int) -> int:
    rows = max(1, min(CONFIG.max_rows, CONFIG.row_elems // n_block))
    return min(next_power_of_2(max(m, 1)), 1 << (rows.bit_length() - 1))


# `FUSEDOPS_NORM_FWD` ("rows,warps", e.g. "4,8") overrides the on-chip forward's launch shape
# for experiments (bench/sweep_norm_bwd.py --fwd).
_FWD_OVERRIDE = os.environ.get("FUSEDOPS_NORM_FWD")


def fwd_shape(block: int, m: int) -> tuple[int, int]:
    """(rows a program, warps) of the on-chip forward for rows padded to `block`. H200 sweeps
    (bench/sweep_norm_bwd.py --fwd, LN+GELU(tanh) bf16, 32768 rows, device µs): rows padded
    to 1024–8192 run best as 2 rows a program on block / 1024 warps, at least 2 (64 elements a
    thread; 32 at 1024):
    N = 768: 41.1 against 46.5 for 2 rows on 4 warps; 1024: 43.0 against 48.5; 2048: 78.0
    against 87.3 for 1 row on 4 warps; 4096: 148.3 against 171.7 for 1 row on 8 warps;
    8192: 342.0 against 358.9 for 1 row on 16 warps. Other sizes ROWS x BLOCK_N ~ row_elems
    on elems / 512 warps."""
    if _FWD_OVERRIDE:
        rows, warps = (int(t) for t in _FWD_OVERRIDE.split(","))
        return min(rows, next_power_of_2(max(m, 1))), warps
    if not INTERPRET and 1024 <= block <= 8192:
        return min(2, next_power_of_2(max(m, 1))), max(2, block // 1024)
    rows = _rows_per_program(block, m)
    return rows, _warps(rows * block)


def fwd(x, r, s, y, w, b, mean, rstd, eps: float, act: str, rms: bool) -> None:
    """x, r (or None), s (or None), y: 2-D (M, N) with unit column stride; w, b: (N,) or
    None; mean (LayerNorm) and rstd: fp32 (M,). Writes y, mean, rstd (and s when r)."""
    m, n = x.shape
    if m == 0:
        return
    dummy = rstd
    args = (x, r if r is not None else x, s if s is not None else x, y, w if w is not None else dummy,
            b if b is not None else dummy, mean if mean is not None else dummy, rstd, m, n, x.stride(0),
            r.stride(0) if r is not None else 0, s.stride(0) if s is not None else 0, y.stride(0), eps)
    flags = dict(RMS=rms, HAS_W=w is not None, HAS_B=b is not None, HAS_R=r is not None, ACT=ACT_CODES[act])
    block = next_power_of_2(n)
    if block <= CONFIG.max_block:
        rows, warps = fwd_shape(block, m)
        launch(norm_act_fwd_kernel, (cdiv(m, rows),), *args, ROWS=rows, BLOCK_N=block, num_warps=warps, **flags)
    else:
        chunk = CONFIG.loop_block
        launch(norm_act_fwd_looped_kernel, (m,), *args, BLOCK_N=chunk, num_warps=_warps(chunk), **flags)


@dataclasses.dataclass(frozen=True)
class BwdConfig:
    """Launch shape of the on-chip backward: a tile of ROWS x BLOCK_N elements per loop
    step (about 16 a thread), num_warps, STAGES-deep pipelined loads, RELOAD (recompute
    xhat/dz from a second, cached read of the row instead of holding them beside the
    dW/dB accumulators), W_IN_LOOP (w/b re-read per step instead of held); split > 1:
    the column-split kernel for the longest rows."""
    rows: int
    block_n: int
    num_warps: int
    stages: int = 1
    reload: bool = False
    w_in_loop: bool = False
    split: int = 1          # > 1: norm_act_bwd_split_kernel, SPLIT programs per row range
    per_sm: int = 0         # > 0: at most this many programs an SM (fewer dW/dB partial rows); 0: as
    #                         many as are resident


# Rows of N <= CONFIG.bwd_max_block elements run the on-chip backward; longer ones the
# looped kernels. `FUSEDOPS_NORM_BWD` (rows,warps,stages,reload,w_in_loop[,split[,per_sm]],
# e.g. "1,16,2,0,0") overrides the shape for experiments (benchmark sweeps).
SMALL_BWD_ELEMS = 1 << 17   # at most this many elements: one program, dW/dB written directly
_BWD_OVERRIDE = os.environ.get("FUSEDOPS_NORM_BWD")


def bwd_config(n: int, m: int) -> BwdConfig:
    block = next_power_of_2(n)
    if block >= CONFIG.split_block:
        if CONFIG.long_rows == "split":
            return BwdConfig(rows=1, block_n=block, num_warps=4 if INTERPRET else 32, split=2)
        return BwdConfig(rows=1, block_n=block, num_warps=4 if INTERPRET else 32, stages=2, reload=True,
                         w_in_loop=True)
    if INTERPRET:
        return BwdConfig(rows=_rows_per_program(block, m), block_n=block, num_warps=4)
    if _BWD_OVERRIDE:
        f = [int(t) for t in _BWD_OVERRIDE.split(",")]
        r, w, st, rl, wl, sp, ps = f + [1, 0][len(f) - 5:]  # split 1, per_sm 0 unless given
        return BwdConfig(rows=min(r, next_power_of_2(max(m, 1))), block_n=block, num_warps=w, stages=st,
                         reload=bool(rl), w_in_loop=bool(wl), split=sp, per_sm=ps)
    # 16 elements a thread (two 16-byte loads of bf16); H100 sweep (bench/sweep_norm_bwd.py,
    # LN+GELU(tanh) bf16 32768 rows): N <= 1024 best as 2 x 1024 tiles on 4 warps (768: 113 µs
    # vs 138 for 4 x 1024 on 8), 2048-8192 as below (65% of copy); at 16384 the one-program
    # kernel with pipelined loads and a second read of the row (3.0 ms) beat the column split
    # (3.5 ms).
    tile = max(2048 if block <= 1024 else 4096, block)
    warps = min(32, tile // 512)
    rows = min(tile // block, next_power_of_2(max(m, 1)))
    return BwdConfig(rows=rows, block_n=block, num_warps=warps)


_OCCUPANCY: dict = {}


def _ctas_per_sm(kernel, key, num_warps: int, device: torch.device) -> int:
    """Resident programs per SM of a compiled kernel (registers, shared memory, warps)."""
    occ = _OCCUPANCY.get(key)
    if occ is not None:
        return occ
    occ = max(1, 32 // num_warps)
    try:
        kernel._init_handles()
        props = torch.cuda.get_device_properties(device)
        regs_sm = getattr(props, "regs_per_multiprocessor", 65536)
        smem_sm = getattr(props, "shared_memory_per_multiprocessor", 233472)
        by_regs = regs_sm // max(1, kernel.n_regs * 32 * num_warps)
        by_smem = smem_sm // max(1, kernel.metadata.shared + 1024)
        occ = max(1, min(by_regs, by_smem, 64 // num_warps))
    except Exception:  # keep the estimate
        pass
    _OCCUPANCY[key] = occ
    return occ


def bwd_programs(m: int, n: int, device: torch.device) -> int:
    """Programs of the looped backward's dW/dB kernel (rows split in contiguous ranges):
    the number of fp32 dW/dB partial rows."""
    if INTERPRET:
        cap = CONFIG.interp_programs
    else:
        cap = sm_count(device) * CONFIG.bwd_programs_per_sm
    return max(1, min(m, cap))


def _finalize(dwp, dbp, dw, db, n: int) -> None:
    p = (dwp if dwp is not None else dbp).shape[0]
    block_c = min(next_power_of_2(n), 256 if INTERPRET else 64)
    block_p = min(64, next_power_of_2(p))
    launch(partials_sum_kernel, (cdiv(n, block_c),),
        dwp if dwp is not None else dbp, dbp if dbp is not None else dwp, dw if dw is not None else db,
        db if db is not None else dw, p, n, HAS_W=dwp is not None, HAS_B=dbp is not None, BLOCK_P=block_p,
        BLOCK_C=block_c, num_warps=4)


def bwd(dy, xs, w, b, mean, rstd, ds, dx, act: str, rms: bool):
    """dy, ds (or None): 2-D (M, N), any strides; xs, dx: unit column stride. Writes dx;
    returns (dW, dB) in the parameters' dtypes (None where w/b is None)."""
    m, n = xs.shape
    dev = xs.device
    dw = torch.empty_like(w) if w is not None else None
    db = torch.empty_like(b) if b is not None else None
    if m == 0 or n == 0:
        for t in (dw, db):
            if t is not None:
                t.zero_()
        return dw, db
    dummy = rstd
    ptrs = (dy, xs, w if w is not None else dummy, b if b is not None else dummy,
            mean if mean is not None else dummy, rstd)
    flags = dict(RMS=rms, HAS_W=w is not None, HAS_B=b is not None, ACT=ACT_CODES[act])
    sds = (ds.stride(0), ds.stride(1)) if ds is not None else (0, 0)
    block = next_power_of_2(n)
    params = w is not None or b is not None
    if block <= min(CONFIG.bwd_max_block, CONFIG.max_block):
        cfg = bwd_config(n, m)
        blocks = cdiv(m, cfg.rows)
        args = [*ptrs, ds if ds is not None else dummy, dx, dummy, dummy, m, n, 2,
                dy.stride(0), dy.stride(1), xs.stride(0), *sds, dx.stride(0)]
        if cfg.split > 1:
            kernel = norm_act_bwd_split_kernel
            meta = dict(BLOCK_N=cfg.block_n, SPLIT=cfg.split, HAS_DS=ds is not None, num_warps=cfg.num_warps,
                        num_stages=1, **flags)
        else:
            kernel = norm_act_bwd_kernel
            meta = dict(ROWS=cfg.rows, BLOCK_N=cfg.block_n, HAS_DS=ds is not None, STAGES=cfg.stages,
                        W_IN_LOOP=cfg.w_in_loop, RELOAD=cfg.reload, num_warps=cfg.num_warps, num_stages=cfg.stages,
                        **flags)
        if INTERPRET:
            p = max(1, min(blocks, CONFIG.interp_programs))
        elif m * n <= SMALL_BWD_ELEMS:
            p = 1
        else:
            key = (cfg, xs.dtype, dy.dtype, dy.stride(1) == 1, ds is not None, w is not None and w.dtype,
                   b is not None and b.dtype, tuple(sorted(flags.items())), dev.index)
            occ = _OCCUPANCY.get(key)
            if occ is None:
                occ = _ctas_per_sm(kernel.warmup(*args, grid=(1,), **meta), key, cfg.num_warps, dev)
            if cfg.per_sm:
                occ = min(occ, cfg.per_sm)
            p = max(1, min(blocks, sm_count(dev) * occ // cfg.split))
        bpp = cdiv(blocks, p)
        p = cdiv(blocks, bpp)            # no program without rows
        if p == 1:                              # dW/dB written directly in the parameters' dtypes
            dwp, dbp = dw, db
        else:
            dwp = xs.new_empty((p, n), dtype=torch.float32) if w is not None else None
            dbp = xs.new_empty((p, n), dtype=torch.float32) if b is not None else None
        args[8] = dwp if dwp is not None else dummy
        args[9] = dbp if dbp is not None else dummy
        args[12] = bpp
        launch(kernel, (p, cfg.split) if cfg.split > 1 else (p,), *args, **meta)
        if p > 1 and params:
            _finalize(dwp, dbp, dw, db, n)
        return dw, db
    chunk = CONFIG.loop_block
    launch(norm_act_bwd_looped_kernel, (m,), *ptrs, ds if ds is not None else dummy, dx, m, n, dy.stride(0),
           dy.stride(1), xs.stride(0), *sds, dx.stride(0), BLOCK_N=chunk, HAS_DS=ds is not None,
           num_warps=_warps(chunk), **flags)
    if params:
        p = bwd_programs(m, n, dev)
        dwp = xs.new_empty((p, n), dtype=torch.float32) if w is not None else None
        dbp = xs.new_empty((p, n), dtype=torch.float32) if b is not None else None
        launch(norm_act_dwdb_kernel, (p, cdiv(n, chunk)),
            *ptrs, dwp if dwp is not None else dummy, dbp if dbp is not None else dummy, m, n, cdiv(m, p),
            dy.stride(0), dy.stride(1), xs.stride(0), BLOCK_N=chunk, num_warps=_warps(chunk), **flags)
        _finalize(dwp, dbp, dw, db, n)
    return dw, db
