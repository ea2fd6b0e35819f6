"""The CPU's sustained arithmetic rate through TensorFlow: the ceiling the benchmark measures training against.

    python -m bench.peak [--size 2048] [--out peak.json]

Times square matrix products (TensorFlow's oneDNN/Eigen kernels, all cores),
in float32 and in bfloat16, and reports the best rate of several tries in
GFLOP/s (2 n^3 per product). A convolution network's training cannot go
faster than its FLOPs at this rate; the benchmark divides the model's
training FLOPs by it to get the fit-time floor.
"""

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, as train@cpu

import tensorflow as tf  # noqa: E402  (after the environment above)


def matmul_gflops(n, dtype, tries=5, products=8):
    a = tf.cast(tf.random.stateless_normal([n, n], seed=[1, 2]), dtype)
    b = tf.cast(tf.random.stateless_normal([n, n], seed=[3, 4]), dtype)
    product = tf.function(tf.linalg.matmul)
    product(a, b).numpy()  # trace and warm up
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        for _ in range(products):
            c = product(a, b)
        c.numpy()  # wait for the last one
        best = min(best, (time.perf_counter() - start) / products)
    return 2 * n ** 3 / best / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = {"float32_gflops": matmul_gflops(args.size, tf.float32),
              "bfloat16_gflops": matmul_gflops(args.size, tf.bfloat16), "size": args.size}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"matmul {args.size}x{args.size}: float32 {result['float32_gflops']:.0f} GFLOP/s, "
          f"bfloat16 {result['bfloat16_gflops']:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
