"""The standardization: scikit-learn's StandardScaler, its state and its transform (without importing
scikit-learn), fitted from pixel sums gathered a chunk at a time, and its record (scaler.json), which any tool
applies without unpickling anything."""

import typing
from fractions import Fraction

import numpy as np

from mnist_cnn import IMAGE_SHAPE


class PixelSums:
    """Per pixel: how many images, the sum of their values and of their squares, in exact integers, over
    images added a chunk at a time: one pass, whatever the chunking or the order."""

    def __init__(self):
        self.n, self.sums, self.squares = 0, 0, 0

    def add(self, images):
        flat = images.reshape(len(images), -1).astype(np.int64)  # 255² x 2**40 images before an overflow
        self.n += len(flat)
        self.sums = self.sums + flat.sum(axis=0)
        self.squares = self.squares + (flat * flat).sum(axis=0)


class Scaler(typing.NamedTuple):
    """A fitted StandardScaler's state, by its attribute names, and its transform, without scikit-learn: its
    import alone (scipy's with it) was over half of preprocess's time. transform is StandardScaler.transform's
    arithmetic (subtract the mean, divide by the scale, in float64), which tests/test_preprocess.py checks
    against scikit-learn's to the bit."""

    mean_: np.ndarray
    var_: np.ndarray
    scale_: np.ndarray
    n_samples_seen_: int

    def transform(self, flat):
        return (np.asarray(flat, dtype=np.float64) - self.mean_) / self.scale_


def fit_scaler(sums, kind="per_pixel"):
    """A StandardScaler's state (Scaler) with the mean and (population) variance of the pixels `sums` added up:
    per pixel, or one for all (global: one mean and one deviation over every pixel of every image, given to
    each of the 784 columns, so that everything downstream is the same code).

    From exact integer sums, each divided once: the mean and the variance are the exactly rounded ones, the same
    for any chunking (StandardScaler.fit's floating-point sums differ from them in the last bit, on 717 of
    MNIST's 784 pixels). A pixel that never varies gets scale 1, as StandardScaler gives it.
    """
    n, s, q = sums.n, [int(v) for v in sums.sums], [int(v) for v in sums.squares]
    columns = len(s)
    if kind == "global":
        n, s, q = n * columns, [sum(s)] * columns, [sum(q)] * columns
    mean = np.array([Fraction(each, n) for each in s], dtype=np.float64)
    var = np.array([Fraction(n * square - each * each, n * n) for each, square in zip(s, q, strict=True)],
                   dtype=np.float64)
    return Scaler(mean, var, np.where(var == 0, 1.0, np.sqrt(var)), sums.n)


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
