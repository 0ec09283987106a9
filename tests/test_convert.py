"""The converter's mechanism (rules are registered by the op families)."""
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
