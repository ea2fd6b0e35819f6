import json
import subprocess

import pytest
import yaml

from stages import report
from mnist_cnn.errors import UserError
from tests.conftest import ROOT, tiny_params, write_params


def fake_run_files(folder, device, fit_time_s, accuracy):
    (folder / "details").mkdir(exist_ok=True)
    (folder / "plots").mkdir(exist_ok=True)
    (folder / "details" / f"train_{device}.json").write_text(json.dumps({
        "device_name": f"{device} name", "backend": "tensorflow", "backend_version": "2.21.0",
        "keras_version": "3.15.1", "fit_time_s": fit_time_s, "time_per_epoch_s": fit_time_s / 5,
        "samples_per_s": 60000 * 5 / fit_time_s, "fit_cpu_s": 1.5 * fit_time_s, "cores_busy": 1.5,
        "final_accuracy": 0.99, "cpu_model": "Test CPU"}))
    errors = round((1 - accuracy) * 4)
    (folder / "details" / f"evaluate_{device}.json").write_text(json.dumps({
        "test": {"loss": 0.03, "accuracy": accuracy, "errors": errors, "images": 4},
        "per_class": {str(d): {"precision": 1.0, "recall": 1.0} for d in range(10)}}))
    rows = ["index,actual,predicted,confidence", "0,7,7,0.99", "1,2,2,0.98", "2,1,1,0.97", "3,4,9,0.60"]
    (folder / "plots" / f"predictions_{device}.csv").write_text("\n".join(rows) + "\n")
    (folder / "plots" / f"mistakes_{device}.png").write_bytes(PNG_1x1)
    curves = folder / "dvclive" / f"train_{device}" / "plots" / "metrics"
    for split, metric in [("train", "loss"), ("train", "accuracy"), ("train", "learning_rate"), ("eval", "loss")]:
        (curves / split).mkdir(parents=True, exist_ok=True)
        (curves / split / f"{metric}.tsv").write_text(f"step\t{metric}\n1\t0.5\n2\t0.25\n")


# The smallest valid PNG (1x1, grey), standing in for evaluate's picture of mistakes.
PNG_1x1 = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010800000000"
                        "3a7e9b550000000a4944415478da63600000000200015b8e45b20000000049454e44ae426082")


LAYERS = [{"layer": "conv1", "type": "Conv2D", "output_shape": "26x26x32", "weights": 320},
          {"layer": "output", "type": "Dense", "output_shape": "10", "weights": 96_524}]


def run_report(tmp_path, devices, full=True, **params):
    (tmp_path / "details").mkdir(exist_ok=True)
    (tmp_path / "details" / "data.json").write_text(json.dumps(
        {"source": "MNIST_NPZ" if full else "sample", "full_mnist": full,
         "train_images": 60000 if full else 6000, "test_images": 10000 if full else 1000}))
    (tmp_path / "details" / "model.json").write_text(json.dumps({"weights": 96844, "layers": 2,
                                                                 "layer_table": LAYERS}))
    p = write_params(tmp_path / "params.yaml", tiny_params(**{"train.devices": devices}, **params))
    report.main(["--details", str(tmp_path / "details"), "--plots", str(tmp_path / "plots"),
                 "--live", str(tmp_path / "dvclive"),
                 "--out", str(tmp_path / "reports"), "--curves", str(tmp_path / "reports" / "curves"),
                 "--params", str(p)])
    return (tmp_path / "reports" / "report.md").read_text()


@pytest.mark.parametrize("scaler, says", [("per_pixel", "standardized per pixel"),
                                          ("global", "one mean and one deviation over every pixel")])
def test_both_pages_say_how_the_inputs_were_standardized_from_the_params(tmp_path, scaler, says):
    """One description per preprocess.scaler (mnist_cnn.params.SCALERS), in report.md and report.html alike."""
    fake_run_files(tmp_path, "cpu", 50.0, 1.0)
    text = run_report(tmp_path, ["cpu"], **{"preprocess.scaler": scaler})
    page = (tmp_path / "reports" / "report.html").read_text()
    assert says in text and says in page
    other = {"per_pixel": "one mean and one deviation", "global": "standardized per pixel"}[scaler]
    assert other not in text and other not in page


def test_the_layer_table_is_rendered_from_the_recorded_layers_in_both_pages(tmp_path):
    fake_run_files(tmp_path, "cpu", 50.0, 1.0)
    text = run_report(tmp_path, ["cpu"])
    page = (tmp_path / "reports" / "report.html").read_text()
    assert "| conv1 | Conv2D | 26x26x32 | 320 |" in text and "| **total** |  |  | **96,844** |" in text
    assert "<td>conv1</td><td>Conv2D</td><td>26x26x32</td><td>320</td>" in page
    assert "<td>total</td><td></td><td></td><td>96,844</td>" in page


def test_details_from_an_older_build_init_weights_ask_for_a_rerun(tmp_path):
    fake_run_files(tmp_path, "cpu", 50.0, 1.0)
    run_report(tmp_path, ["cpu"])
    (tmp_path / "details" / "model.json").write_text(json.dumps({"weights": 96844, "layers": 2}))
    p = write_params(tmp_path / "params.yaml", tiny_params())
    with pytest.raises(UserError, match=r"model.json has no layer_table .*: run `dvc repro`"):
        report.main(["--details", str(tmp_path / "details"), "--plots", str(tmp_path / "plots"),
                     "--live", str(tmp_path / "dvclive"), "--out", str(tmp_path / "reports"),
                     "--curves", str(tmp_path / "reports" / "curves"), "--params", str(p)])


def test_cpu_and_gpu_side_by_side_beside_the_seed(tmp_path):
    fake_run_files(tmp_path, "cpu", 50.0, 0.75)
    fake_run_files(tmp_path, "gpu", 5.0, 0.75)
    text = run_report(tmp_path, ["cpu", "gpu"])
    assert "Data: **full MNIST**, 60,000 training and 10,000 test images (source: MNIST_NPZ)" in text
    assert "| cpu | cpu name (tensorflow 2.21.0, Keras 3.15.1) | 50.0 s | 10.00 s | 6,000 | 75.0 s (1.5) |" in text
    assert "| gpu | gpu name" in text and "The GPU fit was 10.0x as fast as the CPU fit." in text
    assert "| seed (published, 5 epochs) | 99.0% | 20.6 s | NVIDIA GeForce GTX 960 |" in text
    assert "| 4 | 0 | 0 | 0 | 0 | 0 | 0 | 0 | 0 | 0 | 1 |" in text  # the 4 taken for a 9
    assert "96,844 weights" in text and "WARNING" not in text


def test_sample_data_is_a_loud_warning(tmp_path):
    fake_run_files(tmp_path, "cpu", 50.0, 1.0)
    text = run_report(tmp_path, ["cpu"], full=False)
    assert text.splitlines()[2].startswith("> **WARNING: trained on the 7,000-image SAMPLE")
    assert "GPU fit" not in text


def test_a_device_that_did_not_run_is_an_error_not_a_blank(tmp_path):
    fake_run_files(tmp_path, "cpu", 50.0, 1.0)
    with pytest.raises(UserError, match="train_gpu.json not found: run `dvc repro`"):
        run_report(tmp_path, ["cpu", "gpu"])
    assert not (tmp_path / "reports" / "report.md").exists()


def test_the_html_page_is_self_contained_and_says_what_ran(tmp_path):
    fake_run_files(tmp_path, "cpu", 50.0, 0.75)
    fake_run_files(tmp_path, "gpu", 5.0, 0.75)
    run_report(tmp_path, ["cpu", "gpu"], full=False)
    page = (tmp_path / "reports" / "report.html").read_text()
    assert "WARNING: trained on the 7,000-image SAMPLE" in page
    assert page.count("<img ") == 7  # fit-time chart, then curves, confusion and mistakes per device
    assert page.count("src='data:image/png;base64,") == 7  # every image embedded: nothing to fetch
    assert "http://" not in page and "https://" not in page
    assert "code version" in page and "keras 3.15.1" in page and "cpu: cpu name (Test CPU)" in page
    # the layer table, as report.md has it, and a caption that says what the mistakes' captions mean
    assert ("<tr><td>conv1</td><td>Conv2D</td><td>26x26x32</td><td>320</td></tr><tr><td>output</td><td>Dense</td>"
            "<td>10</td><td>96,524</td></tr><tr><td>total</td><td></td><td></td><td>96,844</td></tr>") in page
    assert "under each, the true digit, the digit the model read" in page


def test_the_curves_for_dvc_plots_hold_every_device_and_split_by_epoch(tmp_path):
    """One CSV per curve, epochs from 1, a series per device and split, whatever ran: what dvc.yaml's plots read."""
    fake_run_files(tmp_path, "cpu", 50.0, 0.75)
    fake_run_files(tmp_path, "gpu", 5.0, 0.75)
    run_report(tmp_path, ["cpu", "gpu"])
    curves = tmp_path / "reports" / "curves"
    assert sorted(p.name for p in curves.iterdir()) == ["accuracy.csv", "epoch_time_s.csv", "learning_rate.csv",
                                                       "loss.csv"]
    assert (curves / "loss.csv").read_text().splitlines() == [
        "epoch,series,loss", "1,cpu training,0.5", "2,cpu training,0.25", "1,cpu validation,0.5",
        "2,cpu validation,0.25", "1,gpu training,0.5", "2,gpu training,0.25", "1,gpu validation,0.5",
        "2,gpu validation,0.25"]
    assert (curves / "learning_rate.csv").read_text().splitlines()[:2] == ["epoch,series,learning_rate", "1,cpu,0.5"]
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    declared = {next(iter(plot)) for plot in dvc_yaml["plots"]} - {"live"}  # live/: train's, while it runs
    assert declared == {f"reports/curves/{p.name}" for p in curves.iterdir()}  # each curve file has its chart


def test_the_committed_report_is_from_the_full_data():
    """The report committed on HEAD (not the workspace's, which an offline `dvc repro` makes from the sample)."""
    shown = subprocess.run(["git", "show", "HEAD:reports/report.md"], cwd=ROOT, capture_output=True, text=True)
    if shown.returncode != 0:
        pytest.skip("not a git checkout with a committed report")
    assert "Data: **full MNIST**" in shown.stdout and "96,844 weights" in shown.stdout
