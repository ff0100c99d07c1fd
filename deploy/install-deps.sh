#!/usr/bin/env bash
# Installs the Debian 12 packages that dhsa's build and tests need, plus any named as arguments
# (.ci/run adds clang and libFuzzer's runtime for its fuzzing stage). Idempotent: when everything
# is installed already it only checks (a second or two) and installs nothing.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  libabsl-dev libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  prometheus-cpp-dev nlohmann-json3-dev libhwy-dev libdnnl-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  python3-numpy python3-grpcio python3-protobuf python3-pytest
  clang-format
  prometheus python3-yaml
  openssl
  "$@"
)

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

sudo=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "install-deps: run as root or install sudo" >&2; exit 1; }
  sudo=(sudo)
fi
echo "install-deps: installing ${missing[*]}"
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
