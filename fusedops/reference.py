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


# ---- LayerNorm / RMSNorm + activation (+ residual add) ---------------------------------
#
# y = act(norm(s) * w + b) over the last dim, s = x (or x + residual, rounded to x's dtype
# as eager `x + residual` is). Statistics and math in fp32 (fp64 for fp64 input); y is
# rounded once, to out_dtype (default x's dtype). mean / rstd are fp32 (fp64 for fp64)
# with shape x.shape[:-1]. LayerNorm: mean and biased variance; RMSNorm: mean square.

ACTIVATIONS = ("identity", "relu", "gelu", "gelu_tanh", "silu")

_SQRT_2_OVER_PI = 0.7978845608028654
_GELU_C = 0.044715


def activation(z: torch.Tensor, name: str) -> torch.Tensor:
    """act(z): identity, relu, gelu (exact, erf), gelu_tanh (the tanh approximation), silu."""
    if name == "identity":
        return z
    if name == "relu":
        return torch.relu(z)
    if name == "gelu":
        return torch.nn.functional.gelu(z)
    if name == "gelu_tanh":
        return torch.nn.functional.gelu(z, approximate="tanh")
    if name == "silu":
        return torch.nn.functional.silu(z)
    raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")


def activation_grad(z: torch.Tensor, name: str) -> torch.Tensor:
    """d act / dz (relu'(0) = 0, as torch)."""
    if name == "identity":
        return torch.ones_like(z)
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "gelu":
        return 0.5 * (1 + torch.erf(z * 0.7071067811865476)) + z * torch.exp(-0.5 * z * z) * 0.3989422804014327
    if name == "gelu_tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (z + _GELU_C * z * z * z))
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _GELU_C * z * z)
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def norm_stats(s: torch.Tensor, eps: float, rms: bool):
    """(mean or None, rstd) of s over the last dim, in fp32 (fp64 for fp64 s)."""
    sf = s.to(_compute_dtype(s))
    if rms:
        return None, torch.rsqrt(sf.square().mean(-1) + eps)
    mean = sf.mean(-1)
    var = (sf - mean.unsqueeze(-1)).square().mean(-1)
    return mean, torch.rsqrt(var + eps)


def _pre_activation(s, weight, bias, mean, rstd):
    sf = s.to(_compute_dtype(s))
    xhat = (sf if mean is None else sf - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    z = xhat if weight is None else xhat * weight.to(sf.dtype)
    if bias is not None:
        z = z + bias.to(sf.dtype)
    return xhat, z


def norm_act(s, weight, bias, eps, activation_name, rms, out_dtype=None):
    """(y, mean or None, rstd) of the fused op on s (the norm input)."""
    mean, rstd = norm_stats(s, eps, rms)
    _, z = _pre_activation(s, weight, bias, mean, rstd)
    return activation(z, activation_name).to(out_dtype or s.dtype), mean, rstd


def layer_norm_act(x, weight=None, bias=None, eps: float = 1e-5, activation: str = "identity", out_dtype=None):
    """act(layer_norm(x) * weight + bias) -> (y, mean, rstd)."""
    return norm_act(x, weight, bias, eps, activation, False, out_dtype)


def rms_norm_act(x, weight=None, eps: float = 1e-6, activation: str = "identity", out_dtype=None):
    """act(rms_norm(x) * weight) -> (y, rstd)."""
    y, _, rstd = norm_act(x, weight, None, eps, activation, True, out_dtype)
    return y, rstd


def residual_sum(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """s = x + residual, rounded to x's dtype (x and residual share dtype and shape)."""
    return x + residual


def add_layer_norm_act(x, residual, weight=None, bias=None, eps: float = 1e-5, activation: str = "identity",
                       out_dtype=None):
    """s = x + residual; (y, s, mean, rstd) with y = act(layer_norm(s) * weight + bias)."""
    s = residual_sum(x, residual)
    y, mean, rstd = norm_act(s, weight, bias, eps, activation, False, out_dtype)
    return y, s, mean, rstd


def add_rms_norm_act(x, residual, weight=None, eps: float = 1e-6, activation: str = "identity", out_dtype=None):
    """s = x + residual; (y, s, rstd) with y = act(rms_norm(s) * weight)."""
    s = residual_sum(x, residual)
    y, _, rstd = norm_act(s, weight, None, eps, activation, True, out_dtype)
    return y, s, rstd


def norm_act_backward(dy, s, weight, bias, mean, rstd, activation_name, ds=None):
    """Gradients of y = act(norm(s) * w + b) -> (ds_total, dweight or None, dbias or None).

    With xhat the normalised row, dz = dy * act'(z), g = dz * w:
      LayerNorm  ds = rstd * (g - mean(g) - xhat * mean(g * xhat))
      RMSNorm    ds = rstd * (g - xhat * mean(g * xhat))
    dweight = sum over rows of dz * xhat, dbias = sum over rows of dz. `ds`, the gradient
    that reaches s directly (the residual output), is added to the result.
    """
    ct = _compute_dtype(s)
    xhat, z = _pre_activation(s, weight, bias, mean, rstd)
    dz = dy.to(ct) * activation_grad(z, activation_name)
    g = dz if weight is None else dz * weight.to(ct)
    proj = (g * xhat).mean(-1, keepdim=True)
    inner = g - xhat * proj if mean is None else g - g.mean(-1, keepdim=True) - xhat * proj
    dx = inner * rstd.unsqueeze(-1)
    if ds is not None:
        dx = dx + ds.to(ct)
    lead = tuple(range(s.dim() - 1))
    dw = None if weight is None else (dz * xhat).sum(lead).to(weight.dtype)
    db = None if bias is None else dz.sum(lead).to(bias.dtype)
    return dx.to(s.dtype), dw, db
