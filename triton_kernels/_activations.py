"""Activation helpers shared by the Triton kernels (fp32 in, fp32 out)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gelu_tanh(z):
    # 0.5 * (1 + tanh(u)) = sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3): no cancellation
    # where tanh(u) is near -1
    return z / (1.0 + tl.exp(-2.0 * 0.7978845608028654 * (z + 0.044715 * z * z * z)))


@triton.jit
def gelu_tanh_grad(z):
    # with sg = sigmoid(2u) = 0.5 (1 + tanh u): 1 - tanh^2 u = 4 sg (1 - sg), and
    # 1 - sg = e sg (e = exp(-2u)) where that avoids cancellation
    e = tl.exp(-2.0 * 0.7978845608028654 * (z + 0.044715 * z * z * z))
    sg = 1.0 / (1.0 + e)
    one_minus = tl.where(e > 1.0, 1.0 - sg, e * sg)
    return sg + 2.0 * z * sg * one_minus * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
