"""8-bit optimizer step (AdamW / Adam / Lion / SGD) over many tensors in one launch.

Each program handles BLOCKS quantization blocks of 256 elements of one tensor: it finds
its tensor by binary search over the table's program prefix sums, dequantizes the states
(code[c] * absmax), runs the fp32 update of fusedops.reference.optimizer_update_fp32
(same operation order; IEEE division and sqrt through div_rn / sqrt_rn), takes the new
block absmax, and requantizes by an 8-step binary search over the map's midpoints.
Memory per element (fp32 params, AdamW): p read+write 8 B, g 4 B, two codes read+write
4 B: 16 B; absmax traffic is 16 B per 256 elements.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import INTERPRET, TL_DTYPE

QBLOCK = 256
KIND_ID = {"adamw": 0, "adam": 1, "lion": 2, "sgd": 3}
# Quantization blocks per program, and warps: 4 blocks (1024 elements) per program on GPU;
# under the interpreter few, large programs (each program costs ~2 ms there).
BLOCKS, NUM_WARPS = (16, 4) if INTERPRET else (4, 4)


def blocks_per_program() -> int:
    return BLOCKS


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
def _normalise(x, absmax):
    safe = tl.where(absmax == 0.0, 1.0, absmax)
    return tl.where(absmax == 0.0, 0.0, tl.math.div_rn(x, safe))


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
def _step_tile(p_ptr, g_ptr, s1_addr, a1_ptr, s2_addr, a2_ptr, flags, blk, offs, mask, bmask, qm_ptr, qt_ptr,
               lr, beta1, omb1, beta2, omb2, eps, wd, decay, step_size, bc2_sqrt,
               KIND: tl.constexpr, P_DTYPE: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
               ROUND_BF16: tl.constexpr, MASKED: tl.constexpr):
    # MASKED=False: every element of the tile is in the tensor (no masks: the loads and
    # stores can be vectorised when the addresses are known to be aligned).
    g = _ld(g_ptr + offs, mask, 0.0, MASKED).to(tl.float32)
    p = _ld(p_ptr + offs, mask, 0.0, MASKED).to(tl.float32)
    if (flags & 1) != 0:
        m = _ld(s1_addr.to(tl.pointer_type(tl.float32)) + offs, mask, 0.0, MASKED)
    else:
        c1 = _ld(s1_addr.to(tl.pointer_type(tl.uint8)) + offs, mask, 127, MASKED).to(tl.int32)
        am1 = _ld(a1_ptr + blk, bmask, 0.0, MASKED)
        m = tl.load(qm_ptr + c1) * am1[:, None]
    v = m  # (Lion / SGD: unused)
    if KIND <= 1:
        if (flags & 2) != 0:
            v = _ld(s2_addr.to(tl.pointer_type(tl.float32)) + offs, mask, 0.0, MASKED)
        else:
            c2 = _ld(s2_addr.to(tl.pointer_type(tl.uint8)) + offs, mask, 0, MASKED).to(tl.int32)
            am2 = _ld(a2_ptr + blk, bmask, 0.0, MASKED)
            v = tl.load(qm_ptr + 512 + c2) * am2[:, None]

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
        denom = tl.math.div_rn(tl.sqrt_rn(vn), bc2_sqrt) + eps
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
    if ROUND_BF16:  # the interpreter truncates fp32 -> bf16: round to nearest even first
        bits = p.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        p = bits.to(tl.float32, bitcast=True)
    _st(p_ptr + offs, p.to(P_DTYPE), mask, MASKED)

    if (flags & 1) != 0:
        _st(s1_addr.to(tl.pointer_type(tl.float32)) + offs, m, mask, MASKED)
    else:
        new1 = tl.max(tl.abs(m), axis=1)
        q1 = _quantize(_normalise(m, new1[:, None]), qt_ptr + _SIGNED_TABLE)
        _st(s1_addr.to(tl.pointer_type(tl.uint8)) + offs, q1.to(tl.uint8), mask, MASKED)
        _st(a1_ptr + blk, new1, bmask, MASKED)
    if KIND <= 1:
        if (flags & 2) != 0:
            _st(s2_addr.to(tl.pointer_type(tl.float32)) + offs, v, mask, MASKED)
        else:
            new2 = tl.max(v, axis=1)
            q2 = _quantize(_normalise(v, new2[:, None]), qt_ptr + _UNSIGNED_TABLE)
            _st(s2_addr.to(tl.pointer_type(tl.uint8)) + offs, q2.to(tl.uint8), mask, MASKED)
            _st(a2_ptr + blk, new2, bmask, MASKED)


@triton.jit
def optim8bit_kernel(table_ptr, count, qm_ptr, qt_ptr, lr, beta1, omb1, beta2, omb2, eps, wd, decay, step_size, bc2_sqrt,
                     KIND: tl.constexpr, P_DTYPE: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
                     BLOCKS: tl.constexpr, SEARCH_STEPS: tl.constexpr, ROUND_BF16: tl.constexpr,
                     ALIGNED: tl.constexpr):
    # table (int64 [9, count + 1]): p, g, state1, absmax1, state2, absmax2 addresses, numel,
    # flags (1: state1 is fp32, 2: state2 is fp32), first program of each tensor.
    # ALIGNED: every address is 16-byte aligned (full tiles then use 16-byte accesses).
    pid = tl.program_id(0).to(tl.int64)
    stride = count + 1
    lo = 0
    hi = count - 1
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        take = tl.load(table_ptr + 8 * stride + mid) <= pid
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid - 1)
    t = lo
    p_addr = tl.load(table_ptr + t)
    g_addr = tl.load(table_ptr + stride + t)
    s1_addr = tl.load(table_ptr + 2 * stride + t)
    s2_addr = tl.load(table_ptr + 4 * stride + t)
    if ALIGNED:
        p_addr = tl.multiple_of(p_addr, 16)
        g_addr = tl.multiple_of(g_addr, 16)
        s1_addr = tl.multiple_of(s1_addr, 16)
        s2_addr = tl.multiple_of(s2_addr, 16)
    p_ptr = p_addr.to(tl.pointer_type(P_DTYPE))
    g_ptr = g_addr.to(tl.pointer_type(P_DTYPE))
    a1_ptr = tl.load(table_ptr + 3 * stride + t).to(tl.pointer_type(tl.float32))
    a2_ptr = tl.load(table_ptr + 5 * stride + t).to(tl.pointer_type(tl.float32))
    n = tl.load(table_ptr + 6 * stride + t)
    flags = tl.load(table_ptr + 7 * stride + t)
    first = (pid - tl.load(table_ptr + 8 * stride + t)) * BLOCKS
    blk = first + tl.arange(0, BLOCKS)
    offs = blk[:, None] * 256 + tl.arange(0, 256)[None, :]
    mask = offs < n
    bmask = blk * 256 < n
    if (first + BLOCKS) * 256 <= n:
        _step_tile(p_ptr, g_ptr, s1_addr, a1_ptr, s2_addr, a2_ptr, flags, blk, offs, mask, bmask, qm_ptr, qt_ptr,
                   lr, beta1, omb1, beta2, omb2, eps, wd, decay, step_size, bc2_sqrt,
                   KIND, P_DTYPE, FIRST, NESTEROV, ROUND_BF16, False)
    else:
        _step_tile(p_ptr, g_ptr, s1_addr, a1_ptr, s2_addr, a2_ptr, flags, blk, offs, mask, bmask, qm_ptr, qt_ptr,
                   lr, beta1, omb1, beta2, omb2, eps, wd, decay, step_size, bc2_sqrt,
                   KIND, P_DTYPE, FIRST, NESTEROV, ROUND_BF16, True)


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
                     int(f1) | (2 * int(f2)), programs])
        programs += triton.cdiv(triton.cdiv(p.numel(), QBLOCK), bpp)
    aligned = all(a % 16 == 0 for col in cols for a in col[:6])
    cols.append([0] * 7 + [int(aligned), programs])
    return torch.tensor(cols, dtype=torch.int64).t().contiguous()


def optim8bit_step_(table: torch.Tensor, programs: int, aligned: bool, qmaps: torch.Tensor, kind: str,
                    p_dtype: torch.dtype, h: dict, first: bool, nesterov: bool) -> None:
    """One launch over every tensor of `table` (on the tensors' device); `programs` and
    `aligned` come from the host copy of its last column, so that no sync is needed."""
    if programs == 0:
        return
    count = table.shape[1] - 1
    optim8bit_kernel[(programs,)](
        table, count, qmaps, qmaps.view(torch.int32), h["lr"], h["beta1"], h["one_minus_beta1"], h["beta2"], h["one_minus_beta2"], h["eps"],
        h["weight_decay"], h["decay"], h["step_size"], h["bc2_sqrt"],
        KIND=KIND_ID[kind], P_DTYPE=TL_DTYPE[p_dtype], FIRST=bool(first), NESTEROV=bool(nesterov), BLOCKS=BLOCKS,
        SEARCH_STEPS=max(1, (count - 1).bit_length()),
        ROUND_BF16=INTERPRET and p_dtype == torch.bfloat16, ALIGNED=aligned, num_warps=NUM_WARPS)


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
    _codes_kernel[(triton.cdiv(n, block),)](x, out, n, table, BLOCK=block)
