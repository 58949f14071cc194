#!/usr/bin/env bash
# Train the 2-D toy flow (models/toy2d.toml: 10 blocks 2-128-128-128-128-2,
# LipSwish, c = 0.9, exact 2x2 log-det) on a built-in density, then evaluate
# the held-out NLL (nats), compile the trained weights and draw the heat map.
#
#   bash examples/train_toy.sh [DENSITY] [STEPS]      (default: 8gaussians 600)
#
# Writes build/train-toy-DENSITY/: density.png (data | learned density |
# samples), loss.png, metrics.jsonl, final.safetensors, certificate.json.
set -euo pipefail
cd "$(dirname "$0")/.."
data="${1:-8gaussians}"
steps="${2:-600}"
cargo build --release -p iresnetc
bin=target/release/iresnetc
run="build/train-toy-$data"
time $bin train models/toy2d.toml --data "$data" -o "$run" \
  --steps "$steps" --batch 500 --lr 5e-3 --eval-every 100 --checkpoint-every 100
$bin eval "$run" --data "$data"
$bin compile models/toy2d.toml --weights "$run/final.safetensors" -o "$run/bundle" >/dev/null
echo "heat map: $run/density.png   loss curve: $run/loss.png   bundle: $run/bundle"
