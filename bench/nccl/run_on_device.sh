#!/usr/bin/env bash
# The NCCL data plane on a 2-GPU machine (device kind nvidia-h200-x2).
#
#   bench/nccl/run_on_device.sh prepare   # here: pack nccl_gpu_test and nccl_transport_bench of
#                                         # $DHSA_NCCL_BUILD_DIR (default build-h2) with their
#                                         # Abseil/gRPC/protobuf libraries into .device-carry-nccl/
#   bench/nccl/run_on_device.sh run       # there (carry .device-carry-nccl): GPU tests, then the
#                                         # benchmark; logs and summary.txt under $OUT
#   bench/nccl/run_on_device.sh e2e       # there: the service tests over NCCL, then end-to-end
#                                         # prefill (nccl_e2e_bench) for 1 embedded GPU worker,
#                                         # 2 GPU worker processes over NCCL and over gRPC bytes
#
# libnccl is not carried (218 MB): the machine's own is used (the nvidia-nccl-cu13 wheel of its
# python3, else a system copy). NCCL_NVLS_ENABLE=0 always (no NVLink multicast on shared hosts).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
carry="$root/.device-carry-nccl"
mode="${1:-run}"

if [[ "$mode" == prepare ]]; then
  set -e
  build="${DHSA_NCCL_BUILD_DIR:-$root/build-h2}"
  rm -rf "$carry"
  mkdir -p "$carry/bin" "$carry/lib"
  binaries=("$build/tests/nccl/nccl_gpu_test" "$build/bench/nccl/nccl_transport_bench"
    "$build/tests/nccl/nccl_service_gpu_test" "$build/bench/nccl/nccl_e2e_bench"
    "$build/services/worker/dhsa-worker" "$build/services/router/dhsa-router")
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
  tar -C "$carry" -cf - bin lib MANIFEST | xz -T2 -6 >"$root/.device-carry-nccl.tar.xz"
  rm -rf "$carry"
  mkdir -p "$carry"
  mv "$root/.device-carry-nccl.tar.xz" "$carry/carry.tar.xz"
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

if [[ "$mode" == e2e ]]; then
  lengths="${DHSA_E2E_LENGTHS:-32768,131072}"
  reps="${DHSA_E2E_REPS:-2}"
  start=$SECONDS
  NCCL_DEBUG=WARN timeout 60 "$bin/nccl_gpu_test" --gtest_color=no >"$out/nccl_gpu_test.log" 2>&1
  say "nccl_gpu_test rc=$? in $((SECONDS - start)) s: $(grep -E '^\[  (PASSED|FAILED) ' "$out/nccl_gpu_test.log" | tr '\n' ' ')"
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
  trap cleanup EXIT
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
  timeout 90 "$bin/nccl_e2e_bench" --embedded 1 --label "1 GPU worker, embedded, shm" \
    --lengths "$lengths" --reps "$reps" >"$out/e2e_1gpu.log" 2>&1
  say "1 GPU embedded rc=$? in $((SECONDS - start)) s"
  workers=""
  for g in 0 1; do
    CUDA_VISIBLE_DEVICES=$g "$bin/dhsa-worker" --listen 127.0.0.1:0 --backend cuda \
      --max-message-bytes $mm >"$out/worker$g.log" 2>&1 &
    pids+=($!)
    wp=$(port_of "$out/worker$g.log") || { say "worker $g did not start"; cat "$out/worker$g.log"; }
    workers+="${workers:+,}127.0.0.1:$wp"
  done
  for t in nccl grpc; do
    NCCL_DEBUG=WARN "$bin/dhsa-router" --listen 127.0.0.1:0 --workers "$workers" --transport $t \
      --max-message-bytes $mm --worker-call-timeout 120 --drain-seconds 1 >"$out/router_$t.log" 2>&1 &
    rpid=$!
    rp=$(port_of "$out/router_$t.log") || { say "router $t did not start"; cat "$out/router_$t.log"; }
    sleep 1
    start=$SECONDS
    timeout 100 "$bin/nccl_e2e_bench" --target "127.0.0.1:$rp" --label "2 GPU workers, $t" \
      --lengths "$lengths" --reps "$reps" >"$out/e2e_2gpu_$t.log" 2>&1
    say "2 GPU workers $t rc=$? in $((SECONDS - start)) s"
    kill $rpid 2>/dev/null; wait $rpid 2>/dev/null
    grep -E 'NCCL data plane|shared-memory' "$out/router_$t.log" | head -4 | tee -a "$summary"
  done
  cleanup
  cat "$out"/e2e_*.log | grep -E '^config' | head -1 | tee -a "$summary"
  cat "$out"/e2e_1gpu.log "$out"/e2e_2gpu_nccl.log "$out"/e2e_2gpu_grpc.log | grep -vE '^config' \
    | tee -a "$summary"
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
