#!/usr/bin/env python3
"""Official i-ResNet checkpoint -> iresnetc weights (safetensors) + model file.

    python3 examples/pytorch/convert_official.py CHECKPOINT --input 3,32,32 \\
        --out-weights cifar-official.safetensors --out-model cifar-official.toml
    iresnetc compile cifar-official.toml --weights cifar-official.safetensors -o bundle/

CHECKPOINT is the `state_dict` of an official `multiscale_conv_iResNet` (github
jhjacobsen/invertible-resnet): a `.pt`/`.pth` file (torch.save's zip or legacy
format, read by torchfile.py with numpy alone and without running anything the
file says; a checkpoint dict holding the state dict or the model under
`state_dict` or `model` is accepted too, a pickled model as inert stubs of its
`models.*` and `torch.nn.*` classes) or an `.npz` of the same keys. Keys may
carry DataParallel's `module.` prefix. Tensors must be real and finite.

What is read (everything else is an error naming the key):
  stack.{s}.stack.{b}.bottleneck_block.{i}.weight_orig|bias|weight_u|weight_v[|weight_sigma]
  stack.{s}.stack.{b}.actnorm._log_scale|_shift   (absent in every block: actnorm=False)
  prior_mu, prior_logstd
The architecture (blocks per scale, widths, where the squeezes are, the initial
squeeze and injective padding) is inferred from the shapes, using the stored
power-iteration vector of each 3x3 conv (its length is the conv's input size).
Not in the state dict, hence flags: the input shape, the Lipschitz coefficient
`coeff` the model was built with (0.9 by default, as the official CIFAR runs),
and the nonlinearity (elu or relu, elu by default as in CIFAR_main.py; softplus
and sorting have no iresnetc equivalent). The model file turns on `[data]
dequantize` (the official density runs' input chain, `(255 x + U(0,1))/256 - 0.5`)
unless `--no-dequantize`.

The weights written are the ones the official code convolves with in eval mode
(`model.eval()`: no power iteration, sigma from the stored u and v):
  3x3 convs (spectral_norm_conv): W_orig / (max(1, sigma / coeff) + 1e-5),
      sigma = u . conv2d(v.view(1, C, H, W), W_orig, padding=1)
  1x1 convs (spectral_norm_fc):   W_orig / max(1, sigma / coeff),
      sigma = u . (W_orig.view(Cout, Cin) v)
ActNorm maps exactly (`y = x * exp(_log_scale) + _shift`: log_scale and bias),
the prior too (prior.mean, prior.log_std). The model file uses the official
conventions (squeeze_order = "space_to_depth", factor_out_half = "first") and
`lipschitz.normalize = "if_needed"`, so that iresnetc keeps the weights as they
are wherever its certified block bound is below 1 (the official sigma comes
from a few power iterations and can end a hair above coeff).

Nothing is written unless every check passes (the outputs go through safeio.py's
guard). Exit status 2 and one line on stderr on bad input.
"""

from __future__ import annotations

import json
import re
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import safeio  # noqa: E402
import torchfile  # noqa: E402
from official_model import conv2d  # noqa: E402

BLOCK_KEY = re.compile(r"^stack\.(\d+)\.stack\.(\d+)\.(.+)$")
LAYER_KEY = re.compile(r"^bottleneck_block\.(\d+)\.(weight_orig|bias|weight_u|weight_v|weight_sigma)$")
ACTNORM_KEY = re.compile(r"^actnorm\.(_log_scale|_shift)$")


class ConvertError(Exception):
    pass


# A whole pickled model (rather than its state dict) names its classes: the official
# code's (`models.*`) and torch's modules (`torch.nn.*`). They load as inert stubs whose
# parameters and buffers are read back as a state dict; nothing in the file is run.
MODEL_STUBS = {"models.*": torchfile.Stub, "torch.nn.*": torchfile.Stub}
# What an .npz may unpack to (its members' declared sizes, checked before reading: a
# compressed member can claim far more than the file holds).
NPZ_MAX_BYTES = torchfile.DEFAULT_MAX_BYTES


def checked_array(key, value) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise ConvertError(f"key `{key}`: a {type(value).__name__}, expected a tensor")
    if value.dtype.kind not in "fiub":
        raise ConvertError(f"key `{key}`: dtype {value.dtype}, expected real numbers")
    out = value.astype(np.float64)
    if not np.all(np.isfinite(out)):
        raise ConvertError(f"key `{key}`: non-finite values (inf or NaN)")
    return out


def load_state_dict(path: Path) -> dict:
    if path.suffix == ".npz":
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
            if magic != b"PK\x03\x04" and magic != b"PK\x05\x06":
                raise ConvertError("not an .npz archive (no zip header; an .npy or another file renamed?)")
            with zipfile.ZipFile(path) as z:
                total = sum(i.file_size for i in z.infolist())
            if total > NPZ_MAX_BYTES:
                raise ConvertError(f"the .npz unpacks to {total} bytes, over the budget of {NPZ_MAX_BYTES}")
            with np.load(path, allow_pickle=False) as f:
                if not isinstance(f, np.lib.npyio.NpzFile):
                    raise ConvertError("not an .npz archive")
                return {k: checked_array(k, f[k]) for k in f.files}
        except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError, struct.error) as e:
            if isinstance(e, ConvertError):
                raise
            raise ConvertError(f"damaged .npz: {' '.join(str(e).split()) or type(e).__name__}") from None
    try:
        obj = torchfile.load(path, stubs=MODEL_STUBS)
    except torchfile.TorchFileError as e:
        raise ConvertError(str(e)) from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj:
            obj = obj[key]
            break
    if isinstance(obj, torchfile.Stub):
        obj = torchfile.module_state_dict(obj)
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise ConvertError(f"not a state dict (found {type(obj).__name__})")
    return {k: checked_array(k, v) for k, v in obj.items()}


def strip_prefix(sd: dict) -> dict:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def parse(sd: dict):
    """Group the keys: blocks[s][b] = {"layers": {i: {...}}, "actnorm": {...}}."""
    blocks: dict = {}
    prior = {}
    for key, val in sd.items():
        if key in ("prior_mu", "prior_logstd"):
            prior[key] = val
            continue
        m = BLOCK_KEY.match(key)
        if not m:
            hint = " (a classifier head: only the official density model is supported)" \
                if key.startswith(("bn1.", "logits.")) else ""
            raise ConvertError(f"key `{key}`: not part of a multiscale i-ResNet flow{hint}")
        s, b, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        blk = blocks.setdefault(s, {}).setdefault(b, {"layers": {}, "actnorm": {}})
        lm, am = LAYER_KEY.match(rest), ACTNORM_KEY.match(rest)
        if lm:
            blk["layers"].setdefault(int(lm.group(1)), {})[lm.group(2)] = val
        elif am:
            blk["actnorm"][am.group(1)] = val
        else:
            raise ConvertError(f"key `{key}`: unknown parameter `{rest}` of a block")
    for name in ("prior_mu", "prior_logstd"):
        if name not in prior:
            raise ConvertError(f"key `{name}` missing (the learned prior of the flow)")
    if not blocks:
        raise ConvertError("no `stack.{s}.stack.{b}` blocks found")
    return blocks, prior


def check_dense(keys, name):
    if sorted(keys) != list(range(len(keys))):
        raise ConvertError(f"{name} indices {sorted(keys)} are not 0..{len(keys) - 1}")


def infer(blocks: dict, input_shape):
    """Stage list [(blocks, width, squeeze, shape)], initial squeeze, padding."""
    check_dense(list(blocks), "scale")
    stages = []
    for s in range(len(blocks)):
        check_dense(list(blocks[s]), f"scale {s}: block")
        first = blocks[s][0]["layers"]
        convs = sorted(first)
        lead = convs[0]
        if convs != [lead, lead + 2, lead + 4]:
            raise ConvertError(
                f"stack.{s}.stack.0.bottleneck_block: conv indices {convs}, expected "
                "[0, 2, 4] or [1, 3, 5] (conv3x3 -> conv1x1 -> conv3x3 between nonlinearities)")
        w0 = first[lead].get("weight_orig")
        if w0 is None or w0.ndim != 4:
            raise ConvertError(f"stack.{s}.stack.0.bottleneck_block.{lead}.weight_orig missing or not 4-D")
        width, c = w0.shape[0], w0.shape[1]
        v = first[lead].get("weight_v")
        if v is None or v.size % c != 0:
            raise ConvertError(f"stack.{s}.stack.0.bottleneck_block.{lead}.weight_v missing or not a multiple of {c}")
        stages.append({"blocks": len(blocks[s]), "width": width, "channels": c, "plane": v.size // c})
    # The image side: a square plane is assumed only through --input.
    cin, h, w = input_shape
    st0 = stages[0]
    if st0["plane"] == h * w:
        init_squeeze = False
    elif st0["plane"] * 4 == h * w and h % 2 == 0 and w % 2 == 0:
        init_squeeze = True
        h, w = h // 2, w // 2
    else:
        raise ConvertError(
            f"scale 0 works on {st0['plane']} pixels, which is neither the input's {h}x{w} nor its squeeze")
    c0 = cin * (4 if init_squeeze else 1)
    pad = st0["channels"] - c0
    if pad < 0:
        raise ConvertError(f"scale 0 has {st0['channels']} channels, fewer than the {c0} of the input")
    shape = (st0["channels"], h, w)
    st0["squeeze"], st0["shape"] = False, shape
    for s in range(1, len(stages)):
        st = stages[s]
        keep = shape[0] - shape[0] // 2
        if st["channels"] == 4 * keep and st["plane"] * 4 == shape[1] * shape[2] and shape[1] % 2 == 0:
            st["squeeze"], shape = True, (4 * keep, shape[1] // 2, shape[2] // 2)
        elif st["channels"] == keep and st["plane"] == shape[1] * shape[2]:
            st["squeeze"], shape = False, (keep, shape[1], shape[2])
        else:
            raise ConvertError(
                f"scale {s}: {st['channels']} channels on {st['plane']} pixels does not follow scale {s - 1} "
                f"({shape[0]}x{shape[1]}x{shape[2]}, half factored out, optional squeeze)")
        st["shape"] = shape
    return stages, init_squeeze, pad


def want_shape(key, arr, shape):
    if tuple(arr.shape) != tuple(shape):
        raise ConvertError(f"key `{key}`: shape {tuple(arr.shape)}, expected {tuple(shape)}")


def convert(sd: dict, input_shape, coeff: float, nonlin: str, dequantize: bool = True):
    sd = strip_prefix(sd)
    blocks, prior = parse(sd)
    stages, init_squeeze, pad = infer(blocks, input_shape)
    has_actnorm = {bool(blk["actnorm"]) for s in blocks for blk in blocks[s].values()}
    if len(has_actnorm) != 1:
        raise ConvertError("some blocks have an actnorm and some do not")
    out = {}
    report = []
    for s, st in enumerate(stages):
        c, h, w = st["shape"]
        wd = st["width"]
        for b in range(st["blocks"]):
            blk = blocks[s][b]
            pre = f"stack.{s}.stack.{b}"
            lead = 0 if (s == 0 and b == 0) else 1
            convs = sorted(blk["layers"])
            if convs != [lead, lead + 2, lead + 4]:
                raise ConvertError(
                    f"{pre}.bottleneck_block: conv indices {convs}, expected {[lead, lead + 2, lead + 4]} "
                    "(only the model's first block lacks the input nonlinearity)")
            dims = [(c, wd, 3), (wd, wd, 1), (wd, c, 3)]
            for li, (i, (ci, co, k)) in enumerate(zip(convs, dims)):
                key = f"{pre}.bottleneck_block.{i}"
                layer = blk["layers"][i]
                for part in ("weight_orig", "bias", "weight_u", "weight_v"):
                    if part not in layer:
                        raise ConvertError(f"key `{key}.{part}` missing")
                wo = layer["weight_orig"]
                want_shape(key + ".weight_orig", wo, (co, ci, k, k))
                want_shape(key + ".bias", layer["bias"], (co,))
                if k == 1:
                    want_shape(key + ".weight_u", layer["weight_u"], (co,))
                    want_shape(key + ".weight_v", layer["weight_v"], (ci,))
                    sigma = float(layer["weight_u"] @ (wo.reshape(co, ci) @ layer["weight_v"]))
                    weff = wo / max(1.0, sigma / coeff)
                else:
                    want_shape(key + ".weight_u", layer["weight_u"].reshape(-1), (co * h * w,))
                    want_shape(key + ".weight_v", layer["weight_v"].reshape(-1), (ci * h * w,))
                    v = layer["weight_v"].reshape(1, ci, h, w)
                    sigma = float(layer["weight_u"].reshape(-1) @ conv2d(v, wo, 1).reshape(-1))
                    weff = wo / (max(1.0, sigma / coeff) + 1e-5)
                name = f"stage{s}.block{b}.conv{li}"
                out[name + ".weight"] = weff
                out[name + ".bias"] = layer["bias"]
                report.append((name, key, sigma))
            an = f"stage{s}.block{b}.actnorm"
            if blk["actnorm"]:
                for part, ours in (("_log_scale", "log_scale"), ("_shift", "bias")):
                    if part not in blk["actnorm"]:
                        raise ConvertError(f"key `{pre}.actnorm.{part}` missing")
                    want_shape(f"{pre}.actnorm.{part}", blk["actnorm"][part], (c,))
                    out[f"{an}.{ours}"] = blk["actnorm"][part]
            else:
                # actnorm=False: the identity ActNorm is exactly the same map.
                out[f"{an}.log_scale"] = np.zeros(c)
                out[f"{an}.bias"] = np.zeros(c)
    dim = int(np.prod(stages[0]["shape"]))
    for key, ours in (("prior_mu", "prior.mean"), ("prior_logstd", "prior.log_std")):
        want_shape(key, prior[key], (dim,))
        out[ours] = prior[key]
    for k, v in out.items():
        if not np.all(np.isfinite(v)):
            raise ConvertError(f"tensor `{k}` has non-finite values")
    toml = model_toml(stages, input_shape, init_squeeze, pad, coeff, nonlin, dequantize=dequantize)
    return out, toml, report


def model_toml(stages, input_shape, init_squeeze, pad, coeff, nonlin, name="official-iresnet", dequantize=True):
    lines = [
        "# Converted from an official i-ResNet checkpoint by examples/pytorch/convert_official.py.",
        f'name = "{name}"',
        'kind = "flow"',
        f"input = [{', '.join(str(d) for d in input_shape)}]",
        f"squeeze = {'true' if init_squeeze else 'false'}",
    ]
    if pad:
        lines.append(f"pad_channels = {stages[0]['shape'][0]}")
    lines += [
        "# The official code's conventions (models/model_utils.py, models/conv_iResNet.py).",
        'squeeze_order = "space_to_depth"',
        'factor_out_half = "first"',
        "",
        "[lipschitz]",
        f"coeff = {coeff!r}",
        "# Keep the official weights bit for bit wherever they certify a block bound < 1.",
        'normalize = "if_needed"',
    ]
    for s, st in enumerate(stages):
        lines += [
            "",
            "[[stages]]",
            f"blocks = {st['blocks']}",
            f"width = {st['width']}",
            "kernels = [3, 1, 3]",
            f'activation = "{nonlin}"',
        ]
        if st["squeeze"]:
            lines.append("squeeze = true")
        if s + 1 < len(stages):
            lines.append("factor_out = true")
    if dequantize:
        lines += [
            "",
            "[data]",
            "# The official density runs (CIFAR_main.py) feed (255 x + U(0, 1)) / 256 - 0.5.",
            "dequantize = true",
        ]
    return "\n".join(lines) + "\n"


def safetensors_bytes(tensors: dict, dtype: str) -> bytes:
    """The safetensors format (8-byte header length, JSON header, raw data), by hand
    so that numpy is the only dependency."""
    np_dtype, st_dtype = {"f64": ("<f8", "F64"), "f32": ("<f4", "F32")}[dtype]
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name], dtype=np_dtype).tobytes()
        header[name] = {"dtype": st_dtype, "shape": list(np.shape(tensors[name])),
                        "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def convert_to_bytes(sd: dict, shape, coeff: float, nonlin: str, name: str, dtype: str, dequantize: bool = True):
    """The two outputs' contents: (safetensors bytes, model file text, sigma report)."""
    tensors, toml, report = convert(sd, shape, coeff, nonlin, dequantize=dequantize)
    toml = toml.replace('name = "official-iresnet"', f"name = {json.dumps(name)}")
    return safetensors_bytes(tensors, dtype), toml, report


def main(argv=None) -> int:
    prog = "convert_official.py"
    ap = safeio.ArgParser(prog=prog, description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--input", default="3,32,32", help="per-sample input shape C,H,W (default 3,32,32)")
    ap.add_argument("--coeff", type=float, default=0.9, help="the model's Lipschitz coefficient (default 0.9)")
    ap.add_argument("--nonlin", default="elu", help="elu or relu (default elu)")
    ap.add_argument("--dtype", default="f64", choices=["f64", "f32"], help="safetensors dtype (default f64)")
    ap.add_argument("--name", default="official-iresnet", help="model name in the model file")
    ap.add_argument("--no-dequantize", action="store_true",
                    help="leave [data] dequantize off (on by default: the official density runs dequantize)")
    # Strings, not Paths: Path() drops a trailing slash, which the output guard refuses.
    ap.add_argument("--out-weights", required=True)
    ap.add_argument("--out-model", required=True)
    args = ap.parse_args(argv)
    try:
        shape = tuple(int(d) for d in args.input.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) <= 0:
        return safeio.fail(prog, f"--input {args.input!r}: expected C,H,W with positive sizes")
    if not 0.0 < args.coeff < 1.0:
        return safeio.fail(prog, f"--coeff {args.coeff}: must be in (0, 1)")
    if args.nonlin not in ("elu", "relu"):
        return safeio.fail(prog, f"--nonlin {args.nonlin!r}: iresnetc has elu and relu "
                                 "(softplus and sorting have no equivalent)")
    try:
        outs = safeio.Outputs({"--out-weights": args.out_weights, "--out-model": args.out_model},
                              inputs={"CHECKPOINT": args.checkpoint})
    except safeio.OutputError as e:
        return safeio.fail(prog, e)
    if not args.checkpoint.exists():
        return safeio.fail(prog, f"{args.checkpoint}: no such file")
    if not args.checkpoint.is_file():
        return safeio.fail(prog, f"{args.checkpoint}: not a regular file")
    try:
        # Overflow in the sigma products is an error, not a warning on stderr.
        with np.errstate(all="raise"):
            sd = load_state_dict(args.checkpoint)
            weights, toml, report = convert_to_bytes(sd, shape, args.coeff, args.nonlin, args.name, args.dtype,
                                                     dequantize=not args.no_dequantize)
    except (ConvertError, OSError, ValueError, KeyError, TypeError, IndexError, ArithmeticError,
            RecursionError, MemoryError) as e:
        return safeio.fail(prog, f"{args.checkpoint}: {e or type(e).__name__}")
    try:
        outs.commit({Path(args.out_weights): weights, Path(args.out_model): toml.encode()})
    except (safeio.OutputError, OSError) as e:
        return safeio.fail(prog, f"writing the outputs: {e}")
    above = sum(1 for _, _, sg in report if sg > args.coeff)
    print(f"{prog}: {len(report)} convs ({above} with stored sigma above coeff {args.coeff}), "
          f"wrote {args.out_weights} and {args.out_model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
