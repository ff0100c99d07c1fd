#!/usr/bin/env bash
# CI: the tests that exercise untrusted input and concurrency, under sanitizers, each build in its
# own directory (never build/):
#   build-asan: kernels (reference and fast CPU), io, service plumbing, worker, router and
#               reliability tests under AddressSanitizer + UndefinedBehaviorSanitizer;
#   build-tsan: the worker, router and reliability (bad input, faults, load) tests under
#               ThreadSanitizer;
#   build-fuzz: the libFuzzer targets (clang, ASan + UBSan), 10 s each (tests/fuzz/run_fuzzers.sh;
#               not run by .ci/run: it needs clang).
# Any report fails the run (halt_on_error, no recovery). Our code is never suppressed; the only
# suppressions are for third-party code, in .ci/*.supp, each with the reason.
# Only these test binaries are built, with CUDA and NCCL off, our code at -O1 -g1 and the generated
# protobuf code taken from build/'s ccache entries (.ci/sanitize.cmake), so that CI stays short on
# 2 cores.
# Usage: bash .ci/sanitizers.sh [asan|tsan|fuzz]... (default: asan tsan). Run from anywhere.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
jobs=${DHSA_SANITIZER_JOBS:-$(nproc)}
kinds=("$@")
((${#kinds[@]})) || kinds=(asan tsan)

asan_targets=(kernels_test cpu_test io_test service_common_test worker_test router_logic_test
              router_service_test reliability_bad_input_test reliability_security_test
              reliability_connection_test reliability_stall_test)
tsan_targets=(worker_test router_service_test reliability_bad_input_test
              reliability_connection_test reliability_stall_test reliability_load_test)

configure() {  # dir, sanitizer flags
  # The same cache variables as build/ (deploy/setup.sh with DHSA_WERROR=ON), so that the targets
  # sanitize.cmake leaves alone compile exactly as there.
  cmake -S . -B "$1" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDHSA_WITH_CUDA=OFF \
    -DDHSA_WITH_NCCL=OFF -DDHSA_WERROR=ON "-DCMAKE_PROJECT_INCLUDE=$root/.ci/sanitize.cmake" \
    "-DDHSA_SANITIZE=$2" "-DCMAKE_EXE_LINKER_FLAGS=$2" "-DCMAKE_SHARED_LINKER_FLAGS=$2" >/dev/null
}

for kind in "${kinds[@]}"; do
  start=$SECONDS
  case "$kind" in
    asan)
      dir=build-asan
      configure "$dir" "-fsanitize=address,undefined -fno-sanitize-recover=all"
      targets=("${asan_targets[@]}")
      export ASAN_OPTIONS=detect_leaks=1:halt_on_error=1:abort_on_error=0:detect_stack_use_after_return=1:strict_string_checks=1:check_initialization_order=1
      export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
      export LSAN_OPTIONS="suppressions=$root/.ci/lsan.supp:print_suppressions=0"
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
      export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:suppressions=$root/.ci/tsan.supp"
      # libgomp is not instrumented: TSan cannot see its barriers, so every parallel region of the
      # CPU kernels would be reported. One OpenMP thread per caller keeps our threads (router,
      # worker, gRPC callbacks) under TSan and the kernels' loops serial.
      export OMP_THREAD_LIMIT=1
      ;;
    *)
      echo "sanitizers: unknown kind '$kind' (asan, tsan or fuzz)" >&2
      exit 2
      ;;
  esac
  echo "== sanitizers: $kind build (${targets[*]})"
  cmake --build "$dir" -j "$jobs" --target "${targets[@]}"
  echo "== sanitizers: $kind build done in $((SECONDS - start)) s"
  failed=()
  for t in "${targets[@]}"; do
    t0=$SECONDS
    bin=$(find "$dir/tests" -name "$t" -type f -executable | head -1)
    if "$bin" --gtest_brief=1 >"$dir/$t.log" 2>&1; then
      echo "-- $t: passed in $((SECONDS - t0)) s"
    else
      echo "-- $t: FAILED in $((SECONDS - t0)) s; the end of $dir/$t.log:"
      tail -60 "$dir/$t.log"
      failed+=("$t")
    fi
  done
  if ((${#failed[@]})); then
    echo "sanitizers: $kind: ${failed[*]} failed" >&2
    exit 1
  fi
  echo "== sanitizers: $kind done in $((SECONDS - start)) s"
done
