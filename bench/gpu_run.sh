#!/usr/bin/env bash
# One GPU run in stages, each under its own time limit, logs under OUT (env BENCH_ARGS,
# REPORT_ARGS, TEST_PROCS pass options on):
#   bash bench/gpu_run.sh OUT STAGE[:SECONDS] ...
# Stages: build, tests (GPU-marked tests), tests-all, bench-<families> (e.g. bench-norm,
# bench-add_,foreach_add_), report-<model>, host-convbn, profile-convbn,
# profile-report_<model> (variants from PROFILE_VARIANTS), host-norm (bench/profile_norm_host.py),
# sweep-norm (bench/sweep_norm_bwd.py with SWEEP_ARGS; output appended to sweep-norm.txt),
# ab-norm (bench/norm_kernels.py time, one process a case of AB_CASES="backend:[ROWSx]N:VAR=value ...;...",
# e.g. "cuda:1024:FUSEDOPS_NORM_CUDA_BWD=blocksync;cuda:1024:", into ab-norm.txt), ncu-norm (the same
# cases through Nsight Compute, into ncu-norm.txt; NCU_ARGS adds options, e.g. "--metrics a,b"), cluster-occupancy
# (bench/cluster_occupancy.cu).
set -uo pipefail
out="${1:?output folder}"; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
for spec in "$@"; do
  stage="${spec%%:*}"; limit=600; [[ "$spec" == *:* ]] && limit="${spec##*:}"
  t0=$(date +%s)
  case "$stage" in
    build)
      nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/env.txt"
      python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/env.txt"
      TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-16}" timeout "$limit" \
        python3 -m pip install --no-build-isolation --no-deps --no-index -e . >"$out/build.log" 2>&1 \
        || { tail -30 "$out/build.log"; exit 1; }
      rc=0 ;;
    tests) timeout -s INT "$limit" python3 -m pytest -q -m gpu -n "${TEST_PROCS:-8}" -rf --tb=line tests -p no:cacheprovider >"$out/pytest-gpu.log" 2>&1; rc=$?
      grep -E "^FAILED|^ERROR|passed|failed" "$out/pytest-gpu.log" | tail -25 ;;
    tests-all) timeout "$limit" python3 -m pytest -q tests -p no:cacheprovider >"$out/pytest.log" 2>&1; rc=$?
      grep -E "^FAILED|^ERROR|passed|failed" "$out/pytest.log" | tail -25 ;;
    bench-*) fams="${stage#bench-}"; extra=(); [[ -n "${BENCH_ARGS:-}" ]] && read -ra extra <<<"$BENCH_ARGS"
      timeout "$limit" python3 -m fusedops bench --ops "$fams" --out "$out/bench-${fams//,/_}" "${extra[@]}" \
        >"$out/bench-${fams//,/_}.txt" 2>"$out/bench-${fams//,/_}.err"; rc=$?
      tail -n +2 "$out/bench-${fams//,/_}.txt" | grep -v "^wrote" ;;
    host-convbn) timeout "$limit" python3 bench/host_convbn.py --device cuda >"$out/host_convbn.txt" 2>&1; rc=$?
      grep -v -e USDT -e Warning -e _warn_once "$out/host_convbn.txt" | head -20 ;;
    host-norm) timeout "$limit" python3 bench/profile_norm_host.py >"$out/host_norm.txt" 2>&1; rc=$?
      grep -v -e USDT -e Warning -e _warn_once "$out/host_norm.txt" | head -16 ;;
    sweep-norm) extra=(); [[ -n "${SWEEP_ARGS:-}" ]] && read -ra extra <<<"$SWEEP_ARGS"
      timeout "$limit" python3 bench/sweep_norm_bwd.py "${extra[@]}" >>"$out/sweep-norm.txt" 2>&1; rc=$?
      grep -E "^N=|failed|WRONG" "$out/sweep-norm.txt" | tail -12 ;;
    ab-norm|ncu-norm) IFS=';' read -ra cases <<<"${AB_CASES:?}"; rc=0; log="$out/$stage.txt"
      # one process a case; ncu-norm: Nsight Compute sections of the backward kernels instead of times
      mode=time; prefix=()
      [[ $stage == ncu-norm ]] && { mode=ncu; prefix=(ncu --clock-control none --profile-from-start off
        --kernel-name regex:bwd --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy
        --section SchedulerStats --section WarpStateStats); [[ -n "${NCU_ARGS:-}" ]] && read -ra more <<<"$NCU_ARGS" \
        && prefix+=("${more[@]}"); }
      for c in "${cases[@]}"; do
        IFS=: read -r be n vars <<<"$c"; rows=32768; [[ "$n" == *x* ]] && { rows="${n%x*}"; n="${n#*x}"; }
        echo "== $be ${rows}x$n ${vars:-default}" >>"$log"
        # shellcheck disable=SC2086
        env $vars timeout "$limit" "${prefix[@]}" python3 bench/norm_kernels.py "$mode" --backend "$be" --rows "$rows" \
          --n "$n" >>"$log" 2>&1 || rc=$?
      done
      if [[ $stage == ab-norm ]]; then
        grep -E "^==|total device" "$log" | paste - - | sed 's/: *\([0-9.]*\) us  total.*/ \1 us/'
      else
        grep -E "^==|  [a-z_]*bwd|DRAM Throughput|Duration|Achieved Occupancy|Issue Slots Busy|No Eligible|Warp Cycles Per Issued" \
          "$log" | head -60
      fi ;;
    cluster-occupancy) nvcc -arch=sm_90a -o /tmp/cluster_occupancy bench/cluster_occupancy.cu && /tmp/cluster_occupancy | tee "$out/cluster_occupancy.txt"; rc=$? ;;
    profile-convbn) timeout "$limit" python3 bench/profile_convbn.py "$out/profile_convbn.txt" >"$out/profile_convbn.log" 2>&1; rc=$?
      tail -25 "$out/profile_convbn.log" ;;
    profile-report_*) model="${stage#profile-report_}"
      timeout "$limit" python3 bench/profile_report.py "$out/profile_report_$model.txt" "$model" \
        "${PROFILE_VARIANTS:-eager,fusedops,compile,fusedops+compile}" >"$out/profile_report_$model.log" 2>&1; rc=$?
      tail -8 "$out/profile_report_$model.log" ;;
    report-*) model="${stage#report-}"; extra=(); [[ -n "${REPORT_ARGS:-}" ]] && read -ra extra <<<"$REPORT_ARGS"
      timeout "$limit" python3 -m fusedops report --models "$model" --out "$out/report-$model" "${extra[@]}" >"$out/report-$model.txt" 2>&1; rc=$?
      tail -30 "$out/report-$model.txt" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
  echo "== $stage: rc=$rc in $(( $(date +%s) - t0 ))s"
done
