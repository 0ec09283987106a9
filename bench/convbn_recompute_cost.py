"""What the conv+BN recompute costs per byte it saves, conv by conv, in the report's
ResNet-50 (batch 128, 224², channels_last, bf16 autocast), and the compiled training step
under per-layer memory choices (CUDA).

    python bench/convbn_recompute_cost.py [STEPS]

Part 1: every ConvBNAct2d's conv forward (the op the recompute repeats in backward), timed
alone (triton.testing.do_bench, median) against the bytes of its output (what
memory="fast" keeps): µs per MiB saved, with the conv's K = C_in/groups · kh · kw (MACs per
output element). Sorted by µs/MiB, with running totals.
Part 2: fusedops+compile with each policy (one model at a time): peak allocated memory over
the steps, the median wall step, and the device time a step (the kernels' time under the
profiler, 3 steps): the device time does not depend on how fast the host is. "auto" is
the modules' default (kernels larger than 1x1 and 1x1 convs that narrow the channels 4x
keep y, the other 1x1 convs recompute it).
"""
from __future__ import annotations

import statistics
import sys

import torch
import torch.nn.functional as F
import triton.testing
from torch.profiler import ProfilerActivity, profile

from fusedops.nn_convbn import ConvBNAct2d, resolved_memory
from fusedops.report import models, runner

POLICIES = ("recompute", "auto", "fast")


def conv_costs(workload, base, dev):
    fwd, plain, _rep, _opt, _desc = runner.build_variant(workload, base, "fusedops", dev)
    inputs = {}

    def keep(name):
        def hook(_module, args):
            inputs.setdefault(name, args[0].detach())
        return hook

    hooks = [m.register_forward_pre_hook(keep(n)) for n, m in plain.named_modules() if isinstance(m, ConvBNAct2d)]
    with torch.no_grad():
        fwd(*runner.prepare_batch(workload, 0, dev))
    for h in hooks:
        h.remove()
    mods = dict(plain.named_modules())
    rows = []
    for name, x in inputs.items():
        conv = mods[name].conv
        xb, wb = x.to(torch.bfloat16), conv.weight.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        call = lambda: F.conv2d(xb, wb, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        y = call()
        us = triton.testing.do_bench(call, warmup=10, rep=50, return_mode="median") * 1e3
        k = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
        rows.append((name, tuple(conv.kernel_size), k, y.numel() * y.element_size() / 2**20, us,
                     resolved_memory("auto", conv)))
    del fwd, plain
    return rows


def step_costs(workload, base, dev, policy, steps):
    """policy None: the compile variant (torch's own conv + BN)."""
    fwd, plain, _rep, opt, _desc = runner.build_variant(workload, base, "compile" if policy is None
                                                        else "fusedops+compile", dev)
    for m in plain.modules():
        if isinstance(m, ConvBNAct2d):
            m.memory = policy

    def step(k):   # the report's timed step (the batch made outside the timed region)
        return runner.timed_step(workload, fwd, opt, k, dev)[0]

    for k in range(3):
        step(k)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = [step(k) for k in range(steps)]
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    wall = statistics.median(runner.elapsed_ms(times, dev))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for k in range(3):
            step(k)
        torch.cuda.synchronize()
    # kernels, copies and memsets; not the ranges of torch.optim's record_function annotations
    # ("Optimizer.step#..."), which the profiler also lists as device events (torch 2.11:
    # without is_user_annotation set) spanning the optimizer's kernels and the gaps between them
    device = sum(e.time_range.elapsed_us() for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation
                 and not e.name.startswith("Optimizer.")) / 3e3
    del fwd, plain, opt
    torch._dynamo.reset()
    runner._free(dev)
    return peak, wall, device


def main():
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    dev = torch.device("cuda")
    workload = models.resnet50()
    base = workload.build()
    rows = conv_costs(workload, base, dev)
    runner._free(dev)
    print(f"{'conv':34s} {'k':>5s} {'K':>5s} {'MiB':>7s} {'µs':>7s} {'µs/MiB':>7s} {'cum MiB':>8s} {'cum µs':>8s}"
          f"  auto")
    cum_mib = cum_us = 0.0
    for name, ks, k, mib, us, auto in sorted(rows, key=lambda r: -r[4] / r[3]):
        cum_mib += mib
        cum_us += us
        print(f"{name:34s} {ks[0]}x{ks[1]:<3d} {k:5d} {mib:7.1f} {us:7.1f} {us / mib:7.3f} {cum_mib:8.1f} {cum_us:8.1f}"
              f"  {'keeps' if auto == 'fast' else 'recomputes'}")
    for label, pick in (("kernel > 1x1", lambda r: r[1] != (1, 1)), ("kernel 1x1", lambda r: r[1] == (1, 1)),
                        ("auto keeps", lambda r: r[5] == "fast"), ("auto recomputes", lambda r: r[5] != "fast")):
        sel = [r for r in rows if pick(r)]
        print(f"{label:15s}: {len(sel)} convs, {sum(r[3] for r in sel):7.1f} MiB, {sum(r[4] for r in sel):7.1f} µs "
              f"({sum(r[4] for r in sel) / sum(r[3] for r in sel):.3f} µs/MiB)")
    print()
    print(f"{'policy':10s} {'peak GiB':>9s} {'wall ms':>8s} {'device ms':>10s}   (fusedops+compile, {steps} steps)")
    for policy in (None,) + POLICIES:
        peak, wall, device = step_costs(workload, base, dev, policy, steps)
        print(f"{policy or '(compile)':10s} {peak:9.2f} {wall:8.2f} {device:10.2f}", flush=True)



if __name__ == "__main__":
    main()
