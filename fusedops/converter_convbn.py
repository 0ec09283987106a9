"""Converter rule: Conv2d → BatchNorm2d (→ activation) becomes fusedops ConvBNAct2d.

Where a chain is taken:

- In a plain nn.Sequential (converter.plain_sequential: forward is nn.Sequential.forward),
  consecutive children conv, bn (, act) are a chain by construction. Where the Sequential
  lies inside a module that torch.fx traces, the traces must also show that conv, bn and
  act are used only that way (nothing calls seq[i] or reads its parameters from outside);
  otherwise the chain is skipped (an act used elsewhere is just not fused). Where an
  enclosing module cannot be traced, that cannot be checked: a Sequential chain is taken
  all the same (its own forward is known); a forward that calls seq[0] or seq[1] by itself
  from such a module is not detected.
- Elsewhere (any other module, nn.Sequential subclasses with their own forward included),
  a chain is taken only where torch.fx proves the dataflow, in training mode *and* in eval
  mode (every module's own training flag is restored afterwards): in both traces the conv
  is called at most once and its only user is the BN call, whose input is that conv call;
  neither is referred to in any other way (forward reads none of their parameters or
  buffers and passes neither module on); the activation module is fused only if, in both
  traces, it is called at most once, on the BN output, and that is the BN's only user.
  conv, bn (and a fused act) must live in the same parent and be registered under one
  name only (named_modules(remove_duplicate=False)): fx names a module by its first path,
  which may not be the attribute forward uses; an act with several names is not fused.
  The bn must be registered after the conv with no module holding parameters or buffers
  in between: the fused module at the conv's slot yields the conv's tensors then the
  bn's, and parameters() must keep its order (optimizers match saved states by position).
- A chain is fused by fx only where every module above it on the path was traced or is a
  plain nn.Sequential: when a module cannot be traced, the chains of its children are
  skipped with the reason "torch.fx cannot trace <Module> at <path> (<error>): its uses of
  ... are unknown" (it might call child.conv directly), and the module itself is reported.

Python attributes that are not parameters, buffers or modules (e.g. `self.conv.stride`)
are invisible to fx; a forward that reads them from a fused conv or bn fails loudly.

The fused module sits at the conv's attribute, the BN's (and a fused activation's) at
nn.Identity (each in the training mode of the module it replaces); the wrapper takes the
conv's training flag while conv and bn keep their own (a BN frozen with bn.eval() inside a
training model stays frozen). A StateDictKeyMap on the parent keeps the eager state_dict
keys.
"""
from __future__ import annotations

from torch import nn

from .converter import Replaced, Rule, _like, hooked, plain_sequential, register_rule
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


def sequential_chains(seq: nn.Module):
    """(names, conv, bn, act | None, reason | None) for each Conv2d → BatchNorm2d pair of seq;
    nothing unless seq is a plain nn.Sequential (converter.plain_sequential)."""
    if not plain_sequential(seq):
        return
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
    # the wrapper's own flag only: train() would recurse into conv and bn and undo a frozen
    # BN (bn.eval() inside a training model), whose own flag decides in forward
    fused.training = conv.training
    parent._modules[names[0]] = fused
    for n, old in zip(names[1:], (bn, act)):
        parent._modules[n] = _like(nn.Identity(), old)
    StateDictKeyMap(names[0], names[1]).install(parent)
    report.replaced.append(Replaced(path + names[0], _pattern(conv, bn, act), "ConvBNAct2d"))


def _reorders(parent: nn.Module, conv_name: str, bn_name: str) -> str | None:
    """Why fusing would change the order of parent's parameters and buffers (the fused
    module at the conv's slot yields the conv's, then the bn's), or None. Optimizers match
    a saved state to parameters by position, so an eager optimizer checkpoint would load
    onto the wrong tensors."""
    names = list(parent._modules)
    i, j = names.index(conv_name), names.index(bn_name)
    if j < i:
        return ("bn is registered before the conv: fusing would reorder parameters() and the state_dict "
                "(optimizer states are matched by position)")
    for n in names[i + 1:j]:
        m = parent._modules[n]
        if m is not None and (next(m.parameters(), None) is not None or next(m.buffers(), None) is not None):
            return (f"{n} (with parameters or buffers) is registered between the conv and the bn: fusing would "
                    f"reorder parameters() and the state_dict (optimizer states are matched by position)")
    return None


def _split(path: str):
    parent, _, name = path.rpartition(".")
    return parent, name


# ---- torch.fx analysis -----------------------------------------------------------------------

def _has_pair(module: nn.Module) -> bool:
    mods = list(module.modules())
    return any(isinstance(m, nn.BatchNorm2d) for m in mods) and any(isinstance(m, nn.Conv2d) for m in mods)


def _trace(module: nn.Module):
    """[(mode, fx graph, its _Uses)] of module.forward in training mode and in eval mode
    (the flags are set directly: a model's own train() override is not called). Every
    module's own training flag is restored afterwards, and the tensor constants the tracer
    parks on the root are removed."""
    import torch
    import torch.fx

    class Tracer(torch.fx.Tracer):
        def __init__(self):
            super().__init__()
            self.read = set()  # ids of the parameters and buffers forward reads as attributes

        def is_leaf_module(self, m, qualname):
            return isinstance(m, ConvBNAct2d) or super().is_leaf_module(m, qualname)

        def getattr(self, attr, attr_val, parameter_proxy_cache):
            if isinstance(attr_val, torch.Tensor):
                self.read.add(id(attr_val))
            return super().getattr(attr, attr_val, parameter_proxy_cache)

    all_modules = [m for _, m in module.named_modules(remove_duplicate=False)]
    flags = [m.training for m in all_modules]
    attrs = set(vars(module))
    mods = dict(module.named_modules())
    try:
        graphs = []
        for mode in (True, False):
            for m in all_modules:
                m.training = mode
            tracer = Tracer()
            graph = tracer.trace(module)
            graphs.append(("training" if mode else "eval", graph, _Uses(graph, tracer.read, mods)))
        return graphs
    finally:
        for m, flag in zip(all_modules, flags):
            m.training = flag
        for key in set(vars(module)) - attrs:
            if key.startswith("_tensor_constant"):
                del module.__dict__[key]


class _Uses:
    """For one graph: the nodes that refer to each module path (calls of it, get_attr of
    it or of anything inside it, calls of its submodules), and whether forward read a
    module's parameters or buffers as attributes."""

    def __init__(self, graph, read: set, mods: dict):
        self.read, self.mods = read, mods
        self.refs: dict = {}
        for node in graph.nodes:
            if node.op in ("call_module", "get_attr"):
                parts = str(node.target).split(".")
                for k in range(1, len(parts) + 1):
                    self.refs.setdefault(".".join(parts[:k]), []).append(node)

    def of(self, path):
        return self.refs.get(path, [])

    def tensors_read(self, path) -> bool:
        m = self.mods[path]
        return any(id(t) in self.read for t in (*m.parameters(), *m.buffers()))


def _is_call(node, target) -> bool:
    return getattr(node, "op", None) == "call_module" and node.target == target


def _only_input(node):
    """The node's sole argument node, or None (more arguments or keyword arguments)."""
    return node.args[0] if len(node.args) == 1 and not node.kwargs else None


def _prove(uses: _Uses, c: str, b: str, once: bool) -> str | None:
    """None if, in this graph, conv `c` and bn `b` are used only as the chain c → b (each
    call of c feeds only a call of b, each call of b takes a call of c); else the reason."""
    for path, what in ((c, "conv"), (b, "bn")):
        nodes = uses.of(path)
        if uses.tensors_read(path) or any(not _is_call(n, path) for n in nodes):
            return f"forward also reads the {what}'s parameters or buffers (or passes the module on)"
        if once and len(nodes) > 1:
            return "conv or bn module is called more than once"
    for n in uses.of(c):
        users = list(n.users)
        if len(users) != 1 or not _is_call(users[0], b) or _only_input(users[0]) is not n:
            return "conv output has other users"
    for n in uses.of(b):
        if not _is_call(_only_input(n), c):
            return "bn is also applied to something other than the conv output"
    return None


def _prove_act(uses: _Uses, b: str, a: str, once: bool) -> bool:
    """Whether, in this graph, act `a` is used only on the output of bn `b`, which has no
    other user."""
    nodes = uses.of(a)
    if any(not _is_call(n, a) for n in nodes) or (once and len(nodes) > 1):
        return False
    if any(not _is_call(_only_input(n), b) for n in nodes):
        return False
    for n in uses.of(b):
        users = list(n.users)
        if len(users) != 1 or not _is_call(users[0], a) or _only_input(users[0]) is not n:
            return False
    return True


def _proof(graphs, c, b, a, once):
    """(reason | None, act fusable) over the traces of both modes ([(mode, graph, uses)])."""
    uses = [(mode, u) for mode, _, u in graphs]
    bad = [(mode, r) for mode, u in uses if (r := _prove(u, c, b, once)) is not None]
    if bad:
        reason = bad[0][1]
        return (reason if len(bad) == len(uses) else f"{reason} in {bad[0][0]} mode"), False
    return None, a is not None and all(_prove_act(u, b, a, once) for _, u in uses)


class _Analysis:
    """fx traces of `model` taken before anything is replaced: the traced regions (subtrees
    whose root module traced in both modes) and the modules that could not be traced."""

    def __init__(self, model: nn.Module):
        self.regions = []   # (prefix, module, graphs, why_unknown | None)
        self.untraced = []  # (prefix, module, reason)
        self.paths: dict = {}  # id(module) -> every path it is registered under
        for path, m in model.named_modules(remove_duplicate=False):
            self.paths.setdefault(id(m), []).append(path)
        self._visit(model, "", None)

    def _visit(self, module, prefix, unknown):
        if isinstance(module, ConvBNAct2d) or not _has_pair(module):
            return
        if plain_sequential(module):  # its uses of its children are known: calls, in order
            for name, child in module.named_children():
                self._visit(child, f"{prefix}{name}.", unknown)
            return
        try:
            graphs = _trace(module)
        except Exception as exc:  # noqa: BLE001 — any tracing failure means "not proven"
            where = prefix.rstrip(".") or "<root>"
            self.untraced.append((prefix, module, f"torch.fx cannot trace {type(module).__name__}: "
                                                  f"{type(exc).__name__}"))
            why = f"torch.fx cannot trace {type(module).__name__} at {where} ({type(exc).__name__})"
            for name, child in module.named_children():
                self._visit(child, f"{prefix}{name}.", unknown or why)
            return
        self.regions.append((prefix, module, graphs, unknown))

    def region_of(self, path: str):
        """The traced region that contains the module at `path` (a prefix ending in '.')."""
        for region in self.regions:
            if path.startswith(region[0]):
                return region
        return None

    def aliased(self, *modules) -> str | None:
        for m in modules:
            if m is not None and len(self.paths.get(id(m), ())) > 1:
                return (f"{type(m).__name__} is registered under several names "
                        f"({', '.join(self.paths[id(m)])})")
        return None


def _sequential_proof(analysis: _Analysis, prefix: str, conv, bn, act):
    """(reason | None, act fusable) for a chain of the plain Sequential at `prefix`, from
    the traces of the region that contains it (none: nothing to check)."""
    region = analysis.region_of(prefix)
    if region is None:
        return None, act is not None
    first = {}
    for path, m in region[1].named_modules():  # fx names a module by its first path
        first.setdefault(id(m), path)
    c, b = first[id(conv)], first[id(bn)]
    a = first[id(act)] if act is not None else None
    return _proof(region[2], c, b, a, once=False)


def _convert_sequentials(module: nn.Module, prefix: str, report, analysis: _Analysis) -> None:
    for names, conv, bn, act, reason in list(sequential_chains(module)):
        if reason is None:
            reason, act_ok = _sequential_proof(analysis, prefix, conv, bn, act)
            if reason is None and act is not None and not act_ok:
                names, act = names[:2], None
        if reason is not None:
            report.skip(prefix + names[0], _pattern(conv, bn, act), reason)
        else:
            _install(module, names, conv, bn, act, prefix, report)
    for name, child in list(module._modules.items()):
        if child is not None and not isinstance(child, ConvBNAct2d):
            _convert_sequentials(child, f"{prefix}{name}.", report, analysis)


def _convert_region(prefix, region, graphs, unknown, report, analysis: _Analysis) -> None:
    """Chains outside plain Sequentials in one traced region (paths relative to it)."""
    mods = graphs[0][2].mods  # the region's modules as traced (before any replacement)
    candidates = {}  # conv path -> {bn path: act path | None}, in graph order
    for _, graph, _ in graphs:
        for node in graph.nodes:
            if node.op != "call_module" or not isinstance(mods.get(node.target), nn.Conv2d):
                continue
            for user in node.users:
                if user.op == "call_module" and isinstance(mods.get(user.target), nn.BatchNorm2d):
                    act = None
                    bn_users = list(user.users)
                    if len(bn_users) == 1 and bn_users[0].op == "call_module":
                        act = bn_users[0].target
                    candidates.setdefault(node.target, {}).setdefault(user.target, act)
    for conv_path, bns in candidates.items():
        for bn_path, act_path in bns.items():
            conv, bn = mods[conv_path], mods[bn_path]
            parent_path, conv_name = _split(conv_path)
            bn_parent, bn_name = _split(bn_path)
            parent = mods[parent_path] if parent_path else region
            if parent_path == bn_parent and plain_sequential(parent):
                continue  # the Sequential pass decided (and reported) this one
            act = mods.get(act_path) if act_path is not None else None
            if act is not None and not (_fusable_act(act) and _split(act_path)[0] == parent_path
                                        and analysis.aliased(act) is None):
                act = None
            reason = _unsupported(conv, bn)
            if reason is None and parent_path != bn_parent:
                reason = "conv and bn live in different parent modules"
            if reason is None:
                reason = analysis.aliased(conv, bn)
            if reason is None:
                reason = _reorders(parent, conv_name, bn_name)
            if reason is None and unknown is not None:
                reason = f"{unknown}: its uses of {prefix}{conv_path} and {prefix}{bn_path} are unknown"
            act_ok = False
            if reason is None:
                reason, act_ok = _proof(graphs, conv_path, bn_path, act_path if act is not None else None,
                                        once=True)
            if not act_ok:
                act = None
            if reason is None and (parent._modules.get(conv_name) is not conv
                                   or parent._modules.get(bn_name) is not bn):
                reason = "conv or bn was already replaced"
            if reason is not None:
                report.skip(prefix + conv_path, _pattern(conv, bn, act), reason)
                continue
            names = [conv_name, bn_name] + ([_split(act_path)[1]] if act is not None else [])
            _install(parent, names, conv, bn, act, prefix + (parent_path + "." if parent_path else ""), report)


def convbn_pass(model: nn.Module, report) -> None:
    analysis = _Analysis(model)  # traces first: they must see the model as it was written
    _convert_sequentials(model, "", report, analysis)
    for prefix, region, graphs, unknown in analysis.regions:
        _convert_region(prefix, region, graphs, unknown, report, analysis)
    for prefix, module, reason in analysis.untraced:
        if any(isinstance(child, nn.BatchNorm2d) for child in module.children()):
            report.skip(prefix.rstrip(".") or "<root>", PATTERN, reason)


RULE = register_rule(Rule("conv-bn-act", model_pass=convbn_pass))
