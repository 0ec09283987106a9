"""Launch-configuration helpers shared by the Triton kernel modules."""
from __future__ import annotations

import os

import torch
import triton.language as tl

# Under the interpreter each program instance costs ~2 ms of host time whatever its size,
# so CPU runs use few, large programs; the kernels themselves are the same.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
