#!/usr/bin/env bash
# The main job on the embedded default: a generated 32K-token structured workload for one layer
# (Hq=8, Hkv=2, d=128), DHSA attention over it in process, and a readable report: chunks, density,
# time per stage, and fidelity against dense attention on sampled rows.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dhsa="$root/build/dhsa"
work="$root/build/main-job"
mkdir -p "$work"
"$dhsa" gen --out "$work" --len "${DHSA_LEN:-32768}"
echo
"$dhsa" attend --q "$work/q.npy" --k "$work/k.npy" --v "$work/v.npy" \
  --out "$work/o.npy" --lse-out "$work/lse.npy" --selection-out "$work/selection.json" \
  --check-rows 32
