"""Where a training step's time goes: TensorFlow's profiler over steps of the train stage's fit, per op.

    python -m bench.step_profile [--steps 64] [--params params.yaml] [--out bench/results/step_profile.json]

Run it in the project after `dvc repro` (it reads data/processed and
models/init, as train@cpu does). It builds what train@cpu fits (the classifier,
its optimizer, the same Keras `fit` on uint8 pixels), warms up, then traces
--steps steps untraced (the step's time), then the same steps with
TensorFlow's profiler, and reads the trace (an XSpace
protobuf): each op's time per step, grouped by layer and by forward or
backward, against the FLOPs of the convolutions and matrix products (from the
layers' shapes), the optimizer's update, the input pipeline, and what is left
of the step's wall time with no op running (Keras's and the executor's
per-step dispatch). It prints a table, names the CPU and its features, and
writes JSON. It asserts nothing: timings are not tests.
"""

import argparse
import collections
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from mnist_cnn.backend import cpu_model, onednn_enabled

ROOT = Path(__file__).resolve().parent.parent
BACKWARD = "gradient_tape"


def layer_flops(model, batch_size):
    """{layer name: FLOPs of its forward pass on one batch} for the conv and dense layers (2 per multiply-add)."""
    flops = {}
    for layer in model.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            continue
        positions = int(np.prod(layer.output.shape[1:-1])) if len(layer.output.shape) > 2 else 1
        flops[layer.name] = 2 * int(np.prod(kernel.shape)) * positions * batch_size
    return flops


def op_flops(op_type, layer, backward, flops):
    """The FLOPs one op does, where it is a convolution or a matrix product of a known layer, else 0.

    Forward: the layer's. Backward: the gradient for the weights and the
    gradient for the inputs each cost as much as the forward.
    """
    if layer not in flops or not ("Conv2D" in op_type or "MatMul" in op_type):
        return 0
    return flops[layer] if backward or "Backprop" not in op_type else 0


def where(path, layer_names):
    """(layer name or a group, backward?) for an op's name path in the trace."""
    backward = BACKWARD in path
    for part in reversed(path.split("/")):
        name = part[:-2] if part.endswith("_1") else part
        if name in layer_names:
            return name, backward
    if "standardize" in path:
        return "standardize (table lookup)", backward
    if backward:
        return "loss gradient", True
    if any(word in path for word in ("Assign", "ReadVariableOp", "rmsprop", "adam", "sgd", "optimizer")):
        return "optimizer update", False
    return "loss, metrics, other", False


def busy_union(intervals):
    """Total length of the union of (start, end) intervals."""
    total, end = 0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def read_trace(logdir, layer_names, flops, steps):
    """Per-op rows and the step's parts from the profiler's XSpace file."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    found = sorted(Path(logdir).rglob("*.xplane.pb"))
    space = xplane_pb2.XSpace()
    space.ParseFromString(found[-1].read_bytes())
    plane = next(p for p in space.planes if p.name == "/host:CPU")
    ops = collections.defaultdict(lambda: [0, 0])  # (layer, backward, op type) -> [picoseconds, count]
    compute, pipeline_ps = [], 0
    for line in plane.lines:
        for event in line.events:
            name = plane.event_metadata[event.metadata_id].name
            start = line.timestamp_ns * 1000 + event.offset_ps
            if line.name.startswith("tf_Compute") and ":" in name and "/" in name:
                path, op_type = name.rsplit(":", 1)
                layer, backward = where(path, layer_names)
                ops[(layer, backward, op_type)][0] += event.duration_ps
                ops[(layer, backward, op_type)][1] += 1
                compute.append((start, start + event.duration_ps))
            elif line.name.startswith("tf_data") and name.startswith("Iterator::Root") and "::" not in name[14:]:
                pipeline_ps += event.duration_ps
    rows = []
    for (layer, backward, op_type), (ps, count) in ops.items():
        ms = ps / 1e9 / steps
        gflop = op_flops(op_type, layer, backward, flops) / 1e9
        rows.append({"layer": layer, "pass": "backward" if backward else "forward", "op": op_type,
                     "ms_per_step": round(ms, 4), "calls_per_step": count / steps,
                     "gflop_per_step": round(gflop, 4),
                     "gflops": round(gflop / (ms / 1e3), 1) if gflop and ms else None})
    rows.sort(key=lambda r: -r["ms_per_step"])
    return rows, busy_union(compute) / 1e9 / steps, pipeline_ps / 1e9 / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=64,
                        help="steps traced (after 32 of warm-up and the same steps untraced)")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--init", type=Path, default=ROOT / "models" / "init",
                        help="build_init_weights's folder for these params (another network: its own)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "step_profile.json")
    parser.add_argument("--top", type=int, default=16, help="op rows printed")
    args = parser.parse_args(argv)

    from mnist_cnn.files import read_json
    from mnist_cnn.model import classifier, initial_network, standardize_table
    from mnist_cnn.params import BaseParams, TrainParams, load_params
    from mnist_cnn.training import compile_model, encode_labels, set_up

    params = load_params(args.params, base=BaseParams, train=TrainParams)
    base, train = params["base"], params["train"]
    if base.backend != "tensorflow" or train.replicas != 1:
        raise SystemExit("bench.step_profile reads TensorFlow's profiler on one device: set base.backend to "
                         "tensorflow and train.replicas to 1")
    setup = set_up(base, train, "cpu")  # as the train stage sets up, in the same order
    keras, features, precision = setup.keras, setup.features, setup.precision
    import tensorflow as tf

    data, init = ROOT / "data" / "processed", args.init
    model = initial_network(keras, init, precision)
    fitted = classifier(keras, model, standardize_table(read_json(data / "scaler.json")))
    warm, n = 32, args.steps * train.batch_size
    pixels = np.load(data / "pixels_train.npy", mmap_mode="r")
    if len(pixels) < warm * train.batch_size + n:
        raise SystemExit(f"{len(pixels)} training images: too few for {args.steps} steps of {train.batch_size}; "
                         "lower --steps")
    y = encode_labels(keras, np.load(data / "y_train.npy"), train.loss)
    compile_model(keras, fitted, train, args.steps * train.batch_size)
    fitted.fit(np.asarray(pixels[:warm * train.batch_size]), y[:warm * train.batch_size],
               batch_size=train.batch_size, epochs=1, verbose=0)
    x_traced, y_traced = np.asarray(pixels[-n:]), y[-n:]
    start = time.perf_counter()  # the same steps untraced: the profiler's own cost is not the step's
    fitted.fit(x_traced, y_traced, batch_size=train.batch_size, epochs=1, verbose=0, shuffle=train.shuffle)
    untraced_ms = (time.perf_counter() - start) * 1e3 / args.steps
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        start = time.perf_counter()
        fitted.fit(x_traced, y_traced, batch_size=train.batch_size, epochs=1, verbose=0, shuffle=train.shuffle)
        wall_ms = (time.perf_counter() - start) * 1e3 / args.steps
        tf.profiler.experimental.stop()
        rows, busy_ms, pipeline_ms = read_trace(logdir, {layer.name for layer in model.layers},
                                                layer_flops(model, train.batch_size), args.steps)

    total_ms = sum(r["ms_per_step"] for r in rows)
    result = {
        "cpu": cpu_model(), "cpu_features": features, "cores": os.cpu_count(),
        "onednn": onednn_enabled("tensorflow"), "tensorflow": tf.__version__,
        "precision": precision, "batch_size": train.batch_size, "steps": args.steps,
        "steps_per_execution": train.steps_per_execution, "step_untraced_ms": round(untraced_ms, 3),
        "step_wall_ms": round(wall_ms, 3), "ops_busy_ms": round(busy_ms, 3), "ops_sum_ms": round(total_ms, 3),
        "input_pipeline_ms": round(pipeline_ms, 3), "no_op_running_ms": round(wall_ms - busy_ms, 3),
        "ops": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['cpu']}, {result['cores']} cores ({', '.join(result['cpu_features'])}); TensorFlow "
          f"{result['tensorflow']}, oneDNN {'on' if result['onednn'] else 'off'}, {precision}, "
          f"batch {train.batch_size}")
    print(f"step: {untraced_ms:.2f} ms untraced, {wall_ms:.2f} ms traced; ops running {busy_ms:.2f} ms "
          f"(op time summed over threads "
          f"{total_ms:.2f} ms); no op running {wall_ms - busy_ms:.2f} ms (dispatch); input pipeline "
          f"{pipeline_ms:.2f} ms on its own threads")
    print("| layer | pass | op | ms/step | share of op time | GFLOP/step | GFLOP/s |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows[:args.top]:
        print(f"| {r['layer']} | {r['pass']} | {r['op']} | {r['ms_per_step']:.2f} | "
              f"{100 * r['ms_per_step'] / total_ms:.0f} % | {r['gflop_per_step'] or ''} | {r['gflops'] or ''} |")
    rest = rows[args.top:]
    if rest:
        print(f"| {len(rest)} other ops | | | {sum(r['ms_per_step'] for r in rest):.2f} | "
              f"{100 * sum(r['ms_per_step'] for r in rest) / total_ms:.0f} % | | |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
