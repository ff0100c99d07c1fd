#!/usr/bin/env bash
# The main job on the embedded default: `dhsa demo` starts the router and 2 workers in one process,
# sends a generated 32K-token structured workload of 2 layers (Hq=8, Hkv=2, d=128) through the C++
# SDK (prefill, then 64 decode steps), runs the same work in process, and prints a report: time per
# stage, bytes moved, tokens/s, the difference between the two results, and the fidelity against
# dense attention on sampled rows. Extra arguments go to `dhsa demo` (see dhsa demo --help).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec "$root/build/dhsa" demo "$@"
