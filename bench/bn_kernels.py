"""Device time of the BatchNorm(+act) kernels over the conv outputs of the report's ResNet-50
(batch 128, 224², bf16, channels_last: 53 BN layers, 2.7 GiB of conv output), against the
bytes each kernel must move (CUDA):

    python bench/bn_kernels.py [--backend cuda] [--act relu] [--iters 5]

One "step" runs the forward kernels (statistics, apply) over the 53 layers in model order,
then the backward (bn_act_backward) in reverse order, each layer on its own tensors, as a
training step meets them (so a kernel rarely finds its inputs in L2). Prints, per kernel
name, the device time a step (torch.profiler, mean of --iters steps), its bytes a step
(y read once for the statistics; y read and z written for apply; y and dz read for the
backward's reduction; y and dz read and dy written for dy) and the share of the copy
bandwidth that makes; then the same per layer shape (a layer's kernels found by their
order in the step: the k-th statistics kernel of a step is layer k's, the k-th backward
kernel layer 53 − 1 − k's).
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import fusedops
from fusedops.benchmark.harness import copy_bandwidth
from fusedops.ops import batchnorm as bn

# (channels, height = width, layers) of ResNet-50's conv outputs at 224² input
RESNET50_BN = [(64, 112, 1), (64, 56, 6), (256, 56, 4), (128, 56, 1), (128, 28, 7), (512, 28, 5), (256, 28, 1),
               (256, 14, 11), (1024, 14, 7), (512, 14, 1), (512, 7, 5), (2048, 7, 4)]
# bytes a step per element of y (2-byte elements), by kernel kind
KIND_BYTES = {"stats": 2, "apply": 4, "bwd_partial": 4, "dy": 6}


def kind_of(name: str) -> str | None:
    for key, kind in (("stats_partial", "stats"), ("apply", "apply"), ("bwd_partial", "bwd_partial"),
                      ("bwd_reduce", "bwd_partial"), ("dy_kernel", "dy")):
        if key in name:
            return kind
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--act", default="relu")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    layers = []
    for c, hw, count in RESNET50_BN:
        for _ in range(count):
            shape = (args.batch, c, hw, hw)
            y = torch.randn(shape, device=dev, dtype=torch.bfloat16, generator=gen).contiguous(
                memory_format=torch.channels_last)
            dz = torch.randn(shape, device=dev, dtype=torch.bfloat16, generator=gen).contiguous(
                memory_format=torch.channels_last)
            w = torch.rand(c, device=dev, generator=gen) + 0.5
            b = torch.randn(c, device=dev, generator=gen)
            layers.append((y, dz, w, b))
    elems = sum(y.numel() for y, *_ in layers)

    def step():
        saved = []
        for y, dz, w, b in layers:
            mean, invstd, _var = bn.bn_stats(y, 1e-5)
            bn.bn_act_apply(y, mean, invstd, w, b, args.act)
            saved.append((mean, invstd))
        for (y, dz, w, b), (mean, invstd) in zip(reversed(layers), reversed(saved)):
            bn.bn_act_backward(dz, y, mean, invstd, w, b, args.act)

    with fusedops.use_backend(args.backend):
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.iters):
                step()
            torch.cuda.synchronize()
    per_name = defaultdict(float)
    kernels = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation:
            per_name[e.name] += e.time_range.elapsed_us() / args.iters
            if kind_of(e.name) is not None:
                kernels.append(e)
    bw = copy_bandwidth(dev) / 1e9
    print(f"backend {args.backend}, act {args.act}, {len(layers)} layers, "
          f"{elems * 2 / 2**30:.2f} GiB of y, copy {bw:.0f} GB/s")
    total = 0.0
    by_kind = defaultdict(float)
    for name, us in sorted(per_name.items(), key=lambda kv: -kv[1]):
        kind = kind_of(name)
        total += us
        if kind is not None:
            by_kind[kind] += us
        floor = f"{KIND_BYTES[kind] * elems / us / 1e3:7.0f} GB/s {KIND_BYTES[kind] * elems / us / 1e3 / bw:6.1%}" \
            if kind is not None else ""
        print(f"  {us:9.1f} µs  {floor:20s}  {name[:110]}")
    for kind, us in by_kind.items():
        floor_us = KIND_BYTES[kind] * elems / bw / 1e3
        print(f"{kind:12s} {us:9.1f} µs a step, floor {floor_us:8.1f} µs ({floor_us / us:.1%})")
    print(f"total        {total:9.1f} µs a step (all kernels of the step)")
    per_shape(layers, kernels, args.iters, bw)


def per_shape(layers, kernels, iters, bw):
    """Mean µs a layer and % of the copy floor, per kernel kind and layer shape."""
    n = len(layers)
    seen = defaultdict(int)
    us = defaultdict(float)  # (layer, kind) -> µs a step
    for e in sorted(kernels, key=lambda e: e.time_range.start):
        kind = kind_of(e.name)
        i = seen[kind] % n
        seen[kind] += 1
        us[(i if kind in ("stats", "apply") else n - 1 - i, kind)] += e.time_range.elapsed_us() / iters
    if any(v != iters * n for v in seen.values()):
        print(f"per shape: kernel counts {dict(seen)} are not {iters} × {n} a kind: not attributed")
        return
    kinds = [k for k in KIND_BYTES if k in seen]
    print(f"\n{'C':>5s} {'H=W':>4s} {'layers':>6s} {'MiB':>6s}" + "".join(f" {k + ' µs (%)':>21s}" for k in kinds))
    shapes = defaultdict(list)
    for i, (y, *_rest) in enumerate(layers):
        shapes[(y.shape[1], y.shape[2])].append(i)
    for (c, hw), idx in shapes.items():
        numel = layers[idx[0]][0].numel()
        row = f"{c:5d} {hw:4d} {len(idx):6d} {numel * 2 / 2**20:6.1f}"
        for k in kinds:
            t = sum(us[(i, k)] for i in idx) / len(idx)
            row += f" {t:13.1f} ({KIND_BYTES[k] * numel / bw / 1e3 / t:5.1%})"
        print(row)


if __name__ == "__main__":
    main()
