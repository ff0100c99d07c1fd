#!/usr/bin/env bash
# One device call for the Hopper attention kernel work: the sparse attention tests (every kernel
# and tuning variant against the reference; the TMA variants against `ws` bit for bit), then the
# benchmark on the `paper` config with the variants named in DHSA_COMPARE side by side, then
# (DHSA_DEFAULT_CONFIG=1) a short benchmark on this build's default config (DhsaConfig{}), each
# benchmark in its own process so that one failing leaves the other's numbers. Full logs under
# $OUT; a short summary, the tables last. Carry: $DHSA_CARRY (prepare_carry.sh).
# Timeouts: DHSA_TEST_TIMEOUT (120 s), DHSA_BENCH_TIMEOUT (150 s), DHSA_DEFAULT_TIMEOUT (60 s).
# Usage: bash bench/gpu/attention_on_device.sh [benchmark options for the paper run]
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
carry="$root/${DHSA_CARRY:-.device-carry}"
out="${OUT:-/tmp/dhsa-device-out}"
mkdir -p "$out"
source "$root/bench/gpu/device_env.sh"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
head -2 "$carry/MANIFEST"

start=$SECONDS
timeout "${DHSA_TEST_TIMEOUT:-120}" "$carry/bin/gpu_test" --gtest_color=no \
  --gtest_filter="${DHSA_TEST_FILTER:-*SparseAttentionCuda*:*CanImplement*}" \
  >"$out/attention_test.log" 2>&1
echo "attention_test rc=$? in $((SECONDS - start)) s"
compare="${DHSA_COMPARE:-early,ws_tma_pp,ws_tma_pp_h2,ws_tma_pp_h16,diag_ws_pp_noload}"
(($# > 0)) || set -- --lengths=8192,131072 --budgets=4096 --seconds=0.2 --check_max=8192 \
  --compare="$compare"
start=$SECONDS
timeout "${DHSA_BENCH_TIMEOUT:-150}" "$carry/bin/sparse_attention_bench" --configs=paper "$@" \
  >"$out/bench.log" 2>&1
echo "bench (paper) rc=$? in $((SECONDS - start)) s"
if [[ "${DHSA_DEFAULT_CONFIG:-0}" == 1 ]]; then
  start=$SECONDS
  timeout "${DHSA_DEFAULT_TIMEOUT:-60}" "$carry/bin/sparse_attention_bench" --configs=default \
    --lengths=8192,131072 --budgets=4096 --seconds=0.2 --check_max=8192 \
    --compare="${DHSA_DEFAULT_COMPARE:-early,ws_tma}" >"$out/bench_default.log" 2>&1
  echo "bench (default) rc=$? in $((SECONDS - start)) s"
fi

echo "-- attention_test"
grep -E '^\[  (PASSED|FAILED) |^\[  FAILED|tests ran' "$out/attention_test.log" | head -30
grep -B2 -A10 'Failure' "$out/attention_test.log" | cut -c1-200 | head -40
grep -E '^RESULT .* == ws' "$out/attention_test.log" | cut -c1-110 | head -24
for log in bench_default bench; do
  [[ -f "$out/$log.log" ]] || continue
  echo "-- $log"
  if grep -q '^== dhsa on the GPU' "$out/$log.log"; then
    sed -n '/^== dhsa on the GPU/,$p' "$out/$log.log" | grep -v '^$'
  else
    tail -n 12 "$out/$log.log" | cut -c1-220
  fi
done
