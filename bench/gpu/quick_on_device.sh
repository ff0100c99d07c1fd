#!/usr/bin/env bash
# A shorter device run than run_on_device.sh for kernel work: the sparse attention tests (every
# kernel the device runs; DHSA_TEST_FILTER sets the gtest filter), with DHSA_WITH_WORKER=1 the
# CUDA worker tests (run_worker_tests.sh, its carry named by DHSA_WORKER_CARRY), then our
# benchmark (no peers), tables last. Carry: $DHSA_CARRY (default .device-carry, prepare_carry.sh).
# Usage: bash bench/gpu/quick_on_device.sh [benchmark options, default --seconds=0.2]
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
carry="$root/${DHSA_CARRY:-.device-carry}"
out="${OUT:-/tmp/dhsa-device-out}"
mkdir -p "$out"
source "$root/bench/gpu/device_env.sh"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
start=$SECONDS
timeout "${DHSA_TEST_TIMEOUT:-120}" "$carry/bin/gpu_test" --gtest_color=no \
  --gtest_filter="${DHSA_TEST_FILTER:-*SparseAttentionCuda*}" >"$out/gpu_test.log" 2>&1
echo "gpu_test (${DHSA_TEST_FILTER:-*SparseAttentionCuda*}) rc=$? in $((SECONDS - start)) s"
grep -E '^RESULT|FAILED|PASSED|Failure' "$out/gpu_test.log" | cut -c1-160 | head -80
grep -A12 'Failure' "$out/gpu_test.log" | head -60
# The CUDA worker tests (bench/gpu/run_worker_tests.sh prepare packed them) when their carry is here.
worker_carry="${DHSA_WORKER_CARRY:-.device-carry-worker}"
if [[ "${DHSA_WITH_WORKER:-0}" == 1 && -e "$root/$worker_carry/carry.tar.xz" ]]; then
  OUT="$out/worker" DHSA_WORKER_BENCH="${DHSA_WORKER_BENCH:-0}" \
    bash "$root/bench/gpu/run_worker_tests.sh" run >"$out/worker.log" 2>&1
  echo "worker tests rc=$?"
  grep -E 'FAILED|PASSED|rc=|run [0-9]' "$out/worker.log" | cut -c1-220 | head -30
fi
(($# > 0)) || set -- --seconds=0.2
start=$SECONDS
timeout "${DHSA_BENCH_TIMEOUT:-200}" "$carry/bin/sparse_attention_bench" "$@" >"$out/bench.log" 2>&1
echo "bench rc=$? in $((SECONDS - start)) s"
if grep -q '^== dhsa on the GPU' "$out/bench.log"; then
  sed -n '/^== dhsa on the GPU/,$p' "$out/bench.log"
else
  tail -n 8 "$out/bench.log" | cut -c1-200
fi
