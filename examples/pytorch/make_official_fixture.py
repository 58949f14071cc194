#!/usr/bin/env python3
"""Writes the official-code fixture of `compiler/tests/official.rs` (numpy only).

A small official-architecture flow (`official_model.OfficialFlow`: 3x8x8 input,
initial squeeze, three scales of two blocks, width 4, strides 1-2-2) gets a state
dict in the official layout (u, v after only 5 training-mode power iterations,
so some layers sit above coeff, as in real checkpoints), which goes through
`convert_official.py`'s conversion; the official model's outputs on fixed inputs
are stored next to it:

  model.toml          written by the converter
  weights.safetensors written by the converter (f64)
  x.npy               inputs [B, 3, 8, 8]
  z.npy               official z [B, 192]
  logdet.npy          official exact log|det dz/dx| [B]
  logpz.npy           official log N(z; prior_mu, exp(prior_logstd)) [B]
  x_inv10.npy         official inverse of z with max_iter = 10 (its default)

    python3 examples/pytorch/make_official_fixture.py compiler/tests/fixtures/official

The seven files go through safeio.py's output guard: all are written, or none.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import convert_official  # noqa: E402
import safeio  # noqa: E402
from official_model import OfficialFlow  # noqa: E402

PROG = "make_official_fixture.py"
FILES = ("model.toml", "weights.safetensors", "x.npy", "z.npy", "logdet.npy", "logpz.npy", "x_inv10.npy")


def build():
    model = OfficialFlow((3, 8, 8), [2, 2, 2], [1, 2, 2], [4, 4, 4], init_squeeze=True,
                         inj_pad=0, coeff=0.9, nonlin="elu")
    p = model.init_state_dict(seed=1, power_iters=5)
    x = 0.5 * np.random.default_rng(2).standard_normal((3, 3, 8, 8))
    return model, p, x


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def main(argv=None) -> int:
    ap = safeio.ArgParser(prog=PROG, description=__doc__.split("\n")[0])
    ap.add_argument("outdir", nargs="?", type=Path, default=HERE / "fixture",
                    help="directory of the fixture (created if missing)")
    args = ap.parse_args(argv)
    try:
        outs = safeio.Outputs({f"OUTDIR/{name}": args.outdir / name for name in FILES})
    except safeio.OutputError as e:
        return safeio.fail(PROG, e)
    model, p, x = build()
    z, logdet = model.forward(p, x)
    # The state dict goes through the converter as DataParallel saves it (`module.`).
    sd = {"module." + k: v for k, v in p.items()}
    try:
        weights, toml, _ = convert_official.convert_to_bytes(sd, (3, 8, 8), 0.9, "elu", "official-fixture", "f64")
    except convert_official.ConvertError as e:
        return safeio.fail(PROG, e)
    arrays = {"x.npy": x, "z.npy": z, "logdet.npy": logdet, "logpz.npy": model.logpz(p, z),
              "x_inv10.npy": model.inverse(p, z, max_iter=10)}
    contents = {args.outdir / "model.toml": toml.encode(), args.outdir / "weights.safetensors": weights}
    contents.update({args.outdir / name: npy_bytes(a) for name, a in arrays.items()})
    try:
        outs.commit(contents)
    except (safeio.OutputError, OSError) as e:
        return safeio.fail(PROG, f"writing the fixture: {e}")
    print(f"fixture in {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
