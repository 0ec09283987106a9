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
A fixed number of programs (about SM count x k on a GPU) each own a contiguous range of
rows and accumulate dW = sum(dz * xhat), dB = sum(dz) in fp32 registers, then write one
fp32 partial row each; the host sums the (P, N) partials in a fixed order
(deterministic, no atomics).
All math in fp32 (bf16/fp16 upcast right after tl.load); gelu_tanh through exp (as a sigmoid).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._config import INTERPRET

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
        # 0.5 * (1 + tanh(u)) = sigmoid(2u): no cancellation where tanh(u) is near -1
        z = z / (1.0 + tl.exp(-2.0 * 0.7978845608028654 * (z + 0.044715 * z * z * z)))
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
        # with sg = sigmoid(2u) = 0.5 (1 + tanh u): 1 - tanh^2 u = 4 sg (1 - sg), and
        # 1 - sg = e sg (e = exp(-2u)) where that avoids cancellation
        e = tl.exp(-2.0 * 0.7978845608028654 * (z + 0.044715 * z * z * z))
        sg = 1.0 / (1.0 + e)
        one_minus = tl.where(e > 1.0, 1.0 - sg, e * sg)
        d = sg + 2.0 * z * sg * one_minus * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
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
def norm_act_bwd_kernel(DY, XS, W, B, MEAN, RSTD, DS, DX, DWP, DBP, M, N, rows_per_prog,
                        sdy_r, sdy_c, sxs, sds_r, sds_c, sdx,
                        ROWS: tl.constexpr, BLOCK_N: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr,
                        HAS_B: tl.constexpr, HAS_DS: tl.constexpr, ACT: tl.constexpr):
    # Program p owns rows [p*rows_per_prog, (p+1)*rows_per_prog), ROWS at a time; writes
    # dx for them and one fp32 row of dW (and dB) partial sums.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((ROWS, BLOCK_N), tl.float32)
    db_acc = tl.zeros((ROWS, BLOCK_N), tl.float32)
    row_start = pid * rows_per_prog
    for i in range(0, rows_per_prog, ROWS):
        rows = row_start + i + tl.arange(0, ROWS)
        rmask = (rows < M) & (rows < row_start + rows_per_prog)
        rows64 = rows.to(tl.int64)
        mask = rmask[:, None] & cmask[None, :]
        dz, xhat = _dz_xhat(XS, DY, W, B, MEAN, RSTD, rows64, rmask, cols, cmask, mask, sxs, sdy_r, sdy_c,
                            RMS, HAS_W, HAS_B, ACT)
        if HAS_W:
            dw_acc += dz * xhat
            g = dz * w[None, :]
        else:
            g = dz
        if HAS_B:
            db_acc += dz
        c2 = tl.sum(g * xhat, axis=1) / N
        if RMS:
            dx = g - xhat * c2[:, None]
        else:
            c1 = tl.sum(g, axis=1) / N
            dx = g - c1[:, None] - xhat * c2[:, None]
        dx = dx * tl.load(RSTD + rows64, mask=rmask, other=0.0)[:, None]
        if HAS_DS:
            dx += tl.load(DS + rows64[:, None] * sds_r + cols[None, :] * sds_c, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64[:, None] * sdx + cols[None, :], _to(dx, DX.dtype.element_ty), mask=mask)
    if HAS_W:
        tl.store(DWP + pid.to(tl.int64) * N + cols, tl.sum(dw_acc, axis=0), mask=cmask)
    if HAS_B:
        tl.store(DBP + pid.to(tl.int64) * N + cols, tl.sum(db_acc, axis=0), mask=cmask)


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
    return min(triton.next_power_of_2(max(m, 1)), 1 << (rows.bit_length() - 1))


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


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
    block = triton.next_power_of_2(n)
    if block <= CONFIG.max_block:
        rows = _rows_per_program(block, m)
        norm_act_fwd_kernel[(triton.cdiv(m, rows),)](*args, ROWS=rows, BLOCK_N=block, num_warps=_warps(rows * block),
                                                      **flags)
    else:
        chunk = CONFIG.loop_block
        norm_act_fwd_looped_kernel[(m,)](*args, BLOCK_N=chunk, num_warps=_warps(chunk), **flags)


def bwd_programs(m: int, n: int, device: torch.device) -> int:
    """Programs of the backward grid (rows split in contiguous ranges): the number of
    fp32 dW/dB partial rows."""
    if INTERPRET:
        cap = CONFIG.interp_programs
    else:
        cap = _sm_count(device) * CONFIG.bwd_programs_per_sm
    return max(1, min(m, cap))


def bwd(dy, xs, w, b, mean, rstd, ds, dx, dwp, dbp, act: str, rms: bool) -> None:
    """dy, ds (or None): 2-D (M, N), any strides; xs, dx: unit column stride; dwp/dbp: fp32
    (P, N) partials, P = dwp.shape[0] (or None when w/b is None)."""
    m, n = xs.shape
    if m == 0:
        return
    p = (dwp if dwp is not None else dbp).shape[0] if (w is not None or b is not None) else bwd_programs(m, n, xs.device)
    rows_per_prog = triton.cdiv(m, p)
    dummy = rstd
    ptrs = (dy, xs, w if w is not None else dummy, b if b is not None else dummy,
            mean if mean is not None else dummy, rstd)
    flags = dict(RMS=rms, HAS_W=w is not None, HAS_B=b is not None, ACT=ACT_CODES[act])
    block = triton.next_power_of_2(n)
    sds = (ds.stride(0), ds.stride(1)) if ds is not None else (0, 0)
    if block <= CONFIG.max_block:
        rows = max(1, min(_rows_per_program(block, m), triton.next_power_of_2(rows_per_prog)))
        norm_act_bwd_kernel[(p,)](*ptrs, ds if ds is not None else dummy, dx,
                                  dwp if dwp is not None else dummy, dbp if dbp is not None else dummy,
                                  m, n, rows_per_prog, dy.stride(0), dy.stride(1), xs.stride(0), *sds, dx.stride(0),
                                  ROWS=rows, BLOCK_N=block, HAS_DS=ds is not None,
                                  num_warps=_warps(rows * block), **flags)
        return
    chunk = CONFIG.loop_block
    norm_act_bwd_looped_kernel[(m,)](*ptrs, ds if ds is not None else dummy, dx, m, n, dy.stride(0), dy.stride(1),
                                     xs.stride(0), *sds, dx.stride(0), BLOCK_N=chunk, HAS_DS=ds is not None,
                                     num_warps=_warps(chunk), **flags)
    if w is not None or b is not None:
        norm_act_dwdb_kernel[(p, triton.cdiv(n, chunk))](
            *ptrs, dwp if dwp is not None else dummy, dbp if dbp is not None else dummy, m, n, rows_per_prog,
            dy.stride(0), dy.stride(1), xs.stride(0), BLOCK_N=chunk, num_warps=_warps(chunk), **flags)
