"""build_init_weights: build the CNN from params and save it with its initial weights.

    python -m stages.build_init_weights --out models/init --metrics metrics/model.json \
        --details details/model.json

Writes model.json (the architecture, Keras 3 `model.to_json()`),
initial.weights.h5 (Keras 3 weights file) and summary.md (a layer table).
Every training run starts from these same weights, so runs with other
settings or on another device compare fairly, as in the seed notebook.

The weights are drawn with NumPy from base.seed, with Keras's default scheme
(Glorot-uniform kernels, zero biases), rather than by the backend's own random
generator: so TensorFlow, JAX and PyTorch start from identical numbers.
"""

import argparse
import functools
import math
import re
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, NonNegativeFloat, model_validator

from stages.common import (PARAMS_FILE, BaseParams, Strict, UserError, atomic_path, import_keras,
                           load_params, run, write_json, write_manifest)

INPUT_SHAPE = (28, 28, 1)
N_CLASSES = 10
Activation = Literal["relu", "sigmoid", "elu", "tanh"]
LAYER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


Side = Annotated[int, Field(gt=0, le=INPUT_SHAPE[0])]  # a square window on a 28x28 image


class ConvBlock(Strict):
    filters: Annotated[int, Field(gt=0, le=4096)]
    kernel_size: Side  # square kernel, "valid" padding, as in the seed
    activation: Activation
    pool_size: Side | None  # square max pooling after the convolution; null: none


class DenseLayer(Strict):
    units: Annotated[int, Field(gt=0, le=65536)]
    activation: Activation


class L2Params(Strict):
    conv: NonNegativeFloat   # penalty on the convolution kernels
    dense: NonNegativeFloat  # on the dense kernels, output layer included


class ModelParams(Strict):
    conv_blocks: dict[str, ConvBlock]
    dense_layers: dict[str, DenseLayer]
    output_activation: Literal["softmax", "sigmoid"]
    l2: L2Params
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)]  # before each dense layer
    batch_norm: bool  # BatchNormalization after each conv (and its pooling) and hidden dense layer, before activation

    @model_validator(mode="after")
    def _together(self):
        """The architecture's own rules: every stage that reads `model` sees them."""
        check_architecture(self)
        return self


def check_architecture(model):
    """Refuse layer names Keras would reject and feature maps that shrink below 1x1.

    Returns the side of the last feature map, for the summary.
    """
    names = list(model.conv_blocks) + list(model.dense_layers)
    for group, layers in (("conv_blocks", model.conv_blocks), ("dense_layers", model.dense_layers)):
        for name in layers:
            if not LAYER_NAME.match(name) or name in ("flatten", "output") or names.count(name) > 1:
                raise UserError(f"params.yaml: model.{group}.{name}: layer names must be unique, "
                                f"start with a letter, use letters, digits and _, and not be flatten/output")
    if not model.conv_blocks:
        raise UserError("params.yaml: model.conv_blocks is empty; this is a convolutional network, "
                        "give at least one block")
    side = INPUT_SHAPE[0]
    for name, block in model.conv_blocks.items():
        if block.kernel_size > side:
            raise UserError(f"params.yaml: model.conv_blocks.{name}.kernel_size = {block.kernel_size}: "
                            f"the feature map is only {side}x{side} here; use a smaller kernel or fewer blocks")
        side = side - block.kernel_size + 1
        if block.pool_size:
            if block.pool_size > side:
                raise UserError(f"params.yaml: model.conv_blocks.{name}.pool_size = {block.pool_size}: "
                                f"the feature map is only {side}x{side} here; pool less or set it to null")
            side //= block.pool_size
    return side


def weighted_layers(model):
    """(fan_in, units, positions) of each layer with weights, in order, from the params alone.

    A conv block: fan_in = kernel^2 x input channels, units = filters, positions
    = the output map's side^2; a dense layer: positions = 1. Pooling and Flatten
    only reshape, so they appear in the sides and widths, not as layers.
    """
    side, channels, shapes = INPUT_SHAPE[0], INPUT_SHAPE[2], []
    for block in model.conv_blocks.values():
        side = side - block.kernel_size + 1
        shapes.append((block.kernel_size ** 2 * channels, block.filters, side * side))
        channels = block.filters
        side = side // block.pool_size if block.pool_size else side
    width = side * side * channels
    for units in [layer.units for layer in model.dense_layers.values()] + [N_CLASSES]:
        shapes.append((width, units, 1))
        width = units
    return shapes


def count_weights(model):
    """The number of weights Keras holds, computed from the params alone (a check on Keras).

    With batch_norm, each conv and hidden dense layer has no bias (the
    normalization's shift replaces it) and its normalization 4 per unit: a
    scale and a shift that train, a mean and a variance that track the batches.
    """
    layers = weighted_layers(model)
    if not model.batch_norm:
        return sum((fan_in + 1) * units for fan_in, units, _ in layers)
    *hidden, (fan_in, units, _) = layers
    return sum((f + 4) * u for f, u, _ in hidden) + (fan_in + 1) * units


def train_flops(model):
    """Floating-point operations to train on one image, from the params alone: 3x the forward pass.

    Forward: 2 per multiply-add of the convolutions and dense layers (biases,
    activations and pooling are left out: under 1 %). The backward pass costs
    about twice the forward (gradients for the inputs and for the weights),
    the usual convention; the seed's CNN: 3 x 5.6 M = 16.8 MFLOP.
    """
    return 3 * sum(2 * fan_in * units * positions for fan_in, units, positions in weighted_layers(model))


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
    values: on 2 CPU cores the seed's layers with batch_norm train at 27 s
    per epoch, not 41 s. Max-pooling commutes with ReLU and with a
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

    layers = [keras.Input(shape=INPUT_SHAPE, name="image")]
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


def summary_table(model):
    """A Markdown table of the layers: name, type, output shape, weights."""
    rows = ["| layer | type | output shape | weights |", "|---|---|---|---:|"]
    for layer in model.layers:
        shape = "x".join(str(d) for d in layer.output.shape[1:])
        rows.append(f"| {layer.name} | {type(layer).__name__} | {shape} | {layer.count_params():,} |")
    rows.append(f"| **total** | | | **{model.count_params():,}** |")
    return "\n".join(rows) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for model.json and initial weights")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON file of the weight count")
    parser.add_argument("--details", type=Path, required=True,
                        help="JSON file of the weight count, layers, architecture and training FLOPs")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    args = parser.parse_args(argv)
    params = load_params(args.params, base=BaseParams, model=ModelParams)
    arch, base = params["model"], params["base"]
    check_architecture(arch)

    keras = import_keras(base.backend, device="cpu")
    model = build_model(keras, arch)
    model.set_weights(initial_weights([tuple(w.shape) for w in model.weights], base.seed))
    for layer in model.layers:  # batch normalization starts as the identity: scale 1, variance 1
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.gamma.assign(np.ones(layer.gamma.shape, np.float32))
            layer.moving_variance.assign(np.ones(layer.moving_variance.shape, np.float32))
    n_weights = model.count_params()
    if n_weights != count_weights(arch):  # an oracle for build_model
        raise RuntimeError(f"Keras counts {n_weights} weights, the params say {count_weights(arch)}")

    with atomic_path(args.out) as tmp:
        tmp.mkdir()
        (tmp / "model.json").write_text(model.to_json(indent=2) + "\n")
        model.save_weights(tmp / "initial.weights.h5")
        (tmp / "summary.md").write_text(summary_table(model))
        write_manifest(tmp, "build_init_weights")
    write_json(args.details, {"weights": n_weights, "layers": len(model.layers), "architecture": describe(arch),
                              "train_flops_per_image": train_flops(arch)})
    write_json(args.metrics, {"weights": n_weights})
    print(summary_table(model), end="")
    print(f"wrote {args.out}/ (model.json, initial.weights.h5, summary.md), {args.metrics} and {args.details}: "
          f"{n_weights:,} weights")


if __name__ == "__main__":
    run(main)
