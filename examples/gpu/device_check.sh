#!/usr/bin/env bash
# Everything worth knowing the first time iresnetc meets a real GPU, in one run of a few
# minutes, with no network:
#   1. the Vulkan driver: loader, ICD files, nvidia-smi, and the adapters wgpu sees;
#      aborts when none is a hardware GPU (unless --allow-software: a dry run on lavapipe);
#   2. correctness: the wgpu-vs-reference tests of both tilings (register-blocked and
#      split-K), fused and unfused, every entry point (compiler/tests/gpu.rs), and the
#      cost report's tests;
#   3. the cost report of the GPU tiling (cifar.toml, batch 1: the goals);
#   4. benchmarks of forward, forward + 5-term log-det and the 10-step inverse at batch 1
#      and 64, fused and unfused, wall / GPU / recording time, with the per-kernel
#      profile (timestamp queries);
#   5. the same work in PyTorch CUDA (fp32 with TF32 off, TF32 on, bf16) for comparison;
#   6. one table of it all, and JSON.
#
#   examples/gpu/device_check.sh [--allow-software] [--out DIR]
#
# Needs cargo with the dependencies already fetched (it builds --offline) or a prebuilt
# target/release/iresnetc and test binaries from the same checkout path. On a software
# adapter (--allow-software) the model shrinks to cifar-tiny and the batches to 1 and 4,
# the big-model tests are skipped, and every timing is marked as a dry run's.
set -uo pipefail
cd "$(dirname "$0")/../.."

allow_software=0
out=build/device_check
while [ $# -gt 0 ]; do
  case "$1" in
    --allow-software) allow_software=1 ;;
    --out) out="$2"; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
start=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }
die() { echo "device_check.sh: $*" >&2; exit 1; }

step "1. Vulkan driver and adapters"
if command -v ldconfig >/dev/null && ! ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1'; then
  die "no Vulkan loader (libvulkan.so.1) on this machine: install libvulkan1 (and the GPU's Vulkan driver)"
fi
icds=$(ls ${VK_DRIVER_FILES:-} ${VK_ICD_FILENAMES:-} /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json \
  /usr/local/nvidia/share/vulkan/icd.d/*.json 2>/dev/null | tr '\n' ' ')
echo "Vulkan ICD files: ${icds:-none found}"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi -L || true
fi

bin=${IRESNETC_BIN:-target/release/iresnetc}
have_cargo=0
command -v cargo >/dev/null && have_cargo=1
if [ "$have_cargo" = 1 ]; then
  step "building (release, offline)"
  timeout 600 cargo build --release --offline -p iresnetc || die "cargo build failed (offline: are the dependencies in ~/.cargo?)"
fi
[ -x "$bin" ] || die "no iresnetc binary at $bin (build it, or set IRESNETC_BIN)"

"$bin" devices | tee "$out/devices.txt"
# A hardware adapter: a Vulkan one not marked as software.
gpu_line=$(grep -E '^[0-9]+: .*\(vulkan, ' "$out/devices.txt" | grep -v '\[software' | head -n 1)
if [ -n "$gpu_line" ]; then
  name=$(echo "$gpu_line" | sed -E 's/^[0-9]+: (.*) \(vulkan, .*/\1/')
  export IRESNETC_ADAPTER="$name"
  echo "using the hardware adapter: $name"
  dry=0
elif [ "$allow_software" = 1 ]; then
  echo "DRY RUN: no hardware GPU adapter; running on the software adapter with a small model."
  echo "Its numbers check that this script works; they are not GPU timings."
  dry=1
else
  die "no hardware GPU among the adapters above (only software ones, or none): check the GPU's Vulkan driver (ICD file, VK_DRIVER_FILES); rerun with --allow-software for a dry run on lavapipe"
fi

if [ "$dry" = 1 ]; then
  model=models/cifar-tiny.toml; batches=1,4
  tests=(toy2d cifar_tiny two_probes roulette profile)
  torch_args=(--device cpu --model models/cifar-tiny.toml --batch 1 --precisions fp32 --reps 1 --warmup 1 --check)
else
  model=models/cifar.toml; batches=1,64
  tests=(toy2d cifar_tiny two_probes cifar_block cifar_matches mnist roulette classifier profile)
  torch_args=(--model models/cifar.toml --batch 1,64 --check)
fi

step "2. correctness: wgpu against the f64 reference, both tilings, fused and unfused"
status=0
if [ "$have_cargo" = 1 ]; then
  IRESNETC_REQUIRE_GPU=1 timeout 900 cargo test --release --offline -p iresnetc --test gpu --test cost -- \
    --test-threads 1 "${tests[@]}" gpu_tiling conv_figures gemm_kernels 2>&1 | tee "$out/tests.txt" \
    | grep -E '^test |matches|batch [0-9]+:|fused vs|roulette|test result' || true
  grep -q 'test result: FAILED\|panicked' "$out/tests.txt" && status=1
  grep -q 'test result: ok' "$out/tests.txt" || status=1
else
  echo "SKIPPED: no cargo here to build the tests (the benchmarks still run)"
fi
[ "$status" = 0 ] && echo "correctness: PASS" || echo "correctness: FAIL (see $out/tests.txt)"

step "3. cost report: $model, GPU tiling, at each batch (split-K, then the GEMM kernels)"
for b in ${batches//,/ }; do
  "$bin" inspect "$model" --cost --batch "$b" --tiling gpu > "$out/cost-b$b.txt" 2>/dev/null \
    && grep -E '^(cost|encode|forward|inverse|logdet)' "$out/cost-b$b.txt"
done

step "4. wgpu benchmarks: $model, batch $batches, fused and unfused, 10-step inverse, profile"
timeout 420 "$bin" bench "$model" --batch "$batches" --backends wgpu --tiling gpu \
  --entries forward,forward+logdet,inverse --inverse-steps 10 --samples 5 \
  --profile "$out/profile.json" --json-out "$out/bench.json" 2> "$out/bench.log" | tee "$out/bench.txt" \
  || { status=1; echo "benchmark FAILED:"; tail -n 5 "$out/bench.log"; }
grep -E '^profile' "$out/bench.log" | sed 's/; slowest:$//' || true

step "5. PyTorch for comparison"
if command -v python3 >/dev/null; then
  timeout 300 python3 examples/pytorch/cuda_bench.py "${torch_args[@]}" --json "$out/torch.json"
  rc=$?
  case $rc in
    0) ;;
    3) echo "SKIPPED: PyTorch or CUDA missing (said above)" ;;
    *) echo "PyTorch benchmark FAILED (exit $rc)"; status=1 ;;
  esac
else
  echo "SKIPPED: no python3"
fi

step "6. summary"
if command -v python3 >/dev/null; then
  python3 - "$out" "$dry" <<'EOF'
import json, sys
from pathlib import Path
out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.exists() else None
bench = load("bench.json") or []
torch = (load("torch.json") or {}).get("rows", [])
rows = {}
for r in bench:
    k = (r["entry"], r["batch"])
    v = r["gpu_ms"] if r.get("gpu_ms") is not None else r["median_ms"]
    rows.setdefault(k, {})[r["backend"]] = v
for r in torch:
    rows.setdefault((r["entry"], r["batch"]), {})["torch " + r["precision"]] = r["median_ms"]
cols = ["wgpu fused", "wgpu unfused", "torch fp32", "torch tf32", "torch bf16"]
print(("DRY RUN (software adapter, CPU PyTorch): " if dry else "") + "ms per run (wgpu: GPU time where timestamps exist, else wall)")
print(f"{'entry':<15} {'batch':>5} " + " ".join(f"{c:>13}" for c in cols) + "  fused <= torch fp32")
summary = []
for (entry, batch), v in sorted(rows.items()):
    cells = " ".join(f"{v[c]:>13.3f}" if c in v else f"{'-':>13}" for c in cols)
    ok = "-" if "wgpu fused" not in v or "torch fp32" not in v else ("yes" if v["wgpu fused"] <= v["torch fp32"] else "NO")
    print(f"{entry:<15} {batch:>5} {cells}  {ok}")
    summary.append({"entry": entry, "batch": batch, **v, "fused_at_least_as_fast_as_torch_fp32": ok})
(out / "summary.json").write_text(json.dumps({"dry_run": dry, "rows": summary}, indent=2))
print(f"JSON: {out}/summary.json, bench.json, profile.json, torch.json; cost reports {out}/cost-b*.txt")
EOF
else
  cat "$out/bench.txt"
fi
echo "done in $(( $(date +%s) - start )) s; status $status"
exit $status
