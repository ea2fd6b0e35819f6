"""Training on small real data: settings, determinism, and the GPU rule."""

import json

import numpy as np
import pytest

from stages import build_init_weights, preprocess, train
from stages.common import UserError, import_keras, validate
from tests.conftest import tiny_params, write_params


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Processed sample data (first 1,000 images) and tiny initial weights in a temp folder."""
    from tests.conftest import SAMPLE
    tmp = tmp_path_factory.mktemp("train")
    with np.load(SAMPLE) as npz:
        raw = {name: npz[name][:1000] for name in npz.files}
    arrays, _ = preprocess.preprocess(raw, "published_split", seed=0)
    (tmp / "data").mkdir()
    for name, arr in arrays.items():
        np.save(tmp / "data" / f"{name}.npy", arr)
    p = write_params(tmp / "params.yaml", tiny_params())
    build_init_weights.main(["--out", str(tmp / "init"), "--metrics", str(tmp / "model.json"), "--params", str(p)])
    return tmp


def run_train(prepared, tmp_path, device="cpu", **overrides):
    tmp_path.mkdir(exist_ok=True)
    p = write_params(tmp_path / "params.yaml", tiny_params(**overrides))
    out = tmp_path / device
    train.main(["--device", device, "--data", str(prepared / "data"), "--init", str(prepared / "init"),
                "--out", str(out), "--metrics", str(tmp_path / "m.json"), "--live", str(tmp_path / "live"),
                "--params", str(p)])
    return out, json.loads((tmp_path / "m.json").read_text())


def test_training_is_reproducible_and_records_what_ran(prepared, tmp_path):
    out_a, m_a = run_train(prepared, tmp_path / "a", **{"train.epochs": 2})
    out_b, m_b = run_train(prepared, tmp_path / "b", **{"train.epochs": 2})
    keras = import_keras("tensorflow", device="cpu")
    w_a = keras.models.load_model(out_a / "model.keras").get_weights()
    w_b = keras.models.load_model(out_b / "model.keras").get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(w_a, w_b, strict=True))
    assert m_a["final_loss"] == m_b["final_loss"] and m_a["final_accuracy"] == m_b["final_accuracy"]
    assert m_a["device"] == "cpu" and "CPU" in m_a["placement"] and m_a["backend"] == "tensorflow"
    assert m_a["train_images"] == 1000 and m_a["epochs"] == 2 and m_a["fit_time_s"] > 0
    assert m_a["samples_per_s"] == pytest.approx(2000 / m_a["fit_time_s"], rel=0.01)
    live = tmp_path / "a" / "live"
    loss = (live / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert loss[0] == "step\tloss" and len(loss) == 3  # one line per epoch, through DVCLive
    assert float(loss[2].split("\t")[1]) == pytest.approx(m_a["final_loss"])
    assert json.loads((live / "metrics.json").read_text())["train"]["accuracy"] == pytest.approx(m_a["final_accuracy"])
    assert not (live / "plots" / "metrics" / "eval").exists()  # no validation split, no validation curves
    saved = json.loads((out_a / "params.json").read_text())
    assert saved["train"]["epochs"] == 2 and saved["device"] == "cpu"


def test_other_settings_train_differently_from_the_same_start(prepared, tmp_path):
    _, rms = run_train(prepared, tmp_path / "rms")
    _, sgd = run_train(prepared, tmp_path / "sgd", **{"train.optimizer": "sgd", "train.momentum": 0.9,
                                                      "train.learning_rate": 0.01,
                                                      "train.loss": "sparse_categorical_crossentropy"})
    assert rms["final_loss"] != sgd["final_loss"]
    assert 0.1 < sgd["final_accuracy"] <= 1.0  # accuracy is a real accuracy with sparse labels too


def test_gpu_without_a_gpu_fails_loudly_and_writes_nothing(prepared, tmp_path):
    with pytest.raises(UserError, match="train.devices includes 'gpu' but tensorflow sees no GPU"):
        run_train(prepared, tmp_path, device="gpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_the_sequels_options_validation_schedule_nesterov(prepared, tmp_path):
    _, m = run_train(prepared, tmp_path, **{
        "train.epochs": 3, "train.validation_split": 0.2, "train.optimizer": "sgd", "train.momentum": 0.9,
        "train.nesterov": True, "train.learning_rate": 0.05, "train.lr_schedule": "step",
        "train.lr_decay_rate": 0.5, "train.lr_decay_epochs": 1.0})
    curves = tmp_path / "live" / "plots" / "metrics"
    lr = [float(line.split("\t")[1]) for line in (curves / "train" / "learning_rate.tsv").read_text().splitlines()[1:]]
    assert lr == pytest.approx([0.025, 0.0125, 0.00625])  # halved after each epoch, as logged at its end
    assert (curves / "eval" / "accuracy.tsv").is_file() and "final_val_accuracy" in m
    assert m["train_images"] == 800  # 20 % of the 1,000 held out for validation


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [0.1, 0.1, 0.1, 0.1]),
    ("exponential", [0.1, 0.1 * 0.5 ** 0.5, 0.05, 0.1 * 0.5 ** 1.5]),  # decay_epochs 2, 1 step per epoch
    ("step", [0.1, 0.1, 0.05, 0.05]),
    ("cosine", [0.1, 0.1 * (1 + np.cos(np.pi / 4)) / 2, 0.05, 0.1 * (1 + np.cos(3 * np.pi / 4)) / 2]),
])
def test_learning_rate_schedules(schedule, expected):
    keras = import_keras("tensorflow", device="cpu")
    params = validate(tiny_params(**{"train.learning_rate": 0.1, "train.epochs": 4, "train.lr_schedule": schedule,
                                     "train.lr_decay_epochs": 2.0})["train"], train.TrainParams, "train")
    lr = train.learning_rate(keras, params, steps_per_epoch=1)
    values = [float(lr(step)) if callable(lr) else lr for step in range(4)]
    assert values == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"train.epochs": 0}, "train.epochs = 0: Input should be greater than 0"),
    ({"train.optimizer": "adamw"}, "train.optimizer = 'adamw'"),
    ({"train.optimizer": "adam", "train.momentum": 0.9}, "train.momentum applies to rmsprop and sgd"),
    ({"train.devices": ["cpu", "cpu"]}, "list each device once"),
    ({"train.devices": ["tpu"]}, "train.devices.0 = 'tpu'"),
    ({"train.epocs": 3}, "unknown key train.epocs; allowed here: devices, epochs"),
    ({"train.shuffle": "yes"}, "train.shuffle = 'yes': Input should be a valid boolean"),
    ({"train.nesterov": True}, "train.nesterov applies to sgd with momentum > 0"),
    ({"train.lr_schedule": "linear"}, "train.lr_schedule = 'linear'"),
    ({"train.validation_split": 1.0}, "train.validation_split = 1.0: Input should be less than 1"),
])
def test_bad_train_params(tmp_path, change, message):
    params = tiny_params(**change)
    with pytest.raises(UserError, match=message):
        section = validate(params["train"], train.TrainParams, "train")
        train.check_train(section, "tensorflow")


def test_unknown_backend_is_refused(tmp_path, prepared):
    with pytest.raises(UserError, match="base.backend = 'theano'"):
        run_train(prepared, tmp_path, **{"base.backend": "theano"})


def test_mixed_precision_changes_every_layer_but_input_and_output(prepared):
    text = (prepared / "init" / "model.json").read_text()
    assert train.with_precision(text, "float32") == text
    layers = json.loads(train.with_precision(text, "mixed_bfloat16"))["config"]["layers"]
    policies = {layer["config"]["name"]: layer["config"].get("dtype") for layer in layers}
    assert policies["conv1"]["config"]["name"] == "mixed_bfloat16"
    assert policies["dense1"]["config"]["name"] == "mixed_bfloat16"
    assert policies["output"]["config"]["name"] == "float32"
    keras = import_keras("tensorflow", device="cpu")
    model = keras.models.model_from_json(train.with_precision(text, "mixed_bfloat16"))
    model.load_weights(prepared / "init" / "initial.weights.h5")  # weights stay float32: the same file loads
    assert model.get_layer("conv1").compute_dtype == "bfloat16" and model.get_layer("output").compute_dtype == "float32"


def test_placement_names_the_device():
    assert train.on_gpu("/job:localhost/replica:0/task:0/device:GPU:0")
    assert train.on_gpu("cuda:0") and train.on_gpu("cuda:0")
    assert not train.on_gpu("/job:localhost/replica:0/task:0/device:CPU:0") and not train.on_gpu("TFRT_CPU_0")
