"""In-place add: fusedops.add_(x, y, alpha) and fusedops.foreach_add_(xs, ys, alpha).

x += alpha * y with y broadcast to x, math in fp32, result rounded once to x's dtype —
the same values as eager `x.add_(y, alpha=alpha)`. The foreach form runs many pairs of
any sizes in one launch per (device, x dtype, y dtype) group: the gradient-accumulation
case.

Kernels take x contiguous and y contiguous with y.numel() dividing x.numel() (y repeats
along x's leading dims: same shape, a row or bias vector, a scalar). This module brings
every other valid call to that form: a non-contiguous x is computed in one contiguous
copy and copied back; a y broadcast along inner dims is expanded once.
"""
from __future__ import annotations

import operator

import torch

from .. import _native, _triton, _validate, reference
from .._backend import Kernels
from ._library import define

OP, FOREACH_OP = "add_", "foreach_add_"

# Default on CUDA tensors: the CUDA C++ kernel. Both reach the same bandwidth on large
# tensors; the C++ launch costs less host time, which decides small calls (bench/NOTES.md).
_add = Kernels(OP, cuda_default="cuda")
_foreach = Kernels(FOREACH_OP, cuda_default="cuda")


# ---- checks (shared by the real kernels and the fake ones) ------------------------------

def _check_add(x, y, memory: bool = True) -> None:
    """memory=False (fake tensors): skip the checks that need real addresses."""
    _validate.tensor(x, "x", OP)
    _validate.tensor(y, "y", OP)
    _validate.floating(x, "x", OP)
    _validate.floating(y, "y", OP)
    _validate.same_device(x, "x", y, "y", OP)
    _validate.broadcastable_to(y, "y", x.shape, "x", OP)
    if memory:
        _validate.internal_overlap(x, "x", OP)
        # eager's rule: only a certain partial overlap (both dense) raises; for strided views
        # the check cannot decide, and _add_impl is correct for any overlap (a non-contiguous
        # x is computed in a copy, a non-contiguous y is read from a copy)
        _validate.no_certain_partial_overlap(x, "x", y, "y", OP)


def _check_foreach(xs, ys, memory: bool = True) -> bool:
    """Every check (each error names the argument); True where the lists hold strided views
    whose memory meets that of another pair's and the checks cannot decide whether they
    share elements (eager's rule, see _validate.certain_disjoint_writes): the pairs must
    then run one by one, in order, as eager does."""
    if len(xs) != len(ys):
        raise ValueError(f"fusedops.{FOREACH_OP}: xs has {len(xs)} tensors but ys has {len(ys)}")
    for i, (x, y) in enumerate(zip(xs, ys)):
        xn, yn = f"xs[{i}]", f"ys[{i}]"
        _validate.tensor(x, xn, FOREACH_OP)
        _validate.tensor(y, yn, FOREACH_OP)
        _validate.floating(x, xn, FOREACH_OP)
        _validate.floating(y, yn, FOREACH_OP)
        _validate.same_device(x, xn, y, yn, FOREACH_OP)
        if x.shape != y.shape:
            raise ValueError(f"fusedops.{FOREACH_OP}: {yn} has shape {tuple(y.shape)} but {xn} has "
                             f"shape {tuple(x.shape)}; pairs must match")
        if memory:
            _validate.internal_overlap(x, xn, FOREACH_OP)
            _validate.no_certain_partial_overlap(x, xn, y, yn, FOREACH_OP)
    if memory:
        return _validate.certain_disjoint_writes(xs, ys, FOREACH_OP)
    return False


def _plain_lists_py(xs, ys) -> bool:
    """Python twin of the extension's plain_pairs check (csrc/multi_tensor.h), for
    installs without the extension: one device, one x dtype, one y dtype, contiguous
    equal-shape pairs, no overlapping writes."""
    if not xs or len(xs) != len(ys):
        return False
    x0, y0 = xs[0], ys[0]
    if x0.dtype not in _validate.KERNEL_DTYPES or y0.dtype not in _validate.KERNEL_DTYPES:
        return False
    for x, y in zip(xs, ys):
        if (x.dtype != x0.dtype or y.dtype != y0.dtype or x.device != x0.device or y.device != x0.device
                or x.shape != y.shape or not x.is_contiguous() or not y.is_contiguous()):
            return False
    try:
        _validate.disjoint_writes(xs, ys, FOREACH_OP)
    except ValueError:
        return False
    return True


# ---- the kernel form of a call ------------------------------------------------------------

def _repeating(y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """y as a contiguous 1-D tensor whose numel divides prod(shape) and which, repeated,
    is y broadcast to `shape`."""
    dims = y.shape
    lead = 0
    while lead < len(dims) and dims[lead] == 1:
        lead += 1
    tail = tuple(dims[lead:])
    if tail == tuple(shape[len(shape) - len(tail):]):
        return y.reshape(-1) if y.is_contiguous() else y.contiguous().view(-1)
    return y.expand(shape).contiguous().view(-1)


def _kernel_dtype(t: torch.Tensor) -> bool:
    return t.dtype in _validate.KERNEL_DTYPES


def _plain_pair(x, y) -> bool:
    """The common call, checked cheaply: x and y contiguous, same shape, device and a kernel
    dtype, and either the same memory or apart. Anything else takes the full checks."""
    if not (type(x) in _validate.PLAIN_TYPES and type(y) in _validate.PLAIN_TYPES and x.shape == y.shape
            and x.device == y.device and x.dtype in _validate.KERNEL_DTYPES
            and y.dtype in _validate.KERNEL_DTYPES and x.is_contiguous() and y.is_contiguous()):
        return False
    xp, yp = x.data_ptr(), y.data_ptr()
    if xp == yp:
        return x.dtype == y.dtype
    return xp >= yp + y.numel() * y.element_size() or yp >= xp + x.numel() * x.element_size()


_REQUIRES_GRAD = operator.attrgetter("requires_grad")


def _no_autograd(tensors, op: str) -> None:
    """The in-place adds are not differentiable: rather than record nothing (a silently
    wrong gradient), refuse inputs that require grad while grad mode is on."""
    if torch.is_grad_enabled() and any(map(_REQUIRES_GRAD, tensors)):
        raise RuntimeError(f"fusedops.{op} is not differentiable and an input requires grad; call it "
                           "under torch.no_grad() (gradient buffers, residual streams without autograd) "
                           "or use the eager op")


def _add_impl(x, y, alpha=1.0):
    _no_autograd((x, y), OP)
    _validate.writable(x, "x", OP)
    if _plain_pair(x, y):
        backend = _add.backend_for(x.device.type)
        if backend != "reference" and x.numel():
            _add.get(backend)(x, y, alpha)
            return
    _check_add(x, y)
    if x.numel() == 0:
        return
    # Writes below go through x.data (a view with its own version counter): the op bumps x's
    # version once after the kernel (ops/_library.py), as one eager in-place op does.
    if not (_kernel_dtype(x) and _kernel_dtype(y)):
        _add.reference(f"no kernel for {x.dtype} / {y.dtype}")(x.data, y, alpha)
        return
    backend = _add.backend_for(x.device.type)
    if backend == "reference":
        reference.add_(x.data, y, alpha)
        return
    run = _add.get(backend)
    if y.dim() == 0 and x.dim() and y.dtype is not x.dtype:
        # eager's type promotion: a 0-dim y does not promote a dimensioned x (same category),
        # so eager adds y rounded to x's dtype (bf16 x + 0-dim fp32 y: y rounded to bf16)
        y = y.to(x.dtype)
    yk = _repeating(y, x.shape)
    if x.is_contiguous():
        run(x, yk, alpha)
    else:
        work = x.contiguous()
        run(work, yk, alpha)
        x.data.copy_(work)


def _add_fake(x, y, alpha=1.0):
    _check_add(x, y, memory=False)


add_op = define("add_(Tensor(a!) x, Tensor y, float alpha=1.0) -> ()", _add_impl, _add_fake)


_LOWP = (torch.float16, torch.bfloat16)
_ALPHAS: dict = {}  # (alpha, dtype) -> alpha rounded to dtype as eager's CPU add does


def _alpha_as(alpha: float, dtype: torch.dtype) -> float:
    """alpha rounded to a 16-bit dtype as eager's CPU add does (the kernel of a bf16+bf16 /
    fp16+fp16 add converts alpha to scalar_t: double -> float -> dtype, rejecting a value
    the dtype cannot hold). Cached: a training loop uses a few alphas."""
    key = (alpha, dtype)
    out = _ALPHAS.get(key)
    if out is None:
        if alpha == alpha and abs(alpha) != float("inf") and abs(alpha) > torch.finfo(dtype).max:
            raise ValueError(f"fusedops.{OP}: alpha={alpha!r} cannot be converted to {dtype} without overflow "
                             f"(x and y are {dtype}; eager's add_ rejects it too)")
        out = torch.tensor(alpha, dtype=torch.float32).to(dtype).item()
        if len(_ALPHAS) < 4096:
            _ALPHAS[key] = out
    return out


def _eager_alpha(x, y, alpha: float) -> float:
    """The alpha eager uses for x += alpha*y on CPU: with x and y of one 16-bit dtype,
    alpha rounded to it (ATen's CPU add kernel computes in scalar_t); otherwise (and on
    CUDA, where eager keeps alpha in fp32 opmath, as the kernels do) alpha itself."""
    dt = x.dtype
    if dt in _LOWP and y.dtype is dt:
        return _alpha_as(alpha, dt)
    return alpha


@_add.register("cuda")
def _add_cuda(x, y, alpha):
    _native.op("add_")(x, y, alpha)


@_add.register("cpp")
def _add_cpp(x, y, alpha):
    _native.op("add_")(x, y, alpha if alpha == 1.0 else _eager_alpha(x, y, alpha))


@_add.register("triton")
def _add_triton(x, y, alpha):
    if alpha != 1.0 and x.device.type == "cpu":
        alpha = _eager_alpha(x, y, alpha)
    _triton.kernels("add").add_(x, y, alpha)


_add.register("reference")(reference.add_)


def _foreach_impl(xs, ys, alpha=1.0):
    _no_autograd(xs + ys, FOREACH_OP)
    _validate.writable_all(xs, "xs", FOREACH_OP)
    # Fast path: the backend takes the whole lists in one launch when they are plain
    # (checked natively, once per call); it returns False, having written nothing, if not.
    backend = _foreach.backend_for(xs[0].device.type) if xs else "reference"
    if backend != "reference" and len(xs) == len(ys):
        try:
            if _foreach.get(backend)(xs, ys, alpha):
                return
        except RuntimeError:  # e.g. tensors on several devices: name the argument at fault
            _check_foreach(xs, ys, memory=False)
            raise
    if _check_foreach(xs, ys):
        # strided views whose memory meets another pair's: the pairs one by one, in order
        # (torch._foreach_add_'s semantics), each correct for any overlap within its pair
        for x, y in zip(xs, ys):
            if x.numel() == 0:
                continue
            if not (_kernel_dtype(x) and _kernel_dtype(y)):
                _foreach.reference(f"no kernel for {x.dtype} / {y.dtype}")([x.data], [y], alpha)
            else:
                _add_impl(x, y, alpha)
        return
    # General path: group pairs so that each group is plain, one launch each: same device
    # and dtypes, both contiguous. A non-contiguous x goes through add_ (one contiguous
    # copy); a float64 pair through the reference.
    groups: dict = {}
    for x, y in zip(xs, ys):
        if x.numel() == 0:
            continue
        if not (_kernel_dtype(x) and _kernel_dtype(y)):
            _foreach.reference(f"no kernel for {x.dtype} / {y.dtype}")([x.data], [y], alpha)
        elif not x.is_contiguous():
            _add_impl(x, y, alpha)
        else:
            key = (x.device, x.dtype, y.dtype)
            gx, gy = groups.setdefault(key, ([], []))
            gx.append(x)
            gy.append(y if y.is_contiguous() else y.contiguous())
    for (device, _, _), (gx, gy) in groups.items():
        backend = _foreach.backend_for(device.type)
        if backend == "reference":
            reference.foreach_add_([x.data for x in gx], gy, alpha)
        elif not _foreach.get(backend)(gx, gy, alpha):
            raise RuntimeError(f"fusedops.{FOREACH_OP}: internal error: a checked group was refused by "
                               f"the {backend} kernel")


def _foreach_fake(xs, ys, alpha=1.0):
    _check_foreach(xs, ys, memory=False)
    return None


foreach_add_op = define("foreach_add_(Tensor(a!)[] xs, Tensor[] ys, float alpha=1.0) -> ()",
                        _foreach_impl, _foreach_fake)


@_foreach.register("cuda")
def _foreach_cuda(xs, ys, alpha) -> bool:
    return _native.op("foreach_add_")(xs, ys, alpha)


@_foreach.register("cpp")
def _foreach_cpp(xs, ys, alpha) -> bool:
    # plain lists (the only ones the op takes) have one x dtype and one y dtype; on others
    # it returns False and the general path calls again per group
    return _native.op("foreach_add_")(xs, ys, alpha if alpha == 1.0 else _eager_alpha(xs[0], ys[0], alpha))


@_foreach.register("triton")
def _foreach_triton(xs, ys, alpha) -> bool:
    kernels = _triton.kernels("add")
    block = kernels.foreach_block(xs[0].dtype)
    device = xs[0].device
    if _native.ops is not None:
        table = _native.op("foreach_table")(xs, ys, block, device.type == "cuda")
        if table.numel() == 0:
            return False
    elif _plain_lists_py(xs, ys):
        table = kernels.foreach_table_py(xs, ys, block)
    else:
        return False
    blocks, aligned = int(table[3, -1]), bool(table[0, -1])
    if device.type != "cpu":
        table = table.to(device, non_blocking=True)
    if alpha != 1.0 and device.type == "cpu":
        alpha = _eager_alpha(xs[0], ys[0], alpha)
    kernels.foreach_add_(table, blocks, aligned, xs[0].dtype, ys[0].dtype, alpha)
    return True


_foreach.register("reference")(reference.foreach_add_)


# ---- public API --------------------------------------------------------------------------

def add_(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0) -> None:
    """x += alpha * y in place (y broadcast to x; x fp32/fp16/bf16, y any of those).

    Same values as eager `x.add_(y, alpha=alpha)`: math in fp32, one rounding to x's dtype.
    y may be x itself. Not differentiable. Returns None (the op mutates x).
    """
    if _validate.plain_call(x, y) and _plain_pair(x, y) and x.numel():
        backend = _add.backend_for(x.device.type)
        if backend != "reference":  # the kernel directly: the op's dispatcher round trip is most of a
            _no_autograd((x, y), OP)  # small call's host time
            _validate.writable(x, "x", OP)
            _add.get(backend)(x, y, float(alpha))
            torch.autograd.graph.increment_version(x)  # as the op does (see ops/_library.py)
            return
    _validate.tensor(x, "x", OP)  # before the dispatcher, whose own message is vaguer
    _validate.tensor(y, "y", OP)
    add_op(x, y, float(alpha))


def foreach_add_(xs, ys, alpha: float = 1.0) -> None:
    """xs[i] += alpha * ys[i] for every pair, in one launch per (device, dtypes) group.

    Pairs must have equal shapes; each tensor may appear once in xs, and no ys[j] may be
    another pair's xs[i]. Same values as `torch._foreach_add_(xs, ys, alpha=alpha)`.
    """
    xs, ys = list(xs), list(ys)
    if xs and len(xs) == len(ys) and _validate.plain_lists(xs, ys):
        backend = _foreach.backend_for(xs[0].device.type)
        if backend != "reference":  # the kernel directly: it takes plain lists (checked natively) or
            _no_autograd(xs + ys, FOREACH_OP)  # refuses them, having written nothing
            _validate.writable_all(xs, "xs", FOREACH_OP)
            try:
                done = _foreach.get(backend)(xs, ys, float(alpha))
            except RuntimeError:  # e.g. a tensor on another device: the checks name the argument
                _check_foreach(xs, ys, memory=False)
                raise
            if done:
                torch.autograd.graph.increment_version(xs)  # as the op does (see ops/_library.py)
                return
    for name, ts in (("xs", xs), ("ys", ys)):
        if not all(isinstance(t, torch.Tensor) for t in ts):
            for i, t in enumerate(ts):
                _validate.tensor(t, f"{name}[{i}]", FOREACH_OP)
    if not xs and not ys:  # nothing to dispatch on (the op needs a tensor to pick a device)
        return
    foreach_add_op(xs, ys, float(alpha))
