"""fusedops.add_ / foreach_add_ against eager x.add_(y, alpha) and torch._foreach_add_.

x is both input and output, so instead of poisoning it every test draws fresh random x
and y: an element a kernel skips keeps its old value and fails the comparison."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedops
from helpers import assert_close_rule, backend_params, require

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [0, 1, 7, 1023, 4097, 2**20 + 3]


@pytest.fixture(params=backend_params())
def dev_backend(request):
    device, backend = request.param
    require(device, backend)
    with fusedops.use_backend(backend):
        yield device, backend


def _product_ulp(y, alpha):
    """One fp32 rounding of alpha*y: eager fuses x + alpha*y into one FMA where the machine
    has one, a kernel may round the product first (baseline x86-64 has no FMA)."""
    return torch.finfo(torch.float32).eps * abs(alpha) * (y.double().abs().max().item() if y.numel() else 0.0)


def check_add(x, y, alpha, label=""):
    """Run fusedops.add_ on x and compare with eager on a copy and with an fp64 reference."""
    eager = x.clone()
    eager.add_(y, alpha=alpha)
    ref = x.double() + alpha * y.double()
    ours = x
    fusedops.add_(ours, y, alpha)
    assert_close_rule(ours, eager, ref, rtol=torch.finfo(x.dtype).eps, atol=_product_ulp(y, alpha),
                      name=f"add_ {label}")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("ydtype", DTYPES, ids=str)
@pytest.mark.parametrize("xdtype", DTYPES, ids=str)
def test_add_dtypes_sizes(dev_backend, xdtype, ydtype, size):
    device, _ = dev_backend
    x = torch.randn(size, device=device).to(xdtype)
    y = torch.randn(size, device=device).to(ydtype)
    check_add(x, y, 0.75, f"{xdtype}/{ydtype} n={size}")


@pytest.mark.parametrize("alpha", [1.0, -1.0, 2.5, 0.0])
def test_add_alpha(dev_backend, alpha):
    device, _ = dev_backend
    x = torch.randn(3, 1000, device=device)
    y = torch.randn(3, 1000, device=device)
    check_add(x, y, alpha)


@pytest.mark.parametrize("yshape", [(1,), (), (37,), (1, 37), (5, 37), (1, 1, 37), (3, 1, 37), (3, 5, 1), (1, 5, 1)],
                         ids=str)
@pytest.mark.parametrize("xdtype", DTYPES, ids=str)
def test_add_broadcast(dev_backend, xdtype, yshape):
    device, _ = dev_backend
    x = torch.randn(3, 5, 37, device=device).to(xdtype)
    y = torch.randn(yshape, device=device)
    check_add(x, y, 1.5, f"y {yshape}")


def test_add_row_vector_large(dev_backend):
    """A bias-like row added to many rows, with a row length that is not a multiple of 8."""
    device, _ = dev_backend
    x = torch.randn(300, 1001, device=device, dtype=torch.bfloat16)
    y = torch.randn(1001, device=device, dtype=torch.float32)
    check_add(x, y, 1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_alias(dev_backend, dtype):
    device, _ = dev_backend
    x = torch.randn(4097, device=device).to(dtype)
    eager = x.clone()
    eager.add_(eager, alpha=0.5)
    ref = x.double() * 1.5
    atol = _product_ulp(x, 0.5)
    fusedops.add_(x, x, 0.5)
    assert_close_rule(x, eager, ref, rtol=torch.finfo(dtype).eps, atol=atol)


@pytest.mark.parametrize("layout", ["transposed", "strided", "channels_last", "offset"])
def test_add_noncontiguous_x(dev_backend, layout):
    device, _ = dev_backend
    base = torch.randn(6, 7, 9, 11, device=device)
    if layout == "transposed":
        x = base.transpose(1, 3)
    elif layout == "strided":
        x = base[:, ::2, :, 1::3]
    elif layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    else:
        x = base.view(-1)[1:]
    untouched = base.clone()
    y = torch.randn(x.shape, device=device)
    if layout != "offset":
        mask = torch.ones_like(base, dtype=torch.bool)
        mask_view = mask.transpose(1, 3) if layout == "transposed" else (
            mask[:, ::2, :, 1::3] if layout == "strided" else mask)
        mask_view.fill_(False)
    else:
        mask = torch.zeros_like(base, dtype=torch.bool)
        mask.view(-1)[0] = True
    check_add(x, y, 2.0, layout)
    # elements outside the view are not touched
    assert torch.equal(base[mask], untouched[mask])


def test_add_noncontiguous_y(dev_backend):
    device, _ = dev_backend
    x = torch.randn(40, 33, device=device, dtype=torch.float16)
    y = torch.randn(33, 40, device=device).t()
    check_add(x, y, 1.0)
    y_row = torch.randn(33, 2, device=device)[:, 1]  # a strided row vector
    check_add(x, y_row, -1.0)
    y_expanded = torch.randn(1, 33, device=device).expand(40, 33)  # stride-0
    check_add(x, y_expanded, 1.0)


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), keep=st.integers(0, 4),
       ones=st.integers(0, 15), alpha=st.floats(-4, 4, allow_nan=False))
def test_add_fuzz_broadcast(shape, keep, ones, alpha):
    """y = any broadcastable shape of x's: a suffix with some dims set to 1."""
    ysh = [1 if (ones >> i) & 1 else s for i, s in enumerate(shape[len(shape) - min(keep, len(shape)):])]
    x = torch.randn(shape)
    y = torch.randn(ysh)
    check_add(x, y, alpha, f"x {shape} y {ysh}")


def test_add_float64_falls_back_with_warning():
    x = torch.randn(100, dtype=torch.float64)
    y = torch.randn(100, dtype=torch.float64)
    expected = x.clone().add_(y, alpha=3.0)
    fusedops._backend._warned.clear()
    with pytest.warns(fusedops.FallbackWarning, match="float64"):
        fusedops.add_(x, y, 3.0)
    assert torch.equal(x, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time it is silent: once per reason
        fusedops.add_(x, y, 3.0)


# ---- bad input: a clear error and x untouched ---------------------------------------------

def _expect_error(exc, match, x, *args, fn=fusedops.add_):
    before = x.clone()
    with pytest.raises(exc, match=match):
        fn(x, *args)
    assert torch.equal(x, before), "x was modified by a call that raised"


def test_add_rejects_bad_input():
    x = torch.randn(4, 5)
    _expect_error(ValueError, "cannot be broadcast", x, torch.randn(4))
    _expect_error(ValueError, "cannot be broadcast", x, torch.randn(2, 4, 5))
    _expect_error(TypeError, "y must be a floating-point", x, torch.ones(4, 5, dtype=torch.int32))
    _expect_error(TypeError, "x must be a floating-point", torch.ones(4, 5, dtype=torch.int64), torch.randn(4, 5))
    _expect_error(TypeError, "y must be a torch.Tensor", x, 3.0)
    with pytest.raises(ValueError, match="expanded view"):
        fusedops.add_(torch.randn(1, 5).expand(4, 5), torch.randn(4, 5))


def test_add_refuses_inputs_that_require_grad():
    w = torch.randn(5, requires_grad=True)
    h = w * 2
    y = torch.randn(5, requires_grad=True)
    for x, yy in ((h, torch.randn(5)), (torch.randn(5), y)):
        before = x.detach().clone()
        with pytest.raises(RuntimeError, match="not differentiable"):
            fusedops.add_(x, yy)
        assert torch.equal(x.detach(), before)
    with pytest.raises(RuntimeError, match="not differentiable"):
        fusedops.foreach_add_([torch.randn(3)], [y[:3]])
    with torch.no_grad():  # the intended use: no graph to record
        fusedops.add_(h, y)
        fusedops.foreach_add_([h], [y])


def test_inplace_ops_bump_version_counters():
    """A tensor saved for backward and then modified in place must fail in backward, as
    with eager in-place ops — not give a silently wrong gradient."""
    w = torch.randn(5, requires_grad=True)
    x = torch.randn(5)
    out = (w * x).sum()  # saves x
    v = x._version
    fusedops.add_(x, torch.randn(5))
    assert x._version > v
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()
    xs = [torch.randn(3), torch.randn(4)]
    vs = [t._version for t in xs]
    fusedops.foreach_add_(xs, [torch.randn(3), torch.randn(4)])
    assert all(t._version > v for t, v in zip(xs, vs))


def test_eager_fast_path_and_dispatch_modes():
    """Plain eager calls run the kernel directly (no dispatcher round trip); under a
    dispatch mode the call goes through the fusedops op, so the mode sees it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x, y = torch.randn(6), torch.randn(6)
    expected = x + y
    with Record():
        fusedops.add_(x, y)
        fusedops.foreach_add_([x], [y])
    assert "fusedops.add_.default" in seen and "fusedops.foreach_add_.default" in seen, seen
    assert not any(name.startswith("fusedops_C.") for name in seen), seen
    torch.testing.assert_close(x, expected + y)


def test_add_rejects_partial_overlap():
    base = torch.randn(10)
    _expect_error(ValueError, "partly overlaps", base[:9], base[1:])
    _expect_error(ValueError, "partly overlaps", base.view(2, 5), base[:5])


def test_add_rejects_device_mismatch_on_meta():
    # a CPU x with a meta y dispatches to the fake kernel, which runs the same checks
    with pytest.raises(ValueError, match="y is on meta but x is on cpu"):
        fusedops.add_(torch.randn(3), torch.randn(3, device="meta"))


@pytest.mark.gpu
def test_add_rejects_device_mismatch_cuda():
    x = torch.randn(8, device="cuda")
    _expect_error(ValueError, "y is on cpu but x is on cuda", x, torch.randn(8))
    _expect_error(ValueError, "y is on cuda:0 but x is on cpu", torch.randn(8), x)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        with fusedops.use_backend("fast"):
            pass


def test_forced_backend_reaches_other_threads():
    # autograd runs CUDA backward ops on its own threads: the forced backend must be seen there
    import threading
    from fusedops import _backend
    seen = []
    with fusedops.use_backend("reference"):
        t = threading.Thread(target=lambda: seen.append(_backend.current_backend()))
        t.start()
        t.join()
    seen.append(_backend.current_backend())
    assert seen == ["reference", _backend._ENV_FORCED or "auto"]


def test_size_dependent_cuda_default(monkeypatch):
    from fusedops import _backend
    k = _backend.Kernels("test_sized_op", cuda_default="triton", cuda_default_upto=("cuda", 2048))
    try:
        monkeypatch.setattr(_backend, "available", lambda name, device_type: True)
        assert k.backend_for("cuda", 768) == "cuda" and k.backend_for("cuda", 2048) == "cuda"
        assert k.backend_for("cuda", 4096) == "triton" and k.backend_for("cuda") == "triton"
        assert k.backend_for("cpu", 768) == "cpp"
        with fusedops.use_backend("triton"):
            assert k.backend_for("cuda", 768) == "triton"
    finally:
        del _backend.REGISTRY["test_sized_op"]


def test_forced_backend_that_cannot_run_raises(monkeypatch):
    from fusedops import _triton
    monkeypatch.setattr(_triton, "can_run", lambda device_type: False)
    from fusedops.ops.add import _add
    _add._chosen.clear()
    try:
        with fusedops.use_backend("triton"):
            with pytest.raises(RuntimeError, match="backend 'triton' was asked for"):
                fusedops.add_(torch.randn(3), torch.randn(3))
    finally:
        _add._chosen.clear()


def test_reference_backend_is_eager():
    x = torch.randn(3, 7)
    y = torch.randn(7)
    expected = x.clone().add_(y, alpha=-2.0)
    with fusedops.use_backend("reference"):
        assert fusedops.backend_for("add_", "cpu") == "reference"
        fusedops.add_(x, y, -2.0)
    assert torch.equal(x, expected)


def test_default_backends():
    with fusedops.use_backend("auto"):
        if fusedops._backend.available("cpp", "cpu"):
            assert fusedops.backend_for("add_", "cpu") == "cpp"
        if torch.cuda.is_available():
            assert fusedops.backend_for("add_", "cuda") == "cuda"


# ---- foreach_add_ ---------------------------------------------------------------------------

# A transformer's parameter shapes (GPT-2-like, scaled down so the interpreter stays quick).
def _param_shapes(layers=4, d=48, vocab=301, ctx=64):
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


def check_foreach(xs, ys, alpha):
    eager = [x.clone() for x in xs]
    torch._foreach_add_(eager, ys, alpha=alpha)
    refs = [x.double() + alpha * y.double() for x, y in zip(xs, ys)]
    fusedops.foreach_add_(xs, ys, alpha)
    for i, (x, e, r) in enumerate(zip(xs, eager, refs)):
        assert_close_rule(x, e, r, rtol=torch.finfo(x.dtype).eps, atol=_product_ulp(ys[i], alpha),
                          name=f"foreach_add_ pair {i}")


@pytest.mark.parametrize("ydtype", DTYPES, ids=str)
@pytest.mark.parametrize("xdtype", DTYPES, ids=str)
def test_foreach_transformer_shapes(dev_backend, xdtype, ydtype):
    device, _ = dev_backend
    shapes = _param_shapes()
    xs = [torch.randn(s, device=device).to(xdtype) for s in shapes]
    ys = [torch.randn(s, device=device).to(ydtype) for s in shapes]
    check_foreach(xs, ys, 0.5)


def test_foreach_odd_sizes_and_edge_cases(dev_backend):
    device, _ = dev_backend
    sizes = [0, 1, 7, 1023, 4097, 2**17 + 3, 0, 5]
    xs = [torch.randn(n, device=device) for n in sizes]
    ys = [torch.randn(n, device=device) for n in sizes]
    xs[3] = torch.randn(2 * 1023 + 1, device=device)[1::2]        # non-contiguous x
    ys[4] = torch.randn(4097 * 2, device=device)[::2]              # non-contiguous y
    ys[5] = xs[5]                                                  # x += alpha * x
    xs[6] = torch.randn(3, 3, device=device, dtype=torch.float64)   # a float64 pair: reference
    ys[6] = torch.randn(3, 3, device=device, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fusedops.FallbackWarning)
        check_foreach(xs, ys, -1.25)


def test_foreach_mixed_dtype_groups(dev_backend):
    device, _ = dev_backend
    xs = [torch.randn(100 + i, device=device).to(DTYPES[i % 3]) for i in range(9)]
    ys = [torch.randn(100 + i, device=device).to(DTYPES[(i // 3) % 3]) for i in range(9)]
    check_foreach(xs, ys, 1.0)


def test_foreach_empty_list():
    fusedops.foreach_add_([], [], 2.0)


def test_foreach_rejects_bad_input():
    xs = [torch.randn(4), torch.randn(4)]
    before = [x.clone() for x in xs]
    cases = [
        (ValueError, "xs has 2 tensors but ys has 1", [torch.randn(4)]),
        (ValueError, r"ys\[1\] has shape \(5,\)", [torch.randn(4), torch.randn(5)]),
        (TypeError, r"ys\[1\] must be a floating-point", [torch.randn(4), torch.ones(4, dtype=torch.int8)]),
        (ValueError, r"ys\[1\] overlaps xs\[0\]", [torch.randn(4), xs[0]]),
    ]
    for exc, match, ys in cases:
        with pytest.raises(exc, match=match):
            fusedops.foreach_add_(xs, ys)
        assert all(torch.equal(a, b) for a, b in zip(xs, before)), f"xs modified by a call that raised ({match})"
    with pytest.raises(ValueError, match=r"xs\[1\] overlaps xs\[0\]"):
        fusedops.foreach_add_([xs[0], xs[0]], [torch.randn(4), torch.randn(4)])
    assert all(torch.equal(a, b) for a, b in zip(xs, before))


def test_foreach_rejects_partial_overlaps_across_pairs(dev_backend):
    device, _ = dev_backend
    buf = torch.randn(100, device=device)
    before = buf.clone()
    with pytest.raises(ValueError, match=r"xs\[1\] overlaps xs\[0\]"):
        fusedops.foreach_add_([buf[:60], buf[50:]], [torch.randn(60, device=device), torch.randn(50, device=device)])
    with pytest.raises(ValueError, match=r"ys\[1\] overlaps xs\[0\]"):
        fusedops.foreach_add_([buf[:50], torch.randn(20, device=device)], [torch.randn(50, device=device), buf[40:60]])
    assert torch.equal(buf, before)
    # slices side by side of one buffer are fine (a flat gradient buffer)
    xs = [buf[:30], buf[30:31], buf[31:]]
    check_foreach(xs, [torch.randn_like(x) for x in xs], 2.0)


def test_foreach_triton_without_extension(monkeypatch):
    """The Triton path builds its table in Python when fusedops._C is missing."""
    from fusedops import _backend, _native
    if not _backend.available("triton", "cpu"):
        pytest.skip("Triton cannot run on CPU tensors here")
    monkeypatch.setattr(_native, "ops", None)
    xs = [torch.randn(n) for n in (5, 3000, 1)]
    ys = [torch.randn(n) for n in (5, 3000, 1)]
    with fusedops.use_backend("triton"):
        check_foreach(xs, ys, 0.5)
        check_foreach([xs[0], xs[1]], [xs[0], ys[1].bfloat16()], 1.0)  # mixed: general path


# ---- op contract: opcheck and torch.compile -------------------------------------------------

def test_opcheck_add():
    for x, y, alpha in [(torch.randn(5, 7), torch.randn(5, 7), 2.0), (torch.randn(3, 9), torch.randn(9), 1.0),
                        (torch.randn(4, 6).t(), torch.randn(6, 4), -0.5),
                        (torch.randn(8, dtype=torch.bfloat16), torch.randn(8), 1.0)]:
        torch.library.opcheck(torch.ops.fusedops.add_.default, (x, y, alpha))


def test_opcheck_foreach_add():
    xs = [torch.randn(5), torch.randn(2, 3), torch.randn(4, dtype=torch.float16)]
    ys = [torch.randn(5), torch.randn(2, 3), torch.randn(4)]
    torch.library.opcheck(torch.ops.fusedops.foreach_add_.default, (xs, ys, 0.5))


def test_compiled_function_matches_eager():
    """A residual + gradient-accumulation style function, compiled with fullgraph=True."""
    def step(h, r, grads, acc):
        fusedops.add_(h, r, 1.0)
        fusedops.foreach_add_(acc, grads, 0.25)
        return h * 2

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    h, r = torch.randn(16, 33), torch.randn(33)
    grads = [torch.randn(7), torch.randn(3, 5)]
    acc = [torch.randn(7), torch.randn(3, 5)]
    h2, acc2 = h.clone(), [a.clone() for a in acc]
    out = compiled(h, r, grads, acc)
    expected = step(h2, r, grads, acc2)
    assert torch.allclose(out, expected)
    assert torch.allclose(h, h2)
    assert all(torch.allclose(a, b) for a, b in zip(acc, acc2))


# ---- GPU-only: launches and streams ---------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_foreach_is_one_launch(backend):
    shapes = _param_shapes(layers=12, d=768, vocab=50257, ctx=1024)
    xs = [torch.randn(s, device="cuda") for s in shapes]
    ys = [torch.randn(s, device="cuda") for s in shapes]
    with fusedops.use_backend(backend):
        fusedops.foreach_add_(xs, ys)  # warm-up (Triton compiles here)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fusedops.foreach_add_(xs, ys)
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "foreach_add" in e.name]
    assert len(kernels) == 1, [e.name for e in kernels]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_add_runs_on_current_stream(backend):
    x = torch.randn(1 << 20, device="cuda")
    y = torch.randn(1 << 20, device="cuda")
    expected = x + y
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with fusedops.use_backend(backend), torch.cuda.stream(s):
        torch.cuda._sleep(10_000_000)  # keep the side stream busy: a launch elsewhere would race
        fusedops.add_(x, y)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(x, expected)


@pytest.mark.gpu
def test_cuda_backend_is_graph_capturable():
    """The CUDA C++ kernels need no host sync and no host-to-device copy (the foreach
    table travels as a kernel parameter), so a CUDA graph can capture them."""
    x = torch.randn(1000, device="cuda")
    y = torch.randn(1000, device="cuda")
    xs = [torch.randn(n, device="cuda") for n in (5, 70000, 3)]
    ys = [torch.randn(n, device="cuda") for n in (5, 70000, 3)]
    with fusedops.use_backend("cuda"):
        fusedops.add_(x, y)  # warm-up outside the capture
        fusedops.foreach_add_(xs, ys)
        torch.cuda.synchronize()
        start_x, start_xs = x.clone(), [t.clone() for t in xs]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fusedops.add_(x, y, 0.5)
            fusedops.foreach_add_(xs, ys, 2.0)
        x.copy_(start_x)
        for t, s in zip(xs, start_xs):
            t.copy_(s)
        graph.replay()
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(x, start_x + y, rtol=1e-6, atol=1e-6)
    for t, s, yy in zip(xs, start_xs, ys):
        torch.testing.assert_close(t, s + 4 * yy, rtol=1e-6, atol=1e-6)


# ---- review fixes: overlap rule, low-precision alpha, devices, version counters ---------------

def _on_copies(buf, views, fn_ours, fn_eager):
    """Run fusedops on views of buf and eager on the same views of a clone; the whole
    buffers must be bitwise equal (elements outside the views included)."""
    eager_buf = buf.clone()
    fn_eager(*views(eager_buf))
    fn_ours(*views(buf))
    assert torch.equal(buf, eager_buf)


@pytest.mark.parametrize("case", ["columns", "even_odd", "rows_of_columns"])
def test_add_disjoint_interleaved_views_like_eager(case):
    """Strided views of one buffer that share no element are valid input (eager accepts
    them): only a certain partial overlap of dense tensors raises."""
    views = {"columns": lambda b: (b.view(4, 10)[:, 0], b.view(4, 10)[:, 1]),
             "even_odd": lambda b: (b[::2], b[1::2]),
             "rows_of_columns": lambda b: (b.view(4, 10)[:, 2:5], b.view(4, 10)[:, 5:8])}[case]
    _on_copies(torch.randn(40), views, lambda x, y: fusedops.add_(x, y, 0.5),
               lambda x, y: x.add_(y, alpha=0.5))
    # foreach: the pair itself, and two interleaved columns written in one call
    _on_copies(torch.randn(40), views, lambda x, y: fusedops.foreach_add_([x], [y], 0.5),
               lambda x, y: torch._foreach_add_([x], [y], alpha=0.5))
    ones = torch.ones(views(torch.empty(40))[0].shape)
    _on_copies(torch.randn(40), views, lambda x, y: fusedops.foreach_add_([x, y], [ones, 2 * ones], 0.5),
               lambda x, y: torch._foreach_add_([x, y], [ones, 2 * ones], alpha=0.5))


@pytest.mark.parametrize("case", ["shifted", "same_view", "contiguous_x_strided_y"])
def test_add_truly_overlapping_strided_views_like_eager(case):
    """Strided views that do share elements (the check cannot decide, as eager's): the
    result is eager's, y read before x is written (a copy, not an aliasing kernel)."""
    views = {"shifted": lambda b: (b[0:40:2], b[2:42:2]),
             "same_view": lambda b: (b.view(8, 8)[:, 0], b.view(8, 8)[:, 0]),
             "contiguous_x_strided_y": lambda b: (b[0:20], b[0:40:2])}[case]
    _on_copies(torch.randn(64), views, lambda x, y: fusedops.add_(x, y, 0.5), lambda x, y: x.add_(y, alpha=0.5))
    _on_copies(torch.randn(64), views, lambda x, y: fusedops.foreach_add_([x], [y], 0.5),
               lambda x, y: torch._foreach_add_([x], [y], alpha=0.5))


def test_foreach_pairs_overlapping_through_strided_views_run_in_order():
    """Pair 1 reads what pair 0 writes (columns of one matrix): torch._foreach_add_ runs the
    pairs in order, so pair 1 must see pair 0's result (one launch would not)."""
    def views(b):
        m = b.view(6, 5)
        return m[:, 0], m[:, 1], m[:, 2]

    def ours(c0, c1, c2):
        fusedops.foreach_add_([c0, c1, c2], [c1, c0, torch.ones(6)], 0.5)

    def eager(c0, c1, c2):
        torch._foreach_add_([c0, c1, c2], [c1, c0, torch.ones(6)], alpha=0.5)

    _on_copies(torch.randn(30), views, ours, eager)


def test_dense_partial_overlaps_still_raise():
    base = torch.randn(20)
    before = base.clone()
    with pytest.raises(ValueError, match="y partly overlaps x"):
        fusedops.add_(base.view(4, 5)[1:3], base.view(4, 5)[2:4])
    with pytest.raises(ValueError, match=r"xs\[1\] overlaps xs\[0\]"):
        fusedops.foreach_add_([base[0:10], base[5:15]], [torch.ones(10), torch.ones(10)])
    with pytest.raises(ValueError, match=r"ys\[0\] overlaps xs\[1\]"):
        fusedops.foreach_add_([base[0:5], base[10:15]], [base[12:17], torch.ones(5)])
    assert torch.equal(base, before)


@pytest.mark.parametrize("n", [4096, 32 * 7])
@pytest.mark.parametrize("alpha", [0.3, 0.7, -1.3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_alpha_is_eagers_on_cpu(dtype, alpha, n):
    """x and y of one 16-bit dtype: eager's CPU kernel rounds alpha to the dtype first.
    Bitwise equal (sizes a multiple of 32: eager's own scalar remainder loop rounds alpha*y
    before the add, so its last < 32 elements differ from its vector body)."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g).to(dtype)
    y = torch.randn(n, generator=g).to(dtype)
    eager = x.clone().add_(y, alpha=alpha)
    ours = x.clone()
    fusedops.add_(ours, y, alpha)
    assert torch.equal(ours, eager), f"{(ours != eager).sum().item()} elements differ"
    ours2d = x.clone().view(-1, 32)          # the general path (same kernel, via _add_impl)
    fusedops.add_(ours2d.t(), y.view(-1, 32).t(), alpha)
    assert torch.equal(ours2d.view(-1), eager)
    half = n // 64 * 32
    xs = [x.clone(), x[:half].clone(), x[:64].clone()]
    ys = [y, y[:half], y[:64]]
    expected = [t.clone() for t in xs]
    torch._foreach_add_(expected, ys, alpha=alpha)
    fusedops.foreach_add_(xs, ys, alpha)
    assert all(torch.equal(a, b) for a, b in zip(xs, expected))
    # mixed lists take the general path: each group with its own alpha rule
    xs = [x.clone(), x.float()]
    ys = [y, y.float()]
    expected = [t.clone() for t in xs]
    torch._foreach_add_(expected, ys, alpha=alpha)
    fusedops.foreach_add_(xs, ys, alpha)
    assert all(torch.equal(a, b) for a, b in zip(xs, expected))


def test_low_precision_alpha_overflow_raises_like_eager():
    x, y = torch.ones(8, dtype=torch.float16), torch.ones(8, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="overflow"):
        x.clone().add_(y, alpha=1e6)
    with pytest.raises(ValueError, match="alpha=1000000.0 cannot be converted to torch.float16"):
        fusedops.add_(x, y, 1e6)
    assert torch.equal(x, torch.ones(8, dtype=torch.float16))
    fusedops.add_(x, y.float(), 1e6)  # mixed dtypes: fp32 alpha, as eager
    assert torch.equal(x, torch.ones(8).add_(torch.ones(8), alpha=1e6).half())


def test_foreach_device_mismatch_names_the_argument():
    xs = [torch.randn(3), torch.randn(3)]
    before = [x.clone() for x in xs]
    with pytest.raises(ValueError, match=r"ys\[1\] is on meta but xs\[1\] is on cpu"):
        fusedops.foreach_add_(xs, [torch.randn(3), torch.empty(3, device="meta")])
    with pytest.raises(ValueError, match=r"ys\[0\] is on meta but xs\[0\] is on cpu"):
        fusedops.foreach_add_(xs[:1], [torch.empty(3, device="meta")])
    assert all(torch.equal(a, b) for a, b in zip(xs, before))


def test_version_counter_bumped_once_like_eager():
    warnings.simplefilter("ignore")
    cases = [("contiguous", lambda: torch.randn(5), lambda: torch.ones(5)),
             ("non-contiguous x", lambda: torch.randn(4, 5)[:, 1], lambda: torch.ones(4)),
             ("float64", lambda: torch.randn(5, dtype=torch.float64), lambda: torch.ones(5, dtype=torch.float64)),
             ("broadcast y", lambda: torch.randn(3, 5), lambda: torch.ones(5)),
             ("interleaved", lambda: torch.randn(4, 5)[:, 1], lambda: torch.randn(4, 5)[:, 2])]
    for name, mkx, mky in cases:
        x, e, y = mkx(), mkx(), mky()
        v = x._version
        e.add_(y)
        fusedops.add_(x, y)
        assert x._version - v == e._version - v == 1, name
        xs, es = [mkx(), mkx()], [mkx(), mkx()]
        vs = [t._version for t in xs]
        yy = y if y.shape == x.shape else y.expand(x.shape).clone()
        torch._foreach_add_(es, [yy, yy])
        fusedops.foreach_add_(xs, [yy, yy])
        assert [t._version - v for t, v in zip(xs, vs)] == [t._version - v for t, v in zip(es, vs)] == [1, 1], name


def test_inference_tensor_outside_inference_mode_is_refused():
    """As eager: an inference tensor may be written in place only inside inference_mode;
    outside it fusedops.add_ refuses (naming x) before writing."""
    with torch.inference_mode():
        x = torch.randn(64)
    before = x.clone()
    with pytest.raises(RuntimeError, match="x: Inplace update to inference tensor outside InferenceMode"):
        fusedops.add_(x, torch.randn(64))
    assert torch.equal(x, before)
    with torch.inference_mode():
        fusedops.add_(x, torch.ones(64))
    torch.testing.assert_close(x, before + 1)


def test_foreach_inference_tensor_outside_inference_mode_is_refused(dev_backend):
    """As eager's torch._foreach_add_ (which refuses, though after writing): an inference
    tensor among xs is refused outside inference_mode, named, before any pair is written,
    through the function's fast path and through the op; inside inference_mode it is written."""
    device, backend = dev_backend
    with torch.inference_mode():
        inf = torch.randn(64, device=device)
    a = torch.randn(32, device=device)
    before_a, before_inf = a.clone(), inf.clone()
    ys = [torch.ones(32, device=device), torch.ones(64, device=device)]
    for call in (fusedops.foreach_add_, torch.ops.fusedops.foreach_add_):
        with pytest.raises(RuntimeError, match=r"xs\[1\]: Inplace update to inference tensor outside InferenceMode"):
            call([a, inf], ys)
        assert torch.equal(a, before_a) and torch.equal(inf, before_inf), backend
    with torch.inference_mode():
        fusedops.foreach_add_([a, inf], ys)
    torch.testing.assert_close(inf, before_inf + 1)
    torch.testing.assert_close(a, before_a + 1)


@pytest.mark.parametrize("alpha", [1.0, 0.3])
@pytest.mark.parametrize("ydtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16], ids=str)
def test_add_zero_dim_wider_y_is_eagers_bitwise(dev_backend, xdtype, ydtype, alpha):
    """A 0-dim y does not promote a dimensioned x (same category): eager rounds y to x's
    dtype first, then adds. Bitwise on CPU, many x values against one y (a multiple of 32
    elements: see test_low_precision_alpha_is_eagers_on_cpu for eager's remainder loop)."""
    device, _ = dev_backend
    if device != "cpu":
        pytest.skip("bitwise against eager's CPU kernel")
    g = torch.Generator().manual_seed(3)
    for yv in (3.586989402770996, -0.123456789, 1.0 + 2.0**-9 + 2.0**-12):
        x = (torch.randn(4, 256, generator=g) * 4).to(xdtype)
        y = torch.tensor(yv, dtype=ydtype)
        eager = x.clone()
        eager.add_(y, alpha=alpha)
        fusedops.add_(x, y, alpha)
        assert torch.equal(x, eager), f"y={yv}: {(x.float() - eager.float()).abs().max().item()}"
    # 0-dim x and y: ordinary promotion (no rounding of y first)
    x0 = torch.tensor(-1.609375, dtype=xdtype)
    e0 = x0.clone()
    e0.add_(torch.tensor(3.586989402770996, dtype=ydtype))
    fusedops.add_(x0, torch.tensor(3.586989402770996, dtype=ydtype))
    assert torch.equal(x0, e0)


def test_triton_interpreter_rounds_bf16_to_nearest():
    """Under the interpreter the kernels round fp32 -> bf16 to nearest even as the GPU does
    (the interpreter's own conversion truncates): bitwise equal to eager."""
    require("cpu", "triton")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4096, generator=g).bfloat16()
    ys = [torch.randn(4096, generator=g).bfloat16(), torch.randn(4096, generator=g)]
    with fusedops.use_backend("triton"):
        for y in ys:
            ours, eager = x.clone(), x.clone().add_(y)
            fusedops.add_(ours, y)
            assert torch.equal(ours, eager), f"add_ y {y.dtype}: {(ours != eager).sum().item()} differ"
        xs = [x.clone(), x[:1024].clone()]
        fusedops.foreach_add_(xs, [ys[0], ys[0][:1024]])
        assert torch.equal(xs[0], x.clone().add_(ys[0])) and torch.equal(xs[1], x[:1024].clone().add_(ys[0][:1024]))



def test_use_backend_blocks_closing_out_of_order():
    """use_backend is process-wide (autograd's device threads must see it); blocks opened by
    two threads may close in either order, and each removes its own entry: after the first
    thread's block closes, the second thread's backend is the one in force."""
    import threading

    import fusedops
    from fusedops import _backend
    a_open, b_open, a_closed = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def thread_a():
        with fusedops.use_backend("reference"):
            a_open.set()
            b_open.wait()
        a_closed.set()

    def thread_b():
        a_open.wait()
        with fusedops.use_backend("cpp"):
            b_open.set()
            a_closed.wait()
            seen.append(_backend.current_backend())

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == ["cpp"]
    assert _backend.current_backend() == (_backend._ENV_FORCED or "auto")
