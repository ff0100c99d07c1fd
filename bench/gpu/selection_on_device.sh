#!/usr/bin/env bash
# One device call for the selection work: the GPU tests (device selection against the reference,
# then the sparse attention tests with every kernel and tuning variant), then the benchmark at
# 8K (selection checked against the reference), 32K and 128K with the attention variants named in
# kernels/cuda/TUNING.md side by side. Full logs under $OUT; a short summary, the tables last.
# Carry: $DHSA_CARRY (prepare_carry.sh). Timeouts: DHSA_SELECTION_TEST_TIMEOUT (75 s),
# DHSA_TEST_TIMEOUT (60 s), DHSA_BENCH_TIMEOUT (90 s). DHSA_SKIP_ATTENTION_TESTS=1 runs the
# selection tests only (a shorter call when the attention kernels did not change).
# Usage: bash bench/gpu/selection_on_device.sh [benchmark options]
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
carry="$root/${DHSA_CARRY:-.device-carry}"
out="${OUT:-/tmp/dhsa-device-out}"
mkdir -p "$out"
source "$root/bench/gpu/device_env.sh"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
head -2 "$carry/MANIFEST"

run_tests() {  # name, timeout, filter
  local start=$SECONDS
  timeout "$2" "$carry/bin/gpu_test" --gtest_color=no --gtest_filter="$3" >"$out/$1.log" 2>&1
  echo "$1 ($3) rc=$? in $((SECONDS - start)) s"
}
run_tests selection_test "${DHSA_SELECTION_TEST_TIMEOUT:-75}" \
  '*SelectionCuda*:*SelectionNmsCuda*:*SelectionGapsCuda*:*MergeCuda*:*DeviceSelectionSupported*:*SelectionToCsr*'
tests=(selection_test)
if [[ "${DHSA_SKIP_ATTENTION_TESTS:-0}" != 1 ]]; then
  run_tests attention_test "${DHSA_TEST_TIMEOUT:-60}" '*SparseAttentionCuda*:*CanImplement*'
  tests+=(attention_test)
fi
(($# > 0)) || set -- --lengths=8192,32768,131072 --seconds=0.2 --check_max=8192 \
  --compare=early,ws,ws_r40,diag_ws_noload,diag_noload
start=$SECONDS
timeout "${DHSA_BENCH_TIMEOUT:-90}" "$carry/bin/sparse_attention_bench" "$@" >"$out/bench.log" 2>&1
echo "bench rc=$? in $((SECONDS - start)) s"

for log in "${tests[@]}"; do
  echo "-- $log"
  grep -E '^\[  (PASSED|FAILED) |^\[  FAILED|tests ran' "$out/$log.log" | head -20
  grep -B2 -A10 'Failure' "$out/$log.log" | cut -c1-200 | head -40
done
grep -E '^RESULT' "$out/selection_test.log" | cut -c1-120 | tail -n 45
if grep -q '^== dhsa on the GPU' "$out/bench.log"; then
  sed -n '/^== dhsa on the GPU/,$p' "$out/bench.log"
else
  tail -n 8 "$out/bench.log" | cut -c1-200
fi
