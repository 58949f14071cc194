"""Times onnxruntime on an ONNX file that iresnetc exported.

usage: ort_bench.py MODEL.onnx BATCH FLOPS_PER_SAMPLE [SAMPLES] [--threads N] [--json OUT]

Feeds every input with uniform random values in [-1, 1] (the Hutchinson probes of a log-det
graph included: timing does not depend on their values), runs 2 warm-ups, then prints the
median and min wall time and GFLOP/s (FLOPS_PER_SAMPLE: the work per sample, e.g. 2 x MACs of
the forward pass from `iresnetc inspect --json`). --threads sets intra-op threads (default:
onnxruntime's, all cores). --json also writes the figures and the process's peak RSS.
"""
import argparse
import json
import resource
import statistics
import time

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("batch", type=int)
    ap.add_argument("flops", type=float)
    ap.add_argument("samples", type=int, nargs="?", default=10)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args()
    opts = ort.SessionOptions()
    if a.threads:
        opts.intra_op_num_threads = a.threads
    t0 = time.perf_counter()
    sess = ort.InferenceSession(a.path, opts, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    feeds = {}
    for i in sess.get_inputs():
        shape = [a.batch if isinstance(d, str) else d for d in i.shape]
        feeds[i.name] = rng.uniform(-1, 1, shape).astype(np.float32)
    for _ in range(2):
        sess.run(None, feeds)
    times = []
    for _ in range(a.samples):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    total = a.flops * a.batch
    print(
        f"onnxruntime {ort.__version__}: {a.path} at batch {a.batch}: median {med * 1e3:.2f} ms, "
        f"min {min(times) * 1e3:.2f} ms over {a.samples} runs, {total / med / 1e9:.1f} GFLOP/s "
        f"(threads: {a.threads or 'onnxruntime default = all cores'})"
    )
    if a.json:
        res = {"onnxruntime": ort.__version__, "path": a.path, "batch": a.batch, "median_s": med,
               "min_s": min(times), "samples": a.samples, "session_load_s": load_s,
               "gflops": total / med / 1e9,
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
