"""Argument checks shared by the ops. Each raises before any kernel runs or anything is
written, and names the argument at fault."""
from __future__ import annotations

import bisect

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode as _dispatch_mode

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Tensors the fast host paths hand to the kernels as they are: plain tensors and module
# parameters (an nn.Parameter is a plain tensor for dispatch); other subclasses (DTensor,
# tensors under a dispatch mode, ...) go through the ops.
PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


INFERENCE_WRITE = ("Inplace update to inference tensor outside InferenceMode is not allowed. You can make a "
                   "clone to get a normal tensor before doing inplace update.")


def writable(t: torch.Tensor, name: str, op: str) -> None:
    """Eager's refusal of an in-place write to an inference tensor outside inference_mode
    (such a tensor has no version counter for autograd to check). Not under torch.compile,
    which cannot trace the question (and runs its graphs on tensors of its own)."""
    if not torch.compiler.is_compiling() and t.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(f"fusedops.{op}: {name}: {INFERENCE_WRITE}")


def writable_all(ts, name: str, op: str) -> None:
    """writable for a list (one C-level pass while none is an inference tensor; the error
    names ts[i])."""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return
    if any(map(torch.Tensor.is_inference, ts)):
        i = next(i for i, t in enumerate(ts) if t.is_inference())
        raise RuntimeError(f"fusedops.{op}: {name}[{i}]: {INFERENCE_WRITE}")


def plain_call(*ts) -> bool:
    """The host-time fast paths may call the kernels directly: eager (not under tracing or
    a dispatch mode) and every given tensor plain (None allowed)."""
    if torch.compiler.is_compiling() or _dispatch_mode() is not None:
        return False
    return all(t is None or type(t) in PLAIN_TYPES for t in ts)


def plain_lists(*lists) -> bool:
    """plain_call for tensor lists (every element a plain tensor)."""
    if torch.compiler.is_compiling() or _dispatch_mode() is not None:
        return False
    return all(set(map(type, ts)) <= _PLAIN_SET for ts in lists)


_PLAIN_SET = frozenset(PLAIN_TYPES)


def tensor(t, name: str, op: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fusedops.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def floating(t: torch.Tensor, name: str, op: str) -> None:
    if not t.dtype.is_floating_point:
        raise TypeError(f"fusedops.{op}: {name} must be a floating-point tensor "
                        f"(float32, float16 or bfloat16), got {t.dtype}")


def same_device(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str, op: str) -> None:
    if a.device != b.device:
        raise ValueError(f"fusedops.{op}: {b_name} is on {b.device} but {a_name} is on {a.device}; "
                         "move them to one device")


def broadcastable_to(y: torch.Tensor, y_name: str, shape: torch.Size, x_name: str, op: str) -> None:
    ok = y.dim() <= len(shape) and all(
        ys == 1 or ys == xs for ys, xs in zip(reversed(y.shape), reversed(shape)))
    if not ok:
        raise ValueError(f"fusedops.{op}: {y_name} of shape {tuple(y.shape)} cannot be broadcast "
                         f"to {x_name} of shape {tuple(shape)}")


def _span(t: torch.Tensor) -> tuple[int, int]:
    """Byte range [start, end) that t's elements occupy."""
    if t.numel() == 0:
        return (t.data_ptr(), t.data_ptr())
    extent = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 1)
    start = t.data_ptr()
    return (start, start + extent * t.element_size())


def no_partial_overlap(x: torch.Tensor, x_name: str, y: torch.Tensor, y_name: str, op: str) -> None:
    """x is written while y is read: y must be x itself or lie apart from it (as torch asks)."""
    if x.numel() == 0 or y.numel() == 0:
        return
    xs, xe = _span(x)
    ys, ye = _span(y)
    if xs < ye and ys < xe:
        same = (xs == ys and x.dtype == y.dtype and x.shape == y.shape and x.stride() == y.stride())
        if not same:
            raise ValueError(f"fusedops.{op}: {y_name} partly overlaps {x_name} in memory, which is "
                             f"written in place; pass {y_name}.clone()")


def internal_overlap(x: torch.Tensor, name: str, op: str) -> None:
    """A tensor written in place must not have two elements at one address (expand, stride 0)."""
    if x.numel() > 1 and any(st == 0 and s > 1 for s, st in zip(x.shape, x.stride())):
        raise ValueError(f"fusedops.{op}: {name} has several elements at one memory location "
                         "(an expanded view) and cannot be written in place; pass a real tensor")


def disjoint_writes(xs, ys, op: str, xs_name: str = "xs", ys_name: str = "ys") -> None:
    """One launch writes every xs[i] while reading every ys[j]: no two xs may overlap, and
    no ys[j] may overlap an xs[i] other than being exactly its own xs[j]."""
    spans = sorted((_span(x) + (i,) for i, x in enumerate(xs) if x.numel()), key=lambda s: s[0])
    for (_, end0, i0), (begin1, _, i1) in zip(spans, spans[1:]):
        if begin1 < end0:
            a, b = sorted((i0, i1))
            raise ValueError(f"fusedops.{op}: {xs_name}[{b}] overlaps {xs_name}[{a}] in memory; each "
                             f"tensor written in place may appear once in {xs_name}")
    begins = [s[0] for s in spans]
    for j, y in enumerate(ys):
        if not y.numel():
            continue
        yb, ye = _span(y)
        k = bisect.bisect_left(begins, ye) - 1
        if k < 0 or spans[k][1] <= yb:
            continue
        xb, xe, i = spans[k]
        if i != j:
            raise ValueError(f"fusedops.{op}: {ys_name}[{j}] overlaps {xs_name}[{i}] in memory, which the "
                             f"same launch writes; pass {ys_name}[{j}].clone()")


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (as ATen's is_non_overlapping_and_dense): the elements fill
    their byte range exactly, in some order of the dims."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(x: torch.Tensor, y: torch.Tensor) -> bool:
    return (x.data_ptr() == y.data_ptr() and x.dtype == y.dtype and x.shape == y.shape
            and x.stride() == y.stride())


def no_certain_partial_overlap(x: torch.Tensor, x_name: str, y: torch.Tensor, y_name: str, op: str) -> bool:
    """x is written while y is read. Eager's rule (at::assert_no_partial_overlap): raise only
    where the overlap is certain, i.e. both tensors are dense (non-overlapping and dense:
    their elements fill their byte range exactly) and their ranges intersect without being
    the same tensor. Where one is not dense (a strided view: W[:, 0] and W[:, 1] share a
    byte range but no element) the check cannot decide: nothing is raised and True is
    returned when the ranges meet, so that the caller takes a path that is correct for any
    overlap (it reads y before anything of x is written)."""
    if x.numel() == 0 or y.numel() == 0:
        return False
    xs, xe = _span(x)
    ys, ye = _span(y)
    if not (xs < ye and ys < xe):
        return False
    if not (_dense(x) and _dense(y)):
        return True
    if not _same_layout(x, y):
        raise ValueError(f"fusedops.{op}: {y_name} partly overlaps {x_name} in memory, which is "
                         f"written in place; pass {y_name}.clone()")
    return False


def _meeting_pairs(spans):
    """Pairs (a, b) of tags whose byte ranges intersect; spans: (start, end, tag), end > start."""
    active: list = []
    for start, end, tag in sorted(spans, key=lambda s: s[0]):
        active = [a for a in active if a[0] > start]
        for _, other in active:
            yield other, tag
        active.append((end, tag))


def certain_disjoint_writes(xs, ys, op: str, xs_name: str = "xs", ys_name: str = "ys", x_label=None,
                            y_label=None) -> bool:
    """disjoint_writes with eager's certainty rule: one launch writes every xs[i] while
    reading every ys[j]. Raises where two xs, or a ys[j] and an xs[i] (i != j), are both
    dense and their memory meets; returns True (raising nothing) where ranges meet but a
    tensor involved is not dense (interleaved strided views may share no element: the
    caller must then run the pairs one by one, as eager does). x_label / y_label: index ->
    the name used in messages (default f"{xs_name}[i]" / f"{ys_name}[j]")."""
    x_label = x_label or (lambda i: f"{xs_name}[{i}]")
    y_label = y_label or (lambda j: f"{ys_name}[{j}]")
    undecided = False
    xspans = [_span(x) + (i,) for i, x in enumerate(xs) if x.numel()]
    for a, b in sorted(tuple(sorted(p)) for p in _meeting_pairs(xspans)):
        if _dense(xs[a]) and _dense(xs[b]):
            raise ValueError(f"fusedops.{op}: {x_label(b)} overlaps {x_label(a)} in memory; each "
                             f"tensor written in place may appear once in {xs_name}")
        undecided = True
    allspans = [(s, e, ("x", i)) for s, e, i in xspans] + [_span(y) + (("y", j),) for j, y in enumerate(ys)
                                                            if y.numel()]
    cross = []
    for a, b in _meeting_pairs(allspans):
        if a[0] == b[0]:
            continue
        (_, i), (_, j) = (a, b) if a[0] == "x" else (b, a)
        if i != j:
            cross.append((j, i))
    for j, i in sorted(cross):
        if _dense(ys[j]) and _dense(xs[i]):
            raise ValueError(f"fusedops.{op}: {y_label(j)} overlaps {x_label(i)} in memory, which the "
                             f"same launch writes; pass {y_label(j)}.clone()")
        undecided = True
    return undecided
