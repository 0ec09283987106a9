"""Held-out loss of the report's ResNet-50 and GPT-2 (eager, eager on the batches in
reverse order, fusedops) under data that draws from fewer classes / tokens, on CUDA:
how the choice of `IMAGE_CLASSES_USED` and `VOCAB_USED` in fusedops/report/models.py was
measured (bench/NOTES.md, round 23).

    python bench/report_data.py [STEPS]      (default 30, the report's default on CUDA)

(`bench/results/h100-2026-12-06-r10/report-data.txt` was measured by an earlier copy of this
script with its own batch functions, which give the same batches as the report's.)

Prints, per data option: the held-out loss before the first step and after the last, the
training loss at 0, 1/3, 2/3 and the end of the run, and the agreement rule's numbers.
"""
import dataclasses
import sys
import time

import torch

from fusedops.report import models, runner

dev = torch.device("cuda")
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 30

# the report's own batch functions, with the number of classes / tokens in the data varied
opts = []
for used in (1000, 100, 10):
    opts.append(("resnet50", f"classes_used={used}", dataclasses.replace(
        models.resnet50(), batch=lambda k, d, u=used: models._classification_batch(
            (128, 3, 224, 224), 1000, (3, 8, 8), d, k, salt=1, used=u))))
for used in (50257, 2048, 256):
    opts.append(("gpt2", f"vocab_used={used}", dataclasses.replace(
        models.gpt2(), batch=lambda k, d, u=used: models._token_batch(8, 1024, 50257, d, k, u))))

for name, label, wl in opts:
    base = wl.build()
    order = list(range(steps))
    eval_k = steps + 1000
    res = {}
    for variant, od in (("eager", order), ("eager-rev", order[::-1]), ("fusedops", order)):
        t0 = time.time()
        fwd, plain, rep, opt, desc = runner.build_variant(wl, base, variant.replace("-rev", ""), dev)
        torch.manual_seed(1234)
        out = runner.train(wl, fwd, plain, opt, od, 5, dev, eval_k)
        L = out["losses"]
        res[variant] = out
        print(f"{name} {label} {variant:9s} held-out {out['initial']:.4f} -> {out['final']:.4f}  train {L[0]:.3f} {L[len(L)//3]:.3f} {L[2*len(L)//3]:.3f} {L[-1]:.3f}  ({time.time()-t0:.1f}s)", flush=True)
        del fwd, plain, opt, rep
        runner._free(dev)
    e, r, f = (res[v]["final"] for v in ("eager", "eager-rev", "fusedops"))
    a = runner.agreement(f, e, r, res["fusedops"]["initial"], res["eager"]["initial"])
    print(f"   -> spread {abs(e-r):.4f} fused diff {abs(f-e):.4f} fall_eager {res['eager']['initial']-e:.4f} agrees {a['agrees']} {a['failed']}", flush=True)
