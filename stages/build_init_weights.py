"""build_init_weights: build the CNN from params and save it with its initial weights.

    python -m stages.build_init_weights --out models/init --metrics metrics/model.json \
        --details details/model.json

Writes model.json (the architecture, Keras 3 `model.to_json()`),
initial.weights.h5 (Keras 3 weights file) and summary.md (the layer table).
Every training run starts from these same weights, so runs with other
settings or on another device compare fairly, as in the seed notebook.
The weights are drawn with NumPy from base.seed (mnist_cnn.model.initial_weights),
so TensorFlow, JAX and PyTorch start from identical numbers; Keras builds and saves
the model on its NumPy backend (backend.keras_to_build: no TensorFlow start-up,
the same files to the byte), so base.backend does not concern this stage. --details records
the weight count, the layer table, a one-line description and the training
FLOPs per image; --metrics the weight count.
"""

import argparse
from pathlib import Path

import numpy as np

from mnist_cnn.backend import keras_to_build
from mnist_cnn.files import atomic_path, write_json, write_manifest
from mnist_cnn.model import build_model, describe, initial_weights, layer_table
from mnist_cnn.params import PARAMS_FILE, BaseParams, ModelParams, count_weights, load_params, train_flops
from mnist_cnn.stage import run
from mnist_cnn.tables import LAYER_COLUMNS, layer_rows, markdown_table


def with_initial_weights(keras, model, seed):
    """`model` holding the shared initial weights: NumPy's draws from `seed`, batch normalization the identity."""
    model.set_weights(initial_weights([tuple(w.shape) for w in model.weights], seed))
    for layer in model.layers:  # batch normalization starts as the identity: scale 1, variance 1
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.gamma.assign(np.ones(layer.gamma.shape, np.float32))
            layer.moving_variance.assign(np.ones(layer.moving_variance.shape, np.float32))
    return model


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

    with keras_to_build() as keras:
        model = with_initial_weights(keras, build_model(keras, arch), base.seed)
        n_weights = model.count_params()
        if n_weights != count_weights(arch):  # an oracle for build_model
            raise RuntimeError(f"Keras counts {n_weights} weights, the params say {count_weights(arch)}")
        layers = layer_table(model)
        summary = markdown_table(LAYER_COLUMNS, layer_rows(layers, bold_total=True)) + "\n"
        with atomic_path(args.out) as tmp:
            tmp.mkdir()
            (tmp / "model.json").write_text(model.to_json(indent=2) + "\n")
            model.save_weights(tmp / "initial.weights.h5")
            (tmp / "summary.md").write_text(summary)
            write_manifest(tmp, "build_init_weights")
    write_json(args.details, {"weights": n_weights, "layers": len(model.layers), "architecture": describe(arch),
                              "train_flops_per_image": train_flops(arch), "layer_table": layers})
    write_json(args.metrics, {"weights": n_weights})
    print(summary, end="")
    print(f"wrote {args.out}/ (model.json, initial.weights.h5, summary.md), {args.metrics} and {args.details}: "
          f"{n_weights:,} weights")


if __name__ == "__main__":
    run(main)
