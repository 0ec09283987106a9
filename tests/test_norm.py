"""fusedops LayerNorm / RMSNorm + activation (+ residual add) against eager F.layer_norm /
F.rms_norm + activation, with an fp64 reference and the 2x-eager-error rule.

Grids are kept small for the Triton interpreter (a few programs per launch). The looped
path (rows longer than the on-chip block) is exercised on CPU by lowering the Triton
config's max_block; the C++ CPU kernel has a single path for every N."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

import fusedops
from fusedops import reference as R
from fusedops.ops import norm as norm_ops
from helpers import assert_close_rule, backend_params, require

ACTS = list(R.ACTIVATIONS)
KINDS = ["ln", "rms", "add_ln", "add_rms", "add_ln_", "add_rms_"]
# (x dtype, weight dtype)
DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
          (torch.bfloat16, torch.float32)]
SHAPES = [(1, 1), (5, 123), (3, 7, 1000), (2, 4096), (4, 65536), (1, 777), (0, 64), (2, 0, 8)]


@pytest.fixture(params=backend_params())
def dev_backend(request):
    device, backend = request.param
    require(device, backend)
    with fusedops.use_backend(backend):
        yield device, backend


def _eager(kind, x, r, w, b, eps, act, s_dtype=None):
    """What eager PyTorch computes, in the input dtype (the reference when given fp64).
    s_dtype: round s = x + r to this dtype (as eager and the kernels do) with an identity
    gradient, so that an fp64 reference normalises the same s."""
    n = x.shape[-1]
    s = x + r if kind.startswith("add") else x
    if s_dtype is not None and kind.startswith("add"):
        s = s + (s.to(s_dtype).to(s.dtype) - s).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mixed-dtype rms_norm warns that it is not fused
        if "ln" in kind:
            if s.device.type == "cuda" and w is not None and w.dtype != s.dtype:
                # eager CUDA layer_norm refuses fp32 params with fp16/bf16 input: the eager
                # baseline casts them (differentiably) to the input dtype
                w, b = w.to(s.dtype), None if b is None else b.to(s.dtype)
            z = F.layer_norm(s, (n,), w, b, eps)
        else:
            z = F.rms_norm(s, (n,), w, eps)
    return R.activation(z, act), s


def _ours(kind, x, r, w, b, eps, act, **kw):
    if kind == "ln":
        return fusedops.layer_norm_act(x, w, b, eps, act, **kw), None
    if kind == "rms":
        return fusedops.rms_norm_act(x, w, eps, act, **kw), None
    inplace = kind.endswith("_")
    if "ln" in kind:
        return fusedops.add_layer_norm_act(x, r, w, b, eps, act, inplace=inplace, **kw)
    return fusedops.add_rms_norm_act(x, r, w, eps, act, inplace=inplace, **kw)


def _tol(dtype):
    return 4 * torch.finfo(dtype).eps


def _run(kind, fn, ts, eps, act, dy, dsg, inplace=False, **kw):
    """`kind` through fn (_ours or _eager) on the leaves ts = [x, r, w, b], then the backward
    of dy (and dsg into s): ([y, s, dx, dresidual, dweight, dbias], the residual passed)."""
    xl, rl, wl, bl = ts
    rin = rl * 1 if inplace else rl  # an in-place residual is a non-leaf buffer
    y, s = fn(kind, xl, rin, wl, bl, eps, act, **kw)
    outs, grads = [y], [dy.to(y.dtype)]
    if kind.startswith("add"):
        outs.append(s)
        grads.append(dsg.to(s.dtype))
    torch.autograd.backward(outs, grads)
    return [y.detach(), None if s is None else s.detach()] + [None if t is None else t.grad for t in ts], rin


def _dx_atol(x, r, w, dy, eps, is_add):
    """dx = rstd·(g − mean(g) − x̂·mean(g·x̂)): terms of size rstd·|g| cancel, so one fp32
    rounding of g costs up to eps·rstd·|g| (rstd ~ 316 for a constant row, eps=1e-5)."""
    s64 = (x.double() + r.double()) if is_add else x.double()
    rstd = (s64.var(-1, unbiased=False) + eps).rsqrt().max().item() if s64.numel() else 0.0
    g = (dy.double().abs().max().item() if dy.numel() else 0.0) * (
        2.0 if w is None else 2.0 * w.double().abs().max().item())
    return max(1e-6, torch.finfo(torch.float32).eps * rstd * g)


def check(kind, act, shape, dtype, wdtype, device, has_w=True, has_b=True, x_view=None, r_view=None):
    """Forward and backward of `kind` vs eager (same dtype) and an fp64 reference."""
    n = shape[-1]
    eps = 1e-5
    x = (torch.randn(shape, device=device) if x_view is None else x_view).to(dtype)
    r = (torch.randn(shape, device=device) if r_view is None else r_view).to(dtype)
    w = (torch.rand(n, device=device) + 0.5).to(wdtype) if has_w else None
    b = (0.5 * torch.randn(n, device=device)).to(wdtype) if has_b and "ln" in kind else None
    dy = torch.randn(shape, device=device).to(dtype)
    dsg = torch.randn(shape, device=device).to(dtype)
    is_add = kind.startswith("add")

    def leaves(dt=None):
        out = [x, r, w, b] if dt is None else [None if t is None else t.to(dt) for t in (x, r, w, b)]
        return [None if t is None else t.detach().clone().requires_grad_() for t in out]

    ours, rin = _run(kind, _ours, leaves(), eps, act, dy, dsg, inplace=kind.endswith("_"))
    eager, _ = _run(kind, _eager, leaves(), eps, act, dy, dsg)
    ref, _ = _run(kind, _eager, leaves(torch.float64), eps, act, dy, dsg, s_dtype=dtype)
    if kind.endswith("_"):
        assert torch.equal(rin, ours[1]), "in-place: the residual buffer must hold s"
    names = ["y", "s", "dx", "dresidual", "dweight", "dbias"]
    for name, o, e, f in zip(names, ours, eager, ref):
        if f is None or (name == "dresidual" and not is_add) or (name == "s" and not is_add):
            continue
        assert o is not None, f"{name} missing"
        assert o.dtype == e.dtype, f"{name}: dtype {o.dtype} != eager {e.dtype}"
        tol = _tol(dtype) if name in ("y", "s", "dx", "dresidual") else _tol(dtype) * max(1, shape[0])
        atol = _dx_atol(x, r, w, dy, eps, is_add) if name in ("dx", "dresidual") else 1e-6
        assert_close_rule(o, e, f, rtol=tol, atol=atol, name=f"{kind}/{act}/{name}")


@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{d[0]}-w{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind", KINDS)
def test_activations_dtypes(dev_backend, kind, act, dtypes):
    device, _ = dev_backend
    check(kind, act, (3, 5, 100), dtypes[0], dtypes[1], device)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["ln", "rms", "add_ln_", "add_rms"])
def test_shapes(dev_backend, kind, dtype, shape):
    device, _ = dev_backend
    check(kind, "gelu_tanh", shape, dtype, torch.float32, device)


@pytest.mark.parametrize("has_w,has_b", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("kind", ["ln", "rms", "add_ln"])
def test_optional_params(dev_backend, kind, has_w, has_b):
    device, _ = dev_backend
    check(kind, "silu", (4, 300), torch.float32, torch.float32, device, has_w=has_w, has_b=has_b)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kind", ["ln", "rms", "add_ln_", "add_rms"])
@pytest.mark.parametrize("n", [1000, 4096])
def test_triton_looped_path(monkeypatch, device, kind, n):
    """Rows longer than the on-chip block take the looped forward and the two-pass backward
    (forced here by a small max_block and twopass_block; by default N > 65536 and N > 8192),
    in column chunks of 256: several first-pass chunks a row."""
    require(device, "triton")
    from fusedops.triton_kernels import norm as tk
    monkeypatch.setattr(tk.CONFIG, "max_block", 256)
    monkeypatch.setattr(tk.CONFIG, "loop_block", 128)
    monkeypatch.setattr(tk.CONFIG, "twopass_block", 256)
    monkeypatch.setattr(tk.CONFIG, "interp_programs", 2)  # (under the interpreter) 2 row blocks a program
    monkeypatch.setattr(tk, "_BWD_OVERRIDE", "2p:1,256,4,1")
    assert tk.bwd_config(n, 3).twopass
    with fusedops.use_backend("triton"):
        check(kind, "gelu", (3, n), torch.bfloat16, torch.float32, device)
        check(kind, "relu", (2, n), torch.float32, torch.float32, device)


@pytest.mark.parametrize("kind", ["ln", "rms", "add_ln_", "add_rms"])
def test_triton_bwd_partials(monkeypatch, kind):
    """The persistent backward with several programs (P > 1 fp32 dW/dB partial rows summed
    by the finalize kernel), row blocks of 2 rows, M not a multiple of the rows a program
    owns (interpreter: a small row_elems gives 2-row blocks, 37 rows -> 4 programs)."""
    require("cpu", "triton")
    from fusedops.triton_kernels import norm as tk
    monkeypatch.setattr(tk.CONFIG, "row_elems", 1024)
    assert tk.bwd_config(300, 37).rows == 2
    with fusedops.use_backend("triton"):
        check(kind, "gelu_tanh", (37, 300), torch.bfloat16, torch.float32, "cpu")
        check(kind, "silu", (9, 300), torch.float32, torch.float32, "cpu")


def _force_prefetch(monkeypatch, prefetch: bool):
    """The Triton on-chip backward with (or without) PREFETCH, in 2-row blocks over 2 programs
    under the interpreter; returns the Triton norm module."""
    from fusedops.triton_kernels import norm as tk
    monkeypatch.setattr(tk.CONFIG, "row_elems", 2048)
    monkeypatch.setattr(tk.CONFIG, "interp_programs", 2)
    config = tk.bwd_config  # (a second call wraps the first wrapper: the outer prefetch wins)
    monkeypatch.setattr(tk, "bwd_config", lambda n, m, has_b=True, elem_bytes=2: dataclasses.replace(
        config(n, m, has_b, elem_bytes), prefetch=prefetch))
    return tk


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("kind", ["ln", "rms", "add_ln_", "add_rms"])
def test_triton_bwd_prefetch(monkeypatch, kind, prefetch):
    """The on-chip backward with and without the next step's s and dy loaded ahead
    (PREFETCH): 7 rows = 4 row blocks of 2 (the last one short) over 2 programs of 2 blocks
    each: a program's prefetched tile is the one its next step uses, and the short last
    block's rows past M stay masked."""
    require("cpu", "triton")
    tk = _force_prefetch(monkeypatch, prefetch)
    cfg = tk.bwd_config(1000, 7)
    assert cfg.rows == 2 and cfg.prefetch == prefetch and not cfg.twopass
    with fusedops.use_backend("triton"):
        check(kind, "gelu_tanh", (7, 1000), torch.bfloat16, torch.float32, "cpu")
        check(kind, "relu", (5, 1000), torch.float32, torch.float32, "cpu", has_b=False)


@pytest.mark.parametrize("kind", ["ln", "add_rms"])
def test_triton_bwd_prefetch_same_bits(monkeypatch, kind):
    """The prefetch moves loads, not arithmetic: dx, dresidual, dW and dB are the same bits
    with and without it (interpreter; several programs, several steps a program)."""
    require("cpu", "triton")
    n = 1000
    x, r, dy, ds = (torch.randn(7, n).to(torch.bfloat16) for _ in range(4))
    w, b = torch.rand(n) + 0.5, 0.5 * torch.randn(n)
    grads = []
    for prefetch in (False, True):
        assert _force_prefetch(monkeypatch, prefetch).bwd_config(n, 7).prefetch == prefetch
        leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
        with fusedops.use_backend("triton"):
            y, s = _ours(kind, *leaves, 1e-5, "gelu_tanh")
        torch.autograd.backward([y] + ([s] if s is not None else []), [dy] + ([ds] if s is not None else []))
        grads.append([t.grad for t in leaves])
    used = 0
    for off, on in zip(*grads):
        assert (off is None) == (on is None)
        if off is not None:
            assert torch.equal(off, on)
            used += 1
    assert used == 3  # ln: x, w, b; add_rms: x, r, w


@pytest.mark.parametrize("opts", ["", "p"])
@pytest.mark.parametrize("kind", ["ln", "rms", "add_ln_", "add_rms"])
@pytest.mark.parametrize("n", [1000, 600])
def test_triton_bwd_two_pass(monkeypatch, kind, n, opts):
    """The two-pass backward (by default rows padded to 16384 or more), forced here at N ~
    1000 by a small twopass_block: 7 rows = 4 row blocks of 2 (the last one short) over 2
    programs of 2 blocks each, column chunks of 256 (4 at N = 1000, 3 at 600: N not a
    multiple of the chunk); the first pass with and without the next block prefetched."""
    require("cpu", "triton")
    from fusedops.triton_kernels import norm as tk
    monkeypatch.setattr(tk.CONFIG, "twopass_block", 512)
    monkeypatch.setattr(tk.CONFIG, "interp_programs", 2)
    monkeypatch.setattr(tk, "_BWD_OVERRIDE", "2p:2,256,4,1," + opts)
    cfg = tk.bwd_config(n, 7)
    assert cfg.twopass and cfg.block_n == 256 and cfg.rows == 2
    assert cfg.prefetch == ("p" in opts)
    with fusedops.use_backend("triton"):
        check(kind, "gelu_tanh", (7, n), torch.bfloat16, torch.float32, "cpu")
        check(kind, "relu", (3, n), torch.float32, torch.float32, "cpu", has_b=False)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shape", [(1000, 768), (600, 520), (1000, 1288), (300, 2048), (777, 4096), (333, 8192),
                                   (260, 16384), (5, 16384), (16, 4096), (130, 20000), (3, 12000)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gpu_bwd_shapes(backend, shape):
    """GPU backward paths: several programs with fp32 partials (M not a multiple of the rows
    per program), one program writing dW/dB directly (small M), the long rows (N = 16384,
    12000, 20000: Triton's split kernel for 16-bit rows, its two passes for fp32; CUDA C++
    clusters of two blocks, streaming past 16384); fp32 rows on every shape."""
    require("cuda", backend)
    with fusedops.use_backend(backend):
        check("ln", "gelu_tanh", shape, torch.bfloat16, torch.bfloat16, "cuda")
        check("add_rms", "silu", shape, torch.bfloat16, torch.float32, "cuda")
        check("add_ln_", "gelu", shape, torch.float16, torch.float16, "cuda", has_b=False)
        check("ln", "silu", shape, torch.float32, torch.float32, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(700, 16384), (131, 12008), (9, 8200)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_cuda_bwd_cluster(shape):
    """The CUDA C++ backward of rows of 8192 < N <= 16384 (on sm_90+ a cluster of two blocks
    a row, the row sums exchanged through distributed shared memory): fp32 and bf16, with
    and without a bias, blocks of unequal column counts (12008, 8200), several rows a
    cluster; and the same bits on a second run (a missing barrier in the exchange would
    show as a result that moves)."""
    require("cuda", "cuda")
    with fusedops.use_backend("cuda"):
        check("ln", "gelu_tanh", shape, torch.bfloat16, torch.float32, "cuda")
        check("rms", "silu", shape, torch.float32, torch.float32, "cuda")
        check("add_ln", "relu", shape, torch.bfloat16, torch.bfloat16, "cuda")
        n = shape[-1]
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (torch.rand(n, device="cuda") + 0.5).requires_grad_()
        b = torch.randn(n, device="cuda", requires_grad=True)
        dy = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        runs = []
        for _ in range(3):
            x.grad = w.grad = b.grad = None
            fusedops.layer_norm_act(x, w, b, 1e-5, "silu").backward(dy)
            runs.append((x.grad.clone(), w.grad.clone(), b.grad.clone()))
        for later in runs[1:]:
            for a, c in zip(runs[0], later):
                assert torch.equal(a, c)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["", "x:8192,16,w", "x:8192,16,a"])
@pytest.mark.parametrize("shape", [(700, 16384), (131, 12008), (9, 8200), (1, 16384), (5, 32768), (3, 65536)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gpu_triton_bwd_split(monkeypatch, shape, variant):
    """16-bit rows padded to 16384 (Triton): one pass, two programs a row exchanging the row
    sums through global memory (under the override, next_pow2(N) / 8192 programs a row: 32768,
    65536); columns split unevenly (12008, 8200: the second program of a row has 8 columns),
    several rows a group, one row. The same bits on a second run, and from a CUDA graph
    replayed twice with new dy (the exchange words are zeroed inside the graph: stale tags
    from a previous replay would hand over old sums). The default (the partner's words polled
    by volatile loads) and, through the override, w and b re-read every row (w) and the words
    polled by atomics (a)."""
    require("cuda", "triton")
    from fusedops.triton_kernels import norm as tk
    m, n = shape
    if not variant and n > 16384:
        pytest.skip("the two passes by default")
    monkeypatch.setattr(tk, "_BWD_OVERRIDE", variant or None)
    assert tk.bwd_config(n, m).split == tk.next_power_of_2(n) // 8192 > 1
    if not variant:
        assert tk.bwd_config(n, m, elem_bytes=4).split == 1  # fp32 rows: the two passes
    with fusedops.use_backend("triton"):
        check("ln", "gelu_tanh", shape, torch.bfloat16, torch.float32, "cuda")
        check("rms", "silu", shape, torch.float16, torch.float16, "cuda")
        check("add_ln", "relu", shape, torch.bfloat16, torch.bfloat16, "cuda")
        check("add_rms_", "gelu", shape, torch.bfloat16, torch.float32, "cuda")
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    w, b = torch.rand(n, device="cuda") + 0.5, torch.randn(n, device="cuda")
    y = torch.empty_like(x)
    mean, rstd = (torch.empty(m, device="cuda") for _ in range(2))
    tk.fwd(x, None, None, y, w, b, mean, rstd, 1e-5, "silu", False)
    dy = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    dx = torch.full_like(x, float("nan"))

    def backward():
        return (dx, *tk.bwd(dy, x, w, b, mean, rstd, None, dx, "silu", False))

    first = [t.clone() for t in backward()]
    assert torch.equal(first[0], torch.nan_to_num(first[0]))  # every element written, finite
    assert all(torch.equal(a, c) for a, c in zip(first, backward()))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = backward()
    for _ in range(2):
        dy.copy_(torch.randn(shape, device="cuda", dtype=torch.bfloat16))
        dx.fill_(float("nan"))
        graph.replay()
        replayed = [t.clone() for t in static]
        fresh = backward()
        assert all(torch.equal(a, c) for a, c in zip(replayed, fresh))


@pytest.mark.gpu
def test_gpu_triton_long_rows(monkeypatch):
    """The Triton two-pass backward (fp32 rows padded to 16384 or more), several programs,
    several row blocks a program, with and without a bias; then 16-bit rows through the two
    passes with the first pass prefetching (forced by the override; their default is the
    split kernel)."""
    require("cuda", "triton")
    from fusedops.triton_kernels import norm as tk
    with fusedops.use_backend("triton"):
        check("ln", "gelu_tanh", (260, 16384), torch.float32, torch.float32, "cuda")
        check("add_rms", "silu", (133, 12000), torch.float32, torch.float32, "cuda")
        check("rms", "gelu_tanh", (260, 16384), torch.float32, torch.float32, "cuda")
        monkeypatch.setattr(tk, "_BWD_OVERRIDE", "2p:1,4096,8,1,p")
        assert tk.bwd_config(16384, 260).twopass and tk.bwd_config(16384, 260).prefetch
        check("ln", "gelu_tanh", (260, 16384), torch.bfloat16, torch.bfloat16, "cuda")
        check("add_rms", "silu", (133, 12000), torch.bfloat16, torch.float32, "cuda")


def test_backward_default_by_row_width(monkeypatch):
    """On CUDA the backward's default is CUDA C++ up to N = 8192, and above it up to 16384 for
    norms with a bias (the two backends within 2%) and for fp32 rows (Triton's backward takes
    two passes over those); 16-bit rows without a bias take Triton's there, as do all rows
    above 16384."""
    from fusedops import _backend
    monkeypatch.setattr(_backend, "available", lambda name, device_type: True)  # (a simulated CUDA device)
    monkeypatch.setattr(norm_ops._bwd, "_chosen", {})
    monkeypatch.setattr(_backend, "_forced", lambda: None)

    def bwd(n, bias, s_dtype, dy_dtype=torch.bfloat16):
        return norm_ops._bwd.backend_for("cuda", norm_ops._bwd_size(n, bias, s_dtype, dy_dtype))

    bias, f32, bf16 = torch.zeros(1), torch.float32, torch.bfloat16
    assert [bwd(n, None, bf16) for n in (768, 8192, 8193, 16384)] == ["cuda", "cuda", "triton", "triton"]
    assert [bwd(n, None, f32, f32) for n in (8192, 12288, 16384, 16385)] == ["cuda", "cuda", "cuda", "triton"]
    assert [bwd(n, None, f32) for n in (12288, 16384)] == ["cuda", "cuda"]  # fp32 s (e.g. Add+RMS's sum)
    assert [bwd(n, bias, bf16) for n in (8193, 16384, 16385)] == ["cuda", "cuda", "triton"]


def test_fast_path_matches_ops(dev_backend):
    """The public functions' direct path and the dispatcher ops give the same bits."""
    device, _ = dev_backend
    x = torch.randn(37, 300, device=device, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(37, 300, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.rand(300, device=device) + 0.5).requires_grad_()
    b = torch.randn(300, device=device, requires_grad=True)
    dy = torch.randn(37, 300, device=device, dtype=torch.bfloat16)
    ds = torch.randn(37, 300, device=device, dtype=torch.bfloat16)
    y1, s1 = fusedops.add_layer_norm_act(x, r, w, b, 1e-5, "gelu_tanh")
    g1 = torch.autograd.grad([y1, s1], [x, r, w, b], [dy, ds])
    y2, s2, _, _ = torch.ops.fusedops.add_layer_norm_act(x, r, w, b, 1e-5, "gelu_tanh")
    g2 = torch.autograd.grad([y2, s2], [x, r, w, b], [dy, ds])
    assert type(y1.grad_fn).__name__ != type(y2.grad_fn).__name__  # two different paths were taken
    for a, c in zip((y1, s1) + g1, (y2, s2) + g2):
        assert torch.equal(a, c)
    y3 = fusedops.rms_norm_act(x, w, 1e-6, "silu")
    (gx3,) = torch.autograd.grad([y3], [x], [dy])
    y4, _ = torch.ops.fusedops.rms_norm_act(x, w, 1e-6, "silu")
    (gx4,) = torch.autograd.grad([y4], [x], [dy])
    assert torch.equal(y3, y4) and torch.equal(gx3, gx4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("n", [65536 + 8, 131072])
def test_gpu_long_rows(backend, n):
    """Past the in-register/on-chip sizes: the looped forward and two-pass backward (Triton),
    the streaming kernels (CUDA C++)."""
    require("cuda", backend)
    with fusedops.use_backend(backend):
        check("add_ln_", "gelu_tanh", (3, n), torch.bfloat16, torch.float32, "cuda")
        check("rms", "silu", (2, n), torch.float32, torch.float32, "cuda")


@pytest.mark.parametrize("layout", ["col_stride", "row_stride", "transposed"])
@pytest.mark.parametrize("kind", ["ln", "add_rms", "add_ln_"])
def test_non_contiguous_x(dev_backend, kind, layout):
    device, _ = dev_backend
    if layout == "col_stride":
        x = torch.randn(6, 2 * 130, device=device)[:, ::2]
    elif layout == "row_stride":
        x = torch.randn(6, 300, device=device)[:, 10:140]
    else:
        x = torch.randn(130, 6, device=device).t()
    assert not x.is_contiguous()
    check(kind, "silu", tuple(x.shape), torch.float32, torch.float32, device, x_view=x)


def _n1_column_strided(shape, device):
    """A tensor of `shape` (last dim 1) whose size-1 column has a stride != 1, e.g.
    torch.randn(1, 7).t(): is_contiguous() is True, contiguous() leaves it as it is."""
    t = torch.randn((1,) + tuple(shape[:-1]), device=device).permute(*range(1, len(shape)), 0)
    assert t.shape == shape and t.stride(-1) != 1 and t.is_contiguous()
    return t


@pytest.mark.parametrize("shape", [(7, 1), (3, 5, 1)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", KINDS)
def test_n1_column_stride(dev_backend, kind, shape):
    """Hidden size 1 whose column stride is not 1 (x and residual): the stride is never
    stepped, so it must not matter (the C++ kernels raised)."""
    device, _ = dev_backend
    check(kind, "silu", shape, torch.float32, torch.float32, device, x_view=_n1_column_strided(shape, device),
          r_view=_n1_column_strided(shape, device))


@pytest.mark.parametrize("kind", ["ln", "rms", "add_ln", "add_rms_"])
def test_stride0_dy(dev_backend, kind):
    """dy from .sum() is an expanded scalar (all strides 0): read as is, never wrongly."""
    device, _ = dev_backend
    n = 97
    x = torch.randn(3, 4, n, device=device)
    r = torch.randn(3, 4, n, device=device)
    w, b = torch.rand(n, device=device) + 0.5, torch.randn(n, device=device)
    grads = []
    for fn in (_ours, _eager):
        ts = [t.clone().requires_grad_() for t in (x, r, w, b)]
        rin = ts[1] * 1 if kind.endswith("_") else ts[1]
        y, _ = fn(kind, ts[0], rin, ts[2], ts[3], 1e-5, "gelu")
        y.sum().backward()
        grads.append([t.grad for t in ts])
    for name, o, e in zip(["dx", "dr", "dw", "db"], *grads):
        if e is None:
            assert o is None
            continue
        torch.testing.assert_close(o, e, rtol=1e-4, atol=1e-5, msg=name)


def test_inplace_residual_semantics(dev_backend):
    device, _ = dev_backend
    x = torch.randn(4, 5, 64, device=device)
    base = torch.randn(4, 5, 64, device=device)
    for make in (lambda: base.clone(), lambda: base.clone().transpose(0, 1).contiguous().transpose(0, 1)):
        r = make()
        x0 = x.clone()
        y, s = fusedops.add_rms_norm_act(x, r, torch.ones(64, device=device), 1e-6, "relu", inplace=True)
        assert s is r, "in place: the returned s is the residual buffer itself"
        torch.testing.assert_close(r, x0 + base)
        assert torch.equal(x, x0), "x must not be written"
        y_ref, _ = _eager("add_rms", x0, base, torch.ones(64, device=device), None, 1e-6, "relu")
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    # out-of-place leaves the residual alone
    r = base.clone()
    y, s = fusedops.add_layer_norm_act(x, r, None, None, 1e-5, "identity")
    assert torch.equal(r, base) and s.data_ptr() != r.data_ptr()


def test_backward_deterministic(dev_backend):
    device, _ = dev_backend
    x = torch.randn(37, 300, device=device, requires_grad=True)
    w = (torch.rand(300, device=device) + 0.5).requires_grad_()
    b = torch.randn(300, device=device, requires_grad=True)
    dy = torch.randn(37, 300, device=device)
    out = []
    for _ in range(2):
        x.grad = w.grad = b.grad = None
        fusedops.layer_norm_act(x, w, b, 1e-5, "gelu_tanh").backward(dy)
        out.append((x.grad.clone(), w.grad.clone(), b.grad.clone()))
    for a, c in zip(*out):
        assert torch.equal(a, c)


def test_gradcheck_fp64_reference():
    """float64 runs the eager reference (with a FallbackWarning): gradcheck its analytic
    backward (norm_act_backward's spec) against finite differences."""
    torch.manual_seed(0)
    n = 7
    x = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(n, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(n, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fusedops.FallbackWarning)
        for act in ACTS:
            if act == "relu":
                continue  # kink at 0: finite differences are unreliable
            assert torch.autograd.gradcheck(lambda x, w, b: fusedops.layer_norm_act(x, w, b, 1e-5, act), (x, w, b))
            assert torch.autograd.gradcheck(lambda x, w: fusedops.rms_norm_act(x, w, 1e-6, act), (x, w))
            assert torch.autograd.gradcheck(
                lambda x, r, w, b: fusedops.add_layer_norm_act(x, r, w, b, 1e-5, act), (x, r, w, b))
            assert torch.autograd.gradcheck(lambda x, r, w: fusedops.add_rms_norm_act(x, r, w, 1e-6, act), (x, r, w))


def test_fp64_warns_and_matches_reference():
    x = torch.randn(3, 10, dtype=torch.float64)
    from fusedops import _backend
    _backend._warned.clear()  # the warning is issued once per reason
    with pytest.warns(fusedops.FallbackWarning, match="float64"):
        y = fusedops.rms_norm_act(x, None, 1e-6, "silu")
    torch.testing.assert_close(y, F.silu(F.rms_norm(x, (10,), None, 1e-6)))


def _opcheck_args(device):
    n = 33
    x = torch.randn(4, n, device=device)
    r = torch.randn(4, n, device=device)
    w = torch.rand(n, device=device) + 0.5
    b = torch.randn(n, device=device)
    xg, wg, bg, rg = (t.clone().requires_grad_() for t in (x, w, b, r))
    y, mean, rstd = norm_ops.layer_norm_act_op(x, w, b, 1e-5, "gelu")
    return {
        "layer_norm_act": (norm_ops.layer_norm_act_op, (xg, wg, bg, 1e-5, "gelu")),
        "layer_norm_act bf16 fp32-out": (norm_ops.layer_norm_act_op,
                                         (x.bfloat16(), w, None, 1e-5, "silu", torch.float32)),
        "rms_norm_act": (norm_ops.rms_norm_act_op, (xg, wg, 1e-6, "gelu_tanh")),
        "add_layer_norm_act": (norm_ops.add_layer_norm_act_op, (xg, rg, wg, bg, 1e-5, "relu")),
        "add_rms_norm_act": (norm_ops.add_rms_norm_act_op, (xg, rg, None, 1e-6, "silu")),
        "add_layer_norm_act_": (norm_ops.add_layer_norm_act_inplace_op, (x, r.clone(), w, b, 1e-5, "gelu")),
        "add_rms_norm_act_": (norm_ops.add_rms_norm_act_inplace_op, (x, r.clone(), w, 1e-6, "identity")),
        "norm_act_backward": (norm_ops.norm_act_backward_op,
                              (torch.randn(4, n, device=device), x, w, b, mean, rstd, "gelu", None)),
        "norm_act_backward rms ds": (norm_ops.norm_act_backward_op,
                                     (torch.randn(4, n, device=device), x, w, None, None, rstd, "silu",
                                      torch.randn(4, n, device=device))),
    }


@pytest.mark.parametrize("name", list(_opcheck_args("cpu")))
def test_opcheck(dev_backend, name):
    device, _ = dev_backend
    op, args = _opcheck_args(device)[name]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("kind", KINDS)
def test_compile_functional(dev_backend, kind):
    device, _ = dev_backend
    torch._dynamo.reset()
    x = torch.randn(4, 6, 50, device=device)
    r = torch.randn(4, 6, 50, device=device)
    w, b = torch.rand(50, device=device) + 0.5, torch.randn(50, device=device)

    def f(x, r, w, b):
        rin = r * 1
        y, s = _ours(kind, x, rin, w, b, 1e-5, "gelu_tanh")
        return y if s is None else (y, s)

    expected = f(x, r, w, b)
    got = torch.compile(f, fullgraph=True, dynamic=False)(x, r, w, b)
    torch.testing.assert_close(got, expected)


def test_bad_inputs(dev_backend):
    device, _ = dev_backend
    x = torch.randn(3, 16, device=device)
    r = torch.randn(3, 16, device=device)
    r0 = r.clone()
    with pytest.raises(ValueError, match="weight"):
        fusedops.layer_norm_act(x, torch.ones(15, device=device), None)
    with pytest.raises(ValueError, match="bias"):
        fusedops.layer_norm_act(x, torch.ones(16, device=device), torch.ones(3, 16, device=device))
    with pytest.raises(ValueError, match="weight"):
        fusedops.rms_norm_act(x, torch.ones(16, device="meta"))
    with pytest.raises(TypeError, match="weight"):
        fusedops.rms_norm_act(x, torch.ones(16, device=device, dtype=torch.int32))
    with pytest.raises(TypeError, match="x"):
        fusedops.rms_norm_act(x.int(), None)
    with pytest.raises(ValueError, match="activation"):
        fusedops.layer_norm_act(x, None, None, 1e-5, "tanh")
    with pytest.raises(ValueError, match="residual"):
        fusedops.add_layer_norm_act(x, torch.randn(3, 15, device=device))
    with pytest.raises(TypeError, match="residual"):  # (functional: added in the promoted dtype)
        fusedops.add_rms_norm_act(x, r.half(), inplace=True)
    with pytest.raises(ValueError, match="weight"):
        fusedops.add_rms_norm_act(x, r, torch.ones(17, device=device), inplace=True)
    assert torch.equal(r, r0), "nothing written on bad input"
    with pytest.raises(ValueError, match="residual"):
        fusedops.add_rms_norm_act(x, torch.randn(1, 16, device=device).expand(3, 16), inplace=True)
    for fn in (fusedops.layer_norm_act, fusedops.rms_norm_act):
        with pytest.raises(ValueError, match="x must have at least one dimension"):
            fn(torch.tensor(1.0, device=device))
    with pytest.raises(ValueError, match="x must have at least one dimension"):
        fusedops.add_layer_norm_act(torch.tensor(1.0, device=device), torch.tensor(1.0, device=device))


def check_out_dtype(kind, act, shape, out_dtype, device, dy_expanded=False):
    """An fp32 x with y (and dy) in a 16-bit out_dtype against eager's fp32 y cast to
    out_dtype (what an nn.Linear under autocast does with it): y as eager's then cast, and
    the gradients as eager's given the 16-bit dy (the cast's backward widens it exactly);
    an fp64 reference for the 2x-eager-error rule. dy_expanded: a stride-0 dy (from .sum())."""
    n = shape[-1]
    eps = 1e-5
    x, r = torch.randn(shape, device=device), torch.randn(shape, device=device)
    w = torch.rand(n, device=device) + 0.5
    b = 0.5 * torch.randn(n, device=device) if "ln" in kind else None
    dy = torch.randn(shape, device=device).to(out_dtype)
    if dy_expanded:
        dy = torch.randn(n, device=device).to(out_dtype).expand(shape)
    dsg = torch.randn(shape, device=device)
    is_add = kind.startswith("add")

    def leaves(dt):
        return [None if t is None else t.detach().to(dt).clone().requires_grad_() for t in (x, r, w, b)]

    ours, _ = _run(kind, _ours, leaves(torch.float32), eps, act, dy, dsg, inplace=kind.endswith("_"),
                   out_dtype=out_dtype)
    eager, _ = _run(kind, _eager, leaves(torch.float32), eps, act, dy, dsg)
    ref, _ = _run(kind, _eager, leaves(torch.float64), eps, act, dy, dsg, s_dtype=torch.float32)
    eager[0] = eager[0].to(out_dtype)
    assert ours[0].dtype == out_dtype, f"y is {ours[0].dtype}, asked for {out_dtype}"
    for name, o, e, f in zip(["y", "s", "dx", "dresidual", "dweight", "dbias"], ours, eager, ref):
        if f is None or (name in ("s", "dresidual") and not is_add):
            continue
        assert o is not None and o.dtype == (out_dtype if name == "y" else torch.float32), name
        atol = _dx_atol(x, r, w, dy, eps, is_add) if name in ("dx", "dresidual") else 1e-6
        tol = _tol(torch.float32) * (max(1, shape[0]) if name in ("dweight", "dbias") else 1)
        assert_close_rule(o, e, f, rtol=tol, atol=atol, name=f"{kind}/{act}/{out_dtype}/{name}")


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_16bit_out_of_fp32_x_matches_eager_then_cast(dev_backend, kind, out_dtype):
    """y in fp16 / bf16 for an fp32 x (out_dtype): every kind, odd and packet-aligned rows,
    empty and 3-D inputs, a stride-0 dy."""
    device, _ = dev_backend
    for shape in [(5, 123), (37, 256), (0, 64), (2, 3, 64)]:
        check_out_dtype(kind, "gelu_tanh", shape, out_dtype, device)
    check_out_dtype(kind, "silu", (6, 64), out_dtype, device, dy_expanded=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shape", [(300, 768), (1000, 1024), (64, 2048), (77, 4096), (33, 8192), (9, 12008),
                                   (40, 16384), (3, 20000)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_16bit_out_of_fp32_x(backend, shape):
    """The GPU paths with an fp32 x and a 16-bit y / dy: the warp and block forwards, the
    backward's shared-memory ring at every row shape (several row groups a block, one row a
    block, the cluster of two blocks past N = 8192), and the streaming kernels (N = 20000)."""
    require("cuda", backend)
    with fusedops.use_backend(backend):
        check_out_dtype("ln", "gelu_tanh", shape, torch.bfloat16, "cuda")
        check_out_dtype("add_rms", "silu", shape, torch.float16, "cuda")
        check_out_dtype("add_ln_", "relu", shape, torch.bfloat16, "cuda")


def test_out_dtype_is_checked():
    x = torch.randn(4, 32)
    for bad in (torch.int32, "bfloat16", torch.bool):
        with pytest.raises(TypeError, match="out_dtype"):
            fusedops.layer_norm_act(x, out_dtype=bad)
        with pytest.raises(TypeError, match="out_dtype"):
            fusedops.add_rms_norm_act(x, x.clone(), out_dtype=bad)


def test_cpu_autocast_matches_eager():
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    w, b = torch.rand(64) + 0.5, torch.randn(64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fusedops.layer_norm_act(x, w, b, 1e-5, "gelu")
        eager = F.gelu(F.layer_norm(x, (64,), w, b, 1e-5))
        ours_r = fusedops.rms_norm_act(x.float(), w, None, "silu")
        eager_r = F.silu(F.rms_norm(x.float(), (64,), w))
    assert ours.dtype == eager.dtype and ours_r.dtype == eager_r.dtype
    torch.testing.assert_close(ours.float(), eager.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours_r, eager_r, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_autocast_matches_eager(backend):
    require("cuda", backend)
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    w = (torch.rand(256, device="cuda") + 0.5).requires_grad_()
    b = torch.randn(256, device="cuda", requires_grad=True)
    with fusedops.use_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16):
        ours = fusedops.layer_norm_act(x, w, b, 1e-5, "gelu_tanh")
        eager = F.gelu(F.layer_norm(x, (256,), w, b, 1e-5), approximate="tanh")
        ours_a, s = fusedops.add_rms_norm_act(x, r, w, None, "silu")
        eager_a = F.silu(F.rms_norm(x + r, (256,), w))
    assert ours.dtype == eager.dtype == torch.float32
    assert ours_a.dtype == eager_a.dtype and s.dtype == torch.bfloat16
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-5)
    # fp32 out where this torch's autocast casts rms_norm; else bf16 (ours rounds once from
    # fp32, eager's composite may round earlier: one or two bf16 steps apart)
    tol = 1e-5 if ours_a.dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(ours_a, eager_a, rtol=tol, atol=tol)
    g1 = torch.autograd.grad(ours.sum(), (x, w, b))
    g2 = torch.autograd.grad(eager.sum(), (x, w, b))
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind", ["add_ln_", "add_rms_", "ln", "add_rms"])
def test_compile_functional_with_grad(dev_backend, kind):
    device, _ = dev_backend
    torch._dynamo.reset()
    x = torch.randn(4, 6, 50, device=device)
    r = torch.randn(4, 6, 50, device=device)
    w, b = torch.rand(50, device=device) + 0.5, torch.randn(50, device=device)

    def f(x, r, w, b):
        rin = r * 1
        y, s = _ours(kind, x, rin, w, b, 1e-5, "silu")
        return (y * y).sum() + (0 if s is None else (s * s).sum())

    grads = []
    for fn in (f, torch.compile(f, fullgraph=True, dynamic=False)):
        ts = [t.clone().requires_grad_() for t in (x, r, w, b)]
        fn(*ts).backward()
        grads.append([t.grad for t in ts])
    for a, c in zip(*grads):
        if a is None:
            assert c is None
        else:
            torch.testing.assert_close(c, a)


def test_mixed_weight_bias_dtypes(dev_backend):
    """weight and bias of different dtypes (neither x's): computed in fp32 all the same."""
    device, _ = dev_backend
    x = torch.randn(6, 200, device=device).bfloat16().requires_grad_()
    w = (torch.rand(200, device=device) + 0.5).half().requires_grad_()
    b = torch.randn(200, device=device, requires_grad=True)
    y = fusedops.layer_norm_act(x, w, b, 1e-5, "gelu")
    ref = F.gelu(F.layer_norm(x.double(), (200,), w.double(), b.double(), 1e-5))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2)
    gx, gw, gb = torch.autograd.grad(y.float().sum(), (x, w, b))
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    rx, rw, rb = torch.autograd.grad(F.gelu(F.layer_norm(xr, (200,), wr, br, 1e-5)).sum(), (xr, wr, br))
    assert (gx.dtype, gw.dtype, gb.dtype) == (torch.bfloat16, torch.float16, torch.float32)
    torch.testing.assert_close(gx.double(), rx, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gb.double(), rb, rtol=1e-4, atol=1e-4)


def test_bench_family_tiny(tmp_path):
    """`fusedops bench --ops norm` runs on a tiny CPU workload and counts bytes."""
    import json

    from fusedops.__main__ import main
    rc = main(["bench", "--device", "cpu", "--ops", "norm", "--sizes", "64", "--no-compile",
               "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["impl"] for r in rows} >= {"eager", "fusedops:cpp"}
    assert all(r["gbps"] and r["gbps"] > 0 for r in rows)


@pytest.mark.parametrize("backend", backend_params() + [pytest.param(("cpu", "reference"), id="cpu-reference")])
def test_one_dim_input_grads(backend):
    """A 1-D x (one row): dweight/dbias per element, as eager (not summed over the row)."""
    device, name = backend
    require(device, name)
    x = torch.randn(77, device=device, requires_grad=True)
    w = (torch.rand(77, device=device) + 0.5).requires_grad_()
    b = torch.randn(77, device=device, requires_grad=True)
    dy = torch.randn(77, device=device)
    with fusedops.use_backend(name):
        ours = torch.autograd.grad(fusedops.layer_norm_act(x, w, b, 1e-5, "gelu"), (x, w, b), dy)
    eager = torch.autograd.grad(F.gelu(F.layer_norm(x, (77,), w, b, 1e-5)), (x, w, b), dy)
    for o, e in zip(ours, eager):
        assert o.shape == (77,)
        torch.testing.assert_close(o, e, rtol=1e-4, atol=1e-5)


# ---- RMSNorm's default eps ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_rms_eps_none_matches_eager(dev_backend, dtype):
    """eps=None: the machine epsilon of the dtype F.rms_norm computes in (fp32 for fp16 /
    bf16 / fp32 input, fp64 for fp64), not of the input's dtype. Tiny activations make eps
    dominate (with bf16's eps the output is ~100x too small)."""
    device, _ = dev_backend
    torch.manual_seed(0)
    n = 64
    x = (torch.randn(5, n, device=device) * 1e-3).to(dtype)
    r = (torch.randn(5, n, device=device) * 1e-3).to(dtype)
    w = (torch.rand(n, device=device) + 0.5).to(dtype)
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    assert norm_ops._rms_eps(None, x) == torch.finfo(opmath).eps
    want = F.silu(F.rms_norm(x.double(), (n,), w.double(), torch.finfo(opmath).eps))  # fp64, eager's eps
    eager = F.silu(F.rms_norm(x, (n,), w))
    torch.testing.assert_close(eager.double(), want, rtol=2e-2, atol=1e-3)  # (the rule above is eager's)
    s = x + r
    want_s = F.silu(F.rms_norm(s.double(), (n,), w.double(), torch.finfo(opmath).eps))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fusedops.FallbackWarning)
        outs = [(fusedops.rms_norm_act(x, w, None, "silu"), want),
                (fusedops.rms_norm_act(x, w, activation="silu"), want),
                (torch.ops.fusedops.rms_norm_act(x, w, norm_ops._rms_eps(None, x), "silu")[0], want),
                (fusedops.add_rms_norm_act(x, r, w, None, "silu")[0], want_s),
                (fusedops.add_rms_norm_act(x, r.clone(), w, None, "silu", inplace=True)[0], want_s)]
        # torch.jit.trace writes the norm in torch ops: the same eps there
        traced = torch.jit.trace(lambda t: fusedops.rms_norm_act(t, w, None, "silu"), (x,), check_trace=False)
        assert "fusedops::" not in str(traced.graph)
        outs.append((traced(x), want))
    for got, ref in outs:
        assert got.dtype == dtype
        # fp64: eager is the reference itself (error 0), so the bound is a few ulps of the
        # output (another order of the same fp64 ops, e.g. CUDA's, differs by that much)
        assert_close_rule(got, eager if ref is want else F.silu(F.rms_norm(s, (n,), w)), ref,
                          atol=torch.finfo(dtype).eps, rtol=8 * torch.finfo(dtype).eps, name=str(dtype))


# ---- double backward (create_graph=True) ----------------------------------------------------

def _kind_fn(kind, act):
    """kind's function of (x, r?, w, b?) for gradgradcheck; the in-place kinds write into a
    copy of r made inside (a leaf r cannot be written with grad)."""
    if kind == "ln":
        return (lambda x, w, b: fusedops.layer_norm_act(x, w, b, 1e-5, act)), "xwb"
    if kind == "rms":
        return (lambda x, w: fusedops.rms_norm_act(x, w, 1e-6, act)), "xw"
    inplace = kind.endswith("_")
    if "ln" in kind:
        return (lambda x, r, w, b: fusedops.add_layer_norm_act(x, r * 1 if inplace else r, w, b, 1e-5, act,
                                                               inplace=inplace)), "xrwb"
    return (lambda x, r, w: fusedops.add_rms_norm_act(x, r * 1 if inplace else r, w, 1e-6, act,
                                                      inplace=inplace)), "xrw"


def _eager_fn(kind, act):
    """The same function in eager torch ops (the in-place kinds as eager's add_)."""
    def f(x, r=None, w=None, b=None):
        if kind.startswith("add"):
            s = r * 1
            s.add_(x)
        else:
            s = x
        n = x.shape[-1]
        z = F.layer_norm(s, (n,), w, b, 1e-5) if "ln" in kind else F.rms_norm(s, (n,), w, 1e-6)
        y = R.activation(z, act)
        return (y, s) if kind.startswith("add") else y
    return f


def _dd_inputs(seed=0):
    """x, r (3, 7), w, b (7,) in float64."""
    g = torch.Generator().manual_seed(seed)
    n = 7
    return {"x": torch.randn(3, n, generator=g, dtype=torch.float64),
            "r": torch.randn(3, n, generator=g, dtype=torch.float64),
            "w": torch.rand(n, generator=g, dtype=torch.float64) + 0.5,
            "b": torch.randn(n, generator=g, dtype=torch.float64)}


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind", KINDS)
def test_gradgradcheck_fp64(kind, act):
    """Second derivatives of the public functions (float64: the ops' autograd path and, for
    the in-place kinds, the in-place Function) against finite differences."""
    fn, args = _kind_fn(kind, act)
    ts = _dd_inputs()
    inputs = tuple(ts[a].requires_grad_() for a in args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fusedops.FallbackWarning)
        assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("rms", [False, True])
def test_gradgradcheck_fast_function_fp64(rms, residual, act):
    """The host-time fast path's Function (_NormActFast), run in float64 through the
    reference forward and backward (its kernels are fp32/bf16/fp16 only), against finite
    differences: its create_graph backward."""
    x, r, w, b = (t.requires_grad_() for t in _dd_inputs(seed=1).values())
    kernels = (norm_ops._reference_forward, R.norm_act_backward)

    def f(x, r, w, b):
        return norm_ops._NormActFast.apply(x, r if residual else None, w, None if rms else b,
                                           (1e-5, act, torch.float64, rms, kernels))

    assert torch.autograd.gradgradcheck(f, (x, r, w, b))


def _penalty_grads(fn, kind, ts, dtype):
    """A gradient penalty: L = sum(y^2) (+ sum(s^3)), P = |dL/dx|^2 + |dL/dr|^2 + |dL/dw|^2, and
    dP/d(x, r, w, b) (None where the input is absent)."""
    args = "xrwb" if kind.startswith("add") else "xwb"
    if "rms" in kind:
        args = args.replace("b", "")
    leaves = {a: ts[a].to(dtype).requires_grad_() for a in args}
    out = fn(**leaves)
    y, s = out if isinstance(out, tuple) else (out, None)
    loss = y.square().sum() + (0 if s is None else s.pow(3).sum())
    first = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
    assert all(g.requires_grad for g in first)
    penalty = sum(g.square().sum() for g in first)
    # (materialised: an input that the penalty does not reach gets zeros, e.g. b with identity)
    return dict(zip(args, torch.autograd.grad(penalty, list(leaves.values()), materialize_grads=True))), y.detach()


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_penalty_matches_eager(dev_backend, kind, act):
    """Double backward through the public functions vs eager: float64 (the ops' autograd
    path) and float32 (the kernels' fast path, and the in-place Function), each against
    eager in float64."""
    device, _ = dev_backend
    ts = {k: v.to(device) for k, v in _dd_inputs(seed=2).items()}
    want, y_want = _penalty_grads(_eager_fn(kind, act), kind, ts, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fusedops.FallbackWarning)
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
            got, y = _penalty_grads(_kind_fn(kind, act)[0], kind, ts, dtype)
            torch.testing.assert_close(y.double(), y_want, rtol=tol, atol=tol)
            assert set(got) == set(want)
            for a in want:
                scale = want[a].abs().max().item() + 1
                torch.testing.assert_close(got[a].double(), want[a], rtol=tol, atol=tol * scale, msg=f"{a} {dtype}")


def test_double_backward_fp32_takes_fast_path():
    """The fp32 calls of test_gradient_penalty_matches_eager run through the fast path's
    Function (not the ops)."""
    x = torch.randn(3, 8, requires_grad=True)
    assert type(fusedops.layer_norm_act(x, None, None, 1e-5, "gelu").grad_fn).__name__ == "_NormActFastBackward"
    y, s = fusedops.add_rms_norm_act(x, torch.randn(3, 8), None, 1e-5, "gelu")
    assert type(y.grad_fn).__name__ == "_NormActFastBackward"


# ---- only s used: no gradient for weight / bias -----------------------------------------------

@pytest.mark.parametrize("path", ["fast", "op", "inplace", "fp64"])
@pytest.mark.parametrize("rms", [False, True])
def test_only_s_used_leaves_param_grads_none(dev_backend, rms, path):
    """y unused: the norm's backward does not run, as in eager (s = x + r; norm(s)):
    weight.grad and bias.grad stay None and x (and the residual) get ds itself."""
    device, _ = dev_backend
    dtype = torch.float64 if path == "fp64" else torch.float32
    x = torch.randn(4, 16, device=device, dtype=dtype, requires_grad=True)
    rl = torch.randn(4, 16, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(16, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(16, device=device, dtype=dtype, requires_grad=True)
    ds = torch.randn(4, 16, device=device, dtype=dtype)
    r = rl * 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fusedops.FallbackWarning)
        if path == "op":
            out = (torch.ops.fusedops.add_rms_norm_act(x, r, w, 1e-5, "gelu") if rms
                   else torch.ops.fusedops.add_layer_norm_act(x, r, w, b, 1e-5, "gelu"))
            s = out[1]
        elif rms:
            _, s = fusedops.add_rms_norm_act(x, r, w, 1e-5, "gelu", inplace=path == "inplace")
        else:
            _, s = fusedops.add_layer_norm_act(x, r, w, b, 1e-5, "gelu", inplace=path == "inplace")
        s.backward(ds)
    assert w.grad is None and b.grad is None
    assert torch.equal(x.grad, ds) and torch.equal(rl.grad, ds)


def test_backward_op_outputs_do_not_require_grad():
    """fusedops::norm_act_backward is not differentiable: its outputs never require grad (a
    backward through them fails with autograd's own error, not silently; second-order
    gradients come from the functions and modules under create_graph=True, tested above)."""
    x = torch.randn(3, 8)
    w = torch.randn(8, requires_grad=True)
    _, mean, rstd = norm_ops.layer_norm_act_op(x, w.detach(), None, 1e-5, "gelu", None)
    dy = torch.randn(3, 8, requires_grad=True)
    dx, dw, _ = norm_ops.norm_act_backward_op(dy, x, w, None, mean, rstd, "gelu")
    assert not dx.requires_grad and not dw.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        (dx.sum() + dw.sum()).backward()
