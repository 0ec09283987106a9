"""8-bit optimizer step (AdamW / Adam / Lion / SGD) over many tensors in one launch.

Each program handles BLOCKS * ITERS quantization blocks of 256 elements of one tensor: it
finds its tensor by binary search over the table's program prefix sums, dequantizes the
states (code[c] * absmax), runs the fp32 update of fusedops.reference.optimizer_update_fp32
(same operation order; IEEE division and sqrt through div_rn / sqrt_rn), optionally rounds
bf16 params stochastically, takes the new block absmax, and requantizes with one lookup in
the map's bucket table (fusedops.ops.optim8bit.bucket_table) per element.
Memory per element (fp32 params, AdamW): p read+write 8 B, g 4 B, two codes read+write
4 B: 16 B; absmax traffic is 16 B per 256 elements.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import INTERPRET, TL_DTYPE
from ._launch import cdiv, launch
from ._multi_tensor import find_tensor, search_steps

QBLOCK = 256
KIND_ID = {"adamw": 0, "adam": 1, "lion": 2, "sgd": 3}
# A program handles ITERS tiles of BLOCKS quantization blocks of one tensor. On GPU a tile
# is one block ([1, 256], 2 warps: 4 elements per thread, so that fp32 / bf16 / uint8
# accesses share one layout: 16-byte fp32 loads, no layout conversions through shared
# memory) and a program loops over 8 of them; under the interpreter one large tile (each
# program instance costs ~2 ms there).
BLOCKS, ITERS, NUM_WARPS = (16, 1, 4) if INTERPRET else (1, 8, 2)
# Normalising division by a per-block reciprocal (see _normalise); the interpreter's fma is
# not fused, so it divides.
FAST_DIV = not INTERPRET


def blocks_per_program() -> int:
    return BLOCKS * ITERS


# The quantizer's bucket tables (fusedops.ops.optim8bit.bucket_table; csrc/optim8bit.h quantize).
BUCKET_BASE = (104 << 7) - 1
BUCKETS = (127 << 7) - BUCKET_BASE + 1
SIGNED_TABLE, UNSIGNED_TABLE = 1024, 1024 + 2 * BUCKETS
_BASE, _NB = tl.constexpr(BUCKET_BASE), tl.constexpr(BUCKETS)
_SIGNED_TABLE, _UNSIGNED_TABLE = tl.constexpr(SIGNED_TABLE), tl.constexpr(UNSIGNED_TABLE)


@triton.jit
def _quantize(x, table_ptr):
    # number of midpoints strictly below x (ties to the lower code; the signed map's sign
    # rule is in its table): one lookup in the bucket of |x| (bits >> 16) and one integer
    # comparison with the mantissa of the bucket's midpoint
    u = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    neg = x < 0.0
    k = tl.minimum(tl.maximum((u >> 16) - _BASE, 0), _NB - 1)
    e = tl.load(table_ptr + tl.where(neg, k + _NB, k))
    mant = (u & 0x7FFFFF) ^ tl.where(neg, 0x7FFFFF, 0)
    return (e >> 23) + tl.where(mant > (e & 0x7FFFFF), 1, 0)


@triton.jit
def _normalise(x, absmax, FAST_DIV: tl.constexpr):
    # x / absmax, IEEE-rounded (an all-zero block gives 0). FAST_DIV: nvcc's division fast
    # path with the reciprocal of the block computed once (y = 1 / absmax, q0 = x y,
    # q = q0 + (x - absmax q0) y with exact fma remainders): correctly rounded while no
    # intermediate leaves the normal range, which is checked conservatively (as in the
    # CUDA kernel, csrc/cuda/optim8bit.cu BlockDiv); a tile with an element outside takes
    # div_rn for those elements. x = -0 may give +0 (same code).
    safe = tl.where(absmax == 0.0, 1.0, absmax)
    if FAST_DIV:
        y = tl.math.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe)
        q0 = x * y
        q = tl.fma(y, tl.fma(-q0, safe, x), q0)
        inside = (safe >= 8.673617379884035e-19) & (safe <= 1.152921504606847e+18)
        lo = tl.where(inside, tl.maximum(safe * 8.881784197001252e-16, 8.077935669463161e-28), float("inf"))
        a = tl.abs(x)
        fast = ((a >= lo) & (a <= safe * 1125899906842624.0)) | (x == 0.0)
        if tl.min(fast.to(tl.int32)) == 0:
            q = tl.where(fast, q, tl.math.div_rn(x, safe))
    else:
        q = tl.math.div_rn(x, safe)
    return tl.where(absmax == 0.0, 0.0, q)


@triton.jit
def _ld(ptrs, mask, other, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptrs, mask=mask, other=other)
    else:
        return tl.load(ptrs)


@triton.jit
def _st(ptrs, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptrs, value, mask=mask)
    else:
        tl.store(ptrs, value)


@triton.jit
def _fmix32(x):
    # murmur3's finaliser on uint32 (csrc/optim8bit.h fmix32; literals >= 2^31 are uint32)
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def _round_bf16_stochastic(p, offs, tensor_key):
    # csrc/optim8bit.h round_bf16_stochastic with sr_bits(tensor_key, element index)
    rnd = _fmix32(tensor_key + offs.to(tl.uint32) * 0x9E3779B9)
    b = p.to(tl.uint32, bitcast=True)
    r = (b + (rnd & 0xFFFF)) & 0xFFFF0000
    r = tl.where((b & 0x7F800000) == 0x7F800000, b, r)
    return r.to(tl.float32, bitcast=True)


@triton.jit
def _bcast(v, BLOCKS: tl.constexpr):
    # per-block values ([BLOCKS], a scalar when BLOCKS == 1) -> one per element of the tile
    if BLOCKS == 1:
        return v
    else:
        return tl.reshape(tl.broadcast_to(v[:, None], (BLOCKS, 256)), (BLOCKS * 256,))


@triton.jit
def _block_max(x, BLOCKS: tl.constexpr):
    if BLOCKS == 1:
        return tl.max(x, axis=0)
    else:
        return tl.max(tl.reshape(x, (BLOCKS, 256)), axis=1)


@triton.jit
def _ld_blocks(ptr, first, bmask, BLOCKS: tl.constexpr):
    if BLOCKS == 1:  # the tile is inside the tensor
        return tl.load(ptr + first)
    else:
        return tl.load(ptr + first + tl.arange(0, BLOCKS), mask=bmask, other=0.0)


@triton.jit
def _st_blocks(ptr, first, value, bmask, BLOCKS: tl.constexpr):
    if BLOCKS == 1:
        tl.store(ptr + first, value)
    else:
        tl.store(ptr + first + tl.arange(0, BLOCKS), value, mask=bmask)


@triton.jit
def _step_tile(p_ptr, g_ptr, s1f, s1b, a1_ptr, s2f, s2b, a2_ptr, flags, first, offs, mask, bmask, qm_ptr, qt_ptr,
               lr, beta1, omb1, beta2, omb2, eps, wd, decay, step_size, inv_bc2_sqrt,
               KIND: tl.constexpr, P_DTYPE: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
               ROUND_BF16: tl.constexpr, MASKED: tl.constexpr, FAST_DIV: tl.constexpr, BLOCKS: tl.constexpr,
               SR: tl.constexpr, sr_tensor_key):
    # MASKED=False: every element of the tile is in the tensor (no masks: the loads and
    # stores can be vectorised when the addresses are known to be aligned).
    g = _ld(g_ptr + offs, mask, 0.0, MASKED).to(tl.float32)
    p = _ld(p_ptr + offs, mask, 0.0, MASKED).to(tl.float32)
    if (flags & 1) != 0:
        m = _ld(s1f + offs, mask, 0.0, MASKED)
    else:
        c1 = _ld(s1b + offs, mask, 127, MASKED).to(tl.int32)
        m = tl.load(qm_ptr + c1) * _bcast(_ld_blocks(a1_ptr, first, bmask, BLOCKS), BLOCKS)
    v = m  # (Lion / SGD: unused)
    if KIND <= 1:
        if (flags & 2) != 0:
            v = _ld(s2f + offs, mask, 0.0, MASKED)
        else:
            c2 = _ld(s2b + offs, mask, 0, MASKED).to(tl.int32)
            v = tl.load(qm_ptr + 512 + c2) * _bcast(_ld_blocks(a2_ptr, first, bmask, BLOCKS), BLOCKS)

    ok = (g == g) & (tl.abs(g) < float("inf"))
    g0 = tl.where(ok, g, 0.0)
    pn = p
    if KIND == 0 or KIND == 1:
        if KIND == 0:
            pn = p * decay
        else:
            g0 = g0 + wd * p
        mn = beta1 * m + omb1 * g0
        vn = beta2 * v + omb2 * (g0 * g0)
        denom = tl.sqrt_rn(vn) * inv_bc2_sqrt + eps
        pn = pn + (-step_size) * tl.math.div_rn(mn, denom)
        v = tl.where(ok & mask, vn, 0.0)
    elif KIND == 2:
        pn = p * decay
        c = beta1 * m + omb1 * g0
        u = tl.where(c > 0.0, 1.0, tl.where(c < 0.0, -1.0, 0.0))
        pn = pn + (-lr) * u
        mn = beta2 * m + omb2 * g0
    else:
        g0 = g0 + wd * p
        if FIRST:
            mn = g0
        else:
            mn = beta1 * m + omb2 * g0
        if NESTEROV:
            d = g0 + beta1 * mn
        else:
            d = mn
        pn = pn + (-lr) * d
    m = tl.where(ok & mask, mn, 0.0)
    p = tl.where(ok, pn, p)
    if SR:  # stochastic rounding to bf16 (the conversion below is then exact)
        p = _round_bf16_stochastic(p, offs, sr_tensor_key)
    if ROUND_BF16:  # the interpreter truncates fp32 -> bf16: round to nearest even first
        bits = p.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        p = bits.to(tl.float32, bitcast=True)
    _st(p_ptr + offs, p.to(P_DTYPE), mask, MASKED)

    if (flags & 1) != 0:
        _st(s1f + offs, m, mask, MASKED)
    else:
        new1 = _block_max(tl.abs(m), BLOCKS)
        q1 = _quantize(_normalise(m, _bcast(new1, BLOCKS), FAST_DIV), qt_ptr + _SIGNED_TABLE)
        _st(s1b + offs, q1.to(tl.uint8), mask, MASKED)
        _st_blocks(a1_ptr, first, new1, bmask, BLOCKS)
    if KIND <= 1:
        if (flags & 2) != 0:
            _st(s2f + offs, v, mask, MASKED)
        else:
            new2 = _block_max(v, BLOCKS)
            q2 = _quantize(_normalise(v, _bcast(new2, BLOCKS), FAST_DIV), qt_ptr + _UNSIGNED_TABLE)
            _st(s2b + offs, q2.to(tl.uint8), mask, MASKED)
            _st_blocks(a2_ptr, first, new2, bmask, BLOCKS)


@triton.jit
def optim8bit_kernel(table_ptr, count, qm_ptr, qt_ptr, lr, beta1, omb1, beta2, omb2, eps, wd, decay, step_size, inv_bc2_sqrt,
                     sr_key,
                     KIND: tl.constexpr, P_DTYPE: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
                     BLOCKS: tl.constexpr, ITERS: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                     ROUND_BF16: tl.constexpr, ALIGNED: tl.constexpr, FAST_DIV: tl.constexpr, SR: tl.constexpr):
    # table (int64 [10, count + 1]): p, g, state1, absmax1, state2, absmax2 addresses, numel,
    # flags (1: state1 is fp32, 2: state2 is fp32), first program of each tensor, its
    # position in the step's lists. SR: stochastic rounding of bf16 params with sr_key.
    # ALIGNED: every address is 16-byte aligned (full tiles then use 16-byte accesses).
    pid = tl.program_id(0).to(tl.int64)
    stride = count + 1
    t = find_tensor(table_ptr + 8 * stride, pid, count, SEARCH_STEPS)
    p_ptr = tl.load(table_ptr + t).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(table_ptr + stride + t).to(tl.pointer_type(P_DTYPE))
    s1_addr = tl.load(table_ptr + 2 * stride + t)
    s2_addr = tl.load(table_ptr + 4 * stride + t)
    s1f, s1b = s1_addr.to(tl.pointer_type(tl.float32)), s1_addr.to(tl.pointer_type(tl.uint8))
    s2f, s2b = s2_addr.to(tl.pointer_type(tl.float32)), s2_addr.to(tl.pointer_type(tl.uint8))
    if ALIGNED:  # the alignment hint goes on the pointers (an int hint is lost in the cast)
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        s1f, s1b = tl.multiple_of(s1f, 16), tl.multiple_of(s1b, 16)
        s2f, s2b = tl.multiple_of(s2f, 16), tl.multiple_of(s2b, 16)
    a1_ptr = tl.load(table_ptr + 3 * stride + t).to(tl.pointer_type(tl.float32))
    a2_ptr = tl.load(table_ptr + 5 * stride + t).to(tl.pointer_type(tl.float32))
    n = tl.load(table_ptr + 6 * stride + t)
    flags = tl.load(table_ptr + 7 * stride + t)
    base = (pid - tl.load(table_ptr + 8 * stride + t)) * (BLOCKS * ITERS)
    sr_tensor_key = 0
    if SR:
        index = tl.load(table_ptr + 9 * stride + t)
        sr_tensor_key = _fmix32(sr_key.to(tl.int64).to(tl.uint32) ^ ((index * 0x632BE5AB) & 0xFFFFFFFF).to(tl.uint32))
    for it in tl.range(0, ITERS):
        first = base + it * BLOCKS
        if first * 256 < n:
            offs = first * 256 + tl.arange(0, BLOCKS * 256)
            mask = offs < n
            bmask = (first + tl.arange(0, BLOCKS)) * 256 < n
            if (first + BLOCKS) * 256 <= n:
                _step_tile(p_ptr, g_ptr, s1f, s1b, a1_ptr, s2f, s2b, a2_ptr, flags, first, offs, mask, bmask, qm_ptr,
                           qt_ptr, lr, beta1, omb1, beta2, omb2, eps, wd, decay, step_size, inv_bc2_sqrt,
                           KIND, P_DTYPE, FIRST, NESTEROV, ROUND_BF16, False, FAST_DIV, BLOCKS, SR, sr_tensor_key)
            else:
                _step_tile(p_ptr, g_ptr, s1f, s1b, a1_ptr, s2f, s2b, a2_ptr, flags, first, offs, mask, bmask, qm_ptr,
                           qt_ptr, lr, beta1, omb1, beta2, omb2, eps, wd, decay, step_size, inv_bc2_sqrt,
                           KIND, P_DTYPE, FIRST, NESTEROV, ROUND_BF16, True, FAST_DIV, BLOCKS, SR, sr_tensor_key)


def table_py(params, grads, state1, absmax1, state2, absmax2, two: bool, bpp: int) -> torch.Tensor:
    """The table optim8bit_kernel reads, built in Python (fusedops builds the same table
    natively, fusedops_C::optim8bit_table, when its extension is there)."""
    cols, programs = [], 0
    for i, p in enumerate(params):
        if p.numel() == 0:
            continue
        f1 = state1[i].dtype == torch.float32
        f2 = two and state2[i].dtype == torch.float32
        addr = lambda t: t.data_ptr() if t.numel() else 0  # noqa: E731
        cols.append([p.data_ptr(), grads[i].data_ptr(), state1[i].data_ptr(), addr(absmax1[i]),
                     state2[i].data_ptr() if two else 0, addr(absmax2[i]) if two else 0, p.numel(),
                     int(f1) | (2 * int(f2)), programs, i])
        programs += cdiv(cdiv(p.numel(), QBLOCK), bpp)
    aligned = all(a % 16 == 0 for col in cols for a in col[:6])
    cols.append([0] * 7 + [int(aligned), programs, 0])
    return torch.tensor(cols, dtype=torch.int64).t().contiguous()


def optim8bit_step_(table: torch.Tensor, programs: int, aligned: bool, qmaps: torch.Tensor, kind: str,
                    p_dtype: torch.dtype, h: dict, first: bool, nesterov: bool, sr_key: int = -1) -> None:
    """One launch over every tensor of `table` (on the tensors' device); `programs` and
    `aligned` come from the host copy of its last column, so that no sync is needed."""
    if programs == 0:
        return
    count = table.shape[1] - 1
    launch(optim8bit_kernel, (programs,),
        table, count, qmaps, qmaps.view(torch.int32), h["lr"], h["beta1"], h["one_minus_beta1"], h["beta2"], h["one_minus_beta2"], h["eps"],
        h["weight_decay"], h["decay"], h["step_size"], h["inv_bc2_sqrt"], max(sr_key, 0),
        KIND=KIND_ID[kind], P_DTYPE=TL_DTYPE[p_dtype], FIRST=bool(first), NESTEROV=bool(nesterov), BLOCKS=BLOCKS, ITERS=ITERS,
        SEARCH_STEPS=search_steps(count),
        ROUND_BF16=INTERPRET and p_dtype == torch.bfloat16, ALIGNED=aligned, FAST_DIV=FAST_DIV,
        SR=sr_key >= 0 and p_dtype == torch.bfloat16, num_warps=NUM_WARPS)


@triton.jit
def _codes_kernel(x_ptr, out_ptr, n, table_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, _quantize(x, table_ptr).to(tl.uint8), mask=mask)


def codes_(x: torch.Tensor, out: torch.Tensor, qmaps: torch.Tensor, signed: bool) -> None:
    """The step kernel's quantizer alone (a test hook): out = codes of the fp32 x (already
    normalised), with the signed or unsigned map's bucket table."""
    n = x.numel()
    if n == 0:
        return
    block = 1 << 16 if INTERPRET else 1024
    table = qmaps.view(torch.int32)[SIGNED_TABLE if signed else UNSIGNED_TABLE:]
    launch(_codes_kernel, (cdiv(n, block),), x, out, n, table, BLOCK=block)
