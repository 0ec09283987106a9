#!/usr/bin/env bash
# One GPU run: build with the machine's torch, run every test, run the benchmark CLI.
# Usage (on the GPU machine, from the repository root): bash bench/gpu_check.sh OUTDIR [bench args…]
set -uo pipefail
out="${1:?output folder}"; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$out/env.txt"
echo "== build"
t0=$(date +%s)
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-16}" \
  python3 -m pip install --no-build-isolation --no-deps --no-index -e . >"$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log"; exit 1; }
echo "built in $(( $(date +%s) - t0 ))s"
python3 -m fusedops info
echo "== tests"
python3 -m pytest -q -x tests -p no:cacheprovider 2>&1 | tee "$out/pytest.log" | tail -15
echo "== diagnostics"
python3 bench/diag_foreach.py 2>&1 | tee "$out/diag.txt"
echo "== bench"
python3 -m fusedops bench --out "$out/bench" "$@" 2>"$out/bench.err" | tee "$out/bench.txt" | tail -60
