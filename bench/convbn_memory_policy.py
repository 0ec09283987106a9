"""ResNet-50 (the report's) under torch.compile and in eager mode with the converted
ConvBNAct2d modules in memory="recompute" and in memory="auto" (the default: the stem's
7x7, the 3x3s and the 1x1s that narrow the channels 4x keep y, the other 1x1s recompute),
timed in interleaved rounds (host-bound steps drift within a process: timing one variant
after another compares the drift). CUDA.

    python bench/convbn_memory_policy.py

Prints each round's median step (8 steps, the first 2 dropped) and the median and minimum
over rounds 1-5. Peak memory is not comparable here (every model stays alive); the report
and bench/convbn_recompute_cost.py measure it one model at a time.
"""
import statistics, torch
from fusedops.report import models, runner
from fusedops.nn_convbn import ConvBNAct2d
dev = torch.device("cuda"); wl = models.resnet50(); base = wl.build()
vs = {}
for key, variant, p in (("eager", "eager", None), ("compile", "compile", None),
                        ("fc-recompute", "fusedops+compile", "recompute"), ("fc-auto", "fusedops+compile", "auto"),
                        ("f-recompute", "fusedops", "recompute"), ("f-auto", "fusedops", "auto")):
    fwd, plain, rep, opt, desc = runner.build_variant(wl, base, variant, dev)
    if p:
        for m in plain.modules():
            if isinstance(m, ConvBNAct2d): m.memory = p
    vs[key] = (fwd, opt)
times = {k: [] for k in vs}; peaks = {}
for r in range(6):
    for k, (fwd, opt) in vs.items():
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        out = []
        for i in range(8):
            b = runner.prepare_batch(wl, i, dev)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); opt.zero_grad(set_to_none=True); fwd(*b).backward(); opt.step(); e.record(); out.append((s, e))
        torch.cuda.synchronize()
        if r > 0: times[k].append(statistics.median(a.elapsed_time(b) for a, b in out[2:]))
        peaks[k] = torch.cuda.max_memory_allocated()
    print("round", r, {k: round(v[-1], 2) for k, v in times.items() if v}, flush=True)
for k in vs:
    print(f"{k:14s} median {statistics.median(times[k]):6.2f} ms  min {min(times[k]):6.2f}  (peak incl. other models' state {peaks[k]/2**30:.2f} GiB)")
