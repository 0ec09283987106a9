"""Benchmarks of the norm + activation family (`fusedops bench --ops norm`).

Patterns: LayerNorm+GELU(tanh), LayerNorm+SiLU, RMSNorm+SiLU and the residual form
(s = x + r; RMSNorm(s)+SiLU, gradients into y and s), forward and forward+backward; and
"LN fp32→16" (GPU only): a LayerNorm of an fp32 x whose output a Linear under autocast
casts to the 16-bit dtype (eager: F.layer_norm, then .to(dtype); fusedops: y written in
that dtype, out_dtype, as LayerNormAct(autocast_output=True) does; the gradient arrives
in it).
GPU: bf16 (or the fp16/bf16 asked for), rows 32768, N in {768, ..., 16384} (or --sizes),
plus 16x4096 where launch overhead dominates (timed on the device and, as "... host", by
host wall clock per call). Forward+backward of the large shapes is also timed replayed
from a CUDA graph ("... graph"): the kernels' device time alone, where the Python call
(autograd, launches) is slower than the device. CPU: two small shapes, fp32.
Short sweeps: --sizes 1024,4096 --cases LN+GELU --impls eager,fusedops:triton --no-compile
(labels: eager, torch.compile, liger+eager act, fusedops (the defaults, on CUDA), fusedops:triton,
fusedops:cuda).
Baselines: eager (F.layer_norm / F.rms_norm + activation), torch.compile of the same,
Liger-Kernel's LigerLayerNorm / LigerRMSNorm + eager activation when importable.

Unique bytes: what the operation must move, each input read once and each output written
once, the same count for every implementation (e = element size of x, and of y except in
"LN fp32→16", where y and dy take the 16-bit size; weights/bias in x's dtype; stats fp32):
  forward   read x (+ r), w (+ b); write y (+ s); write mean/rstd (4-8 B a row)
  backward  read x-or-s, dy (+ ds), w (+ b), stats; write dx (dresidual is the same
            tensor: one write), dW (+ dB)
Implementation-specific traffic (e.g. fusedops' fp32 dW/dB partial rows, written and read
once) is not counted: it is that implementation's cost, not the operation's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fusedops

from .. import _backend
from .harness import Case, Impl, compile_fn, family

GPU_N = [768, 1024, 2048, 4096, 8192, 16384]
GPU_ROWS = 32768
SMALL = 16 * 4096   # the small-batch shape (16x4096) is also timed by host wall clock
# CPU (kept quick): one shape per pattern, LN+GELU(tanh) and the residual form
CPU_SHAPES = {"LN+GELU(tanh)": (256, 1024), "Add+RMS+SiLU": (64, 4096)}

# name: (norm, activation, residual, fp32 x with a 16-bit y)
PATTERNS = {
    "LN+GELU(tanh)": ("ln", "gelu_tanh", False, False),
    "LN+SiLU": ("ln", "silu", False, False),
    "RMS+SiLU": ("rms", "silu", False, False),
    "Add+RMS+SiLU": ("rms", "silu", True, False),
    "LN fp32→16": ("ln", "identity", False, True),
}


def _liger():
    try:
        from liger_kernel.transformers import LigerLayerNorm, LigerRMSNorm
        return LigerLayerNorm, LigerRMSNorm
    except Exception:  # not installed, or no GPU support here
        return None


def _eager_fn(norm, act, residual, n, eps, out_dtype=None):
    def f(x, r, w, b):
        s = x + r if residual else x
        z = F.layer_norm(s, (n,), w, b, eps) if norm == "ln" else F.rms_norm(s, (n,), w, eps)
        y = fusedops.reference.activation(z, act)
        if out_dtype is not None:
            y = y.to(out_dtype)
        return (y, s) if residual else y
    return f


def _fused_fn(norm, act, residual, eps, out_dtype=None):
    def f(x, r, w, b):
        if residual:
            return fusedops.add_rms_norm_act(x, r, w, eps, act, out_dtype=out_dtype) if norm == "rms" else \
                fusedops.add_layer_norm_act(x, r, w, b, eps, act, out_dtype=out_dtype)
        if norm == "ln":
            return fusedops.layer_norm_act(x, w, b, eps, act, out_dtype=out_dtype)
        return fusedops.rms_norm_act(x, w, eps, act, out_dtype=out_dtype)
    return f


def _liger_fn(classes, norm, act, residual, n, eps, device, dtype, w, b):
    ln_cls, rms_cls = classes
    if norm == "ln":
        mod = ln_cls(n, eps=eps).to(device=device, dtype=dtype)
        with torch.no_grad():
            mod.weight.copy_(w)
            mod.bias.copy_(b)
    else:
        mod = rms_cls(n, eps=eps).to(device=device, dtype=dtype)
        with torch.no_grad():
            mod.weight.copy_(w)

    def f(x, r, w_, b_):
        s = x + r if residual else x
        y = fusedops.reference.activation(mod(s), act)
        return (y, s) if residual else y
    return f, list(mod.parameters())


def _bytes(m, n, e, norm, residual, backward, ey=None):
    """Unique bytes of one forward (or forward + backward) of an m x n case (ey: y's and
    dy's element size, e when None)."""
    ey = e if ey is None else ey
    params = (2 if norm == "ln" else 1) * n * e
    stats = (8 if norm == "ln" else 4) * m
    fwd = (2 if residual else 1) * m * n * e + params + m * n * ey + (m * n * e if residual else 0) + stats
    if not backward:
        return fwd
    # read x-or-s, dy (+ ds), w (+ b), stats; write dx, dW (+ dB)
    bwd = m * n * e + m * n * ey + (m * n * e if residual else 0) + params + stats + m * n * e + params
    return fwd + bwd


def _runner(fn, x, r, w, b, backward, grads):
    """A zero-argument callable: forward, or forward + backward through torch.autograd.grad
    (no .grad accumulation: each call pays only the pattern's own traffic)."""
    if not backward:
        def run():
            with torch.no_grad():
                fn(x, r, w, b)
        return run
    inputs = [t for t in (x, r, w, b) if t is not None and t.requires_grad]

    def run():
        out = fn(x, r, w, b)
        outs = list(out) if isinstance(out, tuple) else [out]
        torch.autograd.grad(outs, inputs, grads[:len(outs)])
    return run


@family("norm")
def norm_cases(ctx) -> list:
    cuda = ctx.cuda
    if cuda:
        dtypes = [d for d in ctx.dtypes if d in (torch.bfloat16, torch.float16)] or [torch.bfloat16]
        shapes = [(GPU_ROWS, n) for n in (ctx.sizes or GPU_N)] + [(16, 4096)]
    else:
        dtypes = [torch.float32]
    liger = _liger() if cuda else None
    backends = [b for b in (["triton", "cuda"] if cuda else ["cpp"]) if _backend.available(b, ctx.device.type)]
    cases = []
    for dtype in dtypes:
        for pname, (norm, act, residual, wide) in PATTERNS.items():
            if not cuda:
                if pname not in CPU_SHAPES:
                    continue
                shapes = [(CPU_SHAPES[pname][0], n) for n in ctx.sizes] if ctx.sizes else [CPU_SHAPES[pname]]
            # wide: an fp32 x (an autocast model's residual stream), y and dy in dtype
            xdt, out_dtype = (torch.float32, dtype) if wide else (dtype, None)
            e, ey = torch.finfo(xdt).bits // 8, torch.finfo(dtype).bits // 8
            for m, n in shapes:
                eps = 1e-5 if norm == "ln" else 1e-6
                x = torch.randn(m, n, device=ctx.device, dtype=xdt)
                r = torch.randn(m, n, device=ctx.device, dtype=xdt) if residual else None
                w = (torch.rand(n, device=ctx.device) + 0.5).to(xdt)
                b = torch.randn(n, device=ctx.device, dtype=xdt) if norm == "ln" else None
                grads = [torch.randn(m, n, device=ctx.device, dtype=dtype),  # dy, then ds (s has x's dtype)
                         torch.randn(m, n, device=ctx.device, dtype=xdt)]
                for backward in (False, True):
                    for t in (x, r, w, b):
                        if t is not None:
                            t.requires_grad_(backward)
                    eager = _eager_fn(norm, act, residual, n, eps, out_dtype)
                    impls = {"eager": Impl(_runner(eager, x, r, w, b, backward, grads))}
                    if ctx.compile:
                        comp = compile_fn(eager, dynamic=False)
                        impls["torch.compile"] = Impl(_runner(comp, x, r, w, b, backward, grads), compiled=True)
                    if liger is not None and not wide:
                        try:
                            lf, lp = _liger_fn(liger, norm, act, residual, n, eps, ctx.device, dtype, w.detach(),
                                               None if b is None else b.detach())
                            # its own parameters (copies of w, b) are what it differentiates
                            impls["liger+eager act"] = Impl(_runner(lf, x, r, lp[0], lp[1] if len(lp) > 1 else None,
                                                                    backward, grads))
                        except Exception:  # a peer that cannot run this case is left out
                            pass
                    fused = _fused_fn(norm, act, residual, eps, out_dtype)
                    if cuda:  # the defaults: by hidden size, forward and backward chosen separately
                        impls["fusedops"] = Impl(_runner(fused, x, r, w, b, backward, grads))
                    for be in backends:
                        impls[f"fusedops:{be}"] = Impl(_runner(fused, x, r, w, b, backward, grads), backend=be)
                    mode = "fwd+bwd" if backward else "fwd"
                    name = f"{pname} {m}x{n} {str(dtype).replace('torch.', '')} {mode}"
                    params = {"pattern": pname, "rows": m, "n": n, "dtype": str(dtype), "mode": mode}
                    nbytes = _bytes(m, n, e, norm, residual, backward, ey)
                    cases.append(Case("norm", name, params, nbytes, impls))
                    if cuda and m * n <= SMALL:  # launch-bound: what a Python loop pays per call
                        cases.append(Case("norm", f"{name} host", params, 0, dict(impls), timer="wall"))
                    elif cuda and backward:  # the device's work alone
                        cases.append(Case("norm", f"{name} graph", params, nbytes, dict(impls), timer="graph"))
    return cases
