"""BatchNorm2d (+ activation) kernels for a conv output y viewed as [N, C, HW].

y is addressed through strides (sN, sC, sHW): contiguous NCHW has sHW == 1 and
channels_last has sC == 1; Triton specialises a stride of 1, so both layouts get
contiguous accesses from one kernel. Every kernel tiles [BLOCK_M rows of (n, hw)] ×
[BLOCK_C channels]; a 2-D grid splits the M = N·HW rows into `splits` slices of
`rows_per_split` rows (a multiple of BLOCK_M) and the channels into blocks.

Reductions are deterministic: each program writes fp32 partials of its slice and a
finalize kernel (statistics) or a torch sum (backward) combines the slices in order.
Statistics: per tile an exact two-pass mean / M2 in registers, then Chan's combine
into the program's running (mean, M2); the finalize kernel Chan-combines the slices.

Memory-bound: stats read y once; apply reads y and writes z; backward reads (dz, y)
twice and writes dy once. H100 floor = bytes / 3.0 TB/s.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._activations import gelu_tanh, gelu_tanh_grad
from ._config import INTERPRET, sm_count
from ._launch import cdiv, launch, next_power_of_2
from .norm import _to  # fp32 -> z's / dy's dtype, rounded to nearest even under the interpreter too

ACT_CODES = {"identity": 0, "relu": 1, "relu6": 2, "silu": 3, "gelu": 4, "gelu_tanh": 5, "leaky_relu": 6}


@dataclasses.dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_c: int
    num_warps: int


def tile_config(c: int, channels_last: bool) -> TileConfig:
    if INTERPRET:  # few, large programs: each instance costs ~2 ms of host time
        return TileConfig(block_m=256, block_c=min(64, next_power_of_2(c)), num_warps=4)
    if channels_last:
        bc = min(64, next_power_of_2(c))
        return TileConfig(block_m=max(16, 4096 // bc) if bc < 64 else 64, block_c=bc, num_warps=4)
    return TileConfig(block_m=512, block_c=4 if c >= 4 else next_power_of_2(c), num_warps=4)


def split_rows(m: int, c_blocks: int, block_m: int, device: torch.device) -> tuple[int, int]:
    """(splits, rows_per_split): enough programs to fill the GPU, each with >= 4 tiles."""
    tiles = cdiv(m, block_m)
    if INTERPRET:
        target = 2
    else:
        sms = sm_count(device) if device.type == "cuda" else 8
        target = max(1, (sms * 4) // c_blocks)
    splits = max(1, min(target, tiles // 4 if tiles >= 8 else 1))
    tiles_per = cdiv(tiles, splits)
    splits = cdiv(tiles, tiles_per)
    return splits, tiles_per * block_m


@triton.jit
def _act(z, ACT: tl.constexpr, slope):
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = tl.minimum(tl.maximum(z, 0.0), 6.0)
    elif ACT == 3:
        z = z / (1.0 + tl.exp(-z))
    elif ACT == 4:
        z = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 5:
        z = gelu_tanh(z)
    elif ACT == 6:
        z = tl.where(z > 0, z, z * slope)
    return z


@triton.jit
def _act_grad(z, ACT: tl.constexpr, slope):
    if ACT == 0:
        d = tl.full(z.shape, 1.0, tl.float32)
    elif ACT == 1:
        d = tl.where(z > 0, 1.0, 0.0)
    elif ACT == 2:
        d = tl.where((z > 0) & (z < 6.0), 1.0, 0.0)
    elif ACT == 3:
        s = 1.0 / (1.0 + tl.exp(-z))
        d = s * (1.0 + z * (1.0 - s))
    elif ACT == 4:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        d = cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 5:
        d = gelu_tanh_grad(z)
    else:
        d = tl.where(z > 0, 1.0, slope)
    return d


@triton.jit
def _tile(rows, cols, M, C, HW, sN, sC, sHW):
    n = rows // HW
    hw = rows - n * HW
    off = n.to(tl.int64) * sN + hw.to(tl.int64) * sHW
    mask = (rows < M)[:, None] & (cols < C)[None, :]
    return off[:, None] + cols.to(tl.int64)[None, :] * sC, mask


@triton.jit
def _stats_tile(y_ptr, t, start, end, cols, C, HW, sN, sC, sHW, mean, m2, count, BLOCK_M: tl.constexpr):
    # exact two-pass (mean, M2) of one tile in registers, then Chan's combine
    r0 = start + t * BLOCK_M
    rows = r0 + tl.arange(0, BLOCK_M)
    offs, mask = _tile(rows, cols, end, C, HW, sN, sC, sHW)
    v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    k = tl.maximum(tl.minimum(end - r0, BLOCK_M), 0).to(tl.float32)  # 0 past the slice end
    t_mean = tl.sum(v, axis=0) / tl.maximum(k, 1.0)
    d = tl.where(mask, v - t_mean[None, :], 0.0)
    t_m2 = tl.sum(d * d, axis=0)
    total = tl.maximum(count + k, 1.0)
    delta = t_mean - mean
    mean = mean + delta * (k / total)
    m2 = m2 + t_m2 + delta * delta * (count * k / total)
    return mean, m2, count + k


@triton.jit
def bn_stats_partial_kernel(y_ptr, part_ptr, M, C, HW, sN, sC, sHW, rows_per_split,
                            BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, STATIC_TILES: tl.constexpr = 0):
    # part: fp32 [2, splits, C] = (mean, M2) of each slice of rows
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    splits = tl.num_programs(0)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    start = pid_m * rows_per_split
    end = tl.minimum(start + rows_per_split, M)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    count = tl.zeros([BLOCK_C], tl.float32)
    if STATIC_TILES > 0:  # see _static
        for t in tl.static_range(STATIC_TILES):
            mean, m2, count = _stats_tile(y_ptr, t, start, end, cols, C, HW, sN, sC, sHW, mean, m2, count, BLOCK_M)
    else:
        for t in range(0, rows_per_split // BLOCK_M):
            mean, m2, count = _stats_tile(y_ptr, t, start, end, cols, C, HW, sN, sC, sHW, mean, m2, count, BLOCK_M)
    cmask = cols < C
    tl.store(part_ptr + pid_m * C + cols, mean, mask=cmask)
    tl.store(part_ptr + (splits + pid_m) * C + cols, m2, mask=cmask)


@triton.jit
def _finalize_tile(part_ptr, t, M, C, splits, rows_per_split, cols, cmask, mean, m2, count,
                   BLOCK_S: tl.constexpr):
    # BLOCK_S slices at once: their exact combined (mean, M2) in registers (fixed-order
    # tree sums: deterministic), then Chan's combine into the running (mean, M2)
    s = t * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = s < splits
    k = tl.where(smask, tl.minimum(M - s * rows_per_split, rows_per_split), 0).to(tl.float32)
    mask = smask[:, None] & cmask[None, :]
    offs = s[:, None] * C + cols[None, :]
    s_mean = tl.load(part_ptr + offs, mask=mask, other=0.0)
    s_m2 = tl.load(part_ptr + splits * C + offs, mask=mask, other=0.0)
    kk = k[:, None] + tl.zeros_like(s_mean)
    t_count = tl.sum(kk, axis=0)
    t_mean = tl.sum(kk * s_mean, axis=0) / tl.maximum(t_count, 1.0)
    d = tl.where(mask, s_mean - t_mean[None, :], 0.0)
    t_m2 = tl.sum(s_m2 + kk * d * d, axis=0)
    total = tl.maximum(count + t_count, 1.0)
    delta = t_mean - mean
    mean = mean + delta * (t_count / total)
    m2 = m2 + t_m2 + delta * delta * (count * t_count / total)
    return mean, m2, count + t_count


@triton.jit
def bn_stats_finalize_kernel(part_ptr, mean_ptr, invstd_ptr, var_ptr, M, C, splits, rows_per_split, eps,
                             BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, STATIC_TILES: tl.constexpr = 0):
    # combines the slices' partials; programs over channel blocks, each reading BLOCK_S
    # slices per step (a few steps instead of one dependent load per slice)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    count = tl.zeros([BLOCK_C], tl.float32)
    if STATIC_TILES > 0:
        for t in tl.static_range(STATIC_TILES):
            mean, m2, count = _finalize_tile(part_ptr, t, M, C, splits, rows_per_split, cols, cmask, mean, m2,
                                             count, BLOCK_S)
    else:
        for t in range(0, tl.cdiv(splits, BLOCK_S)):
            mean, m2, count = _finalize_tile(part_ptr, t, M, C, splits, rows_per_split, cols, cmask, mean, m2,
                                             count, BLOCK_S)
    var = m2 / count
    tl.store(mean_ptr + cols, mean, mask=cmask)
    tl.store(var_ptr + cols, var, mask=cmask)
    tl.store(invstd_ptr + cols, 1.0 / tl.sqrt(var + eps), mask=cmask)


def _static(n: int) -> int:
    """Loop count as a constexpr under the interpreter: there (numpy >= 2.3) a loop bound
    read from a kernel argument fails, being a 1-element array. Compiled kernels get 0
    and keep the runtime bound, so there is no recompile per shape."""
    return n if INTERPRET else 0


def _view(t: torch.Tensor):
    n, c, h, w = t.shape
    return t.stride(0), t.stride(1), t.stride(3)


def bn_stats(y: torch.Tensor, eps: float, channels_last: bool, mean: torch.Tensor, invstd: torch.Tensor,
             var: torch.Tensor) -> None:
    """Writes fp32 [C] mean, invstd = rsqrt(var + eps) and the biased var of y."""
    n, c, h, w = y.shape
    m, hw = n * h * w, h * w
    cfg = tile_config(c, channels_last)
    c_blocks = cdiv(c, cfg.block_c)
    splits, rows_per = split_rows(m, c_blocks, cfg.block_m, y.device)
    part = y.new_empty((2, splits, c), dtype=torch.float32)
    sn, sc, shw = _view(y)
    launch(bn_stats_partial_kernel, (splits, c_blocks), y, part, m, c, hw, sn, sc, shw, rows_per,
           BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
           STATIC_TILES=_static(rows_per // cfg.block_m))
    fb = min(32, next_power_of_2(c))
    bs = min(64, next_power_of_2(splits))
    launch(bn_stats_finalize_kernel, (cdiv(c, fb),), part, mean, invstd, var, m, c, splits, rows_per, eps,
           BLOCK_S=bs, BLOCK_C=fb, num_warps=4, STATIC_TILES=_static(cdiv(splits, bs)))


@triton.jit
def _scale_shift(cols, C, mean_ptr, invstd_ptr, w_ptr, b_ptr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    cmask = cols < C
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32) if HAS_W else tl.full([cols.shape[0]], 1.0, tl.float32)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32) if HAS_B else tl.zeros([cols.shape[0]], tl.float32)
    return mean, invstd, w, b


@triton.jit
def _apply_tile(y_ptr, z_ptr, t, start, end, cols, C, HW, sN, sC, sHW, scale, shift, slope, ACT: tl.constexpr,
                BLOCK_M: tl.constexpr):
    rows = start + t * BLOCK_M + tl.arange(0, BLOCK_M)
    offs, mask = _tile(rows, cols, end, C, HW, sN, sC, sHW)
    v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = _act(v * scale[None, :] + shift[None, :], ACT, slope)
    tl.store(z_ptr + offs, _to(z, z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bn_act_apply_kernel(y_ptr, z_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, M, C, HW, sN, sC, sHW, slope,
                        rows_per_split, ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, STATIC_TILES: tl.constexpr = 0):
    # z has y's strides; z = act((y − mean)·invstd·w + b)
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mean, invstd, w, b = _scale_shift(cols, C, mean_ptr, invstd_ptr, w_ptr, b_ptr, HAS_W, HAS_B)
    scale = invstd * w
    shift = b - mean * scale
    start = pid_m * rows_per_split
    end = tl.minimum(start + rows_per_split, M)
    if STATIC_TILES > 0:
        for t in tl.static_range(STATIC_TILES):
            _apply_tile(y_ptr, z_ptr, t, start, end, cols, C, HW, sN, sC, sHW, scale, shift, slope, ACT, BLOCK_M)
    else:
        for t in range(0, rows_per_split // BLOCK_M):
            _apply_tile(y_ptr, z_ptr, t, start, end, cols, C, HW, sN, sC, sHW, scale, shift, slope, ACT, BLOCK_M)


def _grid(y: torch.Tensor, channels_last: bool, elementwise: bool):
    n, c, h, w = y.shape
    m = n * h * w
    cfg = tile_config(c, channels_last)
    c_blocks = cdiv(c, cfg.block_c)
    if elementwise and not INTERPRET:  # no reduction: one tile-row group per program
        rows_per = cfg.block_m * 4
        splits = cdiv(m, rows_per)
    else:
        splits, rows_per = split_rows(m, c_blocks, cfg.block_m, y.device)
    return cfg, c_blocks, splits, rows_per, m, h * w


def bn_act_apply(y, z, mean, invstd, weight, bias, act: str, slope: float, channels_last: bool) -> None:
    """z (same strides as y) = act((y − mean)·invstd·weight + bias)."""
    cfg, c_blocks, splits, rows_per, m, hw = _grid(y, channels_last, True)
    sn, sc, shw = _view(y)
    launch(bn_act_apply_kernel, (splits, c_blocks),
        y, z, mean, invstd, weight if weight is not None else mean, bias if bias is not None else mean,
        m, y.shape[1], hw, sn, sc, shw, slope, rows_per, ACT=ACT_CODES[act], HAS_W=weight is not None,
        HAS_B=bias is not None, BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
        STATIC_TILES=_static(rows_per // cfg.block_m))


@triton.jit
def _grad_tile(dz_ptr, y_ptr, t, start, end, cols, C, HW, sN, sC, sHW, dN, dC, dHW, mean, invstd, w, b, slope,
               ACT: tl.constexpr, BLOCK_M: tl.constexpr):
    # (g = dz·act'(z), ŷ, mask, y offsets) of one tile
    rows = start + t * BLOCK_M + tl.arange(0, BLOCK_M)
    offs, mask = _tile(rows, cols, end, C, HW, sN, sC, sHW)
    doffs, _ = _tile(rows, cols, end, C, HW, dN, dC, dHW)
    v = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dz = tl.load(dz_ptr + doffs, mask=mask, other=0.0).to(tl.float32)
    xhat = (v - mean[None, :]) * invstd[None, :]
    g = dz * _act_grad(xhat * w[None, :] + b[None, :], ACT, slope)
    return tl.where(mask, g, 0.0), xhat, mask, offs


@triton.jit
def _reduce_tile(dz_ptr, y_ptr, t, start, end, cols, C, HW, sN, sC, sHW, dN, dC, dHW, mean, invstd, w, b, slope,
                 sum_g, sum_gx, ACT: tl.constexpr, BLOCK_M: tl.constexpr):
    g, xhat, mask, offs = _grad_tile(dz_ptr, y_ptr, t, start, end, cols, C, HW, sN, sC, sHW, dN, dC, dHW, mean,
                                     invstd, w, b, slope, ACT, BLOCK_M)
    return sum_g + g, sum_gx + g * xhat


@triton.jit
def _dy_tile(dz_ptr, y_ptr, dy_ptr, t, start, end, cols, C, HW, sN, sC, sHW, dN, dC, dHW, mean, invstd, w, b,
             slope, k, mg, mgx, ACT: tl.constexpr, BLOCK_M: tl.constexpr):
    g, xhat, mask, offs = _grad_tile(dz_ptr, y_ptr, t, start, end, cols, C, HW, sN, sC, sHW, dN, dC, dHW, mean,
                                     invstd, w, b, slope, ACT, BLOCK_M)
    dy = k[None, :] * (g - mg[None, :] - xhat * mgx[None, :])
    tl.store(dy_ptr + offs, _to(dy, dy_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bn_act_bwd_reduce_kernel(dz_ptr, y_ptr, part_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, M, C, HW,
                             sN, sC, sHW, dN, dC, dHW, slope, rows_per_split, ACT: tl.constexpr,
                             HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_C: tl.constexpr, STATIC_TILES: tl.constexpr = 0):
    # part: fp32 [2, splits, C] = (Σg, Σg·ŷ) of each slice, g = dz·act'(z)
    pid_m = tl.program_id(0)
    splits = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mean, invstd, w, b = _scale_shift(cols, C, mean_ptr, invstd_ptr, w_ptr, b_ptr, HAS_W, HAS_B)
    start = pid_m * rows_per_split
    end = tl.minimum(start + rows_per_split, M)
    sum_g = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    sum_gx = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    if STATIC_TILES > 0:
        for t in tl.static_range(STATIC_TILES):
            sum_g, sum_gx = _reduce_tile(dz_ptr, y_ptr, t, start, end, cols, C, HW, sN, sC, sHW, dN, dC, dHW,
                                         mean, invstd, w, b, slope, sum_g, sum_gx, ACT, BLOCK_M)
    else:
        for t in range(0, rows_per_split // BLOCK_M):
            sum_g, sum_gx = _reduce_tile(dz_ptr, y_ptr, t, start, end, cols, C, HW, sN, sC, sHW, dN, dC, dHW,
                                         mean, invstd, w, b, slope, sum_g, sum_gx, ACT, BLOCK_M)
    cmask = cols < C
    tl.store(part_ptr + pid_m * C + cols, tl.sum(sum_g, axis=0), mask=cmask)
    tl.store(part_ptr + (splits + pid_m) * C + cols, tl.sum(sum_gx, axis=0), mask=cmask)


@triton.jit
def bn_act_bwd_dy_kernel(dz_ptr, y_ptr, dy_ptr, sg_ptr, sgx_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, M, C, HW,
                         sN, sC, sHW, dN, dC, dHW, slope, rows_per_split, ACT: tl.constexpr,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_C: tl.constexpr, STATIC_TILES: tl.constexpr = 0):
    # dy (y's strides) = w·invstd·(g − Σg/M − ŷ·Σgŷ/M); Σg, Σgŷ: fp32 [C]
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean, invstd, w, b = _scale_shift(cols, C, mean_ptr, invstd_ptr, w_ptr, b_ptr, HAS_W, HAS_B)
    mg = tl.load(sg_ptr + cols, mask=cmask, other=0.0) / M
    mgx = tl.load(sgx_ptr + cols, mask=cmask, other=0.0) / M
    k = w * invstd
    start = pid_m * rows_per_split
    end = tl.minimum(start + rows_per_split, M)
    if STATIC_TILES > 0:
        for t in tl.static_range(STATIC_TILES):
            _dy_tile(dz_ptr, y_ptr, dy_ptr, t, start, end, cols, C, HW, sN, sC, sHW, dN, dC, dHW, mean, invstd,
                     w, b, slope, k, mg, mgx, ACT, BLOCK_M)
    else:
        for t in range(0, rows_per_split // BLOCK_M):
            _dy_tile(dz_ptr, y_ptr, dy_ptr, t, start, end, cols, C, HW, sN, sC, sHW, dN, dC, dHW, mean, invstd,
                     w, b, slope, k, mg, mgx, ACT, BLOCK_M)


def bn_act_backward(dz, y, dy, mean, invstd, weight, bias, act: str, slope: float, channels_last: bool):
    """Writes dy (y's strides); returns fp32 (Σg·ŷ, Σg) per channel."""
    cfg, c_blocks, splits, rows_per, m, hw = _grid(y, channels_last, False)
    c = y.shape[1]
    sn, sc, shw = _view(y)
    dn, dc, dhw = _view(dz)
    wp = weight if weight is not None else mean
    bp = bias if bias is not None else mean
    common = dict(ACT=ACT_CODES[act], HAS_W=weight is not None, HAS_B=bias is not None,
                  BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)
    part = y.new_empty((2, splits, c), dtype=torch.float32)
    launch(bn_act_bwd_reduce_kernel, (splits, c_blocks), dz, y, part, mean, invstd, wp, bp, m, c, hw, sn, sc,
           shw, dn, dc, dhw, slope, rows_per, **common, STATIC_TILES=_static(rows_per // cfg.block_m))
    # deterministic; two sums, not one part.sum(dim=1): the op's outputs must not alias
    sum_g, sum_gx = part[0].sum(dim=0), part[1].sum(dim=0)
    cfg2, c_blocks2, splits2, rows_per2, _, _ = _grid(y, channels_last, True)
    launch(bn_act_bwd_dy_kernel, (splits2, c_blocks2), dz, y, dy, sum_g, sum_gx, mean, invstd, wp, bp, m, c, hw,
           sn, sc, shw, dn, dc, dhw, slope, rows_per2, **common, STATIC_TILES=_static(rows_per2 // cfg.block_m))
    return sum_gx, sum_g
