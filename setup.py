"""Builds fusedops._C: C++ CPU kernels always, CUDA C++ kernels when torch has CUDA and nvcc
is found. FUSEDOPS_BUILD_CUDA=0/1 forces the CUDA part off/on (default: auto).

The extension is written against the LibTorch stable ABI (torch >= 2.10), so one build
serves several torch versions and the .cu files compile against CPU-only torch headers.
"""
import glob
import os

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

STABLE = ["-DTORCH_TARGET_VERSION=0x020a000000000000"]  # stable ABI of torch 2.10
LIMITED_API = "-DPy_LIMITED_API=0x030a0000"


def want_cuda() -> bool:
    flag = os.environ.get("FUSEDOPS_BUILD_CUDA", "auto").strip().lower()
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag in ("0", "off", "false", "no"):
        return False
    if flag in ("1", "on", "true", "yes"):
        if not available:
            raise RuntimeError(
                "FUSEDOPS_BUILD_CUDA=1 but the installed torch has no CUDA "
                f"(torch.version.cuda={torch.version.cuda}) or nvcc was not found (CUDA_HOME={CUDA_HOME})"
            )
        return True
    if flag != "auto":
        raise RuntimeError(f"FUSEDOPS_BUILD_CUDA must be 0, 1 or auto, got {flag!r}")
    return available


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -ffp-contract=off: no multiply-add fused behind the code's back (GCC's default for C++
    # is to fuse where FMA is enabled, as in the AVX2 functions): the 8-bit optimizer step
    # must give the reference's bits; fused operations are written out where wanted.
    cxx = ["-O3", "-std=c++20", "-ffp-contract=off", LIMITED_API, *STABLE]
    if not want_cuda():
        return CppExtension("fusedops._C", sources, py_limited_api=True,
                            extra_compile_args={"cxx": cxx})
    # With no GPU visible torch cannot guess the architectures (it raises); default to Hopper.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc = ["-O3", "-std=c++20", "-DUSE_CUDA", *STABLE, "--expt-relaxed-constexpr", "-lineinfo"]
    return CUDAExtension("fusedops._C", sources, py_limited_api=True,
                         extra_compile_args={"cxx": [*cxx, "-DUSE_CUDA"], "nvcc": nvcc})


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
