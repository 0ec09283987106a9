"""Where a report variant's training step goes (CUDA): dynamo graph/recompile counters,
the step time, and the top kernels and ops by device and host time.

    python bench/profile_report.py OUT_FILE MODEL VARIANT[,VARIANT...] [STEPS]
e.g. python bench/profile_report.py prof.txt gpt2 compile,fusedops+compile
"""
from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from fusedops.report import models
from fusedops.report.runner import _free, build_variant, prepare_batch


def main():
    out_path, spec, variants = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    dev = torch.device("cuda")
    workload = models.get(spec)
    base = workload.build()
    out = open(out_path, "w")
    summary = []
    for variant in variants:
        import torch._dynamo.utils as dutils
        dutils.counters.clear()
        fwd, plain, report, opt, desc = build_variant(workload, base, variant, dev)

        def step(k):
            batch = prepare_batch(workload, k, dev)
            opt.zero_grad(set_to_none=True)
            fwd(*batch).backward()
            opt.step()

        for k in range(steps):
            step(k)
        torch.cuda.synchronize()
        times = []
        for k in range(5):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            step(k)
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for k in range(3):
                step(k)
            torch.cuda.synchronize()
        ms = sorted(times)[2]
        counters = {k: dict(v) for k, v in dutils.counters.items() if v}
        summary.append((variant, ms, counters.get("stats", {}), sum(counters.get("graph_break", {}).values())))
        out.write(f"\n===== {spec} {variant}: {ms:.2f} ms/step (median of 5); optimizer {desc}\n")
        out.write(f"dynamo counters: {counters}\n")
        ka = prof.key_averages()
        out.write(ka.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70))
        out.write(ka.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))
        out.flush()
        del fwd, plain, report, opt
        torch._dynamo.reset()
        _free(dev)
    for v, ms, stats, breaks in summary:
        print(f"{spec:10s} {v:18s} {ms:8.2f} ms  graph breaks {breaks}  stats {stats}")


if __name__ == "__main__":
    main()
