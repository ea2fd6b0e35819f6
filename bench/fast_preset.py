"""The fast preset's time to 99 %: train@cpu's fit, with the test set's accuracy read after every epoch.

    python -m bench.fast_preset --params P --init models/init [--data data/processed] --out result.json

Run it in the project after `dvc repro`; bench.speed runs it once per seed, each seed with its own initial
weights (build_init_weights with that base.seed). It fits as train@cpu does (the same set-up, data, classifier
and `fit`) and, after each epoch, outside the epoch's timed span, computes the test set's accuracy. Time to 99 %
is the sum of the epochs' times up to the end of the first epoch whose test accuracy reaches 99 % (None where
none does: a miss); the first epoch's time includes TensorFlow's tracing, and the process's start-up until the
fit is reported apart. It asserts nothing: timings are not tests.
"""

import time

START = time.perf_counter()

import argparse  # noqa: E402  (the start-up is timed from the first line)
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

TARGET = 0.99


def time_to(target, epochs):
    """Seconds of fit until the end of the first epoch at `target` test accuracy or above, else None."""
    total = 0.0
    for epoch in epochs:
        total += epoch["epoch_s"]
        if epoch["test_accuracy"] >= target:
            return round(total, 3)
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, required=True, help="params.yaml with the preset applied")
    parser.add_argument("--init", type=Path, required=True, help="build_init_weights's folder for its seed")
    parser.add_argument("--data", type=Path, default=Path("data/processed"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from mnist_cnn.model import classifier
    from mnist_cnn.params import BaseParams, TrainParams, load_params
    from mnist_cnn.training import augmented, fit, load_training_data, set_up

    params = load_params(args.params, base=BaseParams, train=TrainParams)
    base, train = params["base"], params["train"]
    setup = set_up(base, train, "cpu")
    keras = setup.keras
    pixels, y, _, table, network = load_training_data(args.data, args.init, setup)
    x_test = np.load(args.data / "x_test.npy")
    y_test = np.load(args.data / "y_test.npy").astype(np.int64)
    epochs = []

    class TestAccuracy(keras.callbacks.Callback):
        """After the epoch's time is taken: the test set's accuracy, and how long reading it took."""

        def on_epoch_end(self, epoch, logs=None):
            start = time.perf_counter()
            predicted = network.predict(x_test, batch_size=1000, verbose=0).argmax(axis=1)
            epochs.append({"epoch": epoch + 1, "epoch_s": round(logs["epoch_time_s"], 3),
                           "test_accuracy": float(np.mean(predicted == y_test)),
                           "evaluate_s": round(time.perf_counter() - start, 3)})

    startup_s = time.perf_counter() - START
    with setup.in_parallel():
        fitted = augmented(keras, classifier(keras, network, table), train.augment, base.seed)
        fit(keras, fitted, pixels, y, train, None, base.seed, after_epoch=[TestAccuracy()])
    result = {"seed": base.seed, "precision": setup.precision, "startup_s": round(startup_s, 3),
              "fit_s": round(sum(e["epoch_s"] for e in epochs), 3), "time_to_99_s": time_to(TARGET, epochs),
              "test_accuracy": epochs[-1]["test_accuracy"], "epochs": epochs}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"seed {base.seed}: " + ", ".join(f"epoch {e['epoch']} {e['epoch_s']:.1f} s {100 * e['test_accuracy']:.2f} %"
                                            for e in epochs)
          + f"; time to 99 %: {result['time_to_99_s'] if result['time_to_99_s'] is not None else 'never'}")


if __name__ == "__main__":
    main()
