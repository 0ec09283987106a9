"""In-place add kernels: x += alpha * y (math in fp32, one rounding to x's dtype).

Memory-bound: 2 reads + 1 write per element; on an H100 the floor is bytes / 3.0 TB/s.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._config import INTERPRET, TL_DTYPE
from ._launch import cdiv, launch
from ._multi_tensor import find_tensor, search_steps
from .norm import _to  # fp32 -> x's dtype, rounded to nearest even under the interpreter too


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
    tl.store(x_ptr + offs, _to(x + alpha * y, x_ptr.dtype.element_ty), mask=mask)


def add_(x: torch.Tensor, y: torch.Tensor, alpha: float) -> None:
    """x contiguous; y contiguous with y.numel() dividing x.numel()."""
    n, m = x.numel(), y.numel()
    if n == 0:
        return
    block = CONFIG.block(x)
    grid = (cdiv(n, block),)
    launch(add_kernel, grid, x, y, n, m, alpha, BLOCK=block, PERIODIC=m != n, num_warps=CONFIG.num_warps)


@triton.jit
def foreach_add_kernel(table_ptr, count, alpha, X_DTYPE: tl.constexpr, Y_DTYPE: tl.constexpr,
                       BLOCK: tl.constexpr, SEARCH_STEPS: tl.constexpr, ALIGNED: tl.constexpr):
    # table (int64, 4 rows of `count`+1): x addresses, y addresses, numels, first block of
    # each tensor (prefix sums). A program finds its tensor by binary search over the
    # prefix sums. ALIGNED: every address is 16-byte aligned, so full blocks (no mask)
    # compile to 16-byte accesses; the last block of a tensor is masked.
    pid = tl.program_id(0).to(tl.int64)
    stride = count + 1
    lo = find_tensor(table_ptr + 3 * stride, pid, count, SEARCH_STEPS)
    x_ptr = tl.load(table_ptr + lo).to(tl.pointer_type(X_DTYPE))
    y_ptr = tl.load(table_ptr + stride + lo).to(tl.pointer_type(Y_DTYPE))
    if ALIGNED:
        x_ptr = tl.multiple_of(x_ptr, 16)
        y_ptr = tl.multiple_of(y_ptr, 16)
    n = tl.load(table_ptr + 2 * stride + lo)
    start = (pid - tl.load(table_ptr + 3 * stride + lo)) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        x = tl.load(x_ptr + offs).to(tl.float32)
        y = tl.load(y_ptr + offs).to(tl.float32)
        tl.store(x_ptr + offs, _to(x + alpha * y, X_DTYPE))
    else:
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=mask).to(tl.float32)
        tl.store(x_ptr + offs, _to(x + alpha * y, X_DTYPE), mask=mask)


def foreach_block(x_dtype: torch.dtype) -> int:
    """Elements of x per program of foreach_add_kernel."""
    return CONFIG.block_bytes // x_dtype.itemsize


def foreach_table_py(xs: list[torch.Tensor], ys: list[torch.Tensor], block: int) -> torch.Tensor:
    """The table foreach_add_kernel reads (int64 [4, count + 1], see the kernel), built in
    Python; fusedops builds the same table natively when its extension is there."""
    pairs = [(x, y) for x, y in zip(xs, ys) if x.numel()]
    first, total = [], 0
    for x, _ in pairs:
        first.append(total)
        total += cdiv(x.numel(), block)
    xa, ya = [x.data_ptr() for x, _ in pairs], [y.data_ptr() for _, y in pairs]
    aligned = int(all(a % 16 == 0 for a in xa + ya))
    return torch.tensor([xa + [aligned], ya + [0], [x.numel() for x, _ in pairs] + [0], first + [total]],
                        dtype=torch.int64)


def foreach_add_(table: torch.Tensor, blocks: int, aligned: bool, x_dtype: torch.dtype, y_dtype: torch.dtype,
                 alpha: float) -> None:
    """One launch over every pair in `table` (on the tensors' device); `blocks` and
    `aligned` are read from the host copy of its last column, so that no sync is needed."""
    if blocks == 0:
        return
    count = table.shape[1] - 1
    launch(foreach_add_kernel, (blocks,),
        table, count, alpha, X_DTYPE=TL_DTYPE[x_dtype], Y_DTYPE=TL_DTYPE[y_dtype],
        BLOCK=foreach_block(x_dtype), SEARCH_STEPS=search_steps(count), ALIGNED=aligned,
        num_warps=CONFIG.num_warps)
