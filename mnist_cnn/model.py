"""The network: built from params, its initial weights, its layer table, and the self-contained classifier
(uint8 pixels in, the standardization inside) that train fits and saves.

    import keras
    classifier = keras.models.load_model("models/cpu/classifier.keras")   # safe_mode, no code of ours
    probabilities = classifier.predict(pixels)                             # (N, 28, 28) uint8, 0..255

The standardization that preprocess fitted sits inside the classifier, in front of the network, as a lookup
table: entry (pixel p, value v) is (v - mean[p]) / scale[p], computed with the scaler's own float64
arithmetic and rounded to float32 once, so it gives exactly the numbers preprocess wrote to x_train.npy. It
is built from Keras's own layers (Reshape, Rescaling, Embedding), not a layer class of ours, so
`keras.models.load_model` reads the file in safe mode in any project, with only Keras installed. Fed uint8
images, fit also holds a quarter of the memory that float32 images need.

The initial weights are drawn with NumPy from base.seed, with Keras's default scheme (Glorot-uniform kernels,
zero biases), rather than by the backend's own random generator: so TensorFlow, JAX and PyTorch start from
identical numbers.
"""

import functools
import json
import math

import numpy as np

from mnist_cnn import IMAGE_SHAPE, N_CLASSES, PIXEL_LEVELS
from mnist_cnn.errors import UserError


def describe(model):
    """A one-line summary for `dvc exp show`, e.g. 'conv32(3x3,pool2) conv64(3x3) dense70 softmax'."""
    parts = [f"conv{b.filters}({b.kernel_size}x{b.kernel_size}{f',pool{b.pool_size}' if b.pool_size else ''})"
             for b in model.conv_blocks.values()]
    parts += [f"dense{d.units}" for d in model.dense_layers.values()] + [model.output_activation]
    extras = [f"l2={model.l2.conv}/{model.l2.dense}"] if model.l2.conv or model.l2.dense else []
    extras += [f"dropout={model.dropout}"] if model.dropout else []
    extras += ["batchnorm"] if model.batch_norm else []
    return " ".join(parts + extras)


def build_model(keras, model):
    """The Keras model the params describe (not yet compiled).

    L2 and dropout at 0 and batch_norm off add nothing, so the seed's model
    stays exactly the seed's. batch_norm: each conv and hidden dense layer
    computes without bias and without activation, then (a conv block with
    pooling) pools, then BatchNormalization (`<name>_bn`), then the
    activation (`<name>_act`). Normalizing after the pooling, as fast CNN
    trainers do (Keller Jordan's airbench), normalizes a quarter of the
    values, and trains markedly faster on a CPU. Max-pooling commutes with ReLU and with a
    normalization whose scale is positive, so it is the same family of models.
    """
    L = keras.layers

    def l2(value):
        return keras.regularizers.L2(value) if value else None

    def normalized(layer, activation, name, pool=None):
        """The layer, then (if any) its pooling; with batch_norm, normalized and activated after the pooling."""
        pooling = [L.MaxPooling2D(pool_size=(pool, pool), name=f"{name}_pool")] if pool else []
        if not model.batch_norm:
            return [layer(activation=activation, use_bias=True), *pooling]
        return [layer(activation=None, use_bias=False), *pooling, L.BatchNormalization(name=f"{name}_bn"),
                L.Activation(activation, name=f"{name}_act")]

    layers = [keras.Input(shape=IMAGE_SHAPE, name="image")]
    for name, block in model.conv_blocks.items():
        k = block.kernel_size
        layers += normalized(functools.partial(L.Conv2D, block.filters, kernel_size=(k, k),
                                               kernel_regularizer=l2(model.l2.conv), name=name),
                             block.activation, name, block.pool_size)
    layers.append(L.Flatten(name="flatten"))
    dense = [(name, layer.units, layer.activation) for name, layer in model.dense_layers.items()]
    for name, units, activation in dense + [("output", N_CLASSES, model.output_activation)]:
        if model.dropout:
            layers.append(L.Dropout(model.dropout, name=f"{name}_dropout"))
        dense_layer = functools.partial(L.Dense, units, kernel_regularizer=l2(model.l2.dense), name=name)
        if name == "output":
            layers.append(dense_layer(activation=activation))
        else:
            layers += normalized(dense_layer, activation, name)
    return keras.Sequential(layers, name="mnist_cnn")


def initial_weights(shapes, seed):
    """Glorot-uniform kernels and zero biases for weights of these shapes, from NumPy.

    The same scheme as Keras's defaults for Conv2D and Dense: a kernel of shape
    (..., fan_in_channels, fan_out_channels) is drawn from U(-l, l) with
    l = sqrt(6 / (fan_in + fan_out)), fans counting the receptive field.
    """
    rng = np.random.default_rng(seed)
    weights = []
    for shape in shapes:
        if len(shape) == 1:
            weights.append(np.zeros(shape, np.float32))
            continue
        receptive = math.prod(shape[:-2])
        limit = math.sqrt(6.0 / (receptive * (shape[-2] + shape[-1])))
        weights.append(rng.uniform(-limit, limit, size=shape).astype(np.float32))
    return weights


def layer_table(model):
    """The network's layers as data, one dict each (name, type, output shape, weights): details/model.json
    records it, summary.md and the report render it."""
    return [{"layer": layer.name, "type": type(layer).__name__,
             "output_shape": "x".join(str(d) for d in layer.output.shape[1:]), "weights": layer.count_params()}
            for layer in model.layers]


def standardize_table(scaler):
    """(784 * 256,) float32: entry p * 256 + v is pixel p of value v, standardized as preprocess did.

    The same float64 arithmetic as StandardScaler.transform, rounded to float32
    once, so a lookup gives exactly the number preprocess wrote to x_train.npy.
    """
    mean, scale = (np.asarray(scaler[key], dtype=np.float64)[:, None] for key in ("mean", "scale"))
    return ((np.arange(PIXEL_LEVELS, dtype=np.float64) - mean) / scale).astype(np.float32).ravel()


def lookup(table, pixels):
    """Standardize uint8 images (N, 28, 28) with standardize_table's table, in NumPy."""
    size = int(np.prod(pixels.shape[1:]))  # not pixels[0].size: there may be no image
    flat = pixels.reshape(len(pixels), size).astype(np.int64) + np.arange(size) * PIXEL_LEVELS
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
    offsets = (np.arange(n_pixels) * PIXEL_LEVELS).astype(np.float32).tolist()
    model = keras.Sequential([
        keras.Input(shape=image_shape[:-1], dtype="uint8", name="pixels"),
        L.Reshape((n_pixels,), name="flatten_pixels"),
        L.Rescaling(1.0, offset=offsets, dtype="float32", name="table_index"),
        L.Embedding(n_pixels * PIXEL_LEVELS, 1, trainable=False, dtype="float32", name="table"),
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


def with_precision(model_json, precision):
    """The architecture with every layer but the input and output computing in `precision`.

    mixed_bfloat16 keeps the weights in float32 and computes in bfloat16: faster on
    CPUs with AVX512-BF16 and on GPUs, less exact. The output layer stays float32 so
    that the softmax and the loss keep their precision.
    """
    if precision == "float32":
        return model_json
    config = json.loads(model_json)
    policy = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": precision}, "registered_name": None}
    for layer in config["config"]["layers"]:
        if layer["class_name"] != "InputLayer" and layer["config"]["name"] != "output":
            layer["config"]["dtype"] = policy
    return json.dumps(config)


def initial_network(keras, init, precision):
    """The network build_init_weights saved in `init`, with its initial weights, computing in `precision`."""
    model = keras.models.model_from_json(with_precision((init / "model.json").read_text(), precision))
    model.load_weights(init / "initial.weights.h5")
    return model


def in_float32(keras, init, network):
    """`network`'s architecture and weights, computing in float32 (a mixed-precision network keeps float32
    weights: nothing is rounded)."""
    float32 = initial_network(keras, init, "float32")
    float32.set_weights(network.get_weights())
    return float32
