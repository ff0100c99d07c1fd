#!/usr/bin/env bash
# Builds the fuzz targets with clang + libFuzzer + ASan + UBSan in build-fuzz/ and runs each for
# SECONDS seconds (default 10) from its checked-in corpus (tests/fuzz/corpus/<target>), new inputs
# going to build-fuzz/corpus/<target>. A crash fails the run and leaves the input in build-fuzz/.
# Usage: bash tests/fuzz/run_fuzzers.sh [SECONDS] [TARGET...]   (targets: npy safetensors wire
# request config). Needs clang (Debian: apt-get install clang).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
seconds=${1:-10}
shift || true
targets=("$@")
((${#targets[@]})) || targets=(npy safetensors wire request config)
command -v clang++ >/dev/null || { echo "run_fuzzers: needs clang++ (apt-get install clang)" >&2; exit 2; }

flags="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDHSA_WITH_CUDA=OFF \
  -DDHSA_WITH_NCCL=OFF -DDHSA_FUZZ=ON -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
  "-DCMAKE_CXX_FLAGS=$flags" "-DCMAKE_C_FLAGS=$flags" \
  "-DCMAKE_EXE_LINKER_FLAGS=-fsanitize=address,undefined" >/dev/null
cmake --build build-fuzz -j "$(nproc)" --target "${targets[@]/#/fuzz_}"

export ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
for t in "${targets[@]}"; do
  mkdir -p "build-fuzz/corpus/$t" build-fuzz/artifacts
  echo "== fuzz_$t: ${seconds} s"
  # -rss_limit_mb: a decoder that allocates what a header claims instead of what the input holds
  # is a bug, found here as an out-of-memory crash.
  build-fuzz/tests/fuzz/fuzz_"$t" "build-fuzz/corpus/$t" "tests/fuzz/corpus/$t" \
    -max_total_time="$seconds" -rss_limit_mb=1024 -max_len=65536 -print_final_stats=1 \
    -artifact_prefix=build-fuzz/artifacts/"$t"- 2>&1 |
    grep -E "^#[0-9]+.*DONE|stat::number_of_executed_units|stat::peak_rss_mb|ERROR: |SUMMARY|fuzz check" || true
  if ls build-fuzz/artifacts/"$t"-* >/dev/null 2>&1; then
    echo "run_fuzzers: fuzz_$t found a crash: $(ls build-fuzz/artifacts/"$t"-*)" >&2
    exit 1
  fi
done
