"""What a run recorded, gathered once for the report: the params, the data, the network's layers, and per
device the training details, the test metrics, the confusion matrix, the curves and the picture of mistakes;
where and with what it ran. pages.py renders these facts as Markdown and as HTML.
"""

import csv
import platform
import subprocess
import typing
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from mnist_cnn import N_CLASSES
from mnist_cnn.errors import Damaged, UserError
from mnist_cnn.files import read_json


# The seed notebook's published figures: 5 epochs of the same CNN, batch 64, rmsprop.
SEED_FIGURES = {"test_accuracy": 0.990, "fit_time_s": 20.6, "device_name": "NVIDIA GeForce GTX 960"}


PROCEDURES = {
    "published_split": "published 60,000 / 10,000 split; scaler fitted on the training images only",
    "pooled_resplit": "the seed's: all 70,000 pooled, scaler fitted on all, shuffled, re-split 60,000 / 10,000",
}


def confusion_from_csv(path, stage="evaluate@cpu"):
    """10 x 10 counts, rows = true digit, columns = predicted, from evaluate's predictions CSV."""
    counts = np.zeros((N_CLASSES, N_CLASSES), dtype=int)
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                counts[int(row["actual"]), int(row["predicted"])] += 1
    except FileNotFoundError:
        raise UserError(f"{path} not found: run `dvc repro` to make it") from None
    except (KeyError, ValueError, IndexError, TypeError, UnicodeDecodeError) as err:
        raise Damaged(f"{path} is damaged ({type(err).__name__}: {err}); run `dvc repro --single-item -f {stage}` "
                        f"to write it again") from None
    return counts


def read_curves(live_dir, stage="train@cpu"):
    """DVCLive's per-epoch TSVs: {"train/loss": [values by epoch], "eval/loss": [...], ...}."""
    curves = {}
    for tsv in sorted((Path(live_dir) / "plots" / "metrics").glob("*/*.tsv")):
        try:
            with open(tsv, newline="") as f:
                curves[f"{tsv.parent.name}/{tsv.stem}"] = [float(r[tsv.stem])
                                                           for r in csv.DictReader(f, delimiter="\t")]
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as err:
            raise Damaged(f"{tsv} is damaged ({type(err).__name__}: {err}); run `dvc repro --single-item -f {stage}` "
                            f"to write it again") from None
    if not curves:
        raise UserError(f"no per-epoch log in {live_dir}: run `dvc repro` to make it")
    return curves


# what makes the results (the results themselves are always new here)
CODE = ["stages", "mnist_cnn", "dvc.yaml", "params.yaml"]


def code_version():
    """The git commit of the code and params the report was made from ('+ changes' when they differ from it)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *CODE], capture_output=True,
                               text=True, check=True).stdout.strip()
        return commit + (" + uncommitted changes to the code or params" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def versions(runs):
    names = ["numpy", "scikit-learn", "dvc", "dvclive", "matplotlib"]
    found = {"python": platform.python_version()}
    for t, *_ in runs.values():
        found["keras"] = t["keras_version"]
        found[t["backend"]] = t["backend_version"]
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


class Run(typing.NamedTuple):
    """What one device's train and evaluate stages recorded."""

    train: dict         # details/train_<device>.json
    evaluate: dict      # details/evaluate_<device>.json
    confusion: np.ndarray  # counts, rows = true digit, columns = predicted
    curves: dict        # {"train/loss": [by epoch], "eval/loss": [...], ...}
    mistakes_png: bytes


@dataclass(frozen=True)
class Facts:
    params: dict        # the checked params sections: base, preprocess, model, train
    data: dict          # details/data.json
    model: dict         # details/model.json, with its layer_table
    runs: dict          # device -> Run, in train.devices' order
    provenance: list    # [[what, value]]: the data, the code's commit, the devices, the libraries


def gather(params, details, plots, live):
    """Read everything the report shows from the stages' folders, once; a UserError names what is missing."""
    try:
        runs = {device: Run(read_json(details / f"train_{device}.json"), read_json(details / f"evaluate_{device}.json"),
                            confusion_from_csv(plots / f"predictions_{device}.csv", f"evaluate@{device}"),
                            read_curves(live / f"train_{device}", f"train@{device}"),
                            (plots / f"mistakes_{device}.png").read_bytes())
                for device in params["train"].devices}
    except FileNotFoundError as err:
        raise UserError(f"{err.filename} not found: run `dvc repro` to make it") from None
    data, model = read_json(details / "data.json"), read_json(details / "model.json")
    if "layer_table" not in model:
        raise UserError(f"{details / 'model.json'} has no layer_table (an older build_init_weights wrote it): "
                        f"run `dvc repro`")
    provenance = [["data", f"{data['source']} ({'full MNIST' if data['full_mnist'] else 'SAMPLE'})"],
                  ["code version", code_version()],
                  ["devices", "; ".join(f"{device}: {run.train['device_name']} ({run.train['cpu_model']})"
                                        for device, run in runs.items())],
                  ["libraries", ", ".join(f"{name} {version}" for name, version in versions(runs).items())]]
    return Facts(params, data, model, runs, provenance)
