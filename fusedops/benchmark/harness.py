"""Benchmark harness: cases, timers, copy bandwidth, table and JSON / markdown / PNG output.

A family module (fusedops/benchmark/<family>.py) registers a function that returns
`Case`s; each case holds several implementations (eager, torch.compile, fusedops per
backend, peers when importable) of one workload and the unique bytes it must move.
Times are medians: triton.testing.do_bench (CUDA events, cold L2) on GPU,
torch.utils.benchmark on CPU. A case's `timer` can ask for host wall clock per call
instead ("wall": launch-bound small ops, what a Python training loop pays), or for the
call replayed from a CUDA graph ("graph": the device's work alone, without the host time
of Python, autograd and launches; what a step captured whole pays).

torch.compile rows: Dynamo keeps at most `recompile_limit` (8) compiled versions of one
function, and every case compiles one more version of the same function (same code
object, other shapes or inputs); past the limit it would run the function uncompiled and
the row would time eager under the label "torch.compile". So a compile row (an Impl with
compiled=True, built with `compile_fn`) starts from a reset Dynamo (`torch._dynamo.reset()`
before it is timed), runs with `fail_on_recompile_limit_hit`, and must have compiled at
least one graph while it was timed; otherwise it fails (reported on stderr, no row) rather
than time eager.

CPU timers run at torch.get_num_threads() threads (the count written in the metadata).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from .._backend import use_backend

FAMILIES: dict = {}


def family(name: str):
    """Register `fn(ctx) -> list[Case]` as the benchmarks of an op family."""
    def deco(fn):
        FAMILIES[name] = fn
        return fn
    return deco


@dataclasses.dataclass
class Context:
    device: torch.device
    dtypes: list          # torch dtypes asked for
    sizes: list | None    # family-specific sizes asked for, or None for the family's default
    compile: bool         # include torch.compile baselines

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclasses.dataclass
class Impl:
    fn: Callable                     # zero-argument callable: one run of the workload
    backend: str | None = None       # fusedops backend forced while it is timed
    compiled: bool = False           # a torch.compile row: must compile (see `compile_guard`)


# The backend of the torch.compile rows (tests swap in a cheap one such as "eager").
COMPILE_BACKEND = "inductor"


def compile_fn(fn, **kwargs):
    """torch.compile(fn, **kwargs) with the benchmark's backend, for an Impl(compiled=True).
    Compilation happens at the first call, under `compile_guard`."""
    return torch.compile(fn, backend=COMPILE_BACKEND, **kwargs)


class NotCompiled(RuntimeError):
    """A torch.compile row ran without compiling a graph (it would have timed eager)."""


def _graphs() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


@contextlib.contextmanager
def compile_guard(impl: "Impl"):
    """Around every use of a compiled Impl: Dynamo reset first (so this case's compile
    cannot hit the recompile limit left by earlier cases of the same function), the limit
    made an error, and at least one graph compiled inside; else NotCompiled. A no-op for
    other Impls."""
    if not impl.compiled:
        yield
        return
    import torch._dynamo
    torch._dynamo.reset()
    before = _graphs()
    # (a torch without the setting, or with suppress_errors on, which excludes it: the graph
    # count below still catches a row that compiled nothing)
    cfg = torch._dynamo.config
    strict = hasattr(cfg, "fail_on_recompile_limit_hit") and not getattr(cfg, "suppress_errors", False)
    with cfg.patch(fail_on_recompile_limit_hit=True) if strict else contextlib.nullcontext():
        yield
    if _graphs() == before:
        raise NotCompiled("torch.compile compiled no graph for this case (it would have run eager)")


def run_impl(impl: "Impl", call: Callable):
    """call(impl.fn) with the impl's backend forced and, for a compile row, `compile_guard`."""
    with compile_guard(impl):
        if impl.backend is None:
            return call(impl.fn)
        with use_backend(impl.backend):
            return call(impl.fn)


@dataclasses.dataclass
class Case:
    family: str
    name: str
    params: dict
    nbytes: int                      # unique bytes read + written
    impls: dict                      # label -> Impl
    baseline: str = "eager"
    timer: str = "device"            # "device", "wall" or "graph" (see the module docstring)


@dataclasses.dataclass
class Row:
    family: str
    case: str
    impl: str
    time_us: float
    gbps: float | None
    pct_copy: float | None
    speedup: float | None            # speed-up: the case's baseline time ÷ this time (above 1: faster)
    timer: str
    params: dict
    baseline: str | None = None      # the impl whose time the speed-up divides


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_device(fn: Callable, device: torch.device) -> float:
    """Median seconds per call."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    import torch.utils.benchmark as tb
    fn()
    # torch's thread count, not Timer's default of 1: the count the metadata reports
    timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=0.2).median


def time_wall(fn: Callable, device: torch.device, calls: int = 2000) -> float:
    """Host seconds per call: the median of 5 loops of back-to-back calls (each loop ends
    with one sync), as the other timers report medians."""
    for _ in range(50):
        fn()
    sync(device)
    per_call = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        per_call.append((time.perf_counter() - t0) / calls)
    return sorted(per_call)[len(per_call) // 2]


def time_graph(fn: Callable, device: torch.device) -> float:
    """Median seconds per replay of one call of fn captured in a CUDA graph (cold L2 as
    time_device). Warmed up on a side stream first (lazy initialisation, autotuning)."""
    if device.type != "cuda":
        raise RuntimeError("the graph timer needs a CUDA device")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_device(graph.replay, device)


TIMERS = {"device": time_device, "wall": time_wall, "graph": time_graph}


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device copy (read + write), measured now."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = time_device(lambda: dst.copy_(src), device)
    return 2 * n * 4 / t


def environment(device: torch.device, copy_bps: float) -> dict:
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "copy_GBps": round(copy_bps / 1e9, 1),
    }
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if device.type == "cpu":
        meta["threads"] = torch.get_num_threads()
    return meta


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        width = 30
        filled = width * self.done // max(self.total, 1)
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label}"
        if self.tty:
            sys.stderr.write("\r" + line[:120].ljust(120))
            if self.done == self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def run_cases(cases: list, ctx: Context, copy_bps: float) -> list:
    progress = Progress(sum(len(c.impls) for c in cases))
    rows = []
    for case in cases:
        times = {}
        for label, impl in case.impls.items():
            progress.step(f"{case.name} · {label}")
            timer = TIMERS[case.timer]
            try:
                times[label] = run_impl(impl, lambda fn: timer(fn, ctx.device))
            except Exception as exc:  # a baseline that fails here is reported, not fatal
                sys.stderr.write(f"\n{case.name} · {label}: failed: {type(exc).__name__}: {exc}\n")
        base = times.get(case.baseline)
        for label, t in times.items():
            gbps = case.nbytes / t / 1e9 if (case.nbytes and case.timer != "wall") else None
            rows.append(Row(case.family, case.name, label, t * 1e6, gbps,
                            100 * gbps * 1e9 / copy_bps if gbps else None,
                            base / t if base else None, case.timer, case.params,
                            case.baseline if base else None))
    return rows


def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


SPEEDUP = "speed-up"


def table(rows: list) -> list:
    header = ["family", "case", "impl", "time µs", "GB/s", "% copy", SPEEDUP, "timer"]
    body = [[r.family, r.case, r.impl, _fmt(r.time_us, ".1f"), _fmt(r.gbps, ".0f"), _fmt(r.pct_copy, ".1f"),
             _fmt(r.speedup, ".2f") + ("×" if r.speedup else ""), r.timer] for r in rows]
    return [header] + body


def legend(rows: list, meta: dict | None = None) -> list:
    """What the columns mean, under a table."""
    out = [f"{SPEEDUP} = the case's baseline time ÷ this row's time (above 1: faster than the baseline); "
           "the baseline is eager unless listed here."]
    other = {}
    for r in rows:
        if r.baseline and r.baseline != "eager":
            other.setdefault(r.baseline, []).append(r.case)
    for base, cases in other.items():
        out.append(f"  baseline {base}: " + ", ".join(dict.fromkeys(cases)))
    out.append("GB/s = the case's unique bytes ÷ time; % copy = GB/s ÷ the copy bandwidth measured in this run; "
               "wall rows: host time a call, no GB/s.")
    if meta is not None and meta.get("threads") is not None:
        out.append(f"CPU: timed at {meta['threads']} threads, caches not flushed between calls: a case that fits "
                   "in the caches can exceed 100% of the copy (a DRAM-sized copy), so % copy there is not a "
                   "fraction of a bandwidth limit.")
    return out


def render_text(rows: list, meta: dict | None = None) -> str:
    t = table(rows)
    widths = [max(len(str(row[i])) for row in t) for i in range(len(t[0]))]
    lines = []
    for k, row in enumerate(t):
        lines.append("  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines + [""] + legend(rows, meta))


def render_markdown(rows: list, meta: dict) -> str:
    t = table(rows)
    out = [f"# fusedops benchmark — {meta['device']}", "",
           ", ".join(f"{k}: {v}" for k, v in meta.items()), "",
           "| " + " | ".join(t[0]) + " |", "|" + "---|" * len(t[0])]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in t[1:]]
    out += [""] + ["- " + line.strip() for line in legend(rows, meta)]
    return "\n".join(out) + "\n"


def plot(rows: list, meta: dict, path: Path) -> bool:
    """One panel per family: achieved % of copy bandwidth per case and implementation."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fams = [f for f in dict.fromkeys(r.family for r in rows) if any(r.pct_copy for r in rows if r.family == f)]
    if not fams:
        return False
    fig, axes = plt.subplots(len(fams), 1, figsize=(12, 3.8 * len(fams)), squeeze=False)
    for ax, fam in zip(axes[:, 0], fams):
        frows = [r for r in rows if r.family == fam and r.pct_copy is not None]
        cases = list(dict.fromkeys(r.case for r in frows))
        impls = list(dict.fromkeys(r.impl for r in frows))
        w = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            vals = {r.case: r.pct_copy for r in frows if r.impl == impl}
            xs = [i + k * w for i, c in enumerate(cases) if c in vals]
            ax.bar(xs, [vals[c] for c in cases if c in vals], width=w, label=impl)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(cases))])
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("% of copy bandwidth")
        ax.set_title(f"{fam} — {meta['device']} (copy {meta['copy_GBps']} GB/s)")
        ax.axhline(100, color="gray", lw=0.8, ls="--")
        ax.legend(fontsize=8, ncol=min(len(impls), 6))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(rows: list, meta: dict, out: Path) -> list:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))
    (out / "results.md").write_text(render_markdown(rows, meta))
    written = [out / "results.json", out / "results.md"]
    if plot(rows, meta, out / "results.png"):
        written.append(out / "results.png")
    else:  # no chart this run: a results.png of an earlier run would not match results.json
        (out / "results.png").unlink(missing_ok=True)
    return written
