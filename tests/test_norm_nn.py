"""fusedops.nn norm modules: eager equivalence, state_dict compatibility, from_modules,
torch.compile(fullgraph=True), and the converter round trip."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fusedops
from fusedops.nn import AddLayerNorm, AddRMSNorm, LayerNormAct, RMSNormAct
from helpers import backend_params, require


@pytest.fixture(params=backend_params())
def dev_backend(request):
    device, backend = request.param
    require(device, backend)
    with fusedops.use_backend(backend):
        yield device, backend


ACT_MODULES = {"identity": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU,
               "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU}


def _randomize(m):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 and p is getattr(m, "weight", None) else 0.0))
    return m


def test_state_dict_and_constructor_compat():
    ln = _randomize(nn.LayerNorm(48, eps=1e-6))
    fused = LayerNormAct(48, eps=1e-6, activation="gelu")
    fused.load_state_dict(ln.state_dict())
    assert set(fused.state_dict()) == {"weight", "bias"}
    assert torch.equal(fused.weight, ln.weight)
    assert LayerNormAct(48, bias=False).bias is None and LayerNormAct(48, elementwise_affine=False).weight is None
    rms = _randomize(nn.RMSNorm(48))
    f2 = RMSNormAct(48, activation="silu")
    f2.load_state_dict(rms.state_dict())
    assert set(f2.state_dict()) == {"weight"}
    assert set(AddLayerNorm(48).state_dict()) == {"weight", "bias"}
    assert set(AddRMSNorm(48).state_dict()) == {"weight"}
    with pytest.raises(ValueError, match="last dim"):
        LayerNormAct((4, 48))
    with pytest.raises(ValueError, match="activation"):
        RMSNormAct(48, activation="tanh")


@pytest.mark.parametrize("act", list(ACT_MODULES))
@pytest.mark.parametrize("norm_cls", [nn.LayerNorm, nn.RMSNorm])
def test_from_modules_matches_eager(dev_backend, norm_cls, act):
    device, _ = dev_backend
    norm = _randomize(norm_cls(64, device=device))
    a = ACT_MODULES[act]()
    fused_cls = LayerNormAct if norm_cls is nn.LayerNorm else RMSNormAct
    fused = fused_cls.from_modules(norm, a)
    assert fused.weight is norm.weight
    x = torch.randn(3, 5, 64, device=device, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y_e = a(norm(x))
    y_f = fused(x2)
    torch.testing.assert_close(y_f, y_e, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y_e)
    ge = torch.autograd.grad(y_e, [x] + list(norm.parameters()), g)
    gf = torch.autograd.grad(y_f, [x2] + list(fused.parameters()), g)
    for u, v in zip(gf, ge):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("cls", [AddLayerNorm, AddRMSNorm])
def test_add_modules_match_eager(dev_backend, cls, inplace):
    device, _ = dev_backend
    m = _randomize(cls(40, activation="gelu_tanh", inplace=inplace, device=device))
    norm = (nn.LayerNorm if cls is AddLayerNorm else nn.RMSNorm)(40, device=device)
    norm.load_state_dict(m.state_dict())
    x = torch.randn(6, 40, device=device)
    r = torch.randn(6, 40, device=device)
    s_e = x + r
    y_e = nn.functional.gelu(norm(s_e), approximate="tanh")
    rb = r.clone()
    y, s = m(x, rb)
    torch.testing.assert_close(y, y_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_e)
    assert (s is rb) == inplace


@pytest.mark.parametrize("cls", [LayerNormAct, RMSNormAct, AddLayerNorm, AddRMSNorm])
def test_modules_take_the_direct_path(dev_backend, cls):
    """Modules hold nn.Parameters: their calls take the one-Function direct path (host
    time), as the functions do with plain tensors, and give the ops' bits."""
    device, _ = dev_backend
    m = _randomize(cls(48, activation="silu", device=device))
    x = torch.randn(5, 48, device=device, requires_grad=True)
    args = (x,) if cls in (LayerNormAct, RMSNormAct) else (x, torch.randn(5, 48, device=device))
    out = m(*args)
    y = out[0] if isinstance(out, tuple) else out
    assert type(y.grad_fn).__name__ == "_NormActFastBackward"
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *m.parameters()], dy)
    ws = [p.detach().clone().requires_grad_() for p in m.parameters()]  # plain tensors
    x2 = x.detach().clone().requires_grad_()
    if cls is LayerNormAct:
        y2 = fusedops.layer_norm_act(x2, ws[0], ws[1], m.eps, "silu")
    elif cls is RMSNormAct:
        y2 = fusedops.rms_norm_act(x2, ws[0], m.eps, "silu")
    elif cls is AddLayerNorm:
        y2 = fusedops.add_layer_norm_act(x2, args[1], ws[0], ws[1], m.eps, "silu")[0]
    else:
        y2 = fusedops.add_rms_norm_act(x2, args[1], ws[0], m.eps, "silu")[0]
    grads2 = torch.autograd.grad(y2, [x2, *ws], dy)
    assert torch.equal(y, y2)
    for a, b in zip(grads, grads2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("make", [lambda d: LayerNormAct(32, activation="gelu_tanh", device=d),
                                  lambda d: RMSNormAct(32, activation="silu", device=d),
                                  lambda d: AddLayerNorm(32, activation="relu", device=d),
                                  lambda d: AddRMSNorm(32, activation="gelu", inplace=True, device=d)],
                         ids=["LayerNormAct", "RMSNormAct", "AddLayerNorm", "AddRMSNorm-inplace"])
def test_module_compile_fullgraph(dev_backend, make):
    device, _ = dev_backend
    torch._dynamo.reset()
    m = _randomize(make(device))
    x = torch.randn(4, 7, 32, device=device)
    r = torch.randn(4, 7, 32, device=device)
    is_add = isinstance(m, (AddLayerNorm, AddRMSNorm))

    def loss(mod, x, r):
        if is_add:
            y, s = mod(x, r * 1)
            return (y * y).sum() + s.sum(), y
        y = mod(x)
        return (y * y).sum(), y

    results = []
    for fn in (lambda x, r: loss(m, x, r), torch.compile(lambda x, r: loss(m, x, r), fullgraph=True)):
        xs = x.clone().requires_grad_()
        rs = r.clone().requires_grad_()
        m.zero_grad()
        val, y = fn(xs, rs)
        val.backward()
        results.append([y.detach(), xs.grad] + [p.grad.clone() for p in m.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d), nn.GELU(approximate="tanh"), nn.Linear(d, d),
                                 nn.RMSNorm(d), nn.SiLU(), nn.Linear(d, d), nn.LayerNorm(d), nn.Tanh())
        self.final = nn.LayerNorm(d)
        self.other = nn.LayerNorm((2, d // 2))  # normalises two dims: not fusable, left alone

    def forward(self, x):
        h = self.final(self.mlp(x))
        return h + self.other(h.view(*h.shape[:-1], 2, -1)).view_as(h)


def test_convert_round_trip(dev_backend):
    device, _ = dev_backend
    torch.manual_seed(0)
    model = Block(16).to(device)
    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            _randomize(m)
    reference = Block(16).to(device)
    reference.load_state_dict(model.state_dict())
    keys = set(model.state_dict())
    report = fusedops.convert(model)
    assert {r.path for r in report.replaced} == {"mlp.1", "mlp.4", "mlp.7", "final"}
    assert isinstance(model.mlp[1], LayerNormAct) and model.mlp[1].activation == "gelu_tanh"
    assert isinstance(model.mlp[2], nn.Identity)
    assert isinstance(model.mlp[4], RMSNormAct) and model.mlp[4].activation == "silu"
    assert isinstance(model.mlp[7], LayerNormAct) and model.mlp[7].activation == "identity"
    assert isinstance(model.mlp[8], nn.Tanh) and type(model.other) is nn.LayerNorm
    assert set(model.state_dict()) == keys
    x = torch.randn(5, 16, device=device)
    y, y_ref = model(x), reference(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    ref_grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)
