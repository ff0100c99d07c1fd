#!/usr/bin/env bash
# Sets a fresh Debian 12 machine up for dhsa: Debian packages, then configure and build into
# build/ (Release with debug info; CUDA and NCCL are built when nvcc and nccl.h are found).
# Run from anywhere; safe to run again (only what changed is rebuilt).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash deploy/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo ${DHSA_CMAKE_ARGS:-} >/dev/null
cmake --build build -j "$(nproc)"
echo "setup: built $(ls build/dhsa) and the tests"
