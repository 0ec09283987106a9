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


# ---- in-place residual: refusals, views, tracing ----------------------------------------------

ADD_CALLS = ["add_layer_norm_act", "add_rms_norm_act", AddLayerNorm, AddRMSNorm]
_ids = lambda c: c if isinstance(c, str) else c.__name__  # noqa: E731


def _add_call(call, w0, b0, inplace=True):
    """(f(x, residual) -> (y, s), weight, bias or None) for a functional or module add-norm
    call (SiLU, eps 1e-5) with weight w0 and bias b0 (parameters requiring grad)."""
    rms = call in ("add_rms_norm_act", AddRMSNorm)
    if isinstance(call, str):
        w = w0.clone().requires_grad_()
        b = None if rms else b0.clone().requires_grad_()
        if rms:
            return (lambda x, r: fusedops.add_rms_norm_act(x, r, w, 1e-5, "silu", inplace=inplace)), w, b
        return (lambda x, r: fusedops.add_layer_norm_act(x, r, w, b, 1e-5, "silu", inplace=inplace)), w, b
    m = call(w0.shape[0], eps=1e-5, activation="silu", inplace=inplace, device=w0.device, dtype=w0.dtype)
    with torch.no_grad():
        m.weight.copy_(w0)
        if not rms:
            m.bias.copy_(b0)
    return m, m.weight, (None if rms else m.bias)


def _eager_add(x, r, w, b):
    """eager: r.add_(x), then the norm of r (RMSNorm when b is None) + SiLU."""
    r.add_(x)
    n = x.shape[-1]
    z = nn.functional.rms_norm(r, (n,), w, 1e-5) if b is None else nn.functional.layer_norm(r, (n,), w, b, 1e-5)
    return nn.functional.silu(z), r


@pytest.mark.parametrize("call", ADD_CALLS, ids=_ids)
def test_inplace_leaf_residual_refused_before_writing(dev_backend, call):
    """A leaf residual that requires grad (or a view of one) under grad mode: eager's add_
    error, in its words, and the buffer untouched; under no_grad the write is allowed, as
    in eager."""
    device, _ = dev_backend
    f, _, _ = _add_call(call, torch.rand(16, device=device) + 0.5, torch.randn(16, device=device))
    x = torch.randn(4, 16, device=device, requires_grad=True)
    r = torch.randn(4, 16, device=device, requires_grad=True)
    before = r.detach().clone()
    for target, msg in ((r, "^a leaf Variable that requires grad is being used in an in-place operation"),
                        (r[1:3], "^a view of a leaf Variable that requires grad is being used in an in-place")):
        with pytest.raises(RuntimeError, match=msg):
            f(x[:target.shape[0]], target)
        assert torch.equal(r.detach(), before), "the residual must not be written before the error"
        with pytest.raises(RuntimeError, match=msg):  # (eager's own words)
            target.add_(x[:target.shape[0]])
    with torch.no_grad():
        y, s = f(x, r)
    assert s is r
    torch.testing.assert_close(r.detach(), before + x.detach())


VIEW_CASES = {"reshape": (lambda h: (h * 1).view(-1, h.shape[-1]), True),
              "slice": (lambda h: (h * 1)[:, 1], True),
              "no-grad-buffer": (lambda h: h.detach().clone().view(-1, h.shape[-1]), False),
              "transposed": (lambda h: (h * 1).transpose(0, 1), True)}


@pytest.mark.parametrize("case", list(VIEW_CASES))
@pytest.mark.parametrize("call", ADD_CALLS, ids=_ids)
def test_inplace_view_residual_matches_eager(dev_backend, call, case):
    """inplace=True with grad where the residual is a view (the residual stream reshaped, a
    slice, a preallocated buffer's view): as eager's residual.add_(x) + norm, in values (y,
    the written buffer) and gradients (x, the residual's producer h, weight, bias), eager in
    float64."""
    device, _ = dev_backend
    make, h_grad = VIEW_CASES[case]
    g = torch.Generator().manual_seed(0)
    h0, w0, b0 = torch.randn(3, 4, 16, generator=g), torch.rand(16, generator=g) + 0.5, torch.randn(16, generator=g)
    out = {}
    for impl, dtype in (("ours", torch.float32), ("eager", torch.float64)):
        h = h0.to(device, dtype, copy=True).requires_grad_(h_grad)
        w, b = w0.to(device, dtype), b0.to(device, dtype)
        if impl == "ours":
            f, w, b = _add_call(call, w, b)
        else:
            w = w.requires_grad_()
            b = None if call in ("add_rms_norm_act", AddRMSNorm) else b.requires_grad_()
            f = lambda x, r, w=w, b=b: _eager_add(x, r, w, b)  # noqa: E731
        r = make(h)
        assert r._is_view()
        x = torch.randn(r.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype).requires_grad_()
        y, s = f(x, r)
        assert s is r
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)
        (y * dy).sum().backward()
        out[impl] = [y.detach(), r._base.detach(), x.grad, h.grad, w.grad, None if b is None else b.grad]
    for i, (a, e) in enumerate(zip(out["ours"], out["eager"])):
        if e is None:
            assert a is None, i
        else:
            torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5, msg=f"{case}: output {i}")


@pytest.mark.parametrize("inplace", [False, True])
def test_residual_none_is_a_type_error(inplace):
    """residual=None: a TypeError naming it (eager x + None raises one too), not a norm of x
    alone returned with s = None."""
    x = torch.randn(2, 8, requires_grad=True)
    for f in (lambda: fusedops.add_layer_norm_act(x, None, inplace=inplace),
              lambda: fusedops.add_rms_norm_act(x, None, eps=1e-5, inplace=inplace),
              lambda: AddLayerNorm(8, inplace=inplace)(x, None),
              lambda: AddRMSNorm(8, inplace=inplace)(x, None)):
        with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
            f()
        with torch.no_grad(), pytest.raises(TypeError, match="residual"):
            f()


@pytest.mark.parametrize("cls", [AddLayerNorm, AddRMSNorm])
def test_jit_trace_inplace_records_torch_ops(cls):
    """torch.jit.trace of the in-place modules records torch ops only (residual.add_(x) and
    the norm), so a consumer without fusedops can run the graph; same values and the same
    in-place write as the module, with and without grad."""
    torch.manual_seed(0)
    m = _randomize(cls(16, eps=1e-5, activation="gelu", inplace=True))
    x, r = torch.randn(3, 16), torch.randn(3, 16)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            traced = torch.jit.trace(m, (x, r.clone()), check_trace=False)
        assert "fusedops::" not in str(traced.graph), str(traced.graph)
        assert "aten::add_" in str(traced.graph)
        x2, r2 = torch.randn(5, 16), torch.randn(5, 16)
        rt, rm = r2.clone(), r2.clone()
        with torch.set_grad_enabled(grad):
            yt, st = traced(x2, rt)
            ym, sm = m(x2, rm)
        assert st.data_ptr() == rt.data_ptr() and sm is rm
        torch.testing.assert_close(rt, x2 + r2)
        torch.testing.assert_close(rm, x2 + r2)
        torch.testing.assert_close(yt, ym, rtol=1e-5, atol=1e-5)
        if grad:
            gt = torch.autograd.grad(yt.sum(), list(m.parameters()))
            gm = torch.autograd.grad(ym.sum(), list(m.parameters()))
            for a, b in zip(gt, gm):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("cls", [AddLayerNorm, AddRMSNorm])
def test_add_modules_only_s_used(cls, inplace):
    """Only s used: the parameters get no gradient (None, as eager: AdamW then skips them),
    x and the residual's producer get ds."""
    m = _randomize(cls(16, inplace=inplace))
    x = torch.randn(3, 16, requires_grad=True)
    rl = torch.randn(3, 16, requires_grad=True)
    ds = torch.randn(3, 16)
    _, s = m(x, rl * 1)
    s.backward(ds)
    assert all(p.grad is None for p in m.parameters())
    assert torch.equal(x.grad, ds) and torch.equal(rl.grad, ds)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_rms_modules_default_eps_match_eager(dtype):
    """RMSNormAct / AddRMSNorm with eps=None (nn.RMSNorm's default) and a converted
    nn.RMSNorm: F.rms_norm's eps (fp32's for fp16/bf16), eager in the same dtype and fp64."""
    torch.manual_seed(0)
    rms = _randomize(nn.RMSNorm(32)).to(dtype)
    x = (torch.randn(6, 32) * 1e-3).to(dtype)
    r = (torch.randn(6, 32) * 1e-3).to(dtype)
    eps = torch.finfo(torch.float32).eps
    ref = nn.functional.rms_norm(x.double(), (32,), rms.weight.double(), eps)
    ref_add = nn.functional.rms_norm((x + r).double(), (32,), rms.weight.double(), eps)
    eager = rms(x)
    tol = {"rtol": 2e-2, "atol": 2e-3} if dtype != torch.float32 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(eager.double(), ref, **tol)
    fused = RMSNormAct.from_modules(rms)
    assert fused.eps is None
    add = AddRMSNorm(32, dtype=dtype)
    add.load_state_dict(rms.state_dict())
    model = nn.Sequential(rms)
    fusedops.convert(model)
    assert isinstance(model[0], RMSNormAct)
    for got, want in ((fused(x), ref), (model(x), ref), (add(x, r)[0], ref_add)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("cls", [AddLayerNorm, AddRMSNorm])
def test_residual_of_another_dtype_adds_as_eager(dev_backend, cls, inplace):
    """The pre-norm pattern under autocast: a bf16 branch output x into an fp32 residual
    stream. s = x + residual in the promoted dtype (fp32), y and every gradient as eager's
    (the fp32 math of s and y within rounding; x's gradient in bf16). In place, the sum
    goes into the fp32 residual; an fp32 x into a bf16 residual is refused by name."""
    device, _ = dev_backend
    torch.manual_seed(0)
    m = _randomize(cls(48, activation="silu").to(device))
    x0 = torch.randn(5, 48, device=device, dtype=torch.bfloat16)
    r0 = torch.randn(5, 48, device=device)
    g = torch.randn(5, 48, device=device)
    xe, he = x0.clone().requires_grad_(), r0.clone().requires_grad_()
    se = xe + he
    ye = (torch.nn.functional.layer_norm(se, (48,), m.weight, m.bias) if cls is AddLayerNorm
          else torch.nn.functional.rms_norm(se, (48,), m.weight, m.eps))
    ye = torch.nn.functional.silu(ye)
    ((ye * g).sum() + se.sum()).backward()
    x, h = x0.clone().requires_grad_(), r0.clone().requires_grad_()
    r = h * 1.0  # a non-leaf residual (in place needs one under grad)
    m.inplace = inplace
    y, s = m(x, r)
    assert y.dtype == ye.dtype == torch.float32 and s.dtype == torch.float32
    if inplace:
        assert s is r
    torch.testing.assert_close(s, se, rtol=0, atol=0)
    torch.testing.assert_close(y, ye, rtol=1e-5, atol=1e-5)
    ((y * g).sum() + s.sum()).backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), xe.grad.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(h.grad, he.grad, rtol=1e-5, atol=1e-5)
    fn = fusedops.add_layer_norm_act if cls is AddLayerNorm else fusedops.add_rms_norm_act
    with pytest.raises(TypeError, match="residual"):
        fn(x0.float(), r0.bfloat16(), inplace=True)


def test_inplace_inference_residual_outside_inference_mode_is_refused():
    """As eager's residual.add_(x): an inference-tensor residual is written in place only
    inside inference_mode; outside it the call is refused before anything is written."""
    with torch.inference_mode():
        r = torch.randn(3, 16)
    before = r.clone()
    for fn in (fusedops.add_layer_norm_act, fusedops.add_rms_norm_act):
        with torch.no_grad(), pytest.raises(RuntimeError, match="residual: Inplace update to inference tensor"):
            fn(torch.randn(3, 16), r, inplace=True)
        assert torch.equal(r, before)
    with torch.inference_mode():
        y, s = fusedops.add_rms_norm_act(torch.ones(3, 16), r, inplace=True)
    assert s is r
    torch.testing.assert_close(r, before + 1)


@pytest.mark.parametrize("fn", [fusedops.add_layer_norm_act, fusedops.add_rms_norm_act])
def test_inplace_residual_bumps_its_version_once(fn):
    """The in-place form bumps the residual's version counter by one, as eager's
    residual.add_(x) does, with and without grad."""
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            x = torch.randn(4, 16, requires_grad=grad)
            r = torch.randn(4, 16, requires_grad=grad) * 1.0
            before = r._version
            _, s = fn(x, r, inplace=True)
            assert s is r and r._version == before + 1, (grad, r._version - before)


# ---- autocast_output: y in the autocast dtype for a Linear that casts it anyway ------------------

class _PreNorm(nn.Module):
    def __init__(self, d, cls=LayerNormAct, **kw):
        super().__init__()
        self.norm = cls(d, **kw)
        self.proj = nn.Linear(d, 2 * d)

    def forward(self, x):
        return self.proj(self.norm(x))


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls", [LayerNormAct, RMSNormAct])
def test_autocast_output_feeds_a_linear_as_eager(dev_backend, cls, x_dtype):
    """Under autocast the norm's y comes out in the autocast dtype, as eager's fp32 (or x-dtype)
    y rounded to it (one bf16 step at most apart: the fp32 values may differ in their last
    bits), and the Linear after it gives eager's output and gradients; outside autocast the
    module is the plain one. Eager normalises x in fp32 (as CUDA autocast runs LayerNorm; CPU
    autocast would run a bf16 x in bf16 and sum the parameters' gradients in bf16)."""
    device, _ = dev_backend
    d = 64
    torch.manual_seed(0)
    ours = _PreNorm(d, cls, activation="identity", autocast_output=True).to(device)
    _randomize(ours.norm)
    eager = _PreNorm(d, nn.LayerNorm if cls is LayerNormAct else nn.RMSNorm).to(device)
    if cls is RMSNormAct:
        eager.norm.eps = None
    eager.load_state_dict(ours.state_dict())
    assert "autocast_output=True" in repr(ours.norm)
    x = torch.randn(3, 17, d, device=device).to(x_dtype)
    dy = torch.randn(3, 17, 2 * d, device=device)
    grads = []
    for m in (ours, eager):
        xl = x.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16):
            y_norm = m.norm(xl if m is ours else xl.float())
            out = m.proj(y_norm)
        out.backward(dy.to(out.dtype))
        grads.append((y_norm.detach(), out.detach(), xl.grad, *[p.grad for p in m.parameters()]))
    (yo, oo, *go), (ye, oe, *ge) = grads
    assert yo.dtype == torch.bfloat16 and oo.dtype == oe.dtype
    torch.testing.assert_close(yo.float(), ye.bfloat16().float(), rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(oo.float(), oe.float(), rtol=2e-2, atol=2e-2)
    for a, b in zip(go, ge):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    with torch.no_grad():  # outside autocast: x's dtype, eager's fp32 values rounded once (eager CUDA
        y_plain = ours.norm(x)  # LayerNorm refuses a bf16 x with fp32 parameters)
        assert y_plain.dtype == x_dtype
        tol = 1e-5 if x_dtype == torch.float32 else 2 ** -7
        torch.testing.assert_close(y_plain, eager.norm(x.float()).to(x_dtype), rtol=tol, atol=1e-5)


@pytest.mark.parametrize("cls", [AddLayerNorm, AddRMSNorm])
def test_autocast_output_add_modules(dev_backend, cls):
    """The add modules: y in the autocast dtype, s in the sum's dtype (an fp32 stream)."""
    device, _ = dev_backend
    m = _randomize(cls(32, autocast_output=True, device=device))
    x = torch.randn(4, 32, device=device, dtype=torch.bfloat16)
    r = torch.randn(4, 32, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y, s = m(x, r)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    plain = cls(32, device=device)
    plain.load_state_dict(m.state_dict())
    y_ref, s_ref = plain(x, r)
    torch.testing.assert_close(s, s_ref)
    torch.testing.assert_close(y.float(), y_ref.bfloat16().float(), rtol=2 ** -7, atol=1e-6)


def test_autocast_output_compile_fullgraph(dev_backend):
    device, _ = dev_backend
    torch._dynamo.reset()
    m = _PreNorm(32, LayerNormAct, activation="gelu_tanh", autocast_output=True).to(device)
    _randomize(m.norm)
    x = torch.randn(4, 7, 32, device=device)

    def run(x):
        with torch.autocast(device, dtype=torch.bfloat16):
            return m.norm(x), m(x)

    (y0, o0), (y1, o1) = run(x), torch.compile(run, fullgraph=True)(x)
    assert y0.dtype == y1.dtype == torch.bfloat16
    torch.testing.assert_close(y1.float(), y0.float(), rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(o1.float(), o0.float(), rtol=2e-2, atol=2e-2)
