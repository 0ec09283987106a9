"""Train one workload in several variants and measure each: the engine of `fusedops report`.

Variants (same initial weights — deep copies of one init — and the same data):
  eager             the model as written, torch AdamW (fused=True on CUDA, foreach=True on CPU)
  compile           torch.compile(model + loss), torch AdamW
  fusedops          fusedops.convert(model) + fusedops.optim.AdamW8bit (torch AdamW when
                    the 8-bit optimizer is not importable; the report says which ran)
  fusedops+compile  both
A reference run, eager with the batches in reverse order, measures how much the final
loss moves with the data order alone; agreement of a variant is judged against it, and
the variant must also have trained: its held-out loss must have fallen by at least half
as much as eager's did (see `agreement`).

Measurements (methods are also written into the results):
  step time     with rounds (the default, 5): after every variant's training run, the
                variants (kept alive) take turns, round after round, for a few more
                steps each (the first step of a turn untimed); a variant's step time is
                the median of its rounds' medians, so that a host whose speed drifts
                within the process (busy machines: up to ~40%) moves every variant alike.
                Without rounds (rounds=0, or where keeping every variant alive runs out
                of memory, which the results say): the median over the training run's
                steps after the warm-up (the warm-up includes compilation). CUDA events
                around zero_grad + forward + backward + optimizer step on CUDA,
                time.perf_counter on CPU. Batch generation is outside the timed region.
  throughput    items per step (images / tokens / samples) ÷ median step time.
  peak memory   torch.cuda.max_memory_allocated over the training run's timed steps (stats
                reset after the warm-up, so optimizer state, weights, gradients and the
                batch are included, one-time compilation work is not), less what was
                allocated before the variant was built (the earlier variants, kept for the
                rounds). On CPU: n/a.
  saved bytes   bytes of the tensors autograd saves for backward in one forward pass
                (torch.autograd.graph.saved_tensors_hooks, unique storages, parameters
                excluded): the activation memory, on any device. Not measured for
                compiled variants (their saved tensors are chosen by the compiler).
  state bytes   sum of numel × element_size of every tensor in optimizer.state after
                the run.
  FLOPs         torch.utils.flop_counter.FlopCounterMode over one forward + backward of
                the eager model (matmuls, convolutions, attention counted dense; the
                optimizer step and elementwise ops are not counted — the usual model-FLOPs
                convention, the same number for every variant).
  MFU           FLOPs per step ÷ (peak FLOP/s × median step time); peak = --peak-tflops
                or the device's bf16 dense peak (H100/H200 SXM: 989 TFLOP/s); n/a when
                unknown (CPU).
  final loss    loss on a fixed held-out batch after the N training steps (model in
                training mode, no grad, same autocast); initial loss: the same, before
                the first step.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import math
import statistics
import time
import traceback

import torch
from torch import nn

from .models import Workload

VARIANTS = ("eager", "compile", "fusedops", "fusedops+compile")
REFERENCE = "eager-reordered"

# bf16 dense tensor-core peaks (FLOP/s) by device-name fragment, most specific first.
PEAK_BF16 = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12))

# The agreement rule (see `agreement`).
SPREAD_FACTOR = 2.0
REL_FLOOR = 1e-3
FALL_FRACTION = 0.5


def agreement(loss: float, loss_eager: float, loss_reordered: float,
              initial: float | None = None, initial_eager: float | None = None) -> dict:
    """Does a variant's final loss agree with eager's, and did the variant train?

    spread = |loss_eager − loss_eager_reordered|   (two eager runs, same init, different data order)
    tol    = max(SPREAD_FACTOR · spread, REL_FLOOR · max(1, |loss_eager|))
    close  = all three losses finite and |loss − loss_eager| ≤ tol
    fall   = initial − loss, fall_eager = initial_eager − loss_eager (held-out loss before
             the first step minus after the last)
    trains = fall ≥ FALL_FRACTION · fall_eager, checked when eager's loss fell
             (fall_eager > 0) and both initial losses are known; else not applied (None)
    agrees = close and trains is not False; None (no signal) where the run could not
             tell: the initial losses are known, eager's did not fall, and the loss is
             within tol (nothing trained measurably, so being close says nothing)
    `failed` names the conditions that failed ("loss" / "training"); a variant that does
    not train can be within tol when the data-order spread exceeds eager's whole fall.
    """
    finite = all(math.isfinite(v) for v in (loss, loss_eager, loss_reordered))
    spread = abs(loss_eager - loss_reordered) if finite else float("nan")
    tol = max(SPREAD_FACTOR * spread, REL_FLOOR * max(1.0, abs(loss_eager))) if finite else float("nan")
    diff = abs(loss - loss_eager) if finite else float("nan")
    close = bool(finite and diff <= tol)
    fall = fall_eager = trains = None
    signal = True
    if initial is not None and initial_eager is not None:
        fall, fall_eager = initial - loss, initial_eager - loss_eager
        signal = bool(finite and math.isfinite(fall_eager) and fall_eager > 0)
        if signal:
            trains = bool(math.isfinite(fall) and fall >= FALL_FRACTION * fall_eager)
    failed = ([] if close else ["loss"]) + (["training"] if trains is False else [])
    return {"agrees": False if failed else (True if signal else None), "diff": diff, "tol": tol, "spread": spread,
            "fall": fall, "fall_eager": fall_eager, "trains": trains, "failed": failed}


def device_peak_flops(device: torch.device, override_tflops: float | None) -> tuple:
    """(peak FLOP/s or None, description)."""
    if override_tflops is not None and not (0 < override_tflops < float("inf")):
        raise ValueError(f"--peak-tflops {override_tflops:g}: must be a positive number of TFLOP/s")
    if override_tflops:
        return override_tflops * 1e12, f"{override_tflops:g} TFLOP/s (--peak-tflops)"
    if device.type != "cuda":
        return None, "unknown for this device (give --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for frag, peak in PEAK_BF16:
        if frag in name:
            return peak, f"{peak / 1e12:g} TFLOP/s ({frag} bf16 dense)"
    return None, f"unknown for {name} (give --peak-tflops)"


class WithLoss(nn.Module):
    """model + loss in one module, under autocast: what torch.compile compiles."""

    def __init__(self, model: nn.Module, loss_fn, device: torch.device, amp_dtype):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.device_type = device.type
        self.amp_dtype = amp_dtype

    def forward(self, *batch):
        with torch.autocast(self.device_type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            return self.loss_fn(self.model, batch)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prepare_batch(workload: Workload, k: int, device: torch.device) -> tuple:
    batch = workload.batch(k, device)
    if workload.channels_last:
        batch = tuple(t.contiguous(memory_format=torch.channels_last)
                      if isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point() else t for t in batch)
    return tuple(batch)


def make_optimizer(params, kind: str, workload: Workload, device: torch.device) -> tuple:
    """(optimizer, description). kind: "torch" or "fusedops"."""
    params = [p for p in params if p.requires_grad]
    if kind == "fusedops":
        try:
            from fusedops.optim import AdamW8bit
        except (ImportError, AttributeError):
            opt, desc = make_optimizer(params, "torch", workload, device)
            return opt, desc + " (fusedops.optim.AdamW8bit not available)"
        return (AdamW8bit(params, lr=workload.lr, weight_decay=workload.weight_decay),
                "fusedops.optim.AdamW8bit")
    if device.type == "cuda":
        return (torch.optim.AdamW(params, lr=workload.lr, weight_decay=workload.weight_decay, fused=True),
                "torch.optim.AdamW(fused=True)")
    # CPU: the multi-tensor implementation (foreach unset would pick the for-loop one there)
    return (torch.optim.AdamW(params, lr=workload.lr, weight_decay=workload.weight_decay, foreach=True),
            "torch.optim.AdamW(foreach=True)")


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Sum of numel × element_size over the tensors in optimizer.state (each tensor once)."""
    seen, total = set(), 0
    for t in _tensors(list(opt.state.values())):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs):
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    from torch.utils.flop_counter import sdpa_backward_flop_count
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    aten = torch.ops.aten
    mapping = {}
    # CPU SDPA kernels have no formula in FlopCounterMode; count them as the CUDA ones are.
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(fwd: nn.Module, batch: tuple) -> int:
    """FLOPs of one forward + backward of `fwd(*batch)` (a WithLoss), by FlopCounterMode."""
    with _flop_counter() as counter:
        fwd(*batch).backward()
    return int(counter.get_total_flops())


def saved_tensor_bytes(fwd: nn.Module, batch: tuple) -> int:
    """Bytes of the unique storages autograd saves for backward in one forward of
    `fwd(*batch)`, parameters' storages excluded."""
    params = {p.untyped_storage().data_ptr() for p in fwd.parameters()}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        try:
            s = t.untyped_storage()
            key = (s.data_ptr(), s.nbytes(), t.device)
        except (RuntimeError, NotImplementedError):   # e.g. a tensor subclass without storage
            return t
        if s.data_ptr() not in params and key not in seen:
            seen.add(key)
            total += s.nbytes()
        # Not t itself: a saved output would then hold its own grad_fn, a cycle through C++
        # that Python's gc cannot free — the whole graph leaked (5 GiB on a GPT-2 step).
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fwd(*batch)
    del loss
    return total


@dataclasses.dataclass
class Run:
    variant: str
    optimizer: str = ""
    compiled: bool = False
    converted: bool = False
    ok: bool = True
    error: str | None = None
    step_ms: float | None = None           # median of the rounds' medians (else step_ms_training)
    step_ms_all: list = dataclasses.field(default_factory=list)   # every step of the training run
    step_ms_training: float | None = None  # median over the training run's timed steps
    step_ms_rounds: list = dataclasses.field(default_factory=list)  # each round's median
    throughput: float | None = None        # items / s
    peak_bytes: int | None = None          # torch.cuda.max_memory_allocated (CUDA only)
    saved_bytes: int | None = None         # autograd saved tensors of one forward (eager-mode variants)
    state_bytes: int | None = None         # optimizer state
    mfu: float | None = None
    losses: list = dataclasses.field(default_factory=list)   # training loss per step
    initial_loss: float | None = None      # held-out batch before the first step
    final_loss: float | None = None        # held-out batch after N steps
    agreement: dict | None = None
    vs_eager_time: float | None = None     # step_ms / eager step_ms (above 1: slower than eager)
    vs_eager_memory: float | None = None   # peak_bytes / eager peak_bytes
    baseline_bytes: int | None = None      # CUDA bytes allocated before the run was built
    traceback: str | None = None           # of a failed run


def build_variant(workload: Workload, base: nn.Module, variant: str, device: torch.device) -> tuple:
    """(WithLoss module for training, the uncompiled one, convert report or None, optimizer, desc)."""
    model = copy.deepcopy(base).to(device)     # base stays on the CPU: no extra copy on the device
    if workload.channels_last:
        model = model.to(memory_format=torch.channels_last)
    report = None
    if variant.startswith("fusedops"):
        import fusedops
        report = fusedops.convert(model)
    model.train()
    plain = WithLoss(model, workload.loss_fn, device, workload.amp_dtype if device.type == "cuda" else None)
    fwd = torch.compile(plain) if variant.endswith("compile") else plain
    opt, desc = make_optimizer(model.parameters(), "fusedops" if variant.startswith("fusedops") else "torch",
                               workload, device)
    return fwd, plain, report, opt, desc


def heldout_loss(workload: Workload, plain: nn.Module, device: torch.device, eval_k: int) -> float:
    """Loss on the fixed held-out batch (training mode, no grad). The RNG is seeded first
    (the same dropout masks, if any, in every variant); the caller's RNG state is kept."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(4321)
        with torch.no_grad():
            return float(plain(*prepare_batch(workload, eval_k, device)))


def timed_step(workload: Workload, fwd: nn.Module, opt, k: int, device: torch.device) -> tuple:
    """One training step on batch k (generated outside the timed region): (its time — ms
    on CPU, an event pair on CUDA, read after a sync —, the detached loss)."""
    batch = prepare_batch(workload, k, device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    else:
        t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = fwd(*batch)
    loss.backward()
    opt.step()
    if device.type == "cuda":
        end.record()
        return (start, end), loss.detach()
    return 1e3 * (time.perf_counter() - t0), loss.detach()


def elapsed_ms(marks: list, device: torch.device) -> list:
    """timed_step's times in ms (CUDA: the event pairs read; call after a sync)."""
    return [s.elapsed_time(e) for s, e in marks] if device.type == "cuda" else marks


def train(workload: Workload, fwd: nn.Module, plain: nn.Module, opt, order: list, warmup: int,
          device: torch.device, eval_k: int, on_step=None) -> dict:
    """Run len(order) training steps; return losses, per-step ms, peak bytes, the held-out
    loss before the first step and after the last."""
    cuda = device.type == "cuda"
    initial = heldout_loss(workload, plain, device, eval_k)
    losses, marks = [], []
    for i, k in enumerate(order):
        if i == warmup:
            _sync(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
        mark, loss = timed_step(workload, fwd, opt, k, device)
        marks.append(mark)
        losses.append(loss)
        if on_step is not None:
            on_step(i)
    _sync(device)
    step_ms = elapsed_ms(marks, device)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    torch.manual_seed(4321)    # the same dropout masks (if any) in every variant's held-out loss
    with torch.no_grad():
        final = float(plain(*prepare_batch(workload, eval_k, device)))
    return {"losses": [float(v) for v in torch.stack(losses).float().cpu()], "step_ms": step_ms,
            "peak": peak, "initial": initial, "final": final}


def interleaved_rounds(workload: Workload, alive: dict, device: torch.device, rounds: int, per_round: int,
                       first_k: int) -> dict:
    """Each variant of `alive` ({variant: (fwd, opt)}) in turn, `rounds` times: 1 untimed
    step, then `per_round` timed ones. Returns {variant: [median ms of each round]}."""
    out = {v: [] for v in alive}
    k = first_k
    for _ in range(rounds):
        for v, (fwd, opt) in alive.items():
            marks = [timed_step(workload, fwd, opt, k + i, device)[0] for i in range(per_round + 1)]
            _sync(device)
            out[v].append(statistics.median(elapsed_ms(marks, device)[1:]))
        k += per_round + 1
    return out


def measure_workload(workload: Workload, device: torch.device, variants: list, steps: int, warmup: int,
                     peak_tflops: float | None = None, progress=None, rounds: int = 0) -> dict:
    """Run the reference and every variant of one workload; return a JSON-ready dict.
    rounds > 0: the step times come from interleaved rounds after the training runs (see
    the module docstring), each round max(1, (steps - warmup) // rounds) timed steps a
    variant."""
    if "eager" not in variants:
        variants = ["eager"] + list(variants)
    if steps < 2 or not 0 <= warmup < steps:
        raise ValueError(f"steps={steps}, warmup={warmup}: need steps >= 2 and 0 <= warmup < steps (at least one "
                         f"timed step)")
    base = workload.build()      # on the CPU; each run deep-copies it to the device
    amp = workload.amp_dtype if device.type == "cuda" else None
    order = list(range(steps))
    eval_k = steps + 1000

    # FLOPs of one fwd+bwd of the eager model (on a copy; the copy is thrown away).
    probe_model = copy.deepcopy(base).to(device).train()
    if workload.channels_last:
        probe_model = probe_model.to(memory_format=torch.channels_last)
    probe = WithLoss(probe_model, workload.loss_fn, device, amp)
    try:
        flops, flop_error = count_flops(probe, prepare_batch(workload, 0, device)), None
    except Exception as exc:   # no FLOPs, no MFU; the runs still go on
        flops, flop_error = None, f"{type(exc).__name__}: {exc}"
    del probe, probe_model
    _free(device)
    peak, peak_desc = device_peak_flops(device, peak_tflops)

    result = {
        "model": workload.name, "description": workload.description, "unit": workload.unit,
        "items_per_step": workload.items_per_step, "steps": steps, "warmup": warmup,
        "autocast": str(amp).replace("torch.", "") if amp else "none (fp32)",
        "channels_last": workload.channels_last,
        "parameters": sum(p.numel() for p in base.parameters()),
        "flops_per_step": flops, "flop_error": flop_error,
        "flop_method": "torch.utils.flop_counter.FlopCounterMode, one forward+backward of the eager model "
                       "(matmul/conv/attention, attention counted dense; optimizer and elementwise ops not counted)",
        "peak_flops": peak, "peak_flops_source": peak_desc,
        "agreement_rule": f"|loss − loss_eager| ≤ max({SPREAD_FACTOR:g}·|loss_eager − loss_eager_reordered|, "
                          f"{REL_FLOOR:g}·max(1, |loss_eager|)), and the variant's loss fell by at least "
                          f"{FALL_FRACTION:g}× eager's fall (when eager's fell); losses on a held-out batch before "
                          f"the first step and after {steps} steps",
        "convert": None, "runs": [], "reference": None,
        "timing": "median over the training run's steps after the warm-up",
    }
    alive = {}   # variants kept for the interleaved rounds: {variant: (fwd, opt)}
    per_round = max(1, (steps - warmup) // rounds) if rounds > 0 else 0

    def set_step_ms(run: Run, ms: float) -> None:
        run.step_ms = ms
        run.throughput = workload.items_per_step / (ms * 1e-3)
        run.mfu = flops / (peak * ms * 1e-3) if (peak and flops) else None

    def one(variant: str, order_: list) -> Run:
        run = Run(variant=variant, compiled=variant.endswith("compile"), converted=variant.startswith("fusedops"))
        fwd = plain = opt = report = None
        if device.type == "cuda":
            run.baseline_bytes = torch.cuda.memory_allocated(device)   # the variants kept for the rounds
        try:
            fwd, plain, report, opt, run.optimizer = build_variant(workload, base, variant, device)
            if report is not None and result["convert"] is None:
                result["convert"] = {
                    "replaced": [dataclasses.asdict(r) for r in report.replaced],
                    "skipped": [dataclasses.asdict(s) for s in report.skipped]}
            if not run.compiled:
                run.saved_bytes = saved_tensor_bytes(plain, prepare_batch(workload, order_[0], device))
            torch.manual_seed(1234)    # same dropout masks (if any) in every eager-mode run
            out = train(workload, fwd, plain, opt, order_, warmup, device, eval_k)
            timed = out["step_ms"][warmup:]
            run.step_ms_all = out["step_ms"]
            run.step_ms_training = statistics.median(timed)
            set_step_ms(run, run.step_ms_training)
            run.peak_bytes = None if out["peak"] is None else out["peak"] - run.baseline_bytes
            run.state_bytes = optimizer_state_bytes(opt)
            run.losses = out["losses"]
            run.initial_loss = out["initial"]
            run.final_loss = out["final"]
            if per_round and variant != REFERENCE:
                alive[variant] = (fwd, opt)
        except Exception as exc:   # a variant that fails is reported, not fatal
            run.ok, run.error = False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            run.traceback = traceback.format_exc()
        finally:
            del fwd, plain, opt, report
            if run.compiled and not alive:
                torch._dynamo.reset()
            _free(device)
        if progress is not None:
            progress.step(f"{workload.name} · {variant}" + (f" · {run.step_ms:.1f} ms" if run.step_ms else
                                                             " · failed" if not run.ok else ""))
        return run

    runs = {v: one(v, order) for v in variants}
    if alive:
        try:
            medians = interleaved_rounds(workload, alive, device, rounds, per_round, eval_k + 1)
        except Exception as exc:   # e.g. every variant alive did not fit: the training runs' times stay
            result["timing"] += (f" (the interleaved rounds failed with {len(alive)} variants alive: "
                                 f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})")
        else:
            for v, ms in medians.items():
                runs[v].step_ms_rounds = ms
                set_step_ms(runs[v], statistics.median(ms))
            result["timing"] = (f"median of {rounds} interleaved rounds' medians ({per_round} timed "
                                f"step{'s' if per_round > 1 else ''} a variant a round, after 1 untimed), every "
                                f"variant alive, after the training runs")
        alive.clear()
        if any(r.compiled for r in runs.values()):   # (the resets were held back while variants were alive)
            torch._dynamo.reset()
        _free(device)
    ref = one(REFERENCE, list(reversed(order)))
    eager = runs["eager"]
    for run in runs.values():
        if run.ok and eager.ok and ref.ok:
            run.agreement = agreement(run.final_loss, eager.final_loss, ref.final_loss,
                                      run.initial_loss, eager.initial_loss)
        if run.ok and eager.ok:
            run.vs_eager_time = run.step_ms / eager.step_ms
            if run.peak_bytes and eager.peak_bytes:
                run.vs_eager_memory = run.peak_bytes / eager.peak_bytes
    result["runs"] = [dataclasses.asdict(r) for r in runs.values()]
    result["reference"] = dataclasses.asdict(ref)
    if result["convert"] is None and any(v.startswith("fusedops") for v in variants):
        result["convert"] = {"replaced": [], "skipped": []}
    del base
    _free(device)
    return result
