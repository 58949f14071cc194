#!/usr/bin/env bash
# One CIFAR block (12x16x16, width 512, batch 8): tract on our ONNX export vs
# onnxruntime on the same file, both in GFLOP/s (FLOPs = 2 x MACs of the forward).
#
#   examples/onnx_bench/run.sh [BATCH] [SAMPLES]
#
# Needs python3 with onnxruntime and numpy (PYTHON=... to pick one, e.g. a venv:
# python3 -m venv /tmp/ovenv && /tmp/ovenv/bin/pip install onnxruntime numpy).
set -euo pipefail
cd "$(dirname "$0")/../.."
BATCH=${1:-8}
SAMPLES=${2:-20}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
cargo build --release -q -p iresnetc
BIN=target/release/iresnetc
MODEL=models/cifar-block.toml
FLOPS=$($BIN inspect "$MODEL" --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["forward_flops_per_sample"])')
echo "cifar-block forward: $FLOPS FLOP per sample, batch $BATCH, $(nproc) cores"
for style in conv pointwise-matmul tap-sum; do
  echo "== conv style: $style"
  $BIN export-onnx "$MODEL" -o "$OUT/cifar-block-$style.onnx" --conv-style "$style" \
    --time-batch "$BATCH" --time-samples "$SAMPLES" | grep '^tract'
  IRESNETC_THREADS=1 $BIN export-onnx "$MODEL" -o "$OUT/cifar-block-$style.onnx" --conv-style "$style" \
    --time-batch "$BATCH" --time-samples "$SAMPLES" | grep '^tract' | sed 's/^tract/tract (1 thread)/'
  "$PYTHON" examples/onnx_bench/ort_bench.py "$OUT/cifar-block-$style.onnx" "$BATCH" "$FLOPS" "$SAMPLES"
done
