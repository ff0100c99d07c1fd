#!/usr/bin/env bash
# Service overhead: the same prefill through dhsa-router + 2 dhsa-worker processes on loopback
# and in process, side by side (dhsa demo --target). Defaults: Hq=8, Hkv=2, d=128, 32K tokens,
# one layer, 16 decode steps. Extra arguments go to `dhsa demo` (e.g. --len 8192).
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
  "$build/services/worker/dhsa-worker" --listen 127.0.0.1:0 > "$logs/w$i.log" 2>&1 &
  pids+=($!)
  workers+="${workers:+,}127.0.0.1:$(port_of "$logs/w$i.log")"
done
"$build/services/router/dhsa-router" --listen 127.0.0.1:0 --workers "$workers" > "$logs/router.log" 2>&1 &
pids+=($!)
router="127.0.0.1:$(port_of "$logs/router.log")"
echo "router $router, workers $workers (separate processes)"
"$build/dhsa" demo --target "$router" --layers 1 --decode 16 "$@"
