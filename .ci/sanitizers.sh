#!/usr/bin/env bash
# CI: the tests under sanitizers, each build in its own directory (never build/):
#   build-asan: every test binary of the suite that needs no GPU (kernels, CPU kernels, io,
#               workload, eval, tinylm, service plumbing, worker, router, transport, reliability,
#               observability, CLI, and the fuzz corpora replayed) under AddressSanitizer +
#               UndefinedBehaviorSanitizer (LeakSanitizer on);
#   build-tsan: the service tests (tests/services, router, transport, reliability, observability,
#               nccl: every binary there but router_logic_test and service_common_test, whose
#               code runs on one thread)
#               under ThreadSanitizer;
#   build-fuzz: the libFuzzer targets (clang, ASan + UBSan), DHSA_FUZZ_SECONDS (10) each
#               (tests/fuzz/run_fuzzers.sh; .ci/run installs clang and libclang-rt-14-dev for it).
# The binaries are found in the build (every executable under tests/), so a new test is covered
# without editing this file. Any report fails the run (halt_on_error, no recovery). Our code is
# never suppressed; the only suppressions are for third-party code, in .ci/*.supp, each with the
# reason.
# To stay short on 2 cores: only the test binaries (and the programs they start) are built, with
# CUDA and NCCL off; our code at -O1 -g1 and the generated protobuf code taken from build/'s ccache
# entries (.ci/sanitize.cmake); gtest discovery is left to ctest (never run here); the binaries run
# DHSA_SANITIZER_JOBS at a time (default: the number of cores), the longest first.
# Usage: bash .ci/sanitizers.sh [asan|tsan|fuzz]... (default: asan tsan). Run from anywhere.
# DHSA_SANITIZER_BUILD_PREFIX=build-me puts the builds in build-me-asan/, build-me-tsan/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
jobs=${DHSA_SANITIZER_JOBS:-$(nproc)}
prefix=${DHSA_SANITIZER_BUILD_PREFIX:-build}
kinds=("$@")
((${#kinds[@]})) || kinds=(asan tsan)

# Not run under a sanitizer: deploy_facts is not a test (it prints the code's ports and names for
# tests/deploy/check_deploy.py).
asan_skip=(deploy_facts)
# TSan: the service test areas; router_logic_test's code (layout, placement, plans) has no threads
# but OpenMP's, which TSan cannot see (below), and service_common_test's (config, status and wire
# conversions) none at all: neither is built for TSan (ASan covers both).
tsan_areas=(services router transport reliability observability nccl)
tsan_skip=(router_logic_test service_common_test)
# Run first, so that the slowest binaries do not start last (measured order, slowest first); the
# others follow in name order.
slow_first=(cpu_test reliability_load_test router_service_test kernels_test reliability_stall_test
            reliability_connection_test shm_service_test worker_test reliability_security_test
            eval_test lm_test metrics_test)

configure() {  # dir, sanitizer flags
  # The same cache variables as build/ (deploy/setup.sh with DHSA_WERROR=ON), so that the targets
  # sanitize.cmake leaves alone compile exactly as there.
  cmake -S . -B "$1" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDHSA_WITH_CUDA=OFF \
    -DDHSA_WITH_NCCL=OFF -DDHSA_WERROR=ON "-DCMAKE_PROJECT_INCLUDE=$root/.ci/sanitize.cmake" \
    "-DDHSA_SANITIZE=$2" "-DCMAKE_EXE_LINKER_FLAGS=$2" "-DCMAKE_SHARED_LINKER_FLAGS=$2" \
    -DCMAKE_GTEST_DISCOVER_TESTS_DISCOVERY_MODE=PRE_TEST >/dev/null
}

test_binaries() {  # dir [area...]: the executables under tests/ (or tests/<area>/), as paths
  local areas=("${@:2}")
  ((${#areas[@]})) || areas=("[^/]*")
  local pattern
  pattern=$(IFS='|'; echo "${areas[*]}")
  ninja -C "$1" -t targets all |
    sed -nE "s#^(tests/($pattern)/[^:/]+): CXX_EXECUTABLE_LINKER.*#\1#p" | sort
}

in_list() {  # word list...
  local w
  for w in "${@:2}"; do [[ "$w" == "$1" ]] && return 0; done
  return 1
}

run_one() {  # dir binary-path: runs it, output to <dir>/<name>.log
  local dir=$1 bin=$2 name t0 args=()
  name=$(basename "$bin")
  # Fuzz targets without libFuzzer replay their checked-in corpus (tests/fuzz/CMakeLists.txt).
  [[ "$name" == fuzz_* ]] && args=("$root/tests/fuzz/corpus/${name#fuzz_}") || args=(--gtest_brief=1)
  t0=$SECONDS
  local rc=0
  "$dir/$bin" "${args[@]}" >"$dir/$name.log" 2>&1 || rc=$?
  # TSan (exit code 66) whose one report has no stack for the earlier access: TSan lost it (its
  # history is bounded; busy gRPC threads overrun it), so the report can be attributed neither to
  # our code nor to a library, and the suppressions cannot match it. Seen for gRPC's own callback
  # tags (the read in CallbackWithSuccessTag::Run of a tag whose Set is lost), about one run in
  # four of shm_service_test and reliability_load_test. Such a binary runs once more; the report
  # is printed either way, and a second report of any kind fails it.
  if ((rc == 66)) && [[ "$kind" == tsan ]] &&
    (($(grep -c 'WARNING: ThreadSanitizer' "$dir/$name.log") == 1)) &&
    grep -q 'failed to restore the stack' "$dir/$name.log"; then
    mv "$dir/$name.log" "$dir/$name.unattributed.log"
    echo "-- $name: a TSan report without the earlier access's stack (not attributable); it," \
      "then one more run:"
    sed -n '/WARNING: ThreadSanitizer/,/SUMMARY/p' "$dir/$name.unattributed.log" | head -40
    rc=0
    "$dir/$bin" "${args[@]}" >"$dir/$name.log" 2>&1 || rc=$?
  fi
  # TSan: a test that failed with no TSan report at all failed one of its own checks, and under
  # TSan's 5-15x slowdown some timing-bound checks miss (seen 2026-11-29: a shared-memory probe's
  # deadline passing mid-test, a just-answered call not yet counted out): the failure is printed
  # and the binary runs once more; a second failure, or any TSan report, fails it.
  if ((rc != 0)) && [[ "$kind" == tsan ]] && ! grep -q 'WARNING: ThreadSanitizer' "$dir/$name.log"; then
    mv "$dir/$name.log" "$dir/$name.first.log"
    echo "-- $name: failed without a TSan report (a check under TSan's slowdown); the failure," \
      "then one more run:"
    grep -E -A6 'Failure$|^\[  FAILED  \]' "$dir/$name.first.log" | head -30
    rc=0
    "$dir/$bin" "${args[@]}" >"$dir/$name.log" 2>&1 || rc=$?
  fi
  if ((rc == 0)); then
    echo "-- $name: passed in $((SECONDS - t0)) s"
  else
    echo "-- $name: FAILED in $((SECONDS - t0)) s; the end of $dir/$name.log:"
    tail -80 "$dir/$name.log"
    return 1
  fi
}

for kind in "${kinds[@]}"; do
  start=$SECONDS
  case "$kind" in
    asan)
      dir=$prefix-asan
      configure "$dir" "-fsanitize=address,undefined -fno-sanitize-recover=all"
      mapfile -t bins < <(test_binaries "$dir")
      skip=("${asan_skip[@]}")
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
      dir=$prefix-tsan
      configure "$dir" "-fsanitize=thread"
      mapfile -t bins < <(test_binaries "$dir" "${tsan_areas[@]}")
      skip=("${tsan_skip[@]}")
      # ignore_noninstrumented_modules: interceptors (free, memcpy, epoll_wait, ...) called from
      # inside Debian's uninstrumented gRPC, abseil and protobuf .so's are not checked (their own
      # synchronization is invisible to TSan); our code's accesses all are. .ci/tsan.supp says the
      # rest, and where gRPC hands our objects between threads our code states the order
      # (services/common/tsan_annotations.h). history_size=7: the earlier access of a report is
      # kept longer, so that its stack (which the suppressions match) is not lost on busy threads.
      export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:history_size=7:ignore_noninstrumented_modules=1:suppressions=$root/.ci/tsan.supp"
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
  # Slowest first, then the rest; the skipped ones out.
  ordered=()
  for name in "${slow_first[@]}"; do
    for b in "${bins[@]}"; do [[ "$(basename "$b")" == "$name" ]] && ordered+=("$b"); done
  done
  for b in "${bins[@]}"; do
    name=$(basename "$b")
    in_list "$name" "${slow_first[@]}" "${skip[@]}" || ordered+=("$b")
  done
  if ((${#ordered[@]} == 0)); then
    echo "sanitizers: $kind: no test binaries found in $dir" >&2
    exit 1
  fi
  targets=()
  for b in "${ordered[@]}"; do targets+=("$(basename "$b")"); done
  echo "== sanitizers: $kind build (${targets[*]})"
  cmake --build "$dir" -j "$jobs" --target "${targets[@]}"
  echo "== sanitizers: $kind build done in $((SECONDS - start)) s"
  # DHSA_SANITIZER_JOBS binaries at a time; each one's verdict on stdout as it ends.
  failed=()
  running=0
  status_dir=$(mktemp -d)
  for b in "${ordered[@]}"; do
    if ((running >= jobs)); then
      wait -n || true
      running=$((running - 1))
    fi
    name=$(basename "$b")
    (run_one "$dir" "$b" || touch "$status_dir/$name") &
    running=$((running + 1))
  done
  wait || true
  for b in "${ordered[@]}"; do
    name=$(basename "$b")
    [[ -e "$status_dir/$name" ]] && failed+=("$name")
  done
  rm -rf "$status_dir"
  if ((${#failed[@]})); then
    echo "sanitizers: $kind: ${failed[*]} failed (after $((SECONDS - start)) s)" >&2
    exit 1
  fi
  echo "== sanitizers: $kind done in $((SECONDS - start)) s (${#ordered[@]} binaries)"
done
