#!/usr/bin/env bash
# Train the small image flow of models/fmnist-flow.toml on Fashion-MNIST (the
# Debian package dataset-fashion-mnist ships the IDX files), report test
# bits/dim and draw a grid of samples.
#
#   bash examples/train_fashion_mnist.sh [STEPS]      (default: 1000)
#
# Writes build/train-fmnist/: samples.png, loss.png, metrics.jsonl,
# final.safetensors, certificate.json. Resumable: rerun with the same STEPS
# after an interruption and it continues from the last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-1000}"
data=/usr/share/datasets/fashion-mnist
if [ ! -f "$data/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "install the Debian package dataset-fashion-mnist first (as root)" >&2
    exit 1
  fi
fi
cargo build --release -p iresnetc
bin=target/release/iresnetc
run=build/train-fmnist
resume=()
if [ -f "$run/checkpoint.safetensors" ]; then resume=(--resume "$run"); fi
time $bin train models/fmnist-flow.toml --data "$data" -o "$run" --steps "$steps" \
  --eval-every 250 --checkpoint-every 100 "${resume[@]}"
$bin eval "$run" --data "$data"
echo "samples: $run/samples.png   loss curve: $run/loss.png"
