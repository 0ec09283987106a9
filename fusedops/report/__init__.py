"""`python -m fusedops report`: what fusedops saves on a whole training step.

Trains built-in models (ResNet-50, a GPT-2-small-like transformer, an MLP-block model
whose LayerNorms feed activations directly), timm / transformers models or a user's own
`module:function`, in the variants eager, torch.compile, fusedops (convert + 8-bit
optimizer) and fusedops + torch.compile, from the same initial weights on the same data;
reports step time, throughput, peak memory, saved activations, optimizer state, MFU and
whether the final loss agrees with eager's. Methods: fusedops/report/runner.py.
"""
from __future__ import annotations

import datetime
import platform
import sys
from pathlib import Path

import torch

from . import models, output
from .models import BUILTIN, Workload
from .runner import REFERENCE, VARIANTS, agreement, count_flops, measure_workload, optimizer_state_bytes

DEFAULT_STEPS = {"cuda": (30, 5), "cpu": (20, 3)}   # (steps, warm-up) for the full-size models
TINY_STEPS = (4, 1)
DEFAULT_ROUNDS = 5

METHODS = {
    "step time": "median of the interleaved rounds' medians: after the training runs, every variant alive, "
                 "the variants take turns for a few steps each, round after round (1 untimed step a turn), so "
                 "that a host whose speed drifts moves them alike; with --rounds 0 (or where the rounds failed, "
                 "as the model's 'timing' says), the median over the training run's steps after the warm-up "
                 "(compilation included in the warm-up); CUDA events around "
                 "zero_grad+forward+backward+optimizer.step on CUDA, perf_counter on CPU",
    "peak memory": "torch.cuda.max_memory_allocated over the training run's timed steps (reset after the "
                   "warm-up), less the bytes allocated before the variant was built (the earlier variants, kept "
                   "for the rounds); n/a on CPU",
    "saved act": "bytes of the unique storages autograd saves for backward in one forward "
                 "(saved_tensors_hooks, parameters excluded); n/a for compiled variants",
    "opt state": "sum of numel·element_size of the tensors in optimizer.state",
    "MFU": "FLOPs per step (FlopCounterMode, one fwd+bwd of the eager model) ÷ (peak FLOP/s × median step time)",
    "final loss": "loss on a held-out batch after the N steps (training mode, no grad)",
    "agrees": "|loss − loss_eager| ≤ max(2·|loss_eager − loss_eager_reordered|, 1e-3·max(1, |loss_eager|)), "
              "and the variant's held-out loss fell (before the first step − after the last) by at least half "
              "of eager's fall; where eager's held-out loss did not fall, a loss within that distance is "
              "'no signal', not agreement; eager-reordered = eager from the same init on the same batches "
              "in reverse order",
    "step ÷ eager, mem ÷ eager": "this variant's median step time (peak memory) ÷ eager's: above 1 is slower "
                                 "(more memory)",
}


def environment(device: torch.device) -> dict:
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or
                                                                                   platform.machine()),
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
    }
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    import fusedops
    meta["fusedops"] = fusedops.__version__
    from ..ops import norm
    meta["FUSEDOPS_NORM_COMPILE"] = norm.COMPILE_POLICY   # how converted norms trace under torch.compile
    if device.type == "cpu":
        meta["threads"] = torch.get_num_threads()
    else:
        meta["cudnn.benchmark"] = torch.backends.cudnn.benchmark
    return meta


def run_report(model_specs: list, device: torch.device, variants=VARIANTS, tiny: bool = False,
               steps: int | None = None, warmup: int | None = None, peak_tflops: float | None = None,
               progress: bool = True, backward_thread: str = "worker", rounds: int | None = None) -> dict:
    """Run the report; return the results dict (what report.json holds). backward_thread:
    "worker" (torch's default: a CUDA backward runs on the autograd engine's device thread)
    or "caller" (every variant's backward on the calling thread:
    torch.autograd.set_multithreading_enabled(False)). rounds: the interleaved timing rounds
    (default DEFAULT_ROUNDS; 0: each training run's own median)."""
    if backward_thread not in ("worker", "caller"):
        raise ValueError(f"--backward-thread {backward_thread}: choose worker or caller")
    from ..benchmark.harness import Progress

    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"unknown variant {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    variants = list(dict.fromkeys(["eager"] + list(variants)))
    default_steps, default_warmup = TINY_STEPS if tiny else DEFAULT_STEPS["cuda" if device.type == "cuda" else "cpu"]
    steps = default_steps if steps is None else steps
    if steps < 2:
        raise ValueError(f"--steps {steps}: need at least 2 (one warm-up step, one timed step)")
    if warmup is None:  # the default warm-up, shortened to leave at least one timed step
        warmup = min(default_warmup, steps - 1)
    elif warmup < 0:
        raise ValueError(f"--warmup {warmup}: must be >= 0")
    elif warmup >= steps:
        raise ValueError(f"--warmup {warmup} with --steps {steps}: the warm-up steps are among the steps and at "
                         f"least one must be timed; give --warmup < --steps")
    rounds = DEFAULT_ROUNDS if rounds is None else rounds
    if rounds < 0:
        raise ValueError(f"--rounds {rounds}: must be >= 0")
    if peak_tflops is not None and not (0 < peak_tflops < float("inf")):
        raise ValueError(f"--peak-tflops {peak_tflops:g}: must be a positive number of TFLOP/s")
    workloads = [models.get(s, tiny) for s in model_specs]
    bar = Progress(len(workloads) * (len(variants) + 1)) if progress else None
    meta = environment(device)
    meta["methods"] = METHODS
    meta["backward_thread"] = backward_thread
    results = {"meta": meta, "models": []}
    with torch.autograd.set_multithreading_enabled(backward_thread == "worker"):
        for w in workloads:
            results["models"].append(measure_workload(w, device, variants, steps, warmup, peak_tflops, bar,
                                                      rounds=rounds))
    return results


__all__ = ["BUILTIN", "METHODS", "REFERENCE", "VARIANTS", "Workload", "agreement", "count_flops",
           "measure_workload", "optimizer_state_bytes", "output", "run_report"]


def _print_results(results: dict) -> None:
    meta = results["meta"]
    print(f"\n{meta['device']} · torch {meta['torch']} · triton {meta['triton']} · fusedops {meta['fusedops']} · "
          f"backward on the {meta.get('backward_thread', 'worker')} thread")
    print(output.render_text(results))
    for m in results["models"]:
        flops = f"{m['flops_per_step']:.4g}" if m["flops_per_step"] else f"n/a ({m['flop_error']})"
        print(f"\n{m['model']}: {flops} FLOPs/step; peak {m['peak_flops_source']}")
        opts = {r["variant"]: r["optimizer"] for r in m["runs"] if r["optimizer"]}
        print("  optimizers: " + "; ".join(f"{k}: {v}" for k, v in opts.items()))
        for line in output.summary_lines(m):
            print("  " + line)
        for line in output.note_lines(m):
            print("  note: " + line)
        for line in output._convert_lines(m):
            print("  " + line.lstrip("- ").replace("  - ", "    "))
        for r in m["runs"]:
            if not r["ok"]:
                print(f"  {r['variant']} failed: {r['error']}")


def cmd_report(args) -> int:
    if args.render:
        import json
        paths = [Path(p.strip()) for p in args.render.split(",") if p.strip()]
        results = None
        for path in paths:   # several runs (e.g. one model each) merge into one report
            try:
                part = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                print(f"fusedops report: --render: cannot read {path}: {exc}", file=sys.stderr)
                return 2
            if not (isinstance(part, dict) and isinstance(part.get("meta"), dict)
                    and isinstance(part.get("models"), list)):
                print(f"fusedops report: --render: {path} is not a report.json of `fusedops report` (it needs "
                      f"'meta' and 'models')", file=sys.stderr)
                return 2
            if results is None:
                results = part
            else:
                results["models"] += part["models"]
        out = Path(args.out or paths[0].parent)
        written, notes = output.write_outputs(results, out)
        _print_results(results)
        for n in notes:
            print(n)
        print("\nwrote " + ", ".join(str(p) for p in written))
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fusedops report: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    specs = [s.strip() for s in args.models.split(",") if s.strip()]
    if args.variants is None:
        variants = list(VARIANTS) if device.type == "cuda" else ["eager", "fusedops"]
        if device.type != "cuda":
            print("fusedops report: on CPU the default variants are eager,fusedops "
                  "(add compile variants with --variants)", file=sys.stderr)
    else:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:
        results = run_report(specs, device, variants, tiny=args.tiny, steps=args.steps, warmup=args.warmup,
                             peak_tflops=args.peak_tflops, backward_thread=args.backward_thread,
                             rounds=args.rounds)
    except ValueError as exc:
        print(f"fusedops report: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out or f"report-out/{device.type}" + ("-tiny" if args.tiny else ""))
    written, notes = output.write_outputs(results, out)
    _print_results(results)
    for n in notes:
        print(n)
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0 if all(r["ok"] for m in results["models"] for r in m["runs"]) else 1
