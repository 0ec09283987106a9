"""The `fusedops` op namespace and the helper every op is defined through.

Ops are defined with `torch.library.Library.define` (a schema), a Python kernel per
device key, and `register_fake`; differentiable ops add `register_autograd`. This passes
`torch.library.opcheck` and `torch.compile(fullgraph=True)` like `custom_op` does, but a
call costs a few microseconds instead of ~20 (custom_op adds Python ADInplaceOrView and
autograd layers to every call), which matters for small, launch-bound ops.
"""
from __future__ import annotations

import torch

LIB = torch.library.Library("fusedops", "DEF")


def define(schema: str, kernel, fake) -> torch._ops.OpOverload:
    """Define fusedops::<name> from `schema`; `kernel` serves CPU and CUDA tensors (it picks
    the backend per call), `fake` gives output metadata and runs the same checks. Both must
    repeat the schema's defaults: the dispatcher leaves out trailing arguments equal to
    their default.

    Arguments the schema marks as written (`Tensor(a!)`, `Tensor(a!)[]`) get their autograd
    version counters bumped after the kernel, as eager in-place ops do (the dispatcher's
    ADInplaceOrView step is a fallthrough for ops defined this way): a tensor saved for
    backward and then modified by a fusedops op fails loudly in backward, not silently."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    parsed = torch._C.parse_schema(f"fusedops::{schema}")
    written = tuple(i for i, a in enumerate(parsed.arguments) if a.alias_info is not None and a.alias_info.is_write)
    if written:
        inner = kernel

        def kernel(*args):
            out = inner(*args)
            for i in written:
                torch.autograd.graph.increment_version(args[i])
            return out

    LIB.impl(name, kernel, "CPU")
    LIB.impl(name, kernel, "CUDA")
    torch.library.register_fake(f"fusedops::{name}", fake, lib=LIB)
    return getattr(torch.ops.fusedops, name).default


def not_differentiable(op: torch._ops.OpOverload) -> None:
    """Declare `op`'s outputs non-differentiable (as argmax's): they never require grad, so
    a backward that needs a gradient through them fails with autograd's "does not require
    grad", and torch.compile has no backward to trace. Without an autograd registration,
    autograd's fallback gives the outputs a grad_fn that passes a backward through with a
    deprecation warning and no gradient for the inputs: a silently wrong result."""
    name = op.name()

    def setup_context(ctx, inputs, output):
        outs = output if isinstance(output, tuple) else (output,)
        ctx.mark_non_differentiable(*(t for t in outs if isinstance(t, torch.Tensor)))

    def backward(ctx, *grads):  # not reached: no output requires grad
        raise RuntimeError(f"{name} is not differentiable")

    torch.library.register_autograd(name, backward, setup_context=setup_context, lib=LIB)
