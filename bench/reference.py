"""The seed notebook's training, as the notebook writes it: the benchmark's reference.

    python -m bench.reference --data data/processed --init models/init --out result.json [--epochs 5]

NumPy arrays straight into model.fit, one-hot labels, rmsprop, batch 64,
categorical cross-entropy, accuracy, 5 epochs; then model.evaluate on the test
set. It starts from the pipeline's own initial weights and processed data, so
the only difference from `train@cpu` is how the training is fed and run.
Writes fit time (wall and CPU), test accuracy and peak memory (RSS) as JSON.
"""

import argparse
import json
import os
import resource
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, as train@cpu

import keras  # noqa: E402  (after the environment above)
import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--init", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args(argv)

    x_train, x_test = np.load(args.data / "x_train.npy"), np.load(args.data / "x_test.npy")
    y_train = keras.utils.to_categorical(np.load(args.data / "y_train.npy"), 10)
    y_test = keras.utils.to_categorical(np.load(args.data / "y_test.npy"), 10)
    model = keras.models.model_from_json((args.init / "model.json").read_text())
    model.load_weights(args.init / "initial.weights.h5")
    model.compile(optimizer="rmsprop", loss="categorical_crossentropy", metrics=["accuracy"])

    start, cpu_start = time.perf_counter(), time.process_time()
    model.fit(x_train, y_train, batch_size=64, epochs=args.epochs, verbose=2)
    fit_s, fit_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    test_loss, test_accuracy = model.evaluate(x_test, y_test, verbose=0)

    result = {"fit_time_s": fit_s, "fit_cpu_s": fit_cpu_s,
              "test_accuracy": float(test_accuracy), "test_loss": float(test_loss),
              "samples_per_s": len(x_train) * args.epochs / fit_s,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"reference: fit {fit_s:.1f} s, test accuracy {test_accuracy:.4f}")


if __name__ == "__main__":
    main()
