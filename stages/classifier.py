"""The classifier that train fits and saves: uint8 pixels (N, 28, 28) in, 10 probabilities out.

    import keras
    classifier = keras.models.load_model("models/cpu/classifier.keras")   # safe_mode, no code of ours
    probabilities = classifier.predict(pixels)                             # (N, 28, 28) uint8, 0..255

The standardization that preprocess fitted sits inside it, in front of the
network, as a lookup table: entry (pixel p, value v) is (v - mean[p]) / scale[p],
computed with the scaler's own float64 arithmetic and rounded to float32 once,
so it gives exactly the numbers preprocess wrote to x_train.npy. It is built
from Keras's own layers (Reshape, Rescaling, Embedding), not a layer class of
ours, so `keras.models.load_model` reads the file in safe mode in any project,
with only Keras installed. Fed uint8 images, fit also holds a quarter of the
memory that float32 images need (47 MB, not 188 MB, for MNIST's training set).
"""

import numpy as np

from stages.common import UserError

LEVELS = 256  # uint8 pixel values


def standardize_table(scaler):
    """(784 * 256,) float32: entry p * 256 + v is pixel p of value v, standardized as preprocess did.

    The same float64 arithmetic as StandardScaler.transform, rounded to float32
    once, so a lookup gives exactly the number preprocess wrote to x_train.npy.
    """
    mean, scale = (np.asarray(scaler[key], dtype=np.float64)[:, None] for key in ("mean", "scale"))
    return ((np.arange(LEVELS, dtype=np.float64) - mean) / scale).astype(np.float32).ravel()


def lookup(table, pixels):
    """Standardize uint8 images (N, 28, 28) with standardize_table's table, in NumPy."""
    flat = pixels.reshape(len(pixels), -1).astype(np.int64) + np.arange(pixels[0].size) * LEVELS
    return table[flat]


def check_pixels(pixels, x, table, n=1000):
    """Refuse pixels_train.npy unless its first `n` images standardize to x_train.npy's, bit for bit."""
    if pixels.dtype != np.uint8 or len(pixels) != len(x) or pixels[0].size != x[0].size:
        raise UserError(f"pixels_train.npy ({pixels.dtype}, {pixels.shape}) does not match x_train.npy "
                        f"{x.shape}: run `dvc repro -f preprocess`")
    if not np.array_equal(lookup(table, pixels[:n]), np.asarray(x[:n]).reshape(min(n, len(x)), -1)):
        raise UserError("pixels_train.npy and scaler.json do not give x_train.npy's values: "
                        "run `dvc repro -f preprocess`")


def standardizer(keras, table, image_shape):
    """uint8 images (N, 28, 28) -> standardized float32 (N, *image_shape), by table lookup.

    Each pixel's value v becomes the index p * 256 + v (a float add, exact below
    2**24), and a frozen Embedding holding the table looks it up. Always float32,
    whatever precision the network computes in.
    """
    L = keras.layers
    n_pixels = int(np.prod(image_shape))
    offsets = (np.arange(n_pixels) * LEVELS).astype(np.float32).tolist()
    model = keras.Sequential([
        keras.Input(shape=image_shape[:-1], dtype="uint8", name="pixels"),
        L.Reshape((n_pixels,), name="flatten_pixels"),
        L.Rescaling(1.0, offset=offsets, dtype="float32", name="table_index"),
        L.Embedding(n_pixels * LEVELS, 1, trainable=False, dtype="float32", name="table"),
        L.Reshape(tuple(image_shape), name="image"),
    ], name="standardize")
    model.get_layer("table").embeddings.assign(table[:, None])  # a weight, saved with the others
    return model


def classifier(keras, network, table):
    """`network` behind the standardizer: what train fits, and what it saves as classifier.keras.

    The standardizer has no weights to learn, so fitting the classifier trains
    `network`'s own weights, exactly as fitting `network` on x_train.npy would.
    """
    pixels = keras.Input(shape=network.input_shape[1:-1], dtype="uint8", name="pixels")
    probabilities = network(standardizer(keras, table, network.input_shape[1:])(pixels))
    return keras.Model(pixels, probabilities, name="mnist_classifier")
