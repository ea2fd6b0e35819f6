"""predict on PNG/JPEG/npz files, with a model trained here on the sample (default architecture, 2 epochs)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from stages import build_init_weights, predict, train
from stages.common import UserError, import_keras
from tests.conftest import ROOT, SAMPLE, readme_block, tiny_params, write_params, write_processed


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model folder, raw test images, test labels, the network's own predictions on their standardized forms)."""
    tmp = tmp_path_factory.mktemp("predict")
    with np.load(SAMPLE) as npz:
        raw = {name: npz[name] for name in npz.files}
    arrays, _ = write_processed(tmp / "data", raw)
    params = tiny_params(**{"train.epochs": 2, "train.batch_size": 64})
    params["model"] = yaml.safe_load((ROOT / "params.yaml").read_text())["model"]  # the seed's CNN
    p = write_params(tmp / "params.yaml", params)
    build_init_weights.main(["--out", str(tmp / "init"), "--metrics", str(tmp / "m.json"),
                             "--details", str(tmp / "md.json"), "--params", str(p)])
    train.main(["--device", "cpu", "--data", str(tmp / "data"), "--init", str(tmp / "init"), "--out", str(tmp / "cpu"),
                "--metrics", str(tmp / "t.json"), "--details", str(tmp / "d.json"), "--live", str(tmp / "live"),
                "--params", str(p)])
    keras = import_keras("tensorflow", device="cpu")
    oracle = keras.models.load_model(tmp / "cpu" / "model.keras").predict(arrays["x_test"][:20], verbose=0)
    return tmp / "cpu", raw["x_test"][:20], raw["y_test"][:20], oracle.argmax(axis=1)


def run_predict(trained, files, capsys, *extra):
    model, *_ = trained
    try:
        predict.main([*map(str, files), "--model", str(model), *extra])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_png_digits_cut_from_the_test_set_get_the_models_answers(trained, tmp_path, capsys):
    _, images, labels, oracle = trained
    files = []
    for i, img in enumerate(images):
        files.append(tmp_path / f"digit{i}.png")
        Image.fromarray(img).save(files[-1])
    code, out, _ = run_predict(trained, files, capsys, "--json")
    answers = [r["digit"] for r in json.loads(out)]
    assert code == 0 and answers == oracle.tolist()  # exactly the training preprocessing
    assert np.mean(np.array(answers) == labels) >= 0.9


def test_photos_black_on_white_any_size_are_inverted_and_centred(trained, tmp_path, capsys):
    _, images, labels, _ = trained
    files = []
    for i, img in enumerate(images[:10]):
        canvas = np.full((150, 120), 255, np.uint8)  # white paper, digit off-centre
        canvas[20:104, 10:94] = 255 - np.asarray(Image.fromarray(img).resize((84, 84), Image.BILINEAR))
        files.append(tmp_path / f"photo{i}.jpg")
        Image.fromarray(canvas).save(files[-1], quality=90)
    code, out, _ = run_predict(trained, files, capsys, "--json")
    answers = np.array([r["digit"] for r in json.loads(out)])
    assert code == 0 and np.mean(answers == labels[:10]) >= 0.8


def test_bad_files_get_one_line_each_and_the_others_still_answers(trained, tmp_path, capsys):
    _, images, labels, oracle = trained
    good = tmp_path / "good.png"
    Image.fromarray(images[0]).save(good)
    empty, text, arrays = tmp_path / "empty.png", tmp_path / "notes.png", tmp_path / "batch.npz"
    empty.touch()
    text.write_text("not a picture")
    np.savez(arrays, first=images[1], rest=images[2:4])
    code, out, err = run_predict(trained, [empty, good, text, arrays, tmp_path / "missing.png"], capsys)
    assert code == 1
    assert out.splitlines()[0].startswith(f"{good}: {oracle[0]} (")
    assert [line.split(": ")[0] for line in out.splitlines()[1:]] == [
        f"{arrays}:first[0]", f"{arrays}:rest[0]", f"{arrays}:rest[1]"]
    assert err.splitlines() == [f"error: {empty}: empty file",
                                f"error: {text}: not an image PIL can read (UnidentifiedImageError)",
                                f"error: {tmp_path / 'missing.png'}: no such file"]


def test_npz_of_the_wrong_shape_is_refused(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, x=np.zeros((3, 32, 32)))
    with pytest.raises(UserError, match=r"array 'x' has shape \(3, 32, 32\); expected \(28, 28\)"):
        predict.read_inputs(path)


def test_to_mnist_keeps_28x28_and_centres_bigger_images(sample_raw):
    digit = sample_raw["x_test"][0]
    assert np.array_equal(predict.to_mnist(digit), digit)
    assert np.array_equal(predict.to_mnist(255 - digit), digit)  # light background: inverted back
    canvas = np.zeros((300, 200))
    canvas[10:110, 5:105] = np.asarray(Image.fromarray(digit).resize((100, 100)))
    out = predict.to_mnist(canvas)
    ys, xs = np.nonzero(out > 0.3 * out.max())
    assert out.shape == (28, 28) and max(np.ptp(ys), np.ptp(xs)) <= 20
    cy, cx = (np.indices(out.shape) * out).reshape(2, -1).sum(axis=1) / out.sum()
    assert abs(cy - 14) <= 1 and abs(cx - 14) <= 1


def test_the_classifier_loads_and_predicts_as_the_readme_shows(trained, tmp_path):
    """README's lines, run as written, in a process that imports Keras only (no code of ours), safe mode on.

    Fed raw uint8 test images, the classifier answers what the network answers on x_test.npy: the
    standardization inside it is the training's.
    """
    model, images, _, oracle = trained
    code = readme_block("Use the trained model", "python")
    assert len(code.strip().splitlines()) <= 3 and "import stages" not in code and "safe_mode=False" not in code
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "cpu").symlink_to(model)
    (tmp_path / "data" / "raw").mkdir(parents=True)
    np.save(tmp_path / "data" / "raw" / "x_test.npy", images)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "KERAS_BACKEND": "tensorflow", "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr
    assert [int(d) for d in out.stdout.strip().splitlines()[-1].strip("[]").split()] == oracle[:10].tolist()


def test_the_classifier_gives_the_networks_probabilities_on_pixels(trained):
    """classifier.keras on uint8 pixels == model.keras on the standardized images, to the last bit."""
    model, images, _, _ = trained
    keras = import_keras("tensorflow", device="cpu")
    classifier = keras.models.load_model(model / "classifier.keras")  # safe mode, the default
    assert classifier.input.dtype == "uint8" and tuple(classifier.input.shape) == (None, 28, 28)
    assert {type(layer).__name__ for layer in classifier.get_layer("standardize").layers} <= {
        "Reshape", "Rescaling", "Embedding"}  # Keras's own layers: loads anywhere Keras 3 does
    network = keras.models.load_model(model / "model.keras")
    scaler = json.loads((model.parent / "data" / "scaler.json").read_text())
    x = ((images.reshape(len(images), -1) - np.array(scaler["mean"])) / np.array(scaler["scale"]))
    x = x.astype(np.float32).reshape(-1, 28, 28, 1)
    assert np.array_equal(classifier.predict(images, verbose=0), network.predict(x, verbose=0))
