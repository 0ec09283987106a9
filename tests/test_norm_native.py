"""The native LayerNorm / RMSNorm + activation ops (torch.ops.fusedops_C.norm_act_fwd /
norm_act_bwd: outputs allocated by the extension, any leading shape, dW/dB summed and cast
in the extension) against the fp64 reference, on the C++ CPU and CUDA C++ backends; and
the public functions' host path (one native call per direction, no tensor made from
Python)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import fusedops
from fusedops import _backend, _native
from fusedops import reference as R
from fusedops.ops import norm as norm_ops
from helpers import require

ACTS = list(R.ACTIVATIONS)
NATIVE = [pytest.param(("cpu", "cpp"), id="cpu-cpp"),
          pytest.param(("cuda", "cuda"), id="cuda-cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=NATIVE)
def device(request):
    device, backend = request.param
    require(device, backend)
    # uninitialised memory (torch.empty, in the extension too) filled with NaN: an element
    # the kernels fail to write fails the comparisons
    torch.use_deterministic_algorithms(True, warn_only=True)
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with fusedops.use_backend(backend):
            yield device
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.use_deterministic_algorithms(False)


def _fwd(*args):
    return _native.op("norm_act_fwd")(*args)


def _bwd(*args):
    return _native.op("norm_act_bwd")(*args)


def _params(n, device, wdtype, has_w, has_b):
    w = (torch.rand(n, device=device) + 0.5).to(wdtype) if has_w else None
    b = (0.5 * torch.randn(n, device=device)).to(wdtype) if has_b else None
    return w, b


def _close(ours, ref, tol, name):
    assert not torch.isnan(ours).any(), f"{name}: NaN (unwritten?)"
    err = (ours.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    bound = tol * (1.0 + (ref.double().abs().max().item() if ref.numel() else 0.0))
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("shape", [(5, 123), (3, 7, 100), (1, 64), (64,), (0, 64), (2, 0, 8), (4, 0)])
def test_forward_outputs(device, shape, rms, mode):
    x = torch.randn(shape, device=device, dtype=torch.bfloat16)
    r = torch.randn(shape, device=device, dtype=torch.bfloat16)
    r0 = r.clone()
    n = shape[-1]
    w, b = _params(n, device, torch.bfloat16, True, not rms)
    y, s, mean, rstd = _fwd(x, r if mode else None, w, b, 1e-5, 3, rms, mode, None)
    lead = shape[:-1]
    assert y.shape == shape and y.dtype == torch.bfloat16 and y.is_contiguous()
    assert rstd.shape == lead and rstd.dtype == torch.float32
    assert mean.dtype == torch.float32 and mean.shape == ((0,) if rms else lead)
    assert s.shape == (shape if mode == 1 else (0,)) and s.dtype == x.dtype
    s_ref = R.residual_sum(x, r0) if mode else x
    y_ref, mean_ref, rstd_ref = R.norm_act(s_ref.double(), w.double(), None if b is None else b.double(), 1e-5,
                                           "gelu_tanh", rms)
    _close(y, y_ref, TOL[torch.bfloat16], "y")
    if n:  # (no statistics of empty rows)
        _close(rstd, rstd_ref, 1e-5, "rstd")
    if n and not rms:
        _close(mean, mean_ref, 1e-5, "mean")
    if mode == 1:
        assert torch.equal(s, s_ref)
    if mode == 2:
        assert torch.equal(r, s_ref), "in place: the residual must hold s"
    else:
        assert torch.equal(r, r0), "the residual must not be written"


def test_forward_fp32_out_and_mixed_params(device):
    """y_dtype float32 (autocast): fp32 y from bf16 x; fp32 weight with bf16 bias (converted once)."""
    x = torch.randn(6, 200, device=device, dtype=torch.bfloat16)
    w = (torch.rand(200, device=device) + 0.5)
    b = torch.randn(200, device=device).bfloat16()
    y, _, _, _ = _fwd(x, None, w, b, 1e-5, 2, False, 0, torch.float32)
    assert y.dtype == torch.float32
    y_ref, _, _ = R.norm_act(x.double(), w.double(), b.double(), 1e-5, "gelu", False)
    _close(y, y_ref, 1e-5, "y")


@pytest.mark.parametrize("y_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [200, 1024, 4100])
def test_forward_16bit_y_of_fp32_x(device, y_dtype, n):
    """y_dtype fp16 / bf16 for an fp32 x (packets of 4 fp32 in, 8 bytes out; odd rows of
    packets; an unaligned row length), with the residual."""
    x, r = torch.randn(5, n, device=device), torch.randn(5, n, device=device)
    w, b = _params(n, device, torch.float32, True, True)
    y, s, mean, rstd = _fwd(x, r, w, b, 1e-5, 3, False, 1, y_dtype)
    assert y.dtype == y_dtype and s.dtype == torch.float32
    y_ref, _, _ = R.norm_act((x + r).double(), w.double(), b.double(), 1e-5, "gelu_tanh", False)
    _close(y, y_ref, TOL[y_dtype], "y")


# On torch 2.11 an error raised inside a native (stable-ABI) op crashed the process
# (SIGSEGV) instead of raising, on the CPU and on CUDA, for these checks and for ones that
# predate them (bench/NOTES.md, round 29); torch 2.13 raises. The refusals run in a child
# process, so that a crash fails this test rather than the test worker.
_TORCH = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
_REFUSALS = """
import torch
from fusedops import _native
from fusedops import reference as R

fwd, bwd = _native.op("norm_act_fwd"), _native.op("norm_act_bwd")
dev = {device!r}


def refused(call, words):
    try:
        call()
    except Exception as exc:  # the op's own error, naming the argument
        assert words in str(exc), str(exc)
        return
    raise AssertionError("not refused: " + words)


x, r = torch.randn(5, 64, device=dev), torch.randn(5, 64, device=dev)
for bad, xb in ((torch.int32, x), (torch.bfloat16, x.half()), (torch.float16, x.bfloat16())):
    rb = r.to(xb.dtype)
    r0 = rb.clone()
    refused(lambda: fwd(xb, rb, None, None, 1e-5, 3, False, 2, bad), "y_dtype")
    assert torch.equal(rb, r0), "a refused call must not write the residual"
s = torch.randn(4, 64, device=dev, dtype=torch.float16)
mean, rstd = R.norm_stats(s.float(), 1e-5, False)
refused(lambda: bwd(s.bfloat16(), s, None, None, mean, rstd, None, 0), "dy must")
"""


@pytest.mark.xfail(_TORCH < (2, 13), strict=True,
                   reason="torch < 2.13: an error inside a native op crashed the process (measured on 2.11)")
def test_bad_y_dtype_and_dy_dtype_refused(device):
    """An output dtype the kernels do not write is refused by name before anything is
    written (forward: y_dtype; backward: dy's dtype)."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_REFUSALS.format(device=device))],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"exit status {r.returncode}: {r.stderr[-3000:]}"


@pytest.mark.parametrize("dy_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(37, 300), (300, 1024), (5, 4100), (64, 4096)], ids=str)
def test_backward_16bit_dy_of_fp32_s(device, dy_dtype, shape):
    """dy in fp16 / bf16 with an fp32 s (the gradient of a 16-bit y): dx in fp32."""
    _bwd_case(device, shape, torch.float32, torch.float32, True, True, False, "silu", with_ds=True,
              dy_dtype=dy_dtype)


def test_forward_inplace_strided_residual(device):
    """In place into a residual whose rows do not collapse: computed in a copy, written back."""
    x = torch.randn(4, 3, 64, device=device)
    base = torch.randn(3, 4, 64, device=device)
    r = base.transpose(0, 1)
    s_ref = x + r
    y, s, _, rstd = _fwd(x, r, None, None, 1e-5, 0, True, 2, None)
    assert s.numel() == 0 and rstd.shape == (4, 3)
    assert torch.equal(r, s_ref) and torch.equal(base, s_ref.transpose(0, 1))
    y_ref, _, _ = R.norm_act(s_ref.double(), None, None, 1e-5, "identity", True)
    _close(y, y_ref, 1e-5, "y")


def _bwd_case(device, shape, dtype, wdtype, has_w, has_b, rms, act, with_ds=False, dy_view=None, dy_dtype=None):
    n = shape[-1]
    s = torch.randn(shape, device=device, dtype=dtype)
    w, b = _params(n, device, wdtype, has_w, has_b)
    mean, rstd = R.norm_stats(s.float(), 1e-5, rms)
    dy = torch.randn(shape, device=device, dtype=dy_dtype or dtype) if dy_view is None else dy_view
    ds = torch.randn(shape, device=device, dtype=dtype) if with_ds else None
    dx, dw, db = _bwd(dy, s, w, b, mean, rstd, ds, norm_ops._ACT_CODE[act])
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    rx, rw, rb = R.norm_act_backward(d64(dy), d64(s), d64(w), d64(b), d64(mean), d64(rstd), act, d64(ds))
    assert dx.shape == shape and dx.dtype == dtype
    tol = TOL[dtype]
    _close(dx, rx, 4 * tol, "dx")
    m = s.numel() // n if n else 0
    for name, got, ref, p in (("dw", dw, rw, w), ("db", db, rb, b)):
        if p is None:
            assert got.numel() == 0, f"{name}: expected an empty tensor"
            continue
        assert got.shape == (n,) and got.dtype == p.dtype, f"{name}: {got.shape} {got.dtype}"
        if m == 0:
            assert torch.equal(got, torch.zeros_like(got))
        else:
            _close(got, ref, 4 * max(tol, TOL[p.dtype]), name)
    return dx, dw, db


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("rms", [False, True])
def test_backward_activations(device, act, rms):
    _bwd_case(device, (37, 300), torch.float32, torch.float32, True, not rms, rms, act)


@pytest.mark.parametrize("dtype,wdtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.float16, torch.float16), (torch.float32, torch.bfloat16),
                                          (torch.float32, torch.float32)])
@pytest.mark.parametrize("m", [1, 5, 300])
def test_backward_param_dtypes(device, dtype, wdtype, m):
    """dW/dB in the parameters' dtypes: one partial row written directly (fp32 params) or
    cast by the sum kernel, many partial rows summed in order (m=300: several on either
    device)."""
    n = 512 if device == "cuda" else 96
    _bwd_case(device, (m, n), dtype, wdtype, True, True, False, "gelu_tanh")


@pytest.mark.parametrize("has_w,has_b,rms", [(True, False, False), (False, True, False), (False, False, False),
                                             (False, False, True), (True, False, True)])
def test_backward_optional_params(device, has_w, has_b, rms):
    """LN with weight and no bias (or bias alone, or neither), RMS without weight."""
    _bwd_case(device, (9, 130), torch.bfloat16, torch.bfloat16, has_w, has_b, rms, "silu")


@pytest.mark.parametrize("shape", [(0, 64), (3, 0, 16), (4, 0), (1, 1), (1, 777), (77,)])
def test_backward_empty_and_single_row(device, shape):
    _bwd_case(device, shape, torch.bfloat16, torch.float32, True, True, False, "relu")


def _n1_t(shape, device, dtype=torch.float32):
    """`shape` (last dim 1) with a size-1 column stride != 1 (as torch.randn(1, 7).t())."""
    t = torch.randn((1,) + tuple(shape[:-1]), device=device, dtype=dtype).permute(*range(1, len(shape)), 0)
    assert t.shape == shape and t.stride(-1) != 1
    return t


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("shape", [(7, 1), (3, 5, 1)], ids=lambda s: "x".join(map(str, s)))
def test_n1_column_stride(device, shape, rms, mode):
    """N = 1 with a column stride != 1 in x, the residual, s, dy and ds: forward and
    backward against fp64 (the kernels' unit-column-stride checks refused them)."""
    x, r = _n1_t(shape, device), _n1_t(shape, device)
    r0 = r.clone()
    w, b = _params(1, device, torch.float32, True, not rms)
    y, s, mean, rstd = _fwd(x, r if mode else None, w, b, 1e-5, 4, rms, mode, None)
    s_ref = x + r0 if mode else x
    y_ref, mean_ref, rstd_ref = R.norm_act(s_ref.double(), w.double(), None if b is None else b.double(), 1e-5,
                                           "silu", rms)
    _close(y, y_ref, 1e-5, "y")
    _close(rstd, rstd_ref, 1e-5, "rstd")
    if not rms:
        _close(mean, mean_ref, 1e-5, "mean")
    if mode == 2:
        assert torch.equal(r, s_ref)
    sv = s if mode == 1 else (r if mode == 2 else x)
    dy, ds = _n1_t(shape, device), _n1_t(shape, device)
    dx, dw, db = _bwd(dy, sv, w, b, None if rms else mean, rstd, ds, norm_ops._ACT_CODE["silu"])
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    rx, rw, rb = R.norm_act_backward(d64(dy), d64(sv), d64(w), d64(b), None if rms else d64(mean), d64(rstd),
                                     "silu", d64(ds))
    _close(dx, rx, 1e-5, "dx")
    _close(dw, rw, 1e-5, "dw")
    if b is not None:
        _close(db, rb, 1e-5, "db")


def test_backward_leading_dims_ds_and_strided_dy(device):
    """3-D s with ds, and a stride-0 dy (the gradient of .sum()) read through its strides."""
    shape = (2, 5, 70)
    _bwd_case(device, shape, torch.float32, torch.float32, True, True, False, "gelu", with_ds=True)
    dy = torch.randn((), device=device).expand(shape)
    _bwd_case(device, shape, torch.float32, torch.float32, True, False, True, "identity", dy_view=dy)


def test_backward_deterministic_bitwise(device):
    n = 256
    m = 600 if device == "cuda" else 200  # several partial rows
    s = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    w, b = _params(n, device, torch.bfloat16, True, True)
    mean, rstd = R.norm_stats(s.float(), 1e-5, False)
    dy = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    a = _bwd(dy, s, w, b, mean, rstd, None, 3)
    c = _bwd(dy, s, w, b, mean, rstd, None, 3)
    for u, v in zip(a, c):
        assert torch.equal(u, v)


# tensor-making or small tensor ops called from Python (what the host path must not do)
_TENSOR_CALLS = {"empty", "empty_like", "new_empty", "zeros", "new_zeros", "zeros_like", "to", "float", "sum",
                 "contiguous", "reshape", "view", "zero_", "copy_", "clone"}


@pytest.mark.parametrize("kind", ["ln", "rms", "add_ln", "add_rms"])
def test_host_path_makes_no_tensors_in_python(kind):
    """A plain fwd+bwd on a native backend: one native call per direction and no tensor
    allocation or small tensor op from Python (host time on launch-bound shapes)."""
    if not _backend.available("cpp", "cpu"):
        pytest.skip(_backend.why_unavailable("cpp", "cpu"))
    x = torch.randn(16, 256, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(16, 256, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(256, dtype=torch.float32, requires_grad=True)  # mixed: converted in the extension
    b = torch.randn(256, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(16, 256, dtype=torch.bfloat16)

    def step():
        if kind == "ln":
            y = fusedops.layer_norm_act(x, w, b, 1e-5, "gelu_tanh")
        elif kind == "rms":
            y = fusedops.rms_norm_act(x, w, None, "silu")
        elif kind == "add_ln":
            y, _ = fusedops.add_layer_norm_act(x, r, w, b, 1e-5, "gelu_tanh")
        else:
            y, _ = fusedops.add_rms_norm_act(x, r, w, None, "silu")
        y.backward(dy)

    with fusedops.use_backend("cpp"):
        step()  # warm (lookups cached once)
        calls = []

        def prof(frame, event, arg):
            if event == "c_call":
                calls.append(getattr(arg, "__name__", ""))

        sys.setprofile(prof)
        try:
            step()
        finally:
            sys.setprofile(None)
    made = sorted(c for c in calls if c in _TENSOR_CALLS)
    assert made == [], f"tensor calls from Python on the host path: {made}"
    assert x.grad is not None and w.grad.dtype == torch.float32
    assert (b.grad is None) == ("rms" in kind) and ("rms" in kind or b.grad.dtype == torch.bfloat16)
