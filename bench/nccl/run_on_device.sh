#!/usr/bin/env bash
# The NCCL data plane on a 2-GPU machine (device kind nvidia-h200-x2).
#
#   bench/nccl/run_on_device.sh prepare   # here: pack nccl_gpu_test and nccl_transport_bench of
#                                         # $DHSA_NCCL_BUILD_DIR (default build-h2) with their
#                                         # Abseil/gRPC/protobuf libraries into .device-carry-nccl/
#   bench/nccl/run_on_device.sh run       # there (carry .device-carry-nccl): GPU tests, then the
#                                         # benchmark; logs and summary.txt under $OUT
#   bench/nccl/run_on_device.sh e2e       # there: the NCCL tests and the service tests over
#                                         # NCCL, then end-to-end prefill (nccl_e2e_bench) for the
#                                         # 1-GPU library in process, 1 embedded GPU worker, 2 GPU
#                                         # worker processes over NCCL (device I/O, and staged
#                                         # through host memory) and over gRPC bytes; per-phase
#                                         # worker times (DHSA_CUDA_WORKER_TIMING=1) in the summary
#   bench/nccl/run_on_device.sh router-selection  # there (one GPU is enough): the router's
#                                         # selection on its GPU (router_selection_gpu_test),
#                                         # then 1 embedded CUDA worker with the router selecting
#                                         # on the CPU and on the GPU, default config and paper
#                                         # preset, and the 1-GPU library in process
#   bench/nccl/run_on_device.sh router-select-host  # there (one GPU): the packed selection
#                                         # download against the strided one, the router's GPU
#                                         # selection test, then 1 embedded CUDA worker with the
#                                         # router selecting on the GPU (default, paper) and on the
#                                         # CPU (default), the select stage's parts
#                                         # (DHSA_ROUTER_SELECT_TIMING=1) in the summary
#   bench/nccl/run_on_device.sh locked-shm  # there (one GPU): the CUDA worker's shared-memory
#                                         # I/O page-locked in place against the pageable path
#                                         # (cuda_locked_shm_test), then 1 embedded CUDA worker,
#                                         # default and paper, locked and DHSA_WORKER_SHM_LOCKED=0,
#                                         # worker phases (DHSA_CUDA_WORKER_TIMING=1) in the summary
#
# libnccl is not carried (218 MB): the machine's own is used (the nvidia-nccl-cu13 wheel of its
# python3, else a system copy). NCCL_NVLS_ENABLE=0 always (no NVLink multicast on shared hosts).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
carry="$root/${DHSA_NCCL_CARRY:-.device-carry-nccl}"  # DHSA_NCCL_CARRY: another (ignored) folder
mode="${1:-run}"

if [[ "$mode" == prepare ]]; then
  set -e
  build="${DHSA_NCCL_BUILD_DIR:-$root/build-h2}"
  rm -rf "$carry"
  mkdir -p "$carry/bin" "$carry/lib"
  binaries=("$build/tests/nccl/nccl_gpu_test" "$build/bench/nccl/nccl_transport_bench"
    "$build/tests/nccl/nccl_service_gpu_test" "$build/bench/nccl/nccl_e2e_bench"
    "$build/services/worker/dhsa-worker" "$build/services/router/dhsa-router"
    "$build/tests/nccl/cuda_device_io_test" "$build/tests/gpu_service/gpu_service_test"
    "$build/tests/nccl/router_selection_gpu_test"
    "$build/tests/nccl/cuda_locked_shm_test"
    "$build/tests/router_select/router_to_selection_gpu_test")
  present=()
  for b in "${binaries[@]}"; do
    if [[ -e "$b" ]]; then present+=("$b"); else echo "prepare: $b not built, left out"; fi
  done
  binaries=("${present[@]}")
  for b in "${binaries[@]}"; do strip --strip-debug -o "$carry/bin/$(basename "$b")" "$b"; done
  for b in "${binaries[@]}"; do
    ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}'
  done | sort -u | while read -r name path; do
    case "$name" in
      linux-vdso* | ld-linux* | libc.so* | libm.so* | libpthread.so* | libdl.so* | librt.so* | \
        libstdc++.so* | libgcc_s.so* | libcuda.so* | libcudart.so* | libcublas* | libnccl* | \
        libnvidia*) continue ;;
    esac
    cp -L "$path" "$carry/lib/$name"
  done
  strip --strip-unneeded "$carry"/lib/*.so* 2>/dev/null || true
  echo "built $(date -u +%FT%TZ), commit $(git -C "$root" rev-parse --short HEAD) (working tree may differ)" \
    >"$carry/MANIFEST"
  tar -C "$carry" -cf - bin lib MANIFEST | xz -T2 -6 >"$carry.tar.xz"
  rm -rf "$carry"
  mkdir -p "$carry"
  mv "$carry.tar.xz" "$carry/carry.tar.xz"
  du -sh "$carry"
  exit 0
fi

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out="${OUT:-/tmp/dhsa-nccl-out}"
mkdir -p "$out"
summary="$out/summary.txt"
: >"$summary"
say() { echo "$*" | tee -a "$summary"; }
[[ -d "$carry/bin" ]] || tar -C "$carry" -xJf "$carry/carry.tar.xz" || exit 1
chmod +x "$carry"/bin/*
nccl_dir="$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)"
if [[ -z "$nccl_dir" || ! -e "$nccl_dir/libnccl.so.2" ]]; then
  nccl_dir="$(dirname "$(ldconfig -p | awk '/libnccl.so.2/ {print $NF; exit}')" 2>/dev/null)"
fi
export LD_LIBRARY_PATH="$carry/lib:${nccl_dir}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
bin="$carry/bin"
say "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tr '\n' ';')"
say "$(cat "$carry/MANIFEST"); libnccl from ${nccl_dir:-?}; NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE"
nvidia-smi topo -m >"$out/topo.txt" 2>&1
say "topology: $(grep -E '^GPU0' "$out/topo.txt" | tr -s ' ')"

if [[ "$mode" == router-selection ]]; then
  # DHSA_E2E_LENGTHS (32768,131072); one warm-up and DHSA_E2E_REPS (1) timed calls per row.
  lengths="${DHSA_E2E_LENGTHS:-32768,131072}"
  reps="${DHSA_E2E_REPS:-1}"
  rc=0
  start=$SECONDS
  timeout 200 "$bin/router_selection_gpu_test" --gtest_color=no >"$out/router_selection_gpu_test.log" 2>&1
  rc=$?
  say "router_selection_gpu_test rc=$rc in $((SECONDS - start)) s"
  grep -E '^\[ +(OK|FAILED|SKIPPED) +\]|PASSED|FAILED TEST|differ|router on|NVIDIA' \
    "$out/router_selection_gpu_test.log" | tee -a "$summary"
  grep -B2 -A8 'Failure' "$out/router_selection_gpu_test.log" | head -40 | tee -a "$summary"
  for preset in default paper; do
    start=$SECONDS
    timeout 60 "$bin/nccl_e2e_bench" --inprocess-gpu 1 --preset $preset \
      --label "1 GPU in process, $preset" --lengths "$lengths" --reps "$reps" \
      >"$out/inprocess_$preset.log" 2>&1
    say "in process $preset rc=$? in $((SECONDS - start)) s"
    for where in cpu auto; do
      start=$SECONDS
      timeout 150 "$bin/nccl_e2e_bench" --embedded 1 --preset $preset --selection-device $where \
        --label "1 GPU worker, $preset, sel $where" --lengths "$lengths" --reps "$reps" \
        >"$out/embedded_${preset}_$where.log" 2>&1
      say "embedded $preset selection $where rc=$? in $((SECONDS - start)) s"
    done
  done
  cat "$out"/inprocess_default.log | tee -a "$summary"
  grep -vE '^config' "$out"/inprocess_paper.log | tee -a "$summary"
  grep -E '^config' "$out"/embedded_default_cpu.log | tee -a "$summary"
  cat "$out"/embedded_*.log | grep -vE '^config' | tee -a "$summary"
  exit $rc
fi

if [[ "$mode" == e2e ]]; then
  # Logs go to $out/logs, packed into $out/logs.tar.xz at the end (8 files come back at most).
  summary_dir="$out"
  out="$out/logs"
  mkdir -p "$out"
  pack() { tar -C "$summary_dir" -cJf "$summary_dir/logs.tar.xz" logs && rm -rf "$summary_dir/logs"; }
  # DHSA_E2E_LENGTHS (32768,131072), DHSA_E2E_REPS (2 timed calls after 1 warm-up),
  # DHSA_E2E_GRPC_LENGTHS (32768: gRPC bytes at 128K takes > 30 s a call; "32768,131072" times one
  # 128K call with no warm-up, bounded), DHSA_E2E_HOST_STAGED (1: also 2 GPU workers over NCCL with
  # q/o staged through host memory, DHSA_WORKER_NCCL_DEVICE=0, at the last length).
  lengths="${DHSA_E2E_LENGTHS:-32768,131072}"
  reps="${DHSA_E2E_REPS:-2}"
  grpc_lengths="${DHSA_E2E_GRPC_LENGTHS:-32768}"
  # One GPU: the CUDA worker backend's device I/O against its host path, and the CUDA worker
  # service tests (the backend's host path end to end).
  for t in ${DHSA_E2E_GPU_TESTS:-cuda_device_io_test gpu_service_test}; do
    start=$SECONDS
    timeout 120 "$bin/$t" --gtest_color=no >"$out/$t.log" 2>&1
    say "$t rc=$? in $((SECONDS - start)) s: $(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$out/$t.log" | tr '\n' ' ')"
    grep -B2 -A8 'Failure' "$out/$t.log" | head -30 | tee -a "$summary"
  done
  start=$SECONDS
  NCCL_DEBUG=WARN timeout 60 "$bin/nccl_gpu_test" --gtest_color=no >"$out/nccl_gpu_test.log" 2>&1
  say "nccl_gpu_test rc=$? in $((SECONDS - start)) s: $(grep -E '^\[  (PASSED|FAILED) ' "$out/nccl_gpu_test.log" | tr '\n' ' ')"
  grep -B2 -A8 'Failure' "$out/nccl_gpu_test.log" | head -30 | tee -a "$summary"
  start=$SECONDS
  NCCL_DEBUG=WARN timeout 120 "$bin/nccl_service_gpu_test" --gtest_color=no \
    >"$out/nccl_service_gpu_test.log" 2>&1
  rc=$?
  say "nccl_service_gpu_test rc=$rc in $((SECONDS - start)) s"
  grep -E '^\[ +(OK|FAILED|SKIPPED) +\]|PASSED|FAILED TEST|^worker [0-9]' \
    "$out/nccl_service_gpu_test.log" | tee -a "$summary"
  grep -B2 -A8 'Failure' "$out/nccl_service_gpu_test.log" | head -40 | tee -a "$summary"
  pids=()
  cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; pids=(); }
  trap 'cleanup; pack' EXIT
  port_of() {
    for _ in $(seq 600); do
      p=$(grep -oE 'port [0-9]+' "$1" | head -1 | cut -d' ' -f2)
      [[ -n "$p" ]] && { echo "$p"; return 0; }
      sleep 0.1
    done
    return 1
  }
  mm=67108864
  start=$SECONDS
  timeout 60 "$bin/nccl_e2e_bench" --inprocess-gpu 1 --label "1 GPU in process (library)" \
    --lengths "$lengths" --reps "$reps" >"$out/e2e_inprocess.log" 2>&1
  say "1 GPU in process rc=$? in $((SECONDS - start)) s"
  start=$SECONDS
  DHSA_CUDA_WORKER_TIMING=1 timeout 90 "$bin/nccl_e2e_bench" --embedded 1 \
    --label "1 GPU worker, embedded, shm" --lengths "$lengths" --reps "$reps" \
    >"$out/e2e_1gpu.log" 2>&1
  say "1 GPU embedded rc=$? in $((SECONDS - start)) s"
  grep 'cuda attend' "$out/e2e_1gpu.log" | tail -1 | tee -a "$summary"
  if (( $(nvidia-smi -L 2>/dev/null | grep -c '^GPU') < 2 )); then
    say "one GPU: no NCCL runs (the NCCL tests above skip)"
    cat "$out"/e2e_inprocess.log | tee -a "$summary"
    grep -vE 'cuda attend' "$out"/e2e_1gpu.log | tee -a "$summary"
    exit $rc
  fi
  start_workers() {  # $1: log suffix; the environment passes on.
    workers=""
    for g in 0 1; do
      CUDA_VISIBLE_DEVICES=$g DHSA_CUDA_WORKER_TIMING=1 "$bin/dhsa-worker" --listen 127.0.0.1:0 \
        --backend cuda --max-message-bytes $mm >"$out/worker$g$1.log" 2>&1 &
      pids+=($!)
      wp=$(port_of "$out/worker$g$1.log") || { say "worker $g did not start"; cat "$out/worker$g$1.log"; }
      workers+="${workers:+,}127.0.0.1:$wp"
    done
  }
  bench_router() {  # $1 transport, $2 lengths, $3 label, $4 bound (s), $5... bench flags
    local t=$1 lens=$2 label=$3 bound=$4
    shift 4
    NCCL_DEBUG=WARN "$bin/dhsa-router" --listen 127.0.0.1:0 --workers "$workers" --transport $t \
      --max-message-bytes $mm --worker-call-timeout 120 --drain-seconds 1 >"$out/router_$t$label.log" 2>&1 &
    rpid=$!
    rp=$(port_of "$out/router_$t$label.log") || { say "router $t did not start"; cat "$out/router_$t$label.log"; }
    sleep 1
    start=$SECONDS
    timeout "$bound" "$bin/nccl_e2e_bench" --target "127.0.0.1:$rp" --label "2 GPU workers, $t$label" \
      --lengths "$lens" "$@" >"$out/e2e_2gpu_$t$label.log" 2>&1
    say "2 GPU workers $t$label rc=$? in $((SECONDS - start)) s"
    kill $rpid 2>/dev/null; wait $rpid 2>/dev/null
    grep -E 'NCCL data plane|shared-memory' "$out/router_$t$label.log" | head -2 | tee -a "$summary"
  }
  start_workers ""
  bench_router nccl "$lengths" "" 60 --reps "$reps"
  for g in 0 1; do grep 'cuda attend' "$out/worker$g.log" | tail -1 | tee -a "$summary"; done
  bench_router grpc "$grpc_lengths" "" 100 --reps 1 --warmups 0
  cleanup
  if [[ "${DHSA_E2E_HOST_STAGED:-1}" == 1 ]]; then
    export DHSA_WORKER_NCCL_DEVICE=0
    start_workers "_host"
    bench_router nccl "${lengths##*,}" "-host-staged" 60 --reps 1
    for g in 0 1; do grep 'cuda attend' "$out/worker${g}_host.log" | tail -1 | tee -a "$summary"; done
    unset DHSA_WORKER_NCCL_DEVICE
    cleanup
  fi
  cat "$out"/e2e_inprocess.log | tee -a "$summary"
  cat "$out"/e2e_1gpu.log | grep -E '^config' | head -1 | tee -a "$summary"
  cat "$out"/e2e_1gpu.log "$out"/e2e_2gpu_*.log | grep -vE '^config|cuda attend' | tee -a "$summary"
  exit $rc
fi

if [[ "$mode" == router-select-host ]]; then
  # DHSA_E2E_LENGTHS (32768,131072); one warm-up and DHSA_E2E_REPS (1) timed calls per row.
  lengths="${DHSA_E2E_LENGTHS:-32768,131072}"
  reps="${DHSA_E2E_REPS:-1}"
  rc=0
  for t in router_to_selection_gpu_test router_selection_gpu_test; do
    start=$SECONDS
    timeout 120 "$bin/$t" --gtest_color=no >"$out/$t.log" 2>&1
    trc=$?
    rc=$(( rc != 0 ? rc : trc ))
    say "$t rc=$trc in $((SECONDS - start)) s"
    grep -E '^\[ +(OK|FAILED|SKIPPED) +\]|PASSED|FAILED TEST|differ' "$out/$t.log" | tee -a "$summary"
    grep -B2 -A8 'Failure' "$out/$t.log" | head -30 | tee -a "$summary"
  done
  export DHSA_ROUTER_SELECT_TIMING=1
  for run in "default auto" "paper auto" "default cpu"; do
    set -- $run
    start=$SECONDS
    timeout 150 "$bin/nccl_e2e_bench" --embedded 1 --preset "$1" --selection-device "$2" \
      --label "1 GPU worker, $1, sel $2" --lengths "$lengths" --reps "$reps" \
      >"$out/embedded_${1}_$2.log" 2>"$out/embedded_${1}_$2.err"
    say "embedded $1 selection $2 rc=$? in $((SECONDS - start)) s"
  done
  unset DHSA_ROUTER_SELECT_TIMING
  grep -hE '^config' "$out"/embedded_default_auto.log | head -1 | tee -a "$summary"
  for f in default_auto paper_auto default_cpu; do
    grep -vE '^config' "$out/embedded_$f.log" | tee -a "$summary"
  done
  for f in default_auto paper_auto default_cpu; do
    say "-- $f: select-stage parts (warm-up and timed call per length)"
    grep -E 'dhsa-router select' "$out/embedded_$f.err" | tail -12 | tee -a "$summary"
  done
  exit $rc
fi

if [[ "$mode" == locked-shm ]]; then
  # DHSA_E2E_LENGTHS (32768,131072); one warm-up and DHSA_E2E_REPS (1) timed calls per row.
  lengths="${DHSA_E2E_LENGTHS:-32768,131072}"
  reps="${DHSA_E2E_REPS:-1}"
  start=$SECONDS
  timeout 120 "$bin/cuda_locked_shm_test" --gtest_color=no >"$out/cuda_locked_shm_test.log" 2>&1
  rc=$?
  say "cuda_locked_shm_test rc=$rc in $((SECONDS - start)) s"
  grep -E '^\[ +(OK|FAILED|SKIPPED) +\]|PASSED|FAILED TEST|equal to the bit|page-locking' \
    "$out/cuda_locked_shm_test.log" | tee -a "$summary"
  grep -B2 -A8 'Failure' "$out/cuda_locked_shm_test.log" | head -30 | tee -a "$summary"
  # DHSA_LOCKED_RUNS: "<preset> <locked>" pairs, comma-separated.
  IFS=, read -ra runs <<<"${DHSA_LOCKED_RUNS:-default 1,default 0,paper 1,paper 0}"
  export DHSA_CUDA_WORKER_TIMING=1
  for run in "${runs[@]}"; do
    set -- $run
    start=$SECONDS
    DHSA_WORKER_SHM_LOCKED=$2 timeout 110 "$bin/nccl_e2e_bench" --embedded 1 --preset "$1" \
      --selection-device auto --label "1 GPU worker, $1, locked $2" --lengths "$lengths" \
      --reps "$reps" >"$out/embedded_${1}_$2.log" 2>"$out/embedded_${1}_$2.err"
    say "embedded $1 locked $2 rc=$? in $((SECONDS - start)) s"
  done
  unset DHSA_CUDA_WORKER_TIMING
  files=()
  for run in "${runs[@]}"; do set -- $run; files+=("${1}_$2"); done
  grep -hE '^config' "$out/embedded_${files[0]}.log" | head -1 | tee -a "$summary"
  for f in "${files[@]}"; do
    grep -vE '^config' "$out/embedded_$f.log" | tee -a "$summary"
  done
  for f in "${files[@]}"; do
    say "-- $f: worker phases (warm-up and timed call per length), page-locking"
    grep -E 'cuda attend: [0-9]+x(32768|131072) rows|page-lock' "$out/embedded_$f.err" | \
      tail -14 | tee -a "$summary"
  done
  exit $rc
fi

start=$SECONDS
NCCL_DEBUG=WARN timeout 150 "$bin/nccl_gpu_test" --gtest_color=no >"$out/nccl_gpu_test.log" 2>&1
rc=$?
say "nccl_gpu_test rc=$rc in $((SECONDS - start)) s"
grep -E '^\[ +(OK|FAILED|SKIPPED) +\]|PASSED|FAILED TEST|set up in|ended' "$out/nccl_gpu_test.log" | tee -a "$summary"
grep -B2 -A8 'Failure' "$out/nccl_gpu_test.log" | head -40 | tee -a "$summary"

start=$SECONDS
NCCL_DEBUG=WARN timeout "${DHSA_NCCL_BENCH_TIMEOUT:-180}" "$bin/nccl_transport_bench" \
  --reps "${DHSA_NCCL_BENCH_REPS:-5}" >"$out/bench.log" 2>&1
brc=$?
say "nccl_transport_bench rc=$brc in $((SECONDS - start)) s"
grep -v '^NCCL' "$out/bench.log" | tee -a "$summary" | tail -40 >/dev/null
exit $(( rc != 0 ? rc : brc ))
