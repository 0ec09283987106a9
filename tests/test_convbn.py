"""fusedops ConvBNAct2d / bn ops / fold_conv_bn / converter rule against eager
Conv2d + BatchNorm2d (+ activation), with an fp64 eager reference and the 2x rule."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import fusedops
from fusedops import reference
from fusedops.nn import ConvBNAct2d
from fusedops.nn_convbn import FoldedConvAct2d
from fusedops.ops import batchnorm as bnops
from helpers import assert_close_rule, poison_, require

_PAIRS = [("cpu", "cpp"), ("cpu", "triton"), ("cpu", "reference"), ("cuda", "cuda"), ("cuda", "triton")]


def _params():
    return [pytest.param(p, id=f"{p[0]}-{p[1]}", marks=[pytest.mark.gpu] if p[0] == "cuda" else [])
            for p in _PAIRS]


@pytest.fixture(params=_params())
def dev_backend(request):
    device, backend = request.param
    require(device, backend)
    with fusedops.use_backend(backend):
        yield device, backend


@pytest.fixture
def triton_dev(request):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    require(device, "triton")
    with fusedops.use_backend("triton"):
        yield device


ACT_MODULES = {"identity": None, "relu": nn.ReLU(), "relu6": nn.ReLU6(), "silu": nn.SiLU(), "gelu": nn.GELU(),
               "leaky_relu": nn.LeakyReLU(0.2)}


def _pair(cin, cout, k, act="relu", device="cpu", conv_kw=None, bn_kw=None):
    conv = nn.Conv2d(cin, cout, k, bias=False, **(conv_kw or {})).to(device)
    bn = nn.BatchNorm2d(cout, **(bn_kw or {})).to(device)
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    act_mod = copy.deepcopy(ACT_MODULES[act])
    eager = nn.Sequential(conv, bn, *([act_mod] if act_mod is not None else []))
    return eager


def _fused_from(eager, memory="recompute"):
    e = copy.deepcopy(eager)
    act = e[2] if len(e) > 2 else None
    return ConvBNAct2d.from_modules(e[0], e[1], act, memory=memory)


def _stats_checked(y):
    """bn_stats(y) after checking mean and var against eager's (fp32) and float64's."""
    mean, invstd, var = bnops.bn_stats(y, 1e-5)
    v64, m64 = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    ve, me = torch.var_mean(y.float(), dim=(0, 2, 3), correction=0)
    assert_close_rule(mean, me, m64, atol=1e-6 * m64.abs().max().item(), name="mean")
    assert_close_rule(var, ve, v64, atol=1e-6 * v64.abs().max().item(), name="var")
    return mean, invstd, var


def _tol(dtype, ref):
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype] * max(1.0, ref.abs().max().item())


def _train_compare(eager, fused, x, steps=3, dtype=torch.float32, channels_last=False, autocast=None):
    """Run `steps` fwd+bwd of eager, fused and an fp64 copy of eager; compare outputs,
    grads of input / conv weight / gamma / beta, and running statistics."""
    ref = copy.deepcopy(eager).double()
    if dtype != torch.float32 and autocast is None:
        eager, fused = eager.to(dtype), fused.to(dtype)
    if channels_last:
        eager, fused = eager.to(memory_format=torch.channels_last), fused.to(memory_format=torch.channels_last)
    for step in range(steps):
        xs = torch.randn_like(x, dtype=torch.float32) * 2 + 0.5
        xin = xs.to(dtype if autocast is None else torch.float32)
        if channels_last:
            xin = xin.contiguous(memory_format=torch.channels_last)
        xe, xf, xr = (xin.clone().requires_grad_(), xin.clone().requires_grad_(),
                      xin.double().requires_grad_())
        ctx = (lambda: torch.autocast(x.device.type, dtype=autocast)) if autocast else None
        if ctx:
            with ctx():
                ye, yf = eager(xe), fused(xf)
        else:
            ye, yf = eager(xe), fused(xf)
        yr = ref(xr)
        assert yf.dtype == ye.dtype, f"output dtype {yf.dtype} != eager {ye.dtype}"
        lowp = ye.dtype if ye.dtype != torch.float32 else torch.float32
        assert_close_rule(yf.float(), ye.float(), yr, atol=_tol(lowp, yr), name=f"output step {step}")
        g = torch.randn_like(yr)
        ye.backward(g.to(ye.dtype))
        yf.backward(g.to(yf.dtype))
        yr.backward(g)
        assert_close_rule(xf.grad.float(), xe.grad.float(), xr.grad, atol=_tol(lowp, xr.grad), name="dx")
        assert_close_rule(fused.conv.weight.grad.float(), eager[0].weight.grad.float(), ref[0].weight.grad,
                          atol=_tol(lowp, ref[0].weight.grad), name="dW")
        if ref[1].weight is not None:
            assert_close_rule(fused.bn.weight.grad.float(), eager[1].weight.grad.float(), ref[1].weight.grad,
                              atol=_tol(lowp, ref[1].weight.grad), name="dgamma")
            assert_close_rule(fused.bn.bias.grad.float(), eager[1].bias.grad.float(), ref[1].bias.grad,
                              atol=_tol(lowp, ref[1].bias.grad), name="dbeta")
        for m in (eager, fused, ref):
            m.zero_grad(set_to_none=True)
    if ref[1].running_mean is not None:
        for name in ("running_mean", "running_var"):
            r = getattr(ref[1], name)
            assert_close_rule(getattr(fused.bn, name).double(), getattr(eager[1], name).double(), r,
                              atol=_tol(torch.float32 if autocast else dtype, r), name=name)
        assert int(fused.bn.num_batches_tracked) == int(eager[1].num_batches_tracked) == steps
    return eager, fused, ref


# ---- ops ---------------------------------------------------------------------------------

def _apply64(y, mean, invstd, w, b, act, slope):
    """bn_act_apply in float64 (reference.bn_act_apply computes in fp32 whatever its input:
    it is the eager twin, not the fp64 reference)."""
    sh = (1, -1, 1, 1)
    xhat = (y.double() - mean.double().reshape(sh)) * invstd.double().reshape(sh)
    return reference.activation(xhat * w.double().reshape(sh) + b.double().reshape(sh), act, slope)


def _backward64(dz, y, mean, invstd, w, b, act, slope):
    """bn_act_backward in float64: (dy, dweight, dbias)."""
    sh = (1, -1, 1, 1)
    r = invstd.double().reshape(sh)
    xhat = (y.double() - mean.double().reshape(sh)) * r
    g = dz.double() * reference.activation_grad(xhat * w.double().reshape(sh) + b.double().reshape(sh), act, slope)
    m = y.numel() // y.shape[1]
    sg, sgx = g.sum(dim=(0, 2, 3)), (g * xhat).sum(dim=(0, 2, 3))
    dy = w.double().reshape(sh) * r * (g - sg.reshape(sh) / m - xhat * sgx.reshape(sh) / m)
    return dy, sgx, sg


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_bn_ops_against_reference(dev_backend, dtype, layout):
    device, _ = dev_backend
    y = (torch.randn(3, 5, 7, 9, device=device) * 3 + 4).to(dtype)
    if layout == "channels_last":
        y = y.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        y = y.transpose(2, 3)  # H and W not mergeable: copied once
    mean, invstd, var = bnops.bn_stats(y, 1e-5)
    v64, m64 = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    ve, me = torch.var_mean(y.float(), dim=(0, 2, 3), correction=0)
    assert_close_rule(mean, me, m64, atol=1e-6 * m64.abs().max().item(), name="mean")
    assert_close_rule(var, ve, v64, atol=1e-6 * v64.abs().max().item(), name="var")
    assert_close_rule(invstd, torch.rsqrt(ve + 1e-5), torch.rsqrt(v64 + 1e-5), atol=1e-6, name="invstd")
    w, b = torch.rand(5, device=device) + 0.5, torch.randn(5, device=device)
    for act in ["relu", "silu", "gelu", "leaky_relu"]:
        z = bnops.bn_act_apply(y, mean, invstd, w, b, act, 0.1)
        assert z.dtype == y.dtype and z.shape == y.shape
        if layout != "strided":
            assert z.stride() == y.stride()
        _check_apply_backward(z, torch.randn_like(y), y, mean, invstd, w, b, act, dtype)


def _check_apply_backward(z, dz, y, mean, invstd, w, b, act, dtype):
    """z = bn_act_apply(y, ...) and bn_act_backward(dz, y, ...) against the reference and
    float64 with the 2×-eager rule."""
    z64 = _apply64(y, mean, invstd, w, b, act, 0.1)
    ze = reference.bn_act_apply(y, mean, invstd, w, b, act, 0.1)
    assert_close_rule(z.double(), ze.double(), z64, atol=torch.finfo(dtype).eps * 8 * z64.abs().max().item(),
                      name=f"apply {act}")
    dy, dw, db = bnops.bn_act_backward(dz, y, mean, invstd, w, b, act, 0.1)
    assert dy.shape == y.shape and dy.dtype == y.dtype
    dy64, dw64, db64 = _backward64(dz, y, mean, invstd, w, b, act, 0.1)
    dye, dwe, dbe = reference.bn_act_backward(dz, y, mean, invstd, w, b, act, 0.1)
    assert_close_rule(dy.double(), dye.double(), dy64, atol=torch.finfo(dtype).eps * 8 * dy64.abs().max().item(),
                      name=f"dy {act}")
    assert_close_rule(dw.double(), dwe.double(), dw64, atol=1e-4, name=f"dweight {act}")
    assert_close_rule(db.double(), dbe.double(), db64, atol=1e-4, name=f"dbias {act}")


def _tensor_in(shape, layout, dtype, device, offset=0):
    """Fresh random y [N, C, H, W] in `layout`, its data `offset` elements into its storage
    (offset 1 misaligns it for 16-byte accesses)."""
    n, c, h, w = shape
    base = torch.randn(n * c * h * w + offset, device=device)[offset:]
    if layout == "channels_last":
        t = base.view(n, h, w, c).permute(0, 3, 1, 2)
    else:
        t = base.view(n, c, h, w)
    return (t * 2 + 1).to(dtype) if dtype != torch.float32 else t.mul_(2).add_(1)


# Shapes for the native kernels' tilings: C a multiple of 8 (16-byte vectors along C in
# channels_last; lanes 8, 4 of 4 used, 32 with two channel groups for 512 bf16), H·W a
# multiple of 8 (vectors along H·W in NCHW), odd sizes (scalar path), a misaligned base
# (scalar path), and one large enough for many splits and several rows per thread.
_VEC_CASES = [((4, 64, 8, 8), 0), ((3, 24, 5, 5), 0), ((2, 512, 4, 4), 0), ((3, 16, 8, 16), 0),
              ((2, 16, 8, 8), 1), ((3, 7, 5, 3), 0), ((32, 64, 28, 28), 0)]


@pytest.mark.parametrize("case", _VEC_CASES, ids=lambda c: "x".join(map(str, c[0])) + f"+{c[1]}")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_bn_ops_kernel_tilings(dev_backend, dtype, layout, case):
    device, backend = dev_backend
    shape, offset = case
    if device == "cpu" and (backend == "triton" or shape[0] * shape[2] * shape[3] * shape[1] > 100_000):
        # the interpreter sums a 256-row tile sequentially in fp32 (not the GPU's tree):
        # var is then off by ~1.6e-6 relative at times, over this test's 1e-6; the tilings
        # tested here are the native kernels' (the GPU run covers Triton's)
        pytest.skip("Triton under the interpreter and large tensors: GPU only")
    y = _tensor_in(shape, layout, dtype, device, offset)
    c = shape[1]
    mean, invstd, var = _stats_checked(y)
    w, b = torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)
    for act in reference.CONV_BN_ACTIVATIONS:
        z = bnops.bn_act_apply(y, mean, invstd, w, b, act, 0.1)
        assert z.stride() == y.stride()
        z64 = _apply64(y, mean, invstd, w, b, act, 0.1)
        ze = reference.bn_act_apply(y, mean, invstd, w, b, act, 0.1)
        assert_close_rule(z.double(), ze.double(), z64, atol=torch.finfo(dtype).eps * 8 * z64.abs().max().item(),
                          name=f"apply {act}")
        dz = _tensor_in(shape, layout, dtype, device, offset)
        dy64, dw64, db64 = _backward64(dz, y, mean, invstd, w, b, act, 0.1)
        dye, dwe, dbe = reference.bn_act_backward(dz, y, mean, invstd, w, b, act, 0.1)
        # dy written over a scratch copy of y, as the recompute backward does
        scratch = y.clone()
        dy, dw, db = bnops.backward_direct(dz, scratch, mean, invstd, w, b, act, 0.1, dy_into_y=True)
        assert_close_rule(dy.double(), dye.double(), dy64, atol=torch.finfo(dtype).eps * 8 * dy64.abs().max().item(),
                          name=f"dy {act}")
        m = y.numel() // c
        assert_close_rule(dw.double(), dwe.double(), dw64, atol=1e-6 * m, name=f"dweight {act}")
        assert_close_rule(db.double(), dbe.double(), db64, atol=1e-6 * m, name=f"dbias {act}")
    # the in-place epilogue of the folded conv: z written over y
    yy = y.clone()
    zero, one = torch.zeros(c, device=device), torch.ones(c, device=device)
    if bnops.bias_act_(yy, b, "relu", 0.01):
        torch.testing.assert_close(yy, reference.bn_act_apply(y, zero, one, None, b, "relu"), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bn_stats_large_mean_is_stable_every_backend(dev_backend, layout):
    device, backend = dev_backend
    y = torch.randn(4, 16, 8, 8, device=device) * 0.01 + 1000.0
    if layout == "channels_last":
        y = y.contiguous(memory_format=torch.channels_last)
    _, _, var = bnops.bn_stats(y)
    v64 = y.double().var(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(var.double(), v64, rtol=2e-2), (var, v64)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bn_stats_many_splits_with_drift_and_large_mean(dev_backend, layout):
    """The combine of many per-split (mean, M2) partials: a large common mean (|mean| / std
    ~1100), split means that differ (a drift along the batch, so along the rows the splits
    take) and a small spread within each sample. The mean as accurate as eager's; the var
    within 10 fp32 eps · |mean| / std of itself: the error of a stable (shifted or Welford)
    algorithm; summing y and y² in fp32 is off by ~50% on these data."""
    device, backend = dev_backend
    if device == "cpu" and backend == "triton":
        pytest.skip("Triton under the interpreter and large tensors: GPU only")
    n, c, h, w = 64, 24, 28, 28
    drift = torch.arange(n, device=device, dtype=torch.float32).view(n, 1, 1, 1) * 0.05
    y = 1000.0 + drift + torch.randn(n, c, h, w, device=device) * 0.01 + torch.rand(1, c, 1, 1, device=device)
    if layout == "channels_last":
        y = y.contiguous(memory_format=torch.channels_last)
    mean, _, var = bnops.bn_stats(y, 1e-5)
    v64, m64 = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    _, me = torch.var_mean(y, dim=(0, 2, 3), correction=0)
    assert_close_rule(mean, me, m64, atol=1e-6 * m64.abs().max().item(), name="mean")
    cond = (m64.abs() / v64.sqrt()).max().item()
    rel = ((var.double() - v64).abs() / v64).max().item()
    assert rel <= 10 * torch.finfo(torch.float32).eps * cond, f"var: relative error {rel:.2e} (|mean| / std {cond:.0f})"


def test_bn_ops_no_affine_and_dz_other_layout(dev_backend):
    device, _ = dev_backend
    y = torch.randn(2, 6, 5, 5, device=device).contiguous(memory_format=torch.channels_last)
    mean, invstd, _ = bnops.bn_stats(y)
    z = bnops.bn_act_apply(y, mean, invstd, None, None, "identity")
    assert_close_rule(z, reference.bn_act_apply(y, mean, invstd), reference.bn_act_apply(
        y.double(), mean.double(), invstd.double()), atol=1e-6)
    dz = torch.randn(2, 6, 5, 5, device=device)  # NCHW while y is channels_last
    dy, dw, db = bnops.bn_act_backward(dz, y, mean, invstd, None, None, "relu")
    dyr, dwr, dbr = reference.bn_act_backward(dz, y, mean, invstd, None, None, "relu")
    torch.testing.assert_close(dy, dyr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw, dwr, atol=1e-4, rtol=1e-5)


def test_bn_stats_large_mean_is_stable(triton_dev):
    # |μ| ≫ σ: a sum/sum-of-squares method would lose the variance to cancellation
    y = torch.randn(4, 3, 16, 16, device=triton_dev) * 0.01 + 1000.0
    _, _, var = bnops.bn_stats(y)
    v64 = y.double().var(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(var.double(), v64, rtol=2e-2), (var, v64)


def test_ops_opcheck(dev_backend):
    triton_dev, _ = dev_backend
    y = torch.randn(2, 4, 5, 3, device=triton_dev)
    mean, invstd, _ = bnops.bn_stats(y)
    w, b = torch.rand(4, device=triton_dev), torch.randn(4, device=triton_dev)
    torch.library.opcheck(bnops.bn_stats_op, (y, 1e-5))
    torch.library.opcheck(bnops.bn_act_apply_op, (y, mean, invstd, w, b, "silu", 0.01))
    torch.library.opcheck(bnops.bn_act_apply_op, (y.contiguous(memory_format=torch.channels_last), mean, invstd,
                                                  None, None, "relu", 0.01))
    torch.library.opcheck(bnops.bn_act_backward_op, (torch.randn_like(y), y, mean, invstd, w, b, "gelu", 0.01))


def test_train_ops_opcheck(dev_backend):
    """The training-step ops torch.compile traces (fusedops/ops/convbn.py)."""
    from fusedops.ops import convbn

    device, _ = dev_backend
    x = torch.randn(2, 3, 6, 5, device=device)
    w = torch.randn(4, 3, 3, 3, device=device)
    g, b = torch.rand(4, device=device) + 0.5, torch.randn(4, device=device)
    geom = ([1, 1], [1, 1], [1, 1], 1)
    for xx, keep in ((x, False), (x.contiguous(memory_format=torch.channels_last), True)):
        torch.library.opcheck(convbn.train_op, (xx, w, g, b, None, *geom, 1e-5, "silu", 0.01, keep))
        z, mean, invstd, var, y = convbn.train_op(xx, w, g, b, None, *geom, 1e-5, "silu", 0.01, keep)
        torch.library.opcheck(convbn.train_backward_op, (torch.randn_like(z), xx, w, y if keep else None, mean,
                                                         invstd, g, b, *geom, "silu", 0.01, [True, True, True, True]))
    torch.library.opcheck(convbn.train_op, (x, w, None, None, torch.randn(4, device=device), [2, 1], [0, 1], [1, 1],
                                            1, 1e-5, "relu", 0.01, False))


def test_native_train_ops_opcheck(dev_backend):
    """The C++ ops a compiled graph calls where the native kernels serve (their fake and
    autograd formula are registered in fusedops/ops/convbn.py); conv_bn_act_bwd is only
    called inside that formula (not differentiable itself)."""
    from fusedops.ops import convbn

    device, backend = dev_backend
    if backend not in ("cpp", "cuda") or convbn.native_train_op is None:
        pytest.skip("the native ops run with the native backends")
    x = torch.randn(2, 3, 6, 5, device=device)
    w = torch.randn(4, 3, 3, 3, device=device)
    g, b = torch.rand(4, device=device) + 0.5, torch.randn(4, device=device)
    act = bnops.ACT_CODES["silu"]
    for xx, keep, geom in ((x, False, ([1, 1], [1, 1], [1, 1], 1)),
                           (x.contiguous(memory_format=torch.channels_last), True, ([2, 1], [0, 1], [1, 1], 1))):
        torch.library.opcheck(convbn.native_train_op, (xx, w, *geom, 1e-5, g, b, act, 0.01, keep))
        z, mean, invstd, var, y = convbn.native_train_op(xx, w, *geom, 1e-5, g, b, act, 0.01, keep)
        assert y.numel() == (z.numel() if keep else 0)
        for mask in (1, 2, 3, 7):
            torch.library.opcheck(bnops.op_train_bwd(), (torch.randn_like(z), xx, w, y if keep else None, *geom, mean,
                                                         invstd, g, b, act, 0.01, mask),
                                  test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_ops_empty(dev_backend):
    device, _ = dev_backend
    y = torch.randn(0, 3, 4, 4, device=device)
    mean, invstd, var = bnops.bn_stats(y)
    assert mean.shape == (3,) and torch.isnan(mean).all() and torch.isnan(var).all()  # as torch.var_mean
    z = bnops.bn_act_apply(y, torch.zeros(3, device=device), torch.ones(3, device=device))
    assert z.shape == y.shape
    dy, dw, db = bnops.bn_act_backward(y, y, torch.zeros(3, device=device), torch.ones(3, device=device))
    assert dy.shape == y.shape and torch.equal(dw, torch.zeros(3, device=device))


def test_ops_bad_input(triton_dev):
    y = torch.randn(2, 4, 5, 3, device=triton_dev)
    mean, invstd, _ = bnops.bn_stats(y)
    with pytest.raises(ValueError, match="y must be 4-D"):
        bnops.bn_stats(y[0])
    with pytest.raises(TypeError, match="y must be a floating-point"):
        bnops.bn_stats(y.to(torch.int32))
    with pytest.raises(ValueError, match="weight must have shape"):
        bnops.bn_act_apply(y, mean, invstd, torch.ones(3, device=triton_dev))
    with pytest.raises(ValueError, match="act must be one of"):
        bnops.bn_act_apply(y, mean, invstd, None, None, "tanh")
    with pytest.raises(ValueError, match="dz has shape"):
        bnops.bn_act_backward(y[:1], y, mean, invstd)
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        bnops.bn_stats([1.0])


# ---- module: training ----------------------------------------------------------------------

@pytest.mark.parametrize("act", list(ACT_MODULES))
def test_train_activations(dev_backend, act):
    device, _ = dev_backend
    eager = _pair(4, 6, 3, act, device, conv_kw=dict(padding=1))
    _train_compare(eager, _fused_from(eager), torch.randn(2, 4, 7, 7, device=device))


@pytest.mark.parametrize("memory", ["recompute", "fast"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_train_layouts_memory_modes(dev_backend, channels_last, memory):
    device, _ = dev_backend
    eager = _pair(3, 5, 3, "relu", device, conv_kw=dict(stride=2, padding=1))
    _train_compare(eager, _fused_from(eager, memory), torch.randn(2, 3, 9, 9, device=device),
                   channels_last=channels_last)


@pytest.mark.parametrize("conv_kw", [
    dict(groups=4, padding=1),                 # grouped
    dict(groups=8, padding=1),                 # depthwise (cout == groups == cin)
    dict(dilation=2, padding=2),
    dict(stride=2, padding="valid"),
    dict(padding="same"),
    dict(padding="same", dilation=(1, 2)),
], ids=["groups", "depthwise", "dilation", "stride2-valid", "same", "same-dilated"])
def test_train_conv_geometry(dev_backend, conv_kw):
    device, _ = dev_backend
    k = (2, 3) if conv_kw.get("padding") == "same" and "dilation" not in conv_kw else 3
    eager = _pair(8, 8, k, "silu", device, conv_kw=conv_kw)
    _train_compare(eager, _fused_from(eager), torch.randn(2, 8, 7, 7, device=device))


@pytest.mark.parametrize("bn_kw", [dict(momentum=None), dict(track_running_stats=False), dict(affine=False),
                                   dict(eps=1e-3, momentum=0.3)], ids=["cumulative", "no-running", "no-affine", "eps"])
def test_train_bn_options(dev_backend, bn_kw):
    device, _ = dev_backend
    eager = _pair(3, 4, 3, "relu", device, bn_kw=bn_kw)
    _, fused, ref = _train_compare(eager, _fused_from(eager), torch.randn(2, 3, 6, 6, device=device), steps=4)
    if bn_kw.get("track_running_stats") is False:  # batch statistics in eval mode too
        fused.eval()
        eager.eval()
        x = torch.randn(2, 3, 6, 6, device=device)
        torch.testing.assert_close(fused(x), eager(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 3, 7, 7), (5, 3, 2, 1), (3, 3, 1, 1)], ids=["batch1", "odd", "1x1"])
def test_train_odd_sizes(dev_backend, shape):
    device, _ = dev_backend
    eager = _pair(3, 3, 1, "leaky_relu", device)
    _train_compare(eager, _fused_from(eager), torch.randn(*shape, device=device))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_train_low_precision(dev_backend, dtype):
    # silu: a smooth activation. With relu, the fp64 reference (unrounded conv) and a
    # low-precision conv output may put an element on different sides of the kink, which
    # flips its gradient in eager or in ours at random (no kernel error involved).
    device, _ = dev_backend
    eager = _pair(4, 6, 3, "silu", device, conv_kw=dict(padding=1))
    _train_compare(eager, _fused_from(eager), torch.randn(2, 4, 6, 6, device=device), dtype=dtype)


def test_train_autocast_bf16(dev_backend):
    device, _ = dev_backend
    eager = _pair(4, 6, 3, "silu", device, conv_kw=dict(padding=1))
    _, fused, _ = _train_compare(eager, _fused_from(eager), torch.randn(2, 4, 6, 6, device=device),
                                 autocast=torch.bfloat16, channels_last=True)
    assert fused.conv.weight.dtype == torch.float32 and fused.bn.running_mean.dtype == torch.float32


def test_conv_bias_is_folded(dev_backend):
    device, _ = dev_backend
    conv = nn.Conv2d(3, 4, 3, bias=True).to(device)
    bn = nn.BatchNorm2d(4).to(device)
    eager = nn.Sequential(conv, bn, nn.ReLU())
    fused = _fused_from(eager)
    x = torch.randn(2, 3, 6, 6, device=device)
    ye, yf = eager(x), fused(x)
    torch.testing.assert_close(yf, ye, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.bn.running_mean, bn.running_mean, atol=1e-6, rtol=1e-5)
    yf.sum().backward()
    assert torch.count_nonzero(fused.conv.bias.grad) == 0
    fused.eval(), eager.eval()
    torch.testing.assert_close(fused(x), eager(x), atol=1e-5, rtol=1e-5)


def test_one_value_per_channel_errors(dev_backend):
    device, _ = dev_backend
    eager = _pair(3, 4, 3, "relu", device)
    fused = _fused_from(eager)
    x = torch.randn(1, 3, 3, 3, device=device)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        eager(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        fused(x)
    assert int(fused.bn.num_batches_tracked) == 0
    fused.eval()
    fused(x)  # eval uses running stats: fine


def test_module_bad_input():
    m = ConvBNAct2d(3, 4, 3)
    with pytest.raises(ValueError, match="input has 2 channels"):
        m(torch.randn(2, 2, 5, 5))
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="padding_mode"):
        ConvBNAct2d(3, 4, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="activation must be one of"):
        ConvBNAct2d(3, 4, 3, activation="tanh")
    with pytest.raises(ValueError, match="memory must be one of"):
        ConvBNAct2d(3, 4, 3, memory="low")
    with pytest.raises(ValueError, match="unsupported activation"):
        ConvBNAct2d.from_modules(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Tanh())
    with pytest.raises(ValueError, match="num_features"):
        ConvBNAct2d.from_modules(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(5))


def test_constructor_matches_eager_init():
    torch.manual_seed(0)
    m = ConvBNAct2d(3, 4, 3, stride=2, padding=1, activation="relu6", momentum=None)
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
    assert torch.equal(m.conv.weight, conv.weight)
    assert m.bn.momentum is None and m.activation == "relu6"


def _saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps for backward while fn's graph is alive."""
    storages = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_recompute_saves_less_than_eager(dev_backend, act):
    device, _ = dev_backend
    blocks = [_pair(8, 8, 3, act, device, conv_kw=dict(padding=1)) for _ in range(3)]
    eager = nn.Sequential(*blocks)
    fused = nn.Sequential(*[_fused_from(b) for b in blocks])
    fast = nn.Sequential(*[_fused_from(b, "fast") for b in blocks])
    x = torch.randn(4, 8, 12, 12, device=device, requires_grad=True)
    eager_bytes, _ = _saved_bytes(lambda: eager(x))
    fused_bytes, out = _saved_bytes(lambda: fused(x))
    fast_bytes, _ = _saved_bytes(lambda: fast(x))
    act_bytes = x.numel() * 4
    # eager: per block the conv input, the BN input (and, for silu, the BN output); ours:
    # the conv input only (which is the previous block's output) + per-channel stats
    assert fused_bytes <= 3 * act_bytes + 4096, (fused_bytes, act_bytes)
    assert fused_bytes <= 0.55 * eager_bytes, (fused_bytes, eager_bytes)
    assert fused_bytes < fast_bytes <= eager_bytes
    out.sum().backward()  # the recompute path runs


def test_auto_mode_recomputes_only_the_1x1_convs_that_do_not_narrow_4x(dev_backend, monkeypatch):
    """memory="auto" (the default) saves what "recompute" saves for a 1x1 conv that widens
    the channels or narrows them less than 4×, and what "fast" saves for a larger kernel and
    for a 1x1 conv that narrows them 4× or more; values and gradients equal eager's either
    way (no TF32 on CUDA)."""
    device, _ = dev_backend
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    shapes = [(8, 16, 1, {}), (16, 16, 3, dict(padding=1)), (16, 6, 1, {}), (6, 24, 1, {}), (24, 6, 1, {})]
    blocks = [_pair(ci, co, k, "relu", device, conv_kw=kw) for ci, co, k, kw in shapes]
    assert ConvBNAct2d(3, 4, 3).memory == "auto"
    assert ConvBNAct2d.from_modules(copy.deepcopy(blocks[0][0]), copy.deepcopy(blocks[0][1])).memory == "auto"
    per_layer = ["recompute", "fast", "recompute", "recompute", "fast"]
    auto = nn.Sequential(*[_fused_from(b, "auto") for b in blocks])
    mixed = nn.Sequential(*[_fused_from(b, m) for b, m in zip(blocks, per_layer)])
    recompute = nn.Sequential(*[_fused_from(b) for b in blocks])
    fast = nn.Sequential(*[_fused_from(b, "fast") for b in blocks])
    eager = nn.Sequential(*blocks)
    x = torch.randn(4, 8, 10, 10, device=device)
    sizes = {}
    for name, model in (("auto", auto), ("mixed", mixed), ("recompute", recompute), ("fast", fast)):
        xi = x.clone().requires_grad_()
        sizes[name], out = _saved_bytes(lambda: model(xi))
        ref_x = x.clone().requires_grad_()
        ref = eager(ref_x)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        g = torch.randn_like(ref)
        out.backward(g)
        ref.backward(g)
        torch.testing.assert_close(xi.grad, ref_x.grad, atol=1e-4, rtol=1e-4)
    assert sizes["auto"] == sizes["mixed"], sizes
    assert sizes["recompute"] < sizes["auto"] < sizes["fast"], sizes


@pytest.fixture
def early_release(monkeypatch):
    """The recompute backward's early release of x (CUDA by default) on every device."""
    from fusedops import nn_convbn
    monkeypatch.setattr(nn_convbn, "EARLY_RELEASE_DEVICES", ("cuda", "cpu"))


@pytest.mark.parametrize("conv_kw", [dict(padding=1), dict(stride=2, padding=1), dict(stride=2, padding=0),
                                     dict(dilation=2, padding=2, groups=2), dict(padding="same", stride=1)])
def test_train_early_release_geometry(dev_backend, early_release, conv_kw):
    device, _ = dev_backend
    eager = _pair(4, 6, 3, "relu", device, conv_kw=conv_kw)
    _train_compare(eager, _fused_from(eager), torch.randn(3, 4, 9, 8, device=device), channels_last=True)


@pytest.mark.parametrize("memory,early", [("recompute", False), ("recompute", True), ("fast", False)])
def test_train_native_step_one_call_per_direction(dev_backend, monkeypatch, memory, early):
    """With the native BN kernels the training step runs one native call per direction
    (conv_bn_act_fwd / _bwd); the Triton backend keeps the op-by-op path. Both match eager."""
    from fusedops import nn_convbn
    device, backend = dev_backend
    if early:
        monkeypatch.setattr(nn_convbn, "EARLY_RELEASE_DEVICES", ("cuda", "cpu"))
    elif device == "cuda":
        monkeypatch.setattr(nn_convbn, "EARLY_RELEASE_DEVICES", ())
    from torch.profiler import ProfilerActivity, profile
    eager = _pair(4, 6, 3, "silu", device, conv_kw=dict(stride=2, padding=1))
    with profile(activities=[ProfilerActivity.CPU]) as prof:  # the ops as the dispatcher saw them
        _train_compare(eager, _fused_from(eager, memory), torch.randn(3, 4, 9, 8, device=device), steps=2,
                       channels_last=True)
    ops = ("fusedops_C::conv_bn_act_fwd", "fusedops_C::conv_bn_act_bwd")
    calls = [e.name for e in prof.events() if e.name in ops]
    native = backend in ("cpp", "cuda")
    assert calls == (list(ops) * 2 if native else []), calls


def test_train_follows_module_changes(dev_backend):
    """The training step's arguments are derived once per module (host time) and rederived
    when what they came from changes: BN momentum / eps, a new γ, the activation's slope,
    the memory mode, a dtype change in place (module.double()). Each step still matches
    eager's; a trained module pickles (its caches are not part of it)."""
    import io
    device, backend = dev_backend
    eager = _pair(4, 6, 3, "leaky_relu", device, conv_kw=dict(padding=1))
    fused = _fused_from(eager)
    x = torch.randn(3, 4, 7, 5, device=device)
    changes = [lambda m, bn: None,
               lambda m, bn: (setattr(bn, "momentum", 0.3), setattr(bn, "eps", 1e-2)),
               lambda m, bn: setattr(bn, "weight", nn.Parameter(torch.rand_like(bn.weight) + 0.5)),
               lambda m, bn: setattr(m, "negative_slope", 0.2) if isinstance(m, ConvBNAct2d) else None,
               lambda m, bn: setattr(m, "memory", "fast") if isinstance(m, ConvBNAct2d) else None]
    for change in changes:
        torch.manual_seed(len(fused.__dict__))
        change(fused, fused.bn)
        change(eager, eager[1])
        if isinstance(eager[2], nn.LeakyReLU):
            eager[2].negative_slope = fused.negative_slope
        if fused.bn.weight is not eager[1].weight and fused.bn.weight.shape == eager[1].weight.shape:
            eager[1].weight = nn.Parameter(fused.bn.weight.detach().clone())
        for m in (eager[1], fused.bn):
            m.num_batches_tracked.zero_()
        eager, fused, _ = _train_compare(eager, fused, x, steps=2)
        plan = fused.__dict__.get("_native_plan_cache")
        assert (plan is not None and plan.fwd is not None) == (backend in ("cpp", "cuda")), "native plan not used"
    eager[1].num_batches_tracked.zero_()
    fused.bn.num_batches_tracked.zero_()
    # .to(dtype) keeps the parameter objects (their .data changes)
    eager, fused, _ = _train_compare(eager, fused, x, steps=1, dtype=torch.bfloat16)
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    xi = x.to(torch.bfloat16)
    torch.testing.assert_close(loaded(xi), fused(xi), rtol=0, atol=0)


def test_input_modified_in_place_after_forward_raises(dev_backend, early_release):
    """The recompute mode holds the conv input itself (released early in backward): an
    in-place change of it must fail in backward as autograd's saved-tensor check does."""
    device, _ = dev_backend
    fused = _fused_from(_pair(4, 4, 3, "relu", device, conv_kw=dict(padding=1)))
    x = torch.randn(2, 4, 6, 6, device=device)
    h = x.clone().requires_grad_()
    inner = h * 1.0
    out = fused(inner)
    with torch.no_grad():
        inner.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("memory", ["recompute", "fast"])
@pytest.mark.parametrize("act", ["relu", "silu", "gelu", "identity"])
def test_second_order_gradients(dev_backend, early_release, memory, act, monkeypatch):
    """create_graph=True (a gradient penalty, e.g. R1 in GANs): the first-order gradients
    equal those without it, and differentiating them again gives eager's second-order
    gradients of x, the conv weight, gamma and beta (float64 on CPU; fp32 convs without
    TF32 on CUDA)."""
    device, _ = dev_backend
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    dt = torch.float64 if device == "cpu" else torch.float32
    # (float64 BN statistics go through fp32 math in the first-order path)
    tol = dict(rtol=1e-5, atol=1e-5) if dt == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    eager = _pair(4, 5, 3, act, device, conv_kw=dict(padding=1, stride=2)).to(dt)
    fused = _fused_from(copy.deepcopy(eager), memory)
    x = torch.randn(3, 4, 7, 6, device=device, dtype=dt)
    gout = torch.randn(3, 5, 4, 3, device=device, dtype=dt)
    results = []
    for model in (eager, fused):
        xx = x.clone().requires_grad_()
        (g1,) = torch.autograd.grad(model(xx), xx, gout)
        (gx,) = torch.autograd.grad(model(xx), xx, gout, create_graph=True)
        assert gx.requires_grad
        torch.testing.assert_close(gx, g1, **tol)
        params = [p for p in model.parameters()]
        for p in params:
            p.grad = None
        (gx.square().sum() + model(xx).sum()).backward()  # penalty + loss
        results.append([xx.grad] + [p.grad for p in params])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, **tol)


def _compare_step(ref, model, x, ref_weight, weight):
    """One fwd+bwd of two models: same output, input and conv-weight gradients."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ref(x1), model(x2)
    torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-5)
    y1.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight.grad, ref_weight.grad, atol=1e-5, rtol=1e-5)


def _step_ops(gm) -> list:
    """The training-step ops in a traced graph: their qualified names."""
    return [str(n.target).rsplit(".", 1)[0] for n in gm.graph.nodes
            if n.op == "call_function" and "conv_bn_act_train" in str(n.target)]


@pytest.mark.parametrize("conv_bias", [False, True], ids=["no-conv-bias", "conv-bias"])
@pytest.mark.parametrize("memory", ["recompute", "fast", "auto"])
def test_compiled_graph_keeps_the_memory_mode(memory, conv_bias):
    """Under torch.compile the step is one op whose conv output stays inside it: with the
    partitioner inductor uses (min-cut), the compiled forward saves x and the per-channel
    statistics in memory="recompute" and the conv output only in "fast"; values and
    gradients (a conv bias's too: zeros) equal eager. With the native kernels (the CPU
    default) and no conv bias the op is the C++ one, fusedops_C::conv_bn_act_train; a conv
    bias takes fusedops::conv_bn_act_train."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    eager = _pair(4, 6, 3, "relu", conv_kw=dict(padding=1))
    if conv_bias:
        eager[0].bias = nn.Parameter(torch.randn(6))
    fused = _fused_from(eager, memory)
    twin = copy.deepcopy(fused)
    x = torch.randn(2, 4, 8, 8)
    outputs, ops = [], []

    def fw(gm, _example):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        outputs.extend(tuple(a.meta["val"].shape) for a in out.args[0] if a is not None and "val" in a.meta)
        ops.extend(_step_ops(gm))
        return torch._functorch.aot_autograd.make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=fw, bw_compiler=lambda gm, _: torch._functorch.aot_autograd.make_boxed_func(
        gm.forward), partition_fn=min_cut_rematerialization_partition)
    _compare_step(fused, torch.compile(twin, fullgraph=True, backend=backend), x, fused.conv.weight, twin.conv.weight)
    for a, b in ((twin.bn.weight, fused.bn.weight), (twin.bn.bias, fused.bn.bias)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)
    if conv_bias:
        assert torch.equal(twin.conv.bias.grad, torch.zeros(6)) and torch.equal(fused.conv.bias.grad, torch.zeros(6))
    torch.testing.assert_close(twin.bn.running_mean, fused.bn.running_mean)
    torch.testing.assert_close(twin.bn.running_var, fused.bn.running_var)
    assert ops == ["fusedops.conv_bn_act_train" if conv_bias or not bnops.has_native_train_ops()
                   else "fusedops_C.conv_bn_act_train"]
    # forward-graph outputs of the conv output's shape: z itself, plus y where it is kept
    # (a 3x3 conv: "auto" keeps it)
    assert outputs.count((2, 6, 8, 8)) == (1 if memory == "recompute" else 2), outputs
    assert (2, 4, 8, 8) in outputs  # x, for the recompute / for dW


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_compile_fullgraph(dev_backend, affine, dtype):
    """A compiled step equals the eager module's, for several steps (running statistics,
    eval), through the op the backend decides at trace time: the C++ op where the native
    kernels serve (cpp, cuda), fusedops::conv_bn_act_train otherwise (triton, reference).
    A bf16 module's γ / β reach the C++ op as fp32 (their gradients come back as bf16)."""
    from torch._dynamo.backends.common import aot_autograd

    device, backend = dev_backend
    if dtype == torch.bfloat16 and backend == "reference":
        pytest.skip("the reference backend is the fp32 / fp64 spec")
    torch._dynamo.reset()  # (the parametrizations would reach dynamo's recompile limit)
    eager = _pair(4, 6, 3, "relu", device, conv_kw=dict(padding=1), bn_kw=dict(momentum=None, affine=affine))
    fused = _fused_from(eager).to(dtype)
    twin = copy.deepcopy(fused)
    ops = []

    def fw(gm, _example):  # the forward graph after AOTAutograd, as aot_eager runs it
        ops.extend(_step_ops(gm))
        return torch._functorch.aot_autograd.make_boxed_func(gm.forward)

    compiled = torch.compile(twin, fullgraph=True, backend=aot_autograd(
        fw_compiler=fw, bw_compiler=lambda gm, _: torch._functorch.aot_autograd.make_boxed_func(gm.forward)))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0, rtol=0)
    for _ in range(2):
        x = torch.randn(2, 4, 6, 6, device=device, dtype=dtype)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = fused(x1), compiled(x2)
        torch.testing.assert_close(y2, y1, **tol)
        g = torch.randn_like(y1)
        y1.backward(g), y2.backward(g)
        torch.testing.assert_close(x2.grad, x1.grad, **tol)
        for (name, a), b in zip(fused.named_parameters(), twin.parameters()):
            assert b.grad is not None and b.grad.dtype == a.dtype, name
            torch.testing.assert_close(b.grad, a.grad, **tol)
    torch.testing.assert_close(twin.bn.running_mean, fused.bn.running_mean, **tol)
    torch.testing.assert_close(twin.bn.running_var, fused.bn.running_var, **tol)
    assert int(twin.bn.num_batches_tracked) == 2
    native = backend in ("cpp", "cuda") and bnops.has_native_train_ops()
    assert ops == ["fusedops_C.conv_bn_act_train" if native else "fusedops.conv_bn_act_train"]
    fused.eval(), twin.eval()
    with torch.no_grad():
        x = torch.randn(2, 4, 6, 6, device=device, dtype=dtype)
        torch.testing.assert_close(compiled(x), fused(x), **tol)


# ---- eval and folding ------------------------------------------------------------------------

def _trained_pair(device, act="relu", conv_kw=None):
    eager = _pair(4, 6, 3, act, device, conv_kw=conv_kw or dict(padding=1))
    with torch.no_grad():
        for _ in range(3):
            eager(torch.randn(4, 4, 7, 7, device=device) * 2 + 1)
    return eager


def test_frozen_bn_in_a_training_model(dev_backend):
    """The BN module's own mode decides, as in eager: a model in training whose BN layers
    were put in eval (the usual way to freeze them while fine-tuning) uses and keeps the
    running statistics."""
    device, _ = dev_backend
    eager = _pair(3, 4, 3, "relu", device, conv_kw=dict(padding=1))
    eager(torch.randn(4, 3, 6, 6, device=device))  # running statistics away from their init
    fused = _fused_from(eager)
    for m in (eager, fused):
        m.train()
        for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):
            bn.eval()
    assert fused.training and not fused.bn.training
    _compare_step(eager, fused, torch.randn(2, 3, 6, 6, device=device), eager[0].weight, fused.conv.weight)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(fused.bn, name), getattr(eager[1], name)), name
    # frozen before wrapping: from_modules keeps the BN's (and the conv's) own modes
    eager.zero_grad(set_to_none=True)
    frozen = copy.deepcopy(eager)
    wrapped = ConvBNAct2d.from_modules(frozen[0], frozen[1], frozen[2])
    assert wrapped.training and not wrapped.bn.training and wrapped.conv.training
    _compare_step(eager, wrapped, torch.randn(2, 3, 6, 6, device=device), eager[0].weight, wrapped.conv.weight)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(wrapped.bn, name), getattr(eager[1], name)), name


def test_sync_batchnorm_swapped_in_runs_the_modules():
    """nn.SyncBatchNorm.convert_sync_batchnorm on a converted model swaps the fused module's
    inner bn for a SyncBatchNorm (statistics across processes): training then runs the
    modules themselves, with a warning, not the local-statistics kernels."""
    eager = _pair(3, 4, 3, "silu", conv_kw=dict(padding="same"))
    fused = nn.SyncBatchNorm.convert_sync_batchnorm(_fused_from(eager))
    assert type(fused.bn) is nn.SyncBatchNorm
    ran = []
    fused.bn.register_forward_hook(lambda *_: ran.append(1))
    fusedops._backend._warned.clear()  # the warning is issued once per reason
    with pytest.warns(fusedops.FallbackWarning, match="SyncBatchNorm"):
        _compare_step(eager, fused, torch.randn(2, 3, 6, 6), eager[0].weight, fused.conv.weight)
    assert ran == [1]
    torch.testing.assert_close(fused.bn.running_mean, eager[1].running_mean)


@pytest.mark.parametrize("act", ["identity", "relu", "gelu", "leaky_relu"])
def test_eval_and_fold(dev_backend, act):
    device, _ = dev_backend
    eager = _trained_pair(device, act)
    fused = _fused_from(eager).eval()
    eager.eval()
    ref = copy.deepcopy(eager).double()
    x = torch.randn(2, 4, 7, 7, device=device)
    with torch.no_grad():
        ye, yr = eager(x), ref(x.double())
        y = fused(x)
        assert_close_rule(y, ye, yr, atol=1e-5, name="eval")
        folded = fusedops.fold_conv_bn(copy.deepcopy(eager))
        assert isinstance(folded[0], FoldedConvAct2d) and set(folded[0].state_dict()) == {"weight", "bias"}
        assert_close_rule(folded(x), ye, yr, atol=1e-5, name="fold_conv_bn(Sequential)")
        folded2 = fusedops.fold_conv_bn(nn.Sequential(copy.deepcopy(fused)))
        assert isinstance(folded2[0], FoldedConvAct2d)
        assert_close_rule(folded2(x), ye, yr, atol=1e-5, name="fold_conv_bn(ConvBNAct2d)")
    # eval with gradients (frozen BN fine-tuning): differentiable composite
    xg = x.clone().requires_grad_()
    fused(xg).sum().backward()
    xe = x.clone().requires_grad_()
    eager(xe).sum().backward()
    torch.testing.assert_close(xg.grad, xe.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.bn.weight.grad, eager[1].weight.grad, atol=1e-4, rtol=1e-4)


def test_eval_fold_cache_follows_changes(dev_backend):
    """The eval path folds once and reuses W', b' until a parameter or buffer changes."""
    device, _ = dev_backend
    fused = _fused_from(_trained_pair(device, "relu")).eval()
    eager = nn.Sequential(fused.conv, fused.bn, nn.ReLU())  # the same parameters and buffers
    x = torch.randn(2, 4, 7, 7, device=device)

    def check(name):
        with torch.no_grad():
            ref = copy.deepcopy(eager).double()
            assert_close_rule(fused(x), eager(x), ref(x.double()), atol=1e-5, name=name)

    check("first")
    check("cached")
    with torch.no_grad():
        eager[1].running_var.mul_(3.0)  # shared buffers: an in-place change must refold
    check("running_var changed in place")
    with torch.no_grad():
        eager[0].weight.add_(0.5)
        eager[1].bias.sub_(0.25)
    check("parameters changed in place")
    fused.train()
    fused(torch.randn(4, 4, 7, 7, device=device))  # a training step moves the running stats
    fused.eval()
    check("after a training step")
    fused.load_state_dict(_fused_from(_trained_pair(device, "relu")).state_dict())
    check("after load_state_dict")
    eager[0].weight.data.mul_(1.5)  # a write that leaves the version counter alone (EMA code does
    eager[1].bias.data.add_(0.5)    # this): seen after the next eval(), as the docstring says
    fused.eval()
    check("after .data writes and eval()")
    with torch.no_grad():  # a dtype conversion swaps every tensor's storage: a new fold
        got = fused.double()(x.double())
        want = eager.double()(x.double())
        fused.float(), eager.float()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)  # (the fold itself runs in fp32)
    check("back to fp32")
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):  # cached bf16 casts
        for _ in range(2):
            got, want = fused(x), eager(x)
            assert got.dtype == want.dtype == torch.bfloat16
            torch.testing.assert_close(got.float(), want.float(), atol=0.1, rtol=0.05)
    folded = fusedops.fold_conv_bn(copy.deepcopy(fused))
    with torch.no_grad():
        before = folded(x)
        folded.weight.mul_(2.0)
        after = folded(x)
    assert not torch.allclose(before, after)


def test_fold_low_precision_in_fp32(dev_backend):
    device, _ = dev_backend
    eager = _trained_pair(device, "relu").eval()
    ref = copy.deepcopy(eager).double()
    low = copy.deepcopy(eager).to(torch.bfloat16)
    x = torch.randn(2, 4, 7, 7, device=device)
    with torch.no_grad():
        folded = fusedops.fold_conv_bn(copy.deepcopy(low))
        assert folded[0].weight.dtype == torch.bfloat16 and folded[0].bias.dtype == torch.bfloat16
        yf, ye, yr = folded(x.bfloat16()), low(x.bfloat16()), ref(x.double())
        assert_close_rule(yf.double(), ye.double(), yr, atol=0.05, name="folded bf16")


# ---- state_dict --------------------------------------------------------------------------

def test_state_dict_keys_and_round_trip():
    eager = _trained_pair("cpu")
    fused = _fused_from(eager)
    keys = set(fused.state_dict())
    assert keys == {"conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                    "bn.num_batches_tracked"}
    fresh = ConvBNAct2d(4, 6, 3, padding=1)
    fresh.load_state_dict(fused.state_dict())
    for k, v in fused.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


# ---- converter on a small ResNet-style network ------------------------------------------------

class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) \
            if stride != 1 or cin != cout else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent: fx cannot trace
            return x
        return self.bn(self.conv(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU())
        self.layer = nn.Sequential(Block(8, 8, 1), Block(8, 12, 2))
        self.odd = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1, padding_mode="reflect", bias=False),
                                 nn.BatchNorm2d(12))
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = self.odd(self.layer(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def _net_grads(net):
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def test_converter_resnet_style(dev_backend):
    device, _ = dev_backend
    torch.manual_seed(0)
    eager = Net().to(device)
    ckpt = copy.deepcopy(eager.state_dict())
    conv = copy.deepcopy(eager)
    report = fusedops.convert(conv)
    replaced = {r.path for r in report.replaced}
    assert {"stem.0", "layer.0.conv1", "layer.0.conv2", "layer.1.conv1", "layer.1.conv2",
            "layer.1.shortcut.0"} <= replaced, str(report)
    assert any(s.path == "odd.0" and "padding_mode" in s.reason for s in report.skipped), str(report)
    assert isinstance(conv.layer[0].conv1, ConvBNAct2d) and conv.layer[0].conv1.activation == "relu"
    assert conv.layer[0].conv2.activation == "identity"  # relu shared / after the add: not fused
    # eager keys survive conversion, both ways
    assert set(conv.state_dict()) == set(ckpt)
    conv.load_state_dict(ckpt)
    eager_again = Net().to(device)
    eager_again.load_state_dict(conv.state_dict())
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(conv.parameters(), lr=0.1)
    for step in range(3):
        x = torch.randn(2, 3, 10, 10, device=device)
        ye, yc = eager(x), conv(x)
        torch.testing.assert_close(yc, ye, atol=2e-4, rtol=2e-4)
        ye.square().sum().backward()
        yc.square().sum().backward()
        ge, gc = _net_grads(eager), _net_grads(conv)
        assert len(ge) == len(gc) == len(list(conv.parameters()))
        # parameters are the same objects: compare by the eager names via state_dict order
        ep = dict(eager.named_parameters())
        cp = {k: v for k, v in conv.state_dict(keep_vars=True).items() if isinstance(v, nn.Parameter)}
        for name, p in ep.items():
            torch.testing.assert_close(cp[name].grad, p.grad, atol=5e-4, rtol=5e-4, msg=lambda m: f"{name}: {m}")
        opt_e.step(), opt_c.step()
        opt_e.zero_grad(), opt_c.zero_grad()
    csd = conv.state_dict()
    for name, v in eager.state_dict().items():
        torch.testing.assert_close(csd[name].float(), v.float(), atol=5e-4, rtol=5e-4, msg=lambda m: f"{name}: {m}")
    buf = io.BytesIO()
    torch.save(conv.state_dict(), buf)
    buf.seek(0)
    back = Net().to(device)
    back.load_state_dict(torch.load(buf))
    conv.eval(), back.eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 10, 10, device=device)
        torch.testing.assert_close(conv(x), back(x), atol=1e-4, rtol=1e-4)


def test_converter_untraceable_is_skipped():
    model = nn.Sequential(Untraceable())
    report = fusedops.convert(model)
    assert not report.replaced
    assert any("cannot trace" in s.reason for s in report.skipped), str(report)


def test_converter_shared_conv_output_skipped():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1, bias=False)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    report = fusedops.convert(Fork())
    assert not report.replaced and report.skipped[0].reason == "conv output has other users"


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_outputs_poisoned_then_fully_written(dev_backend, layout, monkeypatch):
    device, backend = dev_backend
    if backend == "reference":
        pytest.skip("the reference allocates its own outputs")
    monkeypatch.setattr(bnops, "_out_like", lambda t: poison_(torch.empty_like(t)))
    monkeypatch.setattr(bnops, "_out_channels", lambda c, like: poison_(
        torch.empty(c, device=like.device, dtype=torch.float32)))
    y = torch.randn(3, 5, 4, 7, device=device)
    if layout == "channels_last":
        y = y.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        y = y[:, :, :, ::2]  # H and W not mergeable
    w, b = torch.rand(5, device=device) + 0.5, torch.randn(5, device=device)
    mean, invstd, var = bnops.bn_stats(y)
    for got, want in zip((mean, invstd, var), reference.bn_stats(y, 1e-5)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    z = bnops.bn_act_apply(y, mean, invstd, w, b, "silu")
    torch.testing.assert_close(z, reference.bn_act_apply(y, mean, invstd, w, b, "silu"), atol=1e-5, rtol=1e-5)
    dz = torch.randn_like(y)
    got = bnops.bn_act_backward(dz, y, mean, invstd, w, b, "silu")
    want = reference.bn_act_backward(dz, y, mean, invstd, w, b, "silu")
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_compile_fullgraph_inductor_gpu(backend):
    require("cuda", backend)
    with fusedops.use_backend(backend):
        eager = _pair(16, 32, 3, "silu", "cuda", conv_kw=dict(padding=1))
        fused = _fused_from(eager)
        twin = copy.deepcopy(fused)
        compiled = torch.compile(twin, fullgraph=True)
        x = torch.randn(4, 16, 14, 14, device="cuda").contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
            y1, y2 = fused(x1), compiled(x2)
        torch.testing.assert_close(y2.float(), y1.float(), atol=2e-2, rtol=2e-2)
        y1.float().square().sum().backward()
        y2.float().square().sum().backward()
        torch.testing.assert_close(x2.grad, x1.grad, atol=5e-2, rtol=5e-2)
        torch.testing.assert_close(twin.bn.running_mean, fused.bn.running_mean, atol=1e-3, rtol=1e-3)


def test_from_modules_refuses_hooked_modules():
    """A forward (or backward) hook on the conv, the BN or the activation would never run
    inside the fused module: from_modules refuses it and names it."""
    eager = _pair(3, 4, 3, "relu")
    eager[1].register_forward_hook(lambda *_: None)
    with pytest.raises(ValueError, match=r"bn \(BatchNorm2d\) has forward hooks"):
        ConvBNAct2d.from_modules(eager[0], eager[1], eager[2])
    eager = _pair(3, 4, 3, "relu")
    eager[2].register_forward_pre_hook(lambda *_: None)
    with pytest.raises(ValueError, match=r"act \(ReLU\) has forward pre-hooks"):
        ConvBNAct2d.from_modules(eager[0], eager[1], eager[2])


@pytest.mark.parametrize("memory", ["recompute", "fast"])
def test_train_empty_batch(dev_backend, memory):
    """A batch of 0 samples, as eager: an empty output and gradients, num_batches_tracked
    counted, running statistics untouched (not NaN), later eval outputs finite."""
    device, _ = dev_backend
    for bn_kw in (dict(), dict(momentum=None)):
        eager = _pair(3, 4, 3, "relu", device, conv_kw=dict(padding=1), bn_kw=bn_kw)
        fused = _fused_from(eager, memory)
        for m in (eager, fused):
            x = torch.randn(0, 3, 5, 5, device=device, requires_grad=True)
            y = m(x)
            assert y.shape == (0, 4, 5, 5)
            y.sum().backward()
            assert x.grad.shape == x.shape
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(fused.bn, name), getattr(eager[1], name)), (bn_kw, name)
        fused.eval()
        assert torch.isfinite(fused(torch.randn(1, 3, 5, 5, device=device))).all()


def test_momentum_none_without_batch_count():
    """momentum=None (cumulative average) with num_batches_tracked removed: eager's factor is
    0 (the running statistics stay); no error."""
    eager = _pair(3, 4, 3, "relu", conv_kw=dict(padding=1), bn_kw=dict(momentum=None))
    eager[1].num_batches_tracked = None
    fused = _fused_from(eager)
    x = torch.randn(2, 3, 5, 5)
    _compare_step(eager, fused, x, eager[0].weight, fused.conv.weight)
    torch.testing.assert_close(fused.bn.running_mean, eager[1].running_mean, rtol=0, atol=0)
    torch.testing.assert_close(fused.bn.running_var, eager[1].running_var, rtol=0, atol=0)


def test_float64_under_cpu_autocast_stays_float64():
    """CPU autocast leaves float64 alone (only other floating dtypes are eligible), in
    training as in eval."""
    eager = _pair(3, 4, 3, "silu", conv_kw=dict(padding=1)).double()
    fused = _fused_from(eager)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    for mode in ("train", "eval"):
        getattr(eager, mode)(), getattr(fused, mode)()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want, got = eager(x), fused(x)
        assert got.dtype == want.dtype == torch.float64, mode
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_native_step_errors_carry_the_conv_message(dev_backend):
    """A conv error inside the native step reaches the caller with the conv's own message
    (the stable ABI's dispatcher call alone says only that the call failed)."""
    device, _ = dev_backend
    fused = _fused_from(_pair(3, 4, 3, "relu", device))
    with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):
        fused(torch.randn(2, 3, 2, 2, device=device))


def test_native_step_refuses_mismatched_dtypes_with_the_conv_message(dev_backend):
    """A bf16 input to an fp32 module outside autocast: eager's conv error (dtypes must
    match), raised before the native step runs; in eval the folded conv's own error (it
    has a bias: the message names the bias where eager's names the weight)."""
    device, _ = dev_backend
    eager = _pair(3, 4, 3, "relu", device, conv_kw=dict(padding=1))
    fused = _fused_from(eager)
    x = torch.randn(2, 3, 5, 5, device=device, dtype=torch.bfloat16)
    for mode in ("train", "eval"):
        getattr(eager, mode)(), getattr(fused, mode)()
        with pytest.raises(RuntimeError) as want:
            eager(x)
        with pytest.raises(RuntimeError) as got:
            fused(x)
        if mode == "train":
            assert str(got.value).split("\n")[0] == str(want.value).split("\n")[0]
        else:
            assert "should be the same" in str(got.value) and "BFloat16" in str(got.value)


def test_fold_after_convert_keeps_loading_its_own_state_dict():
    """convert() leaves a key map on the parent (eager checkpoint keys); after fold_conv_bn
    the folded module's own weight / bias must load back unchanged."""
    model = nn.Sequential(*_pair(3, 4, 3, "relu", conv_kw=dict(padding=1)))
    model(torch.randn(4, 3, 5, 5))
    fusedops.convert(model)
    fusedops.fold_conv_bn(model)
    state = copy.deepcopy(model.state_dict())
    assert set(state) == {"0.weight", "0.bias"}
    model.load_state_dict(state)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        want = model(x)
        clone = copy.deepcopy(model)
        clone.load_state_dict(state)
        torch.testing.assert_close(clone(x), want, rtol=0, atol=0)


def test_fold_leaves_sequential_subclasses_with_their_own_forward():
    """An nn.Sequential subclass whose forward is its own (here the conv output also feeds a
    skip) is not a chain: fold_conv_bn leaves it; one with Sequential's forward is folded."""
    class Skip(nn.Sequential):
        def forward(self, x):
            y = self[0](x)
            return self[2](self[1](y)) + y

    class Plain(nn.Sequential):
        pass

    for cls, folded in ((Skip, False), (Plain, True)):
        model = cls(*_pair(3, 4, 3, "relu", conv_kw=dict(padding=1)))
        model(torch.randn(4, 3, 5, 5))
        model.eval()
        x = torch.randn(2, 3, 5, 5)
        with torch.no_grad():
            want = model(x)
            fusedops.fold_conv_bn(model)
            assert isinstance(model[0], FoldedConvAct2d) == folded, cls.__name__
            torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_ops_without_a_gradient_give_outputs_that_do_not_require_grad():
    """The BN ops and the training step's backward op are not differentiable: their outputs
    never require grad (a backward that needs them fails with autograd's own error;
    autograd's fallback would have given them a grad_fn that silently passes no gradient),
    and torch.compile and opcheck take them with inputs that require grad."""
    from fusedops.ops import convbn
    y = torch.randn(2, 3, 4, 4, requires_grad=True)
    mean, invstd, var = bnops.bn_stats_op(y, 1e-5)
    z = bnops.bn_act_apply_op(y, mean, invstd, None, None, "relu", 0.01)
    dy = bnops.bn_act_backward_op(torch.randn_like(y), y, mean, invstd, None, None, "relu", 0.01)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    w = torch.randn(4, 3, 3, 3)
    with torch.no_grad():
        zz, m2, i2, _, _ = convbn.train_op(x, w, None, None, None, [1, 1], [1, 1], [1, 1], 1, 1e-5, "relu", 0.01,
                                           False)
    dx = convbn.train_backward_op(torch.randn_like(zz), x, w, None, m2, i2, None, None, [1, 1], [1, 1], [1, 1], 1,
                                  "relu", 0.01, [True, False, False, False])
    for out in (mean, invstd, var, z, *dy, *dx):
        assert not out.requires_grad and out.grad_fn is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        z.sum().backward()
    torch.library.opcheck(bnops.bn_stats_op, (y, 1e-5))
    compiled = torch.compile(lambda t: bnops.bn_stats_op(t, 1e-5)[0], backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(y), mean)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("bn_kw,bias", [(dict(), False), (dict(momentum=None), False), (dict(), True)])
def test_running_statistics_under_checkpoint(dev_backend, reentrant, bn_kw, bias):
    """torch.utils.checkpoint recomputes the forward in backward: eager's BN counts the
    recompute as a forward (num_batches_tracked 2 after one step, buffers moved twice); so
    must the fused module, also where the non-reentrant checkpoint stops the recompute
    early (at the last tensor saved for backward)."""
    from torch.utils.checkpoint import checkpoint
    device, _ = dev_backend
    eager = _pair(3, 4, 3, "relu", device, conv_kw=dict(padding=1), bn_kw=bn_kw)
    if bias:
        eager[0] = nn.Conv2d(3, 4, 3, padding=1, bias=True).to(device)
    fused = _fused_from(eager)
    x = torch.randn(2, 3, 5, 5, device=device)
    for m in (eager, fused):
        xx = x.clone().requires_grad_()
        checkpoint(m, xx, use_reentrant=reentrant).square().sum().backward()
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused.bn, name), getattr(eager[1], name), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
    assert int(fused.bn.num_batches_tracked) == 2


# ---- y that is not dense NCHW / channels_last: copied once, outputs fully written -------------

def _odd_layout(layout, dtype, device, seed):
    """y [4, 5, 3, 6]-ish in a layout the kernels must not write through (slices of a bigger
    tensor, a transposed view, an expanded one)."""
    g = torch.Generator().manual_seed(seed)
    big = (torch.randn(8, 9, 6, 6, generator=g) * 2 + 1).to(device=device, dtype=dtype)
    if layout == "channel_slice":
        return big[:4, 1:6, :3]          # H·W mergeable, not dense
    if layout == "batch_slice":
        return big[::2, :5]
    if layout == "spatial_slice":
        return big[:4, :5, :, 1:5]       # H and W not mergeable
    if layout == "transposed_hw":
        return big[:4, :5].contiguous().transpose(2, 3)  # dense, H and W not mergeable
    if layout == "cl_channel_slice":
        return big.contiguous(memory_format=torch.channels_last)[:4, 2:7]
    if layout == "expanded":
        return big[:1, :5, :1].expand(4, 5, 3, 6)  # stride 0 along N and H
    raise ValueError(layout)


_ODD_LAYOUTS = ["channel_slice", "batch_slice", "spatial_slice", "transposed_hw", "cl_channel_slice", "expanded"]


@pytest.mark.parametrize("layout", _ODD_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bn_ops_non_dense_y(dev_backend, dtype, layout, monkeypatch):
    """The kernels write z / dy with the strides of the y they read: a y that is not dense
    NCHW / channels_last (where empty_like has other strides, or is smaller) is copied once
    first. Outputs poisoned; values against fp64 with the usual rule."""
    device, backend = dev_backend
    monkeypatch.setattr(bnops, "_out_like", lambda t: poison_(torch.empty_like(t)))
    monkeypatch.setattr(bnops, "_out_channels", lambda c, like: poison_(
        torch.empty(c, device=like.device, dtype=torch.float32)))
    y = _odd_layout(layout, dtype, device, 0)
    dz = _odd_layout(layout, dtype, device, 1)  # read only: in place where mergeable
    y0, dz0 = y.clone(), dz.clone()
    c = y.shape[1]
    mean, invstd, var = _stats_checked(y)
    w, b = torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)
    for act in ["identity", "silu"]:
        z = bnops.bn_act_apply(y, mean, invstd, w, b, act, 0.1)
        assert z.shape == y.shape and z.dtype == y.dtype
        _check_apply_backward(z, dz, y, mean, invstd, w, b, act, dtype)
    assert torch.equal(y, y0) and torch.equal(dz, dz0), "inputs modified"


@pytest.mark.parametrize("layout", ["channel_slice", "transposed_hw"])
def test_bn_ops_non_dense_y_opcheck(dev_backend, layout):
    """The fake kernels give the real outputs' layout (NCHW for a y that is copied)."""
    device, backend = dev_backend
    y = _odd_layout(layout, torch.float32, device, 0)
    mean, invstd, _ = bnops.bn_stats(y)
    w, b = torch.rand(5, device=device) + 0.5, torch.randn(5, device=device)
    z = bnops.bn_act_apply(y, mean, invstd, w, b, "relu")
    assert z.stride() == bnops._apply_fake(y, mean, invstd, w, b, "relu").stride()
    torch.library.opcheck(bnops.bn_act_apply_op, (y, mean, invstd, w, b, "relu", 0.01))
    torch.library.opcheck(bnops.bn_act_backward_op, (_odd_layout(layout, torch.float32, device, 1), y, mean, invstd,
                                                     w, b, "relu", 0.01))


@pytest.mark.parametrize("memory", ["recompute", "fast"])
@pytest.mark.parametrize("layout", ["channel_slice", "batch_slice"])
def test_train_non_dense_input(dev_backend, layout, memory):
    """ConvBNAct2d on a sliced input (a strided view of a leaf): forward and backward against
    eager and fp64."""
    device, _ = dev_backend
    eager = _pair(3, 5, 3, act="silu", device=device, conv_kw=dict(padding=1))
    fused = _fused_from(eager, memory)
    ref = copy.deepcopy(eager).double()
    big = torch.randn(8, 6, 7, 9, device=device)
    view = (lambda t: t[:, 1:4]) if layout == "channel_slice" else (lambda t: t[::2, :3])
    be, bf, br = big.clone().requires_grad_(), big.clone().requires_grad_(), big.double().requires_grad_()
    xf = view(bf)
    assert not xf.is_contiguous()
    ye, yf, yr = eager(view(be)), fused(xf), ref(view(br))
    assert_close_rule(yf, ye, yr, atol=_tol(torch.float32, yr), name="output")
    g = torch.randn_like(yr)
    ye.backward(g.float())
    yf.backward(g.float())
    yr.backward(g)
    assert_close_rule(bf.grad, be.grad, br.grad, atol=_tol(torch.float32, br.grad), name="dx")
    assert_close_rule(fused.conv.weight.grad, eager[0].weight.grad, ref[0].weight.grad,
                      atol=_tol(torch.float32, ref[0].weight.grad), name="dW")
    assert_close_rule(fused.bn.weight.grad, eager[1].weight.grad, ref[1].weight.grad,
                      atol=_tol(torch.float32, ref[1].weight.grad), name="dgamma")


def test_bn_bf16_outputs_are_fp32_results_rounded_to_nearest(dev_backend):
    """z and dy of a bf16 y are the fp32 ones (same inputs upcast) rounded once, to nearest
    even (the Triton interpreter's own conversion truncates: the kernels round by hand). z
    exactly; dy also depends on per-channel sums, which the bf16 and fp32 kernels may add in
    another order (other tile layouts): where dy32 lies within those sums' fp32 error of a
    bf16 rounding boundary (2^-20 of the terms' size, |w·invstd|·(|g| + mean|g| + |ŷ|·mean|g·ŷ|),
    an absolute error: where the terms cancel, dy is small and the relative error large) either
    rounding is accepted, elsewhere none. (Strict equality failed on an H100 for 1 of 4096
    elements; truncation instead of rounding makes about half of them differ.)"""
    device, backend = dev_backend
    if backend == "reference":
        pytest.skip("the reference computes its own way")
    g = torch.Generator().manual_seed(7)
    y = (torch.randn(2, 8, 16, 16, generator=g) * 3 + 1).bfloat16().to(device)
    dz = torch.randn(2, 8, 16, 16, generator=g).bfloat16().to(device)
    mean, invstd, _ = bnops.bn_stats(y)
    w, b = (torch.rand(8, generator=g) + 0.5).to(device), torch.randn(8, generator=g).to(device)
    z = bnops.bn_act_apply(y, mean, invstd, w, b, "silu")
    z32 = bnops.bn_act_apply(y.float(), mean, invstd, w, b, "silu")
    assert torch.equal(z, z32.bfloat16()), f"{(z != z32.bfloat16()).sum().item()} of {z.numel()} differ"
    dy = bnops.bn_act_backward(dz, y, mean, invstd, w, b, "silu")[0]
    dy32 = bnops.bn_act_backward(dz.float(), y.float(), mean, invstd, w, b, "silu")[0]
    per_c = (1, -1, 1, 1)
    xhat = (y.double() - mean.double().view(per_c)) * invstd.double().view(per_c)
    zd = xhat * w.double().view(per_c) + b.double().view(per_c)
    gd = dz.double() * reference.activation_grad(zd, "silu")
    dims = (0, 2, 3)
    terms = gd.abs() + gd.abs().mean(dims, keepdim=True) + xhat.abs() * (gd * xhat).abs().mean(dims, keepdim=True)
    window = (2.0 ** -20 * (w.double() * invstd.double()).abs().view(per_c) * terms).float()
    near_boundary = (dy32 - window).bfloat16() != (dy32 + window).bfloat16()
    wrong = (dy != dy32.bfloat16()) & ~near_boundary
    assert not wrong.any(), f"{wrong.sum().item()} of {dy.numel()} differ (beyond a rounding boundary)"
    assert near_boundary.sum().item() < dy.numel() // 50  # the allowance stays small (32 of 4096 here)
