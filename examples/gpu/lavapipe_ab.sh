#!/usr/bin/env bash
# A/B of two iresnetc binaries on wgpu (lavapipe here: the CPU tiling), as the GPU issue's
# "no slower on lavapipe" check was measured: the CIFAR flow at batch 1 (forward, forward +
# log-det) and the CIFAR block at batch 8 (forward, forward + log-det, inverse), fused and
# unfused, the binaries alternated ROUNDS times; prints new/base of the medians per round.
#
#   bash examples/gpu/lavapipe_ab.sh BASE_BINARY NEW_BINARY [ROUNDS]
#
# Build the base from an older commit in a worktree (git worktree add ../base <rev> &&
# cargo build --release -p iresnetc there). Timings on a shared machine move by 10-20%:
# pause other work and compare rounds, not single readings.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 BASE_BINARY NEW_BINARY [ROUNDS]" >&2; exit 2; }
base=$1 new=$2 rounds=${3:-2}
for b in "$base" "$new"; do
  [ -x "$b" ] || { echo "error: $b: not an executable" >&2; exit 2; }
done
cd "$(dirname "$0")/../.."
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for r in $(seq "$rounds"); do
  for v in new base; do
    bin=$base; [ "$v" = new ] && bin=$new
    "$bin" bench models/cifar.toml --batch 1 --backends wgpu \
      --entries forward,forward+logdet --samples 5 --json > "$out/$v.flow.$r.json" 2>/dev/null
    "$bin" bench models/cifar-block.toml --batch 8 --backends wgpu \
      --samples 5 --json > "$out/$v.block.$r.json" 2>/dev/null
  done
done
python3 - "$out" "$rounds" <<'PY'
import json, sys
out, rounds = sys.argv[1], int(sys.argv[2])
print(f"{'model':12s} {'entry':16s} {'plan':14s}  new/base per round")
for model in ("flow", "block"):
    rows = {}
    for r in range(1, rounds + 1):
        for v in ("base", "new"):
            for x in json.load(open(f"{out}/{v}.{model}.{r}.json")):
                rows.setdefault((x["model"], x["entry"], x["backend"]), {}).setdefault(v, []).append(x["median_ms"])
    for (m, e, b), t in rows.items():
        ratios = ", ".join(f"{n / o:.2f}" for o, n in zip(t.get("base", []), t.get("new", [])))
        print(f"{m:12s} {e:16s} {b:14s}  {ratios}")
PY
