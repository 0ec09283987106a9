"""Terminal table, markdown, JSON and PNG charts of a model-level report."""
from __future__ import annotations

import json
from pathlib import Path

GiB, MiB = 1 << 30, 1 << 20


def _f(v, spec, scale=1.0, suffix=""):
    return "n/a" if v is None else format(v / scale, spec) + suffix


def _agree(run) -> str:
    """yes / NO, and for NO which condition failed: the loss is farther from eager's than
    tol, or the loss fell by less than half of eager's fall (the variant did not train);
    "no signal" where eager's held-out loss did not fall."""
    a = run.get("agreement")
    if not run["ok"]:
        return "failed"
    if a is None:
        return "n/a"
    if a["agrees"] is None:
        return f"no signal (eager's held-out loss fell {a['fall_eager']:.2g}; Δ {a['diff']:.2g} ≤ {a['tol']:.2g})"
    if a["agrees"]:
        return f"yes (Δ {a['diff']:.2g} ≤ {a['tol']:.2g})"
    failed = a.get("failed", ["loss"])   # (a report.json from before the training condition)
    why = []
    if "loss" in failed:
        why.append(f"Δ {a['diff']:.2g} > {a['tol']:.2g}")
    if "training" in failed:
        why.append(f"loss fell {a['fall']:.2g}, less than half of eager's {a['fall_eager']:.2g}")
    return f"NO ({'; '.join(why)})"


# "÷ eager": this variant's value divided by eager's (step time: above 1 is slower)
HEADER = ["model", "variant", "step ms", "throughput", "step ÷ eager", "peak mem", "mem ÷ eager", "saved act",
          "opt state", "MFU", "final loss", "agrees with eager"]


def rows(results: dict) -> list:
    out = [HEADER]
    for m in results["models"]:
        unit = {"images": "img", "tokens": "tok"}.get(m["unit"], m["unit"])
        for r in m["runs"] + [m["reference"]]:
            if not r["ok"]:
                out.append([m["model"], r["variant"], "failed: " + (r["error"] or "")[:60]] + [""] * (len(HEADER) - 3))
                continue
            ref = r["variant"] == "eager-reordered"
            out.append([
                m["model"], r["variant"] + (" (reference)" if ref else ""),
                _f(r["step_ms"], ".2f"), _f(r["throughput"], ",.0f", suffix=f" {unit}/s"),
                _f(r["vs_eager_time"], ".2f", suffix="×") if not ref else "",
                _f(r["peak_bytes"], ".2f", GiB, " GiB"),
                _f(r["vs_eager_memory"], ".2f", suffix="×") if not ref else "",
                _f(r["saved_bytes"], ",.1f", MiB, " MiB"), _f(r["state_bytes"], ",.1f", MiB, " MiB"),
                _f(r["mfu"], ".1f", 0.01, "%"), _f(r["final_loss"], ".4f"),
                "" if ref else _agree(r)])
    return out


PAIRS = (("fusedops", "eager"), ("fusedops+compile", "compile"))


def summary_lines(m: dict) -> list:
    """fusedops vs its baseline: step-time and memory ratios (peak allocated on CUDA,
    saved activations where peak memory is n/a) and optimizer-state ratio."""
    runs = {r["variant"]: r for r in m["runs"] if r["ok"]}
    out = []
    for new, old in PAIRS:
        if new not in runs or old not in runs:
            continue
        a, b = runs[new], runs[old]
        parts = [f"step time {a['step_ms'] / b['step_ms']:.2f}× {old}'s"]
        if a["peak_bytes"] and b["peak_bytes"]:
            parts.append(f"peak memory {a['peak_bytes'] / b['peak_bytes']:.2f}×")
        if a["saved_bytes"] and b["saved_bytes"]:
            parts.append(f"saved activations {a['saved_bytes'] / b['saved_bytes']:.2f}×")
        if a["state_bytes"] and b["state_bytes"]:
            parts.append(f"optimizer state {a['state_bytes'] / b['state_bytes']:.2f}×")
        out.append(f"{new} vs {old}: " + ", ".join(parts) + f" (ratios: {new} ÷ {old})")
    return out


MIN_TIMED_STEPS = 10


def note_lines(m: dict) -> list:
    """How a model's step times were taken, and their caveats: step times from few timed
    steps (e.g. --tiny) are noise."""
    out = [f"step time: {m['timing']}"] if m.get("timing") else []   # (reports before the rounds: no key)
    timed = m["steps"] - m["warmup"]   # a variant's timed steps: the training run's, or as many in the rounds
    if m["model"].endswith("-tiny"):
        out.append("step times of a tiny model: their ratios are noise (not a speed measurement)")
    elif timed < MIN_TIMED_STEPS:
        out.append(f"step times from {timed} timed step(s) a variant: their ratios are noise (not a speed "
                   f"measurement)")
    return out


def render_text(results: dict) -> str:
    t = rows(results)
    widths = [max(len(str(row[i])) for row in t) for i in range(len(t[0]))]
    lines = []
    for k, row in enumerate(t):
        lines.append("  ".join(str(c).ljust(w) if i < 2 or i == len(row) - 1 else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _convert_lines(m: dict) -> list:
    c = m.get("convert")
    if c is None:
        return []
    out = [f"- `fusedops.convert`: {len(c['replaced'])} replaced, {len(c['skipped'])} skipped"]
    groups = {}
    for r in c["replaced"]:
        groups.setdefault((r["pattern"], r["new"]), []).append(r["path"])
    out += [f"  - replaced {len(p)}× {pat} with {new} (e.g. `{p[0]}`)" for (pat, new), p in groups.items()]
    sk = {}
    for s in c["skipped"]:
        sk.setdefault((s["pattern"], s["reason"]), []).append(s["path"])
    out += [f"  - skipped {len(p)}× {pat}: {why} (e.g. `{p[0]}`)" for (pat, why), p in sk.items()]
    return out


def render_markdown(results: dict) -> str:
    meta = results["meta"]
    t = rows(results)
    out = [f"# fusedops model-level report — {meta['device']}", "",
           ", ".join(f"{k}: {v}" for k, v in meta.items() if k != "methods"), "",
           "| " + " | ".join(t[0]) + " |", "|" + "---|" * len(t[0])]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in t[1:]]
    out.append("")
    for m in results["models"]:
        opts = sorted({r["optimizer"] for r in m["runs"] if r["optimizer"]})
        out += [f"## {m['model']}", "", m["description"], "",
                f"- parameters: {m['parameters']:,}; autocast: {m['autocast']}; {m['steps']} steps, "
                f"{m['warmup']} warm-up (not timed)",
                f"- FLOPs per step: {_f(m['flops_per_step'], '.4g')} ({m['flop_method']}"
                + (f"; failed: {m['flop_error']}" if m.get("flop_error") else "") + f"); peak: {m['peak_flops_source']}",
                f"- optimizers: " + "; ".join(f"{r['variant']}: {r['optimizer']}" for r in m["runs"] if r["optimizer"])
                if opts else "- optimizers: n/a",
                f"- agreement rule: {m['agreement_rule']}"]
        out += [f"- {line}" for line in summary_lines(m)]
        out += [f"- note: {line}" for line in note_lines(m)]
        out += _convert_lines(m)
        leftovers = [r for r in m["runs"] + [m["reference"]] if (r.get("baseline_bytes") or 0) > MiB]
        out += [f"- warning: {r['variant']} started with {r['baseline_bytes'] / MiB:,.0f} MiB still allocated by "
                f"earlier runs (included in its peak memory)" for r in leftovers]
        failed = [r for r in m["runs"] if not r["ok"]]
        out += [f"- {r['variant']} failed: {r['error']}" for r in failed]
        out.append("")
    out += ["## Methods", ""] + [f"- {k}: {v}" for k, v in meta.get("methods", {}).items()]
    return "\n".join(out) + "\n"


def plot(results: dict, path: Path) -> bool:
    """Per model: peak memory (or saved activations on CPU) bars, step-time bars, loss curves."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = results["models"]
    if not models:
        return False
    fig, axes = plt.subplots(len(models), 3, figsize=(15, 3.8 * len(models)), squeeze=False)
    for row, m in zip(axes, models):
        runs = [r for r in m["runs"] if r["ok"]]
        names = [r["variant"] for r in runs]
        use_peak = all(r["peak_bytes"] for r in runs) and runs
        mem = [(r["peak_bytes"] if use_peak else (r["saved_bytes"] or 0)) for r in runs]
        scale, unit = (GiB, "GiB") if max(mem, default=0) >= GiB else (MiB, "MiB")
        row[0].bar(names, [v / scale for v in mem], color="tab:blue")
        row[0].set_ylabel(f"peak allocated {unit}" if use_peak else f"saved activations {unit} (compiled: n/a)")
        row[0].set_title(f"{m['model']}: memory")
        row[1].bar(names, [r["step_ms"] for r in runs], color="tab:orange")
        row[1].set_ylabel("median step ms")
        row[1].set_title(f"{m['model']}: step time")
        for ax in row[:2]:
            ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        for r in runs + ([m["reference"]] if m["reference"]["ok"] else []):
            row[2].plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["variant"],
                        ls="--" if r["variant"] == "eager-reordered" else "-", marker="o", ms=3, alpha=0.85)
        row[2].set_xlabel("step")
        row[2].set_ylabel("training loss")
        row[2].set_title(f"{m['model']}: loss")
        row[2].legend(fontsize=8)
    fig.suptitle(f"fusedops report — {results['meta']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_outputs(results: dict, out: Path) -> tuple:
    """Write report.json, report.md and report.png (when matplotlib is installed);
    return (written paths, notes)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(results, indent=1, allow_nan=True))
    (out / "report.md").write_text(render_markdown(results))
    written, notes = [out / "report.json", out / "report.md"], []
    if plot(results, out / "report.png"):
        written.append(out / "report.png")
    else:
        notes.append("report.png skipped: matplotlib is not installed")
    return written, notes
