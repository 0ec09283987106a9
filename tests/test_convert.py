"""The converter's mechanism (rules are registered by the op families)."""
import pytest
import torch
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
        with pytest.raises(ValueError, match="conv.weight is not a parameter"):
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
