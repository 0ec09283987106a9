"""8-bit optimizers: AdamW8bit, Adam8bit, Lion8bit, SGD8bit.

Drop-in `torch.optim.Optimizer`s with torch's hyperparameter names and defaults, whose
states take ~2 bytes per parameter instead of 8: each moment is kept as uint8 codes of
bitsandbytes' dynamic map with one fp32 absmax per block of 256 elements (signed map for
the first moment, unsigned for Adam's second). The whole step of a param group is one
kernel launch per (device, param dtype) — fusedops.optimizer_step_8bit_ — on CPU (C++)
and CUDA (Triton or CUDA C++) alike; nothing in step() synchronises with the host.

- Small tensors (numel < `min_8bit_size`, default 4096) and tensors marked with
  `optimizer.override_32bit(param)` (e.g. embeddings), or every tensor of a group with
  `optim_bits=32`, keep fp32 states; they run in the same launch (the kernel reads a
  per-tensor flag). The state's dtype is the truth after initialisation: uint8 = 8-bit.
- Params fp32 / fp16 / bf16; math in fp32, the param rounded once to its dtype (round
  to nearest even; with `stochastic_rounding=True`, bf16 params are rounded
  stochastically — unbiased, deterministic: random bits from a hash of (`sr_seed`, the
  group's position, step, the param's position, the element's index in the states'
  memory order), the same on every backend; no effect on fp32 / fp16 params). A grad of
  another dtype is cast to the param's. Params without a grad are skipped (their step
  count does not advance).
- NaN/Inf in a gradient element: that element's states are reset to 0 and the param
  element is left as it was; other elements and the block's absmax are unaffected.
- A large but finite gradient outlier (a loss spike) is the scheme's weak point, as in
  bitsandbytes: it sets the absmax of its 256-element block, so the other elements' small
  8-bit states round to code 0 (Adam's second moment v) while their first moment survives,
  and for a few steps their update m / (sqrt(v) + eps) is far larger than lr (an element
  of 1e4 in a block of N(0, 1) gradients gives steps of ~400·lr; 1e8, ~8000·lr). Clip
  gradients (torch.nn.utils.clip_grad_norm_) where spikes happen, and keep fp32 states
  (`optim_bits=32` for a group, `override_32bit(param)`) for params whose gradients have
  outliers (e.g. embeddings).
- Weight decay: AdamW8bit / Lion8bit decoupled (p *= 1 - lr*wd before the update, as
  torch AdamW); Adam8bit / SGD8bit as L2 added to the gradient (as torch Adam / SGD).
- Params must be float32, float16 or bfloat16: others (float64, complex) are refused when
  they are added (constructor, add_param_group) with a TypeError.
- Layout: a param's states are created with its memory layout (e.g. channels_last conv
  weights get channels_last states), and the 256-element blocks run along that memory
  order (as the kernels see the storage). A param in its states' layout (and a grad in
  it) is updated in place through a permuted view, with no copy; a param in another
  layout (changed after the states were made, or not dense) is copied into the states'
  order for the step and back.
- torch.compile does not trace step() (torch.compiler.disable): a compiled training step
  runs it eagerly, with a graph break at the call (fullgraph=True refuses it). It is one
  launch a (device, dtype) bucket already, and its step count (a Python int the kernels
  take) made a traced step() recompile at every step until Dynamo's recompile limit.
- state_dict(): per param `step` (int), `state1`, `absmax1` (+ `state2`, `absmax2` for
  Adam; SGD8bit with momentum=0 keeps only `step`); load_state_dict() keeps the states'
  dtypes and moves them to the param's device, so a checkpoint moves between CPU and
  CUDA. It refuses a state_dict of another optimizer (e.g. torch.optim.AdamW's exp_avg /
  exp_avg_sq) before changing anything. deepcopy and pickle keep the override_32bit set.
"""
from __future__ import annotations

import re

import torch

from ._validate import INFERENCE_WRITE, KERNEL_DTYPES
from .ops.optim8bit import optimizer_step_8bit_
from .reference import QUANT_BLOCK, blockwise_dequantize, dynamic_map

__all__ = ["Adam8bit", "AdamW8bit", "Lion8bit", "SGD8bit"]

SIGNED_ZERO_CODE = 127  # index of 0.0 in the signed dynamic map


def _memory_order(t: torch.Tensor) -> tuple | None:
    """The permutation of t's dims under which t is contiguous (its memory order), or None
    where t is contiguous already or has no such order (overlapping or with gaps)."""
    if t.is_contiguous():
        return None
    perm = tuple(sorted(range(t.dim()), key=lambda d: -t.stride(d)))
    return perm if t.permute(perm).is_contiguous() else None


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or _memory_order(t) is not None


def _in_order(t: torch.Tensor, order: tuple | None) -> torch.Tensor:
    return t if order is None else t.permute(order)


class _Optimizer8bit(torch.optim.Optimizer):
    KIND = ""
    STATES = 1

    def __init__(self, params, defaults: dict, min_8bit_size: int, optim_bits: int, stochastic_rounding: bool = False,
                 sr_seed: int = 0):
        if not 0 <= sr_seed < 2 ** 32:
            raise ValueError(f"{type(self).__name__}: sr_seed must be in [0, 2^32), got {sr_seed}")
        if optim_bits not in (8, 32):
            raise ValueError(f"{type(self).__name__}: optim_bits must be 8 or 32, got {optim_bits}")
        if min_8bit_size < 0:
            raise ValueError(f"{type(self).__name__}: min_8bit_size must be >= 0, got {min_8bit_size}")
        defaults = dict(defaults, min_8bit_size=int(min_8bit_size), optim_bits=int(optim_bits),
                        stochastic_rounding=bool(stochastic_rounding), sr_seed=int(sr_seed))
        self._force32: set = set()
        super().__init__(params, defaults)

    # -- param groups: only the kernels' dtypes ---------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group; params must be float32, float16 or bfloat16 (refused here,
        before anything is added, rather than in the middle of a step)."""
        if isinstance(param_group, dict) and "params" in param_group:
            params = param_group["params"]
            if isinstance(params, torch.Tensor):
                params = [params]
            elif not isinstance(params, set):  # torch refuses sets (unordered) itself
                params = param_group["params"] = list(params)
            for j, p in enumerate(params):
                if isinstance(p, torch.Tensor) and p.dtype not in KERNEL_DTYPES:
                    raise TypeError(f"{type(self).__name__}: param {j} of param group {len(self.param_groups)} "
                                    f"is {p.dtype}; the 8-bit optimizers take float32, float16 and bfloat16 "
                                    f"params (use torch.optim for {p.dtype})")
        super().add_param_group(param_group)

    # -- copy / pickle: torch carries defaults, state and param_groups; add _force32 ---------

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_force32"] = self._force32
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        force32 = state.pop("_force32", None)
        super().__setstate__(state)
        self._force32 = set(force32) if force32 else set()

    # -- 32-bit overrides -------------------------------------------------------------------

    def override_32bit(self, param: torch.Tensor) -> None:
        """Keep fp32 states for `param` (e.g. an embedding). Call before the first step;
        a param that already has 8-bit states has them dequantized to fp32 now."""
        if not any(param is p for g in self.param_groups for p in g["params"]):
            raise ValueError(f"{type(self).__name__}.override_32bit: param is not in this optimizer")
        self._force32.add(param)
        state = self.state.get(param)
        if state:
            maps = (dynamic_map(True), dynamic_map(False))
            for k in range(1, self.STATES + 1):
                if f"state{k}" not in state:  # SGD8bit with momentum=0: no state
                    continue
                s, a = state[f"state{k}"], state[f"absmax{k}"]
                if s.dtype == torch.uint8:
                    order = _memory_order(s)  # the blocks run along s's memory order
                    deq = blockwise_dequantize(_in_order(s, order).contiguous(), a, maps[k - 1].to(s.device))
                    if order is not None:  # back to the param's shape, in s's layout
                        deq = deq.permute(tuple(sorted(range(len(order)), key=order.__getitem__)))
                    state[f"state{k}"] = deq
                    state[f"absmax{k}"] = torch.zeros(0, dtype=torch.float32, device=s.device)

    def _init_state(self, p: torch.Tensor, group: dict, state: dict) -> None:
        state["step"] = 0
        q = group["optim_bits"] == 8 and p.numel() >= group["min_8bit_size"] and p not in self._force32
        for k in range(1, self.STATES + 1):
            if q:
                fill = SIGNED_ZERO_CODE if k == 1 else 0  # codes of 0.0
                state[f"state{k}"] = torch.full_like(p, fill, dtype=torch.uint8)  # p's layout
                blocks = -(-p.numel() // QUANT_BLOCK)
                state[f"absmax{k}"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
            else:
                state[f"state{k}"] = torch.zeros_like(p, dtype=torch.float32)
                state[f"absmax{k}"] = torch.zeros(0, dtype=torch.float32, device=p.device)

    # -- load_state_dict: keep the state dtypes (uint8 codes, fp32 absmax / fp32 states) --

    def _state_keys(self, group: dict, st: dict) -> tuple:
        """The keys of a param's state `st` in `group` once initialised."""
        return ("step",) + tuple(k for i in range(1, self.STATES + 1) for k in (f"state{i}", f"absmax{i}"))

    def _check_loaded(self, state_dict: dict) -> None:
        """Refuse, before anything changes, a state_dict whose groups or states are not this
        optimizer's (torch.optim.AdamW's exp_avg / exp_avg_sq / tensor step, a Lion8bit's
        state in an AdamW8bit, ...): step() would fail later with a bare KeyError."""
        name = type(self).__name__
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError(f"{name}.load_state_dict: expected a dict with 'state' and 'param_groups' (an "
                             f"optimizer state_dict)")
        # keys step() and the state's initialisation read (the others are read with .get)
        needed = [k for k in self.defaults if k not in ("stochastic_rounding", "sr_seed")]
        saved = state_dict["state"]
        for gi, g in enumerate(state_dict["param_groups"]):
            for j, pid in enumerate(g["params"]):
                st = saved.get(pid)
                if not st:
                    continue
                expected = self._state_keys(g, st)
                keys = set(st)
                if keys != set(expected):
                    extra = ", ".join(str(k) for k in st if k not in expected) or "none"
                    lacking = ", ".join(k for k in expected if k not in keys) or "none"
                    raise ValueError(
                        f"{name}.load_state_dict: the state of parameter {pid} (param {j} of param group {gi}) "
                        f"has {', '.join(map(str, st))}, not the states of {name} ({', '.join(expected)}); "
                        f"unexpected: {extra}; missing: {lacking}. A state_dict of another optimizer (e.g. "
                        f"torch.optim.AdamW's exp_avg / exp_avg_sq) cannot be loaded: start {name} fresh, or "
                        f"load the checkpoint into the optimizer that saved it")
                if isinstance(st["step"], torch.Tensor) or not isinstance(st["step"], int):
                    raise ValueError(f"{name}.load_state_dict: the state of parameter {pid} (param {j} of param "
                                     f"group {gi}) has a step of type {type(st['step']).__name__}; {name} "
                                     f"saves an int")
                for k in expected[1:]:
                    v = st[k]
                    ok = isinstance(v, torch.Tensor) and (
                        v.dtype == torch.float32 or (k.startswith("state") and v.dtype == torch.uint8))
                    if not ok:
                        what = v.dtype if isinstance(v, torch.Tensor) else type(v).__name__
                        raise ValueError(f"{name}.load_state_dict: {k} of parameter {pid} (param {j} of param "
                                         f"group {gi}) is {what}; {name} saves uint8 codes or float32")
                # uint8 codes: their blocks run along their memory order, which must exist and
                # be the same for both moments (as saved)
                codes = [st[k] for k in expected[1:] if k.startswith("state") and st[k].dtype == torch.uint8]
                if any(not _dense(v) for v in codes) or len({v.stride() for v in codes}) > 1:
                    raise ValueError(f"{name}.load_state_dict: the 8-bit states of parameter {pid} (param {j} of "
                                     f"param group {gi}) have strides {[v.stride() for v in codes]}: {name} saves "
                                     f"them dense and in one layout (their blocks run along their memory order)")
        for gi, g in enumerate(state_dict["param_groups"]):
            missing = [k for k in needed if k not in g]
            if missing:
                raise ValueError(f"{name}.load_state_dict: param group {gi} lacks {', '.join(missing)}; this "
                                 f"is not a state_dict of {name} (e.g. one of a torch.optim optimizer)")

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict, except that state tensors keep their dtype (torch casts
        floating-point states to the param's dtype) and are copied to the param's device.
        A state_dict of another optimizer is refused before anything changes."""
        self._check_loaded(state_dict)
        saved = state_dict["state"]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            if pid in saved:
                st = self.state[p]
                for k, v in saved[pid].items():
                    if isinstance(v, torch.Tensor):
                        st[k] = v.to(device=p.device, copy=True)  # (strides kept: the blocks' order)
                # step() sees the states through state1's memory order: fp32 states (no
                # blocks: their layout is free) without one are made contiguous, a state2 in
                # another layout takes state1's (_check_loaded refused such uint8 states)
                s1 = st.get("state1")
                if s1 is not None and not _dense(s1):
                    st["state1"] = s1 = s1.contiguous()
                s2 = st.get("state2")
                if s1 is not None and s2 is not None and s2.stride() != s1.stride():
                    st["state2"] = torch.empty_like(s1, dtype=s2.dtype).copy_(s2)

    # -- the step ---------------------------------------------------------------------------

    def _hyper(self, group: dict) -> dict:
        raise NotImplementedError

    # Not traced by torch.compile: the step is one kernel launch a (device, dtype) bucket
    # already, and the step count, a Python int of each param's state, is a kernel argument: a
    # traced step() recompiled at every step until Dynamo's limit. A compiled training step runs
    # it eagerly (a graph break at the call; fullgraph=True refuses it).
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        states = self.state
        if not torch.is_inference_mode_enabled():
            # eager's refusal of in-place writes to inference tensors (the params it would step:
            # those with a grad), before anything changes
            for gi, group in enumerate(self.param_groups):
                if any(map(torch.Tensor.is_inference, group["params"])):
                    for j, p in enumerate(group["params"]):
                        if p.is_inference() and p.grad is not None:
                            raise RuntimeError(f"{type(self).__name__}.step: param {j} of param group {gi}: "
                                               f"{INFERENCE_WRITE}")
        for gi, group in enumerate(self.param_groups):
            nstates = self._group_states(group)
            one, two = nstates >= 1, nstates == 2
            buckets: dict = {}
            copies = []
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = states[p]
                if not state or (one and "state1" not in state):  # (SGD8bit: momentum set after steps
                    self._init_state(p, group, state)  # without it: a first momentum step, as torch's)
                step = state["step"] = state["step"] + 1
                dtype = p.dtype
                if g.dtype != dtype:
                    g = g.to(dtype)
                # the kernels take contiguous tensors: everything is seen in the states' memory
                # order (p's own without states), through permuted views; a param or grad not
                # in that layout is copied (the param back after the launch)
                order = _memory_order(state["state1"] if one else p)
                work = _in_order(p, order)
                if not work.is_contiguous():
                    view, work = work, work.contiguous()
                    copies.append((view, work))
                key = (p.device, dtype, step)
                lists = buckets.get(key)
                if lists is None:
                    lists = buckets[key] = ([], [], [], [], [], [])
                lists[0].append(work)
                lists[1].append(_in_order(g, order).contiguous())
                if one:
                    lists[2].append(_in_order(state["state1"], order))
                    lists[3].append(state["absmax1"])
                if two:
                    lists[4].append(_in_order(state["state2"], order))
                    lists[5].append(state["absmax2"])
            for key, lists in buckets.items():
                try:
                    self._launch(group, lists, key[2], gi)
                except ValueError as exc:  # the op names tensors by their place in the bucket
                    raise self._in_group_terms(exc, group, gi, key) from None
            for p, work in copies:
                p.copy_(work)
        return loss

    def _group_states(self, group: dict) -> int:
        """How many states (state1/absmax1, state2/absmax2) the params of `group` have."""
        return self.STATES

    def _in_group_terms(self, exc: ValueError, group: dict, gi: int, key: tuple) -> ValueError:
        """exc of the step op with its tensor names (params[i], state1[i], grads[i] ...: the
        i-th tensor of one launch's lists) given as the param's place in its param group."""
        members = [j for j, p in enumerate(group["params"])
                   if p.grad is not None and (p.device, p.dtype, self.state[p].get("step")) == key]

        def name(m):
            what, i = m.group(1), int(m.group(2))
            if i >= len(members):
                return m.group(0)
            where = f"param {members[i]} of param group {gi}"
            return where if what == "params" else f"the {'grad' if what == 'grads' else what} of {where}"

        msg = re.sub(r"\b(params|grads|state1|absmax1|state2|absmax2)\[(\d+)\]", name, str(exc))
        return ValueError(msg.replace("fusedops.optimizer_step_8bit_:", f"{type(self).__name__}.step:"))

    def _launch(self, group, lists, step, gi=0):
        h = self._hyper(group)
        sr_seed = -1
        if group.get("stochastic_rounding", False):
            sr_seed = (group.get("sr_seed", 0) + 0x9E3779B9 * gi) % 2 ** 32
        optimizer_step_8bit_(*lists, kind=self.KIND, lr=group["lr"], beta1=h["beta1"], beta2=h["beta2"],
                             eps=h.get("eps", 0.0), weight_decay=group["weight_decay"], step=step,
                             first=step == 1, nesterov=h.get("nesterov", False), sr_seed=sr_seed)


def _check_common(name, lr, weight_decay):
    if isinstance(lr, torch.Tensor):
        raise TypeError(f"{name}: lr must be a Python float (tensor lr is not supported)")
    if not 0.0 <= lr:
        raise ValueError(f"{name}: invalid learning rate {lr}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"{name}: invalid weight_decay {weight_decay}")


def _check_betas(name, betas):
    if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise ValueError(f"{name}: invalid betas {betas}; each must be in [0, 1)")


def _unsupported(name, **flags):
    for flag, value in flags.items():
        if value:
            raise NotImplementedError(f"{name}: {flag}=True is not supported")


class AdamW8bit(_Optimizer8bit):
    """torch.optim.AdamW with 8-bit states. Decoupled weight decay (p *= 1 - lr*wd, then
    the Adam update). `foreach`/`fused` are accepted and ignored (the step is always one
    fused launch); amsgrad, maximize, capturable and differentiable are not supported.

    A large finite gradient outlier inflates its 256-element block's absmax: the block's
    other second moments quantize to 0 and those elements take steps far above lr for a
    few steps (bitsandbytes' scheme behaves the same). Clip gradients, or keep fp32 states
    (optim_bits=32, override_32bit) for params with outlier gradients; see the module doc."""
    KIND, STATES = "adamw", 2

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 min_8bit_size=4096, optim_bits=8, stochastic_rounding=False, sr_seed=0):
        name = type(self).__name__
        _check_common(name, lr, weight_decay)
        _check_betas(name, betas)
        if not 0.0 <= eps:
            raise ValueError(f"{name}: invalid eps {eps}")
        _unsupported(name, amsgrad=amsgrad, maximize=maximize, capturable=capturable, differentiable=differentiable)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay),
                         min_8bit_size, optim_bits, stochastic_rounding, sr_seed)

    def _hyper(self, group):
        return dict(beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"])


class Adam8bit(AdamW8bit):
    """torch.optim.Adam with 8-bit states: weight decay as L2 (g += wd*p), as torch Adam."""
    KIND = "adam"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, **kw):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, **kw)


class Lion8bit(_Optimizer8bit):
    """Lion (Chen et al. 2023) with an 8-bit momentum: p *= 1 - lr*wd;
    p -= lr * sign(b1*m + (1-b1)*g); m = b2*m + (1-b2)*g."""
    KIND, STATES = "lion", 1

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, min_8bit_size=4096, optim_bits=8,
                 stochastic_rounding=False, sr_seed=0):
        name = type(self).__name__
        _check_common(name, lr, weight_decay)
        _check_betas(name, betas)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay), min_8bit_size,
                         optim_bits, stochastic_rounding, sr_seed)

    def _hyper(self, group):
        return dict(beta1=group["betas"][0], beta2=group["betas"][1])


class SGD8bit(_Optimizer8bit):
    """torch.optim.SGD with an 8-bit momentum buffer (momentum, dampening, nesterov and L2
    weight decay exactly as torch SGD; the buffer is g on its first step). With
    momentum=0 there is no state: the step is torch's foreach `p -= lr*(g + wd*p)`."""
    KIND, STATES = "sgd", 1

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None, min_8bit_size=4096, optim_bits=8,
                 stochastic_rounding=False, sr_seed=0):
        name = type(self).__name__
        _check_common(name, lr, weight_decay)
        if momentum < 0.0:
            raise ValueError(f"{name}: invalid momentum {momentum}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(f"{name}: nesterov momentum requires a momentum and zero dampening")
        _unsupported(name, maximize=maximize, differentiable=differentiable)
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov), min_8bit_size, optim_bits, stochastic_rounding, sr_seed)

    def _init_state(self, p, group, state):
        if group["momentum"] == 0:
            state["step"] = 0
            return
        super()._init_state(p, group, state)

    def _group_states(self, group):
        return 0 if group["momentum"] == 0 else 1

    def _state_keys(self, group, st):
        # momentum 0 keeps only the step; a buffer from steps with momentum stays, unused (as torch's)
        if group.get("momentum", 0) == 0 and "state1" not in st:
            return ("step",)
        return super()._state_keys(group, st)

    def _hyper(self, group):
        return dict(beta1=group["momentum"], beta2=group["dampening"], nesterov=group["nesterov"])

    def _launch(self, group, lists, step, gi=0):
        if group["momentum"] == 0:
            params, grads = lists[0], lists[1]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            torch._foreach_add_(params, grads, alpha=-group["lr"])
            return
        super()._launch(group, lists, step, gi)
