#!/usr/bin/env python3
"""Writes the official-code fixture of `compiler/tests/official.rs` (numpy only).

A small official-architecture flow (`official_model.OfficialFlow`: 3x8x8 input,
initial squeeze, three scales of two blocks, width 4, strides 1-2-2) gets a state
dict in the official layout (u, v after only 5 training-mode power iterations,
so some layers sit above coeff, as in real checkpoints), which goes through
`convert_official.py`; the official model's outputs on fixed inputs are stored
next to it:

  model.toml          written by the converter
  weights.safetensors written by the converter (f64)
  x.npy               inputs [B, 3, 8, 8]
  z.npy               official z [B, 192]
  logdet.npy          official exact log|det dz/dx| [B]
  logpz.npy           official log N(z; prior_mu, exp(prior_logstd)) [B]
  x_inv10.npy         official inverse of z with max_iter = 10 (its default)

    python3 examples/pytorch/make_official_fixture.py compiler/tests/fixtures/official
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import convert_official  # noqa: E402
from official_model import OfficialFlow  # noqa: E402


def build():
    model = OfficialFlow((3, 8, 8), [2, 2, 2], [1, 2, 2], [4, 4, 4], init_squeeze=True,
                         inj_pad=0, coeff=0.9, nonlin="elu")
    p = model.init_state_dict(seed=1, power_iters=5)
    x = 0.5 * np.random.default_rng(2).standard_normal((3, 3, 8, 8))
    return model, p, x


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "fixture"
    out.mkdir(parents=True, exist_ok=True)
    model, p, x = build()
    z, logdet = model.forward(p, x)
    # The state dict goes through the converter as DataParallel saves it (`module.`).
    sd_path = out / "state_dict.npz"
    np.savez(sd_path, **{"module." + k: v for k, v in p.items()})
    rc = convert_official.main([
        str(sd_path), "--input", "3,8,8", "--coeff", "0.9", "--nonlin", "elu",
        "--name", "official-fixture",
        "--out-weights", str(out / "weights.safetensors"), "--out-model", str(out / "model.toml"),
    ])
    sd_path.unlink()  # reproducible from this script; not part of the fixture
    if rc != 0:
        return rc
    np.save(out / "x.npy", x)
    np.save(out / "z.npy", z)
    np.save(out / "logdet.npy", logdet)
    np.save(out / "logpz.npy", model.logpz(p, z))
    np.save(out / "x_inv10.npy", model.inverse(p, z, max_iter=10))
    print(f"fixture in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
