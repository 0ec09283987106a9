"""The Triton launch helper (fusedops.triton_kernels._launch): its cache key must separate
every pair of arguments the JIT compiles differently, the fast path must give the JIT's
results, and launch hooks must see every launch."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")
import triton  # noqa: E402

from fusedops.triton_kernels import _launch  # noqa: E402

libtriton = pytest.importorskip("triton._C.libtriton")
if not hasattr(libtriton, "native_specialize_impl"):
    pytest.skip("this Triton has no native_specialize_impl to compare the key with", allow_module_level=True)
from triton.backends.compiler import BaseBackend  # noqa: E402


def _jit_spec(a):
    """What the JIT specialises an argument on (type string, attribute)."""
    return libtriton.native_specialize_impl(BaseBackend, a, False, True, True)


def _assert_refines(values):
    """Each launch-helper key names one JIT specialisation."""
    seen = {}
    for v in values:
        ours, theirs = _launch._key((v,)), _jit_spec(v)
        assert seen.setdefault(ours, theirs) == theirs, (v, ours, theirs, seen[ours])
    return seen


_EDGES = [0, 1, 2, 15, 16, 17, -1, -16, -17, (1 << 31) - 16, (1 << 31) - 1, 1 << 31, (1 << 31) + 16, -(1 << 31),
          -(1 << 31) - 1, -(1 << 31) - 16, (1 << 63) - 1, 1 << 63, (1 << 63) + 16, (1 << 64) - 16]


def test_key_refines_int_specialisation_at_the_edges():
    seen = _assert_refines(_EDGES)
    # and it is not trivially fine-grained: the edges fall in the JIT's classes
    assert len(set(seen.values())) >= 6


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1), min_size=1, max_size=20))
def test_key_refines_int_specialisation(values):
    _assert_refines(values + _EDGES)


def test_key_refines_tensor_float_bool_none_specialisation():
    base = torch.zeros(64, dtype=torch.float32)
    tensors = [base[i:] for i in range(8)] + [base.to(d)[i:] for d in (torch.float16, torch.bfloat16, torch.int64,
                                                                       torch.uint8) for i in (0, 1, 8)]
    values = tensors + [0.5, -1e30, True, False, None, 1, 0]  # (True == 1 and False == 0 in Python)
    seen = _assert_refines(values)
    assert ("*fp32", "D") in seen.values() and ("*fp32", "") in seen.values()


def test_host_cdiv_and_next_power_of_2_match_triton():
    for a in range(0, 300):
        assert _launch.next_power_of_2(a) == triton.next_power_of_2(a)
        for b in (1, 2, 3, 7, 16, 64):
            assert _launch.cdiv(a, b) == triton.cdiv(a, b)
    for a in (1 << 20, (1 << 20) + 1, (1 << 40) - 1):
        assert _launch.next_power_of_2(a) == triton.next_power_of_2(a)


def _scale(x_ptr, n, scale, BLOCK: triton.language.constexpr):
    offs = triton.language.program_id(0) * BLOCK + triton.language.arange(0, BLOCK)
    x = triton.language.load(x_ptr + offs, mask=offs < n)
    triton.language.store(x_ptr + offs, x * scale, mask=offs < n)


def test_split_of_runtime_and_constexpr_arguments_checked():
    kernel = triton.runtime.jit.JITFunction(_scale)  # (not triton.jit: the interpreter's object has no params)
    _launch._check_split(kernel, (None, 1, 2.0), {"BLOCK": 16, "num_warps": 4})  # the right split
    with pytest.raises(TypeError, match="BLOCK"):  # a constexpr passed positionally
        _launch._check_split(kernel, (None, 1, 2.0, 16), {})
    with pytest.raises(TypeError, match="scale"):  # a runtime argument passed by keyword
        _launch._check_split(kernel, (None, 1), {"scale": 2.0, "BLOCK": 16})


# ---- on a GPU: the fast path itself ----------------------------------------------------------

def _add_case(offset: int, n: int, dtype=torch.float32):
    """x, y as unaligned-or-aligned views (offset elements into fresh buffers)."""
    bx = torch.randn(n + offset + 8, device="cuda", dtype=dtype)
    by = torch.randn(n + offset + 8, device="cuda", dtype=dtype)
    return bx[offset:offset + n], by[offset:offset + n]


@pytest.mark.gpu
def test_fast_path_taken_and_equal_to_the_jit(monkeypatch):
    from fusedops.triton_kernels import add as ta
    assert _launch.fast_path_available()
    jit_calls = []
    real_run = ta.add_kernel.run

    def counting_run(*args, **kwargs):
        jit_calls.append(1)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(ta.add_kernel, "run", counting_run)
    for dtype in (torch.float32, torch.bfloat16):
        for offset in (0, 1, 2, 8):  # 16-byte aligned and not (the JIT compiles each apart)
            for n in (1, 16, 17, 3000, 4096):
                for call in range(3):
                    x, y = _add_case(offset, n, dtype)
                    expect = (x.double() + 0.5 * y.double()).to(dtype)
                    before = len(jit_calls)
                    ta.add_(x, y, 0.5)
                    torch.testing.assert_close(x, expect, rtol=0, atol=0)
                    if call > 0:  # the second and later calls of a specialisation skip the JIT
                        assert len(jit_calls) == before, (dtype, offset, n)
    assert _launch.cached_specialisations(ta.add_kernel) >= 2 * 2 * 3


@pytest.mark.gpu
def test_launch_hooks_see_every_launch():
    from triton import knobs

    from fusedops.triton_kernels import add as ta
    seen = []

    def hook(metadata):
        seen.append(metadata.get()["name"] if hasattr(metadata, "get") else metadata)

    x, y = _add_case(0, 1000)
    ta.add_(x, y, 1.0)  # cached
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        for _ in range(3):
            ta.add_(x, y, 1.0)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(seen) == 3
