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


# ---- Conv2d + BatchNorm2d (+ activation) ---------------------------------------------------
#
# Y = conv(X, W) is [N, C, P, Q]; each channel reduces over M = N·P·Q elements.
# Training: μ = ΣY/M, σ² = Σ(Y−μ)²/M (biased), r = rsqrt(σ²+eps), Ŷ = (Y−μ)·r,
# Z = γŶ+β, A = act(Z). Running stats: rm ← (1−f)rm + fμ, rv ← (1−f)rv + f·σ²·M/(M−1),
# f = momentum, or 1/num_batches_tracked when momentum is None.

CONV_BN_ACTIVATIONS = ("identity", "relu", "relu6", "silu", "gelu", "gelu_tanh", "leaky_relu")


def activation(z: torch.Tensor, act: str, slope: float = 0.01) -> torch.Tensor:
    """The activation as eager torch computes it."""
    F = torch.nn.functional
    if act == "identity":
        return z
    if act == "relu":
        return F.relu(z)
    if act == "relu6":
        return F.relu6(z)
    if act == "silu":
        return F.silu(z)
    if act == "gelu":
        return F.gelu(z)
    if act == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if act == "leaky_relu":
        return F.leaky_relu(z, slope)
    raise ValueError(f"unknown activation {act!r}; choose one of {', '.join(CONV_BN_ACTIVATIONS)}")


def bn_stats(y: torch.Tensor, eps: float):
    """Per-channel batch statistics of y [N, C, H, W] in fp32: (mean, invstd, biased var)."""
    var, mean = torch.var_mean(y.float(), dim=(0, 2, 3), correction=0)
    return mean, torch.rsqrt(var + eps), var


def _affine(c: int, weight, bias, like: torch.Tensor):
    w = weight.float() if weight is not None else torch.ones(c, device=like.device)
    b = bias.float() if bias is not None else torch.zeros(c, device=like.device)
    return w, b


def bn_act_apply(y, mean, invstd, weight=None, bias=None, act: str = "identity", slope: float = 0.01):
    """act((y − mean)·invstd·weight + bias) in fp32, rounded once to y's dtype and layout."""
    w, b = _affine(y.shape[1], weight, bias, y)
    scale = (invstd.float() * w)[None, :, None, None]
    shift = (b - mean.float() * invstd.float() * w)[None, :, None, None]
    z = activation(y.float() * scale + shift, act, slope)
    return z.to(y.dtype)


def activation_grad(z: torch.Tensor, act: str, slope: float = 0.01) -> torch.Tensor:
    """d act(z) / dz at the pre-activation z (fp32), with eager's choices at the kinks."""
    if act == "identity":
        return torch.ones_like(z)
    if act == "relu":
        return (z > 0).to(z.dtype)
    if act == "relu6":
        return ((z > 0) & (z < 6)).to(z.dtype)
    if act == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if act == "gelu":
        cdf = 0.5 * (1 + torch.erf(z * 0.7071067811865476))
        return cdf + z * torch.exp(-0.5 * z * z) * 0.3989422804014327
    if act == "gelu_tanh":
        k = 0.7978845608028654
        inner = k * (z + 0.044715 * z ** 3)
        t = torch.tanh(inner)
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * k * (1 + 3 * 0.044715 * z * z)
    if act == "leaky_relu":
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, slope))
    raise ValueError(f"unknown activation {act!r}")


def bn_act_backward(dz, y, mean, invstd, weight=None, bias=None, act: str = "identity", slope: float = 0.01):
    """Backward of bn_act_apply with batch statistics (training mode): returns
    (dy in y's dtype, Σg·ŷ = dweight fp32, Σg = dbias fp32), g = dz·act'(z):
    dy = weight·invstd·(g − Σg/M − ŷ·Σgŷ/M)."""
    w, b = _affine(y.shape[1], weight, bias, y)
    r = invstd.float()[None, :, None, None]
    xhat = (y.float() - mean.float()[None, :, None, None]) * r
    z = xhat * w[None, :, None, None] + b[None, :, None, None]
    g = dz.float() * activation_grad(z, act, slope)
    m = y.numel() // y.shape[1]
    sum_g = g.sum(dim=(0, 2, 3))
    sum_gx = (g * xhat).sum(dim=(0, 2, 3))
    dy = (w[None, :, None, None] * r) * (g - sum_g[None, :, None, None] / m - xhat * sum_gx[None, :, None, None] / m)
    return dy.to(y.dtype), sum_gx, sum_g


def update_running_stats_(running_mean, running_var, num_batches_tracked, mean, var, count: int, momentum):
    """Eager BatchNorm's running-statistics update (training with track_running_stats):
    rm ← (1−f)·rm + f·μ, rv ← (1−f)·rv + f·σ²·M/(M−1), f = momentum or 1/num_batches_tracked."""
    with torch.no_grad():
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        unbiased = var * (count / max(count - 1, 1))
        if momentum is None:  # cumulative average; a tensor factor (no host sync, compile-friendly)
            f = 1.0 / num_batches_tracked.double()
            running_mean.mul_(1 - f).add_(mean.to(running_mean.dtype) * f)
            running_var.mul_(1 - f).add_(unbiased.to(running_var.dtype) * f)
        else:  # one launch for both buffers
            torch._foreach_lerp_([running_mean, running_var],
                                 [mean.to(running_mean.dtype), unbiased.to(running_var.dtype)], float(momentum))


def conv_bn_act(x, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d, act: str = "identity", slope: float = 0.01):
    """The eager pair: act(bn(conv(x)))."""
    return activation(bn(conv(x)), act, slope)
