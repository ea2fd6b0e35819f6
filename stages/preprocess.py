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

It streams: fetch's arrays are read memory-mapped, CHUNK images at a time,
and each output is written a chunk at a time; the scaler is fitted from exact
integer sums gathered in the same pass. Its memory does not grow with the
data set (bench/scaling.py measures it), only the row orders do (8 bytes an image).

preprocess.procedure chooses how the data are split and scaled:
  published_split  keep the published 60,000 / 10,000 split and fit the scaler
                   on the training images only: the test set never informs
                   training, and the numbers compare with the literature.
  pooled_resplit   the seed notebook's: pool all 70,000, fit the scaler on all
                   of them, shuffle, split 60,000 / 10,000. The test images leak
                   into the scaler, and the test set is a different one.
"""

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np

from mnist_cnn import IMAGE_SHAPE
from mnist_cnn.errors import UserError
from mnist_cnn.files import MANIFEST, NpyWriter, atomic_path, check_files, to_json, write_manifest
from mnist_cnn.params import PARAMS_FILE, BaseParams, PreprocessParams, load_params
from mnist_cnn.scaler import PixelSums, fit_scaler, scaler_record, standardize
from mnist_cnn.stage import run

CHUNK = 8192  # images read, standardized and written at a time: about 80 MB of working memory, whatever the data


def split_rows(n_train, n_test, procedure, seed):
    """(training rows, test rows) of the pooled images (the published training images, then the test ones),
    shuffled with `seed`.

    Test images keep their published order under published_split, so a test
    index still names the same image as in the original files.
    """
    rng = np.random.default_rng(seed)
    if procedure == "published_split":
        return rng.permutation(n_train), np.arange(n_train, n_train + n_test)
    order = rng.permutation(n_train + n_test)
    return order[:n_train], order[n_train:]  # same sizes as the published split


def take(raw, name, rows):
    """The pooled `name` ("x": images, "y": digits) of `rows`, in that order; a memory-mapped file is read
    forward (the rows sorted), so only these rows are read into memory."""
    train, test = raw[f"{name}_train"], raw[f"{name}_test"]
    order = np.argsort(rows, kind="stable")
    ascending = rows[order]
    cut = np.searchsorted(ascending, len(train))
    out = np.empty((len(rows), *train.shape[1:]), train.dtype)
    out[order[:cut]] = train[ascending[:cut]]
    out[order[cut:]] = test[ascending[cut:] - len(train)]
    return out


def chunks(rows, size=CHUNK):
    return (rows[start:start + size] for start in range(0, len(rows), size))


def split(raw, procedure, seed):
    """Return (x_train, y_train, x_test, y_test) as uint8, shuffled with `seed`, in memory."""
    train, test = split_rows(len(raw["y_train"]), len(raw["y_test"]), procedure, seed)
    return take(raw, "x", train), take(raw, "y", train), take(raw, "x", test), take(raw, "y", test)


def write_processed(raw, out, procedure, seed, kind="per_pixel", chunk=CHUNK):
    """Write the processed arrays into the folder `out`, `chunk` images at a time; return the scaler record.

    Two passes over the data: the first writes the shuffled pixels and digits and adds up the pixels the
    scaler is fitted on, the second standardizes what the first wrote. Memory: a chunk and the row orders.
    """
    out = Path(out)
    train, test = split_rows(len(raw["y_train"]), len(raw["y_test"]), procedure, seed)
    side = raw["x_train"].shape[1:]
    sums = PixelSums()
    writers = {name: NpyWriter(out / f"{name}.npy", dtype, (len(rows), *shape)) for name, dtype, rows, shape in (
        ("pixels_train", np.uint8, train, side), ("y_train", np.uint8, train, ()), ("y_test", np.uint8, test, ()),
        ("x_train", np.float32, train, IMAGE_SHAPE), ("x_test", np.float32, test, IMAGE_SHAPE))}
    for rows in chunks(train, chunk):
        images = take(raw, "x", rows)
        writers["pixels_train"].write(images)
        writers["y_train"].write(take(raw, "y", rows))
        sums.add(images)
    for rows in chunks(test, chunk):
        writers["y_test"].write(take(raw, "y", rows))
        if procedure == "pooled_resplit":  # the seed notebook's: the scaler sees the test images too
            sums.add(take(raw, "x", rows))
    for name in ("pixels_train", "y_train", "y_test"):
        writers[name].close()
    scaler = fit_scaler(sums, kind)
    pixels = np.load(out / "pixels_train.npy", mmap_mode="r")
    for start in range(0, len(train), chunk):
        writers["x_train"].write(standardize(np.asarray(pixels[start:start + chunk]), scaler))
    for rows in chunks(test, chunk):
        writers["x_test"].write(standardize(take(raw, "x", rows), scaler))
    writers["x_train"].close()
    writers["x_test"].close()
    return scaler_record(scaler, procedure, kind)


def preprocess(raw, procedure, seed, kind="per_pixel", chunk=CHUNK):
    """Return ({name: array}, scaler record), in memory: write_processed's files, read back (for tests)."""
    with tempfile.TemporaryDirectory() as folder:
        record = write_processed(raw, folder, procedure, seed, kind, chunk)
        arrays = {name: np.load(Path(folder) / f"{name}.npy")
                  for name in ("x_train", "y_train", "pixels_train", "x_test", "y_test")}
    return arrays, record


def load_raw(folder):
    """fetch's arrays, memory-mapped: read a chunk at a time, never whole."""
    names = [f"{name}.npy" for name in ("x_train", "y_train", "x_test", "y_test")]
    if not (Path(folder) / MANIFEST).exists():
        raise UserError(f"{Path(folder) / MANIFEST} not found: run `dvc repro fetch` first")
    check_files(folder, names)
    return {name.removesuffix(".npy"): np.load(Path(folder) / name, mmap_mode="r", allow_pickle=False)
            for name in names}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--raw", type=Path, required=True, help="fetch's folder of .npy arrays")
    parser.add_argument("--out", type=Path, required=True, help="folder for the processed arrays")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    args = parser.parse_args(argv)
    params = load_params(args.params, base=BaseParams, preprocess=PreprocessParams)
    procedure = params["preprocess"].procedure

    raw = load_raw(args.raw)
    with atomic_path(args.out) as tmp:
        tmp.mkdir()
        scaler = write_processed(raw, tmp, procedure, params["base"].seed, params["preprocess"].scaler)
        (tmp / "scaler.json").write_text(to_json(scaler) + "\n")
        write_manifest(tmp, "preprocess")
    n_train, n_test = len(raw["y_train"]), len(raw["y_test"])  # pooled_resplit keeps the published sizes
    print(f"{procedure}: train ({n_train:,} images), test ({n_test:,}), "
          f"scaler fitted on {scaler['n_samples_seen']:,} images, {math.ceil(n_train / CHUNK)} chunks of {CHUNK:,}")
    print(f"wrote {args.out}/ (x_train, y_train, x_test, y_test, pixels_train .npy, scaler.json)")


if __name__ == "__main__":
    run(main)
