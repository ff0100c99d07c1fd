#!/usr/bin/env bash
# Runs on the GPU machine (the device tool, Ubuntu 24.04 + CUDA 13.0, repository root as working
# directory): the GPU tests and the sparse attention benchmark that bench/gpu/prepare_carry.sh
# built and packed into .device-carry/. Full logs go to $OUT; a short summary table is printed
# last (and kept in $OUT/summary.txt).
#
# Time limits (the device tool allows 600 s a command): tests 200 s, our benchmark 230 s, the
# peers (bench/gpu/sdpa_peer.py, which prints the issue's table last) 150 s, each run on its own so
# one overrun leaves the others' numbers.
# DHSA_SKIP_PEERS=1 skips the peers (their numbers do not depend on our code); DHSA_BENCH_SECONDS
# sets the benchmark's --seconds (0.5), DHSA_BENCH_KERNEL its --kernel (auto: the Hopper kernel on
# an sm_90a build and device), DHSA_BENCH_ARGS more options (e.g. --compare=portable,early).
# DHSA_TEST_FILTER (gtest filter), DHSA_TEST_TIMEOUT, DHSA_BENCH_TIMEOUT, DHSA_PEERS_TIMEOUT and
# DHSA_PEERS_ARGS (e.g. --lengths=131072) trim the run to fit a shorter device call; DHSA_WITH_WORKER=1 also runs the CUDA worker tests
# (run_worker_tests.sh, tests only, carry $DHSA_WORKER_CARRY) after gpu_test.
# Exit status: 0 when the tests passed and both benchmark parts succeeded, 1 otherwise.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
carry="$root/${DHSA_CARRY:-.device-carry}"
out="${OUT:-/tmp/dhsa-device-out}"
mkdir -p "$out"
summary="$out/summary.txt"
: >"$summary"
say() { echo "$*" | tee -a "$summary"; }

if [[ ! -f "$carry/bin/gpu_test" || ! -f "$carry/bin/sparse_attention_bench" ]]; then
  echo "run_on_device: $carry/bin lacks the binaries: run bench/gpu/prepare_carry.sh first and" \
    "pass .device-carry in the device tool's carry" | tee -a "$summary"
  exit 1
fi
source "$root/bench/gpu/device_env.sh"

{
  echo "== environment =="
  date -u
  uname -a
  nproc
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv 2>&1
  cat "$carry/MANIFEST" 2>/dev/null
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  for b in "$carry"/bin/*; do
    echo "-- ldd $b"
    ldd "$b" 2>&1
  done
} >"$out/env.txt" 2>&1
missing=$(grep -h '=> not found' "$out/env.txt" | sort -u | tr -s ' \t' ' ')
[[ -n "$missing" ]] && echo "run_on_device: missing libraries: $missing"

echo "run_on_device: gpu_test ..."
start=$SECONDS
timeout "${DHSA_TEST_TIMEOUT:-200}" "$carry/bin/gpu_test" --gtest_color=no \
  --gtest_filter="${DHSA_TEST_FILTER:-*}" >"$out/gpu_test.log" 2>&1
test_rc=$?
test_s=$((SECONDS - start))
echo "run_on_device: gpu_test rc=$test_rc in ${test_s}s"
worker_rc=""
if [[ "${DHSA_WITH_WORKER:-0}" == 1 ]]; then
  OUT="$out/worker" DHSA_WORKER_BENCH=0 DHSA_WORKER_TEST_TIMEOUT="${DHSA_WORKER_TEST_TIMEOUT:-60}" \
    bash "$root/bench/gpu/run_worker_tests.sh" run >"$out/worker.log" 2>&1
  worker_rc=$?
  echo "run_on_device: worker tests rc=$worker_rc"
fi

declare -A bench_rc
echo "run_on_device: bench ..."
start=$SECONDS
# shellcheck disable=SC2086  # DHSA_BENCH_ARGS is a list of options.
timeout "${DHSA_BENCH_TIMEOUT:-230}" "$carry/bin/sparse_attention_bench" \
  --seconds="${DHSA_BENCH_SECONDS:-0.5}" --kernel="${DHSA_BENCH_KERNEL:-auto}" \
  ${DHSA_BENCH_ARGS:-} >"$out/bench.log" 2>&1
bench_rc[bench]=$?
echo "run_on_device: bench rc=${bench_rc[bench]} in $((SECONDS - start))s"
if [[ "${DHSA_SKIP_PEERS:-0}" == 1 ]]; then
  echo "run_on_device: peers skipped (DHSA_SKIP_PEERS=1)" >"$out/peers.log"
  bench_rc[peers]=0
else
  echo "run_on_device: peers ..."
  start=$SECONDS
  # shellcheck disable=SC2086  # DHSA_PEERS_ARGS is a list of options (e.g. --lengths=131072).
  PYTHONUNBUFFERED=1 timeout "${DHSA_PEERS_TIMEOUT:-150}" python3 "$root/bench/gpu/sdpa_peer.py" \
    --ours="$out/bench.log" ${DHSA_PEERS_ARGS:-} \
    >"$out/peers.log" 2>&1
  bench_rc[peers]=$?
fi
echo "run_on_device: peers rc=${bench_rc[peers]} in $((SECONDS - start))s"

# ---- summary table, printed last ----
gpu_line=$(grep -m1 -o 'NVIDIA[^,]*,[^,]*' "$out/env.txt" || echo "no nvidia-smi")
# Distinct test names on gtest's result lines ("[  FAILED  ] Suite.Test/name, where ... (12 ms)").
count_tests() {
  awk -v tag="$1" '$2 == tag && $4 ~ /^[A-Za-z]/ {n = $4; sub(/,$/, "", n); print n}' \
    "$out/gpu_test.log" | sort -u | wc -l
}
passed=$(count_tests 'OK')
failed=$(count_tests 'FAILED')
skipped=$(count_tests 'SKIPPED')
note=""
((test_rc == 124)) && note=" (TIMED OUT after ${DHSA_TEST_TIMEOUT:-200} s)"
((test_rc > 128 && test_rc != 124)) && note=" (killed by signal $((test_rc - 128)))"
say ""
say "===== dhsa CUDA sparse attention: device run summary ====="
say "device: $gpu_line"
[[ -n "$missing" ]] && say "MISSING LIBRARIES: $missing"
say "gpu_test: rc=$test_rc$note, $passed passed, $failed failed, $skipped skipped, ${test_s}s"
if [[ -n "$worker_rc" ]]; then
  say "worker tests (gpu_service_test): rc=$worker_rc; $(grep -E 'PASSED|FAILED' "$out/worker.log" | tr '\n' ' ' | cut -c1-200)"
fi
say "$(printf '%-44s %-6s %-10s %-10s %-6s %-10s %-10s %s' case status o_err naive ratio lse_err naive kernel)"
grep -oE 'SparseAttentionCudaTest.MatchesReferenceWithinStoragePrecision/[A-Za-z0-9_]*' \
  "$out/gpu_test.log" | sed 's|.*/||' | sort -u | while read -r name; do
  status="?"
  grep -q "^\[       OK \] .*/$name " "$out/gpu_test.log" && status="OK"
  grep -q "^\[  FAILED  \] .*/$name, " "$out/gpu_test.log" && status="FAIL"
  grep -q "^\[  FAILED  \] .*/$name " "$out/gpu_test.log" && status="FAIL"
  grep -q "^\[  SKIPPED \] .*/$name " "$out/gpu_test.log" && status="SKIP"
  # One line per kernel the test ran (portable; hopper and hopper_serial on an sm_90a build).
  grep "^RESULT $name " "$out/gpu_test.log" |
    awk '{printf "%-10s %-10s %-6s %-10s %-10s %s\n", $4, $6, $8, $10, $12, $15}' |
    while read -r result; do
      say "$(printf '%-44s %-6s %s' "$name" "$status" "$result")"
    done
done
if ((test_rc != 0 && failed == 0)); then
  say "gpu_test ended without a failed test (crash, timeout or load error); its last lines:"
  tail -n 8 "$out/gpu_test.log" | cut -c1-200 | tee -a "$summary"
fi
if ((failed > 0)); then
  say "failures (first lines; full log in gpu_test.log):"
  grep -B1 -A3 -m6 'Failure' "$out/gpu_test.log" | cut -c1-160 | head -24 | tee -a "$summary"
fi
say "-- device selection vs reference (status, then the test's RESULT line):"
grep -o 'SelectionCudaTest.EqualsTheReferenceSteps/[A-Za-z0-9_]*' "$out/gpu_test.log" |
  sed 's|.*/||' | sort -u | while read -r name; do
  status="?"
  grep -q "^\[       OK \] .*/$name " "$out/gpu_test.log" && status="OK"
  grep -q "^\[  FAILED  \] .*/$name" "$out/gpu_test.log" && status="FAIL"
  grep -q "^\[  SKIPPED \] .*/$name " "$out/gpu_test.log" && status="SKIP"
  say "$(printf '%-6s %s' "$status" "$(grep -m1 "^RESULT $name " "$out/gpu_test.log" | cut -c8-150)")"
done
say "-- bench: rc=${bench_rc[bench]}"
if grep -q '^== dhsa on the GPU' "$out/bench.log"; then
  sed -n '/^== dhsa on the GPU/,$p' "$out/bench.log" | tee -a "$summary"
else
  tail -n 6 "$out/bench.log" | cut -c1-200 | tee -a "$summary"
fi
say "-- peers: rc=${bench_rc[peers]}"
if grep -q '^== issue 5 benchmark' "$out/peers.log"; then
  sed -n '/^== issue 5 benchmark/,$p' "$out/peers.log" | tee -a "$summary"
else
  tail -n 8 "$out/peers.log" | cut -c1-300 | tee -a "$summary"
fi
((test_rc == 0 && bench_rc[bench] == 0 && bench_rc[peers] == 0 && ${worker_rc:-0} == 0))
