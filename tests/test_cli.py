"""The benchmark CLI on a tiny CPU workload: it runs, writes its outputs, numbers are sane."""
import json

import pytest
import torch

from fusedops.__main__ import main


def test_bench_cli_tiny(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["bench", "--device", "cpu", "--ops", "add_,foreach_add_", "--sizes", "2^12,5000",
               "--dtypes", "fp32,bf16", "--no-compile", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["torch"] == torch.__version__ and data["meta"]["copy_GBps"] > 0
    rows = data["rows"]
    cases = {(r["family"], r["case"]) for r in rows}
    assert ("add_", "n=2^12 float32") in cases and ("add_", "n=5000 bfloat16") in cases
    assert any(r["family"] == "foreach_add_" for r in rows)
    for r in rows:
        assert r["time_us"] > 0
        if r["timer"] == "device":
            assert 0 < r["gbps"] and 0 < r["pct_copy"]
        if r["impl"] == "eager":
            assert r["speedup"] == 1.0
    assert {r["impl"] for r in rows} >= {"eager", "fusedops:cpp"}
    md = (out / "results.md").read_text()
    assert "| family | case | impl |" in md
    printed = capsys.readouterr().out
    assert "% copy" in printed and "speed-up" in printed and "vs eager" not in printed
    assert "| speed-up | timer |" in md and all("speedup" in r and "baseline" in r for r in rows)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "results.png").stat().st_size > 1000


def test_bench_cli_rejects_unknown_family(capsys):
    assert main(["bench", "--ops", "nope", "--device", "cpu"]) == 2
    assert "unknown op family nope" in capsys.readouterr().err


def test_info(capsys):
    assert main(["info"]) == 0
    assert "add_:" in capsys.readouterr().out


def test_info_with_a_forced_backend_that_cannot_run(monkeypatch, capsys):
    """info reports a forced backend that cannot run on a device (Triton on CPU tensors
    without the interpreter) instead of failing with a traceback."""
    import fusedops
    from fusedops import _backend
    monkeypatch.setattr(_backend, "available", lambda name, device_type: name != "triton")
    for kernels in _backend.REGISTRY.values():
        monkeypatch.setattr(kernels, "_chosen", {})
    with fusedops.use_backend("triton"):
        assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backend forced (FUSEDOPS_BACKEND): triton" in out
    assert "add_: none: the forced backend 'triton' cannot run on cpu" in out


def test_convbn_cases_each_run_on_their_own_input(monkeypatch):
    """Every case of the conv+BN family times its own workload: two shapes whose inputs
    differ in channels both run (a closure over the case loop's input ran each eval case on
    the last case's input: a channel mismatch, or a larger map timed under a smaller label)."""
    from fusedops.benchmark import convbn, harness

    monkeypatch.setattr(convbn, "CPU_SHAPES", [("3->4 6^2 k3", 2, 3, 4, 6, 3, 1), ("5->4 5^2 k1", 2, 5, 4, 5, 1, 1)])
    ctx = harness.Context(device=torch.device("cpu"), dtypes=[torch.float32], sizes=None, compile=False)
    cases = convbn.convbn_cases(ctx)
    assert [c.name for c in cases] == ["train 3->4 6^2 k3", "eval 3->4 6^2 k3", "train 5->4 5^2 k1",
                                       "eval 5->4 5^2 k1"]
    # on CPU the memory figure is the bytes autograd saves (weights and input included), not a peak
    assert "autograd_saved_MiB" in cases[0].params and "extra_peak_MiB" not in cases[0].params
    seen = []
    real_forward = torch.nn.Conv2d.forward

    def spy(self, x):
        seen.append(tuple(x.shape))
        return real_forward(self, x)

    monkeypatch.setattr(torch.nn.Conv2d, "forward", spy)
    for case in cases:
        if case.name.startswith("eval"):
            seen.clear()
            case.impls["eager"].fn()
            hw = int(case.name.split()[2].split("^")[0])
            cin = int(case.name.split()[1].split("->")[0])
            assert seen and seen[0] == (2, cin, hw, hw), (case.name, seen)
        for impl in case.impls.values():
            impl.fn()


@pytest.mark.parametrize("args, message", [
    (["--sizes", "abc"], "argument --sizes: 'abc' is not a size"),
    (["--sizes", "2^x"], "argument --sizes: '2^x' is not a size"),
    (["--sizes", "1024,-5"], "argument --sizes: '-5': a size must be >= 0"),
    (["--device", "gpu"], "argument --device: 'gpu' is not a device"),
    (["--device", "meta"], "argument --device: 'meta': the benchmarks run on cpu or cuda"),
])
def test_bench_bad_arguments_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--ops", "add_", "--no-compile"] + args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_cuda_without_cuda_is_a_usage_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--ops", "add_", "--device", "cuda"])
    assert exc.value.code == 2
    assert "'cuda': torch sees no CUDA device" in capsys.readouterr().err


def test_bench_nothing_selected_is_an_error(tmp_path, capsys):
    rc = main(["bench", "--device", "cpu", "--ops", "add_", "--sizes", "2^10", "--dtypes", "fp32", "--no-compile",
               "--cases", "nomatch", "--out", str(tmp_path)])
    assert rc == 2 and "no case left to run" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_bench_size_labels():
    from fusedops.benchmark.add import _size_label

    assert [_size_label(n) for n in (0, 1, 2, 4096, 5000)] == ["0", "2^0", "2^1", "2^12", "5000"]


def test_bench_outputs_drop_a_stale_chart(tmp_path):
    """A results.png of an earlier run is removed when this run draws no chart (here: only
    a wall-clock case, which has no % of copy bandwidth to plot)."""
    from fusedops.benchmark import harness

    (tmp_path / "results.png").write_bytes(b"an older chart")
    rows = [harness.Row("add_", "n=4096 fp32 wall/call", "eager", 3.0, None, None, 1.0, "wall", {})]
    written = harness.write_outputs(rows, {"device": "cpu", "copy_GBps": 1.0}, tmp_path)
    assert not (tmp_path / "results.png").exists()
    assert [p.name for p in written] == ["results.json", "results.md"]


def test_every_compile_row_is_compiled_past_dynamos_recompile_limit(monkeypatch):
    """Dynamo keeps 8 compiled versions of one function; every norm case compiles another
    version of the same closure's code. With more than 8 cases, each case's torch.compile
    row must still compile its own graph (it used to time eager from the 9th case on)."""
    from fusedops.benchmark import harness, norm

    graphs = []

    def counting_backend(gm, example_inputs):   # cheap stand-in for inductor: counts graphs
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(harness, "COMPILE_BACKEND", counting_backend)
    ctx = harness.Context(device=torch.device("cpu"), dtypes=[torch.float32], sizes=[32, 64, 128], compile=True)
    cases = norm.norm_cases(ctx)      # 2 patterns x 3 sizes x (fwd, fwd+bwd) = 12 cases, one closure code
    assert len(cases) == 12
    for c in cases:
        c.impls = {"torch.compile": c.impls["torch.compile"]}
    per_case = []

    def two_calls(fn, device):
        before = len(graphs)
        fn()
        fn()
        per_case.append(len(graphs) - before)
        return 1e-6

    monkeypatch.setitem(harness.TIMERS, "device", two_calls)
    rows = harness.run_cases(cases, ctx, 1e9)
    assert [r.case for r in rows] == [c.name for c in cases]
    assert per_case == [1] * 12, per_case


def test_a_compile_row_that_compiles_nothing_fails_instead_of_timing_eager(monkeypatch, capsys):
    from fusedops.benchmark import harness

    monkeypatch.setattr(harness, "COMPILE_BACKEND", "eager")
    x = torch.ones(4)

    def no_graph():   # nothing for Dynamo to capture: it runs as is
        return None

    comp = harness.compile_fn(no_graph)
    graphed = harness.compile_fn(lambda t: t + 1)
    case = harness.Case("t", "case", {}, 0, {"eager": harness.Impl(lambda: x + 1),
                                            "torch.compile": harness.Impl(lambda: comp(), compiled=True),
                                            "compiled ok": harness.Impl(lambda: graphed(x), compiled=True)})
    monkeypatch.setitem(harness.TIMERS, "device", lambda fn, device: (fn(), 1e-6)[1])
    ctx = harness.Context(device=torch.device("cpu"), dtypes=[torch.float32], sizes=None, compile=True)
    rows = harness.run_cases([case], ctx, 1e9)
    assert [r.impl for r in rows] == ["eager", "compiled ok"]
    assert "case · torch.compile: failed: NotCompiled" in capsys.readouterr().err


def test_cpu_timer_runs_at_the_thread_count_it_reports():
    """torch.utils.benchmark.Timer defaults to 1 thread; the metadata reports
    torch.get_num_threads(): the timed calls must run at that count."""
    from fusedops.benchmark import harness

    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = set()
        harness.time_device(lambda: seen.add(torch.get_num_threads()), torch.device("cpu"))
        assert seen == {2}
        assert harness.environment(torch.device("cpu"), 1e9)["threads"] == 2
    finally:
        torch.set_num_threads(n)


def test_norm_bytes_are_the_operations_unique_bytes():
    """x, w, b read once, y and the fp32 stats written once (forward); x, dy, w, b, stats
    read, dx, dW, dB written once (backward). No implementation's partial buffers."""
    from fusedops.benchmark import harness, norm

    ctx = harness.Context(device=torch.device("cpu"), dtypes=[torch.float32], sizes=None, compile=False)
    nbytes = {c.name: c.nbytes for c in norm.norm_cases(ctx)}
    m, n, e = 256, 1024, 4
    fwd = m * n * e + 2 * n * e + m * n * e + 8 * m                 # x, w+b | y, mean+rstd
    bwd = 2 * m * n * e + 2 * n * e + 8 * m + m * n * e + 2 * n * e  # x, dy, w+b, stats | dx, dW+dB
    assert nbytes["LN+GELU(tanh) 256x1024 float32 fwd"] == fwd
    assert nbytes["LN+GELU(tanh) 256x1024 float32 fwd+bwd"] == fwd + bwd
    m, n = 64, 4096
    fwd = 2 * m * n * e + n * e + 2 * m * n * e + 4 * m             # x, r, w | y, s, rstd
    bwd = 3 * m * n * e + n * e + 4 * m + m * n * e + n * e          # s, dy, ds, w, rstd | dx, dW
    assert nbytes["Add+RMS+SiLU 64x4096 float32 fwd+bwd"] == fwd + bwd


def test_speedup_column_says_what_it_divides(monkeypatch):
    """The bench's ratio is baseline time ÷ this time (the report's is ours ÷ eager's): the
    header says speed-up, a legend defines it and names baselines other than eager (Lion:
    torch has none, the baseline is fusedops' own first backend)."""
    from fusedops.benchmark import harness, optim8bit

    ctx = harness.Context(device=torch.device("cpu"), dtypes=[torch.float32], sizes=None, compile=False)
    cases = optim8bit.optim_cases(ctx)
    monkeypatch.setitem(harness.TIMERS, "device", lambda fn, device: 1e-3)
    rows = harness.run_cases(cases, ctx, 1e9)
    lion = [r for r in rows if r.params["kind"] == "lion"]
    assert lion and all(r.baseline == "fusedops:cpp" for r in lion)
    assert all(r.baseline.startswith("torch") for r in rows if r.params["kind"] != "lion")
    assert any(r.case.startswith("adamw 96 tensors 0.79M") for r in rows)     # 788,480 params, not "1M"
    text = harness.render_text(rows)
    header = text.splitlines()[0]
    assert "speed-up" in header and "vs eager" not in header
    assert "speed-up = the case's baseline time ÷ this row's time" in text
    assert "baseline fusedops:cpp: lion 96 tensors" in text
    md = harness.render_markdown(rows, {"device": "cpu", "copy_GBps": 1.0, "threads": 2})
    assert "| speed-up | timer |" in md and "exceed 100% of the copy" in md


def test_info_names_the_size_dependent_cuda_defaults(monkeypatch, capsys):
    """On CUDA the norm ops choose their backend by hidden size: info says so rather than
    naming one backend (simulated CUDA device: every backend available)."""
    from fusedops import _backend
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_backend, "available", lambda name, device_type: True)
    for kernels in _backend.REGISTRY.values():
        monkeypatch.setattr(kernels, "_chosen", {})
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    upto = _backend.REGISTRY["layer_norm_act"].cuda_default_upto
    assert upto is not None
    assert f"cuda layer_norm_act: {upto[0]} for sizes up to {upto[1]}," in out.replace("  ", " ")
