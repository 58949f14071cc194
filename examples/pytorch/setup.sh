#!/usr/bin/env bash
# One-command setup of the PyTorch parity check and of examples/results.sh: a venv at
# examples/pytorch/.venv with torch, numpy, safetensors and onnxruntime, then a smoke import.
#
# Why the full torch wheel: PyPI (the only index reachable from our machines) has
# no CPU-only torch build for Linux x86_64 (the `+cpu` wheels live on PyTorch's own
# index). `pip install --no-deps torch` (~1.2 GB unpacked) does not import: torch's
# loader preloads the CUDA libraries (libcublasLt, ...) from the nvidia-* wheels
# and fails without them. So this installs the ordinary PyPI torch with its CUDA
# dependencies (several GB, unused at run time). Measured times: README.md.
#
# Usage: bash examples/pytorch/setup.sh            (idempotent; reuses an existing venv)
#        PYTHON=python3.12 bash examples/pytorch/setup.sh
#        TORCH_SPEC="torch==2.15.0" overrides the pinned torch.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
python="${PYTHON:-python3}"
torch_spec="${TORCH_SPEC:-torch==2.15.0}"

if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
    echo "setup.sh: needs Python >= 3.10 (tomllib or tomli); found $("$python" --version 2>&1)" >&2
    exit 1
fi

start=$(date +%s)
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
# tomli only matters on Python 3.10 (3.11+ has tomllib).
"$venv/bin/python" -m pip install -q "$torch_spec" numpy safetensors onnxruntime 'tomli; python_version < "3.11"'
"$venv/bin/python" - <<'EOF'
import torch, numpy, safetensors
torch.set_num_threads(2)
x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
y = torch.nn.functional.conv2d(x, torch.randn(5, 3, 3, 3, dtype=torch.float64), padding=1)
assert y.shape == (4, 5, 8, 8)
print(f"torch {torch.__version__}, numpy {numpy.__version__}, safetensors {safetensors.__version__}: ok")
EOF
echo "setup.sh: venv ready at $venv in $(( $(date +%s) - start )) s ($(du -sh "$venv" | cut -f1))"
