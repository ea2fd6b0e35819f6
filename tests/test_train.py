"""Training on small real data: settings, determinism, and the GPU rule."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stages import preprocess
from stages import train
from mnist_cnn.errors import UserError
from mnist_cnn.backend import import_keras
from mnist_cnn.params import validate
from mnist_cnn.files import write_manifest
from tests.conftest import ROOT, run_train, tiny_params, write_params
from mnist_cnn.backend import cpu_features, device_env, on_gpu, onednn_enabled, resolve_precision, set_up_device
from mnist_cnn.model import classifier, initial_network, lookup, standardize_table, with_precision
from mnist_cnn.params import TrainParams, check_train
from mnist_cnn.training import augmented, learning_rate_schedule


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
    assert m_a["fit_cpu_s"] > 0 and m_a["cores_busy"] == pytest.approx(m_a["fit_cpu_s"] / m_a["fit_time_s"], abs=0.01)
    live = tmp_path / "a" / "live"
    loss = (live / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert loss[0] == "step\tloss" and len(loss) == 3  # one line per epoch, through DVCLive
    assert float(loss[2].split("\t")[1]) == pytest.approx(m_a["final_loss"])
    assert json.loads((live / "metrics.json").read_text())["train"]["accuracy"] == pytest.approx(m_a["final_accuracy"])
    assert not (live / "plots" / "metrics" / "eval").exists()  # no validation split, no validation curves
    saved = json.loads((out_a / "params.json").read_text())
    assert saved["train"]["epochs"] == 2 and saved["device"] == "cpu"
    assert "cpu" in saved["train"] and not {"devices", "gpu"} & set(saved["train"])  # only what train@cpu reads
    assert loss[1].startswith("1\t")  # DVCLive's steps are epochs, counted from 1


@pytest.mark.parametrize("procedure", ["published_split", "pooled_resplit"])
def test_the_lookup_standardizes_pixels_exactly_as_preprocess(sample_raw, procedure):
    arrays, scaler = preprocess.preprocess(sample_raw, procedure, seed=0)
    table = standardize_table(json.loads(json.dumps(scaler)))  # through JSON, as the stage reads it
    looked_up = lookup(table, arrays["pixels_train"])
    assert looked_up.dtype == np.float32
    assert np.array_equal(looked_up, arrays["x_train"].reshape(len(looked_up), -1))  # bit for bit


def test_fitting_on_pixels_trains_exactly_as_fitting_on_the_standardized_images(prepared):
    """The lookup wrapper changes what fit is fed, not what it computes: the same weights, bit for bit."""
    keras = import_keras("tensorflow", device="cpu")
    params = validate(tiny_params()["train"], TrainParams, "train")
    set_up_device("tensorflow", "cpu", params.cpu, params.gpu)  # op determinism, as the stage
    data = prepared / "data"
    table = standardize_table(json.loads((data / "scaler.json").read_text()))
    y = keras.utils.to_categorical(np.load(data / "y_train.npy"), 10)

    def fit_from_the_start(on_pixels):
        keras.utils.set_random_seed(0)
        model = keras.models.model_from_json((prepared / "init" / "model.json").read_text())
        model.load_weights(prepared / "init" / "initial.weights.h5")
        net = classifier(keras, model, table) if on_pixels else model
        net.compile(optimizer="rmsprop", loss="categorical_crossentropy")
        x = np.load(data / ("pixels_train.npy" if on_pixels else "x_train.npy"))
        net.fit(x, y, batch_size=128, epochs=2, shuffle=True, verbose=0)
        return model.get_weights()

    on_pixels, on_images = fit_from_the_start(True), fit_from_the_start(False)
    initial = keras.models.model_from_json((prepared / "init" / "model.json").read_text())
    initial.load_weights(prepared / "init" / "initial.weights.h5")
    assert not np.array_equal(on_pixels[0], initial.get_weights()[0])  # it trained
    assert all(np.array_equal(a, b) for a, b in zip(on_pixels, on_images, strict=True))


def test_keras_array_pipelines_run_without_autotune_and_train_the_same(prepared, monkeypatch):
    """import_keras turns tf.data autotuning off in the pipelines Keras builds from arrays (its tuning
    thread held up the end of each epoch for seconds), and that changes no number: with a validation
    split, the same weights and validation losses, bit for bit, as Keras's own pipelines give."""
    keras = import_keras("tensorflow", device="cpu")
    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

    def autotuned():
        dataset = ArrayDataAdapter(np.zeros((10, 2)), batch_size=4, shuffle=True).get_tf_dataset()
        return dataset.options().autotune.enabled

    data = prepared / "data"
    pixels, y = np.load(data / "pixels_train.npy"), keras.utils.to_categorical(np.load(data / "y_train.npy"), 10)
    table = standardize_table(json.loads((data / "scaler.json").read_text()))

    def fit_from_the_start():
        keras.utils.set_random_seed(0)
        model = keras.models.model_from_json((prepared / "init" / "model.json").read_text())
        model.load_weights(prepared / "init" / "initial.weights.h5")
        net = classifier(keras, model, table)
        net.compile(optimizer="rmsprop", loss="categorical_crossentropy")
        history = net.fit(pixels, y, batch_size=128, epochs=2, shuffle=True, validation_split=0.2, verbose=0)
        return model.get_weights(), history.history["val_loss"]

    assert autotuned() is False
    ours = fit_from_the_start()
    monkeypatch.setattr(ArrayDataAdapter, "get_tf_dataset", ArrayDataAdapter.get_tf_dataset.keras_own)
    assert autotuned() is not False
    kerass = fit_from_the_start()
    assert ours[1] == kerass[1]
    assert all(np.array_equal(a, b) for a, b in zip(ours[0], kerass[0], strict=True))


def test_pixels_that_do_not_give_x_train_are_refused(prepared, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prepared / "data", data)
    pixels = np.load(data / "pixels_train.npy")
    pixels[3, 14, 14] ^= 1  # one pixel of one image: x_train.npy no longer follows from it
    np.save(data / "pixels_train.npy", pixels)
    write_manifest(data, "preprocess")  # as if preprocess had written them so: its manifest agrees
    p = write_params(tmp_path / "params.yaml", tiny_params())
    args = ["--device", "cpu", "--data", str(data), "--init", str(prepared / "init"), "--out", str(tmp_path / "cpu"),
            "--metrics", str(tmp_path / "m.json"), "--details", str(tmp_path / "d.json"),
            "--live", str(tmp_path / "live"), "--params", str(p)]
    with pytest.raises(UserError, match=r"pixels_train.npy and scaler.json do not give x_train.npy's values: "
                                        r"run `dvc repro -f preprocess`"):
        train.main(args)
    np.save(data / "pixels_train.npy", pixels[:10].astype(np.float32))
    write_manifest(data, "preprocess")
    with pytest.raises(UserError, match=r"pixels_train.npy \(float32, \(10, 28, 28\)\) does not match"):
        train.main(args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "params.yaml"]  # nothing written


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs PyTorch (pip install torch)")
def test_training_on_the_torch_backend(prepared, tmp_path):
    """Another backend (a process has one) runs the same stage, lookup included: the GPU path's code on a CPU."""
    p = write_params(tmp_path / "params.yaml", tiny_params(**{"base.backend": "torch", "train.epochs": 2,
                                                              "train.steps_per_execution": 1}))
    subprocess.run([sys.executable, "-m", "stages.train", "--device", "cpu", "--data", str(prepared / "data"),
                    "--init", str(prepared / "init"), "--out", str(tmp_path / "cpu"), "--metrics",
                    str(tmp_path / "m.json"), "--details", str(tmp_path / "d.json"), "--live", str(tmp_path / "live"),
                    "--params", str(p)], cwd=ROOT, check=True, capture_output=True)
    m = json.loads((tmp_path / "d.json").read_text())
    assert m["backend"] == "torch" and m["placement"] == "cpu" and m["train_images"] == 1000
    assert m["final_accuracy"] > 0.2  # it learns: 16 steps of a tiny network; chance is 0.1


LOOKUP_CHECK = """
import json, sys
import numpy as np
from mnist_cnn.backend import import_keras
from mnist_cnn.model import classifier, standardize_table
keras = import_keras(sys.argv[1], device="cpu")
data = sys.argv[2]
table = standardize_table(json.load(open(data + "/scaler.json")))
model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Identity()])
out = keras.ops.convert_to_numpy(classifier(keras, model, table)(np.load(data + "/pixels_train.npy")[:64]))
print(np.array_equal(out, np.load(data + "/x_train.npy")[:64]), out.dtype, out.shape)
"""


@pytest.mark.parametrize("backend", ["tensorflow", "torch", "jax"])
def test_the_standardize_layer_gives_x_train_on_each_backend(prepared, backend):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    out = subprocess.run([sys.executable, "-c", LOOKUP_CHECK, backend, str(prepared / "data")],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    assert out.split() == ["True", "float32", "(64,", "28,", "28,", "1)"]


LEAN_IMPORT = """
import sys
from pathlib import Path
from mnist_cnn.backend import KERAS_EXTRAS, import_keras
import_keras(sys.argv[1], device="cpu")
print(*sorted(name for name in KERAS_EXTRAS if name in sys.modules))
import jax, matplotlib.pyplot, sklearn  # what was left out imports as usual afterwards
print(matplotlib.pyplot.figure is not None, sklearn.__name__, jax.__name__)
"""


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_importing_keras_leaves_out_what_no_stage_uses_and_it_imports_later(backend):
    """TensorFlow and Keras import jax, scikit-learn and matplotlib if installed (3 s of 8): import_keras leaves
    them out, except the backend itself; a stage that needs one imports it afterwards as usual."""
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    out = subprocess.run([sys.executable, "-c", LEAN_IMPORT, backend], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.splitlines()
    assert out == ["jax" if backend == "jax" else "", "True sklearn jax"]


QUICK_EXIT = """
import atexit, pathlib, sys
from mnist_cnn.errors import UserError
from mnist_cnn.stage import run
def main():
    if sys.argv[1] == "tensorflow":
        import tensorflow  # noqa: F401
    atexit.register(lambda: pathlib.Path(sys.argv[2]).write_text("Python's shutdown ran"))
    print("done", end="")  # no newline: only a flush gets it out
    if sys.argv[3] == "fail":
        raise UserError("it went wrong")
run(main)
"""


@pytest.mark.parametrize("imported", ["tensorflow", "nothing"])
@pytest.mark.parametrize("ending", ["done", "fail"])
def test_a_stage_that_loaded_tensorflow_skips_pythons_shutdown_once_done(tmp_path, imported, ending):
    """TensorFlow's shutdown takes 2 s and writes nothing; every other ending (and every other stage) keeps it."""
    marker = tmp_path / "shutdown"
    out = subprocess.run([sys.executable, "-c", QUICK_EXIT, imported, str(marker), ending], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.stdout == "done"
    assert out.returncode == (0 if ending == "done" else 1)
    assert marker.exists() == (imported == "nothing" or ending == "fail")
    if ending == "fail":
        assert out.stderr.strip().splitlines()[-1] == "error: it went wrong"


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
                                     "train.lr_decay_epochs": 2.0})["train"], TrainParams, "train")
    lr = learning_rate_schedule(keras, params, steps_per_epoch=1)
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
        section = validate(params["train"], TrainParams, "train")
        check_train(section, "tensorflow")


def test_several_steps_per_call_on_torch_is_refused_with_one_line():
    params = validate(tiny_params(**{"train.steps_per_execution": 16})["train"], TrainParams, "train")
    with pytest.raises(UserError, match=r"train.steps_per_execution = 16: .* set it to 1 for torch"):
        check_train(params, "torch")
    check_train(params, "tensorflow")


def test_unknown_backend_is_refused(tmp_path, prepared):
    with pytest.raises(UserError, match="base.backend = 'theano'"):
        run_train(prepared, tmp_path, **{"base.backend": "theano"})


def test_mixed_precision_changes_every_layer_but_input_and_output(prepared):
    text = (prepared / "init" / "model.json").read_text()
    assert with_precision(text, "float32") == text
    layers = json.loads(with_precision(text, "mixed_bfloat16"))["config"]["layers"]
    policies = {layer["config"]["name"]: layer["config"].get("dtype") for layer in layers}
    assert policies["conv1"]["config"]["name"] == "mixed_bfloat16"
    assert policies["dense1"]["config"]["name"] == "mixed_bfloat16"
    assert policies["output"]["config"]["name"] == "float32"
    keras = import_keras("tensorflow", device="cpu")
    model = keras.models.model_from_json(with_precision(text, "mixed_bfloat16"))
    model.load_weights(prepared / "init" / "initial.weights.h5")  # weights stay float32: the same file loads
    assert model.get_layer("conv1").compute_dtype == "bfloat16" and model.get_layer("output").compute_dtype == "float32"


@pytest.mark.parametrize("precision, device, features, expected", [
    ("auto", "cpu", ["avx2", "fma"], "float32"),                                 # an EPYC without AVX-512
    ("auto", "cpu", ["avx2", "avx512f", "avx512_bf16"], "mixed_bfloat16"),     # an EPYC with AVX512-BF16
    ("auto", "cpu", ["avx512f", "amx_tile", "amx_bf16"], "mixed_bfloat16"),    # a Xeon with AMX
    ("auto", "gpu", [], "mixed_bfloat16"),
    ("float32", "cpu", ["amx_bf16"], "float32"),                                # asked for: kept
    ("mixed_bfloat16", "cpu", [], "mixed_bfloat16"),
])
def test_auto_precision_is_bfloat16_only_where_the_hardware_computes_it(precision, device, features, expected):
    assert resolve_precision(precision, device, features) == expected


def test_cpu_features_are_read_from_the_flags_line():
    info = ("processor\t: 0\nmodel name\t: Intel Xeon\n"
            "flags\t\t: fpu sse avx2 fma avx512f avx512_bf16 amx_tile amx_bf16 amx_int8\n")
    assert cpu_features(info) == ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"]
    assert cpu_features("model name\t: ?\n") == []


@pytest.mark.parametrize("flags, chosen", [
    (["avx2", "fma"], "float32"),                                          # an EPYC with AVX2 only
    (["avx2", "fma", "avx512f", "avx512_bf16"], "mixed_bfloat16"),          # an EPYC with AVX512-BF16
    (["avx2", "fma", "avx512f", "amx_tile", "amx_bf16"], "mixed_bfloat16"),  # a Xeon with AMX
])
def test_an_auto_precision_run_records_what_it_chose_on_each_kind_of_cpu(prepared, tmp_path, capsys, monkeypatch,
                                                                          flags, chosen):
    """The run takes the branch the CPU's flags select, whatever this machine is: the flags are what
    training.set_up reads, mocked (a bfloat16 run on a CPU without its units is emulated: slower, same code)."""
    monkeypatch.setattr("mnist_cnn.training.cpu_features", lambda cpuinfo=None: flags)
    _, details = run_train(prepared, tmp_path, **{"train.precision": "auto"})
    assert details["precision"] == chosen and details["cpu_features"] == flags
    assert f"precision auto: {chosen}" in capsys.readouterr().out
    assert ("float32_vs_trained" in details) == (chosen == "mixed_bfloat16")  # a bfloat16 run saves float32


def test_onednn_is_set_before_tensorflow_starts_for_the_cpu_run_only():
    cpu = validate(tiny_params()["train"], TrainParams, "train").cpu
    assert device_env("tensorflow", "cpu", None, cpu.model_copy(update={"onednn": True})) == {
        "TF_ENABLE_ONEDNN_OPTS": "1"}
    assert device_env("tensorflow", "cpu", None, cpu.model_copy(update={"onednn": False})) == {
        "TF_ENABLE_ONEDNN_OPTS": "0"}
    assert "TF_ENABLE_ONEDNN_OPTS" not in device_env("tensorflow", "cpu", None,
                                                             cpu.model_copy(update={"onednn": None}))
    assert "TF_ENABLE_ONEDNN_OPTS" not in device_env("torch", "cpu", None, cpu)


def test_steps_per_execution_changes_no_number(prepared, tmp_path):
    """Batches run 16 to a call or one by one: the same losses and weights, to the bit; the run records
    whether oneDNN was in force."""
    one, d_one = run_train(prepared, tmp_path / "one", **{"train.steps_per_execution": 1, "train.epochs": 2})
    many, d_many = run_train(prepared, tmp_path / "many", **{"train.steps_per_execution": 16, "train.epochs": 2})
    assert d_one["final_loss"] == d_many["final_loss"]
    keras = import_keras("tensorflow", device="cpu")
    a, b = (keras.models.load_model(folder / "model.keras") for folder in (one, many))
    assert all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights(), strict=True))
    assert d_many["onednn"] is onednn_enabled("tensorflow")


def test_placement_names_the_device():
    assert on_gpu("/job:localhost/replica:0/task:0/device:GPU:0")
    assert on_gpu("cuda:0") and on_gpu("cuda:0")
    assert not on_gpu("/job:localhost/replica:0/task:0/device:CPU:0") and not on_gpu("TFRT_CPU_0")


AUGMENT = {"train.augment": {"rotation": 15.0, "shift": 0.1, "zoom": 0.1}}


def test_augmentation_moves_training_images_only_and_is_not_saved(prepared, tmp_path):
    keras = import_keras("tensorflow", device="cpu")
    pixels = np.load(prepared / "data" / "pixels_train.npy")[:64]
    table = standardize_table(json.loads((prepared / "data" / "scaler.json").read_text()))
    network = keras.models.model_from_json((prepared / "init" / "model.json").read_text())
    fitted = classifier(keras, network, table)
    augment = validate(tiny_params(**AUGMENT)["train"], TrainParams, "train").augment
    model = augmented(keras, fitted, augment, seed=0)
    moved = keras.ops.convert_to_numpy(model.get_layer("augment")(pixels[..., None].astype("float32")[..., 0],
                                                                  training=True))
    assert moved.shape == pixels.shape and 0 <= moved.min() and moved.max() <= 255  # the table's range
    assert np.abs(moved - pixels).mean() > 5  # moved, and the new border is black paper
    same = keras.ops.convert_to_numpy(model(pixels, training=False))
    assert np.array_equal(same, keras.ops.convert_to_numpy(fitted(pixels, training=False)))  # inference: as is
    assert augmented(keras, fitted, augment.model_copy(update={"rotation": 0.0, "shift": 0.0, "zoom": 0.0}),
                           seed=0) is fitted


def test_training_with_augmentation_is_reproducible_and_differs_from_without(prepared, tmp_path):
    out, first = run_train(prepared, tmp_path / "a", **AUGMENT)
    _, again = run_train(prepared, tmp_path / "b", **AUGMENT)
    _, plain = run_train(prepared, tmp_path / "plain")
    assert first["final_loss"] == again["final_loss"] != plain["final_loss"]
    keras = import_keras("tensorflow", device="cpu")
    saved = keras.models.load_model(out / "classifier.keras")
    assert "augment" not in [layer.name for layer in saved.layers]
    assert json.loads((out / "params.json").read_text())["train"]["augment"]["rotation"] == 15.0


def test_an_onnx_export_that_disagrees_with_keras_fails_and_writes_nothing(prepared, tmp_path, monkeypatch):
    monkeypatch.setattr("mnist_cnn.training.ONNX_TOLERANCE", -1.0)  # no difference passes: as if the export were wrong
    with pytest.raises(UserError, match=r"^classifier.onnx gives probabilities up to .* away from Keras's "
                                        r"\(allowed -1.0\); nothing was written"):
        run_train(prepared, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def train_in_a_process(prepared, folder, backend, **overrides):
    """train as DVC runs it, in a process of its own: a device split must be set before the backend starts.

    Returns (details, the trained network's weights, stdout).
    """
    folder.mkdir()
    p = write_params(folder / "params.yaml", tiny_params(**{"base.backend": backend, **overrides}))
    result = subprocess.run(
        [sys.executable, "-m", "stages.train", "--device", "cpu", "--data", prepared / "data", "--init",
         prepared / "init", "--out", folder / "cpu", "--metrics", folder / "m.json", "--details", folder / "d.json",
         "--live", folder / "live", "--params", p],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    keras = import_keras("tensorflow", device="cpu")  # a .keras file loads on any backend
    weights = keras.models.load_model(folder / "cpu" / "model.keras").get_weights()
    return json.loads((folder / "d.json").read_text()), weights, result.stdout


# Two replicas sum the gradients of two half-batches where one device sums one batch's: the same
# update up to the order of float32 sums, which RMSprop's division by the root of the running mean
# square amplifies where gradients are near 0. Measured after 16 steps of the tiny net: each weight
# array's distance between the two runs, over how far training moved it from the initial weights,
# is 1e-6 on tensorflow and 1.4e-3 on jax (with SGD, both agree to 6e-8 absolute).
DATA_PARALLEL_TOLERANCE = 1e-2


@pytest.mark.long
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_two_devices_train_as_one_device_does(prepared, tmp_path, backend):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    settings = {"train.epochs": 2, "train.steps_per_execution": 1}
    one, w_one, _ = train_in_a_process(prepared, tmp_path / "one", backend, **settings)
    two, w_two, out = train_in_a_process(prepared, tmp_path / "two", backend, **settings, **{"train.replicas": 2})
    assert one["replicas"] == 1 and one["replica_devices"] == []
    assert two["replicas"] == 2 and len(set(two["replica_devices"])) == 2 and "split over 2 devices" in out
    init = initial_network(import_keras("tensorflow", device="cpu"), prepared / "init", "float32").get_weights()
    worst = max(float(np.linalg.norm(b - a) / np.linalg.norm(a - i))
                for a, b, i in zip(w_one, w_two, init, strict=True))
    assert worst < DATA_PARALLEL_TOLERANCE, f"the two runs differ by {worst:.3g} of training's change"
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=DATA_PARALLEL_TOLERANCE)


def test_replicas_are_refused_where_they_cannot_split(prepared, tmp_path):
    params = validate(tiny_params(**{"train.replicas": 3, "train.steps_per_execution": 1})["train"], TrainParams,
                      "train", "params.yaml")
    with pytest.raises(UserError, match=r"batch_size = 128 does not split evenly over train.replicas = 3"):
        check_train(params, "tensorflow")
    params = validate(tiny_params(**{"train.replicas": 2, "train.steps_per_execution": 1})["train"],
                      TrainParams, "train", "params.yaml")
    with pytest.raises(UserError, match=r"train.replicas = 2: data parallelism runs on tensorflow .* set it to 1 "
                                        r"for torch"):
        check_train(params, "torch")
    # found by tests/test_matrix.py: Keras's multi-step loop fails under tf.distribute at its first call
    params = validate(tiny_params(**{"train.replicas": 2})["train"], TrainParams, "train", "params.yaml")
    with pytest.raises(UserError, match=r"^params.yaml: train.steps_per_execution = 16 with train.replicas = 2: .* "
                                        r"set train.steps_per_execution to 1$"):
        check_train(params, "tensorflow")
    check_train(params, "jax")  # the Keras distribution API runs several steps per call


@pytest.mark.parametrize("limit_mb", [None, 2048])
def test_the_gpu_branch_of_device_set_up_as_tensorflow_would_take_it_with_gpus(monkeypatch, limit_mb):
    """No GPU here: what set_up_device reads from TensorFlow is mocked to show two, and what it sets recorded."""
    keras = import_keras("tensorflow", device="cpu")  # noqa: F841  (TensorFlow loaded as the stage loads it)
    import tensorflow as tf
    settings = validate(tiny_params(**{"train.gpu.memory_limit_mb": limit_mb})["train"], TrainParams, "train")
    from types import SimpleNamespace
    gpus, done = [SimpleNamespace(name=f"/physical_device:GPU:{i}") for i in range(2)], []
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: gpus if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth", lambda gpu, on: done.append(("growth", gpu, on)))
    monkeypatch.setattr(tf.config, "set_logical_device_configuration", lambda gpu, c: done.append(("limit", gpu)))
    monkeypatch.setattr(tf.config.experimental, "enable_tensor_float_32_execution",
                        lambda on: done.append(("tf32", on)))
    monkeypatch.setattr(tf.config.experimental, "get_device_details", lambda gpu: {"device_name": "Mock H200"})
    assert set_up_device("tensorflow", "gpu", settings.cpu, settings.gpu, replicas=2) == "Mock H200"
    assert ("tf32", False) in done  # float32 means float32
    expected = [("limit", g) for g in gpus] if limit_mb else [("growth", g, True) for g in gpus]
    assert [d for d in done if d[0] != "tf32"] == expected
    with pytest.raises(UserError, match=r"train.replicas = 3 but tensorflow sees 2 GPU device\(s\)"):
        set_up_device("tensorflow", "gpu", settings.cpu, settings.gpu, replicas=3)
    assert device_env("tensorflow", "gpu", settings.gpu) == {"NVIDIA_TF32_OVERRIDE": "0"}


def rss_file_mb():
    """This process's resident file-backed memory (mapped files' pages), from /proc."""
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssFile in /proc/self/status")


def test_release_pages_drops_a_mapped_arrays_pages_and_keeps_its_values(tmp_path):
    """What train does after the fit, so that the ONNX export (the run's peak of memory) does not hold the
    training images: the mapping's pages leave the process, and the array reads the same from the file after."""
    from mnist_cnn.files import release_pages
    data = np.arange(8 * 2**20, dtype=np.int64)  # 64 MB
    np.save(tmp_path / "a.npy", data)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    total = int(data.sum())
    assert int(mapped.sum()) == total  # every page read in
    before = rss_file_mb()
    release_pages(mapped)
    assert before - rss_file_mb() >= 48
    assert int(mapped[-1]) == data[-1] and int(mapped.sum()) == total  # read again from the file
    release_pages(data)  # an array in memory: nothing to drop, nothing changed
    assert int(data.sum()) == total
    writable = np.load(tmp_path / "a.npy", mmap_mode="c")  # copy-on-write: its changes live in its pages
    writable[0] = -1
    release_pages(writable)
    assert writable[0] == -1

    class Refusing:  # a kernel (or platform) that refuses the advice: the run goes on, nothing changed
        def madvise(self, advice):
            raise OSError(22, "Invalid argument")

    refused = np.load(tmp_path / "a.npy", mmap_mode="r")
    refused._mmap = Refusing()
    release_pages(refused)
    assert int(refused[-1]) == data[-1]


def test_the_curves_so_far_are_copied_after_each_epoch_and_gone_once_done(prepared, tmp_path, monkeypatch):
    """--live-copy (dvc.yaml: live/train_<device>): after each epoch the DVCLive log's curves so far are there,
    for `dvc plots show` to follow the run; an earlier run's are removed first, and the run's own once it is
    done (its record is --live, renamed into place)."""
    from mnist_cnn import files
    from stages import train

    copy = tmp_path / "live_copy"
    (copy / "plots").mkdir(parents=True)
    (copy / "plots" / "stale.tsv").write_text("step\tloss\n1\t9.9\n")  # an earlier, stopped run's
    (copy / ".gitignore").write_text("*\n")
    (copy / "notes.txt").write_text("not a copy: left alone")
    seen = []
    real = files.copy_in_place

    def watching(source, folder, *args, **kwargs):
        real(source, folder, *args, **kwargs)
        seen.append(sorted(path.relative_to(folder).as_posix() for path in Path(folder).rglob("*.tsv")))
        seen[-1].append(len((Path(folder) / "plots/metrics/train/loss.tsv").read_text().splitlines()) - 1)

    monkeypatch.setattr(files, "copy_in_place", watching)
    params = write_params(tmp_path / "params.yaml", tiny_params(**{"train.epochs": 3}))
    train.main(["--device", "cpu", "--data", str(prepared / "data"), "--init", str(prepared / "init"),
                "--out", str(tmp_path / "cpu"), "--metrics", str(tmp_path / "m.json"), "--details",
                str(tmp_path / "d.json"), "--live", str(tmp_path / "live"), "--live-copy", str(copy),
                "--params", str(params)])
    curves = [f"plots/metrics/train/{name}.tsv" for name in ("accuracy", "epoch_time_s", "learning_rate", "loss")]
    assert seen == [curves + [1], curves + [2], curves + [3]]  # epoch by epoch, the stale run's gone
    assert sorted(path.name for path in copy.iterdir()) == [".gitignore", "notes.txt"]
    record = tmp_path / "live" / "plots" / "metrics" / "train" / "loss.tsv"
    assert len(record.read_text().splitlines()) == 4  # the run's own log, whole, where --live names it


def test_curves_that_cannot_be_copied_are_a_warning_and_the_run_goes_on(prepared, tmp_path, monkeypatch, capsys):
    """The copy is no output: a full disk (say) under it is said once, and the run writes its outputs."""
    from mnist_cnn import files
    from stages import train

    def full(source, folder, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "copy_in_place", full)
    params = write_params(tmp_path / "params.yaml", tiny_params(**{"train.epochs": 2}))
    train.main(["--device", "cpu", "--data", str(prepared / "data"), "--init", str(prepared / "init"),
                "--out", str(tmp_path / "cpu"), "--metrics", str(tmp_path / "m.json"), "--details",
                str(tmp_path / "d.json"), "--live", str(tmp_path / "live"), "--live-copy", str(tmp_path / "copy"),
                "--params", str(params)])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "cannot copy the curves" in line]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    assert (tmp_path / "cpu" / "classifier.keras").is_file() and (tmp_path / "m.json").is_file()
