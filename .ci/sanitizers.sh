#!/usr/bin/env bash
# CI: the tests that exercise untrusted input and concurrency, under sanitizers, each build in its
# own directory (never build/):
#   build-asan: kernels, io, service plumbing, worker, router and reliability tests under
#               AddressSanitizer + UndefinedBehaviorSanitizer (any report fails the run);
#   build-tsan: the router, worker and reliability tests under ThreadSanitizer;
#   build-fuzz: the libFuzzer targets (clang, ASan + UBSan), 10 s each (tests/fuzz/run_fuzzers.sh).
# Only these test binaries are built (about half of the tree), so that CI stays short on 2 cores.
# Usage: bash .ci/sanitizers.sh [asan|tsan|fuzz]... (default: all three). Run from anywhere.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
jobs=$(nproc)
kinds=("$@")
((${#kinds[@]})) || kinds=(asan tsan fuzz)

asan_targets=(kernels_test io_test service_common_test worker_test router_logic_test
              router_service_test reliability_bad_input_test)
# The kernels' OpenMP runtime is not instrumented for TSan: only the service tests run under it.
tsan_targets=(worker_test router_service_test reliability_bad_input_test)

configure() {  # dir, sanitizer flags
  cmake -S . -B "$1" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDHSA_WITH_CUDA=OFF \
    -DDHSA_WITH_NCCL=OFF "-DCMAKE_CXX_FLAGS=$2 -fno-omit-frame-pointer" \
    "-DCMAKE_C_FLAGS=$2 -fno-omit-frame-pointer" \
    "-DCMAKE_EXE_LINKER_FLAGS=$2" "-DCMAKE_SHARED_LINKER_FLAGS=$2" >/dev/null
}

for kind in "${kinds[@]}"; do
  start=$SECONDS
  case "$kind" in
    asan)
      dir=build-asan
      configure "$dir" "-fsanitize=address,undefined -fno-sanitize-recover=all"
      targets=("${asan_targets[@]}")
      export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:halt_on_error=1
      export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
      ;;
    fuzz)
      bash tests/fuzz/run_fuzzers.sh "${DHSA_FUZZ_SECONDS:-10}"
      echo "== sanitizers: fuzz done in $((SECONDS - start)) s"
      continue
      ;;
    tsan)
      dir=build-tsan
      configure "$dir" "-fsanitize=thread"
      targets=("${tsan_targets[@]}")
      export TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1
      ;;
    *)
      echo "sanitizers: unknown kind '$kind' (asan, tsan or fuzz)" >&2
      exit 2
      ;;
  esac
  echo "== sanitizers: $kind build (${targets[*]})"
  cmake --build "$dir" -j "$jobs" --target "${targets[@]}"
  echo "== sanitizers: $kind tests"
  for t in "${targets[@]}"; do
    echo "-- $t"
    if ! "$dir/$(find "$dir" -name "$t" -type f -executable -printf '%P\n' | head -1)" \
        --gtest_brief=1; then
      echo "sanitizers: $kind: $t failed" >&2
      exit 1
    fi
  done
  echo "== sanitizers: $kind done in $((SECONDS - start)) s"
done
