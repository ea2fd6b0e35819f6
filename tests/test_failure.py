"""Failure is failure on every CPU, and the last good results are never lost.

Whether a runaway learning rate gives NaN or a huge finite loss depends on the
CPU's kernels, so each branch of the guard is driven here with the values
either kind of CPU gives, not left to the machine the tests run on.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from stages import evaluate
from mnist_cnn.errors import Damaged, UserError
from mnist_cnn.backend import import_keras
from mnist_cnn.stage import lock_restore_hint, restore_hint, run
from mnist_cnn.params import validate
from mnist_cnn.files import write_manifest
from tests.conftest import ROOT, run_train, set_params, tiny_params
from mnist_cnn.inference import TrainedClassifier
from mnist_cnn.model import classifier, initial_network
from mnist_cnn.params import TrainParams
from mnist_cnn.training import (BFLOAT16_TOLERANCE, CHECK_IMAGES, ONNX_TOLERANCE, Diverged, DivergenceGuard,
                                check_predictions, check_progress)


def guard(first_loss=2.3):
    keras = import_keras("tensorflow", device="cpu")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")])
    g = DivergenceGuard(keras, model, 0.5, first_loss)
    g.epoch = 2
    return g, model


@pytest.mark.parametrize("loss, fails", [
    (2.2, False), (2299.0, False),                 # up to 1,000 times the initial weights' loss: still a run
    (2301.0, True), (3.7e30, True),                # finite but runaway: what an EPYC with AVX-512 computed
    (float("nan"), True), (float("inf"), True),    # what other CPUs computed for the same params
])
def test_a_runaway_loss_ends_the_run_whether_or_not_it_is_nan(loss, fails):
    g, _ = guard()
    if not fails:
        g.check_loss(loss, batch=16)
        return
    with pytest.raises(Diverged, match=r"^training diverged: the loss is .* at epoch 2, batch 16; nothing was "
                                             r"written\. Lower train.learning_rate \(now 0.5\)"):
        g.check_loss(loss, batch=16)


@pytest.mark.parametrize("after, fails", [(2.3, True), (2.2985, True), (2.0, False), (16.1, True)])
def test_a_run_that_did_not_lower_its_loss_trained_nothing(after, fails):
    if not fails:
        check_progress(2.3, after, 0.001)
        return
    with pytest.raises(Diverged, match=r"^training made no progress: the loss on the first 1024 training "
                                             r"images is \S+ after it, 2.3 before; nothing was written"):
        check_progress(2.3, after, 0.001)


def test_a_rate_too_small_to_move_the_weights_fails_the_run_and_writes_nothing(prepared, tmp_path):
    # above float32's smallest normal, so accepted; too small to change a float32 weight: nothing trains
    with pytest.raises(Diverged, match=r"^training made no progress: .* Check train.learning_rate \(now 1e-30\)"):
        run_train(prepared, tmp_path, **{"train.learning_rate": 1e-30})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_weights_that_are_not_finite_end_the_run_at_the_epochs_end():
    g, model = guard()
    g.check_weights()  # finite: nothing to say
    kernel = model.get_layer("dense").kernel
    kernel.assign(np.where(np.eye(3, 2) > 0, np.nan, 0.0).astype("float32"))
    with pytest.raises(Diverged, match=r"weight \S*dense/kernel holds NaN or infinite values at the end of "
                                             r"epoch 2"):
        g.check_weights()


def test_nan_probabilities_are_a_diverged_run_not_an_export_bug():
    check_predictions(np.full((2, 10), 0.1), "x")
    with pytest.raises(Diverged, match=r"training diverged: the trained classifier gives NaN or infinite "
                                             r"probabilities; nothing was written"):
        check_predictions(np.array([[0.5, np.nan]]), "the trained classifier")


@pytest.mark.parametrize("rate", [1e-320, 1e-39, 1e-38])
def test_a_learning_rate_that_cannot_train_is_refused_before_any_work(rate):
    with pytest.raises(UserError, match=r"train.learning_rate = \S+ is below float32's smallest normal number"):
        validate(tiny_params(**{"train.learning_rate": rate})["train"], TrainParams, "train")
    validate(tiny_params(**{"train.learning_rate": 2e-38})["train"], TrainParams, "train")  # the floor


def test_accuracy_no_better_than_the_most_frequent_digit_is_learning_nothing():
    y = np.array([1] * 12 + [0] * 8 + [7] * 80)  # 80 sevens: always answering 7 gives 0.8
    with pytest.raises(UserError, match=r"^the cpu model learned nothing: test accuracy 0.8000 is no better than "
                                        r"always answering 7 \(0.8000\); nothing was written"):
        evaluate.check_learned(0.8, y, "cpu")
    evaluate.check_learned(0.81, y, "cpu")


def evaluate_args(prepared, model, out):
    return ["--device", "cpu", "--data", str(prepared / "data"), "--model", str(model),
            "--metrics", str(out / "m.json"), "--details", str(out / "d.json"),
            "--predictions", str(out / "p.csv"), "--mistakes", str(out / "m.png")]


@pytest.mark.parametrize("runtime", ["onnxruntime", "keras"])
def test_evaluate_fails_a_model_that_always_answers_one_digit_and_writes_nothing(prepared, tmp_path, runtime):
    from mnist_cnn.files import MANIFEST, read_json
    from mnist_cnn.training import export_onnx
    out, _ = run_train(prepared, tmp_path / "run")
    keras = import_keras("tensorflow", device="cpu")
    model = keras.models.load_model(out / "classifier.keras")
    bias = model.get_layer("mnist_cnn").get_layer("output").bias
    bias.assign(np.where(np.arange(10) == 3, 1e4, 0.0).astype("float32"))  # every image read as a 3
    model.save(out / "classifier.keras")
    (out / "classifier.onnx").unlink()
    if runtime == "onnxruntime":
        export_onnx(keras, model, out / "classifier.onnx", np.zeros((4, 28, 28), np.uint8))
    write_manifest(out, "train@cpu")
    assert ("classifier.onnx" in read_json(out / MANIFEST)["files"]) == (runtime == "onnxruntime")
    results = tmp_path / "eval"
    results.mkdir()
    with pytest.raises(UserError, match=r"^the cpu model learned nothing: test accuracy \S+ is no better than "
                                        r"always answering \d"):
        evaluate.main(evaluate_args(prepared, out, results))
    assert list(results.iterdir()) == []


# --- mixed precision: what is saved computes in float32, checked against what was trained -------------

def test_a_bfloat16_run_exports_and_its_onnx_answers_match_keras(prepared, tmp_path):
    out, details = run_train(prepared, tmp_path, **{"train.precision": "mixed_bfloat16", "train.epochs": 2})
    assert details["precision"] == "mixed_bfloat16"
    measured = details["float32_vs_trained"]
    assert measured["images"] == CHECK_IMAGES
    assert all(measured[key] <= limit for key, limit in BFLOAT16_TOLERANCE.items()), measured
    keras = import_keras("tensorflow", device="cpu")
    saved = keras.models.load_model(out / "classifier.keras")
    assert {layer.compute_dtype for layer in keras.models.load_model(out / "model.keras").layers} == {"float32"}
    pixels = np.load(prepared / "data" / "pixels_train.npy")[:500]
    onnx = TrainedClassifier(out)
    assert onnx.name.startswith("onnxruntime")
    got = onnx.predict(pixels)
    assert np.abs(got - saved.predict(pixels, verbose=0)).max() <= ONNX_TOLERANCE
    # against the network as it was trained, computing in bfloat16, on images it was not checked on
    as_trained = initial_network(keras, prepared / "init", "mixed_bfloat16")
    as_trained.set_weights(keras.models.load_model(out / "model.keras").get_weights())
    table = saved.get_layer("standardize").get_layer("table").embeddings.numpy().ravel()
    bf16 = np.asarray(classifier(keras, as_trained, table).predict(pixels, verbose=0), dtype=np.float64)
    assert np.abs(got - bf16).max() <= BFLOAT16_TOLERANCE["max_probability_difference"]
    assert np.mean(got.argmax(1) != bf16.argmax(1)) <= BFLOAT16_TOLERANCE["other_digit_share"]


def test_a_float32_classifier_too_far_from_the_trained_one_is_refused(prepared, tmp_path, monkeypatch):
    monkeypatch.setattr("mnist_cnn.training.BFLOAT16_TOLERANCE",
                        {"max_probability_difference": -1.0, "other_digit_share": 1.0})
    with pytest.raises(UserError, match=r"^the float32 classifier answers too far from the bfloat16 network as "
                                        r"trained .*nothing was written"):
        run_train(prepared, tmp_path, **{"train.precision": "mixed_bfloat16"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


# --- the last good results are never lost -----------------------------------------------------------

LOCK = """schema: '2.0'
stages:
  train@cpu:
    outs:
    - path: models/cpu
      md5: 0123456789abcdef0123456789abcdef.dir
    - path: metrics/train_cpu.json
      md5: 99914b932bd37a50b983c5e7c90ae93b
  report:
    outs:
    - path: reports/report.md
      md5: 99914b932bd37a50b983c5e7c90ae93b
"""  # 99914b…: the md5 of "{}", the files git holds below


def cache_object(root, md5):
    path = root / ".dvc/cache/files/md5" / md5[:2] / md5[2:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[]")


def test_a_failed_stage_under_dvc_says_how_to_get_its_last_outputs_back(tmp_path, monkeypatch):
    (tmp_path / "dvc.lock").write_text(LOCK)
    cache_object(tmp_path, "0123456789abcdef0123456789abcdef.dir")
    cache_object(tmp_path, "99914b932bd37a50b983c5e7c90ae93b")  # DVC's run cache keeps even git's outputs
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    for path in ("metrics/train_cpu.json", "reports/report.md"):  # cache: false outputs live in git
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_text("{}")
    subprocess.run(["git", "add", "metrics", "reports"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    # what DVC's cache holds comes back with dvc checkout, what git keeps (cache: false) with git checkout
    assert restore_hint("train@cpu") == ("; to get its last good outputs back: "
                                         "`dvc checkout train@cpu && git checkout -- metrics/train_cpu.json`")
    assert restore_hint("report") == "; to get its last good outputs back: `git checkout -- reports/report.md`"
    assert restore_hint("evaluate@cpu") == ""  # never ran: nothing to get back
    assert restore_hint(None) == ""            # not under DVC: the stage's outputs were never removed
    (tmp_path / "metrics/train_cpu.json").write_text('{"fit_time_s": 1.0}')  # another run's, staged
    subprocess.run(["git", "add", "metrics"], cwd=tmp_path, check=True)
    assert restore_hint("train@cpu") == "; to get its last good outputs back: `dvc checkout train@cpu`"
    queued = tmp_path / ".dvc" / "tmp" / "exps" / "tmp1234"  # where DVC runs a queued experiment
    shutil.copytree(tmp_path, queued, ignore=shutil.ignore_patterns(".dvc"))
    monkeypatch.chdir(queued)
    assert restore_hint("train@cpu") == ""     # a queued experiment's copy: the workspace lost nothing


def test_a_damaged_input_gives_its_repair_not_a_checkout(tmp_path, monkeypatch, capsys):
    (tmp_path / "dvc.lock").write_text(LOCK)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_STAGE", "train@cpu")
    monkeypatch.setattr("mnist_cnn.stage.watch_dvc", lambda: None)

    def damaged():
        raise Damaged("x.npy is damaged; `rm -f … && dvc repro --single-item -f preprocess`")

    with pytest.raises(SystemExit) as exit:
        run(damaged)
    assert exit.value.code == "error: x.npy is damaged; `rm -f … && dvc repro --single-item -f preprocess`"


def test_predict_names_the_checkout_when_the_model_is_in_dvcs_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.lock").write_text(LOCK)
    with pytest.raises(UserError, match=r"not found: run `dvc repro`"):
        TrainedClassifier("models/cpu")  # dvc.lock names it, but the cache does not hold it: only a run makes it
    cached = tmp_path / ".dvc/cache/files/md5/01/23456789abcdef0123456789abcdef.dir"
    cached.parent.mkdir(parents=True)
    cached.write_text("[]")
    assert lock_restore_hint("./models/cpu/") == "dvc checkout train@cpu"
    with pytest.raises(UserError, match=r"^models/cpu is not there, but dvc.lock names it and DVC's cache holds it: "
                                        r"`dvc checkout train@cpu` puts it back$"):
        TrainedClassifier("models/cpu")


# --- under DVC: a failed run's line, DVC killed mid-run, and no TensorFlow chatter ---------------------

@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from tests.conftest import make_project
    return make_project(tmp_path_factory)


def file_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_failed_run_ends_with_the_checkout_that_brings_the_last_model_back(project):
    from tests.conftest import dvc, dvc_env
    before = file_bytes(project / "models" / "cpu")
    committed = (project / "params.yaml").read_text()
    set_params(project, **{"train.learning_rate": 1e30})
    try:
        failed = dvc(project, "repro", check=False)
        assert failed.returncode != 0
        line = next(line for line in failed.stderr.splitlines() if line.startswith("error: training diverged"))
        assert line.endswith("; to get its last good outputs back: "
                             "`dvc checkout train@cpu && git checkout -- metrics/train_cpu.json`")
        assert not (project / "models" / "cpu").exists()  # DVC removed them before the run
        answer = subprocess.run([sys.executable, "-m", "tools.predict", "data/sample/mnist_sample.npz"], cwd=project,
                                capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert answer.returncode == 1
        assert answer.stderr.strip() == ("error: models/cpu is not there, but dvc.lock names it and DVC's cache "
                                         "holds it: `dvc checkout train@cpu` puts it back")
        command = line.rsplit("`", 2)[-2]
        subprocess.run(["bash", "-c", command], cwd=project, env=dvc_env(project), check=True)  # as the line says
        assert file_bytes(project / "models" / "cpu") == before  # bit for bit
        assert dvc(project, "status", "train@cpu").stdout.count("changed") <= 1  # only params.yaml's change
    finally:
        (project / "params.yaml").write_text(committed)


def stage_processes(project, module):
    """pids of the processes running `python -m <module>` in `project`."""
    found = []
    for proc in os.listdir("/proc"):
        try:
            cmdline = open(f"/proc/{proc}/cmdline", "rb").read().split(b"\0")
            cwd = os.readlink(f"/proc/{proc}/cwd")
        except OSError:
            continue
        if module.encode() in cmdline and cwd == str(project):
            found.append(int(proc))
    return found


def test_sigterm_to_dvc_repro_mid_train_leaves_no_process_and_no_write(project):
    from tests.conftest import dvc, dvc_env
    committed = (project / "params.yaml").read_text()
    set_params(project, **{"train.epochs": 200})  # long enough to be caught in the middle
    try:
        repro = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=project, env=dvc_env(project),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not stage_processes(project, "stages.train") and time.monotonic() < deadline:
            time.sleep(0.2)
        trainers = stage_processes(project, "stages.train")
        assert trainers, "train never started"
        time.sleep(3)  # into the fit
        repro.send_signal(signal.SIGTERM)  # to DVC alone, as a scheduler or a closed terminal does
        repro.communicate(timeout=60)
        deadline = time.monotonic() + 15
        while stage_processes(project, "stages.train") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not stage_processes(project, "stages.train"), "train went on without DVC"
        time.sleep(2)
        assert not (project / "models" / "cpu").exists()  # nothing written behind DVC's back
        assert not list((project / "models").glob(".tmp-*"))
    finally:
        for pid in stage_processes(project, "stages.train"):
            os.kill(pid, signal.SIGKILL)
        (project / "params.yaml").write_text(committed)
        dvc(project, "checkout", "-f")


TF_LOG_LINE = r"(?m)^(WARNING: All log messages before absl|[IWE]\d{4} [\d:.]+ +\d+ \S+:\d+\])"


def test_a_default_repro_prints_no_tensorflow_log_line(project):
    import re
    from tests.conftest import dvc
    committed = (project / "params.yaml").read_text()
    set_params(project, **{"base.seed": 7})  # every stage that loads TensorFlow runs again
    try:
        result = dvc(project, "repro")
        assert "Running stage 'train@cpu'" in result.stdout
        assert not re.search(TF_LOG_LINE, result.stdout + result.stderr), result.stderr
    finally:
        (project / "params.yaml").write_text(committed)
        dvc(project, "checkout", "-f")


REAL_ERROR = """
import os
from mnist_cnn.stage import run

def main():
    os.write(2, b"I0000 00:00:1.5    42 port.cc:153] oneDNN custom operations are on.\\n")
    os.write(2, b"E0000 00:00:1.5    42 cuda_dnn.cc:9] a real TensorFlow error line\\n")
    import tensorflow as tf
    tf.debugging.assert_equal(1, 2, message="the test's own failure")

run(main)
"""


def test_a_real_tensorflow_error_still_reaches_the_user(tmp_path):
    result = subprocess.run([sys.executable, "-c", REAL_ERROR], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1
    assert "InvalidArgumentError" in result.stderr and "the test's own failure" in result.stderr
    assert "a real TensorFlow error line" in result.stderr
    assert "oneDNN custom operations" not in result.stderr and "absl::InitializeLog" not in result.stderr
    shown = subprocess.run([sys.executable, "-c", REAL_ERROR], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "MNIST_TF_LOGS": "1"})
    assert "oneDNN custom operations" in shown.stderr  # MNIST_TF_LOGS=1 shows everything


ABORT = """
import os
from mnist_cnn.stage import run

def main():
    os.write(2, b"I0000 00:00:1.5    42 port.cc:153] oneDNN custom operations are on.\\n")
    os.write(2, b"F0000 00:00:1.5    42 check.cc:9] Check failed: a fatal TensorFlow line\\n")
    os.abort()  # as TensorFlow's fatal checks end a process: no Python left to pass anything on

run(main)
"""


def test_a_fatal_line_before_an_abort_still_reaches_the_user():
    result = subprocess.run([sys.executable, "-c", ABORT], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert result.returncode == -signal.SIGABRT
    assert "Check failed: a fatal TensorFlow line" in result.stderr
    assert "oneDNN custom operations" not in result.stderr
