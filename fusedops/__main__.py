"""The fusedops command line: `python -m fusedops bench|report|info` (also the `fusedops` script)."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _sizes(text: str) -> list:
    """--sizes: comma-separated element counts, each an integer >= 0 or 2^k (argparse type:
    a bad value is a usage error, exit 2)."""
    out = []
    for tok in text.split(","):
        tok = tok.strip()
        try:
            n = 1 << int(tok[2:]) if tok.startswith("2^") else int(tok)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{tok!r} is not a size (an integer such as 1048576, or 2^k)") from None
        if n < 0:
            raise argparse.ArgumentTypeError(f"{tok!r}: a size must be >= 0")
        out.append(n)
    return out


def _bench_device(text: str) -> torch.device:
    """--device of bench: cpu or cuda[:i], and available here (argparse type)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: the benchmarks run on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: torch sees no CUDA device here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def cmd_bench(args) -> int:
    from . import benchmark
    from .benchmark import harness

    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fams = list(benchmark.FAMILIES) if args.ops == "all" else [o.strip() for o in args.ops.split(",")]
    unknown = [f for f in fams if f not in benchmark.FAMILIES]
    if unknown:
        print(f"fusedops bench: unknown op family {', '.join(unknown)}; known: {', '.join(benchmark.FAMILIES)}",
              file=sys.stderr)
        return 2
    bad = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if bad:
        print(f"fusedops bench: unknown dtype {', '.join(bad)}; choose from {', '.join(DTYPES)}", file=sys.stderr)
        return 2
    ctx = harness.Context(device=device, dtypes=[DTYPES[d] for d in args.dtypes.split(",")],
                          sizes=args.sizes, compile=not args.no_compile)
    copy_bps = harness.copy_bandwidth(device)
    meta = harness.environment(device, copy_bps)
    meta["defaults"] = {op: k.backend_for(device.type) for op, k in __import__("fusedops")._backend.REGISTRY.items()}
    cases = [c for f in fams for c in benchmark.FAMILIES[f](ctx)]
    if args.cases:
        keys = [k.strip() for k in args.cases.split(",") if k.strip()]
        cases = [c for c in cases if any(k in c.name for k in keys)]
    if args.impls:
        keep = [k.strip() for k in args.impls.split(",") if k.strip()]
        for c in cases:
            c.impls = {label: impl for label, impl in c.impls.items() if label in keep}
        cases = [c for c in cases if c.impls]
    if not cases:
        print("fusedops bench: no case left to run (check --cases / --impls against the case names and "
              "implementation labels of the chosen --ops)", file=sys.stderr)
        return 2
    rows = harness.run_cases(cases, ctx, copy_bps)
    out = Path(args.out or f"bench-out/{device.type}")
    written = harness.write_outputs(rows, meta, out)
    print(f"\n{meta['device']} · torch {meta['torch']} · triton {meta['triton']} · copy {meta['copy_GBps']} GB/s")
    print(harness.render_text(rows))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_info(args) -> int:
    import fusedops
    from . import _backend, _native, _triton
    from ._backend import FallbackWarning

    print(f"fusedops {fusedops.__version__}, torch {torch.__version__}")
    print(f"native extension: {'loaded' if _native.ops is not None else _native.why_missing('cpu')}")
    if _native.ops is not None and hasattr(_native.ops, "cpu_vector_path"):
        vector = _native.ops.cpu_vector_path(torch.empty(0))
        print(f"CPU kernels: {'AVX2 path' if vector else 'portable scalar loops'}"
              + ("" if vector else " (no AVX2 + FMA + F16C on this CPU, or FUSEDOPS_CPU_AVX2=0)"))
    print(f"triton: {'installed' if _triton.installed() else 'not installed'}; interpreter "
          f"{'on' if _triton.interpreting() else 'off'}")
    forced = _backend._forced()
    if forced:
        print(f"backend forced (FUSEDOPS_BACKEND): {forced}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with warnings.catch_warnings():  # (the fallbacks are listed below, not warned about in between)
        warnings.simplefilter("ignore", FallbackWarning)
        for dev in devices:
            for b in ("triton", "cuda" if dev == "cuda" else "cpp"):
                state = "available" if _backend.available(b, dev) else _backend.why_unavailable(b, dev)
                print(f"  {dev:4s} {b:7s} {state}")
            for op, k in _backend.REGISTRY.items():
                try:
                    chosen = k.backend_for(dev)
                    upto = k.cuda_default_upto
                    if upto is not None and dev == "cuda" and not forced:  # chosen by size (see README)
                        small = k.backend_for(dev, upto[1])
                        if small != chosen:
                            chosen = f"{small} for sizes up to {upto[1]}, {chosen} above (size: {k.size})"
                except RuntimeError:  # a forced backend that cannot run here (its reason: above)
                    chosen = f"none: the forced backend {forced!r} cannot run on {dev}"
                print(f"  {dev:4s} {op}: {chosen}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fusedops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="run the microbenchmarks (CUDA if present, else CPU)")
    b.add_argument("--ops", default="all", help="comma-separated op families (default: all)")
    b.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, fp16, bf16")
    b.add_argument("--sizes", default=None, type=_sizes,
                   help="comma-separated sizes for the size-swept families (2^20 or 1048576)")
    b.add_argument("--device", default=None, type=_bench_device, help="cuda or cpu (default: cuda when available)")
    b.add_argument("--out", default=None, help="output folder for results.json/.md/.png (default bench-out/<device>)")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    b.add_argument("--impls", default=None,
                   help="comma-separated implementation labels to time, e.g. eager,fusedops:triton (default: all)")
    b.add_argument("--cases", default=None,
                   help="comma-separated substrings; only cases whose name contains one run, e.g. 'LN+GELU,16x4096'")
    b.set_defaults(func=cmd_bench)
    r = sub.add_parser("report", help="model-level report: time, memory, MFU and loss of whole training steps")
    r.add_argument("--models", default="resnet50,gpt2,mlp",
                   help="comma-separated: resnet50, gpt2, mlp, timm:NAME, hf:NAME, module:function")
    r.add_argument("--tiny", action="store_true", help="tiny configurations (seconds on a CPU)")
    r.add_argument("--steps", type=int, default=None,
                   help="training steps per variant (default 30 on CUDA, 20 on CPU, 4 with --tiny)")
    r.add_argument("--warmup", type=int, default=None,
                   help="untimed warm-up steps among them (default 5 on CUDA, 3 on CPU, 1 with --tiny)")
    r.add_argument("--rounds", type=int, default=None,
                   help="after the training runs, the variants take turns for this many rounds of a few steps "
                        "each; the step time is the median of the rounds' medians (default 5; 0: the median of "
                        "each training run's own timed steps)")
    r.add_argument("--variants", default=None,
                   help="comma-separated: eager, compile, fusedops, fusedops+compile (default: all four on CUDA; "
                        "eager,fusedops on CPU, where inductor compilation takes minutes)")
    r.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    r.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak TFLOP/s for MFU (default: bf16 dense peak of a known GPU, e.g. H100 989)")
    r.add_argument("--backward-thread", default="worker", choices=("worker", "caller"),
                   help="where each variant's CUDA backward runs: the autograd engine's device thread (worker, "
                        "torch's default) or the calling thread (caller: "
                        "torch.autograd.set_multithreading_enabled(False))")
    r.add_argument("--out", default=None, help="output folder for report.json/.md/.png (default report-out/<device>)")
    r.add_argument("--render", default=None, metavar="REPORT_JSON[,...]",
                   help="run nothing: re-render the table, report.md and report.png from report.json files "
                        "(several: their models are merged into one report)")
    r.set_defaults(func=lambda a: __import__("fusedops.report", fromlist=["cmd_report"]).cmd_report(a))
    i = sub.add_parser("info", help="show which backends are available and chosen")
    i.set_defaults(func=cmd_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
