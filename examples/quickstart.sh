#!/usr/bin/env bash
# Quick start: build iresnetc, compile the reference CIFAR-10 flow and run its
# forward pass (z and log-det) on the default backend: a hardware GPU through
# wgpu if there is one, else the native f32 CPU engine.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust first (https://rustup.rs), then rerun" >&2
  exit 1
fi
# The GPU path needs a Vulkan loader; Mesa's software driver makes it work anywhere.
if [ "$(id -u)" = 0 ] && ! ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
fi
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

cargo build --release -p iresnetc
bin=target/release/iresnetc
mkdir -p build
$bin inspect models/cifar.toml | tail -n 3
$bin compile models/cifar.toml -o build/cifar
$bin random-input build/cifar --num 4 -o build/x.npy
time $bin run build/cifar --mode forward --input build/x.npy --output build/z.npy --logdet-out build/ld.npy
echo "z: build/z.npy, log-det: build/ld.npy"
