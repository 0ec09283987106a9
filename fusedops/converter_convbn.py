"""Converter rule: Conv2d → BatchNorm2d (→ activation) becomes fusedops ConvBNAct2d.

- In an nn.Sequential, consecutive children conv, bn (, act) are a chain by construction.
- Elsewhere, a chain is taken only where torch.fx proves the dataflow: the traced graph
  calls the conv module, whose only user is the BN module call, whose output feeds the
  activation module (which is fused only if that module object is called nowhere else);
  a module whose forward fx cannot trace is skipped with the reason.

The fused module sits at the conv's attribute, the BN's (and a fused activation's) at
nn.Identity; a StateDictKeyMap on the parent keeps the eager state_dict keys.
"""
from __future__ import annotations

from torch import nn

from .converter import Replaced, Rule, hooked, register_rule
from .nn_convbn import ConvBNAct2d, StateDictKeyMap, activation_of

PATTERN = "Conv2d → BatchNorm2d"


def _unsupported(conv, bn) -> str | None:
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain Conv2d"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r} (only 'zeros')"
    if type(bn) is not nn.BatchNorm2d:
        return f"{type(bn).__name__} is not a plain BatchNorm2d"
    if bn.num_features != conv.out_channels:
        return "bn.num_features != conv.out_channels"
    return hooked(conv, bn)


def _fusable_act(act) -> bool:
    """An activation module the fused module can take over (a supported one, without hooks)."""
    return activation_of(act) is not None and not isinstance(act, nn.Identity) and hooked(act) is None


def sequential_chains(seq: nn.Sequential):
    """(names, conv, bn, act | None, reason | None) for each Conv2d → BatchNorm2d pair of seq."""
    items = list(seq._modules.items())
    i = 0
    while i + 1 < len(items):
        (cn, conv), (bn_name, bn) = items[i], items[i + 1]
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            names, act = [cn, bn_name], None
            if i + 2 < len(items) and _fusable_act(items[i + 2][1]):
                act = items[i + 2][1]
                names.append(items[i + 2][0])
            yield names, conv, bn, act, _unsupported(conv, bn)
            i += len(names)
        else:
            i += 1


def _pattern(conv, bn, act) -> str:
    return PATTERN + (f" → {type(act).__name__}" if act is not None else "")


def _install(parent, names, conv, bn, act, path, report):
    fused = ConvBNAct2d.from_modules(conv, bn, act)
    fused.train(conv.training)
    parent._modules[names[0]] = fused
    for n in names[1:]:
        parent._modules[n] = nn.Identity()
    StateDictKeyMap(names[0], names[1]).install(parent)
    report.replaced.append(Replaced(path + names[0], _pattern(conv, bn, act), "ConvBNAct2d"))


def _convert_sequentials(module: nn.Module, prefix: str, report) -> None:
    if isinstance(module, nn.Sequential):
        for names, conv, bn, act, reason in list(sequential_chains(module)):
            if reason is not None:
                report.skip(prefix + names[0], _pattern(conv, bn, act), reason)
            else:
                _install(module, names, conv, bn, act, prefix, report)
    for name, child in list(module._modules.items()):
        if child is not None and not isinstance(child, ConvBNAct2d):
            _convert_sequentials(child, f"{prefix}{name}.", report)


def _split(path: str):
    parent, _, name = path.rpartition(".")
    return parent, name


def _convert_fx(model: nn.Module, prefix: str, report) -> None:
    """Chains outside nn.Sequential, proven by an fx trace of `model` (or, if it cannot be
    traced, of each child)."""
    has_pair = any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) and any(
        type(m) is nn.Conv2d for m in model.modules())
    if not has_pair or isinstance(model, (nn.Sequential, ConvBNAct2d)):
        if has_pair and isinstance(model, nn.Sequential):
            for name, child in model.named_children():
                _convert_fx(child, f"{prefix}{name}.", report)
        return
    import torch.fx

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, ConvBNAct2d) or super().is_leaf_module(m, qualname)

    try:
        graph = Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 — any tracing failure means "not proven"
        reason = f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}"
        found = False
        for name, child in model.named_children():
            _convert_fx(child, f"{prefix}{name}.", report)
        for name, child in model.named_children():
            if isinstance(child, nn.BatchNorm2d):
                found = True
        if found:
            report.skip(prefix.rstrip(".") or "<root>", PATTERN, reason)
        return
    mods = dict(model.named_modules())
    calls: dict = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(graph.nodes):
        if node.op != "call_module" or type(mods.get(node.target)) is not nn.Conv2d:
            continue
        conv_path = node.target
        users = list(node.users)
        bn_node = users[0] if len(users) == 1 else None
        if bn_node is None or bn_node.op != "call_module" or not isinstance(mods.get(bn_node.target), nn.BatchNorm2d):
            if any(u.op == "call_module" and isinstance(mods.get(u.target), nn.BatchNorm2d) for u in users):
                report.skip(prefix + conv_path, PATTERN, "conv output has other users")
            continue
        conv, bn = mods[conv_path], mods[bn_node.target]
        parent_path, conv_name = _split(conv_path)
        bn_parent, bn_name = _split(bn_node.target)
        reason = _unsupported(conv, bn)
        if reason is None and parent_path != bn_parent:
            reason = "conv and bn live in different parent modules"
        if reason is None and (calls[conv_path] > 1 or calls[bn_node.target] > 1):
            reason = "conv or bn module is called more than once"
        act, names = None, [conv_name, bn_name]
        bn_users = list(bn_node.users)
        if len(bn_users) == 1 and bn_users[0].op == "call_module":
            cand = mods.get(bn_users[0].target)
            act_parent, act_name = _split(bn_users[0].target)
            if _fusable_act(cand) and calls[bn_users[0].target] == 1 and act_parent == parent_path:
                act = cand
                names.append(act_name)
        if reason is not None:
            report.skip(prefix + conv_path, _pattern(conv, bn, act), reason)
            continue
        parent = mods[parent_path] if parent_path else model
        _install(parent, names, conv, bn, act, prefix + (parent_path + "." if parent_path else ""), report)


def convbn_pass(model: nn.Module, report) -> None:
    _convert_sequentials(model, "", report)
    _convert_fx(model, "", report)


RULE = register_rule(Rule("conv-bn-act", model_pass=convbn_pass))
