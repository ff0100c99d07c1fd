#!/usr/bin/env bash
# CUDA workers on a GPU machine: the GPU service tests (tests/gpu_service, ctest label gpu) and the
# service bench with CUDA workers beside CPU workers and the in-process CPU library.
#
#   bench/gpu/run_worker_tests.sh prepare   # here: pack the binaries of $DHSA_GPU_BUILD_DIR
#                                           # (default build-cw) and their Abseil/gRPC libraries
#                                           # into .device-carry-worker/ (ignored by git)
#   bench/gpu/run_worker_tests.sh run       # on the GPU machine (device tool, carry
#                                           # .device-carry-worker): tests, then the bench
#
# The bench (as bench/service_bench.sh): router + 2 dhsa-worker processes on loopback, one prefill
# of generated float16 data (dhsa gen: Hq 8, Hkv 2, d 128, $DHSA_BENCH_LEN tokens, default 32768)
# through `dhsa attend --target` with --backend=cuda workers, then with --backend=cpu workers, and
# `dhsa attend` in process (CPU backend). `dhsa demo` generates float32 only, which the CUDA kernel
# does not store, hence gen + attend. Logs and a summary go to $OUT. DHSA_WORKER_BENCH=0 runs the
# tests only; DHSA_WORKER_TEST_TIMEOUT bounds them (240 s).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
carry="$root/${DHSA_WORKER_CARRY:-.device-carry-worker}"
mode="${1:-run}"

if [[ "$mode" == prepare ]]; then
  set -e
  build="${DHSA_GPU_BUILD_DIR:-$root/build-cw}"
  rm -rf "$carry"
  mkdir -p "$carry/bin" "$carry/lib"
  binaries=("$build/tests/gpu_service/gpu_service_test" "$build/services/worker/dhsa-worker"
            "$build/services/router/dhsa-router" "$build/dhsa")
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
  # oneDNN alone is ~40 MB: the device tool carries 64 MiB, so the folder travels as one xz archive.
  tar -C "$carry" -cf - bin lib MANIFEST | xz -T2 -6 >"$carry.tar.xz"
  rm -rf "$carry"
  mkdir -p "$carry"
  mv "$carry.tar.xz" "$carry/carry.tar.xz"
  du -sh "$carry"
  exit 0
fi

out="${OUT:-/tmp/dhsa-worker-out}"
mkdir -p "$out"
summary="$out/summary.txt"
: >"$summary"
say() { echo "$*" | tee -a "$summary"; }
[[ -d "$carry/bin" ]] || tar -C "$carry" -xJf "$carry/carry.tar.xz" || exit 1
chmod +x "$carry"/bin/*
export LD_LIBRARY_PATH="$carry/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
bin="$carry/bin"
say "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
say "$(cat "$carry/MANIFEST")"

start=$SECONDS
timeout "${DHSA_WORKER_TEST_TIMEOUT:-240}" "$bin/gpu_service_test" --gtest_color=no \
  >"$out/gpu_service_test.log" 2>&1
rc=$?
say "gpu_service_test rc=$rc in $((SECONDS - start)) s"
grep -E '^\[ +(OK|FAILED|SKIPPED) +\]|^RESULT|PASSED|FAILED TEST' "$out/gpu_service_test.log" | tee -a "$summary"
grep -B2 -A6 'Failure' "$out/gpu_service_test.log" | head -40 | tee -a "$summary"

# ---- bench ---- (DHSA_WORKER_BENCH=0: tests only)
[[ "${DHSA_WORKER_BENCH:-1}" == 0 ]] && exit $rc
len="${DHSA_BENCH_LEN:-32768}"
data="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$data"; }
trap cleanup EXIT
port_of() {
  for _ in $(seq 300); do
    p=$(grep -oE 'port [0-9]+' "$1" | head -1 | cut -d' ' -f2)
    [[ -n "$p" ]] && { echo "$p"; return 0; }
    sleep 0.1
  done
  cat "$1" >&2; return 1
}
"$bin/dhsa" gen --out "$data/in" --len "$len" --hq 8 --hkv 2 --dim 128 --dtype float16 \
  >"$out/gen.log" 2>&1 || { say "gen failed: $(tail -3 "$out/gen.log")"; exit 1; }
attend() { "$bin/dhsa" attend --q "$data/in/q.npy" --k "$data/in/k.npy" --v "$data/in/v.npy" "$@"; }
stages() { grep -E 'computed pairs|boundaries|summaries|selection|attention|total' "$1" | grep -v '^dhsa' | tr -s ' ' | tr '\n' ';' | cut -c1-300; }
for backend in cuda cpu; do
  workers=""
  for i in 0 1; do
    "$bin/dhsa-worker" --listen 127.0.0.1:0 --backend "$backend" >"$out/w-$backend-$i.log" 2>&1 &
    pids+=($!)
    workers+="${workers:+,}127.0.0.1:$(port_of "$out/w-$backend-$i.log")"
  done
  "$bin/dhsa-router" --listen 127.0.0.1:0 --workers "$workers" >"$out/router-$backend.log" 2>&1 &
  pids+=($!)
  router="127.0.0.1:$(port_of "$out/router-$backend.log")"
  say "-- service, 2 $backend worker processes ($(head -1 "$out/w-$backend-0.log" | cut -c1-150))"
  for rep in 1 2 3; do
    attend --target "$router" --out "$data/o-$backend.npy" >"$out/attend-$backend-$rep.log" 2>&1
    say "run $rep rc=$?: $(stages "$out/attend-$backend-$rep.log")"
  done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  pids=()
done
say "-- in process, CPU backend ($(nproc) cores)"
for rep in 1 2; do
  attend --backend cpu --out "$data/o-inproc.npy" >"$out/attend-inproc-$rep.log" 2>&1
  say "run $rep rc=$?: $(stages "$out/attend-inproc-$rep.log")"
done
exit $rc
