"""fetch: get MNIST and write its four arrays, verified, as .npy files.

    python -m stages.fetch --out data/raw --metrics metrics/data.json --details details/data.json

Sources, first that exists wins:
  1. the Keras-layout mnist.npz named by the environment variable MNIST_NPZ;
  2. the Keras cache, $KERAS_HOME/datasets/mnist.npz (KERAS_HOME defaults to ~/.keras);
  3. a download of fetch.url (checked against fetch.sha256), saved into that cache.
Whatever the source, each array's sha256 must match the published MNIST arrays
before anything is written, so data/raw is byte-identical whichever it came from.
Offline with no local copy, and fetch.allow_sample true, the committed
7,000-image sample is used instead, loudly, and metrics/data.json says so
(full_mnist: false; details/data.json names the source).
This is the only stage that touches the network.
"""

import argparse
import hashlib
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from mnist_cnn import SIDE
from mnist_cnn.errors import UserError
from mnist_cnn.files import atomic_path, npz_headers, write_json, write_manifest
from mnist_cnn.params import PARAMS_FILE, FetchParams, load_params
from mnist_cnn.stage import run

ARRAYS = ("x_train", "y_train", "x_test", "y_test")
# sha256 of array.tobytes() for the published MNIST (60,000 + 10,000 images).
MNIST_SHA256 = {
    "x_train": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "y_train": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "x_test": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "y_test": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}
# The same for data/sample/mnist_sample.npz (made by data/sample/make_sample.py).
SAMPLE_SHA256 = {
    "x_train": "c4e83973c34597385a3c4b94c214213bcb98d57cbe479579172d0801b776839b",
    "y_train": "a3f39cbb5658b8cc3861bcff69934206cc5d2246c46b100ee7a53e8356f94c57",
    "x_test": "bf0a5dd92a823f74c0c51d75fc16b102a64d682eaf980ebb8a0d04995470e7ed",
    "y_test": "f5687b52897b7fff2b9e49a5091adf84fa00322c77d558962f6f5e44c6aa1e04",
}
ROOT = Path(__file__).resolve().parent.parent  # the project
SAMPLE_NPZ = ROOT / "data" / "sample" / "mnist_sample.npz"
HOW_TO_PROVIDE = ("set MNIST_NPZ=/path/to/mnist.npz, put the file at {cache}, "
                  "or run online so fetch can download {url}")


def keras_cache_file(env):
    """Where Keras keeps mnist.npz (keras.datasets.mnist.load_data uses this path)."""
    home = Path(env.get("KERAS_HOME") or Path.home() / ".keras")
    return home / "datasets" / "mnist.npz"


# What a Keras-layout mnist.npz may hold: these four uint8 arrays, at most MNIST's sizes. Checked from
# the zip directory and the .npy headers before any array is read, so a hostile or damaged file is
# refused in bounded memory and time (a few KB read), whatever sizes it declares.
SHAPES = {"x_train": (60_000, SIDE, SIDE), "y_train": (60_000,), "x_test": (10_000, SIDE, SIDE), "y_test": (10_000,)}


def load_npz(path, source):
    """The four arrays of a Keras-layout mnist.npz, or a UserError naming the source.

    The headers are checked first (names, uint8, at most MNIST's shapes, sizes
    that match), so nothing larger than MNIST is ever read.
    """
    headers = npz_headers(path, f"{source}: ")
    missing = [name for name in ARRAYS if name not in headers]
    if missing:
        raise UserError(f"{source}: {path} has no array {missing[0]!r}; "
                        f"expected a Keras mnist.npz with {', '.join(ARRAYS)}")
    extra = sorted(set(headers) - set(ARRAYS))
    if extra:
        raise UserError(f"{source}: {path} has an array {extra[0]!r} besides MNIST's four; "
                        f"expected a Keras mnist.npz with {', '.join(ARRAYS)} only")
    for name in ARRAYS:
        shape, dtype = headers[name]
        most = SHAPES[name]
        if dtype != np.uint8 or len(shape) != len(most) or shape[1:] != most[1:] or shape[0] > most[0]:
            raise UserError(f"{source}: {path}: array {name} is {shape} {dtype}; MNIST's is {most} uint8")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in ARRAYS}
    except (OSError, ValueError, EOFError) as err:
        raise UserError(f"{source}: cannot read {path} as .npz ({err})") from None


def check_arrays(arrays, expected, source):
    """Raise a UserError unless every array's content hash is the expected one."""
    for name in ARRAYS:
        arr = arrays[name]
        if arr.dtype != np.uint8 or hashlib.sha256(arr.tobytes()).hexdigest() != expected[name]:
            raise UserError(f"{source}: array {name} {arr.shape} {arr.dtype} is not the expected "
                            f"MNIST data (sha256 mismatch); the file is corrupt or another data set")


def download(url, dest, sha256, timeout_s):
    """Download `url` to `dest` with a progress bar; the file must hash to `sha256`.

    Network failures raise OSError (the caller may fall back to the sample);
    a wrong hash raises UserError, since a corrupt download must never be used.
    """
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with atomic_path(dest) as tmp:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(tmp, "wb") as out:
            size = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc="download mnist.npz",
                      file=sys.stderr, disable=None) as bar:
                while chunk := resp.read(1 << 16):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != sha256:
            raise UserError(f"download of {url}: file sha256 {digest.hexdigest()} is not the expected "
                            f"{sha256} (fetch.sha256); the download is corrupt, nothing was kept")


def get_arrays(params, env):
    """Return (arrays, source) from the first source that exists; see the docstring."""
    cache = keras_cache_file(env)
    if env.get("MNIST_NPZ"):
        path = Path(env["MNIST_NPZ"])
        if not path.is_file():
            what = ("is a folder" if path.is_dir() else "is not a regular file" if path.exists()
                    else "no such file")
            raise UserError(f"MNIST_NPZ={path}: {what}; point it at a Keras mnist.npz file or unset it")
        source, where = "MNIST_NPZ", path
    elif cache.is_file():
        source, where = "keras_cache", cache
    else:
        try:
            download(str(params.url), cache, params.sha256, params.timeout_s)
            source, where = "download", cache
        except (OSError, urllib.error.URLError) as err:
            how = HOW_TO_PROVIDE.format(cache=cache, url=params.url)
            if not params.allow_sample:
                raise UserError(f"no MNIST source works (download failed: {err}); {how}; "
                                f"or set fetch.allow_sample: true to use the small sample") from None
            print(f"WARNING: download of {params.url} failed ({err}).\n"
                  f"WARNING: USING THE 7,000-IMAGE SAMPLE, NOT THE FULL MNIST: results will not be comparable.\n"
                  f"WARNING: for the full data, {how}; then `dvc repro -f fetch && dvc repro`.",
                  file=sys.stderr)
            arrays = load_npz(SAMPLE_NPZ, "sample")
            check_arrays(arrays, SAMPLE_SHA256, f"sample {SAMPLE_NPZ}")
            return arrays, "sample"
    arrays = load_npz(where, source)  # its messages name the file after the source
    check_arrays(arrays, MNIST_SHA256, f"{source} {where}")
    print(f"source: {source} ({where})")
    return arrays, source


def data_details(arrays, source):
    return {
        "source": source,
        "full_mnist": source != "sample",
        "train_images": int(len(arrays["y_train"])),
        "test_images": int(len(arrays["y_test"])),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the four .npy arrays")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON file: was it the full MNIST?")
    parser.add_argument("--details", type=Path, required=True, help="JSON file naming the source and sizes")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    args = parser.parse_args(argv)
    params = load_params(args.params, fetch=FetchParams)["fetch"]

    arrays, source = get_arrays(params, os.environ)
    with atomic_path(args.out) as tmp:
        tmp.mkdir()
        for name in ARRAYS:
            np.save(tmp / f"{name}.npy", arrays[name])
        write_manifest(tmp, "fetch")
    details = data_details(arrays, source)
    write_json(args.details, details)
    write_json(args.metrics, {"full_mnist": details["full_mnist"]})
    counts = ", ".join(f"{name} {arrays[name].shape}" for name in ARRAYS)
    print(f"wrote {args.out}/ ({counts}), {args.metrics} and {args.details} [data: {source}]")


if __name__ == "__main__":
    run(main)
