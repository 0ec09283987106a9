"""Which implementation runs an op: Triton, CUDA C++, C++ CPU or the eager reference.

Per call, by the device of the op's tensors:
- CUDA tensors: the op's measured default (`Kernels.cuda_default`, numbers beside it),
  then the other GPU backend if the default is unavailable.
- CPU tensors: the C++ CPU kernel.
- `FUSEDOPS_BACKEND=triton|cuda|cpp|reference` (read when fusedops is imported) or
  `with fusedops.use_backend(...)` forces one. `cuda` and `cpp` both name the compiled extension (CUDA C++ on GPU tensors, C++ on
  CPU tensors); `triton` on CPU tensors needs the Triton interpreter (TRITON_INTERPRET=1).
  A forced backend that cannot run raises; it is never silently replaced.
- When no kernel can serve (nothing built, or an input the kernels do not take, such as
  float64), the eager reference runs and a `FallbackWarning` is issued once per reason.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings

from . import _native, _triton

BACKENDS = ("triton", "cuda", "cpp", "reference")
ENV_VAR = "FUSEDOPS_BACKEND"


class FallbackWarning(UserWarning):
    """An op ran its eager reference because no fused kernel could serve the call."""


def _parse(name: str | None, where: str) -> str | None:
    if not name or name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or auto")
    return name


# Read once, at import: use_backend() changes the choice at run time.
_ENV_FORCED = _parse(os.environ.get(ENV_VAR), ENV_VAR)
# Process-wide, not per thread: autograd runs the backward of CUDA ops on its own device
# threads, and a forced backend must reach those ops too.
_stack: list = []  # [(entry token, forced name)], the innermost open block last
_lock = threading.Lock()


def _forced() -> str | None:
    return _stack[-1][1] if _stack else _ENV_FORCED


def current_backend() -> str:
    """The forced backend, or "auto"."""
    return _forced() or "auto"


@contextlib.contextmanager
def use_backend(name: str):
    """Force one backend for the ops run while the block is open: "triton", "cuda", "cpp",
    "reference", or "auto" (the per-device default, ignoring FUSEDOPS_BACKEND).

    Process-wide: it also reaches the backward ops that autograd runs on its own threads
    (run `backward()` inside the block), and other threads' ops while it is open."""
    forced = _parse(name, "use_backend")
    entry = (object(), forced)
    with _lock:
        _stack.append(entry)
    try:
        yield
    finally:
        with _lock:  # this block's own entry: blocks of other threads may close in any order
            for i in range(len(_stack) - 1, -1, -1):
                if _stack[i] is entry:
                    del _stack[i]
                    break


def _native_name(device_type: str) -> str:
    return "cuda" if device_type == "cuda" else "cpp"


def available(backend: str, device_type: str) -> bool:
    if backend == "reference":
        return True
    if backend == "triton":
        return _triton.can_run(device_type)
    return _native.has_kernels(device_type) and backend == _native_name(device_type)


def why_unavailable(backend: str, device_type: str) -> str:
    if backend == "triton":
        return _triton.why_missing(device_type)
    return _native.why_missing(device_type)


_warned: set = set()

# Every op's Kernels, by op name (for introspection, the benchmark CLI and tests).
REGISTRY: dict = {}


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, FallbackWarning, stacklevel=3)


class Kernels:
    """The implementations of one op by backend, and the choice between them.

    `cuda_default` is the backend the benchmark showed faster on CUDA tensors; the op's
    module records the numbers beside it.
    """

    def __init__(self, op: str, *, cuda_default: str, cuda_default_upto: tuple | None = None,
                 size: str = "the hidden size"):
        """cuda_default_upto=(backend, limit): that backend instead for calls whose size (the
        op's own measure, passed to backend_for; `size` says what it is, for `fusedops info`)
        is <= limit."""
        assert cuda_default in ("triton", "cuda")
        assert cuda_default_upto is None or cuda_default_upto[0] in ("triton", "cuda")
        self.op = op
        self.cuda_default = cuda_default
        self.cuda_default_upto = cuda_default_upto
        self.size = size
        self._impls: dict = {}
        self._chosen: dict = {}
        REGISTRY[op] = self

    def register(self, backend: str):
        assert backend in BACKENDS

        def deco(fn):
            self._impls[backend] = fn
            return fn

        return deco

    def backend_for(self, device_type: str, size: int | None = None) -> str:
        """The backend a call on `device_type` tensors runs (raises if a forced one cannot);
        `size` picks between the op's size-dependent CUDA defaults."""
        forced = _forced()
        preferred = self.cuda_default
        upto = self.cuda_default_upto
        if upto is not None and size is not None and size <= upto[1]:
            preferred = upto[0]
        key = (device_type, forced, preferred)
        name = self._chosen.get(key)
        if name is None:
            name = self._chosen[key] = self._choose(device_type, forced, preferred)
        return name

    def _choose(self, device_type: str, forced: str | None, preferred: str | None = None) -> str:
        if forced is not None:
            name = forced if forced in ("triton", "reference") else _native_name(device_type)
            if not available(name, device_type):
                raise RuntimeError(f"fusedops.{self.op}: backend {forced!r} was asked for "
                                   f"({ENV_VAR} or use_backend) but cannot run on {device_type} "
                                   f"tensors: {why_unavailable(name, device_type)}")
            return name
        if device_type == "cuda":
            first = preferred or self.cuda_default
            order = [first, "cuda" if first == "triton" else "triton"]
        else:
            order = ["cpp"]
        for name in order:
            if available(name, device_type):
                return name
        warn_once(f"fusedops.{self.op}: no fused kernel for {device_type} tensors "
                  f"({why_unavailable(order[0], device_type)}); running the eager reference")
        return "reference"

    def get(self, backend: str):
        return self._impls[backend]

    def reference(self, reason: str):
        """The reference implementation, for a call no kernel takes (warned once per reason)."""
        warn_once(f"fusedops.{self.op}: {reason}; running the eager reference")
        return self._impls["reference"]
