"""opt.step() of the report's ResNet-50 parameters (CUDA), with the conv weights in
channels_last (as the report trains it) and in the contiguous format: host time a step
(the loop's time until the last step is launched), wall time, the device time of the
step's kernels and copies (under the profiler, the ranges of torch.optim's
record_function annotations left out) and the number of device operations a step.
fusedops' AdamW8bit against torch.optim.AdamW(fused=True).

    python bench/optim_step_layout.py
"""
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fusedops.optim import AdamW8bit
from fusedops.report import models


def main():
    dev = torch.device("cuda")
    base = models.resnet50().build()
    for fmt in (torch.channels_last, torch.contiguous_format):
        m = base.to(dev).to(memory_format=fmt)
        ps = list(m.parameters())
        for p in ps:
            p.grad = torch.randn_like(p)
        ncl = sum(not p.is_contiguous() for p in ps)
        for name, opt in (("AdamW8bit", AdamW8bit(ps, lr=1e-3, weight_decay=0.01)),
                          ("torch fused AdamW", torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True))):
            for _ in range(5):
                opt.step()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                opt.step()
            host = (time.perf_counter() - t) / 20 * 1e3
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t) / 20 * 1e3
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    opt.step()
                torch.cuda.synchronize()
            evs = [e for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("Optimizer")]
            dev_ms = sum(e.time_range.elapsed_us() for e in evs) / 5e3
            print(f"{str(fmt):26s} {ncl:3d} non-contiguous params  {name:18s} host {host:6.2f} ms  wall {wall:6.2f} ms  "
                  f"device {dev_ms:6.3f} ms  {len(evs) / 5:.0f} device ops/step", flush=True)


if __name__ == "__main__":
    main()
