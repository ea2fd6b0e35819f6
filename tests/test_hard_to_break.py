"""Failure is failure: bad params, a diverged run, damaged inputs, hostile files for predict.

Each class of bad input that issue #9 lists gets one clear line naming what is
wrong, a non-zero exit, and nothing written. The README's table "When things
go wrong" names these tests.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from stages import evaluate
from tools import predict
from mnist_cnn.errors import UserError
from mnist_cnn.params import load_params
from mnist_cnn.files import to_json, write_json
from tests.conftest import ROOT, run_train, tiny_params, write_params, write_processed
from mnist_cnn.params import TrainParams
from mnist_cnn.training import fit_size
from mnist_cnn.vision import read_image

# --- params: DVC's YAML 1.2, duplicates, bytes, finite numbers, rules across keys ---------------


def params_text(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def committed_params():
    return (ROOT / "params.yaml").read_text()


def test_params_are_read_as_dvc_reads_them_yaml_1_2(tmp_path):
    """`1e-3` is a number for DVC (YAML 1.2) and was a string for PyYAML (1.1): the stages now agree with DVC."""
    path = params_text(tmp_path, committed_params().replace("learning_rate: 0.001", "learning_rate: 1e-3"))
    assert load_params(path, train=TrainParams)["train"].learning_rate == 0.001
    from dvc.utils.serialize import load_yaml
    assert load_yaml(str(path))["train"]["learning_rate"] == 0.001


def test_a_duplicate_key_is_refused_not_the_last_one_taken(tmp_path):
    path = params_text(tmp_path, committed_params().replace("  epochs: 5\n", "  epochs: 5\n  epochs: 50\n"))
    with pytest.raises(UserError, match=r'params.yaml: line \d+: found duplicate key "epochs".*keep one'):
        load_params(path, train=TrainParams)


def test_bytes_that_are_not_utf8_are_one_line(tmp_path):
    path = params_text(tmp_path, committed_params().encode().replace(b"rmsprop |", b"rmsprop \xff|"))
    with pytest.raises(UserError, match=r"params.yaml: line \d+ is not UTF-8 text \(byte 0xff\); save the file"):
        load_params(path, train=TrainParams)


@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan", "1e400"])
def test_params_floats_must_be_finite(tmp_path, text):
    path = params_text(tmp_path, committed_params().replace("learning_rate: 0.001", f"learning_rate: {text}"))
    with pytest.raises(UserError, match=r"train.learning_rate = .*: Input should be a finite number"):
        load_params(path, train=TrainParams)


@pytest.mark.parametrize("change, message", [
    ({"train.lr_decay_epochs": 1e308}, r"train.lr_decay_epochs = 1e\+308: Input should be less than or equal"),
    ({"base.seed": 2**40}, r"base.seed = 1099511627776: Input should be less than 4294967296"),
    ({"model.conv_blocks.conv1.filters": 10**9}, r"filters = 1000000000: Input should be less than or equal"),
])
def test_numbers_too_large_to_run_are_refused(change, message):
    from mnist_cnn.params import ModelParams
    from mnist_cnn.params import BaseParams, validate
    name = next(iter(change)).split(".")[0]
    schema = {"train": TrainParams, "base": BaseParams, "model": ModelParams}[name]
    with pytest.raises(UserError, match=message):
        validate(tiny_params(**change)[name], schema, name)


def test_rules_across_keys_are_seen_by_every_stage_that_reads_the_section(tmp_path):
    """train.devices = [cpu, cpu] was caught by train alone: report reads `train` too, and now refuses it."""
    path = write_params(tmp_path / "params.yaml", tiny_params(**{"train.devices": ["cpu", "cpu"]}))
    result = subprocess.run([sys.executable, "-m", "stages.report", "--details", "d", "--plots", "p", "--live", "l",
                             "--out", "o", "--curves", "c", "--params", str(path)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: params.yaml: train.devices = ['cpu', 'cpu']: list each device once"


@pytest.mark.parametrize("split, message", [
    (1e-17, r"train.validation_split = 1e-17 holds out no image of 1000; use at least 0.001"),
    (0.99999, r"train.validation_split = 0.99999 leaves no training image of 1000; use at most 0.999"),
])
def test_a_validation_split_that_leaves_a_side_empty_is_one_line(prepared, tmp_path, split, message):
    """Found by the fuzzer: Keras splits at floor(n x (1 - split)) and fails mid-way if a side is empty."""
    with pytest.raises(UserError, match=message):
        run_train(prepared, tmp_path, **{"train.validation_split": split})
    assert fit_size(1000, 1e-5) == 999 and fit_size(60_000, 0.2) == 48_000  # Keras's own split


# --- a run that went wrong is a failure ------------------------------------------------------------

def test_a_diverged_run_fails_at_once_and_writes_nothing(prepared, tmp_path):
    # NaN on some CPUs, a huge finite loss on others (an EPYC with AVX-512 gave 3.7e30): a failure either way
    with pytest.raises(UserError, match=r"training diverged: the loss is (nan|inf|\S+, over 1000 times the initial "
                                        r"weights' \S+,) at epoch 1, batch \d+; nothing was "
                                        r"written\. Lower train.learning_rate \(now 1e\+30\)") as err:
        run_train(prepared, tmp_path, **{"train.learning_rate": 1e30, "train.epochs": 3})
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no model, metrics, details, live log


def test_every_json_the_project_writes_is_strict(tmp_path):
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_json(tmp_path / "m.json", {"final_loss": float("nan")})
    assert not (tmp_path / "m.json").exists()
    assert to_json({"a": 1.5}) == '{"a": 1.5}'


# --- models and the data they were trained on ------------------------------------------------------

def test_evaluate_refuses_a_model_trained_with_another_scaler(prepared, tmp_path, sample_raw):
    out, _ = run_train(prepared, tmp_path / "run")
    other = tmp_path / "other"
    write_processed(other, sample_raw, procedure="pooled_resplit")  # another scaler.json
    p = write_params(tmp_path / "params.yaml", tiny_params())
    with pytest.raises(UserError, match=r"was trained on images standardized by another scaler than .*other/"
                                        r"scaler.json; run `dvc repro`"):
        evaluate.main(["--device", "cpu", "--data", str(other), "--model", str(out), "--metrics",
                       str(tmp_path / "m.json"), "--details", str(tmp_path / "d.json"), "--predictions",
                       str(tmp_path / "p.csv"), "--mistakes", str(tmp_path / "m.png"), "--params", str(p)])
    assert not (tmp_path / "m.json").exists()


def test_a_truncated_model_file_is_named_with_its_recovery(prepared, tmp_path):
    from mnist_cnn.files import check_files
    out, _ = run_train(prepared, tmp_path / "run")
    (out / "model.keras").write_bytes((out / "model.keras").read_bytes()[:5000])
    with pytest.raises(UserError, match=r"model.keras is damaged \(5000 bytes; train@cpu wrote \d+ bytes, md5 "):
        check_files(out, ["model.keras"])


# --- predict: hostile and meaningless inputs -------------------------------------------------------

@pytest.fixture(scope="module")
def model(prepared):
    out, _ = run_train(prepared, prepared / "predict_model")
    return out


def predict_on(model, files, capsys):
    try:
        predict.main([*map(str, files), "--model", str(model), "--json"])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, {r["file"]: r for r in json.loads(captured.out)}


def test_bad_npz_contents_are_one_line_each_and_good_files_still_answer(model, tmp_path, capsys, sample_raw):
    good = tmp_path / "good.png"
    Image.fromarray(sample_raw["x_test"][0]).save(good)
    cases = {
        "strings.npz": {"x": np.array([["a"] * 28] * 28)},
        "nan.npz": {"x": np.full((28, 28), np.nan)},
        "inf.npz": {"x": np.full((28, 28), np.inf)},
        "negative.npz": {"x": np.full((28, 28), -5.0)},
        "above.npz": {"x": np.full((28, 28), 300.0)},
        "empty.npz": {"x": np.zeros((0, 28, 28))},
    }
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
    code, results = predict_on(model, [tmp_path / n for n in cases] + [good], capsys)
    assert code == 1 and "digit" in results[str(good)]
    errors = {n: results[str(tmp_path / n)]["error"] for n in cases}
    assert "expected numbers" in errors["strings.npz"]
    assert "NaN or infinite" in errors["nan.npz"] and "NaN or infinite" in errors["inf.npz"]
    assert "from -5.0 to -5.0; they must be 0..255" in errors["negative.npz"]
    assert "must be 0..255" in errors["above.npz"]
    assert "holds no image" in errors["empty.npz"]


def test_blank_pages_are_no_digit_not_a_guess(model, tmp_path, capsys):
    white, black = tmp_path / "white.png", tmp_path / "black.jpg"
    Image.fromarray(np.full((200, 150), 255, np.uint8)).save(white)
    Image.fromarray(np.full((28, 28), 3, np.uint8)).save(black)
    transparent = tmp_path / "transparent.png"
    Image.new("RGBA", (100, 100), (0, 0, 0, 0)).save(transparent)
    code, results = predict_on(model, [white, black, transparent], capsys)
    assert code == 1
    assert all(results[str(f)]["error"].endswith("no digit found (the image is blank)")
               for f in (white, black, transparent))


def test_a_digit_on_a_transparent_background_reads_as_the_same_digit_on_paper(model, tmp_path, capsys, sample_raw):
    digits = sample_raw["x_test"][:10]
    files = []
    for i, digit in enumerate(digits):
        big = np.asarray(Image.fromarray(digit).resize((112, 112), Image.BILINEAR))
        rgba = np.zeros((112, 112, 4), np.uint8)  # black ink, its shape in the alpha channel only
        rgba[..., 3] = big
        files.append(tmp_path / f"ink{i}.png")
        Image.fromarray(rgba, "RGBA").save(files[-1])
        paper = 255 - big  # the same digit, black on white paper
        files.append(tmp_path / f"paper{i}.png")
        Image.fromarray(paper).save(files[-1])
    code, results = predict_on(model, files, capsys)
    assert code == 0
    for i in range(10):
        ink, paper = results[str(tmp_path / f"ink{i}.png")], results[str(tmp_path / f"paper{i}.png")]
        assert ink["digit"] == paper["digit"] and ink["probabilities"] == pytest.approx(paper["probabilities"],
                                                                                        abs=1e-3)


@pytest.mark.parametrize("width, height", [(10_000, 6_000), (12_000, 9_000)])  # over PIL's own limits too
def test_an_image_over_the_pixel_limit_is_refused_before_it_is_decoded(model, tmp_path, capsys, width, height):
    import resource
    import warnings
    huge = tmp_path / "huge.png"
    Image.new("L", (width, height), 255).save(huge, optimize=True)  # 60 or 108 megapixels in a small file
    assert huge.stat().st_size < 2_000_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning would be a second, multi-line message
        code, results = predict_on(model, [huge], capsys)
    assert code == 1
    assert results[str(huge)]["error"] == f"{huge}: {width}x{height} pixels is over the limit of 50,000,000; " \
                                          f"scale it down first"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KB: not decoded


def test_any_exception_reading_one_file_is_one_line_for_that_file(model, tmp_path, capsys, monkeypatch, sample_raw):
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.fromarray(sample_raw["x_test"][0]).save(good)
    Image.fromarray(sample_raw["x_test"][1]).save(bad)
    real = read_image

    def explode(path):
        if path.name == "bad.png":
            raise MemoryError("no memory for this one")
        return real(path)

    monkeypatch.setattr(predict, "read_image", explode)
    code, results = predict_on(model, [bad, good], capsys)
    assert code == 1 and "digit" in results[str(good)]
    assert results[str(bad)]["error"] == f"{bad}: cannot be read (MemoryError: no memory for this one)"


def test_an_npz_of_more_images_than_the_limit_is_refused_from_its_headers(tmp_path):
    path = tmp_path / "many.npz"
    np.savez_compressed(path, x=np.zeros((100_001, 28, 28), np.uint8))  # 78 MB of zeros in a small file
    with pytest.raises(UserError, match="100,001 images is over the limit of 100,000 per file"):
        predict.open_input(path)


@pytest.mark.parametrize("damage", [b"actual,predicted\n3,x\n", b"\xff\xfe garbage", b"a,b\n1,2\n"])
def test_a_damaged_predictions_csv_is_one_line_for_report(tmp_path, damage):
    from mnist_cnn.facts import confusion_from_csv
    path = tmp_path / "predictions_cpu.csv"
    path.write_bytes(damage)
    with pytest.raises(UserError, match=r"predictions_cpu.csv is damaged \(.*\); run `dvc repro --single-item -f "
                                        r"evaluate@cpu` to write it again"):
        confusion_from_csv(path, "evaluate@cpu")


def test_a_damaged_dvclive_log_is_one_line_for_report(tmp_path):
    from mnist_cnn.facts import read_curves
    tsv = tmp_path / "plots" / "metrics" / "train" / "loss.tsv"
    tsv.parent.mkdir(parents=True)
    tsv.write_text("step\tloss\n1\t0.5\n2\tgarbage\n")
    with pytest.raises(UserError, match=r"loss.tsv is damaged \(ValueError: .*\); run `dvc repro --single-item -f "
                                        r"train@gpu` to write it again"):
        read_curves(tmp_path, "train@gpu")
