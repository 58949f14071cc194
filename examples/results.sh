#!/usr/bin/env bash
# Reproduces the README's results table in one run on this machine:
# iresnetc (wgpu fused/unfused, tract, the native cpu engine) via `iresnetc bench`,
# PyTorch CPU via examples/pytorch/parity.py, onnxruntime on the exported ONNX,
# the whole-process time and peak memory of `iresnetc run --backend cpu`, and the
# parity errors.
#
#   bash examples/pytorch/setup.sh   # once (PyTorch venv)
#   python3 -m venv /tmp/ovenv && /tmp/ovenv/bin/pip install onnxruntime numpy   # once
#   ORT_PY=/tmp/ovenv/bin/python bash examples/results.sh   # markdown table; JSON in build/results/
set -euo pipefail
cd "$(dirname "$0")/.."
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
PY=${PY:-examples/pytorch/.venv/bin/python}
OUT=build/results
mkdir -p "$OUT"
cargo build --release -q -p iresnetc
BIN=target/release/iresnetc

# One CIFAR block (12x16x16, width 512) at batch 8, every entry point.
$BIN bench models/cifar-block.toml --batch 8 --samples 3 --json > "$OUT/bench-block.json"
# The full CIFAR-10 flow at batch 1: the forward pass (lavapipe is slow; one timed run).
$BIN bench models/cifar.toml --batch 1 --samples 1 --entries forward --backends wgpu,tract --json > "$OUT/bench-cifar.json"
# The native CPU engine on the whole flow at batch 1 and 8, every entry point.
$BIN bench models/cifar.toml --batch 1 --samples 3 --backends cpu --json > "$OUT/bench-cifar-cpu1.json"
$BIN bench models/cifar.toml --batch 8 --samples 3 --backends cpu --json > "$OUT/bench-cifar-cpu8.json"
# onnxruntime on the ONNX iresnetc exports (forward of the block), if ORT_PY has it.
ORT_PY=${ORT_PY:-python3}
if "$ORT_PY" -c 'import onnxruntime' 2>/dev/null; then
  $BIN export-onnx models/cifar-block.toml -o "$OUT/cifar-block.onnx" > /dev/null
  FLOPS=$($BIN inspect models/cifar-block.toml --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["forward_flops_per_sample"])')
  "$ORT_PY" examples/onnx_bench/ort_bench.py "$OUT/cifar-block.onnx" 8 "$FLOPS" 20 > "$OUT/ort-block.txt"
else
  echo "onnxruntime not found for $ORT_PY (set ORT_PY); skipping it" > "$OUT/ort-block.txt"
fi
# Whole process: compile once, then `iresnetc run` of 8 images forward + 5-term log-det
# from the bundle (loading included), wall time and peak resident memory.
[ -f build/cifar/net.json ] || $BIN compile models/cifar.toml -o build/cifar > /dev/null
$BIN random-input build/cifar --num 8 -o "$OUT/x8.npy" 2> /dev/null
/usr/bin/time -f '%e s wall, %M KiB peak RSS' -o "$OUT/run-cpu.txt" \
  $BIN run build/cifar --backend cpu --mode forward --input "$OUT/x8.npy" \
  --output "$OUT/z8.npy" --logdet-out "$OUT/ld8.npy" 2> /dev/null
# PyTorch CPU on the same models and batches; parity of z (and exact log-det where small).
$PY examples/pytorch/parity.py models/cifar-block.toml --batch 8 --logdet off --json "$OUT/torch-block.json" > "$OUT/torch-block.txt"
$PY examples/pytorch/parity.py models/cifar.toml --batch 1 --logdet off --reps 3 --json "$OUT/torch-cifar.json" > "$OUT/torch-cifar.txt"
$PY examples/pytorch/parity.py models/cifar-tiny.toml --batch 8 --json "$OUT/parity-tiny.json" > "$OUT/parity-tiny.txt"
$PY examples/pytorch/parity.py models/toy2d.toml --batch 8 --json "$OUT/parity-toy.json" > "$OUT/parity-toy.txt"

python3 - "$OUT" <<'PYEOF'
import json, sys, os
out = sys.argv[1]
load = lambda f: json.load(open(os.path.join(out, f)))
rows = load("bench-block.json") + load("bench-cifar.json") + load("bench-cifar-cpu1.json") + load("bench-cifar-cpu8.json")
torch = {"cifar-block": load("torch-block.json"), "cifar": load("torch-cifar.json")}
print("| model | batch | entry | backend | dispatches | ms / image | GFLOP/s | PyTorch CPU forward ms / image | ratio (backend / PyTorch) |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    t = torch.get(r["model"])
    pt = t["timing"]["pytorch_f32_forward_median_s"] * 1e3 / r["batch"] if t else None
    ratio = f"{r['ms_per_image'] / pt:.1f}x" if pt and r["entry"] == "forward" else ""
    print(f"| {r['model']} | {r['batch']} | {r['entry']} | {r['backend']} | {r['dispatches'] if r['dispatches'] is not None else '-'} "
          f"| {r['ms_per_image']:.1f} | {r['gflops']:.2f} | {f'{pt:.1f}' if pt else ''} | {ratio} |")
print()
print("onnxruntime, CIFAR block batch 8:", open(os.path.join(out, "ort-block.txt")).read().strip())
print("iresnetc run --backend cpu, models/cifar.toml bundle, 8 images forward + log-det:", open(os.path.join(out, "run-cpu.txt")).read().strip())
print()
print("| parity (PyTorch f64 vs iresnetc cpu) | batch | z max abs err | exact log-det max abs err | result |")
print("|---|---|---|---|---|")
for name, f in [("toy2d", "parity-toy.json"), ("cifar-tiny", "parity-tiny.json"), ("cifar-block", "torch-block.json"), ("cifar", "torch-cifar.json")]:
    p = load(f)
    z = p.get("z") or p.get("logits") or {}
    ld = p.get("logdet")
    zs = f"{z['max_abs_err']:.1e}" if z else "-"
    ls = f"{ld['max_abs_err']:.1e}" if ld else "not compared"
    print(f"| {name} | {p['batch']} | {zs} | {ls} | {'PASS' if p.get('pass') else 'FAIL'} |")
PYEOF
