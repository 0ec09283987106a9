"""Whether an error raised inside a native (stable-ABI) op comes back as a Python
exception or crashes the process: one child process a case, each calling a native op with
a bad argument (new checks of the norm ops and checks that predate them, on the CPU and on
CUDA). Prints each case's exit status (1 and the op's error: raised; negative: killed by
that signal).

    python bench/native_errors.py
"""
import subprocess
import sys

import torch

PRE = ("import torch, fusedops; from fusedops import _native; F = _native.op('norm_act_fwd'); "
       "B = _native.op('norm_act_bwd'); A = _native.op('add_')\n")
CASES = {
    "cpu fwd bad y_dtype (norm.cpp TU)":
        "x = torch.randn(4, 8); F(x, None, None, None, 1e-5, 0, False, 0, torch.int32)",
    "cuda fwd bad y_dtype (norm.cu TU)":
        "x = torch.randn(4, 8, device='cuda'); F(x, None, None, None, 1e-5, 0, False, 0, torch.int32)",
    "cuda fwd bad mode (pre-existing check)":
        "x = torch.randn(4, 8, device='cuda'); F(x, None, None, None, 1e-5, 0, False, 7, None)",
    "cuda bwd bad shape (pre-existing check)":
        "s = torch.randn(4, 8, device='cuda'); r = torch.ones(4, device='cuda'); "
        "B(torch.randn(3, 8, device='cuda'), s, None, None, None, r, None, 0)",
    "cpu bwd bad shape (pre-existing check)":
        "s = torch.randn(4, 8); r = torch.ones(4); B(torch.randn(3, 8), s, None, None, None, r, None, 0)",
    "cuda add_ bad (pre-existing)": "x = torch.randn(4, 8, device='cuda'); A(x, torch.randn(3, 8, device='cuda'), 1.0)",
}


def main():
    print(f"torch {torch.__version__}")
    for name, code in CASES.items():
        if "cuda" in name and not torch.cuda.is_available():
            continue
        r = subprocess.run([sys.executable, "-c", PRE + code + "\nprint('NO ERROR')"], capture_output=True, text=True)
        tail = (r.stderr.strip().splitlines() or [""])[-1][:160]
        print(f"{name:42s} rc={r.returncode:4d}  {r.stdout.strip()[:40]} {tail}")


if __name__ == "__main__":
    main()
