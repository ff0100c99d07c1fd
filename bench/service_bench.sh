#!/usr/bin/env bash
# Service overhead: the same prefill through dhsa-router + 2 dhsa-worker processes on loopback
# and in process, side by side (dhsa demo --target). Defaults: Hq=8, Hkv=2, d=128, 32K tokens,
# 3 layers, 16 decode steps. Extra arguments go to `dhsa demo` (e.g. --len 8192). The demo prints
# layer 0 (each demo is a new client: its first call also opens its shared-memory region) apart
# from the mean of the later layers (an engine's layer-by-layer prefill).
# Environment: DHSA_BUILD (build dir), DHSA_WORKER_FLAGS and DHSA_ROUTER_FLAGS (extra flags of the
# processes, e.g. DHSA_WORKER_FLAGS="--threads 1" DHSA_ROUTER_FLAGS="--transport grpc"). After the
# demo it prints the CPU seconds the router and each worker used (user + system, from /proc), the
# load-independent share of the service's cost that the demo's wall times do not show.
# RUNS (default 2): the demo runs that many times against the same processes. Run 1 is the
# processes' first call (every arena, region and buffer is touched for the first time, which on the
# development VM costs about 3 ms per MiB and process); run 2 is the service as it runs after its
# first call. Each demo is a new client (its own shared-memory region) and runs its in-process
# part after the service part, in the same process.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build="${DHSA_BUILD:-$root/build}"
logs=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$logs"; }
trap cleanup EXIT

port_of() {  # Waits for "port N" in a log file.
  for _ in $(seq 200); do
    p=$(grep -oE 'port [0-9]+' "$1" | head -1 | cut -d' ' -f2 || true)
    [[ -n "$p" ]] && { echo "$p"; return; }
    sleep 0.1
  done
  echo "no port in $1" >&2; cat "$1" >&2; exit 1
}

workers=""
for i in 0 1; do
  "$build/services/worker/dhsa-worker" --listen 127.0.0.1:0 ${DHSA_WORKER_FLAGS:-} > "$logs/w$i.log" 2>&1 &
  pids+=($!)
  workers+="${workers:+,}127.0.0.1:$(port_of "$logs/w$i.log")"
done
"$build/services/router/dhsa-router" --listen 127.0.0.1:0 --workers "$workers" ${DHSA_ROUTER_FLAGS:-} > "$logs/router.log" 2>&1 &
pids+=($!)
router="127.0.0.1:$(port_of "$logs/router.log")"
echo "router $router, workers $workers (separate processes)"
cpu() {  # CPU seconds (user + system) of process $1 so far.
  awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat"
}
startup=(); for p in "${pids[@]}"; do startup+=("$(cpu "$p")"); done
for run in $(seq "${RUNS:-2}"); do
  echo "== run $run of ${RUNS:-2} against these processes ($([[ $run == 1 ]] && echo "their first call" || echo "warm")); $(uptime | sed 's/.*load/load/')"
  before=(); for p in "${pids[@]}"; do before+=("$(cpu "$p")"); done
  "$build/dhsa" demo --target "$router" --layers 3 --decode 16 "$@"
  after=(); for p in "${pids[@]}"; do after+=("$(cpu "$p")"); done
  used() { awk -v a="${after[$1]}" -v b="${before[$1]}" 'BEGIN {printf "%.2f", a - b}'; }
  echo "CPU seconds during the demo (prefill + decode): router $(used 2), worker 0 $(used 0)," \
    "worker 1 $(used 1)" \
    "(startup before the first: router ${startup[2]}, workers ${startup[0]} and ${startup[1]})"
done
