"""The benchmark CLI on a tiny CPU workload: it runs, writes its outputs, numbers are sane."""
import json

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
