"""fusedops.convert(model): replace supported module patterns with fused fusedops modules.

Families plug in `Rule`s (register_rule). A rule sees the children of a plain
nn.Sequential (see `plain_sequential`: an nn.Sequential subclass with its own forward is
not a chain and is handled like any other module) from one position on and may claim a
chain of them (e.g. LayerNorm → GELU); the first module of the chain is replaced by the
fused module and the others by nn.Identity() (each in the training mode of the module it
replaces), so positions — and state_dict keys of the first module — stay put. A rule may
also replace a lone module anywhere in the tree (e.g. a plain LayerNorm). Model-level
passes (e.g. a torch.fx analysis that proves a dataflow outside nn.Sequential) run first.

Weights, dtype, device and training mode are kept; everything else is left untouched.
Modules with hooks (forward / backward, e.g. the old-style weight_norm or spectral_norm,
and state_dict / load_state_dict hooks) are left in place: a fused module never calls
them, so their hooks would stop running. The returned report lists what was replaced and
what was skipped, and why.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn


@dataclasses.dataclass
class Replaced:
    path: str         # dotted path of the first module of the chain
    pattern: str      # e.g. "LayerNorm → GELU"
    new: str          # class name of the fused module


@dataclasses.dataclass
class Skipped:
    path: str
    pattern: str
    reason: str


@dataclasses.dataclass
class ConvertReport:
    model: nn.Module
    replaced: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)

    def skip(self, path: str, pattern: str, reason: str) -> None:
        """Record a skipped place, once per path."""
        if all(s.path != path for s in self.skipped):
            self.skipped.append(Skipped(path, pattern, reason))

    def __str__(self) -> str:
        lines = [f"fusedops.convert: {len(self.replaced)} replaced, {len(self.skipped)} skipped"]
        lines += [f"  replaced {r.path or '<root>'}: {r.pattern} -> {r.new}" for r in self.replaced]
        lines += [f"  skipped  {s.path or '<root>'}: {s.pattern} ({s.reason})" for s in self.skipped]
        return "\n".join(lines)


@dataclasses.dataclass
class Rule:
    name: str
    # chain(children, i) -> (count, fused module) | None: claim children[i:i+count]
    chain: Callable | None = None
    # single(module) -> fused module | None: replace a lone module found anywhere
    single: Callable | None = None
    # model_pass(model, report) -> None: runs before the tree walk
    model_pass: Callable | None = None


RULES: list = []


def register_rule(rule: Rule) -> Rule:
    RULES.append(rule)
    return rule


# hooks that run when a module is called (a fused module never calls the modules it replaces)
CALL_HOOKS = {"_forward_pre_hooks": "forward pre-hooks", "_forward_hooks": "forward hooks",
              "_backward_pre_hooks": "backward pre-hooks", "_backward_hooks": "backward hooks"}
_HOOKS = {**CALL_HOOKS,
          "_state_dict_pre_hooks": "state_dict pre-hooks", "_state_dict_hooks": "state_dict hooks",
          "_load_state_dict_pre_hooks": "load_state_dict pre-hooks",
          "_load_state_dict_post_hooks": "load_state_dict post-hooks"}


def hooked(*modules: nn.Module) -> str | None:
    """Why these modules cannot be replaced by a fused module that never calls them: hooks
    registered on them (e.g. torch.nn.utils.weight_norm / spectral_norm, feature
    extractors, state_dict / load_state_dict hooks that add, rename or check keys) would
    stop running. None when there are none. (A hook dict this torch version lacks counts
    as empty.)"""
    for m in modules:
        kinds = [kind for attr, kind in _HOOKS.items() if getattr(m, attr, None)]
        if kinds:
            return f"{type(m).__name__} has {' and '.join(kinds)}"
    return None


def plain_sequential(module: nn.Module) -> bool:
    """Whether `module` runs its children one after the other, i.e. is an nn.Sequential
    whose forward is nn.Sequential.forward (not a subclass's own forward, nor one set on
    the instance). Only then are consecutive children a chain."""
    return (isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward
            and "forward" not in vars(module))


def _like(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give the fused module the old one's training mode (weights, dtype and device are
    the rule's job: it builds the new module from the old modules' parameters)."""
    new.train(old.training)
    return new


def _pattern(mods) -> str:
    return " → ".join(type(m).__name__ for m in mods)


def _walk(module: nn.Module, prefix: str, report: ConvertReport) -> None:
    if plain_sequential(module):
        children = list(module._modules.items())
        i = 0
        while i < len(children):
            claimed = None
            for rule in RULES:
                if rule.chain is None:
                    continue
                hit = rule.chain([m for _, m in children], i)
                if hit is not None:
                    claimed = hit
                    break
            if claimed is None:
                i += 1
                continue
            count, fused = claimed
            names = [n for n, _ in children[i:i + count]]
            olds = [m for _, m in children[i:i + count]]
            reason = hooked(*olds)
            if reason is not None:
                report.skip(f"{prefix}{names[0]}", _pattern(olds), reason)
                i += 1
                continue
            module._modules[names[0]] = _like(fused, olds[0])
            for n, old in zip(names[1:], olds[1:]):
                module._modules[n] = _like(nn.Identity(), old)
            report.replaced.append(Replaced(f"{prefix}{names[0]}", _pattern(olds), type(fused).__name__))
            i += count
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        path = f"{prefix}{name}"
        replacement = None
        for rule in RULES:
            if rule.single is not None:
                replacement = rule.single(child)
                if replacement is not None:
                    break
        if replacement is not None:
            reason = hooked(child)
            if reason is None:
                module._modules[name] = _like(replacement, child)
                report.replaced.append(Replaced(path, type(child).__name__, type(replacement).__name__))
                continue
            report.skip(path, type(child).__name__, reason)
        _walk(child, path + ".", report)


def convert(model: nn.Module) -> ConvertReport:
    """Replace supported patterns in `model` in place; return what was replaced/skipped."""
    report = ConvertReport(model)
    for rule in RULES:
        if rule.model_pass is not None:
            rule.model_pass(model, report)
    _walk(model, "", report)
    return report
