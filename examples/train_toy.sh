#!/usr/bin/env bash
# Train a 2-D flow on a built-in density, evaluate its held-out NLL (nats),
# compile the trained weights, and draw the heat map.
#
#   bash examples/train_toy.sh [DENSITY] [STEPS]     (default: 8gaussians, the model's train.steps)
#   MODEL=models/toy2d.toml bash examples/train_toy.sh checkerboard 2000
#
# MODEL defaults to models/toy2d-small.toml (8 blocks 2-64-64-2, Adam 1e-2,
# batch 500, 1500 steps: about a minute of CPU; the heat map in docs/training.md).
# models/toy2d.toml is the Residual Flows toy architecture (10 blocks
# 2-128-128-128-128-2), about 0.2-0.3 s per step at batch 500 on 2 cores.
# Writes build/train-toy-DENSITY/: density.png (data | learned density |
# samples), loss.png, metrics.jsonl, final.safetensors, certificate.json.
set -euo pipefail
cd "$(dirname "$0")/.."
data="${1:-8gaussians}"
model="${MODEL:-models/toy2d-small.toml}"
steps=()
if [ -n "${2:-}" ]; then steps=(--steps "$2"); fi
cargo build --release -p iresnetc
bin=target/release/iresnetc
run="build/train-toy-$data"
time $bin train "$model" --data "$data" -o "$run" "${steps[@]}" --eval-every 250 --checkpoint-every 250
$bin eval "$run" --data "$data"
$bin compile "$model" --weights "$run/final.safetensors" -o "$run/bundle" >/dev/null
echo "heat map: $run/density.png   loss curve: $run/loss.png   bundle: $run/bundle"
