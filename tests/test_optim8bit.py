"""8-bit optimizers (fusedops.optim) and their ops against torch.optim and the eager spec.

CPU runs: the C++ kernel on every shape; the Triton kernel (interpreter, ~2 ms per
program) only on the small shapes (SMALL_FOR_TRITON) — the 1024x1024 / 1024x4097 shapes
run on cpp here and on both GPU backends on a GPU."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import fusedops
from fusedops import reference as R
from fusedops.ops import optim8bit as O
from fusedops.optim import Adam8bit, AdamW8bit, Lion8bit, SGD8bit
from helpers import backend_params, require

SHAPES = [(1024, 32), (1024, 1024), (1024, 4097), (1,), (255,), (4095,), (4097,), (65537,)]
SMALL_FOR_TRITON = {(1024, 32), (1,), (255,), (4095,), (4097,)}


@pytest.fixture(params=backend_params())
def dev_backend(request):
    device, backend = request.param
    require(device, backend)
    with fusedops.use_backend(backend):
        yield device, backend


def _skip_big(device, backend, shape):
    if device == "cpu" and backend == "triton" and tuple(shape) not in SMALL_FOR_TRITON:
        pytest.skip("big shape: run on cpp (CPU) and on the GPU backends only")


# ---- maps ---------------------------------------------------------------------------------

def test_dynamic_maps_golden():
    s, u = O.signed_map(), O.unsigned_map()
    for m in (s, u):
        assert m.dtype == torch.float32 and m.shape == (256,)
        assert torch.all(m[1:] > m[:-1]), "maps are strictly increasing"
    # signed: 0 at 127, +1 at 255, no -1, smallest magnitude 5.5e-7 (bnb create_dynamic_map)
    assert s[127].item() == 0.0 and s[255].item() == 1.0
    assert s[0].item() == pytest.approx(-0.992968738079071, abs=0)
    assert s[128].item() == pytest.approx(5.500000384017767e-07, abs=0)
    assert s[126].item() == -s[128].item()
    assert torch.equal(s[:127], -s[128:255].flip(0))
    # unsigned: 0 at 0, smallest positive 3.25e-7, 1 at 255
    assert u[0].item() == 0.0 and u[255].item() == 1.0
    assert u[1].item() == pytest.approx(3.2500003044333425e-07, abs=0)
    # per-decade counts: signed 1, 2, ..., 64 per sign; unsigned 2, ..., 128
    for i in range(7):
        lo, hi = 10.0 ** (i - 7), 10.0 ** (i - 6)
        assert int(((s > lo) & (s < hi)).sum()) == 2 ** i
        assert int(((u > lo) & (u < hi)).sum()) == 2 ** (i + 1)
    # whole-map golden sums (catches bnb#227-style map bugs)
    assert s.double().sum().item() == pytest.approx(1.0, abs=1e-6)
    assert u.double().sum().item() == pytest.approx(75.1052632433869, abs=1e-9)


# ---- quantize / dequantize ----------------------------------------------------------------

def _brute_force(x, code):
    d = (x.double().reshape(-1, 1) - code.double().reshape(1, -1)).abs()
    return d.argmin(dim=1), d


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [1, 255, 256, 257, 4095, 4097, 65537])
def test_quantize_matches_brute_force(signed, n):
    code = O.signed_map() if signed else O.unsigned_map()
    x = torch.randn(n) * torch.logspace(-8, 0, n)[torch.randperm(n)]
    if not signed:
        x = x.abs()
    if n > 512:
        x[256:512] = 0.0  # an all-zero block
    codes, absmax = fusedops.blockwise_quantize(x, code)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.shape == (math.ceil(n / 256),)
    blocks = torch.nn.functional.pad(x.abs(), (0, absmax.numel() * 256 - n)).view(-1, 256).amax(1)
    assert torch.equal(absmax, blocks)
    norm = torch.where(absmax[:, None] == 0, 0.0, torch.nn.functional.pad(x, (0, absmax.numel() * 256 - n)).view(-1, 256)
                       / torch.where(absmax == 0, 1.0, absmax)[:, None]).reshape(-1)[:n]
    best, dist = _brute_force(norm, code)
    ours = codes.long()
    exact = ours == best
    d_ours = dist.gather(1, ours[:, None])[:, 0]
    d_best = dist.gather(1, best[:, None])[:, 0]
    # ties: a value within fp32 rounding of a midpoint may take either neighbour
    tie = (d_ours - d_best).abs() <= 1e-7 * norm.double().abs().clamp_min(1e-30) + 1e-12
    sign_rule = signed & (norm < 0) & (best == 127) & (ours == 126)
    assert bool((exact | tie | sign_rule).all()), f"{int((~(exact | tie | sign_rule)).sum())} codes not nearest"
    assert (exact | sign_rule).float().mean() > 0.99  # true ties are rare
    deq = fusedops.blockwise_dequantize(codes, absmax, code)
    assert deq.shape == x.shape and deq.dtype == torch.float32
    assert torch.equal(deq, code[codes.long()] * absmax.repeat_interleave(256)[:n])


def test_quantize_sign_rule_and_ties():
    code = O.signed_map()
    mids = R.code_midpoints(code)
    x = torch.tensor([1.0, -1e-9, 1e-9, mids[200].item(), mids[10].item(), 0.0])
    codes, absmax = fusedops.blockwise_quantize(x, code)
    assert codes.tolist() == [255, 126, 127, 200, 10, 127]  # tiny negative -> -5.5e-7; ties -> lower


def test_quantize_fp16_bf16_and_bad_inputs():
    code = O.signed_map()
    x = torch.randn(1000)
    c32, a32 = fusedops.blockwise_quantize(x, code)
    for dt in (torch.float16, torch.bfloat16):
        c, a = fusedops.blockwise_quantize(x.to(dt), code)
        c_ref, a_ref = fusedops.blockwise_quantize(x.to(dt).float(), code)
        assert torch.equal(c, c_ref) and torch.equal(a, a_ref)
    with pytest.raises(ValueError, match="code"):
        fusedops.blockwise_quantize(x, code[:100])
    with pytest.raises(TypeError, match="x"):
        fusedops.blockwise_quantize(torch.ones(3, dtype=torch.int32), code)
    with pytest.raises(ValueError, match="absmax"):
        fusedops.blockwise_dequantize(c32, a32[:1], code)
    with pytest.raises(TypeError, match="codes"):
        fusedops.blockwise_dequantize(c32.int(), a32, code)


def test_opcheck_quantize_ops():
    code = O.signed_map()
    x = torch.randn(3, 700)
    torch.library.opcheck(torch.ops.fusedops.blockwise_quantize.default, (x, code))
    c, a = fusedops.blockwise_quantize(x, code)
    torch.library.opcheck(torch.ops.fusedops.blockwise_dequantize.default, (c, a, code))


def test_quantize_ops_outputs_do_not_require_grad():
    """No gradient flows through the quantization ops: their outputs never require grad,
    and torch.compile takes them with an input that requires grad."""
    code = O.signed_map()
    x = torch.randn(3, 700, requires_grad=True)
    c, absmax = torch.ops.fusedops.blockwise_quantize.default(x, code)
    out = torch.ops.fusedops.blockwise_dequantize.default(c, absmax.detach().requires_grad_(), code)
    assert not absmax.requires_grad and not out.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        out.sum().backward()
    compiled = torch.compile(lambda t: fusedops.blockwise_quantize(t, code)[1], backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), absmax)


def _brute_force_codes(x: torch.Tensor, code: torch.Tensor, signed: bool) -> torch.Tensor:
    """The definition, by brute force over every midpoint (numpy, in chunks): the number of
    fp32 midpoints strictly below x, and for the signed map a negative x never takes the
    code of 0 (it takes the last negative code)."""
    mids = R.code_midpoints(code).numpy()
    xs = x.numpy()
    out = np.empty(xs.shape, dtype=np.int64)
    for i in range(0, xs.size, 1 << 16):
        out[i:i + (1 << 16)] = (mids[None, :] < xs[i:i + (1 << 16), None]).sum(axis=1)
    if signed:
        zero = int((code < 0).sum())
        out = np.where((xs < 0) & (out >= zero), zero - 1, out)
    return torch.from_numpy(out)


def _quantizer_points(code: torch.Tensor, n_random: int) -> torch.Tensor:
    """Every midpoint and its fp32 neighbours, every bucket edge of the kernels' tables and
    its neighbours (both signs), 0, +-1, values outside [-1, 1], and random floats in
    [-1, 1] (uniform, and log-uniform in magnitude down to 1e-10)."""
    mids = R.code_midpoints(code).numpy()
    keys = np.arange(O.BUCKETS + 1, dtype=np.int64) + O.BUCKET_BASE
    edges = (keys << O.BUCKET_SHIFT).astype(np.uint32).view(np.float32)
    pts = []
    for v in (mids, edges):
        for w in (v, np.nextafter(v, np.float32(np.inf)), np.nextafter(v, np.float32(-np.inf))):
            pts += [w, -w]
    pts.append(np.array([0.0, -0.0, 1.0, -1.0, 1.5, -1.5, 3e38, -3e38, 1e-30, -1e-30, 1e-45, -1e-45,
                         np.inf, -np.inf], dtype=np.float32))
    gen = np.random.default_rng(5)
    pts.append(gen.uniform(-1, 1, n_random).astype(np.float32))
    pts.append((np.sign(gen.uniform(-1, 1, n_random)) * 10.0 ** gen.uniform(-10, 0, n_random)).astype(np.float32))
    return torch.from_numpy(np.concatenate(pts).astype(np.float32))


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("backend", ["table", "cpp", "triton"])
def test_kernel_quantizer_is_exact(backend, signed):
    """The bucket-table quantizer of the step kernels gives exactly the brute-force codes."""
    if backend != "table":
        require("cpu", backend)
    code = O.signed_map() if signed else O.unsigned_map()
    x = _quantizer_points(code, 10 ** 6 if backend != "triton" else 2 * 10 ** 5)
    want = _brute_force_codes(x, code, signed)
    got = O.kernel_codes(x, signed, backend).long()
    bad = got != want
    assert not bad.any(), f"{int(bad.sum())} codes differ, e.g. x={x[bad][:4].tolist()}: {got[bad][:4].tolist()} " \
                          f"!= {want[bad][:4].tolist()}"
    # the tables are the map's: the reference search gives the same codes (finite x)
    fin = torch.isfinite(x)
    assert torch.equal(R._nearest_code(x[fin], code), want[fin])


@pytest.mark.gpu
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_kernel_quantizer_is_exact_gpu(backend, signed):
    require("cuda", backend)
    code = O.signed_map() if signed else O.unsigned_map()
    x = _quantizer_points(code, 10 ** 6)
    want = _brute_force_codes(x, code, signed)
    got = O.kernel_codes(x.cuda(), signed, backend).cpu().long()
    assert torch.equal(got, want), f"{int((got != want).sum())} codes differ"


def test_qmaps_layout():
    q = O.qmaps("cpu")
    assert q.dtype == torch.float32 and q.numel() == O.QMAPS_NUMEL and q.is_contiguous()
    assert torch.equal(q[:256], O.signed_map()) and torch.equal(q[512:768], O.unsigned_map())
    assert torch.equal(q[256:511], R.code_midpoints(O.signed_map()))
    for off, signed in ((O.SIGNED_TABLE, True), (O.UNSIGNED_TABLE, False)):
        tab = q[off:off + 2 * O.BUCKETS].view(torch.int32)
        assert torch.equal(tab, O.bucket_table(O.signed_map() if signed else O.unsigned_map(), signed))
        assert int((tab >> 23).max()) <= 255 and int((tab >> 23).min()) >= 0


# ---- the step op: backends against the eager spec -----------------------------------------

def _states(ps, kind, q32=()):
    """Random (already used) states: 8-bit codes + absmax, or fp32 for indices in q32.
    Second moments are kept away from 0 (codes >= 64, absmax >= 1e-5), as a real Adam
    run's are where its first moment is not: a v near 0 under a large m makes the update
    ill-conditioned (m / sqrt(v) up to 1e4), and the GPU kernels' fma contraction of
    g + wd·p, harmless elsewhere, is then amplified where g + wd·p nearly cancels (seen
    once on an H200, Adam fp16: one parameter 0.375 = 3 ulps off the reference, as an
    update of ~200 from v = 0 would be). _edge_states covers the extremes separately."""
    two = kind in O.TWO_STATE
    s1, a1, s2, a2 = [], [], [], []
    for i, p in enumerate(ps):
        blocks = math.ceil(p.numel() / 256)
        if i in q32:
            s1.append(torch.randn(p.shape, device=p.device) * 1e-3)
            a1.append(torch.zeros(0, device=p.device))
            if two:
                s2.append((torch.rand(p.shape, device=p.device) * 0.9 + 0.1) * 1e-5)
                a2.append(torch.zeros(0, device=p.device))
        else:
            s1.append(torch.randint(0, 256, p.shape, dtype=torch.uint8, device=p.device))
            a1.append(torch.rand(blocks, device=p.device) * 1e-2)
            if two:
                s2.append(torch.randint(64, 256, p.shape, dtype=torch.uint8, device=p.device))
                a2.append((torch.rand(blocks, device=p.device) * 0.9 + 0.1) * 1e-4)
    return s1, a1, s2, a2


STEP_SIZES = [(1,), (255,), (4095,), (4097,), (33, 70), (65537,)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", O.KINDS)
def test_step_matches_reference(dev_backend, kind, dtype):
    device, backend = dev_backend
    ps = [(torch.randn(s, device=device) * 0.1).to(dtype) for s in STEP_SIZES]
    gs = [(torch.randn(s, device=device) * 0.01).to(dtype) for s in STEP_SIZES]
    gs[2].view(-1)[7] = float("nan")
    gs[3].view(-1)[100] = float("inf")
    gs[3].view(-1)[300] = -float("inf")
    lists = [ps, gs, *_states(ps, kind, q32={1, 4})]
    ours = [[t.clone() for t in lst] for lst in lists]
    ref = [[t.clone() for t in lst] for lst in lists]
    beta2 = 0.1 if kind == "sgd" else 0.99
    args = (kind, 1e-3, 0.9, beta2, 1e-8, 0.05, 7)
    kw = dict(first=False, nesterov=kind == "sgd")
    fusedops.optimizer_step_8bit_(*ours, *args, **kw)
    with fusedops.use_backend("reference"):
        fusedops.optimizer_step_8bit_(*ref, *args, **kw)
    exact = device == "cpu"  # compiled GPU code may contract mul+add into fma (module docs)
    for li, name in enumerate(["params", "grads", "state1", "absmax1", "state2", "absmax2"]):
        for i, (a, b) in enumerate(zip(ours[li], ref[li])):
            if exact:
                assert torch.equal(a.nan_to_num(), b.nan_to_num()), f"{name}[{i}] differs from the reference"
            elif a.dtype == torch.uint8:
                diff = (a.int() - b.int()).abs()
                assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, f"{name}[{i}]"
            else:
                # one rounding of the parameter's dtype: an fma can move a value across a
                # rounding boundary of fp16/bf16
                rtol = max(1e-5, torch.finfo(a.dtype).eps) if a.dtype.is_floating_point else 1e-5
                close = torch.isclose(a, b, rtol=rtol, atol=1e-7, equal_nan=True)
                if name == "params":
                    # the rare element whose state code flipped (allowed above) takes a
                    # different update: at most a few steps of size lr
                    far = ~close
                    assert far.float().mean() < 1e-3, f"{name}[{i}]: {int(far.sum())} elements differ"
                    if far.any():
                        assert (a.double() - b.double())[far].abs().max() <= 4 * args[1], f"{name}[{i}]"
                else:
                    assert close.all(), f"{name}[{i}]"
    # NaN/Inf policy: those param elements untouched, their states 0, absmax finite
    for i, idx in ((2, [7]), (3, [100, 300])):
        assert torch.equal(ours[0][i].view(-1)[idx], ps[i].view(-1)[idx])
        for a in ours[3] + ours[5]:
            assert torch.isfinite(a).all()


@pytest.mark.parametrize("kind", O.KINDS)
def test_stochastic_rounding_matches_reference(dev_backend, kind):
    """bf16 params with sr_seed: every backend gives the reference's bits on CPU (GPU: up to
    rare one-ulp fp32 differences before the rounding, as above); fp32 params ignore sr_seed."""
    device, backend = dev_backend
    sizes = [(4097,), (0,), (33, 70), (65537,)]
    torch.manual_seed(11)
    ps = [(torch.randn(s, device=device) * 0.1).to(torch.bfloat16) for s in sizes]
    gs = [(torch.randn(s, device=device) * 0.01).to(torch.bfloat16) for s in sizes]
    lists = [ps, gs, *_states(ps, kind, q32={2})]
    args = (kind, 1e-3, 0.9, 0.1 if kind == "sgd" else 0.99, 1e-8, 0.05, 5)
    ours = [[t.clone() for t in lst] for lst in lists]
    ref = [[t.clone() for t in lst] for lst in lists]
    rne = [[t.clone() for t in lst] for lst in lists]
    fusedops.optimizer_step_8bit_(*ours, *args, sr_seed=2 ** 32 - 3)
    fusedops.optimizer_step_8bit_(*rne, *args)
    with fusedops.use_backend("reference"):
        fusedops.optimizer_step_8bit_(*ref, *args, sr_seed=2 ** 32 - 3)
    for i, (a, b, c) in enumerate(zip(ours[0], ref[0], rne[0])):
        if device == "cpu":
            assert torch.equal(a, b), f"params[{i}] differs from the reference"
        elif a.numel():  # GPU: the reference's torch ops (and Triton's fma contraction) may move
            # an fp32 value by an ulp before the rounding (the CUDA kernel is checked bitwise
            # against the CPU kernel in test_gpu_cuda_step_is_bitwise_the_cpu_step)
            assert (a != b).float().mean() < 1e-3, f"params[{i}]"
        if a.numel() > 1000:  # stochastic rounding differs from round-to-nearest somewhere
            assert not torch.equal(a, c)
            assert ((a.float() - c.float()).abs() <= (c.float().abs() * 2 ** -7)).all()  # one bf16 step at most
    for li in (2, 3):  # the states do not depend on the rounding of p
        for a, b in zip(ours[li], rne[li]):
            assert torch.equal(a, b)
    # fp32 params: no effect
    p32 = [torch.randn(5000, device=device)]
    g32 = [torch.randn(5000, device=device) * 0.01]
    a = [[t.clone() for t in lst] for lst in (p32, g32, *_states(p32, kind))]
    b = [[t.clone() for t in lst] for lst in a]
    fusedops.optimizer_step_8bit_(*a, *args, sr_seed=7)
    fusedops.optimizer_step_8bit_(*b, *args)
    assert torch.equal(a[0][0], b[0][0])


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_stochastic_rounding_is_unbiased(dev_backend, sign):
    """x = 1 + (77/256) ulp between two bf16 neighbours (an exact fp32 SGD step from 1.0):
    over 2^18 elements the mean of the rounded values is x within 6 standard deviations
    (truncation or round-to-nearest miss it by > 100), both neighbours occur, and another
    step gives another pattern."""
    device, backend = dev_backend
    n = 1 << 18 if not (device == "cpu" and backend == "triton") else 1 << 15
    delta = 77 * 2.0 ** -15  # 77/256 of bf16's ulp at 1.0 (2^-7)
    x = sign * (1.0 + delta)
    outs = []
    for step in (1, 2):
        p = torch.full((n,), sign, dtype=torch.bfloat16, device=device)
        g = torch.full((n,), -sign * delta, dtype=torch.bfloat16, device=device)
        fusedops.optimizer_step_8bit_([p], [g], [torch.zeros(n, device=device)], [torch.zeros(0, device=device)],
                                      [], [], "sgd", 1.0, 0.0, 0.0, 0.0, 0.0, step, first=True, sr_seed=99)
        vals = p.double().cpu()
        assert set(vals.unique().tolist()) == {sign * 1.0, sign * (1.0 + 2 ** -7)}
        q = 77 / 256
        sd = 2 ** -7 * math.sqrt(q * (1 - q) / n)
        assert abs(vals.mean().item() - x) < 6 * sd, f"mean {vals.mean().item()!r} vs {x!r} (sd {sd:.1e})"
        outs.append(vals)
    assert not torch.equal(outs[0], outs[1])
    # off: round to nearest (1.0)
    p = torch.full((n,), sign, dtype=torch.bfloat16, device=device)
    g = torch.full((n,), -sign * delta, dtype=torch.bfloat16, device=device)
    fusedops.optimizer_step_8bit_([p], [g], [torch.zeros(n, device=device)], [torch.zeros(0, device=device)],
                                  [], [], "sgd", 1.0, 0.0, 0.0, 0.0, 0.0, 1, first=True)
    assert (p.double() == sign).all()


def test_optimizer_stochastic_rounding_flag():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8192).to(torch.bfloat16))
    q, r = torch.nn.Parameter(p.detach().clone()), torch.nn.Parameter(p.detach().clone())
    o1 = AdamW8bit([p], stochastic_rounding=True)
    o2, o3 = AdamW8bit([q]), AdamW8bit([r], stochastic_rounding=True)
    assert o1.defaults["stochastic_rounding"] and not o2.defaults["stochastic_rounding"]
    for _ in range(3):
        g = torch.randn(8192).to(torch.bfloat16)
        p.grad, q.grad, r.grad = g.clone(), g.clone(), g.clone()
        o1.step(), o2.step(), o3.step()
    assert torch.equal(p, r) and not torch.equal(p, q)  # deterministic; differs from round-to-nearest
    assert o1.state_dict()["param_groups"][0]["stochastic_rounding"] is True
    with pytest.raises(ValueError, match="sr_seed"):
        AdamW8bit([p], sr_seed=-1)
    f = torch.nn.Parameter(torch.randn(8192))  # fp32 params: no effect
    f2 = torch.nn.Parameter(f.detach().clone())
    a, b = Lion8bit([f], stochastic_rounding=True), Lion8bit([f2])
    f.grad, f2.grad = torch.ones_like(f), torch.ones_like(f2)
    a.step(), b.step()
    assert torch.equal(f, f2)


def test_opcheck_step():
    ps = [torch.randn(300), torch.randn(5000)]
    gs = [torch.randn_like(p) * 0.01 for p in ps]
    s1, a1, s2, a2 = _states(ps, "adamw", q32={0})
    torch.library.opcheck(torch.ops.fusedops.optimizer_step_8bit_.default,
                          ([p.clone() for p in ps], gs, s1, a1, s2, a2, "adamw", 1e-3, 0.9, 0.999, 1e-8, 0.01, 3))
    s1, a1, _, _ = _states(ps, "lion")
    torch.library.opcheck(torch.ops.fusedops.optimizer_step_8bit_.default,
                          ([p.clone() for p in ps], gs, s1, a1, [], [], "lion", 1e-4, 0.9, 0.99, 0.0, 0.0, 1))


def test_step_eager_fast_path_matches_the_op():
    """Plain eager calls run the op's kernel without the dispatcher; the op (what a
    dispatch mode or torch.compile sees) gives the same bits and bumps the same versions."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    ps = [torch.randn(300), torch.randn(5000)]
    gs = [torch.randn_like(p) * 0.01 for p in ps]
    states = _states(ps, "adamw")
    runs = []
    for mode in (None, Record()):
        p2 = [p.clone() for p in ps]
        s1, a1, s2, a2 = ([t.clone() for t in ts] for ts in states)
        versions = [t._version for t in p2 + s1 + a1]
        if mode is None:
            fusedops.optimizer_step_8bit_(p2, gs, s1, a1, s2, a2, "adamw", 1e-3, 0.9, 0.999, 1e-8, 0.01, 1)
        else:
            with mode:
                fusedops.optimizer_step_8bit_(p2, gs, s1, a1, s2, a2, "adamw", 1e-3, 0.9, 0.999, 1e-8, 0.01, 1)
        assert all(t._version > v for t, v in zip(p2 + s1 + a1, versions))
        runs.append(p2 + s1 + a1 + s2 + a2)
    assert "fusedops.optimizer_step_8bit_.default" in seen, seen
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_step_bad_inputs_write_nothing():
    ps = [torch.randn(300), torch.randn(5000)]
    gs = [torch.randn_like(p) for p in ps]
    s1, a1, s2, a2 = _states(ps, "adamw")
    before = [t.clone() for t in ps + s1 + a1 + s2 + a2]

    def run(**over):
        lists = dict(params=ps, grads=gs, state1=s1, absmax1=a1, state2=s2, absmax2=a2)
        lists.update(over)
        fusedops.optimizer_step_8bit_(*lists.values(), "adamw", 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)

    with pytest.raises(TypeError, match=r"grads\[1\]"):
        run(grads=[gs[0], gs[1].double()])
    with pytest.raises(ValueError, match=r"absmax1\[1\]"):
        run(absmax1=[a1[0], a1[1][:3]])
    with pytest.raises(TypeError, match=r"state2\[0\]"):
        run(state2=[s2[0].int(), s2[1]])
    with pytest.raises(ValueError, match="state1 has 1"):
        run(state1=s1[:1])
    with pytest.raises(ValueError, match=r"params\[0\]"):
        run(params=[torch.randn(600)[::2], ps[1]])
    with pytest.raises(ValueError, match="kind"):
        fusedops.optimizer_step_8bit_(ps, gs, s1, a1, s2, a2, "adagrad", 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape"):
        run(grads=[gs[0], gs[1].view(50, 100)])
    # overlapping memory: a grad inside another param, two params sharing bytes
    with pytest.raises(ValueError, match=r"grads\[0\] overlaps params\[1\]"):
        run(grads=[ps[1][:300], gs[1]])
    big = torch.randn(5300)
    with pytest.raises(ValueError, match=r"params\[1\] overlaps params\[0\]"):
        run(params=[big[:300], big[200:5200]])
    after = ps + s1 + a1 + s2 + a2
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "a failed call wrote something"


# ---- the optimizers against torch.optim --------------------------------------------------

def lion_reference(p, g, m, lr, b1, b2, wd):
    p.mul_(1 - lr * wd)
    p.add_(torch.sign(b1 * m + (1 - b1) * g), alpha=-lr)
    m.mul_(b2).add_(g, alpha=1 - b2)


def _torch_pair(kind, p2, **kw):
    if kind == "adamw":
        return torch.optim.AdamW([p2], **kw)
    if kind == "adam":
        return torch.optim.Adam([p2], **kw)
    if kind == "sgd":
        return torch.optim.SGD([p2], **kw)
    return None


OURS = {"adamw": AdamW8bit, "adam": Adam8bit, "lion": Lion8bit, "sgd": SGD8bit}
HYPER = {"adamw": dict(lr=1e-3, weight_decay=1e-2), "adam": dict(lr=1e-3, weight_decay=1e-3),
         "sgd": dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=1e-3), "lion": dict(lr=1e-4, weight_decay=0.1)}
STATE_NAMES = {"adamw": [("exp_avg", 1), ("exp_avg_sq", 2)], "adam": [("exp_avg", 1), ("exp_avg_sq", 2)],
               "sgd": [("momentum_buffer", 1)], "lion": [("exp_avg", 1)]}


def _deq(opt, p, k):
    st = opt.state[p]
    s, a = st[f"state{k}"], st[f"absmax{k}"]
    if s.dtype == torch.float32:
        return s.clone()
    code = (O.signed_map() if k == 1 else O.unsigned_map()).to(s.device)
    return R.blockwise_dequantize(s, a, code).view(p.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd", "lion"])
def test_optimizer_vs_torch(dev_backend, kind, shape, dtype):
    """bnb's protocol: 50 steps; after each step compare, then copy our param and our
    dequantized states into the fp32 torch optimizer so that errors do not accumulate."""
    device, backend = dev_backend
    _skip_big(device, backend, shape)
    if dtype == torch.bfloat16 and tuple(shape) not in ((1024, 32), (4097,), (65537,)):
        pytest.skip("bf16 on three shapes (test time)")
    torch.manual_seed(sum(shape))
    p1 = torch.nn.Parameter((torch.randn(shape, device=device) * 0.1).to(dtype))
    p2 = torch.nn.Parameter(p1.detach().float().clone())
    ours = OURS[kind]([p1], **HYPER[kind])
    theirs = _torch_pair(kind, p2, **HYPER[kind])
    m_lion = torch.zeros_like(p2) if kind == "lion" else None
    patol, prtol = (1.7e-4, 1.6e-3) if dtype == torch.bfloat16 else (6e-5, 6e-4)
    # 50 steps (bnb's protocol); on CPU the two >1M-element shapes run 10 (test time)
    steps = 50 if device == "cuda" or p1.numel() <= 65537 else 10
    for i in range(steps):
        g = torch.randn(shape, device=device) * 0.01
        p1.grad = g.to(dtype)
        p2.grad = g.to(dtype).float()
        ours.step()
        if theirs is not None:
            theirs.step()
        else:
            with torch.no_grad():
                lion_reference(p2, p2.grad, m_lion, HYPER["lion"]["lr"], 0.9, 0.99, HYPER["lion"]["weight_decay"])
        err = (p1.float() - p2).abs()
        rel = err / (p2.abs() + 1e-9)
        if kind == "lion":  # sign updates: elements at the sign boundary differ by 2 lr
            # (bf16: plus the param's rounding, up to half an ulp = 2^-9 |p|)
            tol = 1e-6 + (2.5e-3 if dtype == torch.float32 else 4e-3) * p2.abs()
            assert (err > tol).float().mean() < 2e-3
        else:
            assert err.mean() <= patol and rel.mean() <= prtol, f"step {i}: {err.mean():.2e} / {rel.mean():.2e}"
        deq = []
        for name, k in STATE_NAMES[kind]:
            ref_state = theirs.state[p2][name] if theirs is not None else m_lion
            s = _deq(ours, p1, k)
            assert (~torch.isclose(ref_state, s, atol=3e-3, rtol=1e-3)).sum() < 20
            scale = ref_state.abs().mean()
            assert (ref_state - s).abs().mean() <= 0.02 * scale + 1e-12, f"{name}: dequantized state far off"
            deq.append((ref_state, s))
        with torch.no_grad():  # resync
            p2.copy_(p1.float())
            for ref_state, s in deq:
                ref_state.copy_(s)


def test_32bit_states_track_torch_closely(dev_backend):
    device, _ = dev_backend
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(3000, device=device) * 0.1)
    p2 = torch.nn.Parameter(p1.detach().clone())
    q = torch.nn.Parameter(torch.randn(5000, device=device))
    ours = AdamW8bit([p1, q])
    ours.override_32bit(q)
    theirs = torch.optim.AdamW([p2])
    for _ in range(30):
        g = torch.randn_like(p1) * 0.01
        p1.grad, p2.grad, q.grad = g.clone(), g.clone(), torch.randn_like(q)
        ours.step()
        theirs.step()
    assert ours.state[p1]["state1"].dtype == torch.float32  # 3000 < min_8bit_size
    assert ours.state[q]["state1"].dtype == torch.float32  # override
    torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6)


def test_min_8bit_size_optim_bits_and_groups():
    a = torch.nn.Parameter(torch.randn(4096))
    b = torch.nn.Parameter(torch.randn(4095))
    c = torch.nn.Parameter(torch.randn(10000))
    opt = AdamW8bit([{"params": [a, b]}, {"params": [c], "optim_bits": 32}])
    for p in (a, b, c):
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[a]["state1"].dtype == torch.uint8 and opt.state[a]["absmax2"].shape == (16,)
    assert opt.state[b]["state1"].dtype == torch.float32
    assert opt.state[c]["state2"].dtype == torch.float32
    # state bytes per param of the 8-bit tensor: 2 codes + 2 * 4 B per 256
    st = opt.state[a]
    nbytes = sum(st[k].numel() * st[k].element_size() for k in ("state1", "state2", "absmax1", "absmax2"))
    assert nbytes / a.numel() == pytest.approx(2 + 8 / 256)


def test_param_groups_lr_decay_vs_torch(dev_backend):
    device, backend = dev_backend
    torch.manual_seed(1)
    shapes = [(64, 80), (100,), (4097,)]
    ps1 = [torch.nn.Parameter(torch.randn(s, device=device) * 0.1) for s in shapes]
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps1]
    groups = lambda ps: [{"params": ps[:1], "lr": 1e-2, "weight_decay": 0.1},  # noqa: E731
                         {"params": ps[1:], "lr": 1e-3, "weight_decay": 0.0}]
    ours, theirs = AdamW8bit(groups(ps1), optim_bits=32), torch.optim.AdamW(groups(ps2))
    for _ in range(10):
        for p1, p2 in zip(ps1, ps2):
            g = torch.randn_like(p1) * 0.01
            p1.grad, p2.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for p1, p2 in zip(ps1, ps2):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6)
    # 8-bit: the same groups still follow torch within bnb's per-step tolerance order
    ps3 = [torch.nn.Parameter(p.detach().clone()) for p in ps2]
    o3 = AdamW8bit(groups(ps3), min_8bit_size=0)
    ps4 = [torch.nn.Parameter(p.detach().clone()) for p in ps2]
    o4 = torch.optim.AdamW(groups(ps4))
    for p3, p4 in zip(ps3, ps4):
        g = torch.randn_like(p3) * 0.01
        p3.grad, p4.grad = g.clone(), g.clone()
    o3.step()
    o4.step()
    for p3, p4 in zip(ps3, ps4):
        assert (p3 - p4).abs().mean() < 6e-5


def test_no_grad_params_skipped_and_zero_grad():
    a, b = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(5000))
    b0 = b.detach().clone()
    opt = Lion8bit([a, b], lr=1e-2)
    a.grad = torch.randn_like(a)
    opt.step()
    assert torch.equal(b, b0) and b not in opt.state
    assert opt.state[a]["step"] == 1
    opt.zero_grad()
    assert a.grad is None
    c = torch.nn.Parameter(torch.randn(300))
    opt.add_param_group({"params": [c], "lr": 0.5})
    c.grad = torch.ones_like(c)
    c0 = c.detach().clone()
    opt.step()
    torch.testing.assert_close(c, c0 - 0.5)  # lion: sign(g) = 1


@pytest.mark.parametrize("kind", ["adamw", "sgd", "lion"])
def test_state_dict_round_trip_resumes_identically(dev_backend, kind):
    device, backend = dev_backend
    torch.manual_seed(3)
    shapes = [(300, 20), (100,), (4097,)] if backend == "triton" and device == "cpu" else [(1024, 64), (100,), (4097,)]
    ps = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt, opt2 = OURS[kind](ps, **HYPER[kind]), OURS[kind](twin, **HYPER[kind])
    for i in range(1, 31):
        gs = [torch.randn_like(p) for p in ps]
        for p, t, g in zip(ps, twin, gs):
            p.grad, t.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
        if i % 10 == 0:  # round trip through a copy: byte-exact, and the next steps agree
            sd = copy.deepcopy(opt.state_dict())
            opt2 = OURS[kind](twin, **HYPER[kind])
            opt2.load_state_dict(sd)
            for p, t in zip(ps, twin):
                for k, v in opt.state[p].items():
                    w = opt2.state[t][k]
                    assert (torch.equal(v, w) and v.dtype == w.dtype) if torch.is_tensor(v) else v == w
    for p, t in zip(ps, twin):
        assert torch.equal(p, t)


def test_convergence_small_model_vs_torch_adamw():
    """A small MLP regression trained 300 steps: AdamW8bit ends within 2% of torch AdamW."""
    def train(make_opt):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 128),
                                    torch.nn.GELU(), torch.nn.Linear(128, 1))
        gen = torch.Generator().manual_seed(1)
        w = torch.randn(32, 1, generator=gen)
        opt = make_opt(model.parameters())
        for _ in range(300):
            x = torch.randn(256, 32, generator=gen)
            y = torch.sin(x @ w) + 0.1 * x[:, :1] ** 2
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            x = torch.randn(4096, 32, generator=gen)
            return torch.nn.functional.mse_loss(model(x), torch.sin(x @ w) + 0.1 * x[:, :1] ** 2).item()

    with fusedops.use_backend("cpp"):
        ours = train(lambda ps: AdamW8bit(ps, lr=1e-3))
    theirs = train(lambda ps: torch.optim.AdamW(ps, lr=1e-3))
    assert abs(ours - theirs) <= 0.02 * theirs, f"8-bit {ours:.5f} vs torch {theirs:.5f}"


def test_optimizer_bad_arguments():
    p = torch.nn.Parameter(torch.randn(10))
    with pytest.raises(ValueError, match="learning rate"):
        AdamW8bit([p], lr=-1)
    with pytest.raises(ValueError, match="betas"):
        Lion8bit([p], betas=(1.0, 0.9))
    with pytest.raises(NotImplementedError, match="amsgrad"):
        AdamW8bit([p], amsgrad=True)
    with pytest.raises(ValueError, match="nesterov"):
        SGD8bit([p], nesterov=True)
    with pytest.raises(ValueError, match="optim_bits"):
        AdamW8bit([p], optim_bits=16)


def test_defaults_match_torch():
    p = torch.nn.Parameter(torch.randn(10))
    assert AdamW8bit([p]).defaults["weight_decay"] == torch.optim.AdamW([p]).defaults["weight_decay"]
    assert Adam8bit([p]).defaults["weight_decay"] == 0
    assert Lion8bit([p]).defaults["lr"] == 1e-4 and Lion8bit([p]).defaults["betas"] == (0.9, 0.99)
    assert SGD8bit([p]).defaults["lr"] == torch.optim.SGD([p]).defaults["lr"]


# ---- GPU only --------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_step_is_one_launch_and_no_sync(backend):
    require("cuda", backend)
    ps = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in [(1024, 1024), (1000,), (4097,), (50, 300)]]
    opt = AdamW8bit(ps)
    for p in ps:
        p.grad = torch.randn_like(p)
    with fusedops.use_backend(backend):
        opt.step()  # states and maps created
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                opt.step()
                torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [n for n in names if "optim8bit" in n]
    assert len(kernels) == 1, names
    if backend == "cuda":  # the table is a kernel parameter: capturable in a CUDA graph
        graph = torch.cuda.CUDAGraph()
        before = [p.detach().clone() for p in ps]
        with fusedops.use_backend(backend):
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                opt.step()
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(graph):
                opt.step()
        graph.replay()
        torch.cuda.synchronize()
        assert not all(torch.equal(a, b) for a, b in zip(before, ps))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", O.KINDS)
def test_gpu_cuda_step_is_bitwise_the_cpu_step(kind, dtype):
    """The CUDA C++ kernel (every op separately rounded, the normalising division by a
    hoisted reciprocal with a range-checked fast path) gives the C++ CPU kernel's bits,
    also for blocks whose values span many binades (the division's slow path)."""
    require("cuda", "cuda")
    torch.manual_seed(7)
    sizes = [(4095,), (4097,), (65537,), (300, 1000)]
    ps = [(torch.randn(s) * 0.1).to(dtype) for s in sizes]
    gs = [(torch.randn(s) * torch.logspace(-30, 2, s[-1])[torch.randperm(s[-1])]).to(dtype) for s in sizes]
    gs[0].view(-1)[5] = float("nan")
    lists = [ps, gs, *_states(ps, kind, q32={1})]
    beta2 = 0.1 if kind == "sgd" else 0.999
    args = (kind, 1e-3, 0.9, beta2, 1e-8, 0.05, 3)
    cpu = [[t.clone() for t in lst] for lst in lists]
    gpu = [[t.cuda() for t in lst] for lst in lists]
    sr = 1234 if dtype == torch.bfloat16 else -1  # bf16: with stochastic rounding
    with fusedops.use_backend("cpp"):
        fusedops.optimizer_step_8bit_(*cpu, *args, sr_seed=sr)
    with fusedops.use_backend("cuda"):
        fusedops.optimizer_step_8bit_(*gpu, *args, sr_seed=sr)
    for li, name in enumerate(["params", "grads", "state1", "absmax1", "state2", "absmax2"]):
        for i, (a, b) in enumerate(zip(cpu[li], gpu[li])):
            assert torch.equal(a.nan_to_num(), b.cpu().nan_to_num()), f"{name}[{i}] differs from the CPU kernel"


@pytest.mark.gpu
def test_state_dict_moves_between_cpu_and_cuda():
    require("cuda", "cuda")
    torch.manual_seed(0)
    pc = torch.nn.Parameter(torch.randn(5000))
    pg = torch.nn.Parameter(pc.detach().cuda())
    oc, og = AdamW8bit([pc]), AdamW8bit([pg])
    for _ in range(3):
        g = torch.randn(5000)
        pc.grad, pg.grad = g.clone(), g.cuda()
        oc.step()
        og.step()
    og2 = AdamW8bit([pg])
    og2.load_state_dict(oc.state_dict())
    assert og2.state[pg]["state1"].device.type == "cuda" and og2.state[pg]["state1"].dtype == torch.uint8
    oc2 = AdamW8bit([pc])
    oc2.load_state_dict(og.state_dict())
    assert oc2.state[pc]["absmax1"].device.type == "cpu" and oc2.state[pc]["absmax1"].dtype == torch.float32


# ---- the CUDA AdamW / Adam kernel's forms (csrc/cuda/optim8bit.cu) ----


def test_unsigned_table_negative_half_is_code_zero():
    """The CUDA AdamW / Adam kernel keeps only the x >= 0 half of the unsigned map's table
    and gives code 0 for x < 0: that half must be all (0 << 23) | 0x7FFFFF."""
    tab = O.bucket_table(O.unsigned_map(), False)
    neg = tab[O.BUCKETS:]
    assert neg.numel() == O.BUCKETS and bool((neg == 0x7FFFFF).all())
    assert not bool((O.bucket_table(O.signed_map(), True)[O.BUCKETS:] == 0x7FFFFF).all())
    x = -torch.rand(10000).mul_(2.0).exp2_().mul_(torch.logspace(-40, 30, 10000))
    x = torch.cat([x, torch.tensor([-1e-45, -float("inf"), -1.0, -0.5])])
    with fusedops.use_backend("cpp"):
        assert int(O.kernel_codes(x, False, "cpp").max()) == 0


def _table_points():
    """float32 bit patterns: every midpoint of both maps and its neighbours, bucket edges,
    random floats, zeros, infinities and NaNs of both signs (with payloads)."""
    rng = np.random.default_rng(3)
    pts = [rng.integers(0, 2 ** 32, 200000, dtype=np.uint64).astype(np.uint32)]
    for code in (O.signed_map(), O.unsigned_map()):
        mids = R.code_midpoints(code).numpy().astype(np.float32).view(np.uint32).astype(np.int64)
        for d in (-1, 0, 1):
            pts += [(mids + d).astype(np.uint32), ((mids + d) ^ 0x80000000).astype(np.uint32)]
    edges = (np.arange(O.BUCKETS + 2, dtype=np.int64) + O.BUCKET_BASE - 1) << O.BUCKET_SHIFT
    for d in (-1, 0, 1):
        pts += [(edges + d).astype(np.uint32), ((edges + d) ^ 0x80000000).astype(np.uint32)]
    pts.append(np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7FFFFFFF, 0xFFFFFFFF,
                         0x7F800001, 0x3F800000, 0xBF800000, 1, 0x80000001], dtype=np.uint32))
    return np.concatenate(pts)


def test_cuda_quantizer_forms_with_complemented_table():
    """The CUDA AdamW / Adam kernel's quantizer forms (csrc/cuda/optim8bit.cu quantize_c and
    quantize_unsigned_half_c, on the table with thr complemented in shared memory) give
    quantize's codes for every kind of float: numpy models of the three, bit for bit."""
    bits = _table_points()
    x = bits.view(np.float32)
    neg = x < 0
    a = bits & np.uint32(0x7FFFFFFF)
    mant_n = np.where(neg, (a & O.MANT) ^ O.MANT, a & O.MANT).astype(np.uint32)
    for code, signed in ((O.signed_map(), True), (O.unsigned_map(), False)):
        tab = O.bucket_table(code, signed).numpy().view(np.uint32)
        # quantize (csrc/optim8bit.h), the form every backend uses
        k = np.clip((a >> O.BUCKET_SHIFT).astype(np.int64) - O.BUCKET_BASE, 0, O.BUCKETS - 1)
        e = tab[np.where(neg, k + O.BUCKETS, k)]
        want = (e >> 23).astype(np.int64) + (mant_n > (e & O.MANT))
        # quantize_c: complemented thr, key clamped to [base, base + buckets - 1]
        tc = tab ^ np.uint32(O.MANT)
        key = np.clip((a >> O.BUCKET_SHIFT).astype(np.int64), O.BUCKET_BASE, O.BUCKET_BASE + O.BUCKETS - 1)
        ec = tc[np.where(neg, key + O.BUCKETS, key) - O.BUCKET_BASE].astype(np.uint64)
        got = ((ec + mant_n) >> 23).astype(np.int64)
        assert np.array_equal(got, want), f"quantize_c differs ({'signed' if signed else 'unsigned'})"
        if not signed:  # quantize_unsigned_half_c: the x >= 0 half only, code 0 for x < 0
            eh = tc[key - O.BUCKET_BASE].astype(np.uint64)
            got = np.where(neg, 0, ((eh + (a & O.MANT)) >> 23).astype(np.int64))
            assert np.array_equal(got, want), "quantize_unsigned_half_c differs"


def _edge_states(ps):
    s1, a1, s2, a2 = [], [], [], []
    for i, p in enumerate(ps):
        blocks = -(-p.numel() // 256)
        if i == 2:  # 32-bit states
            s1.append(torch.randn(p.shape) * 1e-3); a1.append(torch.zeros(0))
            s2.append(torch.rand(p.shape) * 1e-5); a2.append(torch.zeros(0))
        else:
            s1.append(torch.randint(0, 256, p.shape, dtype=torch.uint8)); a1.append(torch.rand(blocks) * 1e-2)
            s2.append(torch.randint(0, 256, p.shape, dtype=torch.uint8)); a2.append(torch.rand(blocks) * 1e-4)
    return s1, a1, s2, a2


def _same_bits(a, b):  # equal bits, NaNs at the same places (CPU and GPU NaN payloads differ)
    if not a.is_floating_point():
        return torch.equal(a, b)
    na, nb = a.isnan(), b.isnan()
    it = torch.int16 if a.element_size() == 2 else torch.int32
    return torch.equal(na, nb) and torch.equal(a[~na].view(it), b[~nb].view(it))


def _misaligned(t):  # the same values at element offset 1 of a buffer
    buf = torch.zeros(t.numel() + 1, dtype=t.dtype, device=t.device)
    buf[1:] = t.reshape(-1)
    return buf[1:].view(t.shape)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["adamw", "adam"])
def test_gpu_cuda_adam_edge_blocks_give_the_cpu_bits(kind, dtype):
    """The CUDA AdamW / Adam kernel gives the C++ CPU kernel's bits on every path: aligned
    full blocks (the hot path), tails, a misaligned param and grad, 32-bit states, and
    blocks whose absmax is subnormal, infinite or 0, with NaN / Inf grads; two steps."""
    require("cuda", "cuda")
    torch.manual_seed(5)
    sizes = [(65536,), (4097,), (3000,), (300, 257), (8192,)]
    ps = [(torch.randn(s) * 0.1).to(dtype) for s in sizes]
    gs = [(torch.randn(s) * torch.logspace(-30, 2, s[-1])[torch.randperm(s[-1])]).to(dtype) for s in sizes]
    g = gs[0]
    g[0:256] = 0.0
    g[0:256:7] = 1e-20           # block 0: v's absmax subnormal, with zeros
    g[256:512] = 1e20            # block 1: v overflows to inf
    g[512] = float("nan")
    g[513] = float("inf")
    g[1024:1280] = 0.0           # block 4: all zero (with its states zeroed below)
    s1, a1, s2, a2 = _edge_states(ps)
    for a in (a1[0], a2[0]):
        a[0:2] = 0.0
        a[4] = 0.0
    lists = [ps, gs, s1, a1, s2, a2]
    cpu = [[t.clone() for t in lst] for lst in lists]
    gpu = [[t.cuda() for t in lst] for lst in lists]
    for li in (0, 1):  # tensor 4: misaligned param and grad (the general path)
        gpu[li][4] = _misaligned(gpu[li][4])
    args = (kind, 1e-3, 0.9, 0.999, 1e-8, 0.05, 3)
    for _ in range(2):
        with fusedops.use_backend("cpp"):
            fusedops.optimizer_step_8bit_(*cpu, *args)
        with fusedops.use_backend("cuda"):
            fusedops.optimizer_step_8bit_(*gpu, *args)
    for li, name in enumerate(["params", "grads", "state1", "absmax1", "state2", "absmax2"]):
        for i, (a, b) in enumerate(zip(cpu[li], gpu[li])):
            assert _same_bits(a, b.cpu().contiguous()), f"{name}[{i}] differs from the CPU kernel"


# ---- review fixes: SGD momentum 0, copies, foreign state_dicts, dtypes, overlap names ------

@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_sgd_momentum0_matches_torch_sgd(weight_decay):
    """The default SGD8bit (momentum=0) is plain SGD with no state: torch SGD's ops, so
    bitwise equal, for contiguous, non-contiguous and bf16 params, over several steps."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(64, 80)), torch.nn.Parameter(torch.randn(80, 64).t()),
          torch.nn.Parameter(torch.randn(5000).bfloat16()), torch.nn.Parameter(torch.randn(7))]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ours = SGD8bit(ps, lr=0.05, weight_decay=weight_decay)
    theirs = torch.optim.SGD(twin, lr=0.05, weight_decay=weight_decay)
    for _ in range(4):
        for p, t in zip(ps, twin):
            g = torch.randn(p.shape).to(p.dtype)
            p.grad, t.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        for p, t in zip(ps, twin):
            assert torch.equal(p, t)
    assert all(set(ours.state[p]) == {"step"} and ours.state[p]["step"] == 4 for p in ps)
    # a state_dict round trip and override_32bit on such a param work too
    fresh = SGD8bit([torch.nn.Parameter(p.detach().clone()) for p in ps], lr=0.05, weight_decay=weight_decay)
    fresh.load_state_dict(ours.state_dict())
    ours.override_32bit(ps[0])
    assert fresh.state[fresh.param_groups[0]["params"][0]] == {"step": 4}


def test_sgd_momentum_changed_between_steps_as_torch():
    """Momentum switched on after plain-SGD steps (and off again) behaves as torch SGD: the
    first step with momentum starts the buffer at g (32-bit states: close to torch's), and
    the optimizer's own state_dict loads in every phase."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(20, 30))]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ours = SGD8bit(ps, lr=0.05, optim_bits=32)
    theirs = torch.optim.SGD(twin, lr=0.05)
    for phase, momentum in enumerate((0.0, 0.9, 0.0)):
        for opt in (ours, theirs):
            opt.param_groups[0]["momentum"] = momentum
        for _ in range(3):
            for p, t in zip(ps, twin):
                g = torch.randn(p.shape)
                p.grad, t.grad = g.clone(), g.clone()
            ours.step()
            theirs.step()
        for p, t in zip(ps, twin):
            torch.testing.assert_close(p, t, rtol=1e-6, atol=1e-6, msg=lambda m: f"phase {phase}: {m}")
        fresh = SGD8bit([torch.nn.Parameter(p.detach().clone()) for p in ps], lr=0.05, optim_bits=32)
        fresh.load_state_dict(ours.state_dict())


def _train(opt, params, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


@pytest.mark.parametrize("when", ["before_first_step", "after_a_step"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_optimizer_deepcopy_and_pickle_step_like_the_original(how, when):
    import pickle

    torch.manual_seed(3)
    ps = [torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(6000)),
          torch.nn.Parameter(torch.randn(30))]
    opt = AdamW8bit(ps, lr=1e-2)
    opt.override_32bit(ps[1])
    if when == "after_a_step":
        _train(opt, ps[:1], 1, 0)   # ps[1] and ps[2] still without state
    clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    cps = clone.param_groups[0]["params"]
    assert all(c is not p and torch.equal(c, p) for c, p in zip(cps, ps))
    _train(opt, ps, 3, 1)
    _train(clone, cps, 3, 1)
    for p, c in zip(ps, cps):
        assert torch.equal(p, c)
        for k, v in opt.state[p].items():
            w = clone.state[c][k]
            assert (torch.equal(v, w) and v.dtype == w.dtype) if torch.is_tensor(v) else v == w
    assert clone.state[cps[1]]["state1"].dtype == torch.float32  # the override_32bit set came along
    assert clone.state[cps[0]]["state1"].dtype == torch.uint8


def _snapshot(opt):
    groups = [{k: (list(v) if k == "params" else v) for k, v in g.items()} for g in opt.param_groups]
    state = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for p, s in opt.state.items()}
    return groups, state


def _same_snapshot(a, b):
    (ga, sa), (gb, sb) = a, b
    assert len(ga) == len(gb) and sa.keys() == sb.keys()
    for x, y in zip(ga, gb):
        assert x.keys() == y.keys() and all(u is v for u, v in zip(x["params"], y["params"]))
        assert all(x[k] == y[k] for k in x if k != "params")
    for pid in sa:
        assert sa[pid].keys() == sb[pid].keys()
        for k in sa[pid]:
            assert torch.equal(sa[pid][k], sb[pid][k]) if torch.is_tensor(sa[pid][k]) else sa[pid][k] == sb[pid][k]


def test_load_state_dict_of_another_optimizer_is_refused_before_any_change():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5000))
    ref = torch.optim.AdamW([p])
    p.grad = torch.randn(5000)
    ref.step()
    opt = AdamW8bit([p])
    _train(opt, [p], 1, 0)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"state of parameter 0 \(param 0 of param group 0\) has step, exp_avg, "
                                         r"exp_avg_sq, not the states of AdamW8bit \(step, state1, absmax1"):
        opt.load_state_dict(ref.state_dict())
    _same_snapshot(before, _snapshot(opt))
    # a Lion8bit state in an AdamW8bit: names what is missing
    lion = Lion8bit([p])
    _train(lion, [p], 1, 0)
    with pytest.raises(ValueError, match="missing: state2, absmax2"):
        opt.load_state_dict(lion.state_dict())
    # torch SGD's momentum_buffer in SGD8bit; a group of another optimizer without state
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    _train(sgd, [p], 1, 0)
    with pytest.raises(ValueError, match="unexpected: momentum_buffer"):
        SGD8bit([p], lr=0.1, momentum=0.9).load_state_dict(sgd.state_dict())
    with pytest.raises(ValueError, match="param group 0 lacks min_8bit_size, optim_bits"):
        AdamW8bit([p]).load_state_dict(torch.optim.AdamW([p]).state_dict())
    _same_snapshot(before, _snapshot(opt))
    _train(opt, [p], 1, 1)  # still steps


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64], ids=str)
def test_unsupported_param_dtypes_are_refused_when_added(dtype):
    a = torch.nn.Parameter(torch.randn(10))
    bad = torch.nn.Parameter(torch.randn(10).to(dtype))
    with pytest.raises(TypeError, match=rf"AdamW8bit: param 1 of param group 0 is {dtype}"):
        AdamW8bit([a, bad])
    with pytest.raises(TypeError, match=rf"SGD8bit: param 0 of param group 1 is {dtype}"):
        SGD8bit([{"params": [a]}, {"params": bad, "lr": 0.1}])
    opt = Lion8bit([a])
    _train(opt, [a], 1, 0)
    before = _snapshot(opt)
    a0 = a.detach().clone()
    with pytest.raises(TypeError, match=rf"Lion8bit: param 1 of param group 1 is {dtype}"):
        opt.add_param_group({"params": iter([torch.nn.Parameter(torch.randn(3)), bad]), "lr": 0.5})
    _same_snapshot(before, _snapshot(opt))
    assert torch.equal(a, a0) and len(opt.param_groups) == 1 and bad not in opt.state
    opt.add_param_group({"params": iter([torch.nn.Parameter(torch.randn(3))])})  # a generator still works
    assert len(opt.param_groups[1]["params"]) == 1


def test_overlapping_params_error_names_group_and_index():
    base = torch.randn(12000)
    a, b = torch.nn.Parameter(base[:5000]), torch.nn.Parameter(base[1000:6000])
    first = torch.nn.Parameter(torch.randn(5000).bfloat16())  # another bucket: shifts the fp32 bucket's indices
    opt = AdamW8bit([{"params": [torch.nn.Parameter(torch.randn(8))]}, {"params": [first, a, b]}])
    for p in (first, a, b):
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"AdamW8bit.step: param 2 of param group 1 overlaps param 1 of param "
                                         r"group 1 in memory"):
        opt.step()
    # at the op level the names are the lists' own
    st = [torch.full((5000,), 127, dtype=torch.uint8) for _ in range(2)]
    ab = [torch.zeros(20) for _ in range(2)]
    with pytest.raises(ValueError, match=r"params\[1\] overlaps params\[0\]"):
        fusedops.optimizer_step_8bit_([a.detach(), b.detach()], [torch.ones(5000)] * 2, st, ab, [], [], "lion",
                                      1e-3, 0.9, 0.99, 0.0, 0.0, 1)


def test_meta_params_step_like_torch():
    p = torch.nn.Parameter(torch.empty(5000, device="meta"))
    q = torch.nn.Parameter(torch.empty(10, device="meta"))
    opt = AdamW8bit([p, q])
    p.grad, q.grad = torch.empty(5000, device="meta"), torch.empty(10, device="meta")
    opt.step()
    assert opt.state[p]["state1"].device.type == "meta" and opt.state[p]["step"] == 1


@pytest.mark.parametrize("cls", [AdamW8bit, SGD8bit, Lion8bit])
def test_inference_param_outside_inference_mode_is_refused(cls):
    """As eager's optimizers: a param that is an inference tensor is refused outside
    inference_mode (named by its place in its param group) before anything changes (params,
    states, step counts); the op names params[i]. Inside inference_mode the step runs."""
    with torch.inference_mode():
        inf = torch.randn(300)
    inf.grad = torch.randn(300)
    good = torch.nn.Parameter(torch.randn(300))
    good.grad = torch.randn(300)
    before_good, before_inf = good.detach().clone(), inf.clone()
    opt = cls([good, inf], lr=0.1)
    with pytest.raises(RuntimeError, match="param 1 of param group 0: Inplace update to inference tensor"):
        opt.step()
    assert torch.equal(good.detach(), before_good) and torch.equal(inf, before_inf) and not opt.state
    with pytest.raises(RuntimeError, match=r"optimizer_step_8bit_: params\[0\]: Inplace update to inference"):
        O.optimizer_step_8bit_([inf], [inf.grad], [torch.zeros(300)], [torch.empty(0)], [], [], kind="sgd", lr=0.1,
                               beta1=0.0, beta2=0.0, eps=0.0, weight_decay=0.0, step=1, first=True)
    assert torch.equal(inf, before_inf)
    with torch.inference_mode():
        opt.step()
    assert not torch.equal(inf, before_inf) and not torch.equal(good.detach(), before_good)
    # an inference param without a grad is not stepped, so not refused (as eager)
    inf.grad = None
    opt.step()


@pytest.mark.parametrize("cls", [AdamW8bit, SGD8bit])
def test_compiled_training_step_runs_step_eagerly(cls):
    """A compiled training step that calls step() (the whole step under torch.compile) runs
    step() eagerly: no recompilation at every step (the step count, a Python int, is a kernel
    argument; a traced step() recompiled on it), and the params of the eager loop."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    kw = dict(lr=1e-2, momentum=0.9) if cls is SGD8bit else dict(lr=1e-2)
    opts = [cls(m.parameters(), **kw) for m in models]
    x, y = torch.randn(8, 16), torch.randn(8, 4)

    def make_step(m, opt):
        def train_step():
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return train_step

    eager = make_step(models[0], opts[0])
    compiled = torch.compile(make_step(models[1], opts[1]), backend="eager")
    compiled()  # the first call compiles; later calls must reuse what it compiled
    eager()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(4):
            compiled()
            eager()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    assert opts[1].state[next(models[1].parameters())]["step"] == 5
    torch._dynamo.reset()


# ---- param layouts: states in the param's memory order ---------------------------------------

CL_SHAPE = (16, 32, 3, 3)   # 4608 elements: 8-bit states
CL_SMALL = (4, 8, 3, 3)     # 288: fp32 states


def _nhwc(t):
    """A channels_last tensor seen in its memory order (a contiguous view); a contiguous
    NHWC tensor has the same memory order."""
    return t.permute(0, 2, 3, 1)


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("cls,kw", [(AdamW8bit, {}), (Lion8bit, {}), (SGD8bit, dict(momentum=0.9))],
                         ids=["adamw", "lion", "sgd"])
def test_channels_last_params_step_in_place_in_their_memory_order(dev_backend, cls, kw):
    """A channels_last param (a conv weight) gets channels_last states and is updated in
    place, without copies: bitwise the step of a contiguous NHWC param (the same memory
    order), with grads in either layout."""
    device, _ = dev_backend
    torch.manual_seed(0)
    big, small = torch.randn(CL_SHAPE, device=device), torch.randn(CL_SMALL, device=device)
    ps = [torch.nn.Parameter(_cl(big)), torch.nn.Parameter(_cl(small))]
    twins = [torch.nn.Parameter(_nhwc(big).contiguous()), torch.nn.Parameter(_nhwc(small).contiguous())]
    ours, theirs = cls(ps, lr=1e-2, **kw), cls(twins, lr=1e-2, **kw)
    ptrs = [p.data_ptr() for p in ps]
    for step in range(3):
        for p, t in zip(ps, twins):
            g = torch.randn(p.shape, device=device)
            p.grad = g if step == 1 else _cl(g)  # step 1: a contiguous grad (copied into the order)
            t.grad = _nhwc(g).contiguous()
        ours.step()
        theirs.step()
        for p, t in zip(ps, twins):
            assert torch.equal(_nhwc(p), t), f"step {step}"
    assert [p.data_ptr() for p in ps] == ptrs
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in ps)
    for p, t, dtype in zip(ps, twins, (torch.uint8, torch.float32)):
        for k in ("state1", "state2") if cls is AdamW8bit else ("state1",):
            s = ours.state[p][k]
            assert s.dtype == dtype and s.is_contiguous(memory_format=torch.channels_last) and not s.is_contiguous()
            assert torch.equal(_nhwc(s), theirs.state[t][k]), k
            assert torch.equal(ours.state[p]["absmax" + k[-1]], theirs.state[t]["absmax" + k[-1]])
    # with channels_last grads the step runs the step op alone: no copy of any tensor
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    for p in ps:
        p.grad = _cl(torch.randn(p.shape, device=device))
    with Ops() as rec:
        ours.step()
    assert any("optimizer_step_8bit" in op for op in rec.seen), rec.seen  # (the mode sees the ops)
    assert not [op for op in rec.seen if "copy" in op or "clone" in op], rec.seen


def test_param_layout_changed_after_its_states_keeps_the_states_order(dev_backend):
    """States made for a contiguous param keep their order when the param turns
    channels_last: the step copies the param into that order and back, bitwise the step
    of a param that stayed contiguous."""
    device, _ = dev_backend
    torch.manual_seed(1)
    w = torch.randn(CL_SHAPE, device=device)
    p, twin = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ours, theirs = AdamW8bit([p], lr=1e-2), AdamW8bit([twin], lr=1e-2)
    for step in range(3):
        if step == 1:
            p.data = _cl(p.data)
        g = torch.randn(CL_SHAPE, device=device)
        p.grad, twin.grad = (_cl(g) if step else g.clone()), g.clone()
        ours.step()
        theirs.step()
        assert torch.equal(p, twin), f"step {step}"
    assert p.is_contiguous(memory_format=torch.channels_last) and ours.state[p]["state1"].is_contiguous()
    assert torch.equal(ours.state[p]["state2"], theirs.state[twin]["state2"])


def test_channels_last_states_survive_state_dict_and_override_32bit(dev_backend):
    """A state_dict of channels_last states loads into an optimizer over a contiguous param
    (the states keep their layout: their blocks' order) and resumes bitwise; a layout
    mix-up in the uint8 states is refused before anything changes; override_32bit
    dequantizes in the states' order."""
    device, _ = dev_backend
    torch.manual_seed(2)
    w = torch.randn(CL_SHAPE, device=device)
    p = torch.nn.Parameter(_cl(w))
    ours = AdamW8bit([p], lr=1e-2)
    grads = [torch.randn(CL_SHAPE, device=device) for _ in range(4)]
    for g in grads[:2]:
        p.grad = _cl(g)
        ours.step()
    sd = ours.state_dict()
    q = torch.nn.Parameter(p.detach().contiguous())
    fresh = AdamW8bit([q], lr=1e-2)
    fresh.load_state_dict(sd)
    assert fresh.state[q]["state1"].is_contiguous(memory_format=torch.channels_last)
    for g in grads[2:]:
        p.grad, q.grad = _cl(g), g.clone()
        ours.step()
        fresh.step()
        assert torch.equal(p, q)
    bad = copy.deepcopy(ours.state_dict())
    bad["state"][0]["state2"] = bad["state"][0]["state2"].contiguous()
    other = AdamW8bit([torch.nn.Parameter(p.detach().clone())], lr=1e-2)
    with pytest.raises(ValueError, match="8-bit states of parameter 0 .* strides"):
        other.load_state_dict(bad)
    assert not other.state
    # override_32bit: the dequantized states equal those of a contiguous NHWC twin's
    twin = torch.nn.Parameter(_nhwc(p.detach()).contiguous())
    theirs = AdamW8bit([twin], lr=1e-2)
    theirs.load_state_dict({"state": {0: {k: (_nhwc(v).contiguous() if k.startswith("state") else v)
                                           for k, v in ours.state_dict()["state"][0].items()}},
                            "param_groups": ours.state_dict()["param_groups"]})
    ours.override_32bit(p)
    theirs.override_32bit(twin)
    for k in ("state1", "state2"):
        s = ours.state[p][k]
        assert s.dtype == torch.float32 and s.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(_nhwc(s), theirs.state[twin][k]), k
    g = torch.randn(CL_SHAPE, device=device)
    p.grad, twin.grad = _cl(g), _nhwc(g).contiguous()
    ours.step()
    theirs.step()
    assert torch.equal(_nhwc(p), twin)
