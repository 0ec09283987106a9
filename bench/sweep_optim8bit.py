"""Sweep the variants of the CUDA C++ 8-bit AdamW kernel (csrc/cuda/optim8bit.cu kVariants,
chosen by FUSEDOPS_OPTIM8BIT_VARIANT, read once per process): one fresh Python process per
variant. Each process

- checks bits: 3 AdamW8bit steps over a small set (tails, a misaligned param, 32-bit states,
  blocks of tiny / huge / NaN / Inf grads), fp32 and bf16 params, on CUDA and with the C++
  CPU kernel; prints a digest of every param and state, compared here with the default
  variant's and with the C++ CPU kernel's (computed once, in the first process);
- times the step over the benchmark's set (GPT-2-medium shapes, 96 tensors, 201M params,
  fp32 and bf16): `opt.step()` by triton.testing.do_bench (what `python -m fusedops bench`
  reports) and the bare op replayed from a CUDA graph (device time of the kernel alone).

    python3 bench/sweep_optim8bit.py                      # every variant
    python3 bench/sweep_optim8bit.py --variants default,lean,ctas5

Bytes per step as in fusedops/benchmark/optim8bit.py (fp32: 16 B per param + absmax)."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

# csrc/cuda/optim8bit.cu kVariants (lean_prefetch left out: prefetch at (256, 4) shows its spills)
VARIANTS = ["default", "half_table", "ctas5", "ctas6", "lean", "lean5", "prefetch", "prefetch3", "prefetch_l2",
            "lean_prefetch3", "lean_math", "lean_math5", "lean_math_prefetch3", "lean_mq", "lean_mq5",
            "lean_mq_prefetch3"]
ENV = "FUSEDOPS_OPTIM8BIT_VARIANT"


# -- child: one variant ------------------------------------------------------------------------

def _exact_set(device, dtype):
    """Params and 3 steps of grads, the same values in every process (CPU generator)."""
    import torch
    gen = torch.Generator().manual_seed(1234)
    shapes = [(3 * 4096 + 5,), (300, 257), (1000,), (65536,), (8192,), (4096 + 256,)]
    base = [torch.randn(s, generator=gen).mul_(0.02) for s in shapes]
    grads = [[torch.randn(s, generator=gen).mul_(1e-3) for s in shapes] for _ in range(3)]
    for step in grads:  # blocks of special grads in the 64K tensor
        g = step[3]
        g[0:256] = 0.0
        g[0:256:7] = 1e-21          # tiny v: a block whose absmax is subnormal, with zeros
        g[256:512] = 1e20           # huge: v overflows to inf
        g[512:768:5] = 0.0
        g[512] = float("nan")
        g[513] = float("inf")
        g[1024:1280] = 0.0          # an all-zero block
    ps = []
    for i, b in enumerate(base):
        t = b.to(device=device, dtype=dtype)
        if i == 4:  # misaligned: a view at element offset 1 of a larger buffer
            buf = torch.zeros(t.numel() + 1, device=device, dtype=dtype)
            buf[1:] = t
            t = buf[1:]
        ps.append(torch.nn.Parameter(t))
    gs = [[g.to(device=device, dtype=dtype) for g in step] for step in grads]
    return ps, gs


def _digest(t):
    """sha256 of the bytes, NaNs made one NaN first (payloads differ between CPU and GPU)."""
    import torch
    t = t.detach().cpu().contiguous()
    if t.is_floating_point():
        t = torch.where(t.isnan(), torch.full_like(t, float("nan")), t)
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def exact_digests(device, dtype):
    import torch
    from fusedops.optim import AdamW8bit
    ps, gs = _exact_set(torch.device(device), dtype)
    opt = AdamW8bit(ps, lr=1e-3, weight_decay=1e-2)
    for step in gs:
        for p, g in zip(ps, step):
            if p.storage_offset() == 1:  # the misaligned param gets a misaligned grad too
                buf = torch.zeros(g.numel() + 1, device=g.device, dtype=g.dtype)
                buf[1:] = g
                g = buf[1:]
            p.grad = g
        opt.step()
    out = {}
    for i, p in enumerate(ps):
        out[f"p{i}"] = _digest(p)
        for k, v in opt.state[p].items():
            if torch.is_tensor(v):
                out[f"p{i}.{k}"] = _digest(v)
    return out


def time_set(dtype):
    import torch
    import triton.testing
    import fusedops
    from fusedops.benchmark.optim8bit import _make, gpt2_medium_shapes
    from fusedops.optim import AdamW8bit
    shapes = gpt2_medium_shapes("cuda")
    numel = sum(torch.Size(s).numel() for s in shapes)
    esize = torch.empty(0, dtype=dtype).element_size()
    absmax_bytes = 4 * sum(-(-torch.Size(s).numel() // 256) for s in shapes)
    nbytes = numel * (3 * esize + 4) + 4 * absmax_bytes
    ps = _make(shapes, dtype, torch.device("cuda"))
    opt = AdamW8bit(ps, lr=1e-4)
    opt.step()
    res = {"numel": numel, "bytes": nbytes}
    ms = triton.testing.do_bench(opt.step, warmup=25, rep=200, return_mode="median")
    res["step_ms"] = ms
    try:
        lists = [ps, [p.grad for p in ps]]
        for k in (1, 2):
            lists.append([opt.state[p][f"state{k}"] for p in ps])
            lists.append([opt.state[p][f"absmax{k}"] for p in ps])
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture
            fusedops.optimizer_step_8bit_(*lists, kind="adamw", lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8,
                                          weight_decay=1e-2, step=10)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            fusedops.optimizer_step_8bit_(*lists, kind="adamw", lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8,
                                          weight_decay=1e-2, step=10)
        res["graph_ms"] = triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median")
    except Exception as exc:  # noqa: BLE001  reported, the step time still stands
        res["graph_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    del opt, ps
    torch.cuda.empty_cache()
    return res


def child(with_copy: bool):
    import torch
    from fusedops._backend import use_backend
    out = {"variant": os.environ.get(ENV, "default")}
    with use_backend("cuda"):
        out["exact"] = {str(dt): exact_digests("cuda", dt) for dt in (torch.float32, torch.bfloat16)}
        out["time"] = {str(dt): time_set(dt) for dt in (torch.float32, torch.bfloat16)}
    if with_copy:  # the first process only: the CPU kernel does not depend on the variant
        with use_backend("cpp"):
            out["cpu"] = {str(dt): exact_digests("cpu", dt) for dt in (torch.float32, torch.bfloat16)}
        from fusedops.benchmark.harness import copy_bandwidth
        out["copy_Bps"] = copy_bandwidth(torch.device("cuda"))
        out["device"] = torch.cuda.get_device_name()
    print("RESULT " + json.dumps(out), flush=True)


# -- parent ----------------------------------------------------------------------------------

def run_variant(name: str, with_copy: bool, timeout: float) -> dict:
    env = dict(os.environ)
    env[ENV] = name
    cmd = [sys.executable, os.path.abspath(__file__), "--child"] + (["--copy"] if with_copy else [])
    t0 = time.time()
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": name, "error": f"timed out after {timeout:.0f} s"}
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
            res["wall_s"] = time.time() - t0
            return res
    return {"variant": name, "error": (r.stderr or r.stdout).strip().splitlines()[-3:]}


def mismatches(a: dict, b: dict) -> list:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--copy", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per variant")
    args = ap.parse_args()
    if args.child:
        child(args.copy)
        return
    names = [v for v in args.variants.split(",") if v]
    if names[0] != "default":
        names.insert(0, "default")
    names.append("default")  # again at the end: the run-to-run noise
    results = []
    for i, name in enumerate(names):
        res = run_variant(name, with_copy=i == 0, timeout=args.timeout)
        results.append(res)
        if "error" in res:
            print(f"{name}: FAILED {res['error']}", flush=True)
        else:
            t = res["time"]["torch.float32"]
            print(f"{name}: fp32 step {t['step_ms']:.3f} ms, graph {t.get('graph_ms', float('nan')):.3f} ms "
                  f"({res['wall_s']:.0f} s)", flush=True)
    ref = results[0]
    if "error" in ref:
        sys.exit("the default variant failed: nothing to compare with")
    copy = ref.get("copy_Bps")
    print(f"\n{ref.get('device', '')}  copy {copy / 1e9:.0f} GB/s" if copy else "")
    hdr = (f"{'variant':20s} {'fp32 step':>10s} {'TB/s':>5s} {'fp32 graph':>10s} {'TB/s':>5s} {'%copy':>6s} "
           f"{'bf16 step':>10s} {'bf16 graph':>10s} {'TB/s':>5s}  bits vs default / vs CPU")
    print(hdr)
    print("-" * len(hdr))
    for res in results:
        if "error" in res:
            print(f"{res['variant']:20s} FAILED")
            continue
        f, b = res["time"]["torch.float32"], res["time"]["torch.bfloat16"]
        fg, bg = f.get("graph_ms", float("nan")), b.get("graph_ms", float("nan"))
        pct = f["bytes"] / (fg * 1e-3) / copy * 100 if copy else float("nan")
        checks = []
        for dt in ("torch.float32", "torch.bfloat16"):
            d = mismatches(res["exact"][dt], ref["exact"][dt])
            c = mismatches(res["exact"][dt], ref["cpu"][dt])
            checks.append(f"{dt[6:]}: {'same' if not d else 'DIFF ' + ','.join(d)} / "
                          f"{'same' if not c else 'DIFF ' + ','.join(c)}")
        print(f"{res['variant']:20s} {f['step_ms']:10.3f} {f['bytes'] / f['step_ms'] / 1e9:5.2f} {fg:10.3f} "
              f"{f['bytes'] / fg / 1e9:5.2f} {pct:6.1f} {b['step_ms']:10.3f} {bg:10.3f} "
              f"{b['bytes'] / bg / 1e9:5.2f}  {'; '.join(checks)}")
    exact = []
    for res in results:
        if "error" in res:
            continue
        same = all(not mismatches(res["exact"][dt], ref["cpu"][dt]) for dt in ("torch.float32", "torch.bfloat16"))
        t = res["time"]["torch.float32"]
        if same:
            exact.append((t.get("graph_ms", t["step_ms"]), res["variant"]))
    if exact:
        ms, best = min(exact)
        print(f"fastest with the CPU kernel's bits (fp32 graph): {best} {ms:.3f} ms")
    for res in results:
        for dt in ("torch.float32", "torch.bfloat16"):
            if "error" not in res and "graph_error" in res["time"][dt]:
                print(f"{res['variant']} {dt}: graph timing failed: {res['time'][dt]['graph_error']}")
    print("\nms: medians (triton.testing.do_bench, cold L2); step = opt.step() with its Python, graph = the op "
          "alone from a CUDA graph; TB/s = the benchmark's bytes / time.")


if __name__ == "__main__":
    main()
