"""Times onnxruntime on an exported iresnetc ONNX file (the same file tract ran).

usage: ort_bench.py MODEL.onnx BATCH FLOPS_PER_SAMPLE [SAMPLES]
Prints the median and min wall time and GFLOP/s (FLOPs = 2 x MACs of the
forward pass, from `iresnetc inspect --json`), after 2 warm-up runs.
"""
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort


def main():
    path, batch, flops = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    samples = int(sys.argv[4]) if len(sys.argv) > 4 else 10
    opts = ort.SessionOptions()
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    feeds = {}
    for i in sess.get_inputs():
        shape = [batch if isinstance(d, str) else d for d in i.shape]
        feeds[i.name] = rng.uniform(-1, 1, shape).astype(np.float32)
    for _ in range(2):
        sess.run(None, feeds)
    times = []
    for _ in range(samples):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    total = flops * batch
    print(
        f"onnxruntime {ort.__version__}: {path} at batch {batch}: median {med * 1e3:.2f} ms, "
        f"min {min(times) * 1e3:.2f} ms over {samples} runs, {total / med / 1e9:.1f} GFLOP/s "
        f"(threads: onnxruntime default = all cores)"
    )


if __name__ == "__main__":
    main()
