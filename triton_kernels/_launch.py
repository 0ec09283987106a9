"""Kernel launches without the JIT's per-call work.

`kernel[grid](*args, **meta)` binds the arguments, specialises each one, builds a cache key
string and looks the compiled kernel up on every call. `launch(kernel, grid, *args, **meta)`
keys the compiled kernel on what the JIT specialises on, computed directly from the
arguments (host µs a launch of the norm forward on an H200's host, bench/NOTES.md round 10:
`kernel[grid]` 19.5, `launch` 13.6, the compiled kernel's own launcher alone 6.2):

- a tensor: its dtype and whether its address is 16-byte aligned;
- an int: equal to 1 (the JIT makes it a constant), else 32- or 64-bit (signed or not) and
  whether it is divisible by 16;
- a float, a bool, None: their type (a bool's value too);
- the keyword arguments (constexprs, num_warps, num_stages): their values;
- the current device.

The key is at least as fine as the JIT's, so a key names one compiled kernel. The first call
of a key goes through `kernel[grid]` (compiling if needed) and keeps the compiled kernel and
the values the JIT binds after the positional arguments (the constexprs and defaults, in
signature order); later calls hand the compiled kernel's launcher the current stream, the
grid and the arguments. Under the interpreter, when a launch hook is set (profilers such as
proton use them) or a pre-run hook is registered on the kernel, every call takes
`kernel[grid]`, so hooks see every launch.
"""
from __future__ import annotations

import torch

from ._config import INTERPRET

try:  # the JIT's internals that the fast path reads; absent in other Triton versions
    from triton import knobs as _knobs
    from triton.knobs import HookChain as _HookChain
    _HOOKS = _knobs.runtime
except ImportError:  # pragma: no cover - other Triton versions
    _HOOKS = _HookChain = None

try:  # the accessor Triton's CUDA driver uses
    from torch._C import _cuda_getCurrentRawStream as _raw_stream
except ImportError:  # pragma: no cover - a CPU-only torch
    def _raw_stream(dev: int) -> int:
        return torch.cuda.current_stream(dev).cuda_stream

_I32_MIN, _I32_MAX, _U64_MIN = -(1 << 31), (1 << 31) - 1, 1 << 63

_cache: dict = {}  # kernel -> {key: (launcher, function, packed metadata, trailing args)}


def _int_spec(a: int):
    if a == 1:
        return 1
    if _I32_MIN <= a <= _I32_MAX:
        return 32 if a & 15 else 33
    return (64 if a < _U64_MIN else 65, a & 15 == 0)


def _spec(a):
    t = type(a)
    if t is int:
        return _int_spec(a)
    if t is float or a is None:
        return t
    if t is bool:  # tagged: True == 1 in Python, but the JIT compiles a bool (u1) and the int 1
        return t, a  # (a constant) apart
    return t, a  # anything else: by value (the JIT rejects what it cannot specialise)


def _key(args) -> tuple:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a.dtype)
            out.append(a.data_ptr() & 15 == 0)
        else:
            out.append(_spec(a))
    return tuple(out)


def _hooked(kernel) -> bool:
    if _HOOKS is None:
        return True
    enter, leave = _HOOKS.launch_enter_hook, _HOOKS.launch_exit_hook
    return ((enter is not None and (type(enter) is not _HookChain or bool(enter.calls)))
            or (leave is not None and (type(leave) is not _HookChain or bool(leave.calls)))
            or bool(getattr(kernel, "pre_run_hooks", None)))


def fast_path_available() -> bool:
    """True where launch() can skip the JIT's per-call work (Triton with the internals it
    reads, not the interpreter)."""
    return not INTERPRET and _HOOKS is not None and torch.cuda.is_available()


def _check_split(kernel, args, meta) -> None:
    """The cached trailing values are right only if the positional arguments are exactly the
    kernel's leading runtime parameters and the keywords are constexprs or launch options."""
    params = getattr(kernel, "params", None)
    if params is None:
        return
    bad = ([p.name for p in params[:len(args)] if p.is_constexpr]
           + [p.name for p in params[len(args):] if not p.is_constexpr and p.name in meta])
    if bad:
        raise TypeError(f"launch({getattr(kernel, '__name__', kernel)}): pass the runtime arguments positionally "
                        f"and the constexprs by keyword (not so: {', '.join(bad)})")


def _first(kernel, grid, args, meta, key, cache):
    _check_split(kernel, args, meta)
    compiled = kernel[grid](*args, **meta)
    if compiled is None or not hasattr(compiled, "packed_metadata") or _hooked(kernel):
        return
    try:
        dev = torch.cuda.current_device()
        binder = kernel.device_caches[dev][4]
        bound = tuple(binder(*args, **meta)[0].values())
    except (AttributeError, IndexError, KeyError, TypeError):  # other Triton internals: no fast path
        return
    cache[key] = (compiled.run, compiled.function, compiled.packed_metadata, bound[len(args):])


def launch(kernel, grid: tuple, *args, **meta) -> None:
    """kernel[grid](*args, **meta), with the JIT's binding skipped after the first call of a
    specialisation. grid: a tuple of 1–3 ints; args: positional, in signature order."""
    if INTERPRET:
        kernel[grid](*args, **meta)
        return
    dev = torch.cuda.current_device()
    key = (dev, _key(args), tuple(meta.items()))
    cache = _cache.get(kernel)
    if cache is None:
        cache = _cache[kernel] = {}
    hit = cache.get(key)
    if hit is None or _hooked(kernel):
        _first(kernel, grid, args, meta, key, cache)
        return
    run, function, packed, tail = hit
    n = len(grid)
    run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, _raw_stream(dev),
        function, packed, None, None, None, *args, *tail)


def cached_specialisations(kernel) -> int:
    """How many specialisations of `kernel` launch() has kept (a test hook)."""
    return len(_cache.get(kernel, ()))


def cdiv(a: int, b: int) -> int:
    """-(-a // b) in plain Python (triton.cdiv is a constexpr function: ~2 µs a host call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 ≥ n (0 for 0), as triton.next_power_of_2, in plain Python."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
