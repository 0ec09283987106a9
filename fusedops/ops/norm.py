"""LayerNorm / RMSNorm + activation, optionally after a fused residual add.

    y = act(norm(s) * weight + bias) over the last dim,  s = x  or  s = x + residual

activation in {identity, relu, gelu (erf), gelu_tanh, silu}; weight and bias optional and
of any float dtype (fp32 parameters with bf16 activations are fine); statistics and math
in fp32, y rounded once. The forward ops return y and the fp32 per-row statistics (mean
for LayerNorm, rstd) that the backward op `norm_act_backward` recomputes xhat from, in
one pass over (s, dy): dx (= dresidual) and fp32 per-program dW/dB partials summed in a
fixed order (deterministic).

Ops (torch.ops.fusedops.*):
    layer_norm_act(x, weight?, bias?, eps, activation, out_dtype?) -> (y, mean, rstd)
    rms_norm_act(x, weight?, eps, activation, out_dtype?) -> (y, rstd)
    add_layer_norm_act(x, residual, ...) -> (y, s, mean, rstd)       s returned
    add_rms_norm_act(x, residual, ...) -> (y, s, rstd)
    add_layer_norm_act_(x, residual!, ...) -> (y, mean, rstd)        s written into residual
    add_rms_norm_act_(x, residual!, ...) -> (y, rstd)
    norm_act_backward(dy, s, weight?, bias?, mean?, rstd, activation, ds?) -> (ds_total, dweight, dbias)
The functional ops carry register_autograd; the in-place ones are differentiated through
an autograd.Function (torch cannot attach a formula to a mutating op) in the public
functions below. A double backward (create_graph=True) recomputes y in torch ops and
differentiates that (_grads_graph): the backward kernels' results have no derivative.

Layout: any leading dims. x (and residual) are read through a row stride when their rows
have unit column stride, else copied once; dy and ds are read through any strides (a
stride-0 gradient from `.sum()` is never materialised). Rows up to 65536 elements are
held on chip in the forward, up to 16384 in the CUDA C++ backward and 8192 in the Triton
one (16-bit rows of 8193-16384: two programs a row; longer and fp32 rows: two passes);
longer rows take looped / streaming (slower, correct) paths.

Autocast: eager F.layer_norm (and F.rms_norm, in the torch versions whose CUDA autocast
lists it) run in fp32 under CUDA autocast (and in the
input dtype under CPU autocast); the public functions match that by asking the kernel for
an fp32 y (out_dtype) instead of copying x to fp32 (same values: the cast is exact).
out_dtype may also ask for a 16-bit y of an fp32 x (which then takes a 16-bit dy): what an
nn.Linear after the norm casts y to under autocast anyway (the modules' autocast_output).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .. import _native, _triton, _validate, reference
from .._backend import Kernels
from .._backend import _forced as _backend_forced
from ._library import LIB, define, not_differentiable

ACTIVATIONS = reference.ACTIVATIONS
_ACT_CODE = {a: i for i, a in enumerate(ACTIVATIONS)}

# Defaults on CUDA tensors, by hidden size N, for the forward and the backward separately
# (either backward takes either forward's saved statistics). H100, LN+GELU(tanh) bf16, 32768
# rows, device µs (bench/NOTES.md, round 4): forward CUDA C++ vs Triton 62 vs 71 at 1024,
# 120 vs 96 at 2048, 191 vs 187 at 4096, 390 vs 387 at 8192, 756 vs 728 at 16384, and on a
# launch-bound call (16x4096) 35 vs 115 µs of host wall — CUDA C++ up to N = 8192; backward
# CUDA C++ vs Triton 309 vs 393 at 4096, 595 vs 840 at 8192 — CUDA C++ up to N = 8192, and up
# to 16384 for norms with a bias and for fp32 rows (_bwd_size). Kept where Triton's backward
# became the faster on the device (H100, 2026-12-05: 92 vs 100 µs with the dW/dB sum at 1024,
# 174 vs 182 at 2048; with its next-row prefetch it comes within ~2% at 8192, 620-630 µs, and
# stays behind at 4096, fwd+bwd 540 vs 511): its launches cost more host time (16 x 4096
# fwd+bwd: 170 vs 128 µs a call, eager 106; bench/results/h100-2026-12-05-r5/
# run3-bench-norm.txt), which decides small models' steps.
FWD_OPS = ("layer_norm_act", "rms_norm_act", "add_layer_norm_act", "add_rms_norm_act",
           "add_layer_norm_act_", "add_rms_norm_act_")
_kernels = {op: Kernels(op, cuda_default="triton", cuda_default_upto=("cuda", 8192)) for op in FWD_OPS}
_bwd = Kernels("norm_act_backward", cuda_default="triton", cuda_default_upto=("cuda", 16384),
               size="the hidden size, doubled for 16-bit rows without a bias")


def _bwd_size(n: int, bias, s_dtype: torch.dtype, dy_dtype: torch.dtype) -> int:
    """The size the backward's default is chosen by: the hidden size, doubled for 16-bit rows
    (s and dy both) without a bias, so that those take Triton's backward above N = 8192. There
    Triton reads 16-bit rows padded to 16384 once (two programs a row) and was the faster
    without a bias (H100, bf16 32768 x 16384 fwd+bwd from a CUDA graph, 2026-12-06: RMS+SiLU
    1914 vs 1996 µs, Add+RMS+SiLU 3002 vs 3307), within ~2% either way with one (LN+SiLU 2143
    vs 2187, LN+GELU(tanh) 2246 vs 2221, CUDA C++ kept). fp32 rows take Triton's two passes
    (s and dy read twice), and CUDA C++ is the faster: RMS+GELU(tanh) fp32 fwd+bwd kernels
    4214 vs 5080 µs at 16384, 2965 vs 3900 at 12288 (bench/results/h100-2026-12-06-r8)."""
    return 2 * n if bias is None and max(s_dtype.itemsize, dy_dtype.itemsize) <= 2 else n


# ---- checks (shared by the real kernels and the fake ones) ------------------------------

def _check(op, x, residual, weight, bias, activation, out_dtype, inplace=False, memory=True):
    _validate.tensor(x, "x", op)
    _validate.floating(x, "x", op)
    if x.dim() == 0:
        raise ValueError(f"fusedops.{op}: x must have at least one dimension (the normalised one)")
    n = x.shape[-1]
    if residual is not None:
        _validate.tensor(residual, "residual", op)
        _validate.same_device(x, "x", residual, "residual", op)
        if residual.shape != x.shape:
            raise ValueError(f"fusedops.{op}: residual has shape {tuple(residual.shape)} but x has shape "
                             f"{tuple(x.shape)}; they must match")
        if residual.dtype != x.dtype:
            raise TypeError(f"fusedops.{op}: residual is {residual.dtype} but x is {x.dtype}; they must match")
        if inplace and memory:
            _validate.internal_overlap(residual, "residual", op)
            _validate.no_partial_overlap(residual, "residual", x, "x", op)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        _validate.tensor(p, name, op)
        _validate.floating(p, name, op)
        _validate.same_device(x, "x", p, name, op)
        if p.dim() != 1 or p.shape[0] != n:
            raise ValueError(f"fusedops.{op}: {name} has shape {tuple(p.shape)} but the hidden size (x's last "
                             f"dim) is {n}; {name} must have shape ({n},)")
    if activation not in _ACT_CODE:
        raise ValueError(f"fusedops.{op}: unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    if out_dtype is not None and not out_dtype.is_floating_point:
        raise TypeError(f"fusedops.{op}: out_dtype must be a floating dtype, got {out_dtype}")


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _out_ok(x_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether the kernels write y (and read dy) in out_dtype for an x (or s) of x_dtype:
    x's dtype; fp32 (eager's output under CUDA autocast for a 16-bit x); or fp16 / bf16 for
    an fp32 x (for a consumer that casts to that dtype anyway, e.g. an nn.Linear under
    autocast: the same values, rounded once). csrc/norm_ops.h's out_dtype_ok says the same."""
    return out_dtype == x_dtype or out_dtype == torch.float32 or (
        x_dtype == torch.float32 and out_dtype in _validate.KERNEL_DTYPES)


def _kernel_ok(x, weight, bias, out_dtype) -> bool:
    kd = _validate.KERNEL_DTYPES
    return (x.dtype in kd and (weight is None or weight.dtype in kd) and (bias is None or bias.dtype in kd)
            and _out_ok(x.dtype, out_dtype))


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """t as (M, N) with unit column stride: a view when possible, else one copy."""
    t2 = t if t.dim() == 2 else t.reshape(-1, n)
    return t2 if t2.stride(1) == 1 or t2.shape[0] * n <= 1 else t2.contiguous()


# ---- the forward kernels ------------------------------------------------------------------

def _forward(op, x, residual, weight, bias, eps, activation, out_dtype, rms, mode):
    """mode: None (no residual), "out" (s returned), "inplace" (s written into residual).
    Returns (y, s or None, mean or None, rstd)."""
    _check(op, x, residual, weight, bias, activation, out_dtype, inplace=mode == "inplace")
    out_dtype = out_dtype or x.dtype
    n = x.shape[-1]
    kernels = _kernels[op]
    if not _kernel_ok(x, weight, bias, out_dtype):
        run_ref = kernels.reference(f"no kernel for x {x.dtype} / weight {getattr(weight, 'dtype', None)} / "
                                    f"out {out_dtype}")
        return run_ref(x, residual, weight, bias, eps, activation, out_dtype, rms, mode)
    return kernels.get(kernels.backend_for(x.device.type, n))(x, residual, weight, bias, eps, activation, out_dtype,
                                                           rms, mode)


def _reference_forward(x, residual, weight, bias, eps, activation, out_dtype, rms, mode):
    s = x if mode is None else reference.residual_sum(x, residual)
    y, mean, rstd = reference.norm_act(s, weight, bias, eps, activation, rms, out_dtype)
    if mode == "inplace":
        residual.copy_(s)
        s = None
    return y, s, mean, rstd


def _fwd_triton(x, residual, weight, bias, eps, activation, out_dtype, rms, mode):
    n = x.shape[-1]
    y = x.new_empty(x.shape, dtype=out_dtype)
    mean = None if rms else x.new_empty(x.shape[:-1], dtype=torch.float32)
    rstd = x.new_empty(x.shape[:-1], dtype=torch.float32)
    if x.numel() == 0:
        if mode == "out":
            return y, torch.empty_like(x, memory_format=torch.contiguous_format), mean, rstd
        return y, None, mean, rstd
    x2 = _rows(x, n)
    r2 = s = s2 = None
    copied = False
    if mode is not None:
        r2 = _rows(residual, n)
        if mode == "out":
            s = x.new_empty(x.shape)
            s2 = s.view(-1, n)
        else:  # in place: into the residual's own rows, or into a copy written back once
            s2 = r2
            copied = r2.untyped_storage().data_ptr() != residual.untyped_storage().data_ptr()
    if x.dim() == 2:  # no views (host time)
        _triton.kernels("norm").fwd(x2, r2, s2, y, weight, bias, mean, rstd, eps, activation, rms)
    else:
        _triton.kernels("norm").fwd(x2, r2, s2, y.view(-1, n), weight, bias,
                                    None if mean is None else mean.view(-1), rstd.view(-1), eps, activation, rms)
    if copied:
        residual.copy_(s2.view(residual.shape))
    return y, s, mean, rstd


_MODE = {None: 0, "out": 1, "inplace": 2}


def _fwd_native(x, residual, weight, bias, eps, activation, out_dtype, rms, mode):
    """One native call: the extension allocates (y, s, mean, rstd) (csrc/norm_ops.h)."""
    y, s, mean, rstd = _native.op("norm_act_fwd")(x, residual, weight, bias, eps, _ACT_CODE[activation], rms,
                                                  _MODE[mode], out_dtype)
    return y, (s if mode == "out" else None), (None if rms else mean), rstd


for _k in _kernels.values():
    _k.register("triton")(_fwd_triton)
    _k.register("cuda")(_fwd_native)
    _k.register("cpp")(_fwd_native)
    _k.register("reference")(_reference_forward)


# ---- the backward kernels ------------------------------------------------------------------

def _backward_impl(dy, s, weight, bias, mean, rstd, activation, ds=None):
    _check_backward(dy, s, weight, bias, mean, rstd, activation, ds)
    if not _kernel_ok(s, weight, bias, dy.dtype) or (ds is not None and ds.dtype not in _validate.KERNEL_DTYPES):
        run = _bwd.reference(f"no kernel for s {s.dtype} / dy {dy.dtype}")
    else:
        run = _bwd.get(_bwd.backend_for(s.device.type, _bwd_size(s.shape[-1], bias, s.dtype, dy.dtype)))
    dx, dw, db = run(dy, s, weight, bias, mean, rstd, activation, ds)
    empty = None if dw is not None and db is not None else s.new_empty(0)
    return dx, (empty if dw is None else dw), (empty if db is None else db)


def _check_backward(dy, s, weight, bias, mean, rstd, activation, ds):
    op = "norm_act_backward"
    _validate.tensor(dy, "dy", op)
    _validate.tensor(s, "s", op)
    _check(op, s, None, weight, bias, activation, None)
    if dy.shape != s.shape:
        raise ValueError(f"fusedops.{op}: dy has shape {tuple(dy.shape)} but s has shape {tuple(s.shape)}")
    if ds is not None and ds.shape != s.shape:
        raise ValueError(f"fusedops.{op}: ds has shape {tuple(ds.shape)} but s has shape {tuple(s.shape)}")
    for name, t in (("rstd", rstd), ("mean", mean)):
        if t is not None and t.shape != s.shape[:-1]:
            raise ValueError(f"fusedops.{op}: {name} has shape {tuple(t.shape)}, expected {tuple(s.shape[:-1])}")


def _backward_fake(dy, s, weight, bias, mean, rstd, activation, ds=None):
    _check_backward(dy, s, weight, bias, mean, rstd, activation, ds)
    dx = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    dw = torch.empty_like(weight) if weight is not None else s.new_empty(0)
    db = torch.empty_like(bias) if bias is not None else s.new_empty(0)
    return dx, dw, db


norm_act_backward_op = define(
    "norm_act_backward(Tensor dy, Tensor s, Tensor? weight, Tensor? bias, Tensor? mean, Tensor rstd, "
    "str activation, Tensor? ds=None) -> (Tensor, Tensor, Tensor)", _backward_impl, _backward_fake)
not_differentiable(norm_act_backward_op)


def _bwd_triton(dy, s, weight, bias, mean, rstd, activation, ds=None):
    n = s.shape[-1]
    dx = s.new_empty(s.shape)
    if s.dim() == 2:  # no reshapes (host time)
        dw, db = _triton.kernels("norm").bwd(dy, _rows(s, n), weight, bias, mean, rstd, ds, dx, activation,
                                             mean is None)
    else:
        dw, db = _triton.kernels("norm").bwd(dy.reshape(-1, n), _rows(s, n), weight, bias,
                                             None if mean is None else mean.reshape(-1), rstd.reshape(-1),
                                             None if ds is None else ds.reshape(-1, n), dx.view(-1, n), activation,
                                             mean is None)
    return dx, dw, db


def _bwd_native(dy, s, weight, bias, mean, rstd, activation, ds=None):
    """One native call: (dx, dW, dB) allocated by the extension, dW/dB summed from fp32
    partial rows in a fixed order and cast to the parameters' dtypes (empty when absent)."""
    return _native.op("norm_act_bwd")(dy, s, weight, bias, mean, rstd, ds, _ACT_CODE[activation])


_bwd.register("triton")(_bwd_triton)
_bwd.register("cuda")(_bwd_native)
_bwd.register("cpp")(_bwd_native)
_bwd.register("reference")(reference.norm_act_backward)


def _grads(dy, s, weight, bias, mean, rstd, activation, ds=None):
    dx, dw, db = norm_act_backward_op(dy, s, weight, bias, mean, rstd, activation, ds)
    return dx, (dw if weight is not None else None), (db if bias is not None else None)


def _wants_graph(*ts) -> bool:
    """A backward running with grad mode on (create_graph) whose inputs (dy, ds, s, weight,
    bias) carry a graph: its gradients must be differentiable themselves."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _grads_graph(dy, s, weight, bias, eps, activation, rms, ds=None):
    """(ds_total, dweight or None, dbias or None) in differentiable torch ops, for double
    backward (create_graph=True): the backward kernels' results have no derivative. y is
    recomputed from s (as saved, not detached: its graph leads back to x / residual), weight
    and bias with the reference formula and differentiated with create_graph=True. dy is
    not None (the callers answer an s-only gradient themselves)."""
    with torch.enable_grad():
        # a tensor without a graph becomes a leaf so that its gradient can be asked for
        s_, w_, b_ = (t if t is None or t.requires_grad else t.detach().requires_grad_() for t in (s, weight, bias))
        y = reference.norm_act(s_, w_, b_, eps, activation, rms, dy.dtype)[0]
        grads = iter(torch.autograd.grad(y, [t for t in (s_, w_, b_) if t is not None], dy, create_graph=True))
        dx = next(grads)
        dw = None if weight is None else next(grads)
        db = None if bias is None else next(grads)
    return (dx if ds is None else dx + ds), dw, db


def _backward_op(ctx, dy, ds, s, weight, bias, mean, rstd):
    """The ops' register_autograd backward: (dx, dweight, dbias). dy is None when only s
    was used (materialisation is off): weight and bias then get no gradient, as eager."""
    if dy is None:
        return ds, None, None
    if _wants_graph(dy, ds, s, weight, bias):
        return _grads_graph(dy, s, weight, bias, ctx.eps, ctx.activation, ctx.rms, ds)
    return _grads(dy, s, weight, bias, mean, rstd, ctx.activation, ds)


# ---- the forward ops ----------------------------------------------------------------------

def _fake_forward(op, x, residual, weight, bias, activation, out_dtype, rms, mode):
    _check(op, x, residual, weight, bias, activation, out_dtype, inplace=mode == "inplace", memory=False)
    y = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    lead = x.shape[:-1]
    mean = None if rms else x.new_empty(lead, dtype=_stat_dtype(x))
    rstd = x.new_empty(lead, dtype=_stat_dtype(x))
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device) if mode == "out" else None
    return y, s, mean, rstd


_OPT = "ScalarType? out_dtype=None"

# layer_norm_act
def _ln_impl(x, weight, bias, eps, activation, out_dtype=None):
    y, _, mean, rstd = _forward("layer_norm_act", x, None, weight, bias, eps, activation, out_dtype, False, None)
    return y, mean, rstd


def _ln_fake(x, weight, bias, eps, activation, out_dtype=None):
    y, _, mean, rstd = _fake_forward("layer_norm_act", x, None, weight, bias, activation, out_dtype, False, None)
    return y, mean, rstd


layer_norm_act_op = define(
    f"layer_norm_act(Tensor x, Tensor? weight, Tensor? bias, float eps, str activation, {_OPT}) "
    "-> (Tensor, Tensor, Tensor)", _ln_impl, _ln_fake)


# rms_norm_act
def _rms_impl(x, weight, eps, activation, out_dtype=None):
    y, _, _, rstd = _forward("rms_norm_act", x, None, weight, None, eps, activation, out_dtype, True, None)
    return y, rstd


def _rms_fake(x, weight, eps, activation, out_dtype=None):
    y, _, _, rstd = _fake_forward("rms_norm_act", x, None, weight, None, activation, out_dtype, True, None)
    return y, rstd


rms_norm_act_op = define(
    f"rms_norm_act(Tensor x, Tensor? weight, float eps, str activation, {_OPT}) -> (Tensor, Tensor)",
    _rms_impl, _rms_fake)


# add_layer_norm_act (s returned)
def _add_ln_impl(x, residual, weight, bias, eps, activation, out_dtype=None):
    return _forward("add_layer_norm_act", x, residual, weight, bias, eps, activation, out_dtype, False, "out")


def _add_ln_fake(x, residual, weight, bias, eps, activation, out_dtype=None):
    return _fake_forward("add_layer_norm_act", x, residual, weight, bias, activation, out_dtype, False, "out")


add_layer_norm_act_op = define(
    f"add_layer_norm_act(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps, str activation, "
    f"{_OPT}) -> (Tensor, Tensor, Tensor, Tensor)", _add_ln_impl, _add_ln_fake)


# add_rms_norm_act (s returned)
def _add_rms_impl(x, residual, weight, eps, activation, out_dtype=None):
    y, s, _, rstd = _forward("add_rms_norm_act", x, residual, weight, None, eps, activation, out_dtype, True, "out")
    return y, s, rstd


def _add_rms_fake(x, residual, weight, eps, activation, out_dtype=None):
    y, s, _, rstd = _fake_forward("add_rms_norm_act", x, residual, weight, None, activation, out_dtype, True, "out")
    return y, s, rstd


add_rms_norm_act_op = define(
    f"add_rms_norm_act(Tensor x, Tensor residual, Tensor? weight, float eps, str activation, {_OPT}) "
    "-> (Tensor, Tensor, Tensor)", _add_rms_impl, _add_rms_fake)


# in place: s into residual
def _add_ln_inplace_impl(x, residual, weight, bias, eps, activation, out_dtype=None):
    y, _, mean, rstd = _forward("add_layer_norm_act_", x, residual, weight, bias, eps, activation, out_dtype, False,
                                "inplace")
    return y, mean, rstd


def _add_ln_inplace_fake(x, residual, weight, bias, eps, activation, out_dtype=None):
    y, _, mean, rstd = _fake_forward("add_layer_norm_act_", x, residual, weight, bias, activation, out_dtype, False,
                                     "inplace")
    return y, mean, rstd


add_layer_norm_act_inplace_op = define(
    f"add_layer_norm_act_(Tensor x, Tensor(a!) residual, Tensor? weight, Tensor? bias, float eps, str activation, "
    f"{_OPT}) -> (Tensor, Tensor, Tensor)", _add_ln_inplace_impl, _add_ln_inplace_fake)


def _add_rms_inplace_impl(x, residual, weight, eps, activation, out_dtype=None):
    y, _, _, rstd = _forward("add_rms_norm_act_", x, residual, weight, None, eps, activation, out_dtype, True,
                             "inplace")
    return y, rstd


def _add_rms_inplace_fake(x, residual, weight, eps, activation, out_dtype=None):
    y, _, _, rstd = _fake_forward("add_rms_norm_act_", x, residual, weight, None, activation, out_dtype, True,
                                  "inplace")
    return y, rstd


add_rms_norm_act_inplace_op = define(
    f"add_rms_norm_act_(Tensor x, Tensor(a!) residual, Tensor? weight, float eps, str activation, {_OPT}) "
    "-> (Tensor, Tensor)", _add_rms_inplace_impl, _add_rms_inplace_fake)


# ---- autograd ------------------------------------------------------------------------------

def _setup(ctx, eps, activation, rms):
    ctx.eps = eps  # (for a double backward's recomputation)
    ctx.activation = activation
    ctx.rms = rms
    ctx.set_materialize_grads(False)  # (an unused y: dy is None, not zeros)


def _setup_ln(ctx, inputs, output):
    x, weight, bias, eps, activation = inputs[:5]
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    _setup(ctx, eps, activation, False)


def _backward_ln(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = _backward_op(ctx, dy, None, x, weight, bias, mean, rstd)
    return dx, dw, db, None, None, None


def _setup_rms(ctx, inputs, output):
    x, weight, eps, activation = inputs[:4]
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    _setup(ctx, eps, activation, True)


def _backward_rms(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw, _ = _backward_op(ctx, dy, None, x, weight, None, None, rstd)
    return dx, dw, None, None, None


def _setup_add_ln(ctx, inputs, output):
    weight, bias, eps, activation = inputs[2:6]
    _, s, mean, rstd = output
    ctx.save_for_backward(s, weight, bias, mean, rstd)
    _setup(ctx, eps, activation, False)


def _backward_add_ln(ctx, dy, ds, _dmean, _drstd):
    s, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = _backward_op(ctx, dy, ds, s, weight, bias, mean, rstd)
    return dx, dx, dw, db, None, None, None


def _setup_add_rms(ctx, inputs, output):
    weight, eps, activation = inputs[2:5]
    _, s, rstd = output
    ctx.save_for_backward(s, weight, rstd)
    _setup(ctx, eps, activation, True)


def _backward_add_rms(ctx, dy, ds, _drstd):
    s, weight, rstd = ctx.saved_tensors
    dx, dw, _ = _backward_op(ctx, dy, ds, s, weight, None, None, rstd)
    return dx, dx, dw, None, None, None


torch.library.register_autograd("fusedops::layer_norm_act", _backward_ln, setup_context=_setup_ln, lib=LIB)
torch.library.register_autograd("fusedops::rms_norm_act", _backward_rms, setup_context=_setup_rms, lib=LIB)
torch.library.register_autograd("fusedops::add_layer_norm_act", _backward_add_ln, setup_context=_setup_add_ln,
                                lib=LIB)
torch.library.register_autograd("fusedops::add_rms_norm_act", _backward_add_rms, setup_context=_setup_add_rms,
                                lib=LIB)


class _AddNormActInplace(torch.autograd.Function):
    """s = x + residual written into residual (marked dirty), y = act(norm(s)*w + b)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, activation, out_dtype, rms):
        # the op writes residual's storage through .data (a view with its own version counter):
        # mark_dirty bumps residual's version once, as eager's residual.add_(x) does
        r = residual.data
        if rms:
            y, rstd = add_rms_norm_act_inplace_op(x, r, weight, eps, activation, out_dtype)
            mean = None
        else:
            y, mean, rstd = add_layer_norm_act_inplace_op(x, r, weight, bias, eps, activation, out_dtype)
        ctx.mark_dirty(residual)
        ctx.mark_non_differentiable(rstd)
        ctx.save_for_backward(residual, weight, bias, mean, rstd)
        _setup(ctx, eps, activation, rms)
        return y, residual

    @staticmethod
    def backward(ctx, dy, ds):
        s, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = _backward_op(ctx, dy, ds, s, weight, bias, mean, rstd)
        return dx, dx, dw, db, None, None, None, None


# ---- host-time fast path ------------------------------------------------------------------
# The public functions below run the kernels through one autograd.Function, without the
# dispatcher round trips of the ops (forward op + register_autograd's generated Function +
# backward op: ~4x the host time of the eager modules on a launch-bound shape), when the
# call is plain: dense torch.Tensor arguments of kernel dtypes, a kernel backend, not under
# tracing or a dispatch mode. Anything else goes through the ops (same kernels, same math).

_FAST: dict = {}


def _fast_kernels(op, x, weight, bias, out_dtype):
    """(forward kernel, backward kernel) for a plain call, or None where the reference would
    run (a dtype without kernels, the reference backend forced): decided once per (op,
    device type, dtypes, hidden size, forced backend). s has x's dtype: a residual reaches
    the kernels in x's dtype (the public functions promote the pair, _check refuses a
    mismatch)."""
    if x.dim() == 0:
        return None  # (the op's checks give the error)
    n = x.shape[-1]
    key = (op, x.device.type, x.dtype, None if weight is None else weight.dtype,
           None if bias is None else bias.dtype, out_dtype, n, _backend_forced())
    hit = _FAST.get(key, False)
    if hit is False:
        hit = None
        if _kernel_ok(x, weight, bias, out_dtype or x.dtype):
            fwd = _kernels[op].backend_for(key[1], n)
            bwd = _bwd.backend_for(key[1], _bwd_size(n, bias, x.dtype, out_dtype or x.dtype))
            if fwd != "reference" and bwd != "reference":
                hit = (_kernels[op].get(fwd), _bwd.get(bwd))
        if len(_FAST) >= 4096:  # (one entry a hidden size and dtypes: bounded for shape-varying callers)
            _FAST.clear()
        _FAST[key] = hit
    return hit


def _backward_direct(dy, s, weight, bias, mean, rstd, activation, ds, run):
    """Gradients with the backward kernel `run` when dy (and ds) are plain tensors of s's
    shape, dy of an output dtype the kernels write for s (_out_ok); else the op."""
    if (type(dy) is torch.Tensor and dy.shape == s.shape and s.numel() and _out_ok(s.dtype, dy.dtype)
            and (ds is None or (type(ds) is torch.Tensor and ds.dtype == s.dtype and ds.shape == s.shape))):
        dx, dw, db = run(dy, s, weight, bias, mean, rstd, activation, ds)
        return dx, (dw if weight is not None else None), (db if bias is not None else None)
    return _grads(dy, s, weight, bias, mean, rstd, activation, ds)


class _NormActFast(torch.autograd.Function):
    """y = act(norm(s) * w + b), s = x or x + residual (returned): the kernels called
    directly (see above); gradients as the ops' register_autograd formulas."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, conf):
        eps, activation, out_dtype, rms, kernels = conf  # (one argument: Function.apply's host time grows with each)
        y, s, mean, rstd = kernels[0](x, residual, weight, bias, eps, activation, out_dtype, rms,
                                      None if residual is None else "out")
        ctx.save_for_backward(x if s is None else s, weight, bias, mean, rstd)
        ctx.activation = activation
        ctx.conf = conf  # (eps and rms for a double backward)
        ctx.has_r = residual is not None
        ctx.bwd = kernels[1]
        ctx.set_materialize_grads(False)
        return y if s is None else (y, s)

    @staticmethod
    def backward(ctx, dy, ds=None):
        s, weight, bias, mean, rstd = ctx.saved_tensors
        if dy is None:  # only s was used: the norm's backward does not run (no dW/dB), as eager
            dx, dw, db = ds, None, None
        elif torch.is_grad_enabled():  # create_graph
            if _wants_graph(dy, ds, s, weight, bias):  # differentiable gradients
                dx, dw, db = _grads_graph(dy, s, weight, bias, ctx.conf[0], ctx.activation, ctx.conf[3], ds)
            else:  # the op, as the ops' own autograd path does
                dx, dw, db = _grads(dy, s, weight, bias, mean, rstd, ctx.activation, ds)
        else:  # (once_differentiable without its wrapper's host time)
            dx, dw, db = _backward_direct(dy, s, weight, bias, mean, rstd, ctx.activation, ds, ctx.bwd)
        return dx, (dx if ctx.has_r else None), dw, db, None


def _direct(op, x, residual, weight, bias, eps, activation, od, rms):
    """(y, s) through the fast path, or None when the call is not plain."""
    if not _validate.plain_call(x, residual, weight, bias):
        return None
    kernels = _fast_kernels(op, x, weight, bias, od)
    if kernels is None:
        return None
    _check(op, x, residual, weight, bias, activation, od)
    od = od or x.dtype
    if _needs_grad(x, residual, weight, bias):
        out = _NormActFast.apply(x, residual, weight, bias, (eps, activation, od, rms, kernels))
        return (out, None) if residual is None else out
    y, s, _, _ = kernels[0](x, residual, weight, bias, eps, activation, od, rms, None if residual is None else "out")
    return y, s


# ---- under torch.compile --------------------------------------------------------------------
# The compiler cannot fuse an opaque op with its neighbours (the residual add before the
# norm, the dtype cast after it, the residual-gradient sum in the backward): around it those
# become passes of their own. FUSEDOPS_NORM_COMPILE chooses what a compiled graph runs for
# the functional (not in-place) forms:
#   auto (default): torch ops for hidden sizes N <= COMPILE_TORCH_UPTO, the fusedops op above;
#   inductor: torch ops at every N;  op: the fusedops op at every N (as eager).
# Torch ops = the same values as eager torch (F.layer_norm / F.rms_norm + the activation; the
# reference's fp32 math when weight/bias dtypes differ from x's), the op's output dtype.
# H100 (bench/NOTES.md, round 4): GPT-2-small-like (N = 768) fusedops + torch.compile step
# 1.23x compile's with the op, 0.98x with torch ops (the op's host time per call and the
# neighbours inductor fuses into its norm). Compiled alone, LN+GELU(tanh) bf16 32768 rows
# fwd+bwd, inductor's code against the op: H100 833 vs 370 µs at N = 1024, 1088 vs 307 at
# 2048, 2035 vs 506 at 4096; H200 (round 12) 420 vs 147 at 1024, 1713 vs 483 at 4096, 13172
# vs 2485 at 16384. Torch ops up to N = 1024 (the model-level measurement), the op above,
# where inductor's norm costs 3.5-5.3x the op's device time. Read when fusedops is imported;
# `COMPILE_POLICY` changes it at run time.
COMPILE_POLICIES = ("auto", "op", "inductor")
COMPILE_TORCH_UPTO = 1024


def _parse_compile_policy(value: str | None) -> str:
    value = value or "auto"
    if value not in COMPILE_POLICIES:
        raise ValueError(f"FUSEDOPS_NORM_COMPILE: unknown value {value!r}; choose one of {', '.join(COMPILE_POLICIES)}")
    return value


COMPILE_POLICY = _parse_compile_policy(os.environ.get("FUSEDOPS_NORM_COMPILE"))


def _traced_in_torch_ops(op, x, residual, weight, bias, eps, activation, od, rms):
    """(y, s) written in torch ops when torch.compile traces and COMPILE_POLICY says so for
    this hidden size, or under torch.jit.trace (ONNX export, TorchScript: only torch ops
    may appear there); None otherwise (the op runs)."""
    if torch.jit.is_tracing():
        if x.dim() == 0:
            return None
    elif COMPILE_POLICY == "op" or not torch.compiler.is_compiling():
        return None
    elif COMPILE_POLICY == "auto" and (x.dim() == 0 or x.shape[-1] > COMPILE_TORCH_UPTO):
        return None
    _check(op, x, residual, weight, bias, activation, od, memory=False)
    s = x if residual is None else reference.residual_sum(x, residual)
    n = s.shape[-1]
    if all(p is None or p.dtype == s.dtype for p in (weight, bias)):
        z = F.rms_norm(s, (n,), weight, eps) if rms else F.layer_norm(s, (n,), weight, bias, eps)
        y = reference.activation(z, activation)
    else:
        y = reference.norm_act(s, weight, bias, eps, activation, rms, od)[0]
    return y.to(od or x.dtype), (None if residual is None else s)


# ---- public API --------------------------------------------------------------------------

_AUTOCAST_FP32: dict = {}


def _autocast_dtype(x: torch.Tensor, eager_op: str = "layer_norm"):
    """fp32 where eager F.layer_norm / F.rms_norm would run in fp32 under autocast: CUDA
    autocast casts an op to fp32 when it has an AutocastCUDA kernel (layer_norm has one;
    rms_norm has one from some torch version on — asked of the dispatcher, not assumed).
    CPU autocast leaves both in the input dtype."""
    if not (x.device.type == "cuda" and x.dtype in (torch.float16, torch.bfloat16)
            and torch.is_autocast_enabled("cuda")):
        return None
    fp32 = _AUTOCAST_FP32.get(eager_op)
    if fp32 is None:
        fp32 = _AUTOCAST_FP32[eager_op] = torch._C._dispatch_has_kernel_for_dispatch_key(
            f"aten::{eager_op}", "AutocastCUDA")
    return torch.float32 if fp32 else None


def _out_dtype(x: torch.Tensor, out_dtype, op: str, eager_op: str = "layer_norm"):
    """y's dtype for the kernels: out_dtype when given (checked: a floating torch.dtype), else
    eager's under autocast (_autocast_dtype), else None (x's)."""
    if out_dtype is None:
        return _autocast_dtype(x, eager_op)
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise TypeError(f"fusedops.{op}: out_dtype must be a floating torch.dtype or None, got {out_dtype!r}")
    return out_dtype


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts)


_EPS32, _EPS64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps


def _rms_eps(eps, x):
    """F.rms_norm's default: the machine epsilon of the dtype it computes in, fp32 for
    fp16/bf16/fp32 input (its opmath dtype; so also when CUDA autocast runs it in fp32) and
    fp64 for fp64 input."""
    if eps is not None:
        return float(eps)
    return _EPS64 if x.dtype == torch.float64 else _EPS32


def _add_inplace(op, x, residual, weight, bias, eps, activation, od, rms):
    """inplace=True of add_layer_norm_act / add_rms_norm_act: s = x + residual written into
    residual; (y, residual). Every refusal comes before anything is written."""
    _validate.writable(residual, "residual", op)
    if torch.jit.is_tracing():  # torch ops only (see _traced_in_torch_ops): eager's add_, then the norm
        _check(op + "_", x, residual, weight, bias, activation, od, memory=False)  # (add_ checks overlaps)
        residual.add_(x)
        return _traced_in_torch_ops(op, residual, None, weight, bias, eps, activation, od, rms)[0], residual
    if not _needs_grad(x, residual, weight, bias):
        if rms:
            y, _ = add_rms_norm_act_inplace_op(x, residual, weight, eps, activation, od)
        else:
            y, _, _ = add_layer_norm_act_inplace_op(x, residual, weight, bias, eps, activation, od)
        return y, residual
    if residual.is_leaf and residual.requires_grad:  # (eager's add_ refuses before writing, in these words)
        raise RuntimeError("a leaf Variable that requires grad is being used in an in-place operation.")
    compiling = torch.compiler.is_compiling()
    if compiling or residual._is_view():
        # The Function below marks residual dirty, which torch.compile mishandles (the
        # gradient to a residual from outside the graph is lost) and autograd refuses for a
        # view (a Function returning two tensors may not modify one in place): the
        # functional op, then s copied into residual (its view / leaf checks are eager's
        # add_'s and come before the write), with eager's gradients. (Under compile the
        # memory checks are left out, as the in-place op's fake does.)
        _check(op + "_", x, residual, weight, bias, activation, od, inplace=True, memory=not compiling)
        y, s = (_direct(op, x, residual, weight, bias, eps, activation, od, rms)
                or (add_rms_norm_act_op(x, residual, weight, eps, activation, od) if rms
                    else add_layer_norm_act_op(x, residual, weight, bias, eps, activation, od))[:2])
        residual.copy_(s)
        return y, residual
    return _AddNormActInplace.apply(x, residual, weight, bias, eps, activation, od, rms)


def layer_norm_act(x, weight=None, bias=None, eps: float = 1e-5, activation: str = "identity",
                   out_dtype: torch.dtype | None = None):
    """act(F.layer_norm(x, (N,), weight, bias, eps)) over the last dim, fused.

    weight/bias: (N,) or None, any float dtype; y has x's dtype (fp32 under CUDA autocast,
    as eager), or out_dtype when given: y computed in fp32 and rounded once to it, and the
    gradient arriving in that dtype. The kernels write x's dtype, fp32, or fp16 / bf16 for an
    fp32 x (e.g. the autocast dtype for a Linear that would cast y to it: half the bytes
    written and read back; LayerNormAct(autocast_output=True)); other pairs run the
    reference. Differentiable in x, weight and bias."""
    _validate.tensor(x, "x", "layer_norm_act")
    od = _out_dtype(x, out_dtype, "layer_norm_act")
    out = (_traced_in_torch_ops("layer_norm_act", x, None, weight, bias, float(eps), activation, od, False)
           or _direct("layer_norm_act", x, None, weight, bias, float(eps), activation, od, False))
    if out is not None:
        return out[0]
    y, _, _ = layer_norm_act_op(x, weight, bias, float(eps), activation, od)
    return y


def rms_norm_act(x, weight=None, eps: float | None = None, activation: str = "identity",
                 out_dtype: torch.dtype | None = None):
    """act(F.rms_norm(x, (N,), weight, eps)) over the last dim, fused (eps=None: the
    machine epsilon of the compute dtype, as F.rms_norm: fp32's for fp16/bf16/fp32 x);
    out_dtype as in layer_norm_act."""
    _validate.tensor(x, "x", "rms_norm_act")
    _validate.floating(x, "x", "rms_norm_act")
    od = _out_dtype(x, out_dtype, "rms_norm_act", "rms_norm")
    eps = _rms_eps(eps, x)
    out = (_traced_in_torch_ops("rms_norm_act", x, None, weight, None, eps, activation, od, True)
           or _direct("rms_norm_act", x, None, weight, None, eps, activation, od, True))
    if out is not None:
        return out[0]
    y, _ = rms_norm_act_op(x, weight, eps, activation, od)
    return y


def _promoted(x, residual, inplace: bool, op: str):
    """(x, residual) in the dtype eager's x + residual computes in (a differentiable cast of
    the one that differs; the kernels add operands of one dtype). In place the sum is written
    into residual, so its dtype must be that one."""
    _validate.floating(residual, "residual", op)
    dt = torch.promote_types(x.dtype, residual.dtype)
    if inplace and dt != residual.dtype:
        raise TypeError(f"fusedops.{op}: inplace=True writes x + residual ({dt}: x is {x.dtype}) into residual, "
                        f"which is {residual.dtype}; pass a residual of dtype {dt} or inplace=False")
    return (x if x.dtype == dt else x.to(dt)), (residual if residual.dtype == dt else residual.to(dt))


def add_layer_norm_act(x, residual, weight=None, bias=None, eps: float = 1e-5, activation: str = "identity",
                       inplace: bool = False, out_dtype: torch.dtype | None = None):
    """s = x + residual; y = act(F.layer_norm(s, ...)). Returns (y, s).

    inplace=True writes s into `residual` (the returned s is `residual`), saving a buffer
    and a pass; gradients flow to x and residual either way. As eager's residual.add_(x),
    a leaf residual that requires grad is refused under grad mode (nothing written); with
    grad, a residual that is a view (and any residual under torch.compile) takes the
    functional kernel and a copy into residual instead. x and residual of different dtypes
    add in their promoted dtype, as eager's x + residual (e.g. a bf16 branch output under
    autocast into an fp32 residual stream); in place, that must be residual's dtype.
    out_dtype: y's dtype, as in layer_norm_act (s keeps the sum's dtype)."""
    _validate.tensor(x, "x", "add_layer_norm_act")
    _validate.tensor(residual, "residual", "add_layer_norm_act")
    if residual.dtype != x.dtype:
        x, residual = _promoted(x, residual, inplace, "add_layer_norm_act")
    od = _out_dtype(x, out_dtype, "add_layer_norm_act")
    if inplace:
        return _add_inplace("add_layer_norm_act", x, residual, weight, bias, float(eps), activation, od, False)
    out = (_traced_in_torch_ops("add_layer_norm_act", x, residual, weight, bias, float(eps), activation, od, False)
           or _direct("add_layer_norm_act", x, residual, weight, bias, float(eps), activation, od, False))
    if out is not None:
        return out
    y, s, _, _ = add_layer_norm_act_op(x, residual, weight, bias, float(eps), activation, od)
    return y, s


def add_rms_norm_act(x, residual, weight=None, eps: float | None = None, activation: str = "identity",
                     inplace: bool = False, out_dtype: torch.dtype | None = None):
    """s = x + residual; y = act(F.rms_norm(s, ...)). Returns (y, s); inplace and out_dtype
    as in add_layer_norm_act."""
    _validate.tensor(x, "x", "add_rms_norm_act")
    _validate.tensor(residual, "residual", "add_rms_norm_act")
    _validate.floating(x, "x", "add_rms_norm_act")
    if residual.dtype != x.dtype:
        x, residual = _promoted(x, residual, inplace, "add_rms_norm_act")
    od = _out_dtype(x, out_dtype, "add_rms_norm_act", "rms_norm")
    eps = _rms_eps(eps, x)
    if inplace:
        return _add_inplace("add_rms_norm_act", x, residual, weight, None, eps, activation, od, True)
    out = (_traced_in_torch_ops("add_rms_norm_act", x, residual, weight, None, eps, activation, od, True)
           or _direct("add_rms_norm_act", x, residual, weight, None, eps, activation, od, True))
    if out is not None:
        return out
    y, s, _ = add_rms_norm_act_op(x, residual, weight, eps, activation, od)
    return y, s
