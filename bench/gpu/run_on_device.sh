#!/usr/bin/env bash
# Runs on the GPU machine (the device tool, Ubuntu 24.04 + CUDA 13.0, repository root as working
# directory): the GPU tests and the sparse attention benchmark that bench/gpu/prepare_carry.sh
# built and packed into .device-carry/. Full logs go to $OUT; a short summary table is printed
# last (and kept in $OUT/summary.txt).
#
# Time limits (the device tool allows 600 s a command): tests 240 s, benchmark 100 s for 8K and
# 32K and 200 s for 128K, each run on its own so one overrun leaves the others' numbers.
# Exit status: 0 when the tests passed and both benchmark runs succeeded, 1 otherwise.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
carry="$root/.device-carry"
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
chmod +x "$carry"/bin/* 2>/dev/null  # In case the transfer dropped the mode bits.
export LD_LIBRARY_PATH="$carry/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# cuBLAS (calibration only, loaded at run time): the CUDA toolkit's, else a pip wheel's.
for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu \
  /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib \
  /opt/torch/.venv/lib/python3*/site-packages/nvidia/cublas/lib; do
  if compgen -G "$dir/libcublas.so.13*" >/dev/null; then
    export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$dir"
    break
  fi
done

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
timeout 240 "$carry/bin/gpu_test" --gtest_color=no >"$out/gpu_test.log" 2>&1
test_rc=$?
test_s=$((SECONDS - start))
echo "run_on_device: gpu_test rc=$test_rc in ${test_s}s"

declare -A bench_rc
run_bench() {  # name, timeout, lengths
  echo "run_on_device: bench $3 ..."
  start=$SECONDS
  timeout "$2" "$carry/bin/sparse_attention_bench" --lengths="$3" >"$out/$1.log" 2>&1
  bench_rc[$1]=$?
  echo "run_on_device: bench $3 rc=${bench_rc[$1]} in $((SECONDS - start))s"
}
run_bench bench_short 100 8192,32768
run_bench bench_long 200 131072

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
((test_rc == 124)) && note=" (TIMED OUT after 240 s)"
((test_rc > 128 && test_rc != 124)) && note=" (killed by signal $((test_rc - 128)))"
say ""
say "===== dhsa CUDA sparse attention: device run summary ====="
say "device: $gpu_line"
[[ -n "$missing" ]] && say "MISSING LIBRARIES: $missing"
say "gpu_test: rc=$test_rc$note, $passed passed, $failed failed, $skipped skipped, ${test_s}s"
say "$(printf '%-44s %-6s %-10s %-10s %-6s %-10s %-10s' case status o_err naive ratio lse_err naive)"
grep -o 'SparseAttentionCudaTest.MatchesReferenceWithinStoragePrecision/[A-Za-z0-9_]*' \
  "$out/gpu_test.log" | sed 's|.*/||' | sort -u | while read -r name; do
  status="?"
  grep -q "^\[       OK \] .*/$name " "$out/gpu_test.log" && status="OK"
  grep -q "^\[  FAILED  \] .*/$name, " "$out/gpu_test.log" && status="FAIL"
  grep -q "^\[  FAILED  \] .*/$name " "$out/gpu_test.log" && status="FAIL"
  grep -q "^\[  SKIPPED \] .*/$name " "$out/gpu_test.log" && status="SKIP"
  result=$(grep -m1 "^RESULT $name " "$out/gpu_test.log" |
    awk '{printf "%-10s %-10s %-6s %-10s %-10s", $4, $6, $8, $10, $12}')
  say "$(printf '%-44s %-6s %s' "$name" "$status" "$result")"
done
if ((test_rc != 0 && failed == 0)); then
  say "gpu_test ended without a failed test (crash, timeout or load error); its last lines:"
  tail -n 8 "$out/gpu_test.log" | cut -c1-200 | tee -a "$summary"
fi
if ((failed > 0)); then
  say "failures (first lines; full log in gpu_test.log):"
  grep -B1 -A3 -m6 'Failure' "$out/gpu_test.log" | cut -c1-160 | head -24 | tee -a "$summary"
fi
for part in bench_short bench_long; do
  say "-- $part: rc=${bench_rc[$part]}"
  if grep -q '^== CUDA sparse attention' "$out/$part.log"; then
    sed -n '/^== CUDA sparse attention/,$p' "$out/$part.log" | tee -a "$summary"
  else
    tail -n 6 "$out/$part.log" | cut -c1-200 | tee -a "$summary"
  fi
done
((test_rc == 0 && bench_rc[bench_short] == 0 && bench_rc[bench_long] == 0))
