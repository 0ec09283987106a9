"""Helpers shared by the multi-tensor Triton kernels (one launch over a table of tensors)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def find_tensor(starts_ptr, pid, count, SEARCH_STEPS: tl.constexpr):
    # The last of `count` tensors whose first program starts_ptr[i] (non-decreasing prefix
    # sums, starts_ptr[0] = 0) is <= pid: a branch-free binary search of SEARCH_STEPS =
    # ceil(log2(count)) steps (at least 1).
    lo = 0
    hi = count - 1
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        take = tl.load(starts_ptr + mid) <= pid
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid - 1)
    return lo


def search_steps(count: int) -> int:
    """SEARCH_STEPS of find_tensor for a table of `count` tensors."""
    return max(1, (count - 1).bit_length())
