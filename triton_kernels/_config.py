"""Launch-configuration helpers shared by the Triton kernel modules."""
from __future__ import annotations

import functools
import os

import torch
import triton.language as tl

# Under the interpreter each program instance costs ~2 ms of host time whatever its size,
# so CPU runs use few, large programs; the kernels themselves are the same.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: get_device_properties costs ~2 µs
    of host a call); 1 for other devices."""
    if device.type != "cuda":
        return 1
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())
