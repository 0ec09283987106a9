"""BatchNorm2d (+ activation) ops on a conv output y [N, C, H, W], for fused Conv2d+BN+act.

- bn_stats(y, eps) -> (mean, invstd, var): per-channel batch statistics in fp32 (biased
  var), a deterministic split reduction with Welford/Chan combines.
- bn_act_apply(y, mean, invstd, weight?, bias?, act, slope) -> z: act((y−μ)·r·γ+β),
  math in fp32, z in y's dtype and layout.
- bn_act_backward(dz, y, mean, invstd, weight?, bias?, act, slope) -> (dy, dweight, dbias):
  g = dz·act'(z); dweight = Σg·ŷ, dbias = Σg (fp32); dy = γ·r·(g − Σg/M − ŷ·Σgŷ/M).

Layouts: the kernels read y (and dz) through strides as [N, C, H·W]; contiguous NCHW and
channels_last are read in place (outputs keep y's layout). Any other layout (H and W not
mergeable, e.g. a transposed view) is copied once to contiguous NCHW. Dtypes: y fp32,
fp16, bf16; weight/bias/mean/invstd any float dtype (read as fp32). float64 runs the
eager reference (warned once).

Backends: C++ on CPU tensors (default), Triton (CUDA default; CPU under the
interpreter), CUDA C++ on CUDA tensors. An extension built without one of these
kernels runs the eager reference with a one-time FallbackWarning.
"""
from __future__ import annotations

import torch

from .. import _native, _triton, _validate, reference
from .._backend import Kernels, warn_once
from .._backend import _forced as _backend_forced
from ._library import LIB, define, not_differentiable

STATS, APPLY, BACKWARD = "bn_stats", "bn_act_apply", "bn_act_backward"
ACTIVATIONS = reference.CONV_BN_ACTIVATIONS

# Default on CUDA tensors: the CUDA C++ kernels, faster in 8 of 10 training rows of both
# H100 runs of `fusedops bench --ops convbn` (2026-11-22; bench/NOTES.md).
_stats = Kernels(STATS, cuda_default="cuda")
_apply = Kernels(APPLY, cuda_default="cuda")
_backward = Kernels(BACKWARD, cuda_default="cuda")


# ---- checks (shared by the real kernels and the fake ones) ------------------------------

def _check_y(y, op: str, name: str = "y") -> None:
    _validate.tensor(y, name, op)
    _validate.floating(y, name, op)
    if y.dim() != 4:
        raise ValueError(f"fusedops.{op}: {name} must be 4-D [N, C, H, W], got shape {tuple(y.shape)}")


def _check_channel(t, name: str, y, op: str) -> None:
    if t is None:
        return
    _validate.tensor(t, name, op)
    _validate.floating(t, name, op)
    _validate.same_device(y, "y", t, name, op)
    if t.dim() != 1 or t.shape[0] != y.shape[1]:
        raise ValueError(f"fusedops.{op}: {name} must have shape ({y.shape[1]},) (one value per channel "
                         f"of y), got {tuple(t.shape)}")


def _check_act(act: str, op: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"fusedops.{op}: act must be one of {', '.join(ACTIVATIONS)}, got {act!r}")


def _check_common(op, y, mean, invstd, weight, bias, act):
    _check_y(y, op)
    _check_channel(mean, "mean", y, op)
    _check_channel(invstd, "invstd", y, op)
    _check_channel(weight, "weight", y, op)
    _check_channel(bias, "bias", y, op)
    _check_act(act, op)


# ---- outputs (tests replace these with NaN-filled allocations: an unwritten element fails) ---

def _out_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t)


def _out_channels(c: int, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(c, dtype=torch.float32)


# ---- layouts -------------------------------------------------------------------------------

def _mergeable(t: torch.Tensor) -> bool:
    """t [N, C, H, W] can be addressed as [N, C, H·W] with one stride for H·W."""
    n, c, h, w = t.shape
    return h == 1 or w == 1 or t.stride(2) == w * t.stride(3)


def _normalize_hw(t: torch.Tensor) -> torch.Tensor:
    """A view whose stride(3) is the H·W stride (so the kernels can read stride(3))."""
    n, c, h, w = t.shape
    if w == 1 and h > 1:
        return t.as_strided((n, c, 1, h), (t.stride(0), t.stride(1), t.stride(2) * h, t.stride(2)))
    return t


def _channels_last(t: torch.Tensor) -> bool:
    return t.stride(1) == 1 and t.shape[1] > 1


def _dense_copy(t: torch.Tensor) -> torch.Tensor:
    """t itself where it is dense NCHW or dense channels_last, else a contiguous NCHW copy.
    The kernels write z / dy with the strides of the y they read, into a buffer allocated
    with empty_like of it: only a dense y gives one with y's strides (a channel or batch
    slice is mergeable but not dense: empty_like of it is a smaller contiguous buffer,
    which y's strides would overrun)."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def _prepare(t: torch.Tensor) -> torch.Tensor:
    """A tensor only read (bn_stats' y, dz): read in place through its strides where H and
    W are mergeable (slices included), else copied once to contiguous NCHW."""
    return _normalize_hw(t if _mergeable(t) else t.contiguous())


def _kernel_dtype(*ts) -> bool:
    return all(t is None or t.dtype in _validate.KERNEL_DTYPES for t in ts)


# ---- bn_stats ------------------------------------------------------------------------------

def _stats_impl(y, eps=1e-5):
    _check_y(y, STATS)
    c = y.shape[1]
    if y.numel() == 0:
        nan = torch.full((c,), float("nan"), device=y.device, dtype=torch.float32)
        return nan, nan.clone(), nan.clone()
    backend = _stats.backend_for(y.device.type)
    if backend == "reference" or not _kernel_dtype(y):
        if backend != "reference":
            return _stats.reference(f"no kernel for {y.dtype}")(y, eps)
        return reference.bn_stats(y, eps)
    return _stats.get(backend)(y, eps)


def _stats_fake(y, eps=1e-5):
    _check_y(y, STATS)
    c = y.shape[1]
    out = y.new_empty((c,), dtype=torch.float32)
    return out, out.new_empty((c,)), out.new_empty((c,))


bn_stats_op = define(f"{STATS}(Tensor y, float eps=1e-05) -> (Tensor mean, Tensor invstd, Tensor var)",
                     _stats_impl, _stats_fake)


@_stats.register("triton")
def _stats_triton(y, eps):
    yk = _prepare(y)
    c = y.shape[1]
    out = (_out_channels(c, y), _out_channels(c, y), _out_channels(c, y))
    _triton.kernels("batchnorm").bn_stats(yk, float(eps), _channels_last(yk), *out)
    return out


_stats.register("reference")(reference.bn_stats)


# ---- bn_act_apply --------------------------------------------------------------------------

def _apply_impl(y, mean, invstd, weight=None, bias=None, act="identity", slope=0.01):
    _check_common(APPLY, y, mean, invstd, weight, bias, act)
    backend = _apply.backend_for(y.device.type)
    if backend == "reference" or not _kernel_dtype(y, mean, invstd, weight, bias):
        fn = reference.bn_act_apply if backend == "reference" else _apply.reference(
            f"no kernel for {y.dtype}")
        return fn(y, mean, invstd, weight, bias, act, slope)
    if y.numel() == 0:
        return torch.empty_like(y)
    return _apply.get(backend)(y, mean, invstd, weight, bias, act, slope)


def _apply_fake(y, mean, invstd, weight=None, bias=None, act="identity", slope=0.01):
    _check_common(APPLY, y, mean, invstd, weight, bias, act)
    return torch.empty_like(y)


bn_act_apply_op = define(
    f"{APPLY}(Tensor y, Tensor mean, Tensor invstd, Tensor? weight=None, Tensor? bias=None, "
    "str act='identity', float slope=0.01) -> Tensor", _apply_impl, _apply_fake)


def _contig(t):
    return None if t is None else t.contiguous()


@_apply.register("triton")
def _apply_triton(y, mean, invstd, weight, bias, act, slope):
    yd = _dense_copy(y)
    yk = _normalize_hw(yd)
    z, zk = _outs(y, yd)
    _triton.kernels("batchnorm").bn_act_apply(yk, _normalize_hw(zk), mean.contiguous(), invstd.contiguous(),
                                              _contig(weight), _contig(bias), act, float(slope),
                                              _channels_last(yk))
    if zk is not z:
        z.copy_(zk)
    return z


def _outs(y: torch.Tensor, yd: torch.Tensor, out=None):
    """(z, zk): z the op's output (empty_like(y), or `out`: y's layout as the fake kernels
    and eager give it), zk what the kernels write with yd's strides: z itself where its
    strides are yd's (y dense NCHW / channels_last, or a slice whose empty_like is
    contiguous NCHW), else a buffer with yd's strides copied into z afterwards."""
    z = _out_like(y) if out is None else out
    return z, (z if z.stride() == yd.stride() else _out_like(yd))


_apply.register("reference")(reference.bn_act_apply)


# ---- bn_act_backward -----------------------------------------------------------------------

def _backward_check(dz, y, mean, invstd, weight, bias, act):
    _check_common(BACKWARD, y, mean, invstd, weight, bias, act)
    _validate.tensor(dz, "dz", BACKWARD)
    _validate.same_device(y, "y", dz, "dz", BACKWARD)
    if dz.shape != y.shape:
        raise ValueError(f"fusedops.{BACKWARD}: dz has shape {tuple(dz.shape)} but y has {tuple(y.shape)}")


def _backward_impl(dz, y, mean, invstd, weight=None, bias=None, act="identity", slope=0.01):
    _backward_check(dz, y, mean, invstd, weight, bias, act)
    backend = _backward.backend_for(y.device.type)
    if backend == "reference" or not _kernel_dtype(dz, y, mean, invstd, weight, bias):
        fn = reference.bn_act_backward if backend == "reference" else _backward.reference(
            f"no kernel for {y.dtype}")
        return fn(dz, y, mean, invstd, weight, bias, act, slope)
    if y.numel() == 0:
        z = torch.zeros(y.shape[1], device=y.device, dtype=torch.float32)
        return torch.empty_like(y), z, z.clone()
    return _backward.get(backend)(dz, y, mean, invstd, weight, bias, act, slope)


def _backward_fake(dz, y, mean, invstd, weight=None, bias=None, act="identity", slope=0.01):
    _backward_check(dz, y, mean, invstd, weight, bias, act)
    c = y.shape[1]
    return torch.empty_like(y), y.new_empty((c,), dtype=torch.float32), y.new_empty((c,), dtype=torch.float32)


bn_act_backward_op = define(
    f"{BACKWARD}(Tensor dz, Tensor y, Tensor mean, Tensor invstd, Tensor? weight=None, Tensor? bias=None, "
    "str act='identity', float slope=0.01) -> (Tensor dy, Tensor dweight, Tensor dbias)",
    _backward_impl, _backward_fake)
for _op in (bn_stats_op, bn_act_apply_op, bn_act_backward_op):
    not_differentiable(_op)


@_backward.register("triton")
def _backward_triton(dz, y, mean, invstd, weight, bias, act, slope, out=None):
    yd = _dense_copy(y)
    yk = _normalize_hw(yd)
    dzk = _prepare(dz)
    dy, dyk = _outs(y, yd, out)
    dw, db = _triton.kernels("batchnorm").bn_act_backward(
        dzk, yk, _normalize_hw(dyk), mean.contiguous(), invstd.contiguous(), _contig(weight), _contig(bias),
        act, float(slope), _channels_last(yk))
    if dyk is not dy:
        dy.copy_(dyk)
    return dy, dw, db


_backward.register("reference")(reference.bn_act_backward)


# ---- native kernels (C++ CPU, CUDA C++): outputs allocated here, written there ------------

_READY: dict = {}


def _native_ready(op: str, device_type: str) -> bool:
    key = (op, device_type, _native.ops is not None)
    ready = _READY.get(key)
    if ready is None:  # the dispatcher lookup costs ~10 µs: once per (op, device type)
        dk = "CUDA" if device_type == "cuda" else "CPU"
        ready = _READY[key] = _native.ops is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
            f"fusedops_C::{op}", dk)
    return ready


def _f32(t):
    if t.dtype is torch.float32 and t.is_contiguous():
        return t
    return t.to(torch.float32).contiguous()


_CONSTANTS: dict = {}


def _constant(value: float, c: int, like) -> torch.Tensor:
    """A cached fp32 [c] tensor of `value` (read-only by the kernels), one per device."""
    key = (value, c, like.device)
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) > 256:
            _CONSTANTS.clear()
        t = _CONSTANTS[key] = torch.full((c,), value, device=like.device, dtype=torch.float32)
    return t


def affine32(weight, bias, c, like):
    w = _f32(weight) if weight is not None else _constant(1.0, c, like)
    b = _f32(bias) if bias is not None else _constant(0.0, c, like)
    return w, b


def _native_or_reference(kernels: Kernels, op: str, native, ref):
    def run(*args, **kwargs):
        if _native_ready(op, args[0].device.type):
            return native(*args, **kwargs)
        warn_once(f"fusedops.{kernels.op}: the extension has no {op} kernel for {args[0].device.type} tensors "
                  "(rebuild fusedops); running the eager reference")
        return ref(*args)  # allocates its own outputs (an `out` hint is dropped)
    return run


def _stats_native(y, eps):
    yk = _prepare(y)
    c = y.shape[1]
    mean = _out_channels(c, y)
    invstd, var = _out_channels(c, y), _out_channels(c, y)
    _native.op(STATS)(yk, float(eps), mean, invstd, var)
    return mean, invstd, var


def _apply_native(y, mean, invstd, weight, bias, act, slope):
    yd = _dense_copy(y)  # zk is written with yd's strides: see _dense_copy, _outs
    z, zk = _outs(y, yd)
    w, b = affine32(weight, bias, y.shape[1], y)
    _native.op(APPLY)(_normalize_hw(yd), _f32(mean), _f32(invstd), w, b, ACT_CODES[act], float(slope),
                      _normalize_hw(zk))
    if zk is not z:
        z.copy_(zk)
    return z


def _backward_native(dz, y, mean, invstd, weight, bias, act, slope, out=None):
    yd = _dense_copy(y)  # dyk is written with yd's strides: see _dense_copy, _outs
    yk, dzk = _normalize_hw(yd), _prepare(dz)
    dy, dyk = _outs(y, yd, out)
    w, b = affine32(weight, bias, y.shape[1], y)
    c = y.shape[1]
    dw = _out_channels(c, y)
    db = _out_channels(c, y)
    _native.op(BACKWARD)(dzk, yk, _f32(mean), _f32(invstd), w, b, ACT_CODES[act], float(slope),
                         _normalize_hw(dyk), dw, db)
    if dyk is not dy:
        dy.copy_(dyk)
    return dy, dw, db


ACT_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}

for _k, _op, _nat, _ref in ((_stats, STATS, _stats_native, reference.bn_stats),
                            (_apply, APPLY, _apply_native, reference.bn_act_apply),
                            (_backward, BACKWARD, _backward_native, reference.bn_act_backward)):
    _k.register("cpp")(_native_or_reference(_k, _op, _nat, _ref))
    _k.register("cuda")(_native_or_reference(_k, _op, _nat, _ref))


# ---- public API ----------------------------------------------------------------------------

def bn_stats(y: torch.Tensor, eps: float = 1e-5):
    """Per-channel (mean, invstd, biased var) of y [N, C, H, W], fp32."""
    _validate.tensor(y, "y", STATS)
    return bn_stats_op(y, float(eps))


def bn_act_apply(y, mean, invstd, weight=None, bias=None, act: str = "identity", slope: float = 0.01):
    """act((y − mean)·invstd·weight + bias), fp32 math, output in y's dtype and layout."""
    _validate.tensor(y, "y", APPLY)
    return bn_act_apply_op(y, mean, invstd, weight, bias, act, float(slope))


def bn_act_backward(dz, y, mean, invstd, weight=None, bias=None, act: str = "identity", slope: float = 0.01):
    """(dy, dweight, dbias) of bn_act_apply with batch statistics (training mode)."""
    _validate.tensor(dz, "dz", BACKWARD)
    _validate.tensor(y, "y", BACKWARD)
    return bn_act_backward_op(dz, y, mean, invstd, weight, bias, act, float(slope))


# ---- direct entry points for fusedops' own modules (host-time fast path) -------------------
# ConvBNAct2d calls these from inside its autograd.Function with tensors it made itself:
# in the common case (plain dense tensors of a kernel dtype, a kernel backend, not under
# tracing) they call the backend directly, skipping the dispatcher round trip and the
# argument checks (~30 µs of host time per block); anything else goes through the op.

def _plain(y: torch.Tensor) -> bool:
    return (type(y) is torch.Tensor and y.dtype in _validate.KERNEL_DTYPES and y.numel() > 0
            and (y.is_contiguous() or y.is_contiguous(memory_format=torch.channels_last))
            and not torch.compiler.is_compiling())


def _direct(kernels: Kernels, y: torch.Tensor):
    backend = kernels.backend_for(y.device.type)
    return None if backend == "reference" else kernels.get(backend)


def stats_direct(y: torch.Tensor, eps: float):
    fn = _direct(_stats, y) if _plain(y) else None
    return fn(y, eps) if fn is not None else bn_stats_op(y, eps)


_NATIVE = ("cuda", "cpp")


def forward_direct(y: torch.Tensor, eps: float, weight, bias, act: str, slope: float, running=None):
    """(z, mean, invstd, var) of the training forward, op by op: stats (and the
    running-statistics update where `running` is given, see stats_running_direct), then
    apply. (With the native kernels ConvBNAct2d runs conv_bn_act_fwd instead.)"""
    if running is not None:
        mean, invstd, var = stats_running_direct(y, eps, running)
    else:
        mean, invstd, var = stats_direct(y, eps)
    return apply_direct(y, mean, invstd, weight, bias, act, slope), mean, invstd, var


def running_ok(device: torch.device, running) -> bool:
    """The native kernels can update these running statistics (fp32, dense, on `device`,
    the statistics' input's) in place."""
    rm, rv = running[0], running[1]
    return (_native_ready(RUNNING, device.type) and rm.dtype is torch.float32 and rv.dtype is torch.float32
            and rm.is_contiguous() and rv.is_contiguous() and rm.device == device and rv.device == device)


def stats_running_direct(y: torch.Tensor, eps: float, running: list):
    """stats_direct, and where a native kernel takes it, eager's running-statistics update
    in the same launch: running = [running_mean, running_var, momentum, done]; done is
    set True when the buffers were updated here (else the caller updates them)."""
    if _plain(y) and _stats.backend_for(y.device.type) in _NATIVE and running_ok(y.device, running):
        c = y.shape[1]
        mean, invstd, var = _out_channels(c, y), _out_channels(c, y), _out_channels(c, y)
        _native.op(RUNNING)(_normalize_hw(y), eps, running[2], mean, invstd, var, running[0], running[1])
        running[3] = True
        return mean, invstd, var
    return stats_direct(y, eps)


RUNNING = "bn_stats_running"


def apply_direct(y, mean, invstd, weight, bias, act: str, slope: float):
    fn = _direct(_apply, y) if _plain(y) else None
    if fn is None or not _kernel_dtype(weight, bias):
        return bn_act_apply_op(y, mean, invstd, weight, bias, act, slope)
    return fn(y, mean, invstd, weight, bias, act, slope)


def backward_direct(dz, y, mean, invstd, weight, bias, act: str, slope: float, dy_into_y: bool = False):
    """dy_into_y: y is a scratch tensor of the caller's; dy may be written over it (the
    kernels read each element of y before writing dy there) — one activation less."""
    plain = (_plain(y) and type(dz) is torch.Tensor and dz.dtype in _validate.KERNEL_DTYPES and dz.shape == y.shape
             and _kernel_dtype(weight, bias))
    fn = _direct(_backward, y) if plain else None
    if fn is None:
        return bn_act_backward_op(dz, y, mean, invstd, weight, bias, act, slope)
    if dy_into_y and not _overlaps(dz, y):
        return fn(dz, y, mean, invstd, weight, bias, act, slope, out=y)
    return fn(dz, y, mean, invstd, weight, bias, act, slope)


# ---- the whole training step of ConvBNAct2d in one native call per direction -------------
# (csrc/convbn.cpp: the conv through the dispatcher, then the kernels of this file's ops)

TRAIN_FWD, TRAIN_BWD = "conv_bn_act_fwd", "conv_bn_act_bwd"
TRAIN_TRACED = "conv_bn_act_train"  # the forward torch.compile traces (fusedops/ops/convbn.py)


def train_native_args(x: torch.Tensor, device: torch.device, weight: torch.Tensor, gamma, beta, running):
    """The arguments conv_bn_act_fwd takes beyond the conv's, (gamma32, beta32,
    running_mean, running_var, momentum), when the native step can run this call: plain
    tensors of a kernel dtype, the native BN kernels selected and built for x's device, not
    under tracing or a dispatch mode; else None. running: [running_mean, running_var, momentum, done] or None;
    done is set when the op will update the buffers (fp32, dense, on x's device). The
    backend and dtype part is decided once per (device type, dtypes, forced backend): host
    time."""
    if (not _validate.plain_call(x, weight, gamma, beta) or x.numel() == 0 or weight.numel() == 0
            or not train_native_ready(device.type, x.dtype, None if gamma is None else gamma.dtype,
                                      None if beta is None else beta.dtype)):
        return None
    g32, b32 = affine32(gamma, beta, weight.shape[0], x)
    if running is not None and running_ok(device, running):
        running[3] = True
        return g32, b32, running[0], running[1], running[2]
    return g32, b32, None, None, 0.0


def train_native_ready(device_type: str, dtype: torch.dtype, gamma_dtype, beta_dtype) -> bool:
    """The native step serves a conv input of `dtype` with γ / β of these dtypes (None:
    absent) on this device type: kernel dtypes, the native BN kernels selected and built.
    Decided once per (device type, dtypes, forced backend): host time."""
    key = (device_type, dtype, gamma_dtype, beta_dtype, _backend_forced())
    ready = _TRAIN_READY.get(key)
    if ready is None:
        ready = _TRAIN_READY[key] = bool(
            all(d is None or d in _validate.KERNEL_DTYPES for d in key[1:4])
            and _stats.backend_for(device_type) in _NATIVE and _apply.backend_for(device_type) in _NATIVE
            and _backward.backend_for(device_type) in _NATIVE and _native_ready(RUNNING, device_type)
            and _native_ready(STATS, device_type) and _native_ready(APPLY, device_type)
            and _native_ready(BACKWARD, device_type) and has_native_train_ops())
    return ready


def has_native_train_ops() -> bool:
    """The extension has the native training step's ops (csrc/convbn.cpp)."""
    return _native.ops is not None and all(hasattr(_native.ops, n) for n in (TRAIN_FWD, TRAIN_BWD, TRAIN_TRACED))


_TRAIN_READY: dict = {}


def op_train_fwd():
    return _native.op(TRAIN_FWD)


def op_train_bwd():
    return _native.op(TRAIN_BWD)


def op_train_traced():
    return _native.op(TRAIN_TRACED)


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def bias_act_(y: torch.Tensor, bias32: torch.Tensor, act: str, slope: float) -> bool:
    """y ← act(y + bias) in place with the apply kernel (inference epilogue of a folded
    conv); bias32 fp32 contiguous [C]. Returns False, writing nothing, when no kernel
    takes y (the caller then runs eager ops)."""
    if not _plain(y):
        return False
    backend = _apply.backend_for(y.device.type)
    c = y.shape[1]
    zeros, ones = _constant(0.0, c, y), _constant(1.0, c, y)
    yk = _normalize_hw(y)
    if backend == "triton":
        _triton.kernels("batchnorm").bn_act_apply(yk, yk, zeros, ones, None, bias32, act, float(slope),
                                                  _channels_last(yk))
    elif backend in ("cuda", "cpp") and _native_ready(APPLY, y.device.type):
        _native.op(APPLY)(yk, zeros, ones, ones, bias32, ACT_CODES[act], float(slope), yk)
    else:
        return False
    return True
