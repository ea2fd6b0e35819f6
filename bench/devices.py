"""CPU against GPU, the seed's question: train@<device> at the seed's settings and the fast preset.

    MNIST_NPZ=/path/to/mnist.npz python -m bench.devices --device gpu --backend jax [--out bench/results/gpu_jax.json]
    MNIST_NPZ=/path/to/mnist.npz python -m bench.devices --device cpu --backend tensorflow

In a temporary copy of the project, on the full MNIST (it refuses the sample),
it runs the pipeline's own stages with `python -m` (no DVC needed: a GPU host
may have only a framework with CUDA): fetch, preprocess, build_init_weights,
then for the seed's settings (params.yaml) and the fast preset
(params-fast.yaml) the train and evaluate stages on --device with
base.backend = --backend. The initial weights are checked to be the same
numbers as --init's (the committed run's), whatever the backend. For each
setting it then times the same fit again with the test set evaluated after
every epoch (that time left out) for the time to 99 % test accuracy.
Prints a table and writes JSON. Not a test: it measures.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from bench.speed import copy_project, set_params
from mnist_cnn.backend import cpu_model

ROOT = Path(__file__).resolve().parent.parent
COPY = ["stages", "mnist_cnn", "tools", "bench", "data/sample", "params.yaml", "params-fast.yaml"]
SETTINGS = ("seed", "fast")


def sh(args, cwd, log):
    """Run a command, its output appended to `log` and echoed; fail loudly with the log's path."""
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(map(str, args))}\n")
        out.flush()
        proc = subprocess.run(list(map(str, args)), cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"bench: `{' '.join(map(str, args))}` failed (exit {proc.returncode}); see {log}:\n"
                 + "".join(Path(log).read_text().splitlines(keepends=True)[-15:]))


def params_for(work, setting, backend, device):
    """params.yaml with the backend, the device and, for the fast preset, its overrides."""
    overrides = {"base.backend": backend, "train.devices": [device]}
    if backend == "torch":
        overrides["train.steps_per_execution"] = 1  # Keras on torch runs one step per call
    if setting == "fast":
        overrides |= yaml.safe_load((work / "params-fast.yaml").read_text())
    path = work / f"params-{setting}.yaml"
    shutil.copy(work / "params.yaml", path)
    set_params(path, overrides)
    return path


def weight_arrays(path):
    """The arrays of a Keras .weights.h5 file, in file order."""
    import h5py
    arrays = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.append((name, obj[()])) if isinstance(obj, h5py.Dataset) else None)
    return arrays


def same_weights(a, b):
    wa, wb = weight_arrays(a), weight_arrays(b)
    return len(wa) == len(wb) and all(na == nb and np.array_equal(xa, xb)
                                      for (na, xa), (nb, xb) in zip(wa, wb, strict=True))


def epochwise(params_path, device, data, raw, out):
    """The train stage's fit, with the test set evaluated after each epoch (untimed); per-epoch rows to `out`."""
    from mnist_cnn.files import read_json
    from mnist_cnn.model import classifier, initial_network, standardize_table
    from mnist_cnn.params import BaseParams, TrainParams, check_train, load_params
    from mnist_cnn.training import compile_model, encode_labels, set_up

    params = load_params(params_path, base=BaseParams, train=TrainParams)
    base, train = params["base"], params["train"]
    check_train(train, base.backend)
    setup = set_up(base, train, device)  # as the train stage sets up, in the same order
    keras = setup.keras
    pixels, y = np.load(data / "pixels_train.npy"), np.load(data / "y_train.npy")
    x_test, y_test = np.load(raw / "x_test.npy"), np.load(raw / "y_test.npy")
    with setup.in_parallel():
        model = initial_network(keras, Path("models/init"), setup.precision)
        fitted = classifier(keras, model, standardize_table(read_json(data / "scaler.json")))
        compile_model(keras, fitted, train, len(pixels))
    rows = []

    class Clock(keras.callbacks.Callback):
        """Fit time so far, less the time the per-epoch test evaluation took."""

        def on_train_begin(self, logs=None):
            self.start, self.excluded = time.perf_counter(), 0.0

        def on_test_begin(self, logs=None):
            self.test_start = time.perf_counter()

        def on_test_end(self, logs=None):
            self.excluded += time.perf_counter() - self.test_start

        def on_epoch_end(self, epoch, logs=None):
            rows.append({"epoch": epoch + 1, "fit_s": time.perf_counter() - self.start - self.excluded,
                         "test_accuracy": float(logs["val_accuracy"])})

    fitted.fit(pixels, encode_labels(keras, y, train.loss), batch_size=train.batch_size, epochs=train.epochs,
               shuffle=train.shuffle, verbose=2, callbacks=[Clock()], validation_batch_size=1000,
               validation_data=(x_test, encode_labels(keras, y_test, train.loss)))
    Path(out).write_text(json.dumps(rows, indent=2) + "\n")


def time_to(rows, accuracy):
    return next((row["fit_s"] for row in rows if row["test_accuracy"] >= accuracy), None)


def run_setting(work, setting, backend, device, log):
    params = params_for(work, setting, backend, device)
    out = work / "runs" / setting
    python = sys.executable
    sh([python, "-m", "stages.train", "--device", device, "--data", "data/processed", "--init", "models/init",
        "--out", out / "model", "--metrics", out / "train_metrics.json", "--details", out / "train.json",
        "--live", out / "live", "--params", params], work, log)
    sh([python, "-m", "stages.evaluate", "--device", device, "--data", "data/processed", "--model", out / "model",
        "--metrics", out / "evaluate.json", "--details", out / "evaluate_details.json",
        "--predictions", out / "p.csv", "--mistakes", out / "m.png", "--params", params], work, log)
    sh([python, "-m", "bench.devices", "--epochwise", params, "--device", device, "--out", out / "epochs.json"],
       work, log)
    train = json.loads((out / "train.json").read_text())
    test = json.loads((out / "evaluate.json").read_text())["test"]
    rows = json.loads((out / "epochs.json").read_text())
    return {"device_name": train["device_name"], "placement": train["placement"],
            "backend_version": train["backend_version"], "epochs": train["epochs"],
            "fit_time_s": train["fit_time_s"], "first_epoch_s": train["first_epoch_s"],
            "samples_per_s": train["samples_per_s"], "final_loss": train["final_loss"],
            "test_accuracy": test["accuracy"], "test_loss": test["loss"],
            "time_to_99_s": time_to(rows, 0.99), "per_epoch": rows}


def table(result):
    rows = [("setting", "device", "backend", "fit s", "first epoch s", "test acc %", "time to 99 % (s)",
             "test acc per epoch %")]
    for setting in SETTINGS:
        r = result[setting]
        rows.append((setting, r["device_name"], f"{result['backend']} {r['backend_version']}",
                     f"{r['fit_time_s']:.1f}", f"{r['first_epoch_s']:.1f}", f"{100 * r['test_accuracy']:.2f}",
                     "not reached" if r["time_to_99_s"] is None else f"{r['time_to_99_s']:.1f}",
                     " ".join(f"{100 * e['test_accuracy']:.2f}" for e in r["per_epoch"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="gpu")
    parser.add_argument("--backend", choices=["tensorflow", "jax", "torch"], default="jax")
    parser.add_argument("--init", type=Path, default=ROOT / "models" / "init",
                        help="the committed run's initial weights, to check against (default: models/init)")
    parser.add_argument("--out", type=Path, help="JSON file (default: bench/<device>_<backend>.json)")
    parser.add_argument("--epochwise", type=Path, help=argparse.SUPPRESS)  # the child run: a params file
    args = parser.parse_args(argv)
    if args.epochwise:
        return epochwise(args.epochwise, args.device, Path("data/processed"), Path("data/raw"), args.out)
    out = args.out or ROOT / "bench" / "results" / f"{args.device}_{args.backend}.json"
    reference = args.init / "initial.weights.h5"
    if not reference.exists():
        sys.exit(f"bench: {reference} not found: run `dvc repro` (or `dvc pull`) first, or give --init")

    work = Path(tempfile.mkdtemp(prefix="mnist-devices-"))
    log = work / "bench.log"
    print(f"bench: working in {work} (log: {log})", flush=True)
    copy_project(work, COPY)
    python = sys.executable
    seed_params = params_for(work, "seed", args.backend, args.device)
    sh([python, "-m", "stages.fetch", "--out", "data/raw", "--metrics", "metrics/data.json",
        "--details", "details/data.json", "--params", seed_params], work, log)
    if not json.loads((work / "metrics" / "data.json").read_text())["full_mnist"]:
        sys.exit("bench: fetch fell back to the sample; give it the full MNIST (MNIST_NPZ=/path/to/mnist.npz)")
    sh([python, "-m", "stages.preprocess", "--raw", "data/raw", "--out", "data/processed",
        "--params", seed_params], work, log)
    sh([python, "-m", "stages.build_init_weights", "--out", "models/init", "--metrics", "metrics/model.json",
        "--details", "details/model.json", "--params", seed_params], work, log)
    if not same_weights(work / "models" / "init" / "initial.weights.h5", reference):
        sys.exit(f"bench: the initial weights built with {args.backend} differ from {reference}")
    result = {"device": args.device, "backend": args.backend, "host_cpu": cpu_model(), "cores": os.cpu_count(),
              "python": platform.python_version(), "initial_weights_match": str(reference)}
    for setting in SETTINGS:
        print(f"bench: {setting} settings: train, evaluate, then the epoch-by-epoch run ...", flush=True)
        start = time.perf_counter()
        result[setting] = run_setting(work, setting, args.backend, args.device, log)
        print(f"bench: {setting} done in {time.perf_counter() - start:.0f} s", flush=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
