#!/usr/bin/env bash
# CPU-seconds (the load-independent measure on a shared machine) and wall of one 32K-token layer
# (Hq 8, Hkv 2, d 128, float32): `dhsa attend` through dhsa-router + 2 dhsa-worker processes on
# loopback, then the same files in process, RUNS times against the same processes (run 1 is cold,
# the later ones warm). CPU = client (perf stat task-clock) + router + workers (/proc utime+stime
# deltas); the in-process figure is the whole `dhsa attend` process (npy load and write included on
# both sides). Environment: DHSA_BUILD, RUNS (1), DHSA_WORKER_FLAGS, DHSA_ROUTER_FLAGS, W
# (workload dir, generated with `dhsa gen --len 32768` when missing), PERF=1 (records router and
# workers with perf into PERF_DIR, default .).
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${DHSA_BUILD:-$root/build}
W=${W:-/tmp/dhsa-service-cpu-w}
[[ -f $W/q.npy ]] || "$build/dhsa" gen --out "$W" --len 32768 --progress off > /dev/null
out=$(mktemp -d)
logs=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$logs" "$out"; }
trap cleanup EXIT
port_of() { for _ in $(seq 300); do p=$(grep -oE 'port [0-9]+' "$1" | head -1 | cut -d' ' -f2 || true); [[ -n "$p" ]] && { echo "$p"; return; }; sleep 0.1; done; cat "$1" >&2; exit 1; }
ticks() { awk '{print $14+$15}' /proc/$1/stat; }
flt() { awk '{print $10}' /proc/$1/stat; }
workers=""
for i in 0 1; do
  "$build/services/worker/dhsa-worker" --listen 127.0.0.1:0 ${DHSA_WORKER_FLAGS:-} > "$logs/w$i.log" 2>&1 &
  pids+=($!); workers+="${workers:+,}127.0.0.1:$(port_of "$logs/w$i.log")"
done
"$build/services/router/dhsa-router" --listen 127.0.0.1:0 --workers "$workers" ${DHSA_ROUTER_FLAGS:-} > "$logs/router.log" 2>&1 &
pids+=($!); router="127.0.0.1:$(port_of "$logs/router.log")"
sleep 1
for run in $(seq ${RUNS:-1}); do
uptime
b0=$(ticks ${pids[0]}); b1=$(ticks ${pids[1]}); br=$(ticks ${pids[2]})
f0=$(flt ${pids[0]}); f1=$(flt ${pids[1]}); fr=$(flt ${pids[2]})
s=$(date +%s.%N)
if [[ -n "${PERF:-}" ]]; then perf record ${PERF_EV:--F 299} -g -o ${PERF_DIR:-.}/perf$run.data -p ${PERF_PIDS:-${pids[0]},${pids[1]},${pids[2]}} > /dev/null 2>&1 & ppid=$!; sleep 0.5; fi
perf stat -x, -e task-clock,page-faults -o $logs/svc.perf "$build/dhsa" attend --target "$router" --q $W/q.npy --k $W/k.npy --v $W/v.npy --out $out/o_svc.npy --json --progress off > $logs/svc.json
e=$(date +%s.%N)
if [[ -n "${PERF:-}" ]]; then kill -INT $ppid; wait $ppid; fi
a0=$(ticks ${pids[0]}); a1=$(ticks ${pids[1]}); ar=$(ticks ${pids[2]})
g0=$(flt ${pids[0]}); g1=$(flt ${pids[1]}); gr=$(flt ${pids[2]})
s2=$(date +%s.%N)
perf stat -x, -e task-clock,page-faults -o $logs/loc.perf "$build/dhsa" attend --q $W/q.npy --k $W/k.npy --v $W/v.npy --out $out/o_loc.npy --json --progress off > $logs/loc.json
e2=$(date +%s.%N)
ctk=$(grep task-clock $logs/svc.perf | cut -d, -f1); cpf=$(grep page-faults $logs/svc.perf | cut -d, -f1)
ltk=$(grep task-clock $logs/loc.perf | cut -d, -f1); lpf=$(grep page-faults $logs/loc.perf | cut -d, -f1)
python3 - "$ctk" "$cpf" "$ltk" "$lpf" $((a0-b0)) $((a1-b1)) $((ar-br)) $((g0-f0)) $((g1-f1)) $((gr-fr)) "$s" "$e" "$s2" "$e2" $logs/svc.json $logs/loc.json <<'PY'
import sys, json
a=sys.argv[1:]
ctk,cpf,ltk,lpf=float(a[0])/1e3,int(a[1]),float(a[2])/1e3,int(a[3])
w0,w1,r=[int(x)/100 for x in a[4:7]]
f0,f1,fr=[int(x) for x in a[7:10]]
sw=float(a[11])-float(a[10]); lw=float(a[13])-float(a[12])
svc=ctk+w0+w1+r
def j(p):
  try: return json.load(open(p))
  except Exception as ex: return {}
sj=j(a[14]); lj=j(a[15])
print(f"CPU s: service {svc:.2f} (client {ctk:.2f}, router {r:.2f}, workers {w0:.2f}+{w1:.2f}) | in process {ltk:.2f} | ratio {svc/ltk:.2f}")
print(f"faults: service client {cpf} router {fr} workers {f0}+{f1} | in process {lpf}")
print(f"wall (whole process): service {sw:.2f} in process {lw:.2f} ratio {sw/lw:.2f}")
def find(d, keys):
  out={}
  def rec(x,p=""):
    if isinstance(x,dict):
      for k,v in x.items(): rec(v,p+"."+k)
    elif isinstance(x,(int,float)) and any(s in p for s in keys): out[p]=x
  rec(d); return out
print("svc:", {k:(round(v,3) if isinstance(v,float) else v) for k,v in find(sj,["seconds","bytes"]).items()})
print("loc:", {k:(round(v,3) if isinstance(v,float) else v) for k,v in find(lj,["seconds"]).items()})
PY
done
