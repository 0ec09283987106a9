"""The executable spec: eager PyTorch definitions of every fusedops op.

Each fused kernel must agree with these (tests compare against them, and ops fall back
to them where no kernel can serve a call).
"""
from __future__ import annotations

import torch


def add_(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0) -> None:
    """x += alpha * y in place; y broadcast to x; computed in fp32 (or wider) and
    rounded once to x's dtype, exactly as eager `x.add_(y, alpha=alpha)`."""
    x.add_(y, alpha=alpha)


def foreach_add_(xs: list[torch.Tensor], ys: list[torch.Tensor], alpha: float = 1.0) -> None:
    """xs[i] += alpha * ys[i] for every pair (as `torch._foreach_add_`)."""
    for x, y in zip(xs, ys):
        x.add_(y, alpha=alpha)
