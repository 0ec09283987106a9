"""Benchmarks of fused Conv2d + BatchNorm2d + ReLU (fusedops.nn.ConvBNAct2d).

Workload: 4 stacked conv→BN→ReLU blocks (the first cin→cout, possibly stride 2; the
rest cout→cout), channels_last, bf16 autocast on GPU (fp32 on CPU):
- "train": forward + backward (input grad included), time, and per impl on GPU the extra
  peak memory of one step above the memory held before it (torch.cuda.max_memory_allocated
  delta) in Case.params["extra_peak_MiB"]; on CPU, where no allocator peak is kept, the
  bytes of the storages autograd saves for backward in one step (conv weights and the
  block input included; not a peak) in Case.params["autograd_saved_MiB"];
  on GPU also "train ... caller thread": the same step with the backward run on the
  calling thread (torch.autograd.set_multithreading_enabled(False)) rather than handed to
  the autograd engine's CUDA worker thread, and "train ... graph": the step replayed from
  a CUDA graph, the device's work without the host time (these steps are host-bound at
  batch 64);
- "eval": forward under no_grad; fused = fusedops.fold_conv_bn (conv with the folded
  bias + fused bias/ReLU epilogue).
Bytes are the activations the fused kernels must move (no floor for the convs).

The input models a block inside a network: on GPU it is a bf16 channels_last tensor (the
output of a previous bf16 block under autocast, so no fp32→bf16 cast copy is kept), and
its gradient is handed back, not accumulated: x.grad is dropped before and after every
step (no fp32 dX of the whole input, no accumulation transient).
"""
from __future__ import annotations

import copy
import sys

import torch
from torch import nn

import fusedops
from fusedops.nn import ConvBNAct2d

from .. import _backend
from .harness import Case, Impl, compile_fn, family, run_impl

# (label, batch, cin, cout, hw, kernel, stride)
GPU_SHAPES = [
    ("64->64 56^2 k3", 64, 64, 64, 56, 3, 1),
    ("256->64 56^2 k1", 64, 256, 64, 56, 1, 1),
    ("128->128 28^2 k3", 64, 128, 128, 28, 3, 1),
    ("512->256 14^2 k1", 64, 512, 256, 14, 1, 1),
    ("128->128 56^2 k3 s2", 64, 128, 128, 56, 3, 2),
]
# CPU: a tiny block (host time: Python and dispatch) and a small real one (the kernels)
CPU_SHAPES = [("8->8 16^2 k3", 2, 8, 8, 16, 3, 1), ("64->64 28^2 k3", 8, 64, 64, 28, 3, 1)]


def eager_blocks(cin, cout, k, stride, device) -> nn.Sequential:
    layers = []
    for i in range(4):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, k, stride if i == 0 else 1, k // 2, bias=False),
                   nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers).to(device).to(memory_format=torch.channels_last)


def fused_blocks(eager: nn.Sequential, memory: str) -> nn.Sequential:
    model = copy.deepcopy(eager)
    fusedops.convert(model)
    for m in model.modules():
        if isinstance(m, ConvBNAct2d):
            m.memory = memory
    return model


def block_input(batch, cin, hw, device, autocast) -> torch.Tensor:
    """The 4 blocks' input: bf16 under autocast (what a previous bf16 layer hands over),
    else fp32; channels_last, requires grad."""
    x = torch.randn(batch, cin, hw, hw, device=device).to(memory_format=torch.channels_last)
    return (x.bfloat16() if autocast else x).requires_grad_()


def _step(model, x, gout, autocast, caller_thread=False):
    """One forward + backward. caller_thread: the backward runs on the calling thread
    (torch.autograd.set_multithreading_enabled(False)) instead of the device's autograd
    worker thread, which every CUDA backward is otherwise handed to."""
    def run():
        x.grad = None  # the gradient goes to the previous layer: nothing accumulates
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        if caller_thread:
            with torch.autograd.set_multithreading_enabled(False):
                out.backward(gout)
        else:
            out.backward(gout)
        x.grad = None
    return run


def _eval_step(model, x, autocast):
    """One forward under no_grad. x is bound here, per case: a closure over the loop's
    variable would run every case on the last case's input."""
    def run():
        with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            model(x)
    return run


def extra_peak_mib(fn, device) -> float:
    """CUDA: peak memory of one call above what was allocated before it (MiB). CPU: the
    MiB of the unique storages autograd saves for backward in one call (weights and the
    input included), which is not a peak."""
    fn()  # grads allocated, caches warm
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t.detach()  # t itself would make a reference cycle through the graph (a leak)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values()) / 2**20


def _backends(device) -> list:
    names = ["triton", "cuda"] if device.type == "cuda" else ["cpp"]
    return [b for b in names if _backend.available(b, device.type)]


@family("convbn")
def convbn_cases(ctx) -> list:
    cases = []
    dev = ctx.device
    autocast = ctx.cuda
    for label, batch, cin, cout, hw, k, stride in (GPU_SHAPES if ctx.cuda else CPU_SHAPES):
        if ctx.sizes and batch not in ctx.sizes and hw not in ctx.sizes:
            continue
        torch.manual_seed(0)
        eager = eager_blocks(cin, cout, k, stride, dev)
        x = block_input(batch, cin, hw, dev, autocast)
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            out_shape = eager(x).shape
        gout = torch.randn(out_shape, device=dev).to(memory_format=torch.channels_last)
        if autocast:
            gout = gout.bfloat16()
        act_elems = sum(batch * cout * (hw // stride) ** 2 for _ in range(4))
        elem = 2 if autocast else 4
        # fused BN part per block: stats read y, apply reads y + writes z; backward: reduce
        # reads (dz, y), dy reads (dz, y) + writes dy -> 8 passes over y (convs not counted)
        nbytes = 8 * act_elems * elem
        impls, memory, caller = {}, {}, {}
        impls["eager"] = Impl(_step(eager, x, gout, autocast))
        caller["eager"] = Impl(_step(eager, x, gout, autocast, True))
        if ctx.compile:
            comp = compile_fn(copy.deepcopy(eager))
            impls["torch.compile"] = Impl(_step(comp, x, gout, autocast), compiled=True)
            caller["torch.compile"] = Impl(_step(comp, x, gout, autocast, True), compiled=True)
        for mode in ("recompute", "fast"):
            model = fused_blocks(eager, mode)
            for b in _backends(dev):
                impls[f"fusedops:{b}:{mode}"] = Impl(_step(model, x, gout, autocast), backend=b)
                caller[f"fusedops:{b}:{mode}"] = Impl(_step(model, x, gout, autocast, True), backend=b)
        for name, impl in impls.items():
            try:
                memory[name] = round(run_impl(impl, lambda fn: extra_peak_mib(fn, dev)), 1)
            except Exception as exc:  # reported, not fatal
                sys.stderr.write(f"convbn {label} {name}: memory run failed: {type(exc).__name__}: {exc}\n")
        mem_key = "extra_peak_MiB" if ctx.cuda else "autograd_saved_MiB"
        sys.stderr.write(f"convbn train {label}: {mem_key} {memory}\n")
        cases.append(Case("convbn", f"train {label}", {"shape": label, mem_key: memory,
                                                        "dtype": "bf16 autocast" if autocast else "fp32"},
                          nbytes, impls))
        if ctx.cuda:
            # the backward on the calling thread: no hand-off to the autograd worker thread
            cases.append(Case("convbn", f"train {label} caller thread", {"shape": label}, nbytes, caller))
            # the device's work alone (the steps are host-bound at these sizes)
            cases.append(Case("convbn", f"train {label} graph", {"shape": label}, nbytes, dict(impls),
                              timer="graph"))

        # eval: forward only, no grad
        eval_eager = copy.deepcopy(eager).eval()
        folded = fusedops.fold_conv_bn(copy.deepcopy(eager))
        xe = x.detach()

        eimpls = {"eager": Impl(_eval_step(eval_eager, xe, autocast))}
        if ctx.compile:
            eimpls["torch.compile"] = Impl(_eval_step(compile_fn(copy.deepcopy(eval_eager)), xe, autocast),
                                           compiled=True)
        for b in _backends(dev):
            eimpls[f"fusedops:{b}:folded"] = Impl(_eval_step(folded, xe, autocast), backend=b)
        cases.append(Case("convbn", f"eval {label}", {"shape": label}, 2 * act_elems * elem, eimpls))
    return cases
