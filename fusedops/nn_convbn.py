"""Conv2d + BatchNorm2d (+ activation) as one module: training that keeps less memory than
eager, and BN folded into the conv for inference.

`ConvBNAct2d` holds a real `nn.Conv2d` (`.conv`) and `nn.BatchNorm2d` (`.bn`) for their
parameters and buffers, so its state_dict keys are `conv.weight` (`conv.bias`),
`bn.weight`, `bn.bias`, `bn.running_mean`, `bn.running_var`, `bn.num_batches_tracked`;
after `fusedops.convert`, the parent module saves and loads its original eager keys
(see `StateDictKeyMap`).

Training (batch statistics): y = conv(x); per-channel μ, σ² (fp32, biased) by the
bn_stats op; z = act(γ(y−μ)r + β) by bn_act_apply. For backward `memory="recompute"`
keeps only the conv input, the weight and the per-channel stats and recomputes y = conv(x)
in backward (+1 conv forward); `memory="fast"` keeps y as well. The default,
`memory="auto"`, keeps y where rebuilding it costs the most for the bytes it holds: where
the kernel is larger than 1x1, and where a 1x1 conv narrows the channels at least 4× (its
forward reads at least 4× the bytes it writes); the other 1x1 convs recompute y. ResNet-50
at batch 128 in bf16 on an H100, conv forward per MiB kept: the stem and the 3x3s 1.6–9.2
µs/MiB, the 4×-narrowing 1x1s 1.9–4.2, the other 1x1s 0.5–1.9, most below 1.1
(bench/NOTES.md rounds 24 and 27).
Neither keeps the activation output or the BN output (eager keeps y and, for
silu/gelu, z). Running statistics are updated as eager does. With the native BN kernels
(the C++ / CUDA C++ backends) each direction is one native call (csrc/convbn.cpp: the
convs through the dispatcher, then the kernels): less host time between the ops; the
Triton backend runs the same steps op by op (fusedops/ops/convbn.py). Traced by
torch.compile, the step is one op whose conv output stays inside it, so that the compiled
graph saves what the memory mode says: the C++ op fusedops_C::conv_bn_act_train where the
native kernels serve (no Python runs per call in the compiled graph), else
fusedops::conv_bn_act_train.

Eval with running statistics: BN is folded into the conv weight and bias in fp32 (cast
back to the weight's dtype), then the activation (one conv + one fused epilogue, or a
single conv with bias when there is no activation).

A conv with bias is accepted: in training the batch mean absorbs it exactly (the output
does not depend on it and its gradient is zero; running_mean includes it), in eval it is
folded with the rest.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _validate, reference
from ._backend import _forced as _backend_forced
from ._backend import warn_once
from .converter import CALL_HOOKS, plain_sequential
from .ops import batchnorm as bnops
from .ops.convbn import _native_call, check_step_shapes, no_autocast, train_backward, train_forward, train_traced

ACTIVATIONS = reference.CONV_BN_ACTIVATIONS
MEMORY_MODES = ("auto", "recompute", "fast")


# "auto" keeps the output of a 1x1 conv whose input has at least this many times its
# output's channels: rebuilding it reads that many times the bytes it would hold.
AUTO_KEEP_NARROWING = 4


def resolved_memory(memory: str, conv: nn.Conv2d) -> str:
    """"recompute" or "fast" for this conv: "auto" keeps y ("fast") where the conv's kernel
    is larger than 1x1 or the 1x1 conv narrows the channels AUTO_KEEP_NARROWING× or more,
    and recomputes it for the other 1x1 convs (bench/NOTES.md, rounds 24 and 27: in
    ResNet-50 those hold most of the bytes and are the cheapest to rebuild)."""
    if memory != "auto":
        return memory
    if conv.kernel_size[0] * conv.kernel_size[1] > 1 or conv.in_channels >= AUTO_KEEP_NARROWING * conv.out_channels:
        return "fast"
    return "recompute"


def activation_of(module) -> tuple[str, float] | None:
    """(name, negative slope) of a supported activation module, else None."""
    if module is None or isinstance(module, nn.Identity):
        return ("identity", 0.01)
    if isinstance(module, nn.ReLU):
        return ("relu", 0.01)
    if isinstance(module, nn.ReLU6):
        return ("relu6", 0.01)
    if isinstance(module, nn.SiLU):
        return ("silu", 0.01)
    if isinstance(module, nn.GELU):
        return ("gelu" if module.approximate == "none" else "gelu_tanh", 0.01)
    if isinstance(module, nn.LeakyReLU):
        return ("leaky_relu", float(module.negative_slope))
    return None


def _explicit_padding(conv: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
    """(symmetric padding, extra right/bottom padding or None) of conv's padding."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0), None
        pads, extra = [], [0, 0, 0, 0]
        for i, (k, d) in enumerate(zip(conv.kernel_size, conv.dilation)):
            total = d * (k - 1)
            pads.append(total // 2)
            # eager's 'same' puts the odd element on the right / bottom
            extra[(1 - i) * 2 + 1] = total - 2 * (total // 2)
        return tuple(pads), (tuple(extra) if any(extra) else None)
    return tuple(conv.padding), None


def _conv_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs the conv of x in, or None (autocast off, or x not eligible:
    autocast casts floating tensors other than float64)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point() and x.dtype != torch.float64:
        return torch.get_autocast_dtype(dev)
    return None


# Devices where the recompute backward releases x before dX (two conv-backward calls
# instead of one): on CPU the split costs more time than the memory it saves is worth.
EARLY_RELEASE_DEVICES = ("cuda",)


def _hooks_active() -> bool:
    """saved_tensors_hooks (e.g. save_on_cpu) are in force: every saved tensor must go
    through them."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


class _ConvBNActTrain(torch.autograd.Function):
    """act(BN_batch(conv(x, w))) with batch statistics; saves x, w and per-channel stats
    (and y in memory="fast"). Returns z (the running statistics are updated inside).
    conf = (stride, padding, dilation, groups, eps, act, slope, memory) (tuples/lists of
    ints, made once per module).

    memory="recompute" backward: y = conv(x) again; dy is written over y; dW first, then x
    is released (it is held on ctx, with its version checked as autograd would, unless
    saved-tensor hooks or tracing need save_for_backward) before dX = conv_transpose(dy):
    at the peak one activation less than keeping x to the end."""

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, conv_bias, conf, running=None, bn=None, plan=None):
        stride, padding, dilation, groups, eps, act, slope, memory = conf
        # running: [running_mean, running_var, momentum, done] or None; bn: the BN module whose
        # running statistics this step updates, or None; plan: a _NativePlan (the native step,
        # running statistics updated in its stats launch) or None
        check_step_shapes(x, weight, stride, padding, dilation, groups)
        if plan is not None:
            z, mean, invstd, var, y = _native_call(plan.fwd, (x, weight, stride, padding, dilation, groups, eps,
                                                              *plan.fwd_args), x, weight, conf[:4])
            plan.nbt.add_(1)  # (a buffer: no grad mode needed)
            torch.autograd.graph.increment_version(plan.running)  # as eager's in-place update does
        else:
            z, mean, invstd, var, y = train_forward(x, weight, gamma, beta, (stride, padding, dilation, groups), eps,
                                                    act, slope, running)
            if bn is not None:  # before save_for_backward: a checkpoint's recompute may stop there
                _update_running(bn, running, conv_bias, mean, var, z.shape[0] * z.shape[2] * z.shape[3])
        ctx.native = None if plan is None else plan.fwd_args[:2]  # (γ, β in fp32: the backward's kernels too)
        dev = x.device
        ctx.x = None
        if memory == "fast":
            ctx.save_for_backward(x, weight, mean, invstd, gamma, beta, y)
        elif (dev.type in EARLY_RELEASE_DEVICES and type(x) is torch.Tensor
              and not torch.compiler.is_compiling() and not _hooks_active()):
            ctx.save_for_backward(weight, mean, invstd, gamma, beta)
            ctx.x, ctx.x_version = x, x._version
        else:
            ctx.save_for_backward(x, weight, mean, invstd, gamma, beta)
        ctx.conf = conf
        ctx.has_bias = conv_bias is not None
        return z

    @staticmethod
    def backward(ctx, dz):
        if torch.is_grad_enabled():  # create_graph: gradients that are differentiable in turn
            return _train_backward_differentiable(ctx, dz)
        return _train_backward(ctx, dz)


class _NativePlan:
    """A module's training step by the native kernels (C++ / CUDA C++: one call per
    direction, the running statistics updated in the stats launch), decided once per key
    (ConvBNAct2d._native_plan): the forward op's arguments after x, w and the geometry
    (γ and β in fp32, activation, slope, momentum, the running buffers). fwd is None where
    the native step cannot take the module's calls: the general path decides each call
    then."""

    __slots__ = ("key", "fwd", "fwd_args", "held", "nbt", "running")

    def __init__(self, key, x, w, cd, conf, conv_bias, bn, gamma, beta, rm, rv, nbt):
        self.key, self.fwd, self.nbt, self.running = key, None, nbt, [rm, rv]
        self.held = (w, gamma, beta)  # with nbt and running: every tensor whose id is in key (no id reused)
        if (conv_bias is not None or not bn.track_running_stats or bn.momentum is None or nbt is None or rm is None
                or type(x) not in _validate.PLAIN_TYPES or type(w) not in _validate.PLAIN_TYPES or w.shape[0] == 0):
            return
        xd = cd or x.dtype  # (cd is None for an integer or float64 input: autocast leaves those)
        wd = cd if cd is not None and w.dtype != torch.float64 else w.dtype
        if xd != wd:
            return  # eager's conv raises its own error for these: the general path runs it
        # stand-ins with the dtypes, device and channel count of the call's operands
        running = [rm, rv, float(bn.momentum), False]
        native = bnops.train_native_args(x.new_empty(1, dtype=xd), x.device, w.new_empty(w.shape[0], dtype=wd),
                                         gamma, beta, running)
        if native is None or not running[3]:
            return
        g32, b32, _, _, momentum = native
        if (gamma is not None and g32 is not gamma) or (beta is not None and b32 is not beta):
            return  # γ / β not fp32 and dense: the general path casts them each call
        _stride, _padding, _dilation, _groups, _eps, act, slope, _memory = conf
        self.fwd_args = (g32, b32, bnops.ACT_CODES[act], slope, momentum, rm, rv)
        self.fwd = bnops.op_train_fwd()


def _update_running(bn, running, conv_bias, mean, var, count: int) -> None:
    """bn's running statistics after a training step with batch statistics (mean, var),
    as eager BatchNorm2d updates them: num_batches_tracked (and the version counters the
    eval fold cache keys on) where the stats launch already updated the buffers (running
    done), else the whole update. Runs inside the step's forward, so that a recompute
    (torch.utils.checkpoint) counts as eager's does."""
    bbufs = bn._buffers
    rm, rv, nbt = bbufs["running_mean"], bbufs["running_var"], bbufs.get("num_batches_tracked")
    if running is not None and running[3]:
        nbt.add_(1)  # a buffer: no grad mode needed
        torch.autograd.graph.increment_version([rm, rv])
        return
    if conv_bias is not None:
        mean = mean + conv_bias.detach().float()
    momentum = bn.momentum
    if momentum is None or nbt is None or rm.dtype != mean.dtype or rv.dtype != var.dtype or count == 0:
        reference.update_running_stats_(rm, rv, nbt, mean, var, count, momentum)
    else:  # eager's update in 3 launches: nbt += 1; lerp of both buffers
        with torch.no_grad():
            nbt.add_(1)
            torch._foreach_lerp_([rm, rv], [mean, var * (count / max(count - 1, 1))], float(momentum))
        # the CUDA foreach fast path of torch 2.11 leaves version counters alone (seen on an
        # H100: the eval fold cache, keyed on them, went stale); bump them here
        torch.autograd.graph.increment_version([rm, rv])


def _held_input(ctx) -> torch.Tensor:
    """x held on ctx (the early-release path), checked as autograd checks a saved tensor."""
    x = ctx.x
    if x._version != ctx.x_version:
        raise RuntimeError("one of the variables needed for gradient computation has been modified by an "
                           f"inplace operation: the input of ConvBNAct2d is at version {x._version}; "
                           f"expected version {ctx.x_version} instead.")
    return x


def _train_backward_differentiable(ctx, dz):
    """The gradients under create_graph=True (e.g. a gradient penalty): the step recomputed
    from the saved x, w, γ, β with differentiable torch ops (BN math in fp32, as the
    kernels), differentiated with create_graph, so that second-order terms reach x, w, γ,
    β (and dz) as in eager."""
    stride, padding, dilation, groups, eps, act, slope, _memory = ctx.conf
    needs = ctx.needs_input_grad
    if ctx.x is not None:
        x = _held_input(ctx)
        weight, _mean, _invstd, gamma, beta = ctx.saved_tensors
    else:
        x, weight, _mean, _invstd, gamma, beta, *_ = ctx.saved_tensors
    with no_autocast(x.device.type):  # the saved operands are in the conv's dtype already
        y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
        cd = torch.promote_types(y.dtype, torch.float32)  # BN math in fp32 at least
        z = F.batch_norm(y.to(cd), None, None, None if gamma is None else gamma.to(cd),
                         None if beta is None else beta.to(cd), True, 0.0, eps)
        z = reference.activation(z, act, slope).to(y.dtype)
    wanted = [(i, t) for i, t in enumerate((x, weight, gamma, beta)) if needs[i] and t is not None]
    grads = [None] * 5
    if wanted:
        found = torch.autograd.grad(z, [t for _, t in wanted], dz, create_graph=True, allow_unused=True)
        for (i, t), g in zip(wanted, found):
            grads[i] = torch.zeros_like(t) if g is None else g
    if needs[4] and ctx.has_bias:
        grads[4] = torch.zeros(weight.shape[0], device=weight.device, dtype=dz.dtype)
    return (*grads, None, None, None, None)


def _train_backward(ctx, dz):
    """_ConvBNActTrain.backward's first-order gradients (the kernels; not differentiable)."""
    stride, padding, dilation, groups, _eps, act, slope, _memory = ctx.conf
    needs = ctx.needs_input_grad
    early = ctx.x is not None
    if early:
        x = _held_input(ctx)
        ctx.x = None
        weight, mean, invstd, gamma, beta = ctx.saved_tensors
        y = None
    else:
        x, weight, mean, invstd, gamma, beta, *rest = ctx.saved_tensors
        y = rest[0] if rest else None
    # conv recompute (unless y was kept), BN backward, dW and (unless x goes first) dX
    dy, dx, dw, dgamma, dbeta = train_backward(dz, x, weight, y, mean, invstd, gamma, beta,
                                               (stride, padding, dilation, groups), act, slope, needs[0], needs[1],
                                               split=early, native=ctx.native)
    del y
    if early:  # x goes before dX is allocated
        in_hw = x.shape[2:]
        del x
        if needs[0]:
            out_pad = _output_padding(in_hw, dy.shape, weight.shape, stride, padding, dilation)
            dx = F.conv_transpose2d(dy, weight, None, stride, padding, out_pad, groups, dilation)
    del dy
    dx = dx if needs[0] else None
    dw = dw if needs[1] else None
    dg = db = dcb = None
    if gamma is not None and needs[2]:
        dg = dgamma if dgamma.dtype == gamma.dtype else dgamma.to(gamma.dtype)
    if beta is not None and needs[3]:
        db = dbeta if dbeta.dtype == beta.dtype else dbeta.to(beta.dtype)
    if ctx.has_bias:
        dcb = torch.zeros(weight.shape[0], device=weight.device, dtype=dz.dtype)
    return dx, dw, dg, db, dcb, None, None, None, None


def _output_padding(in_hw, out_shape, w_shape, stride, padding, dilation) -> list:
    """conv_transpose2d's output_padding that gives back the conv input's H, W."""
    return [in_hw[i] - ((out_shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (w_shape[2 + i] - 1) + 1)
            for i in range(2)]


class ConvBNAct2d(nn.Module):
    """Conv2d(bias-free) → BatchNorm2d → activation, fused for training memory and folded
    for inference. See the module docstring for the math, memory modes and keys."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, padding_mode: str = "zeros", eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True, track_running_stats: bool = True,
                 activation: str = "relu", negative_slope: float = 0.01, memory: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        if padding_mode != "zeros":
            raise ValueError(f"ConvBNAct2d: padding_mode must be 'zeros', got {padding_mode!r}")
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        bn = nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self._setup(conv, bn, activation, negative_slope, memory)

    def _setup(self, conv, bn, activation, negative_slope, memory):
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"ConvBNAct2d: conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"ConvBNAct2d: conv.padding_mode must be 'zeros', got {conv.padding_mode!r}")
        if not isinstance(conv._parameters.get("weight"), nn.Parameter):
            raise ValueError("ConvBNAct2d: conv.weight is not a parameter of the conv (computed by a hook or a "
                             "parametrization, e.g. weight_norm / spectral_norm): not supported")
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"ConvBNAct2d: bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
        if bn.num_features != conv.out_channels:
            raise ValueError(f"ConvBNAct2d: bn.num_features ({bn.num_features}) != conv.out_channels "
                             f"({conv.out_channels})")
        if activation not in ACTIVATIONS:
            raise ValueError(f"ConvBNAct2d: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if memory not in MEMORY_MODES:
            raise ValueError(f"ConvBNAct2d: memory must be one of {', '.join(MEMORY_MODES)}, got {memory!r}")
        self.conv = conv
        self.bn = bn
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.memory = memory
        self._padding, self._extra_pad = _explicit_padding(conv)

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: nn.Module | str | None = None,
                     memory: str = "auto") -> "ConvBNAct2d":
        """Wrap an eager pair (the same parameter and buffer objects: no copy); act is a
        module (ReLU, ReLU6, SiLU, GELU, LeakyReLU, Identity), a name, or None. Modules
        with forward or backward hooks are refused: the fused module never calls them."""
        for role, m in (("conv", conv), ("bn", bn), ("act", act)):
            hooks = [kind for a, kind in CALL_HOOKS.items() if isinstance(m, nn.Module) and getattr(m, a, None)]
            if hooks:
                raise ValueError(f"ConvBNAct2d.from_modules: {role} ({type(m).__name__}) has {' and '.join(hooks)}; the "
                                 f"fused module never calls it, so they would not run")
        if isinstance(act, str):
            name, slope = act, 0.01
        else:
            found = activation_of(act)
            if found is None:
                raise ValueError(f"ConvBNAct2d.from_modules: unsupported activation {type(act).__name__}; "
                                 f"supported: ReLU, ReLU6, SiLU, GELU, LeakyReLU, Identity")
            name, slope = found
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(conv, bn, name, slope, memory)
        # the wrapper's own flag only: train() would recurse and undo a frozen BN (bn.eval()
        # inside a training model), whose own flag decides in forward
        self.training = conv.training
        return self

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, memory={self.memory!r}"

    def __getstate__(self) -> dict:
        """Pickled / deep-copied without the per-process caches (the native plan holds op
        handles, which do not pickle; the copy derives its own)."""
        state = super().__getstate__()
        for cache in _CACHES:
            state.pop(cache, None)
        return state

    # ---- forward ----------------------------------------------------------------------

    def _act(self, z):
        return reference.activation(z, self.activation, self.negative_slope)

    def _input(self, x, conv):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"ConvBNAct2d: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"ConvBNAct2d: input must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != conv.in_channels:
            raise ValueError(f"ConvBNAct2d: input has {x.shape[1]} channels, the conv expects {conv.in_channels}")
        if self._extra_pad is not None:
            x = F.pad(x, self._extra_pad)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (submodules and their tensors read from the module dicts: nn.Module.__getattr__
        # costs host time on every call)
        conv, bn = self._modules["conv"], self._modules["bn"]
        if bn.training and type(bn) is not nn.BatchNorm2d:
            return self._forward_modules(x, conv, bn)
        x = self._input(x, conv)
        bufs = bn._buffers
        # the BN's own mode decides, as in eager: module.train() / .eval() set it, and code
        # that freezes BatchNorm layers (bn.eval() inside a training model) still does
        if bn.training or (bufs.get("running_mean") is None and bufs.get("running_var") is None):
            return self._forward_train(x, conv, bn)
        return self._forward_folded(x)

    def _forward_modules(self, x, conv, bn):
        """act(bn(conv(x))) with the modules themselves: bn is no longer a BatchNorm2d (e.g.
        nn.SyncBatchNorm.convert_sync_batchnorm swapped in a SyncBatchNorm, whose statistics
        span processes): its own forward keeps its semantics."""
        warn_once(f"ConvBNAct2d: bn is a {type(bn).__name__}, not a BatchNorm2d: training runs the conv, the "
                  f"{type(bn).__name__} and the activation as separate modules (no fused kernels, no memory saving)")
        return self._act(bn(conv(x)))

    def _native_plan(self, x, w, cd, conf, bn, conv_bias):
        """The _NativePlan of this call (cd: the conv's autocast dtype, _conv_dtype(x)), or
        None where the general path runs it (traced, a dispatch mode, tensor subclasses, an
        empty input, a conv bias, a BN that does not update fp32 running statistics with a
        momentum, other kernels than the native ones). Cached on the module, rebuilt when a
        tensor or setting it was derived from changed."""
        if x.numel() == 0 or torch.compiler.is_compiling() or _validate._dispatch_mode() is not None:
            return None
        bparams, bbufs = bn._parameters, bn._buffers
        gamma, beta = bparams.get("weight"), bparams.get("bias")
        rm, rv, nbt = bbufs.get("running_mean"), bbufs.get("running_var"), bbufs.get("num_batches_tracked")
        # ids: the plan holds the tensors, so an id cannot be reused while it is cached;
        # dtypes and devices: module.to() / .half() change them in place
        key = (type(x), x.dtype, x.device, cd, type(w), w.dtype, id(w), id(conf), conv_bias is None, id(gamma),
               id(beta), id(rm), id(rv), id(nbt), None if gamma is None else gamma.dtype,
               None if beta is None else beta.dtype, None if rm is None else (rm.dtype, rm.device, rv.dtype),
               bn.momentum, bn.track_running_stats, _backend_forced())
        plan = self.__dict__.get("_native_plan_cache")
        if plan is None or plan.key != key:
            plan = self.__dict__["_native_plan_cache"] = _NativePlan(key, x, w, cd, conf, conv_bias, bn, gamma, beta,
                                                                       rm, rv, nbt)
        return plan if plan.fwd is not None else None

    def _train_conf(self, conv, bn):
        """The Function's constant arguments, rebuilt only when a setting changed."""
        key = (conv.stride, self._padding, conv.dilation, conv.groups, bn.eps, self.activation,
               self.negative_slope, self.memory)
        cached = self.__dict__.get("_conf_cache")
        if cached is None or cached[0] != key:
            conf = (list(conv.stride), list(self._padding), list(conv.dilation), conv.groups, float(bn.eps),
                    self.activation, float(self.negative_slope), resolved_memory(self.memory, conv))
            cached = self.__dict__["_conf_cache"] = (key, conf)
        return cached[1]

    @staticmethod
    def _train_step(x, w, bparams, conv_bias, conf, running, bn, plan):
        """z: eager, the autograd.Function (its memory modes, the early release of x);
        traced by torch.compile, one op whose conv output the compiled graph cannot keep
        (train_traced in fusedops/ops/convbn.py). bn: the BN whose running statistics the
        step updates, or None; plan: the module's _NativePlan or None."""
        if torch.compiler.is_compiling():
            stride, padding, dilation, groups, eps, act, slope, memory = conf
            z, mean, var = train_traced(x, w, bparams.get("weight"), bparams.get("bias"), conv_bias, stride,
                                        padding, dilation, groups, eps, act, slope, memory == "fast")
            if bn is not None:
                _update_running(bn, None, conv_bias, mean, var, z.shape[0] * z.shape[2] * z.shape[3])
            return z
        return _ConvBNActTrain.apply(x, w, bparams.get("weight"), bparams.get("bias"), conv_bias, conf, running, bn,
                                     plan)

    def _forward_train(self, x, conv, bn):
        cparams, bparams, bbufs = conv._parameters, bn._parameters, bn._buffers
        w = cparams["weight"]
        conv_bias = cparams.get("bias")
        conf = self._train_conf(conv, bn)
        cd = _conv_dtype(x)
        # the common case: the native step with its arguments decided once (host time); the
        # running statistics are then updated in its stats launch
        plan = self._native_plan(x, w, cd, conf, bn, conv_bias)
        running = owner = None
        if plan is None:
            rm = bbufs.get("running_mean")
            update = bn.training and bn.track_running_stats and rm is not None
            # the running statistics updated in the stats launch where a native kernel can
            # (fp32 buffers, a momentum, no conv bias to add to the mean)
            if (update and conv_bias is None and bn.momentum is not None
                    and bbufs.get("num_batches_tracked") is not None and not torch.compiler.is_compiling()):
                running = [rm, bbufs["running_var"], float(bn.momentum), False]
            owner = bn if update else None
        if cd is not None:  # what autocast does to the eager conv: each eligible operand in cd
            if x.dtype != cd:
                x = x.to(cd)
            if w.dtype != cd and w.dtype != torch.float64:
                w = w.to(cd)
            with no_autocast(x.device.type):
                return self._train_step(x, w, bparams, conv_bias, conf, running, owner, plan)
        return self._train_step(x, w, bparams, conv_bias, conf, running, owner, plan)

    def folded_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W', b') of the conv with BN (running stats) folded in: computed in fp32, cast
        to the conv weight's dtype. s = γ·rsqrt(rv+eps), W' = W·s, b' = (b−rm)·s + β."""
        conv, bn = self.conv, self.bn
        s = torch.rsqrt(bn.running_var.float() + bn.eps)
        if bn.weight is not None:
            s = s * bn.weight.float()
        b = -bn.running_mean.float()
        if conv.bias is not None:
            b = b + conv.bias.float()
        b = b * s
        if bn.bias is not None:
            b = b + bn.bias.float()
        w = (conv.weight.float() * s.reshape(-1, 1, 1, 1)).to(conv.weight.dtype)
        return w, b.to(conv.weight.dtype)

    def _forward_folded(self, x):
        conv, bn = self._modules["conv"], self._modules["bn"]
        cparams, bparams, bbufs = conv._parameters, bn._parameters, bn._buffers
        params = (cparams["weight"], cparams.get("bias"), bparams.get("weight"), bparams.get("bias"))
        geometry = (conv.stride, self._padding, conv.dilation, conv.groups)
        if _traced() or (torch.is_grad_enabled() and (
                x.requires_grad or any(p is not None and p.requires_grad for p in params))):
            w, b = self.folded_weight_bias()  # differentiable (frozen-BN fine-tuning) / traced
            return folded_conv_act(x, w, b, geometry, self.activation, self.negative_slope)
        w, b, b32 = self._folded_cached(_conv_dtype(x), params + (bbufs["running_mean"], bbufs["running_var"]), bn.eps)
        return conv_act_inference(x, w, b, b32, geometry, self.activation, self.negative_slope)

    def train(self, mode: bool = True):
        _drop_caches(self)
        return super().train(mode)

    def _folded_cached(self, cast: torch.dtype | None, tensors: tuple, eps: float):
        """folded_weight_bias() (cast to `cast`, the autocast dtype, if given), recomputed
        only when a tensor it reads (conv weight and bias, BN weight, bias and running
        statistics) changed: its version counter, or its storage (a new dtype or device
        is a new storage), and after every train() / eval() call. Writes that leave the
        version counter alone (through `.data`) are seen after the next model.eval()."""
        key = (cast, eps) + tuple(None if t is None else (t._version, t.data_ptr()) for t in tensors)
        cache = self.__dict__.setdefault("_fold_cache", {})
        hit = cache.get(cast)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                w, b = self.folded_weight_bias()
                b32 = b.float().contiguous()
                if cast is not None:
                    w, b = w.to(cast), b.to(cast)
            hit = cache[cast] = (key, w, b, b32)
        return hit[1], hit[2], hit[3]


_CACHES = ("_native_plan_cache", "_fold_cache", "_cast_cache", "_conf_cache")


def _drop_caches(module: nn.Module) -> None:
    """Forget the folded / cast weights: train() and eval() start afresh, whatever wrote the
    parameters in between (a write through `.data` leaves no trace in the version counters
    the caches are keyed on)."""
    module.__dict__.pop("_fold_cache", None)
    module.__dict__.pop("_cast_cache", None)


def _traced() -> bool:
    """Traced: by torch.compile / torch.export (the fusedops ops are fine there), or by
    torch.jit.trace (ONNX export, TorchScript), where only torch ops may appear."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def folded_conv_act(x, w, b, geometry, act: str, slope: float, zeros=None, ones=None):
    """act(conv(x, w) + b): a single conv with bias for identity; otherwise the conv, then
    bias + activation in one fused pass (bn_act_apply with mean 0, invstd 1) when no
    gradient is needed, else the eager composite (differentiable)."""
    stride, padding, dilation, groups = geometry
    if act == "identity":
        return F.conv2d(x, w, b, stride, padding, dilation, groups)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or b.requires_grad)
    if needs_grad or torch.jit.is_tracing():  # (a jit trace, e.g. ONNX export, must see torch ops only)
        y = F.conv2d(x, w, b, stride, padding, dilation, groups)
        return reference.activation(y, act, slope)
    y = F.conv2d(x, w, None, stride, padding, dilation, groups)
    if zeros is None:
        zeros = torch.zeros(b.shape[0], device=b.device, dtype=torch.float32)
        ones = torch.ones(b.shape[0], device=b.device, dtype=torch.float32)
    return bnops.bn_act_apply(y, zeros, ones, None, b, act, slope)


def _act_inplace(y: torch.Tensor, act: str, slope: float) -> torch.Tensor:
    if act == "relu":
        return torch.relu_(y)
    if act == "relu6":
        return F.hardtanh_(y, 0.0, 6.0)
    if act == "silu":
        return F.silu(y, inplace=True)
    if act == "leaky_relu":
        return F.leaky_relu_(y, slope)
    return reference.activation(y, act, slope)  # identity, gelu, gelu_tanh


def conv_act_inference(x, w, b, b32, geometry, act: str, slope: float):
    """act(conv(x, w) + b) without autograd: identity is one conv with bias; otherwise the
    conv, then bias + activation in one in-place pass of the apply kernel (fp32 math, b32
    = b in fp32), or eager in-place ops where no kernel takes the conv output."""
    stride, padding, dilation, groups = geometry
    if act == "identity":
        return F.conv2d(x, w, b, stride, padding, dilation, groups)
    y = F.conv2d(x, w, None, stride, padding, dilation, groups)
    if bnops.bias_act_(y, b32, act, slope):
        return y
    return _act_inplace(y.add_(b.reshape(1, -1, 1, 1).to(y.dtype)), act, slope)


class FoldedConvAct2d(nn.Module):
    """Inference module: conv with BN folded in (weight, bias) followed by the activation.
    Its state_dict holds `weight` and `bias` of the folded conv."""

    def __init__(self, source: ConvBNAct2d):
        super().__init__()
        w, b = source.folded_weight_bias()
        self.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
        c = source.conv
        self.geometry = (tuple(c.stride), tuple(source._padding), tuple(c.dilation), c.groups)
        self._extra_pad = source._extra_pad
        self.activation, self.negative_slope = source.activation, source.negative_slope
        # mean 0 / invstd 1 of the fused bias+activation epilogue (not saved in state_dict)
        self.register_buffer("_zeros", torch.zeros(b.shape[0], device=b.device), persistent=False)
        self.register_buffer("_ones", torch.ones(b.shape[0], device=b.device), persistent=False)
        self.train(False)

    def train(self, mode: bool = True):
        _drop_caches(self)
        return super().train(mode)

    def forward(self, x):
        if self._extra_pad is not None:
            x = F.pad(x, self._extra_pad)
        w, b = self.weight, self.bias
        if _traced() or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or b.requires_grad)):
            return folded_conv_act(x, w, b, self.geometry, self.activation, self.negative_slope,
                                   self._zeros.float(), self._ones.float())
        cast = _conv_dtype(x)
        # autocast's casts (and the fp32 bias of the epilogue) made once, reused until w/b change
        key = (cast, w._version, w.data_ptr(), w.dtype, b._version, b.data_ptr(), b.dtype)
        hit = self.__dict__.get("_cast_cache")
        if hit is None or hit[0] != key:
            with torch.no_grad():
                wc, bc = (w, b) if cast is None or w.dtype == cast else (w.to(cast), b.to(cast))
                hit = self.__dict__["_cast_cache"] = (key, wc.detach(), bc.detach(), b.float().contiguous())
        return conv_act_inference(x, hit[1], hit[2], hit[3], self.geometry, self.activation, self.negative_slope)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class StateDictKeyMap:
    """Parent-module hooks that keep an eager checkpoint's keys after a Conv2d/BN pair
    became one ConvBNAct2d at `fused` (the conv's name) with the BN's slot `bn_name`
    holding nn.Identity: saving writes `<fused>.weight`/`<bn_name>.*` (the eager keys);
    loading accepts those (and the fused `<fused>.conv.*`/`<fused>.bn.*` keys). Both do
    nothing once `fused` holds something else (fold_conv_bn's FoldedConvAct2d, whose
    `weight` / `bias` are its own)."""

    def __init__(self, fused: str, bn_name: str):
        self.fused, self.bn_name = fused, bn_name

    def _active(self, parent: nn.Module) -> bool:
        return isinstance(parent._modules.get(self.fused), ConvBNAct2d)

    def save(self, module, state_dict, prefix, local_metadata):
        if not self._active(module):
            return state_dict
        conv_p, bn_p = f"{prefix}{self.fused}.conv.", f"{prefix}{self.fused}.bn."
        items = list(state_dict.items())
        state_dict.clear()  # re-filled in the same order, the fused keys renamed in place
        for key, value in items:
            if key.startswith(conv_p):
                key = f"{prefix}{self.fused}." + key[len(conv_p):]
            elif key.startswith(bn_p):
                key = f"{prefix}{self.bn_name}." + key[len(bn_p):]
            state_dict[key] = value
        return state_dict

    def load(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if not self._active(module):
            return
        for p in ("weight", "bias"):
            key = f"{prefix}{self.fused}.{p}"
            if key in state_dict:
                state_dict[f"{prefix}{self.fused}.conv.{p}"] = state_dict.pop(key)
        bn_p = f"{prefix}{self.bn_name}."
        for key in list(state_dict.keys()):
            if key.startswith(bn_p) and "." not in key[len(bn_p):]:
                state_dict[f"{prefix}{self.fused}.bn." + key[len(bn_p):]] = state_dict.pop(key)

    def install(self, parent: nn.Module) -> None:
        parent._register_state_dict_hook(self.save)
        parent.register_load_state_dict_pre_hook(self.load)


def fold_conv_bn(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d into its conv for inference, in place; returns model.

    Replaces each ConvBNAct2d (and each Conv2d → BatchNorm2d (→ activation) chain of an
    nn.Sequential) that uses running statistics by a FoldedConvAct2d: weight and bias
    computed in fp32 and cast back, then the activation. The model is put in eval mode.
    """
    from .converter_convbn import sequential_chains  # (it imports this module)

    model.eval()
    if isinstance(model, ConvBNAct2d):
        return FoldedConvAct2d(model) if model.bn.running_mean is not None else model

    def visit(module):
        if plain_sequential(module):
            for names, conv, bn, act, _reason in sequential_chains(module):
                if _reason is None and bn.running_mean is not None:
                    fused = ConvBNAct2d.from_modules(conv, bn, act)
                    module._modules[names[0]] = FoldedConvAct2d(fused)
                    for n in names[1:]:
                        module._modules[n] = nn.Identity()
        for name, child in list(module._modules.items()):
            if isinstance(child, ConvBNAct2d):
                if child.bn.running_mean is not None:
                    module._modules[name] = FoldedConvAct2d(child)
            elif child is not None:
                visit(child)

    visit(model)
    return model
