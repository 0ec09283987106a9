"""The executable spec: eager PyTorch definitions of every fusedops op.

Each fused kernel must agree with these (tests compare against them, and ops fall back
to them where no kernel can serve a call).
"""
from __future__ import annotations

import math

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
    """The activation as eager torch computes it (shared by the norm and conv+BN families;
    gelu is the exact erf form, gelu_tanh the tanh approximation)."""
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
    rm ← (1−f)·rm + f·μ, rv ← (1−f)·rv + f·σ²·M/(M−1), f = momentum or 1/num_batches_tracked
    (0 without either, as eager); an empty batch (count 0) counts but leaves the buffers."""
    with torch.no_grad():
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if count == 0 or (momentum is None and num_batches_tracked is None):
            return
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

# ---- 8-bit optimizers: blockwise dynamic quantization and the optimizer steps ----------------
#
# The maps and the block size are bitsandbytes' (create_dynamic_map, block 256), so that
# states are interchangeable with bnb's layout: uint8 codes with the shape of the parameter
# and one fp32 absmax per block of 256 elements of the flattened tensor.

QUANT_BLOCK = 256


def dynamic_map(signed: bool) -> torch.Tensor:
    """bitsandbytes' `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`: 256
    sorted fp32 values in [-1, 1]. For decade i = 0..6 (scale 10^(i-6)) the midpoints of
    linspace(0.1, 1, k+1) in fp32, k = 2^i per sign (signed) or 2^(i+1) (unsigned); plus 0
    and 1. Signed: index 127 is 0, 255 is +1, the minimum is -0.99297 (no -1), the smallest
    |value| 5.5e-7. Unsigned: index 0 is 0, 255 is 1, the smallest positive value 3.25e-7."""
    data = []
    for i in range(7):
        k = 2 ** i if signed else 2 ** (i + 1)
        bounds = torch.linspace(0.1, 1, k + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def code_midpoints(code: torch.Tensor) -> torch.Tensor:
    """The 255 decision points of nearest-code rounding: (code[i] + code[i+1]) / 2 computed
    in fp64 and rounded to fp32. The code of a normalised value x is the number of
    midpoints strictly below x, so a value exactly at a midpoint takes the LOWER code."""
    c = code.double()
    return ((c[:-1] + c[1:]) / 2).float()


def _nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code of each element of x (fp32, normalised to [-1, 1]),
    as int64: ties (x on a midpoint) to the lower code. Sign rule (bnb's sign fix): a
    negative x never takes a non-negative code when a negative code lies below it — a tiny
    negative value becomes the smallest negative code, not 0."""
    mids = code_midpoints(code).to(x.device)
    idx = torch.searchsorted(mids, x.contiguous(), right=False)
    code = code.to(x.device)
    below = (idx - 1).clamp_min(0)
    fix = (x < 0) & (code[idx] >= 0) & (idx > 0) & (code[below] < 0)
    return torch.where(fix, below, idx)


def _block_view(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x flattened and zero-padded to whole blocks, as [blocks, 256] fp32."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // QUANT_BLOCK)
    padded = torch.zeros(blocks * QUANT_BLOCK, dtype=torch.float32, device=x.device)
    padded[:n] = flat
    return padded.view(blocks, QUANT_BLOCK), n


def blockwise_absmax(x: torch.Tensor) -> torch.Tensor:
    return _block_view(x)[0].abs().amax(dim=1) if x.numel() else torch.zeros(0, device=x.device)


def quantize_with_absmax(x: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Codes (uint8, shape of x) of x scaled by its block's absmax: nearest code to
    x / absmax (fp32 division; a block whose absmax is 0 quantizes to the code of 0)."""
    if x.numel() == 0:
        return torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    blocks, n = _block_view(x)
    scale = absmax.float().view(-1, 1)
    norm = torch.where(scale == 0, torch.zeros_like(blocks), blocks / torch.where(scale == 0, 1.0, scale))
    idx = _nearest_code(norm.reshape(-1), code.float())
    return idx[:n].to(torch.uint8).view(x.shape)


def blockwise_quantize(x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise quantization of x (any float dtype, computed in fp32) with a 256-entry
    sorted map `code`: per block of 256 elements of the flattened x, absmax = max |x|
    (fp32, shape [ceil(n / 256)]) and codes = nearest code to x / absmax (uint8, shape of
    x; ties to the lower code; bnb's sign rule, see _nearest_code). x must be finite."""
    absmax = blockwise_absmax(x)
    return quantize_with_absmax(x, absmax, code), absmax


def blockwise_dequantize(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """code[codes] * absmax of the element's block, fp32 with the shape of codes."""
    if codes.numel() == 0:
        return torch.zeros(codes.shape, dtype=torch.float32, device=codes.device)
    flat = code.float().to(codes.device)[codes.reshape(-1).long()]
    block = torch.arange(flat.numel(), device=codes.device) // QUANT_BLOCK
    return (flat * absmax.float()[block]).view(codes.shape)


OPTIM_KINDS = ("adamw", "adam", "lion", "sgd")

# ---- stochastic rounding of bf16 parameters (every backend: csrc/optim8bit.h) -------------
_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """x * c mod 2^32 for x in [0, 2^32) (int or int64 tensor) without int64 overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(x):
    """murmur3's 32-bit finaliser on ints or int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def sr_key(seed: int, step: int) -> int:
    """The stochastic-rounding key of one step (a uint32): every backend hashes it with
    the tensor's position in the step's lists and the element's index."""
    return _fmix32((int(seed) + _mul32(int(step) & _M32, 0x9E3779B9)) & _M32)


def round_bf16_stochastic(x: torch.Tensor, key: int, index: int) -> torch.Tensor:
    """fp32 x rounded stochastically to bf16 values (returned as fp32): 16 random bits
    r = fmix32(tensor_key + element * 0x9E3779B9), tensor_key = fmix32(key ^ index *
    0x632BE5AB), added below bf16's last bit before truncating, so that x rounds up with
    probability (x - lower) / (upper - lower): unbiased. Inf and NaN stay."""
    tk = _fmix32(key ^ _mul32(index & _M32, 0x632BE5AB))
    flat = x.reshape(-1).contiguous()
    e = torch.arange(flat.numel(), dtype=torch.int64, device=x.device) & _M32
    r = _fmix32((tk + _mul32(e, 0x9E3779B9)) & _M32)
    b = flat.view(torch.int32).long() & _M32
    out = (b + (r & 0xFFFF)) & 0xFFFF0000
    out = torch.where((b & 0x7F800000) == 0x7F800000, b, out)
    out = torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32)
    return out.view(torch.float32).view(x.shape)



def optimizer_hyper(kind: str, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                    step: int) -> dict:
    """The scalars every backend of the 8-bit step receives, computed here once in fp64 and
    rounded to fp32 by the kernels (as torch rounds its Python-scalar arguments)."""
    h = dict(lr=lr, beta1=beta1, one_minus_beta1=1.0 - beta1, beta2=beta2, one_minus_beta2=1.0 - beta2,
             eps=eps, weight_decay=weight_decay, decay=1.0 - lr * weight_decay, step_size=lr, inv_bc2_sqrt=1.0)
    if kind in ("adamw", "adam"):
        h["step_size"] = lr / (1.0 - beta1 ** step)
        h["inv_bc2_sqrt"] = 1.0 / math.sqrt(1.0 - beta2 ** step)
    return h


def optimizer_update_fp32(kind: str, p, g, m, v, h: dict, *, first: bool = False, nesterov: bool = False):
    """One step of `kind` on fp32 tensors p, g, m (and v for Adam): returns new (p, m, v),
    with the fp32 operation order every kernel follows. Hyperparameters `h` from
    optimizer_hyper (for SGD: beta1 = momentum, beta2 = dampening).

    - adamw: p *= 1 - lr*wd; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2;
             p += -(lr / (1-b1^t)) * m / (sqrt(v) * (1/sqrt(1-b2^t)) + eps)  (torch AdamW)
    - adam:  g += wd*p, then the same without the decay factor              (torch Adam, L2)
    - lion:  p *= 1 - lr*wd; p += -lr * sign(b1*m + (1-b1)*g); m = b2*m + (1-b2)*g
    - sgd:   g += wd*p; m = g on the first step, else momentum*m + (1-dampening)*g;
             p += -lr * (g + momentum*m if nesterov else m)                 (torch SGD)
    NaN/Inf policy: where g is not finite, that element's m and v become 0 and p is left
    as it was (bnb's rule for its 2-state kernels, applied here to every kind), so a bad
    element never reaches the block's absmax.
    """
    f = lambda name: torch.tensor(h[name], dtype=torch.float32)  # noqa: E731  fp32 scalars
    ok = torch.isfinite(g)
    g0 = torch.where(ok, g, torch.zeros_like(g))
    p_in = p
    if kind in ("adamw", "adam"):
        if kind == "adamw":
            p = p * f("decay")
        else:
            g0 = g0 + f("weight_decay") * p
        m = f("beta1") * m + f("one_minus_beta1") * g0
        v = f("beta2") * v + f("one_minus_beta2") * (g0 * g0)
        # The kernels' sqrt and division are IEEE (correctly rounded); torch's CPU fp32 sqrt
        # is not always: so the sqrt is taken in fp64 (then exactly rounded). The second
        # bias correction multiplies by its reciprocal (rounded once to fp32 from fp64):
        # one division per element less in the kernels; within an ulp of torch's division.
        denom = torch.sqrt(v.double()).float() * f("inv_bc2_sqrt") + f("eps")
        p = p + (-f("step_size")) * (m / denom)
    elif kind == "lion":
        p = p * f("decay")
        u = torch.sign(f("beta1") * m + f("one_minus_beta1") * g0)
        p = p + (-f("lr")) * u
        m = f("beta2") * m + f("one_minus_beta2") * g0
    elif kind == "sgd":
        g0 = g0 + f("weight_decay") * p
        m = g0 if first else f("beta1") * m + f("one_minus_beta2") * g0
        d = g0 + f("beta1") * m if nesterov else m
        p = p + (-f("lr")) * d
    else:
        raise ValueError(f"unknown optimizer kind {kind!r}; one of {OPTIM_KINDS}")
    zero = torch.zeros_like(m)
    m = torch.where(ok, m, zero)
    v = torch.where(ok, v, zero) if v is not None else None
    p = torch.where(ok, p, p_in)
    return p, m, v


def optimizer_step_8bit_(params, grads, state1, absmax1, state2, absmax2, kind: str, lr: float, beta1: float,
                         beta2: float, eps: float, weight_decay: float, step: int, first: bool = False,
                         nesterov: bool = False, sr_seed: int = -1) -> None:
    """The eager spec of fusedops.optimizer_step_8bit_: for each parameter, dequantize its
    states -> fp32 update (optimizer_update_fp32) -> requantize, in place. A state whose
    absmax tensor is empty is a plain fp32 state (32-bit states: small tensors, overrides).
    The first moment uses the signed dynamic map, the second the unsigned one; the new
    absmax is the block max of |state| after the update, before quantization; the
    parameter update uses the unquantized new states; p is rounded once to its dtype (bf16
    params with sr_seed >= 0: stochastically, round_bf16_stochastic with sr_key(sr_seed,
    step) and the param's position in the lists)."""
    h = optimizer_hyper(kind, lr, beta1, beta2, eps, weight_decay, step)
    smap, umap = dynamic_map(True), dynamic_map(False)
    two = kind in ("adamw", "adam")
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.numel() == 0:
            continue
        q1 = absmax1[i].numel() > 0
        m = blockwise_dequantize(state1[i], absmax1[i], smap) if q1 else state1[i].float()
        v = None
        if two:
            q2 = absmax2[i].numel() > 0
            v = blockwise_dequantize(state2[i], absmax2[i], umap) if q2 else state2[i].float()
        pn, mn, vn = optimizer_update_fp32(kind, p.float(), g.float(), m.view(p.shape),
                                           v.view(p.shape) if v is not None else None, h,
                                           first=first, nesterov=nesterov)
        if sr_seed >= 0 and p.dtype == torch.bfloat16:
            pn = round_bf16_stochastic(pn, sr_key(sr_seed, step), i)
        p.copy_(pn)
        if q1:
            a = blockwise_absmax(mn)
            state1[i].copy_(quantize_with_absmax(mn, a, smap))
            absmax1[i].copy_(a)
        else:
            state1[i].copy_(mn)
        if two:
            if q2:
                a = blockwise_absmax(vn)
                state2[i].copy_(quantize_with_absmax(vn, a, umap))
                absmax2[i].copy_(a)
            else:
                state2[i].copy_(vn)

# ---- LayerNorm / RMSNorm + activation (+ residual add) ---------------------------------
#
# y = act(norm(s) * w + b) over the last dim, s = x (or x + residual, rounded to x's dtype
# as eager `x + residual` is). Statistics and math in fp32 (fp64 for fp64 input); y is
# rounded once, to out_dtype (default x's dtype). mean / rstd are fp32 (fp64 for fp64)
# with shape x.shape[:-1]. LayerNorm: mean and biased variance; RMSNorm: mean square.

# The norm kernels take this subset of the activations defined above (`activation`).
ACTIVATIONS = ("identity", "relu", "gelu", "gelu_tanh", "silu")

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
    rowsum = (lambda t: t.sum(lead)) if lead else (lambda t: t)  # (sum over () would sum all: 1-D s)
    dw = None if weight is None else rowsum(dz * xhat).to(weight.dtype)
    db = None if bias is None else rowsum(dz).to(bias.dtype)
    return dx.to(s.dtype), dw, db
