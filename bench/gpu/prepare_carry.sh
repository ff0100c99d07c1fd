#!/usr/bin/env bash
# Builds the GPU test and benchmark on this machine (build-cuda/ or $DHSA_GPU_BUILD_DIR, sm_90a by
# default) and packs them,
# with the shared libraries they need that the GPU machine lacks, into .device-carry/ (ignored by
# git) for bench/gpu/run_on_device.sh.
#
# Left out: the C runtime (glibc, libstdc++, libgcc_s: Ubuntu 24.04's are newer than Debian 12's),
# CUDA and NCCL libraries (the GPU machine has its own driver; the binaries link cudart statically
# and load cuBLAS at run time). What remains is Abseil (the GPU machine has none).
#
# Usage: bench/gpu/prepare_carry.sh   (DHSA_CUDA_ARCHITECTURES=90a by default)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${DHSA_GPU_BUILD_DIR:-$root/build-cuda}"
carry="$root/${DHSA_CARRY:-.device-carry}"  # DHSA_CARRY: another folder name
arch="${DHSA_CUDA_ARCHITECTURES:-90a}"
limit_mb=60

cmake -S "$root" -B "$build" -G Ninja -DDHSA_WITH_CUDA=ON -DDHSA_BUILD_TESTS=ON \
  -DDHSA_CUDA_ARCHITECTURES="$arch" >/dev/null
cmake --build "$build" --target gpu_test sparse_attention_bench -- -j 2

rm -rf "$carry"
mkdir -p "$carry/bin" "$carry/lib"
binaries=("$build/tests/gpu/gpu_test" "$build/bench/gpu/sparse_attention_bench")
for binary in "${binaries[@]}"; do
  # Debug info stays here (the GPU machine has no debugger for it); device code is untouched.
  strip --strip-debug -o "$carry/bin/$(basename "$binary")" "$binary"
done

for binary in "${binaries[@]}"; do
  if ldd "$binary" | grep -q 'not found'; then
    echo "prepare_carry: $binary has unresolved libraries here:" >&2
    ldd "$binary" | grep 'not found' >&2
    exit 1
  fi
  ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}'
done | sort -u | while read -r name path; do
  case "$name" in
    linux-vdso* | ld-linux* | libc.so* | libm.so* | libpthread.so* | libdl.so* | librt.so* | \
      libstdc++.so* | libgcc_s.so* | libcuda.so* | libcudart.so* | libcublas* | libnccl* | \
      libnvidia*)
      continue ;;
  esac
  cp -L "$path" "$carry/lib/$name"
done

# shellcheck disable=SC1091  # /etc/os-release is read for its PRETTY_NAME only.
cat >"$carry/MANIFEST" <<MANIFEST
built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(. /etc/os-release && echo "$PRETTY_NAME"), CUDA architectures $arch
commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown) (working tree may differ)
$(cd "$carry" && find bin lib -type f | sort)
MANIFEST

size_kb=$(du -sk "$carry" | cut -f1)
echo "prepare_carry: $carry holds $(find "$carry/lib" -type f | wc -l) libraries, $((size_kb / 1024)) MB"
if ((size_kb > limit_mb * 1024)); then
  echo "prepare_carry: over the ${limit_mb} MB limit" >&2
  exit 1
fi
