"""The C++ CPU kernels' portable scalar loops. On an x86-64 CPU with AVX2 + FMA + F16C the
kernels take their vector path (csrc/cpu/vec_avx2.h); FUSEDOPS_CPU_AVX2=0 turns it off for
the process, so these tests run the CPU tests of each family again, in a child process,
through the scalar loops (which are what CPUs without AVX2 run)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedops import _native

TESTS = Path(__file__).parent

SUBSETS = {
    "add": ["test_add.py", "-k", "cpu-cpp"],
    "norm": ["test_norm.py", "-k", "cpu-cpp and (test_activations_dtypes or test_shapes or test_optional_params)"],
    "batchnorm": ["test_convbn.py", "-k", "cpu-cpp and (test_bn_ops_kernel_tilings or test_bn_stats_large)"],
    "optim8bit": ["test_optim8bit.py", "-k", "cpu-cpp"],
}


@pytest.mark.skipif(not _native.has_kernels("cpu"), reason="the extension is not built")
@pytest.mark.parametrize("family", sorted(SUBSETS))
def test_scalar_loops(family):
    env = dict(os.environ, FUSEDOPS_CPU_AVX2="0")
    code = ("import sys, torch, fusedops, pytest; "
            f"assert torch.ops.fusedops_C.cpu_vector_path(torch.empty(0)) is False; "
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', *sys.argv[1:]]))")
    args = [str(TESTS / SUBSETS[family][0]), *SUBSETS[family][1:]]
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=TESTS, capture_output=True, text=True,
                          timeout=600)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
