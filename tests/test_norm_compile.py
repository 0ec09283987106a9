"""FUSEDOPS_NORM_COMPILE: under torch.compile the norm ops are either called as ops or
written in torch ops so that the compiler can fuse them with their neighbours (default
"auto": torch ops up to a hidden size, the op above)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedops
from fusedops.nn import AddLayerNorm, AddRMSNorm, LayerNormAct, RMSNormAct
from fusedops.ops import norm as norm_mod

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


@pytest.fixture
def policy(monkeypatch):
    def set_(value):
        monkeypatch.setattr(norm_mod, "COMPILE_POLICY", value)
    torch._dynamo.reset()
    yield set_
    torch._dynamo.reset()


def _capture(graphs):
    """A torch.compile backend that records the call targets of the dynamo graph (and of
    its subgraphs, e.g. an autograd.Function's) and runs it."""
    def backend(gm, example_inputs):
        graphs.append({str(n.target) for g in gm.modules() if isinstance(g, torch.fx.GraphModule)
                       for n in g.graph.nodes if n.op == "call_function"})
        return gm.forward
    return backend


def _has_fusedops(targets) -> bool:
    return any("fusedops." in t for t in targets)


def _randomized(m):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + 1.0)
    return m


def test_parse_compile_policy():
    assert norm_mod._parse_compile_policy(None) == "auto"
    assert norm_mod._parse_compile_policy("") == "auto"
    assert norm_mod._parse_compile_policy("op") == "op"
    assert norm_mod._parse_compile_policy("inductor") == "inductor"
    with pytest.raises(ValueError, match="FUSEDOPS_NORM_COMPILE"):
        norm_mod._parse_compile_policy("triton")


MODULES = {
    "LayerNormAct": lambda d: LayerNormAct(40, activation="gelu_tanh", device=d),
    "LayerNormAct-identity": lambda d: LayerNormAct(40, device=d),
    "RMSNormAct": lambda d: RMSNormAct(40, activation="silu", device=d),
    "AddLayerNorm": lambda d: AddLayerNorm(40, activation="relu", device=d),
    "AddRMSNorm": lambda d: AddRMSNorm(40, activation="gelu", device=d),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("value", ["op", "inductor", "auto"])
def test_policy_graph_and_values(policy, device, name, value):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    policy(value)
    m = _randomized(MODULES[name](device))
    is_add = name.startswith("Add")
    x = torch.randn(3, 5, 40, device=device)
    r = torch.randn(3, 5, 40, device=device)

    def loss(x, r):
        if is_add:
            y, s = m(x, r)
            return (y * y).sum() + (s * s).sum(), y
        y = m(x)
        return (y * y).sum(), y

    graphs = []
    results = []
    for fn in (loss, torch.compile(loss, backend=_capture(graphs), fullgraph=True)):
        xs, rs = x.clone().requires_grad_(), r.clone().requires_grad_()
        m.zero_grad()
        val, y = fn(xs, rs)
        val.backward()
        results.append([y.detach(), xs.grad] + ([rs.grad] if is_add else []) + [p.grad.clone() for p in m.parameters()])
    assert len(graphs) == 1
    # "op": the fusedops op is in the graph; "inductor" and "auto" (N = 40): the norm is
    # written in torch ops
    assert _has_fusedops(graphs[0]) == (value == "op"), sorted(graphs[0])
    for a, b in zip(*results):
        assert b.dtype == a.dtype
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_inductor_policy_matches_torch_layer_norm_under_inductor(policy):
    """With "inductor", a converted LayerNorm compiles to what nn.LayerNorm compiles to."""
    policy("inductor")
    torch.manual_seed(0)
    ln = _randomized(torch.nn.LayerNorm(24))
    fused = LayerNormAct.from_modules(ln, None)
    x = torch.randn(6, 24)
    outs = []
    for m in (ln, fused):
        xs = x.clone().requires_grad_()
        m.zero_grad()
        y = torch.compile(lambda t, m=m: m(t) * 2.0, fullgraph=True)(xs)
        y.square().sum().backward()
        outs.append([y.detach(), xs.grad, m.weight.grad.clone(), m.bias.grad.clone()])
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_inductor_policy_mixed_dtype_params_keep_op_dtype(policy):
    """bf16 x with fp32 weight/bias (which F.layer_norm does not take everywhere): the
    reference's fp32 math, y in x's dtype as the op gives."""
    policy("inductor")
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    w = torch.randn(32) * 0.3 + 1
    b = torch.randn(32) * 0.3
    graphs = []
    f = torch.compile(lambda x: fusedops.layer_norm_act(x, w, b, activation="silu"), backend=_capture(graphs),
                      fullgraph=True)
    got = f(x)
    want = torch.ops.fusedops.layer_norm_act(x, w, b, 1e-5, "silu")[0]
    assert not _has_fusedops(graphs[0])
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


def test_inductor_policy_checks_arguments(policy):
    policy("inductor")
    x = torch.randn(4, 32)
    f = torch.compile(lambda x: fusedops.layer_norm_act(x, torch.ones(31)), backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="weight"):
        f(x)


def test_inductor_policy_keeps_inplace_op(policy):
    """The in-place residual form is not rewritten into torch ops: the fusedops op runs (with
    grad, as here through the weight, the functional op and a copy into the residual)."""
    policy("inductor")
    m = AddLayerNorm(16, inplace=True)
    x = torch.randn(2, 16)
    r = torch.randn(2, 16)
    graphs = []
    y, s = torch.compile(lambda x, r: m(x, r), backend=_capture(graphs), fullgraph=True)(x, r.clone())
    assert _has_fusedops(graphs[0])
    torch.testing.assert_close(y, F.layer_norm(x + r, (16,), m.weight, m.bias))


@pytest.mark.parametrize("n", [norm_mod.COMPILE_TORCH_UPTO, norm_mod.COMPILE_TORCH_UPTO + 8])
def test_auto_policy_by_hidden_size(policy, n):
    """"auto": torch ops up to COMPILE_TORCH_UPTO, the fusedops op above; same values."""
    policy("auto")
    torch.manual_seed(0)
    m = _randomized(AddRMSNorm(n, activation="silu"))
    x, r = torch.randn(2, n), torch.randn(2, n)
    graphs = []
    y, s = torch.compile(lambda x, r: m(x, r), backend=_capture(graphs), fullgraph=True)(x, r)
    assert _has_fusedops(graphs[0]) == (n > norm_mod.COMPILE_TORCH_UPTO), sorted(graphs[0])
    want = F.silu(F.rms_norm(x + r, (n,), m.weight, torch.finfo(torch.float32).eps))
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use", ["y", "y+s"])
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("module", [False, True], ids=["function", "module"])
def test_compile_inplace_residual_gradients(policy, module, rms, use):
    """inplace=True under torch.compile with a residual that requires grad through the graph
    (the residual stream from before the compiled region): the gradients reaching x, the
    residual's producer and the weight are eager's (autograd.Function.mark_dirty loses the
    residual's under compile: the compiled call takes the functional op + copy_). Against
    fusedops eager and eager torch (r.add_(x); norm) in float64; the written residual too."""
    policy("auto")
    torch.manual_seed(0)
    n = 24
    x0, r0 = torch.randn(3, n), torch.randn(3, n)
    w0, b0 = torch.rand(n) + 0.5, torch.randn(n)
    m = (AddRMSNorm if rms else AddLayerNorm)(n, eps=1e-5, activation="silu", inplace=True)
    with torch.no_grad():
        m.weight.copy_(w0)
        if not rms:
            m.bias.copy_(b0)

    def run(kind, dtype):
        x = x0.to(dtype, copy=True).requires_grad_()
        rl = r0.to(dtype, copy=True).requires_grad_()
        w = m.weight if kind != "torch" else w0.to(dtype, copy=True).requires_grad_()
        b = None if rms else (m.bias if kind != "torch" else b0.to(dtype, copy=True).requires_grad_())
        m.zero_grad()

        def f(x, r):
            if kind == "torch":
                r.add_(x)
                z = F.rms_norm(r, (n,), w, 1e-5) if rms else F.layer_norm(r, (n,), w, b, 1e-5)
                y, s = F.silu(z), r
            elif module:
                y, s = m(x, r)
            elif rms:
                y, s = fusedops.add_rms_norm_act(x, r, w, 1e-5, "silu", inplace=True)
            else:
                y, s = fusedops.add_layer_norm_act(x, r, w, b, 1e-5, "silu", inplace=True)
            return (y * y).sum() + ((s * s * s).sum() if use == "y+s" else 0)

        fn = torch.compile(f, backend="aot_eager", fullgraph=True) if kind == "compiled" else f
        r = rl * 1  # requires grad through the graph (not a leaf)
        fn(x, r).backward()
        return [r.detach(), x.grad, rl.grad, w.grad] + ([] if rms else [b.grad])

    want = run("torch", torch.float64)
    eager = run("eager", torch.float32)
    got = run("compiled", torch.float32)
    for i, (g, e, t) in enumerate(zip(got, eager, want)):
        assert g is not None, f"output {i}: no gradient"
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, msg=lambda m, i=i: f"output {i} vs fusedops eager: {m}")
        torch.testing.assert_close(g.double(), t, rtol=1e-4, atol=1e-4, msg=lambda m, i=i: f"output {i} vs torch fp64: {m}")


@pytest.mark.parametrize("value", ["op", "inductor"])
def test_compile_rms_default_eps(policy, value):
    """eps=None under torch.compile (torch ops or the op): F.rms_norm's eps, fp32's for bf16
    input; tiny activations make it visible."""
    policy(value)
    torch.manual_seed(0)
    x = (torch.randn(4, 32) * 1e-3).bfloat16()
    r = (torch.randn(4, 32) * 1e-3).bfloat16()
    w = torch.rand(32).bfloat16() + 0.5
    graphs = []
    f = torch.compile(lambda x, r: (fusedops.rms_norm_act(x, w, None, "silu"),
                                    fusedops.add_rms_norm_act(x, r, w, None, "silu")[0]),
                      backend=_capture(graphs), fullgraph=True)
    y, ya = f(x, r)
    assert _has_fusedops(graphs[0]) == (value == "op")
    eps = torch.finfo(torch.float32).eps
    for got, s in ((y, x), (ya, x + r)):
        want = F.silu(F.rms_norm(s.double(), (32,), w.double(), eps))
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-3)
