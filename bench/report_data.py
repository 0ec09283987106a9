"""Held-out loss of the report's ResNet-50 and GPT-2 (eager, eager on the batches in
reverse order, fusedops) under data that draws from fewer classes / tokens, on CUDA:
how the choice of `IMAGE_CLASSES_USED` and `VOCAB_USED` in fusedops/report/models.py was
measured (bench/NOTES.md, round 23).

    python bench/report_data.py [STEPS]      (default 30, the report's default on CUDA)

Prints, per data option: the held-out loss before the first step and after the last, the
training loss at 0, 1/3, 2/3 and the end of the run, and the agreement rule's numbers.
"""
import dataclasses, sys, time, torch
import torch.nn.functional as F
from fusedops.report import models, runner

dev = torch.device("cuda")
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 30

def cls_batch(shape, classes, used, k, salt=1):
    g_proto = models._gen(0, dev, salt + 7919)
    protos = torch.randn((classes, 3, 8, 8), generator=g_proto, device=dev)
    g = models._gen(k, dev, salt)
    y = torch.randint(0, used, (shape[0],), generator=g, device=dev)
    x = F.interpolate(protos[y], size=shape[-2:], mode="nearest") + 0.5 * torch.randn(shape, generator=g, device=dev)
    return x, y

def tok_batch(batch, ctx, used, k):
    g = models._gen(k, dev, 2)
    start = torch.randint(0, used, (batch, 1), generator=g, device=dev)
    stride = torch.randint(1, 17, (batch, 1), generator=g, device=dev)
    seq = (start + stride * torch.arange(ctx + 1, device=dev)) % used
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()

opts = []
for used in (1000, 100, 10):
    opts.append(("resnet50", f"classes_used={used}", dataclasses.replace(models.resnet50(), batch=lambda k, d, u=used: cls_batch((128, 3, 224, 224), 1000, u, k))))
for used in (50257, 2048, 256):
    opts.append(("gpt2", f"vocab_used={used}", dataclasses.replace(models.gpt2(), batch=lambda k, d, u=used: tok_batch(8, 1024, u, k))))

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
