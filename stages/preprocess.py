"""preprocess: standardize, shuffle and shape MNIST for the network.

    python -m stages.preprocess --raw data/raw --out data/processed

Writes x_train.npy / x_test.npy (float32, N x 28 x 28 x 1), y_train.npy /
y_test.npy (uint8 digits; one-hot, where a loss needs it, happens in training),
pixels_train.npy (the training images before standardization, uint8, in the
same shuffled order: a quarter of x_train.npy's memory, what train reads and
standardizes on the fly, bit for bit as here) and scaler.json: the fitted
StandardScaler as plain numbers, so any tool can apply the same
standardization without unpickling anything:
    x_std = (x.reshape(-1, 784) - mean) / scale

preprocess.procedure chooses how the data are split and scaled:
  published_split  keep the published 60,000 / 10,000 split and fit the scaler
                   on the training images only: the test set never informs
                   training, and the numbers compare with the literature.
  pooled_resplit   the seed notebook's: pool all 70,000, fit the scaler on all
                   of them, shuffle, split 60,000 / 10,000. The test images leak
                   into the scaler, and the test set is a different one.
"""

import argparse
from pathlib import Path

import numpy as np

from mnist_cnn import IMAGE_SHAPE
from mnist_cnn.errors import UserError
from mnist_cnn.files import MANIFEST, atomic_path, check_files, to_json, write_manifest
from mnist_cnn.params import PARAMS_FILE, BaseParams, PreprocessParams, load_params
from mnist_cnn.stage import run


def split(raw, procedure, seed):
    """Return (x_train, y_train, x_test, y_test) as uint8, shuffled with `seed`.

    Test images keep their published order under published_split, so a test
    index still names the same image as in the original files.
    """
    rng = np.random.default_rng(seed)
    if procedure == "published_split":
        order = rng.permutation(len(raw["y_train"]))
        return raw["x_train"][order], raw["y_train"][order], raw["x_test"], raw["y_test"]
    x = np.concatenate([raw["x_train"], raw["x_test"]])
    y = np.concatenate([raw["y_train"], raw["y_test"]])
    order = rng.permutation(len(y))
    n_train = len(raw["y_train"])  # same sizes as the published split
    return x[order[:n_train]], y[order[:n_train]], x[order[n_train:]], y[order[n_train:]]


def fit_scaler(images, kind="per_pixel"):
    """A StandardScaler of the 784 pixels fitted on (N, 28, 28) uint8 images: per pixel, or one for all.

    global: one mean and one deviation over every pixel of every image, given
    to each of the 784 columns, so that everything downstream (the table
    inside the classifier, scaler.json's formula) is the same code.
    """
    # imported here, not at the top: a test imports every stage and fails if scikit-learn (a second) comes with it
    from sklearn.preprocessing import StandardScaler
    flat = images.reshape(len(images), -1).astype(np.float64)
    if kind == "per_pixel":
        return StandardScaler().fit(flat)
    one = StandardScaler().fit(flat.reshape(-1, 1))
    scaler = StandardScaler()
    scaler.mean_, scaler.var_, scaler.scale_ = (np.full(flat.shape[1], a[0]) for a in (one.mean_, one.var_,
                                                                                      one.scale_))
    scaler.n_features_in_, scaler.n_samples_seen_ = flat.shape[1], len(flat)
    return scaler


def standardize(images, scaler):
    """(N, 28, 28) uint8 -> (N, 28, 28, 1) float32, standardized per pixel."""
    flat = scaler.transform(images.reshape(len(images), -1).astype(np.float64))
    return flat.astype(np.float32).reshape(len(images), *IMAGE_SHAPE)


def scaler_record(scaler, procedure, kind="per_pixel"):
    """The fitted scaler as JSON-ready plain data."""
    return {
        "procedure": procedure,
        "scaler": kind,
        "n_samples_seen": int(scaler.n_samples_seen_),
        "formula": "x_std = (x.reshape(-1, 784) - mean) / scale, x in 0..255",
        "mean": scaler.mean_.tolist(),
        "scale": scaler.scale_.tolist(),
    }


def preprocess(raw, procedure, seed, kind="per_pixel"):
    """Return ({name: array} to save, scaler record)."""
    x_train, y_train, x_test, y_test = split(raw, procedure, seed)
    fit_on = x_train if procedure == "published_split" else np.concatenate([x_train, x_test])
    scaler = fit_scaler(fit_on, kind)
    arrays = {
        "x_train": standardize(x_train, scaler), "y_train": y_train, "pixels_train": x_train,
        "x_test": standardize(x_test, scaler), "y_test": y_test,
    }
    return arrays, scaler_record(scaler, procedure, kind)


def load_raw(folder):
    names = [f"{name}.npy" for name in ("x_train", "y_train", "x_test", "y_test")]
    if not (Path(folder) / MANIFEST).exists():
        raise UserError(f"{Path(folder) / MANIFEST} not found: run `dvc repro fetch` first")
    check_files(folder, names)
    return {name.removesuffix(".npy"): np.load(Path(folder) / name, allow_pickle=False) for name in names}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--raw", type=Path, required=True, help="fetch's folder of .npy arrays")
    parser.add_argument("--out", type=Path, required=True, help="folder for the processed arrays")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    args = parser.parse_args(argv)
    params = load_params(args.params, base=BaseParams, preprocess=PreprocessParams)
    procedure = params["preprocess"].procedure

    arrays, scaler = preprocess(load_raw(args.raw), procedure, params["base"].seed, params["preprocess"].scaler)
    with atomic_path(args.out) as tmp:
        tmp.mkdir()
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", arr)
        (tmp / "scaler.json").write_text(to_json(scaler) + "\n")
        write_manifest(tmp, "preprocess")
    print(f"{procedure}: train {arrays['x_train'].shape}, test {arrays['x_test'].shape}, "
          f"scaler fitted on {scaler['n_samples_seen']} images")
    print(f"wrote {args.out}/ (x_train, y_train, x_test, y_test, pixels_train .npy, scaler.json)")


if __name__ == "__main__":
    run(main)
