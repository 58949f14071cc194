#!/usr/bin/env bash
# The CPU results table of docs/results.md, in one run on this machine: iresnetc's native CPU engine
# (`--backend cpu`) and tract against PyTorch CPU (the parity script's implementation, f32,
# 2 threads) and onnxruntime (running the ONNX iresnetc exports), on one CIFAR block (batch 8)
# and the whole CIFAR flow `models/cifar.toml` (batch 1 and 8): forward, forward + 5-term
# log-det, inverse; ms per image, GFLOP/s, the ratio to PyTorch, peak memory. Then the whole
# `iresnetc run` process of 8 images and the parity checks against PyTorch f64.
#
#   bash examples/pytorch/setup.sh   # once: a venv with torch, numpy, safetensors, onnxruntime
#   bash examples/results.sh         # markdown on stdout; JSON in build/results/
#
# PY=... picks another Python that has those packages (default: that venv, else python3). Every timed process runs alone; run it
# on a quiet machine (timings on a shared 2-core VM move by 10-20% between runs).
set -euo pipefail
cd "$(dirname "$0")/.."
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
if [ -z "${PY:-}" ]; then
  PY=python3
  [ -x examples/pytorch/.venv/bin/python ] && PY=examples/pytorch/.venv/bin/python
fi
OUT=build/results
INVERSE_STEPS=${INVERSE_STEPS:-5}   # onnxruntime's inverse: fixed-point steps unrolled per block
for mod in torch numpy safetensors onnxruntime; do
  if ! "$PY" -c "import $mod" 2>/dev/null; then
    echo "results.sh: $PY cannot import $mod; install it: $PY -m pip install torch numpy safetensors onnxruntime" >&2
    exit 2
  fi
done
mkdir -p "$OUT"
cargo build --release -q -p iresnetc
BIN=target/release/iresnetc
peak() { sed -n 's/^peak resident memory \([0-9.]*\) MiB$/\1/p' "$1"; }

for case in "cifar-block 8" "cifar 1" "cifar 8"; do
  set -- $case
  model=$1 batch=$2 tag="$1-b$2"
  bundle="$OUT/$model"
  [ -f "$bundle/plan.json" ] || $BIN compile "models/$model.toml" -o "$bundle" > /dev/null
  echo "== $model, batch $batch" >&2
  # iresnetc: one process per backend, so that each peak RSS is its own. `bench` times tract
  # on whole-model graphs, which tract takes minutes to optimize for the 48-block flow; there
  # tract is timed as users run it, `iresnetc run --backend tract` (per-block segments), whole
  # process with its loading.
  bes="cpu tract"; [ "$model" = cifar ] && bes=cpu
  for be in $bes; do
    $BIN bench "models/$model.toml" --batch "$batch" --samples 3 --backends "$be" \
      --json > "$OUT/$tag-$be.json" 2> "$OUT/$tag-$be.log"
    echo "{\"peak_rss_mib\": $(peak "$OUT/$tag-$be.log")}" > "$OUT/$tag-$be.mem.json"
  done
  if [ "$model" = cifar ]; then
    $BIN random-input "$bundle" --num "$batch" -o "$OUT/$tag-x.npy" 2> /dev/null
    for entry in forward forward+logdet inverse; do
      args=(--mode forward --input "$OUT/$tag-x.npy" --output "$OUT/$tag-z.npy")
      [ "$entry" = forward+logdet ] && args+=(--logdet-out "$OUT/$tag-ld.npy")
      [ "$entry" = inverse ] && args=(--mode inverse --input "$OUT/$tag-z.npy" --output "$OUT/$tag-xr.npy")
      /usr/bin/time -f '{"wall_s": %e, "peak_rss_kib": %M}' -o "$OUT/$tag-tract-run-$entry.json" \
        $BIN run "$bundle" --backend tract "${args[@]}" > /dev/null 2>&1
    done
  fi
  # PyTorch CPU on the bundle's (normalized) weights: the same network.
  "$PY" examples/pytorch/torch_bench.py "$bundle" --batch "$batch" --reps 3 \
    --json "$OUT/$tag-torch.json" > /dev/null
  # onnxruntime on iresnetc's ONNX: the forward, the forward + log-det, and the unrolled inverse.
  $BIN export-onnx "$bundle" -o "$OUT/$model-fwd.onnx" --conv-style conv > /dev/null
  $BIN export-onnx "$bundle" -o "$OUT/$model-ld.onnx" --with-logdet --conv-style conv > /dev/null
  $BIN export-onnx "$bundle" -o "$OUT/$model-inv.onnx" --inverse-steps "$INVERSE_STEPS" --conv-style conv > /dev/null
  for part in fwd ld; do
    "$PY" examples/onnx_bench/ort_bench.py "$OUT/$model-$part.onnx" "$batch" 0 5 --threads 2 \
      --json "$OUT/$tag-ort-$part.json" > /dev/null
  done
  "$PY" examples/onnx_bench/ort_bench.py "$OUT/$model-inv.inverse.onnx" "$batch" 0 3 --threads 2 \
    --json "$OUT/$tag-ort-inv.json" > /dev/null
done

# The whole process: `iresnetc run` of 8 images forward + 5-term log-det from the bundle,
# loading included, wall time and peak resident memory.
$BIN random-input "$OUT/cifar" --num 8 -o "$OUT/x8.npy" 2> /dev/null
/usr/bin/time -f '{"wall_s": %e, "peak_rss_kib": %M}' -o "$OUT/run-cpu.json" \
  $BIN run "$OUT/cifar" --backend cpu --mode forward --input "$OUT/x8.npy" \
  --output "$OUT/z8.npy" --logdet-out "$OUT/ld8.npy" 2> /dev/null

# Parity: PyTorch f64 against iresnetc's f64 reference and its cpu engine.
for m in toy2d cifar-tiny; do
  for be in reference cpu; do
    "$PY" examples/pytorch/parity.py "models/$m.toml" --batch 8 --backend "$be" \
      --json "$OUT/parity-$m-$be.json" > /dev/null || true
  done
done

"$PY" examples/results_table.py "$OUT" "$INVERSE_STEPS"
