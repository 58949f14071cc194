#!/usr/bin/env python3
"""Turns the JSON that examples/results.sh wrote into the markdown tables of docs/results.md.

usage: results_table.py OUT_DIR INVERSE_STEPS
"""
import json
import os
import sys

out, ort_steps = sys.argv[1], int(sys.argv[2])
CASES = [("cifar-block", 8), ("cifar", 1), ("cifar", 8)]
ENTRIES = [("forward", "forward"), ("forward+logdet", "forward + 5-term log-det"), ("inverse", "inverse")]


def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None


def steps_of(backend_label):
    """`bench` labels the inverse 'cpu (f32, 2 thr), 239 steps' when the backend counts steps."""
    for part in backend_label.split(","):
        part = part.strip()
        if part.endswith(" steps"):
            return int(part.split()[0])
    return None


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


goals = []
print("| model | batch | entry | backend | ms / image | GFLOP/s | fixed-point steps | PyTorch / backend | peak MiB |")
print("|---|---|---|---|---|---|---|---|---|")
for model, batch in CASES:
    tag = f"{model}-b{batch}"
    cpu_rows = {r["entry"]: r for r in load(f"{tag}-cpu.json") or []}
    tract_rows = {r["entry"]: r for r in load(f"{tag}-tract.json") or []}
    torch = load(f"{tag}-torch.json") or {}
    mem = {k: (load(f"{tag}-{k}.mem.json") or {}).get("peak_rss_mib") for k in ("cpu", "tract")}
    if not cpu_rows:
        continue
    # Work per sample, from the cpu rows: forward F, fwd+ld F + 5B (B: one pass through every
    # branch), so an inverse of s steps per block costs about s/blocks * B in total.
    f_fwd = cpu_rows["forward"]["gflops"] * cpu_rows["forward"]["median_ms"] / 1e3 / batch
    f_ld = cpu_rows["forward+logdet"]["gflops"] * cpu_rows["forward+logdet"]["median_ms"] / 1e3 / batch
    blocks = 48 if model == "cifar" else 1
    branch = (f_ld - f_fwd) / 5.0  # GFLOP per sample of all branches once
    for entry, label in ENTRIES:
        torch_s = torch.get({"forward": "forward_s", "forward+logdet": "forward_logdet_s",
                             "inverse": "inverse_s"}[entry])
        torch_ms = torch_s * 1e3 / batch if torch_s else None
        lines = []
        for be, rows in (("iresnetc cpu (f32)", cpu_rows), ("tract (our ONNX)", tract_rows)):
            r = rows.get(entry)
            if not r:
                continue
            steps = steps_of(r["backend"]) if entry == "inverse" else None
            gfl = r["gflops"]
            if entry == "inverse" and steps:
                gfl = steps / blocks * branch * batch / (r["median_ms"] / 1e3)
            lines.append((be, r["ms_per_image"], gfl, steps, mem["cpu" if "cpu" in be else "tract"]))
        run = load(f"{tag}-tract-run-{entry}.json")
        if run and not tract_rows:
            lines.append(("tract (whole `run` process, loading included)", run["wall_s"] * 1e3 / batch, None,
                          None, run["peak_rss_kib"] / 1024))
        work = {"forward": f_fwd, "forward+logdet": f_ld}.get(entry)
        if torch_ms:
            steps = torch.get("inverse_steps") if entry == "inverse" else None
            w = work if work else (steps / blocks * branch if steps else None)
            lines.append(("PyTorch CPU (f32)", torch_ms, w / (torch_ms / 1e3) if w else None, steps,
                          torch.get("peak_rss_mib")))
        part = {"forward": "fwd", "forward+logdet": "ld", "inverse": "inv"}[entry]
        o = load(f"{tag}-ort-{part}.json")
        if o:
            ort_ms = o["median_s"] * 1e3 / batch
            steps = ort_steps * blocks if entry == "inverse" else None
            w = work if work else steps / blocks * branch
            lines.append(("onnxruntime (our ONNX)", ort_ms, w / (ort_ms / 1e3), steps, o["peak_rss_mib"]))
        for be, ms, gfl, steps, peak in lines:
            ratio = f"{torch_ms / ms:.2f}x" if torch_ms else "-"
            print(f"| {model} | {batch} | {label} | {be} | {ms:.2f} | {fmt(gfl)} | {steps or '-'} | {ratio} | {fmt(peak, 0)} |")
        if model == "cifar" and batch == 8 and entry != "forward" and torch_ms:
            ms = cpu_rows[entry]["ms_per_image"]
            goals.append((f"cifar.toml batch 8, {label}: cpu at least 1.3x PyTorch", f"{torch_ms / ms:.2f}x",
                          torch_ms / ms >= 1.3))
    if model == "cifar-block":
        o = load(f"{tag}-ort-fwd.json")
        if o:
            ort_ms = o["median_s"] * 1e3 / batch
            ms = cpu_rows["forward"]["ms_per_image"]
            goals.append(("CIFAR block batch 8 forward: cpu at least 1.0x onnxruntime",
                          f"{ort_ms / ms:.2f}x", ort_ms / ms >= 1.0))
        ld_ratio = cpu_rows["forward+logdet"]["median_ms"] / cpu_rows["forward"]["median_ms"]
        goals.append(("CIFAR block: forward + 5-term log-det at most 6.5x cpu's own forward",
                      f"{ld_ratio:.2f}x", ld_ratio <= 6.5))
        inv = cpu_rows["inverse"]
        s = steps_of(inv["backend"])
        if s:
            per_step = inv["median_ms"] / s / cpu_rows["forward"]["median_ms"]
            goals.append(("CIFAR block: inverse at most 1.1x a forward per fixed-point step",
                          f"{per_step:.2f}x", per_step <= 1.1))

run = load("run-cpu.json")
if run:
    print()
    print(f"Whole process, `iresnetc run --backend cpu` of 8 images forward + 5-term log-det from the "
          f"cifar bundle (loading included): {run['wall_s']:.2f} s wall, {run['peak_rss_kib'] / 1024:.0f} MiB peak RSS.")
    goals.append(("whole `iresnetc run` process, 8 images forward + log-det, under 2 s",
                  f"{run['wall_s']:.2f} s", run["wall_s"] < 2.0))
    goals.append(("peak resident memory of that run at most 1 GB", f"{run['peak_rss_kib'] / 1024:.0f} MiB",
                  run["peak_rss_kib"] <= 1024 * 1024))
print()
print("| goal | measured | met |")
print("|---|---|---|")
for g, m, ok in goals:
    print(f"| {g} | {m} | {'yes' if ok else 'no'} |")
print()
print("| parity (PyTorch f64 vs iresnetc) | backend | z / logits max rel err | exact log-det max rel err | result |")
print("|---|---|---|---|---|")
for m in ("toy2d", "cifar-tiny"):
    for be in ("reference", "cpu"):
        p = load(f"parity-{m}-{be}.json")
        if not p:
            continue
        z = p.get("z") or p.get("logits") or {}
        ld = p.get("logdet")
        zs = "%.1e" % z["max_rel_err"] if z else "-"
        ls = "%.1e" % ld["max_rel_err"] if ld else "not compared"
        print(f"| {m}, batch {p['batch']} | {be} | {zs} | {ls} | {'PASS' if p.get('pass') else 'FAIL'} |")
