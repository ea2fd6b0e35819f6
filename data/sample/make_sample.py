"""Make the small MNIST sample that fetch falls back to when offline.

    python data/sample/make_sample.py PATH/TO/mnist.npz [data/sample/mnist_sample.npz]

Stratified: 600 images of each digit from the training set and 100 of each
from the test set (6,000 + 1,000), drawn with a fixed seed and kept in their
original order, so the sample is real MNIST and the same for everyone. Prints
the arrays' sha256 for stages/fetch.py's SAMPLE_SHA256.
"""

import hashlib
import sys
from pathlib import Path

import numpy as np

PER_CLASS = {"train": 600, "test": 100}
SEED = 0


def stratified_indices(labels, per_class, rng):
    """Indices of `per_class` images of each digit, in ascending order."""
    picks = [rng.choice(np.flatnonzero(labels == digit), per_class, replace=False)
             for digit in range(10)]
    return np.sort(np.concatenate(picks))


def make_sample(full):
    """Return the sample's four arrays from the full data set's four arrays."""
    rng = np.random.default_rng(SEED)
    sample = {}
    for split, per_class in PER_CLASS.items():
        idx = stratified_indices(full[f"y_{split}"], per_class, rng)
        sample[f"x_{split}"] = full[f"x_{split}"][idx]
        sample[f"y_{split}"] = full[f"y_{split}"][idx]
    return sample


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    src = Path(argv[0])
    dst = Path(argv[1]) if len(argv) > 1 else Path(__file__).with_name("mnist_sample.npz")
    with np.load(src, allow_pickle=False) as full:
        sample = make_sample({k: full[k] for k in full.files})
    np.savez_compressed(dst, **sample)
    for name, arr in sample.items():
        print(f'    "{name}": "{hashlib.sha256(arr.tobytes()).hexdigest()}",  # {arr.shape}')
    print(f"wrote {dst} ({dst.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
