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
contiguous range of row blocks (ROWS x BLOCK_N tiles, 4-32 elements a thread), reading s
and dy once and writing dx once, accumulating dW = sum(dz * xhat), dB = sum(dz) in fp32
registers and writing one partial row; `partials_sum_kernel` sums the P partial rows in a
fixed order (deterministic, no atomics). Small problems run one program that writes dW/dB
directly. For 16-bit rows of 4096 and 8192 (and the kernels below) each program loads the
next row's s and dy into registers before it reduces and writes the current one
(PREFETCH; two pipeline stages would cost a program an SM). Rows padded to
`CONFIG.twopass_block` (16384) or more do not fit one program's registers beside their
dW/dB accumulators. 16-bit rows padded to 16384 take `norm_act_bwd_split_kernel`: the
8192-column kernel with two programs a row (any power of two under the override), which
exchange each row's two sums through global memory (tagged words; a cooperative launch
keeps every program resident), so s and dy are still read once (H100, LN+GELU(tanh) bf16
32768 x 16384: backward 1.52 ms against 2.19 for the two passes). Longer rows and fp32
rows take two passes,
`norm_act_bwd_sums_kernel` (dW/dB partials and each row's sums over column chunks) then
`norm_act_bwd_dx_kernel` (dx), s and dy read twice. Under the interpreter, which runs
programs one after another (a program would wait forever for its partner), every long
row takes the two passes.
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
    max_block: int          # longest row held on chip in the forward; longer rows take the looped path
    loop_block: int         # chunk of the looped forward
    row_elems: int          # rows per program: ROWS * BLOCK_N ~ row_elems (small N)
    max_rows: int           # at most this many rows per program
    interp_programs: int    # backward programs under the interpreter
    twopass_block: int = 16384   # rows padded to this many elements or more: the two-pass backward,
    #                              except 16-bit rows padded to exactly this on a GPU: the split
    #                              kernel (two programs a row)


CONFIG = (NormConfig(max_block=65536, loop_block=4096, row_elems=1 << 16, max_rows=64,
                     interp_programs=4)
          if INTERPRET else
          NormConfig(max_block=65536, loop_block=4096, row_elems=2048, max_rows=16,
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
def _load_param(P, cols, cmask, HAS: tl.constexpr):
    if HAS:
        v = tl.load(P + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        v = tl.zeros(cols.shape, tl.float32)
    return v


@triton.jit
def _bwd_load(XS, DY, rows64, cols, mask, sxs, sdy_r, sdy_c, EVICT: tl.constexpr):
    """The raw (s, dy) tile of rows (their own dtypes); 0 outside mask."""
    x = tl.load(XS + rows64[:, None] * sxs + cols[None, :], mask=mask, other=0.0, eviction_policy=EVICT)
    dy = tl.load(DY + rows64[:, None] * sdy_r + cols[None, :] * sdy_c, mask=mask, other=0.0, eviction_policy=EVICT)
    return x, dy


@triton.jit
def _load_rows(XS, DY, rows, valid, M, cols, cmask, sxs, sdy_r, sdy_c):
    """The raw (s, dy) tile of `rows` where `valid` and inside M, 0 elsewhere (the prefetch)."""
    rmask = (rows < M) & valid
    return _bwd_load(XS, DY, rows.to(tl.int64), cols, rmask[:, None] & cmask[None, :], sxs, sdy_r, sdy_c, "")


@triton.jit
def _bwd_math(x, dy, w, bias, mean, rstd, mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr):
    """(dz, xhat) of a loaded (s, dy) tile; 0 outside mask."""
    xhat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
    z = xhat
    if HAS_W:
        z = z * w[None, :]
    if HAS_B:
        z = z + bias[None, :]
    dz = tl.where(mask, dy.to(tl.float32) * _act_grad(z, ACT), 0.0)
    return dz, xhat


@triton.jit
def _bwd_tile(XS, DY, w, bias, mean, rstd, rows64, cols, mask, sxs, sdy_r, sdy_c, EVICT: tl.constexpr,
              HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr):
    """(dz, xhat) of a tile of rows from s and dy; 0 outside mask."""
    x, dy = _bwd_load(XS, DY, rows64, cols, mask, sxs, sdy_r, sdy_c, EVICT)
    return _bwd_math(x, dy, w, bias, mean, rstd, mask, HAS_W, HAS_B, ACT)


@triton.jit
def _post(slot, v, tag):
    """Store the fp32 scalar v in the low half of the int64 slot, tag in the high half: one
    single-copy-atomic word, so a reader that sees the tag sees the value with it."""
    bits = v.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    tl.atomic_xchg(slot, tag | bits, sem="relaxed", scope="gpu")


@triton.jit
def _value(word):
    return (word & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _read_word(word, LD: tl.constexpr):
    """One exchange word, read from L2: by a volatile load in every thread (LD), else by one
    thread's atomic (broadcast through shared memory)."""
    if LD:
        return tl.load(word, volatile=True)
    return tl.atomic_add(word, 0, sem="relaxed", scope="gpu")


@triton.jit
def _post_sums(XCH, group, part, step, a2, a1, SPLIT: tl.constexpr, RMS: tl.constexpr):
    """Post this program's part of step `step`'s row sums (a2, a1: scalars) into slot
    step % 2 of its group: XCH holds int64 words [group, slot, part, (c2, c1)], zero before
    the launch, each a value tagged with step + 1. Two slots suffice: a program posts step
    s + 1 only after it has read every partner's step s, which each partner posted after
    reading this program's step s - 1 (the words step s + 1 overwrites)."""
    words = XCH + ((group.to(tl.int64) * 2 + step % 2) * SPLIT + part) * 2
    tag = (step + 1).to(tl.int64) << 32
    _post(words, a2, tag)
    if not RMS:
        _post(words + 1, a1, tag)


@triton.jit
def _wait_sums(XCH, group, part, step, a2, a1, SPLIT: tl.constexpr, RMS: tl.constexpr, LD: tl.constexpr):
    """Step `step`'s row sums over the SPLIT programs of the group, added in part order (the
    same bits in every program); this program's own part from a2, a1, the others' read from
    their words, re-read until they carry the step's tag."""
    slot = XCH + (group.to(tl.int64) * 2 + step % 2) * (SPLIT * 2)
    tag = (step + 1).to(tl.int64)
    t2 = 0.0
    t1 = 0.0
    for j in tl.static_range(SPLIT):
        if j == part:
            v2 = a2
            v1 = a1
        else:  # part j's words, both read at once, until both carry the tag (0 is no step's)
            w2 = tl.zeros((), tl.int64)
            if RMS:
                while (w2 >> 32) != tag:
                    w2 = _read_word(slot + j * 2, LD)
                v1 = a1
            else:
                w1 = tl.zeros((), tl.int64)
                while ((w2 >> 32) != tag) | ((w1 >> 32) != tag):
                    w2 = _read_word(slot + j * 2, LD)
                    w1 = _read_word(slot + j * 2 + 1, LD)
                v1 = _value(w1)
            v2 = _value(w2)
        t2 += v2
        t1 += v1
    return t2, t1


@triton.jit
def norm_act_bwd_kernel(DY, XS, W, B, MEAN, RSTD, DS, DX, DWP, DBP, M, N, blocks_per_prog,
                        sdy_r, sdy_c, sxs, sds_r, sds_c, sdx,
                        ROWS: tl.constexpr, BLOCK_N: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr,
                        HAS_B: tl.constexpr, HAS_DS: tl.constexpr, ACT: tl.constexpr, STAGES: tl.constexpr,
                        W_IN_LOOP: tl.constexpr, ROW_ACC: tl.constexpr, PREFETCH: tl.constexpr):
    # Persistent: program p owns the row blocks [p*blocks_per_prog, (p+1)*blocks_per_prog)
    # of ROWS rows each (a contiguous range of rows), reads s and dy once, writes dx once,
    # and accumulates dW = sum(dz*xhat), dB = sum(dz) in fp32 registers: ROW_ACC, one row
    # each (the step's rows summed as it goes: fewer registers, for tiles whose rows sit in
    # the same threads), else a ROWS x BLOCK_N tile each, summed at the end; then one row of
    # partials (fp32, or directly the parameter dtype when the grid is one program).
    # w and b are loaded once per program (W_IN_LOOP: every step); the loop's loads are
    # pipelined STAGES deep, or (PREFETCH) the next step's s and dy are loaded into registers
    # before this step's work.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    if not W_IN_LOOP:
        w = _load_param(W, cols, cmask, HAS_W)
        bias = _load_param(B, cols, cmask, HAS_B)
    dw_acc = tl.zeros((BLOCK_N,) if ROW_ACC else (ROWS, BLOCK_N), tl.float32)
    db_acc = tl.zeros((BLOCK_N,) if ROW_ACC else (ROWS, BLOCK_N), tl.float32)
    first = pid * blocks_per_prog
    if PREFETCH:
        x_n, dy_n = _load_rows(XS, DY, first * ROWS + tl.arange(0, ROWS), blocks_per_prog > 0, M, cols, cmask,
                               sxs, sdy_r, sdy_c)
    for i in tl.range(0, blocks_per_prog, num_stages=STAGES):
        rows = (first + i) * ROWS + tl.arange(0, ROWS)
        rmask = rows < M
        rows64 = rows.to(tl.int64)
        mask = rmask[:, None] & cmask[None, :]
        if PREFETCH:  # this step's tile was loaded by the previous one; load the next step's
            x_t = x_n
            dy_t = dy_n
            x_n, dy_n = _load_rows(XS, DY, rows + ROWS, i + 1 < blocks_per_prog, M, cols, cmask, sxs, sdy_r, sdy_c)
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
        if PREFETCH:
            dz, xhat = _bwd_math(x_t, dy_t, wv, bv, mean, rstd, mask, HAS_W, HAS_B, ACT)
        else:
            dz, xhat = _bwd_tile(XS, DY, wv, bv, mean, rstd, rows64, cols, mask, sxs, sdy_r, sdy_c, "",
                                 HAS_W, HAS_B, ACT)
        if HAS_W:
            dw_acc += tl.sum(dz * xhat, axis=0) if ROW_ACC else dz * xhat
            g = dz * wv[None, :]
        else:
            g = dz
        if HAS_B:
            db_acc += tl.sum(dz, axis=0) if ROW_ACC else dz
        c2 = tl.sum(g * xhat, axis=1) / N
        if RMS:
            c1 = tl.zeros((ROWS,), tl.float32)
        else:
            c1 = tl.sum(g, axis=1) / N
        dx = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + rows64[:, None] * sds_r + cols[None, :] * sds_c, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64[:, None] * sdx + cols[None, :], _to(dx, DX.dtype.element_ty), mask=mask)
    if not ROW_ACC:
        dw_acc = tl.sum(dw_acc, axis=0)
        db_acc = tl.sum(db_acc, axis=0)
    if HAS_W:
        tl.store(DWP + pid.to(tl.int64) * N + cols, _to(dw_acc, DWP.dtype.element_ty), mask=cmask)
    if HAS_B:
        tl.store(DBP + pid.to(tl.int64) * N + cols, _to(db_acc, DBP.dtype.element_ty), mask=cmask)


@triton.jit
def _store_dx(DS, DX, g, xhat, rstd, c2, c1, rows64, mask, cols, N, sds_r, sds_c, sdx, RMS: tl.constexpr,
              HAS_DS: tl.constexpr):
    """dx = rstd * (g - c1 / N - xhat * c2 / N) (+ ds) of a tile of rows; c2, c1: the rows' sums."""
    if RMS:
        dx = (g - xhat * (c2 / N)[:, None]) * rstd[:, None]
    else:
        dx = (g - (c1 / N)[:, None] - xhat * (c2 / N)[:, None]) * rstd[:, None]
    if HAS_DS:
        dx += tl.load(DS + rows64[:, None] * sds_r + cols[None, :] * sds_c, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + rows64[:, None] * sdx + cols[None, :], _to(dx, DX.dtype.element_ty), mask=mask)


@triton.jit
def norm_act_bwd_split_kernel(DY, XS, W, B, MEAN, RSTD, DS, DX, DWP, DBP, XCH, M, N, rows_per_group,
                              sdy_r, sdy_c, sxs, sds_r, sds_c, sdx,
                              BLOCK_N: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                              HAS_DS: tl.constexpr, ACT: tl.constexpr, SPLIT: tl.constexpr,
                              W_IN_LOOP: tl.constexpr, LD: tl.constexpr):
    # Rows too long for one program's registers, read once: SPLIT programs share each row,
    # program p taking columns [(p % SPLIT) * BLOCK_N, +BLOCK_N) of the rows_per_group rows of
    # group p // SPLIT, one row a step, the next row's s and dy loaded before the step's work
    # (as PREFETCH in norm_act_bwd_kernel), dW/dB accumulated in fp32 registers (one partial
    # row a group, the group's programs writing its column ranges). Each step's two row
    # sums are exchanged through XCH (_post_sums, _wait_sums); the grid is launched
    # cooperatively, so every program is resident and none waits on one that cannot start.
    # A step posts its row's sums, adds to dW/dB, then waits for the partners' sums.
    pid = tl.program_id(0)
    group = pid // SPLIT
    part = pid % SPLIT
    cols = part * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    one = tl.arange(0, 1)
    if not W_IN_LOOP:
        w = _load_param(W, cols, cmask, HAS_W)
        bias = _load_param(B, cols, cmask, HAS_B)
    dw_acc = tl.zeros((BLOCK_N,), tl.float32)
    db_acc = tl.zeros((BLOCK_N,), tl.float32)
    first = group * rows_per_group
    x_n, dy_n = _load_rows(XS, DY, first + one, rows_per_group > 0, M, cols, cmask, sxs, sdy_r, sdy_c)
    for i in range(0, rows_per_group):
        rows = first + i + one
        rmask = rows < M
        rows64 = rows.to(tl.int64)
        mask = rmask[:, None] & cmask[None, :]
        x_t = x_n
        dy_t = dy_n
        x_n, dy_n = _load_rows(XS, DY, rows + 1, i + 1 < rows_per_group, M, cols, cmask, sxs, sdy_r, sdy_c)
        rstd = tl.load(RSTD + rows64, mask=rmask, other=0.0)
        if RMS:
            mean = tl.zeros((1,), tl.float32)
        else:
            mean = tl.load(MEAN + rows64, mask=rmask, other=0.0)
        if W_IN_LOOP:
            wv = _load_param(W, cols, cmask, HAS_W)
            bv = _load_param(B, cols, cmask, HAS_B)
        else:
            wv = w
            bv = bias
        dz, xhat = _bwd_math(x_t, dy_t, wv, bv, mean, rstd, mask, HAS_W, HAS_B, ACT)
        g = dz * wv[None, :] if HAS_W else dz
        c2 = tl.sum(g * xhat)  # (the tile is one row: the row's sums as scalars)
        c1 = 0.0 if RMS else tl.sum(g)
        _post_sums(XCH, group, part, i, c2, c1, SPLIT, RMS)
        if HAS_W:
            dw_acc += tl.sum(dz * xhat, axis=0)
        if HAS_B:
            db_acc += tl.sum(dz, axis=0)
        t2, t1 = _wait_sums(XCH, group, part, i, c2, c1, SPLIT, RMS, LD)
        _store_dx(DS, DX, g, xhat, rstd, tl.full((1,), t2, tl.float32), tl.full((1,), t1, tl.float32), rows64,
                  mask, cols, N, sds_r, sds_c, sdx, RMS, HAS_DS)
    if HAS_W:
        tl.store(DWP + group.to(tl.int64) * N + cols, _to(dw_acc, DWP.dtype.element_ty), mask=cmask)
    if HAS_B:
        tl.store(DBP + group.to(tl.int64) * N + cols, _to(db_acc, DBP.dtype.element_ty), mask=cmask)


@triton.jit
def norm_act_bwd_sums_kernel(DY, XS, W, B, MEAN, RSTD, DWP, DBP, C1, C2, M, N, blocks_per_prog, sdy_r, sdy_c, sxs,
                             ROWS: tl.constexpr, BLOCK_N: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr,
                             HAS_B: tl.constexpr, ACT: tl.constexpr, STAGES: tl.constexpr,
                             PREFETCH: tl.constexpr):
    # The two-pass backward's first pass (rows too long to hold beside their dW/dB
    # accumulators). Grid (P, column chunks): program (p, c) owns the row blocks
    # [p*blocks_per_prog, (p+1)*blocks_per_prog) of ROWS rows over the columns of chunk c,
    # accumulates dW/dB of those columns in fp32 registers (one partial row per p, written
    # at the end), and stores each row's two sums over its columns: C1[row, c] = sum(g),
    # C2[row, c] = sum(g * xhat), g = dz * w (fp32, [M, chunks]). PREFETCH as in
    # norm_act_bwd_kernel.
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    nchunks = tl.num_programs(1)
    cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = _load_param(W, cols, cmask, HAS_W)
    bias = _load_param(B, cols, cmask, HAS_B)
    dw_acc = tl.zeros((BLOCK_N,), tl.float32)
    db_acc = tl.zeros((BLOCK_N,), tl.float32)
    first = pid * blocks_per_prog
    if PREFETCH:
        x_n, dy_n = _load_rows(XS, DY, first * ROWS + tl.arange(0, ROWS), blocks_per_prog > 0, M, cols, cmask,
                               sxs, sdy_r, sdy_c)
    for i in tl.range(0, blocks_per_prog, num_stages=STAGES):
        rows = (first + i) * ROWS + tl.arange(0, ROWS)
        rmask = rows < M
        rows64 = rows.to(tl.int64)
        mask = rmask[:, None] & cmask[None, :]
        if PREFETCH:
            x_t = x_n
            dy_t = dy_n
            x_n, dy_n = _load_rows(XS, DY, rows + ROWS, i + 1 < blocks_per_prog, M, cols, cmask, sxs, sdy_r, sdy_c)
        rstd = tl.load(RSTD + rows64, mask=rmask, other=0.0)
        if RMS:
            mean = tl.zeros((ROWS,), tl.float32)
        else:
            mean = tl.load(MEAN + rows64, mask=rmask, other=0.0)
        if PREFETCH:
            dz, xhat = _bwd_math(x_t, dy_t, w, bias, mean, rstd, mask, HAS_W, HAS_B, ACT)
        else:
            dz, xhat = _bwd_tile(XS, DY, w, bias, mean, rstd, rows64, cols, mask, sxs, sdy_r, sdy_c, "",
                                 HAS_W, HAS_B, ACT)
        if HAS_W:
            dw_acc += tl.sum(dz * xhat, axis=0)
            g = dz * w[None, :]
        else:
            g = dz
        if HAS_B:
            db_acc += tl.sum(dz, axis=0)
        tl.store(C2 + rows64 * nchunks + chunk, tl.sum(g * xhat, axis=1), mask=rmask)
        if not RMS:
            tl.store(C1 + rows64 * nchunks + chunk, tl.sum(g, axis=1), mask=rmask)
    if HAS_W:
        tl.store(DWP + pid.to(tl.int64) * N + cols, _to(dw_acc, DWP.dtype.element_ty), mask=cmask)
    if HAS_B:
        tl.store(DBP + pid.to(tl.int64) * N + cols, _to(db_acc, DBP.dtype.element_ty), mask=cmask)


@triton.jit
def norm_act_bwd_dx_kernel(DY, XS, W, B, MEAN, RSTD, DS, DX, C1, C2, M, N, NCHUNKS, sdy_r, sdy_c, sxs,
                           sds_r, sds_c, sdx, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_DS: tl.constexpr,
                           ACT: tl.constexpr):
    # The two-pass backward's second pass: grid (row blocks, column tiles), dx of a ROWS x
    # BLOCK_N tile; the row sums are the NCHUNKS first-pass sums of each row added in a
    # fixed order (every tile of a row gets the same bits).
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    ks = tl.arange(0, BLOCK_K)
    kmask = rmask[:, None] & (ks < NCHUNKS)[None, :]
    c2 = tl.sum(tl.load(C2 + rows64[:, None] * NCHUNKS + ks[None, :], mask=kmask, other=0.0), axis=1) / N
    if RMS:
        c1 = tl.zeros((ROWS,), tl.float32)
        mean = tl.zeros((ROWS,), tl.float32)
    else:
        c1 = tl.sum(tl.load(C1 + rows64[:, None] * NCHUNKS + ks[None, :], mask=kmask, other=0.0), axis=1) / N
        mean = tl.load(MEAN + rows64, mask=rmask, other=0.0)
    rstd = tl.load(RSTD + rows64, mask=rmask, other=0.0)
    w = _load_param(W, cols, cmask, HAS_W)
    bias = _load_param(B, cols, cmask, HAS_B)
    dz, xhat = _bwd_tile(XS, DY, w, bias, mean, rstd, rows64, cols, mask, sxs, sdy_r, sdy_c, "evict_first",
                         HAS_W, HAS_B, ACT)
    g = dz * w[None, :] if HAS_W else dz
    dx = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
    if HAS_DS:
        dx += tl.load(DS + rows64[:, None] * sds_r + cols[None, :] * sds_c, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + rows64[:, None] * sdx + cols[None, :], _to(dx, DX.dtype.element_ty), mask=mask)


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


# ---- launch helpers ------------------------------------------------------------------------

def _warps(elems: int) -> int:
    return max(1, min(16 if elems <= 16384 else 32, elems // 512))


def _rows_per_program(n_block: int, m: int) -> int:
    rows = max(1, min(CONFIG.max_rows, CONFIG.row_elems // n_block))
    return min(next_power_of_2(max(m, 1)), 1 << (rows.bit_length() - 1))


# `FUSEDOPS_NORM_FWD` ("rows,warps", e.g. "4,8") overrides the on-chip forward's launch shape
# for experiments (bench/sweep_norm_bwd.py --fwd).
_FWD_OVERRIDE = os.environ.get("FUSEDOPS_NORM_FWD")
# `FUSEDOPS_NORM_FINALIZE` ("columns,partial rows,warps,stages") overrides the dW/dB partial-row
# sum's launch shape, for experiments.
_FINALIZE_OVERRIDE = os.environ.get("FUSEDOPS_NORM_FINALIZE")


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
    step (4-32 a thread), num_warps, STAGES-deep pipelined loads, W_IN_LOOP (w/b re-read per
    step instead of held); or (split) of the split kernel, BLOCK_N columns a program; or
    (twopass) of the two-pass backward's first pass, BLOCK_N its column chunk."""
    rows: int
    block_n: int
    num_warps: int
    stages: int = 1
    w_in_loop: bool = False
    twopass: bool = False   # the two-pass kernels; rows, block_n (the column chunk), num_warps,
    #                         stages: the first pass's shape
    per_sm: int = 0         # > 0: at most this many programs an SM (fewer dW/dB partial rows); 0: as
    #                         many as are resident
    row_acc: bool = False   # one dW/dB accumulator row summed over each step's rows, not a tile
    prefetch: bool = False  # the next step's s and dy loaded into registers before this step's work
    split: int = 1          # > 1: norm_act_bwd_split_kernel, this many programs a row (block_n columns each)
    poll_ld: bool = True    # (split) the exchange words polled by volatile loads, not atomics


# Rows padded to fewer than CONFIG.twopass_block elements run the on-chip backward; 16-bit
# rows padded to twopass_block the split kernel (two programs a row); the others the two
# passes.
# `FUSEDOPS_NORM_BWD` overrides the shape for experiments (benchmark sweeps):
# "rows,warps,stages[,per_sm[,opts]]" (e.g. "1,16,2", "1,8,1,0,pw") the on-chip kernel's
# below twopass_block, with the accumulator row (row_acc), opts "p" prefetch, "w"
# w_in_loop; "2p:rows,chunk,warps,stages[,p]" (p: prefetch) the two passes, with this first
# pass, for every row from twopass_block up (below it ignored); "x:block,warps[,opts]" the
# split kernel, block columns a program, for every row (GPU only), opts "w" w_in_loop, "a"
# the exchange polled by atomics.
SMALL_BWD_ELEMS = 1 << 17   # at most this many elements: one program, dW/dB written directly
_BWD_OVERRIDE = os.environ.get("FUSEDOPS_NORM_BWD")


def _override_fields(text: str) -> tuple[list[int], str]:
    """The integer fields of a FUSEDOPS_NORM_BWD shape and its option letters (the field after
    the integers, "" if none)."""
    fields = text.split(",")
    ints = [int(t) for t in fields if t.isdigit()]
    return ints, ",".join(fields[len(ints):])


def twopass_config(n: int, m: int, elem_bytes: int = 2) -> BwdConfig:
    """First-pass shape of the two-pass backward: 1 row x 4096 columns a step on 8 warps (16
    elements a thread); for 16-bit s and dy the next row's chunk prefetched into registers
    (H100, LN+GELU(tanh) bf16 32768 x 16384, 2026-12-05: first pass 1082.0 µs against 1298.5
    with loads pipelined 2 deep, 1195.3 with w and b re-read per row as well, 1402.7 on 16
    warps), else loads pipelined 2 deep; `FUSEDOPS_NORM_BWD`
    "2p:rows,block,warps,stages[,opts]" overrides it."""
    if _BWD_OVERRIDE and _BWD_OVERRIDE.startswith("2p:"):
        (r, blk, w, st), opts = _override_fields(_BWD_OVERRIDE[3:])
        return BwdConfig(rows=min(r, next_power_of_2(max(m, 1))), block_n=min(blk, next_power_of_2(n)),
                         num_warps=w, stages=st, twopass=True, prefetch="p" in opts)
    block = min(next_power_of_2(n), 4096)
    if INTERPRET:
        return BwdConfig(rows=1, block_n=block, num_warps=4, twopass=True)
    prefetch = elem_bytes <= 2
    return BwdConfig(rows=1, block_n=block, num_warps=max(1, min(8, block // 512)), stages=1 if prefetch else 2,
                     twopass=True, prefetch=prefetch)


def bwd_config(n: int, m: int, has_b: bool = True, elem_bytes: int = 2) -> BwdConfig:
    """Launch shape of the backward for rows of n, m rows, with or without a bias;
    elem_bytes: the wider element of s and dy (the prefetch holds one more tile of each)."""
    block = next_power_of_2(n)
    two_pass_forced = (_BWD_OVERRIDE or "").startswith("2p:")  # (a sweep of the first pass)
    if _BWD_OVERRIDE and _BWD_OVERRIDE.startswith("x:") and not INTERPRET:
        (blk, w), opts = _override_fields(_BWD_OVERRIDE[2:])
        blk = min(blk, block)
        return BwdConfig(rows=1, block_n=blk, num_warps=w, prefetch=True, w_in_loop="w" in opts,
                         split=block // blk, poll_ld="a" not in opts)
    if block == CONFIG.twopass_block and elem_bytes <= 2 and not INTERPRET and not two_pass_forced:
        # 16-bit rows padded to 16384: the kernel of 8192 below, two programs a row exchanging
        # each row's sums (s and dy read once; the two passes read them twice). H100,
        # LN+GELU(tanh) bf16, backward kernels: 32768 x 16384 1515.3-1516.7 µs with the
        # partner's words polled by volatile loads (2026-12-06), 1732.5 polled by atomics,
        # 2185.3 for the two passes (2026-12-05); 8192 x 32768 (four programs a row, atomics)
        # 1140.5 against 1134.1; 4096 x 65536 (eight) 1678.1 against 1188.5: each row waits
        # on more partners, read one after another. Not under the interpreter, which runs
        # programs one after another: the first would wait forever for its partner.
        return BwdConfig(rows=1, block_n=8192, num_warps=16, prefetch=True, split=2)
    if block >= CONFIG.twopass_block:
        return twopass_config(n, m, elem_bytes)
    if _BWD_OVERRIDE and not INTERPRET and not two_pass_forced:
        ints, opts = _override_fields(_BWD_OVERRIDE)  # opts "p": prefetch, "w": w/b re-read per step
        r, w, st, ps = (ints + [0])[:4]  # per_sm 0 unless given
        return BwdConfig(rows=min(r, next_power_of_2(max(m, 1))), block_n=block, num_warps=w, stages=st,
                         per_sm=ps, row_acc=True, prefetch="p" in opts, w_in_loop="w" in opts)
    if INTERPRET:  # (both accumulator forms, and both load forms, under test)
        return BwdConfig(rows=_rows_per_program(block, m), block_n=block, num_warps=4, row_acc=block >= 512,
                         prefetch=block >= 1024)
    if 512 <= block <= 2048 and m * n > SMALL_BWD_ELEMS:
        # 4 warps, loads pipelined 2 deep, 1 row of 512 or 2 of 1024-2048, one accumulator row:
        # 4 warps x 32 lanes x 8 bf16 span 1024 columns, so the tile's rows sit in the same
        # threads and the step's dW/dB row sum needs no shared memory. H100 sweep
        # (bench/sweep_norm_bwd.py, LN+GELU(tanh) bf16 32768 rows, µs with the finalize,
        # 2026-12-05; the earlier shapes, with this accumulator, in brackets): 2048 178 (2 x 2048
        # on 8 warps, 1 stage: 243), 1024 96 (2 x 1024, 1 stage: 105), 512 74 (4 x 512, 1 stage:
        # 135). The earlier shapes with the accumulator tile, kernel sums with L2 warm: 200 at
        # 2048 and 104 at 1024 (now 174 and 92).
        rows = min(2 if block >= 1024 else 1, next_power_of_2(max(m, 1)))
        return BwdConfig(rows=rows, block_n=block, num_warps=4, stages=2, row_acc=True)
    if block in (4096, 8192):
        # 1 row on 8 / 16 warps (16 elements a thread), the next row's s and dy loaded into
        # registers before this row's work (2 stages instead: 153 registers at 4096, one
        # program an SM); at 4096 w and b re-read per row (128 registers: two programs an SM;
        # held, 165). H100, LN+GELU(tanh) 32768 rows, backward kernel (2026-12-05): bf16
        # 4096 345.3 µs against 391.3 without the prefetch, 8192 620.4 against 843.8
        # (with w and b re-read: 686.1); fp32 4096 639.3 against 651.1, 8192 1336.4 against
        # 1429.0 (the prefetched tile spills there, and is still faster).
        return BwdConfig(rows=1, block_n=block, num_warps=block // 512, row_acc=True, prefetch=True,
                         w_in_loop=block == 4096)
    # Below 512 (rows spread over warps) and small problems (one program: more rows a step,
    # fewer steps): 16 elements a thread (two 16-byte loads of bf16), ROWS x BLOCK_N ~ 2048 up
    # to 1024 and 4096 above, an accumulator tile.
    tile = max(2048 if block <= 1024 else 4096, block)
    rows = min(tile // block, next_power_of_2(max(m, 1)))
    return BwdConfig(rows=rows, block_n=block, num_warps=min(32, tile // 512))


_OCCUPANCY: dict = {}
MAX_WARPS_SM = 64  # resident warps an SM (sm_80 / sm_90): no more programs than this allows


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
        occ = max(1, min(by_regs, by_smem, MAX_WARPS_SM // num_warps, 32))  # (32: the SM's block limit)
    except Exception:  # keep the estimate
        pass
    _OCCUPANCY[key] = occ
    return occ


def _finalize(dwp, dbp, dw, db, n: int) -> None:
    part = dwp if dwp is not None else dbp
    p = part.shape[0]
    # Rows of n <= 4096: 16 columns a program (more programs), 32 partial rows a step, loads
    # not pipelined; longer rows: 64 columns, 64 partial rows, pipelined 3 deep. H100,
    # LN+GELU(tanh) bf16 32768 rows, the kernel in the fwd+bwd (656 / 391 / 263 partial rows
    # at 1024 / 2048 / 4096) against the earlier shapes (16 / 16 / 32 columns, 64 partial
    # rows, 3 stages): 6.9 / 5.2 / 5.1 µs against 7.2 / 5.3 / 8.5. bench/sweep_partials_sum.py
    # (L2 flushed, launch included) at 4096: the old shape 16.6 µs, 16 columns / 32 rows / 1
    # stage 11.1, 64 / 64 / 1 11.4.
    if INTERPRET:
        block_c, block_p, meta = min(next_power_of_2(n), 256), min(64, next_power_of_2(p)), dict(num_warps=4)
    elif n <= 4096:
        block_c, block_p, meta = 16, min(32, next_power_of_2(p)), dict(num_warps=4, num_stages=1)
    else:
        block_c, block_p, meta = 64, min(64, next_power_of_2(p)), dict(num_warps=4)
    if _FINALIZE_OVERRIDE:
        block_c, block_p, warps, stages = (int(t) for t in _FINALIZE_OVERRIDE.split(","))
        meta = dict(num_warps=warps, num_stages=stages)
    block_c = min(block_c, next_power_of_2(n))
    launch(partials_sum_kernel, (cdiv(n, block_c),),
        dwp if dwp is not None else dbp, dbp if dbp is not None else dwp, dw if dw is not None else db,
        db if db is not None else dw, p, n, HAS_W=dwp is not None, HAS_B=dbp is not None, BLOCK_P=block_p,
        BLOCK_C=block_c, **meta)


def _plan(kernel, args, meta, key, cfg, blocks: int, per: int, xs, m: int, n: int, dw, db):
    """(programs, row blocks a program, dW and dB outputs of the programs) of a persistent
    launch over `blocks` row blocks, `per` programs sharing a row range (the first pass's
    column chunks): as many as are resident at once (SMs x programs an SM of the compiled
    kernel, at most cfg.per_sm when set), the interpreter's cap, or one for small problems;
    no program without rows. One program writes dW/dB directly in the parameters' dtypes,
    more write one fp32 partial row each. The row-block count in args must not be 1 (an int
    argument of 1 is compiled as a constant: another kernel than the one launched)."""
    if INTERPRET:
        p = max(1, min(blocks, CONFIG.interp_programs))
    elif m * n <= SMALL_BWD_ELEMS:
        p = 1
    else:
        occ = _OCCUPANCY.get(key)
        if occ is None:
            occ = _ctas_per_sm(kernel.warmup(*args, grid=(1,), **meta), key, cfg.num_warps, xs.device)
        if cfg.per_sm:
            occ = min(occ, cfg.per_sm)
        p = max(1, min(blocks, sm_count(xs.device) * occ // per))
    bpp = cdiv(blocks, p)
    p = cdiv(blocks, bpp)
    if p == 1:
        return p, bpp, dw, db
    rows = [xs.new_empty((p, n), dtype=torch.float32) if t is not None else None for t in (dw, db)]
    return p, bpp, rows[0], rows[1]


def _bwd_twopass(cfg, ptrs, ds, sds, dx, dw, db, flags, dy, xs, m: int, n: int) -> None:
    """The two-pass backward: norm_act_bwd_sums_kernel (grid: P row ranges x column chunks;
    dW/dB partial rows, the rows' per-chunk sums) then norm_act_bwd_dx_kernel (one program a
    row x 4096 columns)."""
    rstd = ptrs[5]
    nchunks = cdiv(n, cfg.block_n)
    blocks = cdiv(m, cfg.rows)
    c1 = xs.new_empty((m, nchunks), dtype=torch.float32) if not flags["RMS"] else rstd
    c2 = xs.new_empty((m, nchunks), dtype=torch.float32)
    args = [*ptrs, rstd, rstd, c1, c2, m, n, 2, dy.stride(0), dy.stride(1), xs.stride(0)]
    meta = dict(ROWS=cfg.rows, BLOCK_N=cfg.block_n, STAGES=cfg.stages, PREFETCH=cfg.prefetch,
                num_warps=cfg.num_warps, num_stages=cfg.stages, **flags)
    key = (cfg, xs.dtype, dy.dtype, dy.stride(1) == 1, ptrs[2].dtype, ptrs[3].dtype, tuple(sorted(flags.items())),
           xs.device.index)
    p, bpp, dwp, dbp = _plan(norm_act_bwd_sums_kernel, args, meta, key, cfg, blocks, nchunks, xs, m, n, dw, db)
    args[6] = dwp if dwp is not None else rstd
    args[7] = dbp if dbp is not None else rstd
    args[12] = bpp
    launch(norm_act_bwd_sums_kernel, (p, nchunks), *args, **meta)
    block2 = min(next_power_of_2(n), 4096)
    launch(norm_act_bwd_dx_kernel, (m, cdiv(n, block2)), *ptrs, ds if ds is not None else rstd, dx, c1, c2, m, n,
           nchunks, dy.stride(0), dy.stride(1), xs.stride(0), *sds, dx.stride(0), ROWS=1, BLOCK_N=block2,
           BLOCK_K=next_power_of_2(nchunks), HAS_DS=ds is not None, num_warps=4 if INTERPRET else block2 // 512,
           **flags)
    if p > 1 and (dw is not None or db is not None):
        _finalize(dwp, dbp, dw, db, n)


def _bwd_split(cfg, ptrs, ds, sds, dx, dw, db, flags, dy, xs, m: int, n: int) -> None:
    """norm_act_bwd_split_kernel: P row groups of cfg.split programs each (as many as are
    resident at once), launched cooperatively; then the P dW/dB partial rows summed."""
    dummy = ptrs[5]
    # the groups' exchange words, zero (a tag of 0 is no step's), for as many groups as can be
    # resident (_plan launches no more), allocated per call: stream-ordered, and inside a
    # captured graph re-zeroed on every replay
    groups = max(1, min(m, sm_count(xs.device) * (MAX_WARPS_SM // cfg.num_warps) // cfg.split))
    xch = torch.zeros(groups * 2 * cfg.split * 2, dtype=torch.int64, device=xs.device)
    args = [*ptrs, ds if ds is not None else dummy, dx, dummy, dummy, xch, m, n, 2,
            dy.stride(0), dy.stride(1), xs.stride(0), *sds, dx.stride(0)]
    meta = dict(BLOCK_N=cfg.block_n, HAS_DS=ds is not None, SPLIT=cfg.split, W_IN_LOOP=cfg.w_in_loop,
                LD=cfg.poll_ld, num_warps=cfg.num_warps, num_stages=1, launch_cooperative_grid=True, **flags)
    key = (cfg, xs.dtype, dy.dtype, dy.stride(1) == 1, ds is not None, ptrs[2].dtype, ptrs[3].dtype,
           tuple(sorted(flags.items())), xs.device.index)
    p, rows, dwp, dbp = _plan(norm_act_bwd_split_kernel, args, meta, key, cfg, m, cfg.split, xs, m, n, dw, db)
    assert p <= groups, (p, groups)
    args[8] = dwp if dwp is not None else dummy
    args[9] = dbp if dbp is not None else dummy
    args[13] = rows
    launch(norm_act_bwd_split_kernel, (p * cfg.split,), *args, **meta)
    if p > 1 and (dw is not None or db is not None):
        _finalize(dwp, dbp, dw, db, n)


def bwd(dy, xs, w, b, mean, rstd, ds, dx, act: str, rms: bool):
    """dy, ds (or None): 2-D (M, N), any strides; xs, dx: unit column stride. Writes dx;
    returns (dW, dB) in the parameters' dtypes (None where w/b is None)."""
    m, n = xs.shape
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
    cfg = bwd_config(n, m, b is not None, max(xs.element_size(), dy.element_size()))
    if cfg.twopass:
        _bwd_twopass(cfg, ptrs, ds, sds, dx, dw, db, flags, dy, xs, m, n)
        return dw, db
    if cfg.split > 1:
        _bwd_split(cfg, ptrs, ds, sds, dx, dw, db, flags, dy, xs, m, n)
        return dw, db
    blocks = cdiv(m, cfg.rows)
    args = [*ptrs, ds if ds is not None else dummy, dx, dummy, dummy, m, n, 2,
            dy.stride(0), dy.stride(1), xs.stride(0), *sds, dx.stride(0)]
    kernel = norm_act_bwd_kernel
    meta = dict(ROWS=cfg.rows, BLOCK_N=cfg.block_n, HAS_DS=ds is not None, STAGES=cfg.stages,
                W_IN_LOOP=cfg.w_in_loop, ROW_ACC=cfg.row_acc, PREFETCH=cfg.prefetch,
                num_warps=cfg.num_warps,
                num_stages=cfg.stages, **flags)
    key = (cfg, xs.dtype, dy.dtype, dy.stride(1) == 1, ds is not None, w is not None and w.dtype,
           b is not None and b.dtype, tuple(sorted(flags.items())), xs.device.index)
    p, bpp, dwp, dbp = _plan(kernel, args, meta, key, cfg, blocks, 1, xs, m, n, dw, db)
    args[8] = dwp if dwp is not None else dummy
    args[9] = dbp if dbp is not None else dummy
    args[12] = bpp
    launch(kernel, (p,), *args, **meta)
    if p > 1 and (w is not None or b is not None):
        _finalize(dwp, dbp, dw, db, n)
    return dw, db
