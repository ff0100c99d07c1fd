#!/usr/bin/env bash
# A shorter device run than run_on_device.sh for kernel work: the sparse attention tests only (both
# kernels on a Hopper device), then our benchmark (no peers), table last. Same carry
# (.device-carry from prepare_carry.sh).
# Usage: bash bench/gpu/quick_on_device.sh [benchmark options, default --seconds=0.2]
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
carry="$root/.device-carry"
out="${OUT:-/tmp/dhsa-device-out}"
mkdir -p "$out"
chmod +x "$carry"/bin/* 2>/dev/null
export LD_LIBRARY_PATH="$carry/lib"
for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
  /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib \
  /opt/torch/.venv/lib/python3*/site-packages/nvidia/cublas/lib; do
  if compgen -G "$dir/libcublas.so.13*" >/dev/null; then
    export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$dir"
    break
  fi
done
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
timeout 120 "$carry/bin/gpu_test" --gtest_color=no --gtest_filter='*SparseAttentionCudaTest*' \
  >"$out/gpu_test.log" 2>&1
echo "gpu_test (sparse attention) rc=$?"
grep -E '^RESULT|FAILED|PASSED|Failure' "$out/gpu_test.log" | cut -c1-160 | head -60
(($# > 0)) || set -- --seconds=0.2
timeout 200 "$carry/bin/sparse_attention_bench" "$@" >"$out/bench.log" 2>&1
echo "bench rc=$?"
if grep -q '^== dhsa on the GPU' "$out/bench.log"; then
  sed -n '/^== dhsa on the GPU/,$p' "$out/bench.log"
else
  tail -n 8 "$out/bench.log" | cut -c1-200
fi
