import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from mnist_cnn.errors import UserError
from mnist_cnn.backend import import_keras
from mnist_cnn.params import validate
from tests.conftest import ROOT, build_init, tiny_params, write_params
from mnist_cnn.model import build_model, describe, initial_weights
from mnist_cnn.params import (L2Params, ModelParams, check_architecture, count_weights, layer_values, train_flops,
                              values_per_image)


def default_model():
    return validate(yaml.safe_load((ROOT / "params.yaml").read_text())["model"], ModelParams, "model")


def test_the_seed_architecture_has_96844_weights():
    model = default_model()
    assert count_weights(model) == 96_844
    assert describe(model) == "conv32(3x3,pool2) conv64(3x3,pool2) conv64(3x3) dense70 softmax"
    assert check_architecture(model) == 3  # last feature map 3x3 (3*3*64 = 576 into Flatten)


def test_training_flops_per_image_of_the_seed_architecture():
    forward = {  # 2 x multiply-adds, layer by layer: output side^2 x kernel^2 x in x out channels
        "conv1": 2 * 26 ** 2 * 9 * 1 * 32, "conv2": 2 * 11 ** 2 * 9 * 32 * 64, "conv3": 2 * 3 ** 2 * 9 * 64 * 64,
        "dense1": 2 * 576 * 70, "output": 2 * 70 * 10}
    assert train_flops(default_model()) == 3 * sum(forward.values()) == 16_786_536  # the 16.8 M


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("conv, dense", [
    ({"a": {"filters": 8, "kernel_size": 5, "activation": "tanh", "pool_size": None}}, {}),
    ({"a": {"filters": 4, "kernel_size": 3, "activation": "elu", "pool_size": 3},
      "b": {"filters": 6, "kernel_size": 2, "activation": "sigmoid", "pool_size": 2}},
     {"d1": {"units": 12, "activation": "tanh"}, "d2": {"units": 7, "activation": "sigmoid"}}),
])
def test_keras_agrees_with_the_count_from_params(conv, dense, batch_norm):
    model = validate({"conv_blocks": conv, "dense_layers": dense, "output_activation": "sigmoid",
                      "l2": {"conv": 0.01, "dense": 0.0}, "dropout": 0.3, "batch_norm": batch_norm,
                      "limits": default_model().limits.model_dump()},
                     ModelParams, "model")
    keras = import_keras("tensorflow", device="cpu")
    network = build_model(keras, model)
    assert network.count_params() == count_weights(model)
    assert values_per_image(network) == layer_values(model)  # what train and evaluate bound a batch by


def shrinking(kernel, pool):
    return {"conv_blocks": {
        "c1": {"filters": 4, "kernel_size": 5, "activation": "relu", "pool_size": 2},   # 28 -> 24 -> 12
        "c2": {"filters": 4, "kernel_size": 5, "activation": "relu", "pool_size": 2},   # 12 -> 8 -> 4
        "c3": {"filters": 4, "kernel_size": kernel, "activation": "relu", "pool_size": pool}},
        "dense_layers": {}, "output_activation": "softmax", "l2": {"conv": 0.0, "dense": 0.0}, "dropout": 0.0,
        "batch_norm": False, "limits": default_model().limits.model_dump()}


@pytest.mark.parametrize("kernel, pool, key", [(5, None, "c3.kernel_size"), (3, 3, "c3.pool_size")])
def test_feature_maps_below_1x1_are_refused_naming_the_key(kernel, pool, key):
    """When the section is read (the rule is the section's own: report, which reads it too, sees it)."""
    with pytest.raises(UserError, match=rf"model\.conv_blocks\.{key} = \d+: the feature map is only \dx\d"):
        validate(shrinking(kernel, pool), ModelParams, "model")


@pytest.mark.parametrize("change, message", [
    ({"model.output_activation": "relu"}, r"model.output_activation = 'relu': Input should be 'softmax' or"),
    ({"model.dense_layers": {"d": {"units": 10, "activation": "swish"}}}, r"model.dense_layers.d.activation"),
    ({"model.dense_layers": {"d": {"units": 10, "activaton": "relu"}}},
     r"unknown key model.dense_layers.d.activaton; allowed here: units, activation"),
    ({"model.conv_blocks": {"c": {"filters": "32", "kernel_size": 3, "activation": "relu", "pool_size": 2}}},
     r"model.conv_blocks.c.filters = '32': Input should be a valid integer"),
    ({"model.conv_blocks": {"c": {"filters": 0, "kernel_size": 3, "activation": "relu", "pool_size": 2}}},
     r"model.conv_blocks.c.filters = 0: Input should be greater than 0"),
    ({"model.conv_blocks": {"c": {"filters": 8, "kernel_size": 3, "activation": "relu"}}},
     r"missing key model.conv_blocks.c.pool_size"),
    ({"model.conv_blocks": {"output": {"filters": 8, "kernel_size": 3, "activation": "relu", "pool_size": 2}}},
     r"model.conv_blocks.output: layer names must be unique"),
])
def test_bad_model_params_are_one_line_errors(tmp_path, change, message):
    p = write_params(tmp_path / "params.yaml", tiny_params(**change))
    with pytest.raises(UserError, match=message) as err:
        build_init(["--out", str(tmp_path / "init"), "--metrics", str(tmp_path / "m.json"),
                  "--details", str(tmp_path / "d.json"), "--params", str(p)])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "init").exists()


def test_l2_and_dropout_add_penalties_and_layers_but_no_weights():
    keras = import_keras("tensorflow", device="cpu")
    plain = default_model()
    regular = plain.model_copy(update={"l2": L2Params(conv=0.001, dense=0.01), "dropout": 0.25})
    a, b = build_model(keras, plain), build_model(keras, regular)
    assert a.count_params() == b.count_params() == 96_844
    assert [layer.name for layer in b.layers if "dropout" in layer.name] == ["dense1_dropout", "output_dropout"]
    assert len(a.losses) == 0 and len(b.losses) == 5  # one L2 penalty per kernel: 3 conv, 2 dense
    assert b.get_layer("conv1").kernel_regularizer.l2 == pytest.approx(0.001)
    assert b.get_layer("output").kernel_regularizer.l2 == pytest.approx(0.01)


def test_initial_weights_are_glorot_uniform_and_zero_biases():
    w = initial_weights([(3, 3, 1, 32), (32,), (576, 70)], seed=0)
    limit = np.sqrt(6 / (9 * 1 + 9 * 32))
    assert w[0].dtype == np.float32 and np.abs(w[0]).max() <= limit and np.abs(w[0]).max() > 0.9 * limit
    assert not w[1].any()
    assert abs(w[2].std() - np.sqrt(6 / (576 + 70)) / np.sqrt(3)) < 0.002  # std of U(-l, l) is l/sqrt(3)
    again = initial_weights([(3, 3, 1, 32), (32,), (576, 70)], seed=0)
    other = initial_weights([(3, 3, 1, 32), (32,), (576, 70)], seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(w, again, strict=True))
    assert not np.array_equal(w[0], other[0])


def test_main_saves_a_model_that_reloads_with_the_same_weights(tmp_path):
    p = write_params(tmp_path / "params.yaml", tiny_params())
    out = tmp_path / "init"
    build_init(["--out", str(out), "--metrics", str(tmp_path / "m.json"), "--details", str(tmp_path / "d.json"),
              "--params", str(p)])
    keras = import_keras("tensorflow", device="cpu")
    model = keras.models.model_from_json((out / "model.json").read_text())
    model.load_weights(out / "initial.weights.h5")
    expected = initial_weights([tuple(w.shape) for w in model.weights], seed=tiny_params()["base"]["seed"])
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), expected, strict=True))
    layers = json.loads((tmp_path / "d.json").read_text())["layer_table"]  # the data the report renders
    assert [layer["layer"] for layer in layers] == [layer.name for layer in model.layers]
    assert sum(layer["weights"] for layer in layers) == model.count_params()
    summary = (out / "summary.md").read_text()  # the same data, as Markdown
    assert f"| **total** |  |  | **{model.count_params():,}** |" in summary
    assert all(f"| {layer['layer']} | {layer['type']} | {layer['output_shape']} |" in summary for layer in layers)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_the_stage_builds_on_numpys_backend_without_tensorflow_and_writes_tensorflows_bytes(tmp_path, batch_norm):
    """As DVC runs it, the stage builds on Keras's NumPy backend and never imports TensorFlow; its files are the
    ones this process (Keras on TensorFlow) writes, to the byte; the initial weights are NumPy's draws either way."""
    import_keras("tensorflow", device="cpu")
    p = write_params(tmp_path / "params.yaml", tiny_params(**{"model.batch_norm": batch_norm}))
    outputs = {}
    for how in ("stage", "tensorflow"):
        args = ["--out", str(tmp_path / how), "--metrics", str(tmp_path / f"{how}.json"),
                "--details", str(tmp_path / f"{how}.d.json"), "--params", str(p)]
        if how == "tensorflow":
            build_init(args)
        else:
            code = ("import sys; from stages import build_init_weights as b; b.main(sys.argv[1:]); "
                    "import keras; print(keras.backend.backend(), 'tensorflow' in sys.modules)")
            ran = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, check=True, capture_output=True,
                                 text=True, env={**os.environ, "KERAS_BACKEND": "tensorflow"})
            assert ran.stdout.splitlines()[-1] == "numpy False"
        outputs[how] = {f.name: f.read_bytes() for f in sorted((tmp_path / how).iterdir())}
        outputs[how]["details"] = (tmp_path / f"{how}.d.json").read_bytes()
    assert set(outputs["stage"]) == {"model.json", "initial.weights.h5", "summary.md", "manifest.json", "details"}
    assert outputs["stage"] == outputs["tensorflow"]


def test_batch_norm_follows_each_hidden_layer_and_starts_as_the_identity(tmp_path):
    """Conv and hidden dense layers lose their bias and activation to a BatchNormalization and an
    Activation after it; the output layer is as before; the normalization starts with scale 1, shift 0,
    mean 0, variance 1, and the kernels are the very ones of the same model without it."""
    keras = import_keras("tensorflow", device="cpu")
    params = tiny_params(**{"model.batch_norm": True})
    build_init(["--out", str(tmp_path / "bn"), "--metrics", str(tmp_path / "m.json"), "--details",
              str(tmp_path / "d.json"), "--params", str(write_params(tmp_path / "bn.yaml", params))])
    model = keras.models.model_from_json((tmp_path / "bn" / "model.json").read_text())
    model.load_weights(tmp_path / "bn" / "initial.weights.h5")
    names = [layer.name for layer in model.layers]
    assert names == ["conv1", "conv1_pool", "conv1_bn", "conv1_act", "conv2", "conv2_pool", "conv2_bn", "conv2_act",
                     "flatten", "dense1", "dense1_bn", "dense1_act", "output"]
    assert not model.get_layer("conv1").use_bias and model.get_layer("output").use_bias
    assert model.get_layer("conv1").activation.__name__ == "linear"
    bn = model.get_layer("dense1_bn")
    assert [float(np.unique(w.numpy())[0]) for w in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance)] == [
        1.0, 0.0, 0.0, 1.0]
    plain = tmp_path / "plain.yaml"
    build_init(["--out", str(tmp_path / "plain"), "--metrics", str(tmp_path / "m.json"), "--details",
              str(tmp_path / "d.json"), "--params", str(write_params(plain, tiny_params()))])
    seed = keras.models.model_from_json((tmp_path / "plain" / "model.json").read_text())
    seed.load_weights(tmp_path / "plain" / "initial.weights.h5")
    assert np.array_equal(seed.get_layer("conv2").kernel.numpy(), model.get_layer("conv2").kernel.numpy())
    assert "batchnorm" in describe(validate(params["model"], ModelParams, "model"))
