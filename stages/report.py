"""report: one Markdown page with what was run, on which data, and how it did.

    python -m stages.report --metrics metrics --plots plots \
        --summary models/init/summary.md --out reports/report.md

Reads the metrics of every device in train.devices, the layer table that
build_init_weights wrote and the params, and sets our figures beside the
seed notebook's published ones.
"""

import argparse
import csv
from pathlib import Path

import numpy as np

from stages.build_init_weights import ModelParams
from stages.common import PARAMS_FILE, BaseParams, UserError, atomic_path, load_params, read_json, run
from stages.preprocess import PreprocessParams
from stages.train import TrainParams

# The seed notebook's published figures: 5 epochs of the same CNN, batch 64, rmsprop.
SEED_FIGURES = {"test_accuracy": 0.990, "fit_time_s": 20.6, "device_name": "NVIDIA GeForce GTX 960"}
PROCEDURES = {
    "published_split": "published 60,000 / 10,000 split; scaler fitted on the training images only",
    "pooled_resplit": "the seed's: all 70,000 pooled, scaler fitted on all, shuffled, re-split 60,000 / 10,000",
}


def confusion_from_csv(path):
    """10 x 10 counts, rows = true digit, columns = predicted, from evaluate's predictions CSV."""
    counts = np.zeros((10, 10), dtype=int)
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                counts[int(row["actual"]), int(row["predicted"])] += 1
    except FileNotFoundError:
        raise UserError(f"{path} not found: run `dvc repro` to make it") from None
    return counts


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render(params, data, model, summary, runs):
    """The report's Markdown. `runs` maps device -> (train metrics, evaluate metrics, confusion)."""
    base, train, arch = params["base"], params["train"], params["model"]
    if data["full_mnist"]:
        data_line = (f"Data: **full MNIST**, {data['train_images']:,} training and {data['test_images']:,} "
                     f"test images (source: {data['source']}).")
    else:
        data_line = (f"> **WARNING: trained on the {data['train_images'] + data['test_images']:,}-image "
                     f"SAMPLE of MNIST, not the full data set** ({data['train_images']:,} training, "
                     f"{data['test_images']:,} test). Figures are not comparable with the seed's. "
                     f"Provide the data (see README) and run `dvc repro -f fetch && dvc repro`.")
    out = ["# MNIST CNN: training report", "", data_line, "",
           "## Data and preprocessing", "",
           f"- procedure: `{params['preprocess'].procedure}`: {PROCEDURES[params['preprocess'].procedure]}",
           "- inputs standardized per pixel (StandardScaler), shaped (N, 28, 28, 1), float32", "",
           "## Model", "", summary.strip(), "",
           f"{model['weights']:,} weights; output activation `{arch.output_activation}`; "
           f"Keras backend `{base.backend}`; seed {base.seed}.", "",
           "## Training settings", "",
           table(["setting", "value"], [
               ["epochs", train.epochs], ["batch size", train.batch_size], ["optimizer", train.optimizer],
               ["learning rate", train.learning_rate], ["momentum", train.momentum], ["loss", train.loss],
               ["shuffle each epoch", train.shuffle], ["devices", ", ".join(train.devices)]]), "",
           "## Fit time per device", "",
           table(["device", "name (as the framework reports it)", "fit time", "per epoch", "images/s",
                  "final train accuracy"],
                 [[d, f"{t['device_name']} ({t['backend']} {t['backend_version']}, Keras {t['keras_version']})",
                   f"{t['fit_time_s']:.1f} s", f"{t['time_per_epoch_s']:.2f} s", f"{t['samples_per_s']:,.0f}",
                   f"{t['final_accuracy']:.4f}"] for d, (t, _, _) in runs.items()])]
    if set(runs) == {"cpu", "gpu"}:
        speedup = runs["cpu"][0]["fit_time_s"] / runs["gpu"][0]["fit_time_s"]
        out += ["", f"The GPU fit was {speedup:.1f}x as fast as the CPU fit."]
    cpu_names = {t["cpu_model"] for t, _, _ in runs.values()}
    out += ["", f"CPU: {', '.join(sorted(cpu_names))}.", "", "## Test metrics", ""]
    for device, (_, ev, conf) in runs.items():
        test = ev["test"]
        out += [f"### {device} model", "",
                f"Test accuracy **{test['accuracy']:.2%}**, loss {test['loss']:.4f}, "
                f"{test['errors']} errors in {test['images']:,} images.", "",
                table(["digit", "precision", "recall"],
                      [[d, f"{c['precision']:.4f}", f"{c['recall']:.4f}"] for d, c in ev["per_class"].items()]),
                "", "Confusion matrix (rows: true digit, columns: predicted):", "",
                table(["true \\ predicted"] + [str(d) for d in range(10)],
                      [[d] + list(conf[d]) for d in range(10)]), ""]
    ours = [[f"ours, {d}", f"{ev['test']['accuracy']:.2%}", f"{t['fit_time_s']:.1f} s", t["device_name"]]
            for d, (t, ev, _) in runs.items()]
    out += ["## Beside the seed notebook", "",
            table(["run", "test accuracy", f"fit time, {train.epochs} epochs", "device"],
                  [["seed (published, 5 epochs)", f"{SEED_FIGURES['test_accuracy']:.1%}",
                    f"{SEED_FIGURES['fit_time_s']} s", SEED_FIGURES["device_name"]]] + ours), ""]
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--metrics", type=Path, required=True, help="folder of the stages' metrics")
    parser.add_argument("--plots", type=Path, required=True, help="folder of evaluate's predictions")
    parser.add_argument("--summary", type=Path, required=True, help="build_init_weights's layer table")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    args = parser.parse_args(argv)
    params = load_params(args.params, base=BaseParams, preprocess=PreprocessParams,
                         model=ModelParams, train=TrainParams)

    runs = {d: (read_json(args.metrics / f"train_{d}.json"), read_json(args.metrics / f"evaluate_{d}.json"),
                confusion_from_csv(args.plots / f"predictions_{d}.csv"))
            for d in params["train"].devices}
    try:
        summary = args.summary.read_text()
    except FileNotFoundError:
        raise UserError(f"{args.summary} not found: run `dvc repro` to make it") from None
    text = render(params, read_json(args.metrics / "data.json"), read_json(args.metrics / "model.json"),
                  summary, runs)
    with atomic_path(args.out) as tmp:
        tmp.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run(main)
