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
    assert "% copy" in capsys.readouterr().out
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
