"""The training step of Conv2d(bias-free) → BatchNorm2d(batch statistics) → activation.

`train_forward` / `train_backward` run it with whatever kernels serve the call: the one
native call per direction of csrc/convbn.cpp where the native BN kernels are selected
(C++ / CUDA C++), else the conv through PyTorch and the BN ops one by one. ConvBNAct2d's
autograd.Function (fusedops/nn_convbn.py) calls them in eager mode.

Under torch.compile the module calls `train_traced` instead: one op per direction, whose
backward recomputes the conv output from x. The conv output lives only inside the
forward op, so the compiled graph cannot save it (traced op by op, the partitioner kept
it: the memory saving was lost). With keep_y=True (memory="fast") the op returns y and
the backward reads it. The op is the C++ fusedops_C::conv_bn_act_train where the native
kernels serve (its backward fusedops_C::conv_bn_act_bwd), else
`fusedops::conv_bn_act_train` (backward `fusedops::conv_bn_act_train_backward`), whose
Python kernel picks the kernels each call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _validate
from . import batchnorm as bnops
from ._library import LIB, define, not_differentiable

NO_OUTPUT_PADDING = [0, 0]


def no_autocast(device_type: str):
    """autocast off: the C++ guard (~0.6 µs) outside tracing, torch.autocast (~5 µs of
    Python per enter/exit) where torch.compile must see it."""
    if _DISABLE_AUTOCAST is None or torch.compiler.is_compiling():
        return torch.autocast(device_type, enabled=False)
    return _DISABLE_AUTOCAST()


_DISABLE_AUTOCAST = getattr(torch._C, "_DisableAutocast", None)


def check_step_shapes(x, weight, stride, padding, dilation, groups) -> None:
    """Eager's errors for operands the training step cannot take, raised before the native
    step runs: where eager's conv would refuse them for a reason known beforehand (different
    dtypes or devices, channels that do not match the groups, a dilated kernel larger than
    the padded input), the conv itself is run here so that its own message is raised (an
    error inside the native step's dispatcher call reaches Python without it, and in the
    CUDA step, on torch 2.11, crashed the process); then BatchNorm's error for one value per
    channel (batch 1, 1×1 output)."""
    xs, ws = x.shape, weight.shape  # (every forward runs this: plain arithmetic, host time)
    kh, kw = dilation[0] * (ws[2] - 1) + 1, dilation[1] * (ws[3] - 1) + 1
    ph, pw = xs[2] + 2 * padding[0], xs[3] + 2 * padding[1]
    if x.dtype != weight.dtype or x.device != weight.device or xs[1] != ws[1] * groups or ph < kh or pw < kw:
        with no_autocast(x.device.type):  # the operands as the native step would get them
            F.conv2d(x, weight, None, stride, padding, dilation, groups)
    if xs[0] != 1:
        return
    hw = [(ph - kh) // stride[0] + 1, (pw - kw) // stride[1] + 1]
    if hw[0] * hw[1] <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{[x.shape[0], weight.shape[0], *hw]}")


def _native_call(op, args, x, w, geometry):
    """op(*args); where it fails inside a dispatcher call from the extension (the stable ABI
    of this torch passes a bare "API call failed" without the message), the conv is run
    again from Python so that its own error (e.g. out of memory) is what the caller sees.
    The errors known beforehand are raised by check_step_shapes before the call."""
    try:
        return op(*args)
    except RuntimeError as exc:
        if "API call failed" not in str(exc):
            raise
        stride, padding, dilation, groups = geometry
        F.conv2d(x, w, None, stride, padding, dilation, groups)
        raise


def train_forward(x, w, gamma, beta, geometry, eps: float, act: str, slope: float, running=None):
    """(z, mean, invstd, var, y): y = conv(x, w) (no bias), batch statistics of y (fp32,
    biased var), z = act(BN(y)). running: [running_mean, running_var, momentum, done] or
    None; done is set when the buffers were updated here (else the caller updates them)."""
    stride, padding, dilation, groups = geometry
    native = bnops.train_native_args(x, x.device, w, gamma, beta, running)
    if native is not None:  # conv, stats (+ running update) and apply in one native call
        g32, b32, rm, rv, momentum = native
        return _native_call(bnops.op_train_fwd(), (x, w, stride, padding, dilation, groups, eps, g32, b32,
                                                   bnops.ACT_CODES[act], slope, momentum, rm, rv), x, w, geometry)
    y = F.conv2d(x, w, None, stride, padding, dilation, groups)
    z, mean, invstd, var = bnops.forward_direct(y, eps, gamma, beta, act, slope, running)
    return z, mean, invstd, var, y


def train_backward(dz, x, w, y, mean, invstd, gamma, beta, geometry, act: str, slope: float, needs_dx: bool,
                   needs_dw: bool, split: bool = False, native=None):
    """(dy or None, dx or None, dw or None, dgamma, dbeta), dgamma/dbeta fp32 sums. y: the
    forward's conv output, or None: recomputed from x (in the saved dtypes) and dy written
    over it. split: dX is left to the caller (who releases x first): dy is returned.
    native: (γ, β in fp32) where the forward ran the native step (its kernels run the
    backward too), else None: decided here."""
    stride, padding, dilation, groups = geometry
    dev = x.device.type
    if torch.is_autocast_enabled(dev):  # the recompute conv runs in the saved dtypes
        with no_autocast(dev):
            return train_backward(dz, x, w, y, mean, invstd, gamma, beta, geometry, act, slope, needs_dx, needs_dw,
                                  split, native)
    if type(dz) is not torch.Tensor or dz.dtype not in _validate.KERNEL_DTYPES:
        native = None
    elif native is None:
        native = bnops.train_native_args(x, x.device, w, gamma, beta, None)
    if native is not None:  # conv recompute, BN backward, dW and (unless split) dX: one native call
        mask = (1 if needs_dx else 0) | (2 if needs_dw else 0) | (4 if split else 0)
        return _native_call(bnops.op_train_bwd(), (dz, x, w, y, stride, padding, dilation, groups, mean, invstd,
                                                   native[0], native[1], bnops.ACT_CODES[act], slope, mask),
                            x, w, geometry)
    recompute = y is None
    if recompute:
        y = F.conv2d(x, w, None, stride, padding, dilation, groups)
    dy, dgamma, dbeta = bnops.backward_direct(dz, y, mean, invstd, gamma, beta, act, slope, dy_into_y=recompute)
    del y
    dx = dw = None
    out = [needs_dx and not split, needs_dw, False]
    if out[0] or out[1]:
        dx, dw, _ = torch.ops.aten.convolution_backward(dy, x, w, None, stride, padding, dilation, False,
                                                        NO_OUTPUT_PADDING, groups, out)
    return (dy if split else None), (dx if out[0] else None), dw, dgamma, dbeta


# ---- the ops torch.compile traces ----------------------------------------------------------

_SCHEMA_GEOMETRY = "int[] stride, int[] padding, int[] dilation, int groups"


def _check(x, w, gamma, beta, act, op):
    _validate.tensor(x, "x", op)
    _validate.tensor(w, "w", op)
    if x.dim() != 4 or w.dim() != 4:
        raise ValueError(f"fusedops.{op}: x and w must be 4-D, got shapes {tuple(x.shape)} and {tuple(w.shape)}")
    for name, p in (("gamma", gamma), ("beta", beta)):
        if p is not None and (p.dim() != 1 or p.shape[0] != w.shape[0]):
            raise ValueError(f"fusedops.{op}: {name} has shape {tuple(p.shape)}, expected ({w.shape[0]},)")
    if act not in bnops.ACT_CODES:
        raise ValueError(f"fusedops.{op}: unknown activation {act!r}; choose one of {', '.join(bnops.ACT_CODES)}")


def _train_impl(x, w, gamma, beta, conv_bias, stride, padding, dilation, groups, eps, act, slope, keep_y):
    _check(x, w, gamma, beta, act, "conv_bn_act_train")
    check_step_shapes(x, w, stride, padding, dilation, groups)
    with no_autocast(x.device.type):
        z, mean, invstd, var, y = train_forward(x, w, gamma, beta, (stride, padding, dilation, groups), eps, act,
                                                slope)
    return z, mean, invstd, var, (y if keep_y else x.new_empty(0))


def _conv_out_fake(x, w, stride, padding, dilation, groups):
    with no_autocast(x.device.type):
        return torch.ops.aten.convolution(x, w, None, stride, padding, dilation, False, NO_OUTPUT_PADDING, groups)


def _step_fake(x, w, stride, padding, dilation, groups, keep_y):
    """The forward's outputs (z, mean, invstd, var, y or an empty tensor) as fake tensors."""
    y = _conv_out_fake(x, w, stride, padding, dilation, groups)
    c = y.shape[1]
    stats = [y.new_empty(c, dtype=torch.float32) for _ in range(3)]
    return torch.empty_like(y), *stats, (y if keep_y else x.new_empty(0))


def _train_fake(x, w, gamma, beta, conv_bias, stride, padding, dilation, groups, eps, act, slope, keep_y):
    _check(x, w, gamma, beta, act, "conv_bn_act_train")
    check_step_shapes(x, w, stride, padding, dilation, groups)
    return _step_fake(x, w, stride, padding, dilation, groups, keep_y)


# conv_bias: the conv's bias (or None); the batch mean absorbs it (its gradient is zero), it
# is an input so that the gradient is zeros, as in eager mode, rather than absent.
train_op = define(
    f"conv_bn_act_train(Tensor x, Tensor w, Tensor? gamma, Tensor? beta, Tensor? conv_bias, {_SCHEMA_GEOMETRY}, "
    "float eps, str act, float slope, bool keep_y) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _train_impl, _train_fake)


def _mask(output_mask, gamma, beta) -> list:
    """[dx, dw, dgamma, dbeta] asked for (no gradient for an absent gamma / beta)."""
    return [bool(output_mask[0]), bool(output_mask[1]), bool(output_mask[2]) and gamma is not None,
            bool(output_mask[3]) and beta is not None]


def _grads(x, w, gamma, beta, mask, dx, dw, dgamma, dbeta):
    """The backward op's outputs: each asked-for gradient in its input's dtype, else empty."""
    return (dx if mask[0] else x.new_empty(0), dw if mask[1] else w.new_empty(0),
            dgamma.to(gamma.dtype) if mask[2] else x.new_empty(0),
            dbeta.to(beta.dtype) if mask[3] else x.new_empty(0))


def _train_backward_impl(dz, x, w, y, mean, invstd, gamma, beta, stride, padding, dilation, groups, act, slope,
                         output_mask):
    _check(x, w, gamma, beta, act, "conv_bn_act_train_backward")
    mask = _mask(output_mask, gamma, beta)
    _, dx, dw, dgamma, dbeta = train_backward(dz, x, w, y, mean, invstd, gamma, beta,
                                              (stride, padding, dilation, groups), act, slope, mask[0], mask[1])
    return _grads(x, w, gamma, beta, mask, dx, dw, dgamma, dbeta)


def _train_backward_fake(dz, x, w, y, mean, invstd, gamma, beta, stride, padding, dilation, groups, act, slope,
                         output_mask):
    _check(x, w, gamma, beta, act, "conv_bn_act_train_backward")
    mask = _mask(output_mask, gamma, beta)
    dy = torch.empty_like(_conv_out_fake(x, w, stride, padding, dilation, groups))
    dx, dw, _ = torch.ops.aten.convolution_backward(dy, x, w, None, stride, padding, dilation, False,
                                                    NO_OUTPUT_PADDING, groups, [True, True, False])
    c = w.shape[0]
    return _grads(x, w, gamma, beta, mask, dx, dw, mean.new_empty(c), mean.new_empty(c))


train_backward_op = define(
    f"conv_bn_act_train_backward(Tensor dz, Tensor x, Tensor w, Tensor? y, Tensor mean, Tensor invstd, Tensor? gamma, "
    f"Tensor? beta, {_SCHEMA_GEOMETRY}, str act, float slope, bool[] output_mask) -> (Tensor, Tensor, Tensor, Tensor)",
    _train_backward_impl, _train_backward_fake)
not_differentiable(train_backward_op)


# ---- the step torch.compile traces where the native kernels serve it -----------------------
# The compiled graph calls the C++ op fusedops_C::conv_bn_act_train (csrc/convbn.cpp) and,
# in its backward, fusedops_C::conv_bn_act_bwd: no Python runs per call. The op above runs
# its Python kernel on every call of a compiled graph (~50 µs forward and ~70 backward of
# host time a layer on a 2-vCPU box, more on the autograd engine's device thread), which
# left ResNet-50's compiled step host-bound. The native ops get their fake and autograd
# formula here; eager mode keeps calling conv_bn_act_fwd / _bwd through its Function.

def _native_train_fake(x, w, stride, padding, dilation, groups, eps, weight, bias, act, slope, keep_y):
    return _step_fake(x, w, stride, padding, dilation, groups, keep_y)


def _native_bwd_fake(dz, x, w, y, stride, padding, dilation, groups, mean, invstd, weight, bias, act, slope, mask):
    dy = torch.empty_like(_conv_out_fake(x, w, stride, padding, dilation, groups) if y is None else y)
    out = [bool(mask & 1) and not mask & 4, bool(mask & 2), False]
    dx, dw, _ = torch.ops.aten.convolution_backward(dy, x, w, None, stride, padding, dilation, False,
                                                    NO_OUTPUT_PADDING, groups, out)
    c = w.shape[0]
    return (dy if mask & 4 else None, dx if out[0] else None, dw if out[1] else None, mean.new_empty(c),
            mean.new_empty(c))


def _native_setup(ctx, inputs, output):
    x, w, stride, padding, dilation, groups, _eps, weight, bias, act, slope, keep_y = inputs
    _z, mean, invstd, _var, y = output
    ctx.save_for_backward(x, w, y if keep_y else None, mean, invstd, weight, bias)
    ctx.conf = (stride, padding, dilation, groups, act, slope)


def _native_backward(ctx, dz, _dmean, _dinvstd, _dvar, _dy):
    x, w, y, mean, invstd, weight, bias = ctx.saved_tensors
    stride, padding, dilation, groups, act, slope = ctx.conf
    needs = ctx.needs_input_grad
    mask = (1 if needs[0] else 0) | (2 if needs[1] else 0)
    _, dx, dw, dgamma, dbeta = bnops.op_train_bwd()(dz, x, w, y, stride, padding, dilation, groups, mean, invstd,
                                                    weight, bias, act, slope, mask)
    # inputs: x, w, stride, padding, dilation, groups, eps, weight (γ), bias (β), act, slope, keep_y
    return (dx, dw, None, None, None, None, None, dgamma if needs[7] else None, dbeta if needs[8] else None, None,
            None, None)


native_train_op = None
if bnops.has_native_train_ops():
    NATIVE_LIB = torch.library.Library("fusedops_C", "FRAGMENT")
    torch.library.register_fake(f"fusedops_C::{bnops.TRAIN_TRACED}", _native_train_fake, lib=NATIVE_LIB)
    torch.library.register_fake(f"fusedops_C::{bnops.TRAIN_BWD}", _native_bwd_fake, lib=NATIVE_LIB)
    torch.library.register_autograd(f"fusedops_C::{bnops.TRAIN_TRACED}", _native_backward,
                                    setup_context=_native_setup, lib=NATIVE_LIB)
    native_train_op = bnops.op_train_traced()


@torch.compiler.assume_constant_result
def _native_serves(device_type: str, dtype: torch.dtype, gamma_dtype, beta_dtype) -> bool:
    """train_native_ready, evaluated once at trace time (a constant of the graph)."""
    return bnops.train_native_ready(device_type, dtype, gamma_dtype, beta_dtype)


def train_traced(x, w, gamma, beta, conv_bias, stride, padding, dilation, groups, eps: float, act: str,
                 slope: float, keep_y: bool):
    """(z, mean, var) of the training step as torch.compile traces it: the native op where
    the native kernels serve x's device and dtypes (decided at trace time: a backend forced
    later does not change a compiled graph) and there is no conv bias, else
    fusedops::conv_bn_act_train (its Python kernel picks the kernels each call)."""
    if (native_train_op is not None and conv_bias is None and x.numel() > 0 and w.numel() > 0
            and _native_serves(x.device.type, x.dtype, None if gamma is None else gamma.dtype,
                               None if beta is None else beta.dtype)):
        _check(x, w, gamma, beta, act, "conv_bn_act_train")
        check_step_shapes(x, w, stride, padding, dilation, groups)
        c = w.shape[0]
        g32 = gamma.float() if gamma is not None else x.new_ones(c, dtype=torch.float32)
        b32 = beta.float() if beta is not None else x.new_zeros(c, dtype=torch.float32)
        z, mean, _, var, _ = native_train_op(x, w, stride, padding, dilation, groups, eps, g32, b32,
                                             bnops.ACT_CODES[act], slope, keep_y)
    else:
        z, mean, _, var, _ = train_op(x, w, gamma, beta, conv_bias, stride, padding, dilation, groups, eps, act,
                                      slope, keep_y)
    return z, mean, var


def _setup(ctx, inputs, output):
    x, w, gamma, beta, conv_bias, stride, padding, dilation, groups, _eps, act, slope, keep_y = inputs
    _z, mean, invstd, _var, y = output
    ctx.save_for_backward(x, w, y if keep_y else None, mean, invstd, gamma, beta)
    ctx.conf = (stride, padding, dilation, groups, act, slope)
    ctx.bias_like = None if conv_bias is None else (conv_bias.shape, conv_bias.dtype, conv_bias.device)


def _backward(ctx, dz, _dmean, _dinvstd, _dvar, _dy):
    x, w, y, mean, invstd, gamma, beta = ctx.saved_tensors
    stride, padding, dilation, groups, act, slope = ctx.conf
    needs = ctx.needs_input_grad
    mask = _mask(needs, gamma, beta)
    dx, dw, dgamma, dbeta = train_backward_op(dz, x, w, y, mean, invstd, gamma, beta, stride, padding, dilation,
                                              groups, act, slope, mask)
    dcb = None
    if needs[4] and ctx.bias_like is not None:
        shape, dtype, device = ctx.bias_like
        dcb = torch.zeros(shape, dtype=dtype, device=device)
    return ((dx if mask[0] else None), (dw if mask[1] else None), (dgamma if mask[2] else None),
            (dbeta if mask[3] else None), dcb) + (None,) * 8


torch.library.register_autograd("fusedops::conv_bn_act_train", _backward, setup_context=_setup, lib=LIB)
