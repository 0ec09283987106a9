"""In-place add kernels: x += alpha * y (math in fp32, one rounding to x's dtype).

Memory-bound: 2 reads + 1 write per element; on an H100 the floor is bytes / 3.0 TB/s.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._config import INTERPRET, TL_DTYPE


@dataclasses.dataclass(frozen=True)
class AddConfig:
    block_bytes: int  # bytes of x per program
    num_warps: int

    def block(self, x: torch.Tensor) -> int:
        return self.block_bytes // x.element_size()


# 16 KB of x per program, 8 warps: 4 16-byte accesses per thread per tensor.
CONFIG = AddConfig(block_bytes=1 << 18, num_warps=4) if INTERPRET else AddConfig(block_bytes=1 << 14, num_warps=8)


@triton.jit
def add_kernel(x_ptr, y_ptr, n, period, alpha, BLOCK: tl.constexpr, PERIODIC: tl.constexpr):
    # y repeats every `period` elements when PERIODIC (a row or bias vector), else n == numel(y).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y_offs = offs % period if PERIODIC else offs
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    y = tl.load(y_ptr + y_offs, mask=mask).to(tl.float32)
    tl.store(x_ptr + offs, (x + alpha * y).to(x_ptr.dtype.element_ty), mask=mask)


def add_(x: torch.Tensor, y: torch.Tensor, alpha: float) -> None:
    """x contiguous; y contiguous with y.numel() dividing x.numel()."""
    n, m = x.numel(), y.numel()
    if n == 0:
        return
    block = CONFIG.block(x)
    grid = (triton.cdiv(n, block),)
    add_kernel[grid](x, y, n, m, alpha, BLOCK=block, PERIODIC=m != n, num_warps=CONFIG.num_warps)


@triton.jit
def foreach_add_kernel(table_ptr, count, alpha, X_DTYPE: tl.constexpr, Y_DTYPE: tl.constexpr,
                       BLOCK: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    # table (int64, 4 rows of `count`+1): x pointers, y pointers, numels, first block of each
    # tensor (prefix sums, the last entry = total blocks). A program finds its tensor by a
    # binary search over the prefix sums.
    pid = tl.program_id(0).to(tl.int64)
    stride = count + 1
    lo = 0
    hi = count - 1
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        take = tl.load(table_ptr + 3 * stride + mid) <= pid
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid - 1)
    x_ptr = tl.load(table_ptr + lo).to(tl.pointer_type(X_DTYPE))
    y_ptr = tl.load(table_ptr + stride + lo).to(tl.pointer_type(Y_DTYPE))
    n = tl.load(table_ptr + 2 * stride + lo)
    start = (pid - tl.load(table_ptr + 3 * stride + lo)) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask).to(tl.float32)
    tl.store(x_ptr + offs, (x + alpha * y).to(X_DTYPE), mask=mask)


def foreach_add_(xs: list[torch.Tensor], ys: list[torch.Tensor], alpha: float) -> None:
    """One launch for all pairs: xs share a device and dtype, ys share a dtype, each pair
    contiguous with equal numel."""
    pairs = [(x, y) for x, y in zip(xs, ys) if x.numel()]
    if not pairs:
        return
    block = CONFIG.block(pairs[0][0])
    count = len(pairs)
    first, total = [], 0
    for x, _ in pairs:
        first.append(total)
        total += triton.cdiv(x.numel(), block)
    first.append(total)
    pad = [0]
    table = torch.tensor(
        [[x.data_ptr() for x, _ in pairs] + pad,
         [y.data_ptr() for _, y in pairs] + pad,
         [x.numel() for x, _ in pairs] + pad,
         first],
        dtype=torch.int64)
    device = pairs[0][0].device
    if device.type != "cpu":
        table = table.to(device, non_blocking=True)
    foreach_add_kernel[(total,)](
        table, count, alpha, X_DTYPE=TL_DTYPE[pairs[0][0].dtype], Y_DTYPE=TL_DTYPE[pairs[0][1].dtype],
        BLOCK=block, SEARCH_STEPS=max(1, (count - 1).bit_length()), num_warps=CONFIG.num_warps)
