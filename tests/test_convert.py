"""The converter's mechanism (rules are registered by the op families)."""
import pytest
import torch
import torch.fx
from torch import nn

from fusedops import converter as conv


class Twice(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return torch.relu(self.lin(x))


def test_chain_rule_replaces_and_keeps_positions(monkeypatch):
    rule = conv.Rule("linear-relu", chain=lambda mods, i: (2, Twice(mods[i])) if (
        isinstance(mods[i], nn.Linear) and i + 1 < len(mods) and isinstance(mods[i + 1], nn.ReLU)) else None)
    monkeypatch.setattr(conv, "RULES", [rule])
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 3), nn.ReLU()), nn.Tanh()).eval()
    x = torch.randn(2, 4)
    expected = model(x)
    report = conv.convert(model)
    assert [r.path for r in report.replaced] == ["0", "2.0"]
    assert isinstance(model[0], Twice) and isinstance(model[1], nn.Identity) and not model[0].training
    assert torch.equal(model(x), expected)
    assert "2 replaced" in str(report)


def test_no_rules_leaves_model_untouched(monkeypatch):
    monkeypatch.setattr(conv, "RULES", [])
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    before = list(model.modules())
    report = conv.convert(model)
    assert report.replaced == [] and list(model.modules()) == before


def test_modules_with_hooks_are_left_in_place():
    """A fused module never calls the modules it replaces: where they carry hooks
    (feature extractors, the old-style weight_norm / spectral_norm), convert leaves them
    and says why; the hooks keep running and the outputs are unchanged."""
    import warnings

    import fusedops
    from fusedops.nn import ConvBNAct2d

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        wn_conv = torch.nn.utils.weight_norm(nn.Conv2d(3, 4, 3, padding=1, bias=False))
    hooked_act = nn.ReLU()
    model = nn.Sequential(wn_conv, nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), hooked_act,
                          nn.Flatten(1), nn.LayerNorm(256), nn.GELU(), nn.LayerNorm(256))
    calls = []
    hooked_act.register_forward_hook(lambda m, i, o: calls.append("act"))
    model[9].register_forward_pre_hook(lambda m, i: calls.append("ln"))
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    calls.clear()
    report = fusedops.convert(model)
    skipped = {s.path: s.reason for s in report.skipped}
    replaced = {r.path: r.pattern for r in report.replaced}
    assert "forward pre-hooks" in skipped["0"], str(report)            # the weight-normed conv
    assert replaced["3"] == "Conv2d → BatchNorm2d", str(report)      # its hooked ReLU stays
    assert model[5] is hooked_act
    assert replaced["7"] == "LayerNorm → GELU" and "forward pre-hooks" in skipped["9"], str(report)
    assert isinstance(model[3], ConvBNAct2d) and type(model[0]) is nn.Conv2d
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert calls == ["act", "ln"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(ValueError, match="forward pre-hooks|conv.weight is not a parameter"):
            ConvBNAct2d.from_modules(torch.nn.utils.weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4))


def test_jit_trace_sees_torch_ops_only():
    """torch.jit.trace (ONNX export, TorchScript deployment) of a converted and folded
    model records torch ops only (the fused kernels are fusedops_C ops, which those
    consumers do not know), with the same outputs."""
    import copy
    import re
    import warnings

    import fusedops

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(1),
                          nn.LayerNorm(256), nn.GELU(), nn.Linear(256, 3), nn.RMSNorm(3))
    model(torch.randn(4, 3, 8, 8))  # running statistics away from their init
    model.eval()
    report = fusedops.convert(model)
    assert len(report.replaced) == 3, str(report)
    folded = fusedops.fold_conv_bn(copy.deepcopy(model))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        for m in (model, folded):
            traced = torch.jit.trace(m, x, check_trace=False)
            assert not re.findall(r"fusedops(?:_C)?::\w+", str(traced.inlined_graph))
            torch.testing.assert_close(traced(x), m(x), atol=1e-5, rtol=1e-5)


# ---- conv+BN and norm converter defects (review findings) -------------------------------------

def _randomize_bns(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    return model


def _same_as_eager(eager, model, shape, steps=2, tol=5e-4):
    """Run both models on the same inputs (forward, and backward where grad is on); the
    outputs, then every state_dict entry under its eager key (weights, running stats,
    num_batches_tracked) and every parameter's grad must match."""
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(shape, generator=g)
        ye, ym = eager(x), model(x)
        torch.testing.assert_close(ym, ye, atol=tol, rtol=tol)
        if ye.requires_grad:
            dy = torch.randn(ye.shape, generator=g)
            ye.backward(dy), ym.backward(dy)
    se, sm = eager.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
    assert list(sm) == list(se)  # the eager keys, in the eager order
    for k, v in se.items():
        torch.testing.assert_close(sm[k].detach(), v.detach(), atol=tol, rtol=tol, msg=lambda m: f"{k}: {m}")
        if isinstance(v, nn.Parameter):
            assert (sm[k].grad is None) == (v.grad is None), k
            if v.grad is not None:
                torch.testing.assert_close(sm[k].grad, v.grad, atol=tol, rtol=tol, msg=lambda m: f"{k}.grad: {m}")


def _flags(model):
    return [(n, m.training) for n, m in model.named_modules(remove_duplicate=False)]


class _ConvBN(nn.Module):
    """conv → bn → act outside any Sequential (the fx path)."""

    def __init__(self, cin=3, cout=4):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def _convert_copy(eager):
    import copy

    import fusedops

    model = copy.deepcopy(eager)
    return model, fusedops.convert(model)


@pytest.mark.parametrize("where", ["sequential", "fx"])
def test_frozen_bn_stays_frozen(where):
    """A BN frozen with bn.eval() inside a training model keeps using (and not updating)
    its running statistics after convert: only the wrapper takes the conv's flag."""
    from fusedops.nn import ConvBNAct2d

    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()) \
        if where == "sequential" else _ConvBN()
    _randomize_bns(eager).train()
    bn = [m for m in eager.modules() if isinstance(m, nn.BatchNorm2d)][0]
    bn.eval()
    model, report = _convert_copy(eager)
    assert len(report.replaced) == 1, str(report)
    fused = [m for m in model.modules() if isinstance(m, ConvBNAct2d)][0]
    assert fused.training and fused.conv.training and not fused.bn.training
    _same_as_eager(eager, model, (2, 3, 6, 6))
    assert int(fused.bn.num_batches_tracked) == 0


class _ReadsWeight(_ConvBN):
    def forward(self, x):
        return self.act(self.bn(self.conv(x))) * self.conv.weight.abs().mean()


class _ReadsBias(_ConvBN):
    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn.bias.view(1, -1, 1, 1)


class _ReadsBuffer(_ConvBN):
    def forward(self, x):
        return self.bn(self.conv(x)) - self.bn.running_mean.view(1, -1, 1, 1)


class _PassesModule(_ConvBN):
    def forward(self, x):
        return self.bn(self.conv(x)) * _weight_norm(self.conv)


def _weight_norm(conv):
    return conv.weight.norm()


torch.fx.wrap("_weight_norm")


@pytest.mark.parametrize("cls", [_ReadsWeight, _ReadsBias, _ReadsBuffer, _PassesModule])
def test_fx_chain_read_through_attributes_is_skipped(cls):
    """A forward that also reads the conv's or bn's parameters / buffers (or hands the
    module to a function) would break once they become ConvBNAct2d / nn.Identity: the
    chain is skipped, with the reason."""
    torch.manual_seed(0)
    eager = _randomize_bns(cls())
    model, report = _convert_copy(eager)
    assert not report.replaced, str(report)
    assert [s.path for s in report.skipped] == ["conv"], str(report)
    assert "reads the" in report.skipped[0].reason, str(report)
    _same_as_eager(eager, model, (2, 3, 6, 6))
    eager.eval(), model.eval()
    _same_as_eager(eager, model, (2, 3, 6, 6), steps=1)


class _AliasConv(_ConvBN):
    def __init__(self):
        super().__init__()
        self.c = self.conv

    def forward(self, x):
        return self.bn(self.c(x))


class _AliasBN(_ConvBN):
    def __init__(self):
        super().__init__()
        self.bn1 = self.bn

    def forward(self, x):
        return self.bn1(self.conv(x))


class _AliasAct(_ConvBN):
    def __init__(self):
        super().__init__()
        self.act2 = nn.SiLU()
        self.act = self.act2   # the SiLU is registered as act2 (first) and act

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


@pytest.mark.parametrize("cls", [_AliasConv, _AliasBN, _AliasAct])
def test_fx_module_with_two_names(cls):
    """fx names a module by its first path, forward may use the other: a conv or bn
    registered under several names is skipped (reason given); an activation so
    registered is just not fused."""
    torch.manual_seed(0)
    eager = _randomize_bns(cls())
    model, report = _convert_copy(eager)
    if cls is _AliasAct:
        assert [(r.path, r.pattern) for r in report.replaced] == [("conv", "Conv2d → BatchNorm2d")], str(report)
        assert type(model.act) is nn.SiLU and model.act is model.act2
    else:
        assert not report.replaced, str(report)
        assert "registered under several names" in report.skipped[0].reason, str(report)
    _same_as_eager(eager, model, (2, 3, 6, 6))
    eager.eval(), model.eval()
    _same_as_eager(eager, model, (2, 3, 6, 6), steps=1)


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


class _ReachesIn(nn.Module):
    """Untraceable (data-dependent branch); one branch calls block.conv directly."""

    def __init__(self):
        super().__init__()
        self.block = _Inner()
        self.seq = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:
            return self.seq(self.block(x))
        return self.seq(self.block.conv(x))


def test_untraceable_parent_skips_its_childrens_fx_chains():
    """A module fx cannot trace may reach into its children: their fx chains are skipped
    ("... cannot be traced: its uses of ... are unknown"); plain Sequential chains are
    still fused (their forward is known); outputs match eager on both branches."""
    torch.manual_seed(0)
    eager = _randomize_bns(_ReachesIn())
    model, report = _convert_copy(eager)
    assert [r.path for r in report.replaced] == ["seq.0"], str(report)
    skipped = {s.path: s.reason for s in report.skipped}
    assert "cannot trace _ReachesIn" in skipped["block.conv"] and "unknown" in skipped["block.conv"], str(report)
    for sign in (1, -1):
        eager.train(), model.train()
        x = sign * (torch.rand(2, 3, 6, 6) + 0.1)
        torch.testing.assert_close(model(x), eager(x), atol=5e-4, rtol=5e-4)
        eager.eval(), model.eval()
        torch.testing.assert_close(model(x), eager(x), atol=5e-4, rtol=5e-4)


def test_children_of_a_plain_sequential_are_traced_on_their_own():
    """A plain Sequential only calls its children: each child is traced and fused as before
    (even where the Sequential as a whole could not be traced)."""
    torch.manual_seed(0)
    eager = _randomize_bns(nn.Sequential(_ConvBN(3, 4), _Inner()))
    eager[1].conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    model, report = _convert_copy(eager)
    assert sorted(r.path for r in report.replaced) == ["0.conv", "1.conv"], str(report)
    assert report.replaced[0].pattern == "Conv2d → BatchNorm2d → ReLU"
    _same_as_eager(eager, model, (2, 3, 6, 6))


class _DeepSup(nn.Module):
    """A training-only aux head reads the conv output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.aux = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        out = self.bn(y)
        if self.training:
            out = out + self.aux(y)
        return out


class _EvalOnlyAct(_ConvBN):
    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if self.training else self.act(y)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fx_proof_holds_in_both_modes(mode):
    """The fx proof is made in training and in eval mode, whatever mode the model is in
    (every module's own flag is restored); only what holds in both is fused."""
    torch.manual_seed(0)
    eager = _randomize_bns(nn.Sequential(_DeepSup(), _EvalOnlyAct()))
    eager[1].conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    getattr(eager, mode)()
    eager[0].bn.eval()   # mixed flags must survive the two traces
    eager[1].train()
    flags = _flags(eager)
    model, report = _convert_copy(eager)
    assert _flags(eager) == flags
    assert {s.path: s.reason for s in report.skipped} == {"0.conv": "conv output has other users in training mode"}
    assert [(r.path, r.pattern) for r in report.replaced] == [("1.conv", "Conv2d → BatchNorm2d")], str(report)
    assert type(model[1].act) is nn.ReLU
    for m in (eager, model):
        m.train()
    _same_as_eager(eager, model, (2, 3, 6, 6))
    for m in (eager, model):
        m.eval()
    _same_as_eager(eager, model, (2, 3, 6, 6), steps=1)


def test_tracing_both_modes_does_not_call_train():
    """The flags are set directly for the two traces: a model's own train() override (which
    may freeze stages or change requires_grad) is not run by convert."""
    calls = []

    class Overrides(_ConvBN):
        def train(self, mode=True):
            calls.append(mode)
            return super().train(mode)

    model = Overrides().eval()
    calls.clear()
    report = conv.convert(model)
    assert len(report.replaced) == 1 and calls == [] and not any(m.training for m in model.modules())


class _SkipSeq(nn.Sequential):
    """An nn.Sequential subclass whose forward is not a chain: the conv output is used twice."""

    def __init__(self):
        super().__init__(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        y = self[0](x)
        return self[2](self[1](y)) + y


class _ScaledSeq(nn.Sequential):
    """An nn.Sequential subclass with its own forward that does run the chain."""

    def forward(self, x):
        return super().forward(x) * 2


class _NormSeq(nn.Sequential):
    def __init__(self):
        super().__init__(nn.LayerNorm(8), nn.GELU())

    def forward(self, x):
        h = self[0](x)
        return h + self[1](h)


def test_sequential_subclass_with_own_forward_is_not_a_chain():
    """Only an nn.Sequential whose forward is nn.Sequential.forward is a chain; other
    subclasses go through the fx proof (conv+BN) or have their lone norms replaced."""
    import copy

    import fusedops

    torch.manual_seed(0)
    eager = _randomize_bns(_SkipSeq())
    model, report = _convert_copy(eager)
    assert not report.replaced and report.skipped[0].reason == "conv output has other users", str(report)
    _same_as_eager(eager, model, (2, 4, 6, 6))
    folded = fusedops.fold_conv_bn(copy.deepcopy(eager))
    assert type(folded[0]) is nn.Conv2d
    eager.eval()
    with torch.no_grad():
        x = torch.randn(2, 4, 6, 6)
        torch.testing.assert_close(folded(x), eager(x), atol=1e-5, rtol=1e-5)

    eager = _randomize_bns(_ScaledSeq(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()))
    model, report = _convert_copy(eager)
    assert [(r.path, r.pattern) for r in report.replaced] == [("0", "Conv2d → BatchNorm2d → ReLU")], str(report)
    _same_as_eager(eager, model, (2, 4, 6, 6))

    eager = _NormSeq()
    model, report = _convert_copy(eager)
    assert [(r.path, r.pattern) for r in report.replaced] == [("0", "LayerNorm")], str(report)
    assert type(model[1]) is nn.GELU
    _same_as_eager(eager, model, (3, 8))


class _CallsSeqMember(nn.Module):
    """Traced; forward calls the Sequential's conv by itself too."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        return self.seq(x) + self.seq[0](x)


def test_sequential_chain_used_from_outside_is_skipped():
    """Where the enclosing module traces, a Sequential chain whose conv is also called from
    outside the Sequential is skipped; the same ReLU at two positions is still fused."""
    torch.manual_seed(0)
    eager = _randomize_bns(_CallsSeqMember())
    model, report = _convert_copy(eager)
    assert not report.replaced and report.skipped[0].path == "seq.0", str(report)
    _same_as_eager(eager, model, (2, 3, 6, 6))

    relu = nn.ReLU()
    eager = _randomize_bns(nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), relu,
                                         nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), relu))
    model, report = _convert_copy(eager)
    assert [r.pattern for r in report.replaced] == ["Conv2d → BatchNorm2d → ReLU"] * 2, str(report)
    _same_as_eager(eager, model, (2, 3, 6, 6))


def test_identity_slots_keep_the_mode():
    """convert of an eval model leaves every module in eval mode, the nn.Identity put in
    the BN's / activation's slot included."""
    eager = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(1),
                          nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 3)).eval()
    fx = _ConvBN().eval()
    for e in (eager, fx):
        model, report = _convert_copy(e)
        assert report.replaced, str(report)
        assert not any(m.training for m in model.modules())
        assert sum(type(m) is nn.Identity for m in model.modules()) == (3 if e is eager else 2)
        with torch.no_grad():
            _same_as_eager(e, model, (2, 3, 6, 6), steps=1)


def test_state_dict_hooks_are_kept():
    """A module with state_dict / load_state_dict hooks is left in place (and reported):
    a fused module would not run them."""
    calls = []
    eager = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.GELU(), nn.Unflatten(1, (2, 2, 2)),
                          nn.Conv2d(2, 4, 1, bias=False), nn.BatchNorm2d(4))
    eager[1]._register_state_dict_hook(lambda mod, sd, prefix, local: sd.__setitem__(prefix + "extra", torch.ones(1)))
    eager[4].register_load_state_dict_post_hook(lambda mod, keys: calls.append("conv"))
    eager[1].register_load_state_dict_pre_hook(lambda *a: calls.append("ln"))
    keys = list(eager.state_dict())
    model, report = _convert_copy(eager)
    assert not report.replaced, str(report)
    skipped = {s.path: s.reason for s in report.skipped}
    assert "state_dict hooks" in skipped["1"] and "load_state_dict pre-hooks" in skipped["1"], str(report)
    assert "load_state_dict post-hooks" in skipped["4"], str(report)
    assert list(model.state_dict()) == keys and "1.extra" in keys
    model.load_state_dict({k: v for k, v in eager.state_dict().items() if k != "1.extra"})
    assert calls == ["ln", "conv"]
    model.train()
    with torch.no_grad():
        x = torch.randn(2, 8)
        torch.testing.assert_close(model(x), eager(x))


def test_report_resnet50_converts_every_chain():
    """The model report's ResNet-50 (all chains in plain Sequentials under traced blocks):
    every Conv2d → BatchNorm2d is replaced, nothing skipped."""
    from fusedops.report import models

    torch.manual_seed(0)
    eager = models.resnet50(tiny=True).build()
    model, report = _convert_copy(eager)
    assert len(report.replaced) == 17 and not report.skipped, str(report)
    assert sum(r.pattern.endswith("ReLU") for r in report.replaced) == 9
    _same_as_eager(eager, model, (2, 3, 32, 32), steps=1, tol=2e-3)


class _ConvsThenBNs(nn.Module):
    def __init__(self, bn_first=False):
        super().__init__()
        if bn_first:
            self.bn1 = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        if not bn_first:
            self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.conv3(x))


@pytest.mark.parametrize("bn_first", [False, True])
def test_fx_chain_that_would_reorder_parameters_is_skipped(bn_first):
    """The fused module yields the conv's tensors then the bn's at the conv's slot: a chain
    whose bn is registered before its conv, or after another module with parameters, is
    skipped (parameters() keeps the eager order, so an eager optimizer state loads onto the
    right tensors); an adjacent pair is fused."""
    eager = _randomize_bns(_ConvsThenBNs(bn_first))
    model, report = _convert_copy(eager)
    # bn_first: bn1, conv1, conv2, bn2 (conv2 and bn2 adjacent); else conv1, conv2, bn1, bn2
    assert [r.path for r in report.replaced] == (["conv2", "conv3"] if bn_first else ["conv3"]), str(report)
    skipped = {s.path: s.reason for s in report.skipped}
    assert "reorder parameters()" in skipped["conv1"], str(report)
    assert bn_first or "reorder parameters()" in skipped["conv2"], str(report)
    assert [p.shape for p in model.parameters()] == [p.shape for p in eager.parameters()]
    assert list(model.state_dict()) == list(eager.state_dict())
    _same_as_eager(eager, model, (2, 3, 6, 6))


def test_parametrized_conv_outside_a_sequential_is_reported():
    """A conv under torch.nn.utils.parametrizations (weight_norm / spectral_norm: a
    Parametrized subclass) in a module fx traces is not fused, and the report says so."""
    from torch.nn.utils.parametrizations import weight_norm

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = weight_norm(nn.Conv2d(3, 4, 3, padding=1, bias=False))
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    eager = Block()
    model, report = _convert_copy(eager)
    assert not report.replaced, str(report)
    skipped = {s.path: s.reason for s in report.skipped}
    assert "not a plain Conv2d" in skipped["conv"], str(report)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(model(x), eager(x))


# ---- norm → Linear: autocast_output ---------------------------------------------------------------

class _Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.out(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)


class _Block(nn.Module):
    """Pre-norm: ln1 feeds the attention's qkv Linear (inside another module), ln2 a
    Sequential whose first child is a Linear."""

    def __init__(self, d):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = _Attn(d)
        self.ln2 = nn.RMSNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class _Others(nn.Module):
    """Norms that do not feed only Linears: `both` also feeds the residual, `read` has its
    weight read by forward, `act` feeds a GELU (the norm-activation rule's), `lone` feeds a
    Linear only in training mode."""

    def __init__(self, d):
        super().__init__()
        self.block = _Block(d)
        self.both, self.lin = nn.LayerNorm(d), nn.Linear(d, d)
        self.read, self.lin2 = nn.LayerNorm(d), nn.Linear(d, d)
        self.act = nn.Sequential(nn.LayerNorm(d), nn.GELU(), nn.Linear(d, d))
        self.lone, self.lin3 = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        x = self.block(x)
        h = self.both(x)
        x = x + self.lin(h) + h
        x = self.lin2(self.read(x)) * self.read.weight.mean()
        x = self.act(x)
        h = self.lone(x)
        return x + (self.lin3(h) if self.training else h)


def _randomize_norms(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                m.weight.copy_(torch.rand_like(m.weight) + 0.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn_like(m.bias) * 0.3)
    return model


def test_norms_feeding_only_linears_write_the_autocast_dtype():
    """convert sets autocast_output exactly where fx proves, in both modes, that the norm
    feeds only nn.Linear calls; the others are skipped with their reasons (or left to the
    other rules), and the converted model matches eager under autocast and outside it."""
    from fusedops.nn import LayerNormAct, RMSNormAct

    torch.manual_seed(0)
    eager = _randomize_norms(_Others(32))
    model, report = _convert_copy(eager)
    replaced = {r.path: (r.pattern, r.new) for r in report.replaced}
    assert replaced["block.ln1"] == ("LayerNorm → Linear", "LayerNormAct(autocast_output=True)"), str(report)
    assert replaced["block.ln2"] == ("RMSNorm → Linear", "RMSNormAct(autocast_output=True)"), str(report)
    assert isinstance(model.block.ln1, LayerNormAct) and model.block.ln1.autocast_output
    assert isinstance(model.block.ln2, RMSNormAct) and model.block.ln2.autocast_output
    assert replaced["act.0"] == ("LayerNorm → GELU", "LayerNormAct") and not model.act[0].autocast_output
    skipped = {s.path: s.reason for s in report.skipped}
    assert "something other than an nn.Linear" in skipped["both"], str(report)
    assert "reads its parameters" in skipped["read"], str(report)
    assert "in eval mode" in skipped["lone"], str(report)
    for name in ("both", "read", "lone"):  # the plain rule still fuses them (no autocast_output)
        assert not getattr(model, name).autocast_output
    assert set(model.state_dict()) == set(eager.state_dict())
    x = torch.randn(2, 5, 32)
    for autocast in (True, False):
        outs = []
        for m in (model, eager):
            m.zero_grad()
            xl = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = m(xl)
            out.float().square().sum().backward()
            outs.append([out.detach().float(), xl.grad] + [p.grad for p in m.parameters()])
        tol = 3e-2 if autocast else 1e-4
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))


class _Untraceable(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln, self.lin = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        h = self.ln(x)
        return self.lin(h) if x.sum() > 0 else self.lin(h) + h  # data-dependent: fx cannot trace it


def test_norm_linear_needs_a_traced_model():
    """Where fx cannot trace the model, no norm gets autocast_output (a forward fx cannot see
    may use the norm's output elsewhere): reported once; the plain rule still fuses it."""
    model, report = _convert_copy(_Untraceable(16))
    assert not model.ln.autocast_output
    assert any(s.path == "<root>" and "cannot trace _Untraceable" in s.reason for s in report.skipped), str(report)


def test_norm_linear_skips_hooked_linear_and_aliased_norm():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.lin = nn.LayerNorm(8), nn.Linear(8, 8)
            self.ln2, self.lin2 = nn.LayerNorm(8), nn.Linear(8, 8)
            self.alias = self.ln2

        def forward(self, x):
            return self.lin2(self.ln2(self.lin(self.ln(x))))

    eager = M()
    eager.lin.register_forward_pre_hook(lambda mod, args: None)
    model, report = _convert_copy(eager)
    skipped = {s.path: s.reason for s in report.skipped}
    assert "hooks" in skipped["ln"] and "several names" in skipped["ln2"], str(report)
    assert not model.ln.autocast_output


def test_report_gpt2_norms_write_the_autocast_dtype():
    """The model report's GPT-2: every LayerNorm feeds only Linears (qkv, the MLP's first,
    the LM head): all get autocast_output, nothing skipped."""
    from fusedops.report import models

    torch.manual_seed(0)
    eager = models.gpt2(tiny=True).build()
    model, report = _convert_copy(eager)
    norms = [p for p, m in eager.named_modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) >= 3 and not report.skipped, str(report)
    assert {r.path for r in report.replaced} == set(norms)
    assert all(model.get_submodule(p).autocast_output for p in norms)
