"""Converter rule: a LayerNorm / RMSNorm whose output feeds only nn.Linear layers becomes
LayerNormAct / RMSNormAct(autocast_output=True).

Under autocast an nn.Linear casts its input to the autocast dtype. Eager LayerNorm writes
fp32 there (its input is an fp32 residual stream, or CUDA autocast runs it in fp32), so
each such norm costs an fp32 write, the Linear's cast kernel and, in the backward, the
cast's gradient and an fp32 dy. With autocast_output the fused norm writes y in the
autocast dtype directly: the values the Linear computes with are eager's (y computed in
fp32 and rounded once to that dtype either way), and the bytes and the two kernels are
saved. Outside autocast the module behaves as LayerNormAct / RMSNormAct.

Where a norm is taken: the model's torch.fx traces (in training mode and in eval mode,
every module's own training flag restored afterwards: converter_convbn's _trace) must
show, in both, that
- the norm is called at least once and referred to in no other way (forward reads none of
  its parameters and does not pass the module on), and it is registered under one name;
- every user of every call of it is a call of an nn.Linear (exactly that class: a subclass
  may override forward) that takes it as its sole argument, and has no hooks (a hook would
  see the other dtype).
What fx cannot see (a norm inside a module it treats as a leaf; any norm of a model it
cannot trace, reported once) is left to the other norm rules. A norm whose output feeds a
Linear and something else is reported as skipped, with the reason. The assumption left unchecked: the Linear
runs under the norm's autocast state (a forward that turns autocast off between the two is
invisible to fx).
"""
from __future__ import annotations

from torch import nn

from .converter import Replaced, Rule, hooked, register_rule
from .converter_convbn import _is_call, _only_input, _split, _trace
from .nn import _fusable_norm

PATTERN = "{} → Linear"


def _feeds_linear(n, mods) -> bool:
    """Whether fx node n's users include a call of an nn.Linear."""
    return any(u.op == "call_module" and type(mods.get(u.target)) is nn.Linear for u in n.users)


def _prove(uses, mods, path: str) -> tuple[str | None, bool]:
    """(reason | None, seen): None if, in this trace, the norm at `path` is called and its
    every call feeds only plain nn.Linear calls as their sole argument; seen: whether a
    call of it feeds a Linear (the pattern is there, proven or not)."""
    nodes = uses.of(path)
    calls = [n for n in nodes if _is_call(n, path)]
    seen = any(_feeds_linear(n, mods) for n in calls)
    if not calls:
        return "torch.fx sees no call of it", seen
    if uses.tensors_read(path) or len(calls) != len(nodes):
        return "forward also reads its parameters (or passes the module on)", seen
    for n in calls:
        for u in n.users:
            lin = mods.get(u.target) if u.op == "call_module" else None
            if type(lin) is not nn.Linear or _only_input(u) is not n:
                return "its output also feeds something other than an nn.Linear", seen
            why = hooked(lin)
            if why is not None:
                return f"the Linear it feeds ({u.target}) has hooks: {why}", seen
    return None, seen


def _convert(model: nn.Module, graphs, report, paths: dict) -> None:
    """Replaces the norms of `model` that its traces prove feed only Linears."""
    mods = dict(model.named_modules())
    for path, norm in list(mods.items()):
        cls = _fusable_norm(norm)
        if cls is None:
            continue
        pattern = PATTERN.format(type(norm).__name__)
        results = [(mode, *_prove(uses, mods, path)) for mode, _, uses in graphs]
        if not any(seen for _, _, seen in results):
            continue  # no norm → Linear here: the other norm rules decide
        bad = [(mode, reason) for mode, reason, _ in results if reason is not None]
        reason = None
        if bad:
            reason = bad[0][1] if len(bad) == len(results) else f"{bad[0][1]} in {bad[0][0]} mode"
        elif len(paths.get(id(norm), ())) > 1:
            reason = f"{type(norm).__name__} is registered under several names ({', '.join(paths[id(norm)])})"
        else:
            reason = hooked(norm)
        if reason is not None:
            report.skip(path, pattern, reason)
            continue
        parent_path, name = _split(path)
        parent = model.get_submodule(parent_path) if parent_path else model
        parent._modules[name] = cls.from_modules(norm, None, autocast_output=True)
        report.replaced.append(Replaced(path, pattern, f"{cls.__name__}(autocast_output=True)"))


def norm_linear_pass(model: nn.Module, report) -> None:
    norms = [(path, m) for path, m in model.named_modules() if _fusable_norm(m) is not None]
    if not norms or not any(type(m) is nn.Linear for m in model.modules()):
        return
    try:
        graphs = _trace(model)
    except Exception as exc:  # noqa: BLE001 — any tracing failure means "not proven"
        # (a child's own trace would not do: an untraced forward above it may call the norm
        # itself and use its output elsewhere)
        report.skip("<root>", PATTERN.format(type(norms[0][1]).__name__),
                    f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}): which norms feed only "
                    "Linears is unknown")
        return
    paths: dict = {}
    for path, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(path)
    _convert(model, graphs, report, paths)


RULE = register_rule(Rule("norm-linear", model_pass=norm_linear_pass))
