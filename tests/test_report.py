"""`python -m fusedops report` on tiny CPU configurations, and its measuring rules."""
import json
import math
import sys
import types

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

from fusedops import converter
from fusedops.__main__ import main
from fusedops.report import agreement, count_flops, models, optimizer_state_bytes, run_report
from fusedops.report.runner import WithLoss


@pytest.fixture(autouse=True)
def one_thread():
    """The CI machine's cores are shared: one thread avoids OpenMP spin contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- rules

def test_agreement_rule():
    # spread 0.1 -> tol 0.2
    a = agreement(2.15, 2.0, 2.1)
    assert {k: a[k] for k in ("agrees", "diff", "tol", "spread")} == pytest.approx(
        {"agrees": True, "diff": 0.15, "tol": 0.2, "spread": 0.1})
    assert a["trains"] is None and a["failed"] == []     # no initial losses: the training condition is not applied
    assert not agreement(2.25, 2.0, 2.1)["agrees"]
    assert agreement(1.8, 2.0, 2.1)["agrees"] and not agreement(1.7, 2.0, 2.1)["agrees"]
    # identical eager runs: the floor 1e-3·max(1, |loss|) applies
    a = agreement(5.004, 5.0, 5.0)
    assert a["tol"] == pytest.approx(5e-3) and a["agrees"]
    assert not agreement(5.006, 5.0, 5.0)["agrees"]
    assert agreement(0.1005, 0.1, 0.1)["tol"] == pytest.approx(1e-3)
    # non-finite losses never agree
    assert not agreement(float("nan"), 2.0, 2.1)["agrees"]
    assert not agreement(2.0, 2.0, float("inf"))["agrees"]


def test_agreement_needs_the_variant_to_train():
    """Within tol is not enough: the variant's loss must have fallen by at least half of
    eager's fall (when eager's fell); the result says which condition failed."""
    # eager 3.0 -> 2.0 (fall 1.0), reordered 2.5: tol 1.0
    ok = agreement(2.4, 2.0, 2.5, initial=3.0, initial_eager=3.0)
    assert ok["agrees"] and ok["trains"] and ok["fall"] == pytest.approx(0.6) and ok["failed"] == []
    stuck = agreement(2.9, 2.0, 2.5, initial=3.0, initial_eager=3.0)    # diff 0.9 ≤ tol 1.0, fell 0.1 < 0.5
    assert not stuck["agrees"] and stuck["trains"] is False and stuck["failed"] == ["training"]
    both = agreement(3.2, 2.0, 2.5, initial=3.0, initial_eager=3.0)
    assert both["failed"] == ["loss", "training"]
    assert agreement(2.5, 2.0, 2.5, initial=3.0, initial_eager=3.0)["agrees"]   # fell exactly half
    # eager's loss did not fall: the training condition is not applied, and a close loss is
    # no signal (None), not agreement; a distant one still disagrees
    flat = agreement(3.0, 3.0, 3.0, initial=3.0, initial_eager=3.0)
    assert flat["agrees"] is None and flat["trains"] is None and flat["failed"] == []
    assert agreement(3.5, 3.0, 3.0, initial=3.0, initial_eager=2.9)["agrees"] is False
    # without the initial losses (a report.json from before them) the distance rule alone
    assert agreement(3.0, 3.0, 3.0)["agrees"] is True


def test_report_says_which_agreement_condition_failed():
    from fusedops.report import output
    run = {"ok": True, "agreement": agreement(2.9, 2.0, 2.5, initial=3.0, initial_eager=3.0)}
    assert output._agree(run) == "NO (loss fell 0.1, less than half of eager's 1)"
    run = {"ok": True, "agreement": agreement(3.2, 2.0, 2.5, initial=3.0, initial_eager=3.0)}
    assert output._agree(run).startswith("NO (Δ 1.2 > 1; loss fell -0.2")
    old_json = {"ok": True, "agreement": {"agrees": False, "diff": 0.5, "tol": 0.2, "spread": 0.1}}
    assert output._agree(old_json) == "NO (Δ 0.5 > 0.2)"
    run = {"ok": True, "agreement": agreement(3.002, 3.0, 3.0, initial=3.0, initial_eager=2.99)}
    assert output._agree(run) == "no signal (eager's held-out loss fell -0.01; Δ 0.002 ≤ 0.003)"


def test_an_untrained_variant_does_not_agree(monkeypatch):
    """A fusedops variant whose optimizer never moves the weights (lr = 0) must not agree
    with eager on the tiny CPU ResNet: there the data-order spread of 4 steps exceeds
    eager's whole loss decrease, so the distance rule alone passed it."""
    from fusedops.report import runner

    real = runner.make_optimizer

    def frozen(params, kind, workload, device):
        opt, desc = real(params, kind, workload, device)
        if kind == "fusedops":
            for g in opt.param_groups:
                g["lr"] = 0.0
                g["weight_decay"] = 0.0
        return opt, desc + " (lr 0)"

    monkeypatch.setattr(runner, "make_optimizer", frozen)
    m = runner.measure_workload(models.get("resnet50", tiny=True), torch.device("cpu"), ["eager", "fusedops"], 4, 1)
    eager, fused = m["runs"]
    assert eager["agreement"]["agrees"]
    a = fused["agreement"]
    assert not a["agrees"] and "training" in a["failed"], a
    assert eager["initial_loss"] == pytest.approx(fused["initial_loss"], rel=1e-3)
    assert "less than half of eager's" in " ".join(map(str, sum(output_rows(m), [])))


def output_rows(m):
    from fusedops.report import output
    return output.rows({"models": [m]})


def test_cpu_eager_baseline_uses_foreach_adamw(monkeypatch):
    """The CPU eager baseline is the multi-tensor AdamW it is labelled as (foreach unset
    runs the single-tensor loop on CPU)."""
    import torch.optim.adam as adam_mod
    from fusedops.report import runner

    params = [nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4))]
    opt, desc = runner.make_optimizer(params, "torch", models.get("mlp", tiny=True), torch.device("cpu"))
    assert opt.param_groups[0]["foreach"] is True and desc == "torch.optim.AdamW(foreach=True)"
    for p in params:
        p.grad = torch.ones_like(p)
    called = []
    real = adam_mod._multi_tensor_adam
    monkeypatch.setattr(adam_mod, "_multi_tensor_adam", lambda *a, **k: (called.append(1), real(*a, **k))[1])
    opt.step()
    assert called


def test_tiny_report_says_its_step_times_are_noise():
    from fusedops.report import output
    assert output.note_lines({"model": "gpt2-tiny", "steps": 4, "warmup": 1})[0].endswith("noise (not a speed "
                                                                                         "measurement)")
    assert output.note_lines({"model": "gpt2", "steps": 6, "warmup": 1})[0].startswith("step times from 5 timed")
    assert output.note_lines({"model": "gpt2", "steps": 30, "warmup": 5}) == []
    assert output.note_lines({"model": "gpt2", "steps": 30, "warmup": 5, "timing": "T"}) == ["step time: T"]


def test_flops_of_a_linear_layer():
    m, k, n = 5, 7, 3
    lin = nn.Linear(k, n)
    x = torch.randn(m, k, requires_grad=True)
    fwd = WithLoss(lin, lambda model, b: model(b[0]).sum(), torch.device("cpu"), None)
    # forward 2·M·N·K; backward: grad input and grad weight, 2·M·N·K each
    assert count_flops(fwd, (x,)) == 3 * 2 * m * n * k
    # without a gradient for the input, backward computes the weight gradient only
    assert count_flops(fwd, (x.detach(),)) == 2 * 2 * m * n * k


def test_flops_of_cpu_attention_are_counted():
    b, h, t, d = 2, 3, 16, 8
    q = torch.randn(b, h, t, d, requires_grad=True)
    fwd = WithLoss(nn.Identity(), lambda model, bt: F.scaled_dot_product_attention(*bt, is_causal=True).sum(),
                   torch.device("cpu"), None)
    shape = (b, h, t, d)
    assert count_flops(fwd, (q, q, q)) == sdpa_flop_count(shape, shape, shape) + \
        sdpa_backward_flop_count(shape, shape, shape, shape) > 0


def test_optimizer_state_bytes():
    lin = nn.Linear(16, 8)
    opt = torch.optim.AdamW(lin.parameters())
    assert optimizer_state_bytes(opt) == 0
    lin(torch.randn(4, 16)).sum().backward()
    opt.step()
    param_bytes = sum(p.numel() * p.element_size() for p in lin.parameters())
    # exp_avg + exp_avg_sq per parameter, plus a scalar step per parameter
    assert 2 * param_bytes <= optimizer_state_bytes(opt) <= 2 * param_bytes + 2 * 8


# ----------------------------------------------------------------------------- end to end

def _check_run(r, model):
    assert r["ok"], r["error"]
    assert r["step_ms"] > 0 and len(r["step_ms_all"]) == model["steps"]
    assert r["throughput"] == pytest.approx(model["items_per_step"] / (r["step_ms"] * 1e-3))
    assert r["state_bytes"] > 0 and r["saved_bytes"] > 0
    assert r["peak_bytes"] is None and r["mfu"] is None          # CPU: n/a, not made up
    assert len(r["losses"]) == model["steps"] and all(math.isfinite(v) for v in r["losses"])
    assert math.isfinite(r["final_loss"])


def test_report_cli_tiny_cpu(tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["report", "--tiny", "--device", "cpu", "--models", "mlp,gpt2", "--steps", "3", "--out", str(out)])
    assert rc == 0      # on CPU the default variants are eager and fusedops
    data = json.loads((out / "report.json").read_text())
    assert data["meta"]["torch"] == torch.__version__
    assert data["meta"]["FUSEDOPS_NORM_COMPILE"] in ("auto", "op", "inductor")
    assert [m["model"] for m in data["models"]] == ["mlp-tiny", "gpt2-tiny"]
    for m in data["models"]:
        assert m["flops_per_step"] > 0 and m["peak_flops"] is None
        assert [r["variant"] for r in m["runs"]] == ["eager", "fusedops"]
        assert m["reference"]["variant"] == "eager-reordered"
        for r in m["runs"] + [m["reference"]]:
            _check_run(r, m)
        eager, fused = m["runs"]
        # same init and same data: the converted model's loss agrees with eager's
        assert fused["agreement"]["agrees"], fused["agreement"]
        assert eager["agreement"]["diff"] == 0 and eager["vs_eager_time"] == 1.0
        assert fused["optimizer"].startswith(("fusedops.optim.AdamW8bit", "torch.optim.AdamW"))
        assert set(m["convert"]) == {"replaced", "skipped"}
    # different data order moves the loss of the reference run
    assert data["models"][0]["reference"]["losses"] != data["models"][0]["runs"][0]["losses"]
    md = (out / "report.md").read_text()
    assert "| model | variant | step ms |" in md and "## gpt2-tiny" in md and "agreement rule" in md
    captured = capsys.readouterr()
    assert "mlp-tiny" in captured.out and "eager-reordered (reference)" in captured.out
    assert "fusedops vs eager: step time" in captured.out
    assert "default variants are eager,fusedops" in captured.err and "3/6 mlp-tiny · eager-reordered" in captured.err
    # --render rebuilds the outputs from report.json alone (e.g. on a machine with matplotlib)
    again = tmp_path / "again"
    assert main(["report", "--render", str(out / "report.json"), "--out", str(again)]) == 0
    assert (again / "report.md").read_text() == md
    both = tmp_path / "both"
    assert main(["report", "--render", f"{out / 'report.json'},{again / 'report.json'}", "--out", str(both)]) == 0
    assert len(json.loads((both / "report.json").read_text())["models"]) == 4
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (out / "report.png").exists()
        return
    assert (out / "report.png").stat().st_size > 1000 and (again / "report.png").exists()


class LayerNormGELU(nn.Module):
    """Stand-in for a fused module: LayerNorm → GELU from the original LayerNorm's weights."""

    def __init__(self, ln):
        super().__init__()
        self.ln = ln

    def forward(self, x):
        return F.gelu(self.ln(x))


def test_report_uses_convert_and_the_8bit_optimizer_when_present(monkeypatch):
    rule = converter.Rule("ln-gelu", chain=lambda mods, i: (2, LayerNormGELU(mods[i])) if (
        isinstance(mods[i], nn.LayerNorm) and i + 1 < len(mods) and isinstance(mods[i + 1], nn.GELU)) else None)
    monkeypatch.setattr(converter, "RULES", [rule])

    class AdamW8bit(torch.optim.AdamW):
        pass

    monkeypatch.setitem(sys.modules, "fusedops.optim", types.SimpleNamespace(AdamW8bit=AdamW8bit))
    res = run_report(["mlp"], torch.device("cpu"), ["eager", "fusedops"], tiny=True, steps=3, progress=False)
    m = res["models"][0]
    eager, fused = m["runs"]
    assert fused["optimizer"] == "fusedops.optim.AdamW8bit" and eager["optimizer"].startswith("torch.optim.AdamW")
    assert [r["path"] for r in m["convert"]["replaced"]] == ["blocks.0.body.0", "blocks.1.body.0"]
    assert m["convert"]["replaced"][0]["pattern"] == "LayerNorm → GELU"
    assert fused["agreement"]["agrees"] and fused["final_loss"] == pytest.approx(eager["final_loss"], rel=1e-5)


def _live_tensors() -> int:
    import gc
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_a_run_leaves_no_tensor_alive():
    # each variant's peak memory is only its own if the runs before it freed everything
    # (a saved-tensor hook that returned the saved output itself once leaked whole graphs)
    def run():
        run_report(["gpt2"], torch.device("cpu"), ["eager", "fusedops"], tiny=True, steps=2, progress=False)

    run()      # first run: per-device caches (e.g. the optimizer's quantization maps) are made
    before = _live_tensors()
    run()
    assert _live_tensors() == before


def test_report_resnet_tiny_runs():
    res = run_report(["resnet50"], torch.device("cpu"), ["eager", "fusedops"], tiny=True, steps=2, progress=False)
    m = res["models"][0]
    assert m["unit"] == "images" and m["channels_last"] and m["flops_per_step"] > 0
    for r in m["runs"]:
        _check_run(r, m)
    # whatever convert replaced (Conv2d → BatchNorm2d → ReLU chains once that family is in), loss agrees
    assert m["runs"][1]["agreement"]["agrees"], (m["runs"][1]["agreement"], m["convert"])


def test_user_model(tmp_path, monkeypatch):
    (tmp_path / "my_net.py").write_text(
        "import torch\n"
        "def make(tiny=False):\n"
        "    torch.manual_seed(0)\n"
        "    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))\n"
        "    batch = (torch.randn(4, 8), torch.randn(4, 1))\n"
        "    return model, batch, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    res = run_report(["my_net:make"], torch.device("cpu"), ["eager", "fusedops"], tiny=True, steps=2,
                     progress=False)
    m = res["models"][0]
    # first layer: forward + weight gradient (the input needs none); second: + input gradient
    assert m["items_per_step"] == 4 and m["flops_per_step"] == 2 * (2 * 4 * 8 * 16) + 3 * (2 * 4 * 16 * 1)
    for r in m["runs"]:
        _check_run(r, m)
    # a lone tensor as the batch reaches loss_fn as given; a callable batch gives step k's batch
    (tmp_path / "my_net2.py").write_text(
        "import torch\n"
        "def make():\n"
        "    model = torch.nn.Linear(8, 1)\n"
        "    data = lambda k: torch.randn(6, 8, generator=torch.Generator().manual_seed(k))\n"
        "    return model, data, lambda m, x: m(x).square().mean()\n")
    m = run_report(["my_net2:make"], torch.device("cpu"), ["eager"], steps=3, progress=False)["models"][0]
    assert m["items_per_step"] == 6
    _check_run(m["runs"][0], m)
    assert m["reference"]["losses"] != m["runs"][0]["losses"]     # the order of the batches matters


def test_unknown_model_and_variant_are_clear_errors(capsys):
    assert main(["report", "--tiny", "--device", "cpu", "--models", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["report", "--tiny", "--device", "cpu", "--models", "mlp", "--variants", "eager,fast"]) == 2
    assert "unknown variant fast" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps 0: need at least 2"),
    (["--steps", "1"], "--steps 1: need at least 2"),
    (["--warmup", "-1"], "--warmup -1: must be >= 0"),
    (["--steps", "2", "--warmup", "5"], "--warmup 5 with --steps 2"),
    (["--steps", "3", "--warmup", "3"], "--warmup 3 with --steps 3"),
    (["--peak-tflops", "-1"], "--peak-tflops -1: must be a positive"),
    (["--peak-tflops", "0"], "--peak-tflops 0: must be a positive"),
    (["--peak-tflops", "nan"], "--peak-tflops nan: must be a positive"),
    (["--rounds", "-1"], "--rounds -1: must be >= 0"),
])
def test_report_bad_numbers_are_refused_before_running(args, message, tmp_path, capsys, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("a model was built despite a bad argument")

    monkeypatch.setattr(models, "get", no_model)
    assert main(["report", "--tiny", "--device", "cpu", "--models", "mlp", "--out", str(tmp_path)] + args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def test_report_default_warmup_leaves_a_timed_step(monkeypatch):
    """Without --warmup, the default warm-up is shortened to leave one timed step."""
    from fusedops import report

    seen = {}

    def fake_measure(w, device, variants, steps, warmup, peak_tflops, bar, rounds):
        seen.update(steps=steps, warmup=warmup)
        return {}

    monkeypatch.setattr(report, "measure_workload", fake_measure)
    report.run_report(["mlp"], torch.device("cpu"), ["eager"], steps=2, progress=False)   # CPU default warm-up 3
    assert seen == {"steps": 2, "warmup": 1}


def test_report_render_needs_a_report_json(tmp_path, capsys):
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps({"rows": []}))   # e.g. a bench results.json
    assert main(["report", "--render", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "is not a report.json of `fusedops report` (it needs 'meta' and 'models')" in capsys.readouterr().err
    bad.write_text(json.dumps([1, 2]))
    assert main(["report", "--render", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec,package", [("timm:resnet18", "timm"), ("hf:gpt2", "transformers")])
def test_external_models_need_their_package(spec, package):
    try:
        __import__(package)
    except ImportError:
        with pytest.raises(ValueError, match=f"needs {package} installed"):
            models.get(spec, tiny=True)
    else:
        w = models.get(spec, tiny=True)
        assert w.items_per_step > 0


class Broken(nn.Module):
    def forward(self, x):
        raise RuntimeError("broken fused module")


def test_a_failing_variant_is_reported_not_fatal(monkeypatch, tmp_path, capsys):
    rule = converter.Rule("break-gelu", single=lambda mod: Broken() if isinstance(mod, nn.GELU) else None)
    monkeypatch.setattr(converter, "RULES", [rule])
    rc = main(["report", "--tiny", "--device", "cpu", "--models", "mlp", "--steps", "2", "--out", str(tmp_path)])
    assert rc == 1
    m = json.loads((tmp_path / "report.json").read_text())["models"][0]
    eager, fused = m["runs"]
    assert eager["ok"] and eager["agreement"]["agrees"]
    assert not fused["ok"] and fused["error"] == "RuntimeError: broken fused module"
    assert "raise RuntimeError" in fused["traceback"] and fused["agreement"] is None
    assert len(m["convert"]["replaced"]) == 4          # 2 blocks × 2 GELUs
    out = capsys.readouterr().out
    assert "failed: RuntimeError: broken fused module" in out


@pytest.mark.parametrize("name", ["resnet50", "gpt2", "mlp"])
def test_builtin_models_trace_with_fx(name):
    """Converters prove dataflow outside nn.Sequential (residual add → LayerNorm) with torch.fx."""
    w = models.get(name, tiny=True)
    model = w.build()
    x = w.batch(0, "cpu")[0]
    traced = torch.fx.symbolic_trace(model)
    assert torch.equal(traced(x), model(x))


def test_the_report_package_ships():
    """pyproject lists packages explicitly: fusedops.report must be among them."""
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    packages = text.split("packages = [", 1)[1].split("]", 1)[0]
    assert '"fusedops.report"' in packages


# ----------------------------------------------------------------------------- CUDA

@pytest.mark.gpu
def test_report_tiny_cuda_all_variants():
    """On CUDA: CUDA-event step times, peak memory, MFU and agreement, compile variants included."""
    from fusedops.report import VARIANTS
    res = run_report(["mlp"], torch.device("cuda"), list(VARIANTS), tiny=True, steps=4, peak_tflops=989,
                     progress=False)
    m = res["models"][0]
    assert m["autocast"] == "bfloat16" and m["peak_flops"] == 989e12
    assert [r["variant"] for r in m["runs"]] == list(VARIANTS)
    for r in m["runs"] + [m["reference"]]:
        assert r["ok"], (r["variant"], r["traceback"])
        assert r["step_ms"] > 0 and r["peak_bytes"] > 0 and r["state_bytes"] > 0 and 0 < r["mfu"] < 1
        assert (r["saved_bytes"] is None) == r["compiled"]
        assert all(math.isfinite(v) for v in r["losses"])
    for r in m["runs"]:
        assert r["agreement"]["agrees"], (r["variant"], r["agreement"])


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["resnet50", "gpt2"])
def test_report_tiny_cuda_eager_and_fusedops(name):
    res = run_report([name], torch.device("cuda"), ["eager", "fusedops"], tiny=True, steps=4, progress=False)
    m = res["models"][0]
    assert m["flops_per_step"] > 0
    for r in m["runs"]:
        assert r["ok"], (r["variant"], r["traceback"])
        assert r["peak_bytes"] > 0 and r["saved_bytes"] > 0
        assert r["agreement"]["agrees"], (r["variant"], r["agreement"], m["convert"])


def test_backward_thread_option(monkeypatch):
    """--backward-thread caller runs every variant with autograd's multithreading off (a
    CUDA backward then runs on the calling thread), restored afterwards, and says so in the
    metadata; anything else is refused before a model is built."""
    import fusedops.report as report
    seen = []
    real = report.measure_workload

    def measure(*args, **kwargs):
        seen.append(torch._C._is_multithreading_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(report, "measure_workload", measure)
    for thread, enabled in (("caller", False), ("worker", True)):
        res = run_report(["mlp"], torch.device("cpu"), ["eager"], tiny=True, steps=2, progress=False,
                         backward_thread=thread)
        assert res["meta"]["backward_thread"] == thread and res["models"][0]["runs"][0]["ok"]
        assert seen.pop() is enabled
        assert torch._C._is_multithreading_enabled()  # restored
    with pytest.raises(ValueError, match="backward-thread"):
        run_report(["mlp"], torch.device("cpu"), ["eager"], tiny=True, steps=2, progress=False,
                   backward_thread="main")
    assert not seen


def test_step_times_come_from_interleaved_rounds(monkeypatch):
    """After the training runs the variants take turns (round-robin, one untimed step a
    turn); a step time is the median of the rounds' medians, the training run's own median
    is kept beside it; the reference run takes no part. --rounds 0 keeps the training
    run's median, and rounds that fail leave it too, saying why."""
    import statistics

    from fusedops.report import runner

    turns = []
    real = runner.timed_step

    def spy(workload, fwd, opt, k, device):
        turns.append(id(fwd))
        return real(workload, fwd, opt, k, device)

    monkeypatch.setattr(runner, "timed_step", spy)
    res = run_report(["mlp"], torch.device("cpu"), ["eager", "fusedops"], tiny=True, steps=7, warmup=1,
                     progress=False, rounds=3)
    m = res["models"][0]
    assert "median of 3 interleaved rounds" in m["timing"] and "(2 timed steps a variant" in m["timing"]
    for r in m["runs"]:
        assert len(r["step_ms_rounds"]) == 3 and r["step_ms"] == statistics.median(r["step_ms_rounds"])
        assert r["step_ms_training"] == statistics.median(r["step_ms_all"][1:])
        _check_run(r, m)
    assert m["reference"]["step_ms_rounds"] == [] and m["reference"]["step_ms"] == m["reference"]["step_ms_training"]
    # the calls: 7 training steps of each variant and of the reference, and between them the
    # rounds: 3 × (eager 3 steps, fusedops 3 steps)
    rounds = turns[14:-7]
    assert len(rounds) == 18 and len(set(rounds[:3])) == 1 and len(set(rounds[3:6])) == 1
    assert rounds[:6] * 3 == rounds and rounds[0] != rounds[3]
    assert turns[:7] == [rounds[0]] * 7 and turns[7:14] == [rounds[3]] * 7

    res = run_report(["mlp"], torch.device("cpu"), ["eager", "fusedops"], tiny=True, steps=4, warmup=1,
                     progress=False, rounds=0)
    m = res["models"][0]
    assert m["timing"] == "median over the training run's steps after the warm-up"
    assert all(r["step_ms_rounds"] == [] and r["step_ms"] == r["step_ms_training"] for r in m["runs"])

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(runner, "interleaved_rounds", oom)
    res = run_report(["mlp"], torch.device("cpu"), ["eager", "fusedops"], tiny=True, steps=4, warmup=1,
                     progress=False, rounds=3)
    m = res["models"][0]
    assert "the interleaved rounds failed with 2 variants alive: OutOfMemoryError: CUDA out of memory" in m["timing"]
    assert all(r["ok"] and r["step_ms"] == r["step_ms_training"] for r in m["runs"])
