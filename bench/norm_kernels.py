"""Device time of each kernel of one norm op's fwd+bwd (CUDA), for kernel work:

    python bench/norm_kernels.py time --backend cuda --n 4096 [--rows 32768] [--act gelu_tanh]
        prints the mean device time of every kernel over 20 fwd+bwd (torch.profiler)
    ncu --profile-from-start off ... python bench/norm_kernels.py ncu --backend cuda --n 4096
        one fwd+bwd between cudaProfilerStart/Stop (after a warm-up), for Nsight Compute

LayerNorm (weight + bias) + activation on bf16 rows (--dtype), or RMSNorm with --rms."""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch

import fusedops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["time", "ncu"])
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--act", default="gelu_tanh")
    ap.add_argument("--rms", action="store_true")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args()
    dev = torch.device("cuda")
    m, n = args.rows, args.n
    dt = getattr(torch, args.dtype)
    x = torch.randn(m, n, device=dev, dtype=dt, requires_grad=True)
    w = (torch.rand(n, device=dev) + 0.5).to(dt).requires_grad_()
    b = None if args.rms else torch.randn(n, device=dev, dtype=dt, requires_grad=True)
    g = torch.randn(m, n, device=dev, dtype=dt)
    params = [x, w] if args.rms else [x, w, b]

    def step():
        if args.rms:
            y = fusedops.rms_norm_act(x, w, 1e-5, args.act)
        else:
            y = fusedops.layer_norm_act(x, w, b, 1e-5, args.act)
        torch.autograd.grad([y], params, [g])

    with fusedops.use_backend(args.backend):
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        if args.mode == "ncu":
            torch.cuda.cudart().cudaProfilerStart()
            step()
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
            return
        iters = 20
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                step()
            torch.cuda.synchronize()
    total = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total[e.name] += e.device_time
    label = f"{args.backend} {'rms' if args.rms else 'ln'}+{args.act} {args.dtype} {m}x{n}"
    for name, us in sorted(total.items(), key=lambda kv: -kv[1]):
        print(f"{label}: {us / iters:8.1f} us  {name[:110]}")
    print(f"{label}: {sum(total.values()) / iters:8.1f} us  total device per fwd+bwd")
    if args.backend == "triton":  # resident programs an SM of each backward launch shape (registers)
        from fusedops.triton_kernels import norm as tn
        for key, occ in tn._OCCUPANCY.items():
            print(f"{label}: triton backward {key[0]}: {occ} programs an SM")


if __name__ == "__main__":
    main()
