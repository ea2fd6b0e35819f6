"""The DVC pipeline as a user drives it: `dvc repro` in a temporary copy, on the sample, tiny settings.

The caching table: after a full run, a second `dvc repro` runs nothing, and a
change to one params section reruns exactly the stages that read it.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages import report
from tests.conftest import (ALL_CPU_STAGES, CHROMIUM, ROOT, SCHEMAS, dvc, dvc_env, needs_chromium, ran, readme_block,
                            tiny_params, write_params)
from mnist_cnn.params import count_weights
from mnist_cnn.params import EvaluateParams, FetchParams, ModelParams, PreprocessParams, TrainParams


def test_second_repro_runs_nothing(project):
    assert ran(dvc(project, "repro")) == set()


@pytest.mark.parametrize("key, value, must_run, may_run", [
    ("train.epochs", 2, {"train@cpu", "evaluate@cpu", "report"}, set()),
    ("train.learning_rate", 0.002, {"train@cpu", "evaluate@cpu", "report"}, set()),
    ("train.augment.rotation", 5.0, {"train@cpu", "evaluate@cpu", "report"}, set()),
    ("model.dense_layers.dense1.units", 12, {"build_init_weights", "train@cpu", "evaluate@cpu", "report"}, set()),
    ("preprocess.procedure", "pooled_resplit", ALL_CPU_STAGES - {"fetch", "build_init_weights"}, set()),
    ("evaluate.batch_size", 64, {"evaluate@cpu"}, {"report"}),
    ("train.gpu.memory_growth", False, set(), {"report"}),  # only train@gpu reads it, and it is not in devices
])
def test_a_params_change_reruns_only_what_it_affects(project, key, value, must_run, may_run):
    params_file = project / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    *path, last = key.split(".")
    node = params
    for part in path:
        node = node[part]
    node[last] = value
    write_params(params_file, params)
    try:
        stages = ran(dvc(project, "repro"))
        assert must_run <= stages <= must_run | may_run, stages
    finally:
        params_file.write_text(original)
        restored = ran(dvc(project, "repro"))
    # back to the baseline from DVC's run cache, without running a stage again but report (its outputs are in git)
    assert restored <= {"report"}, restored
    assert ran(dvc(project, "repro")) == set()


def test_the_report_names_the_sample(project):
    text = (project / "reports" / "report.md").read_text()
    assert "SAMPLE of MNIST, not the full data set" in text and "96,844" not in text  # tiny model


def flat_keys(tree, prefix=""):
    return {k for key, value in tree.items()
            for k in (flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"})}


def test_metrics_show_fits_a_terminal_and_holds_the_headline(project):
    """What runs are compared by, in 120 columns; no metric named as a param (DVC would rename the column)."""
    shown = dvc(project, "metrics", "show").stdout.splitlines()
    assert max(map(len, shown)) <= 120, "\n".join(shown)
    assert shown[0].split() == ["Path", "fit_time_s", "full_mnist", "test.accuracy", "test.loss", "weights"]
    assert [line.split()[0] for line in shown[1:]] == [
        "metrics/data.json", "metrics/model.json", "metrics/train_cpu.json", "metrics/evaluate_cpu.json"]
    metric_names = set().union(*(flat_keys(json.loads(p.read_text())) for p in (project / "metrics").glob("*.json")))
    assert not metric_names & flat_keys(yaml.safe_load((project / "params.yaml").read_text()))
    details = json.loads((project / "details" / "evaluate_cpu.json").read_text())
    assert set(details["per_class"]) == {str(d) for d in range(10)}  # the details are kept, for the report


def test_params_diff_names_the_changed_key(project):
    params_file = project / "params.yaml"
    original = params_file.read_text()
    write_params(params_file, tiny_params(**{"train.epochs": 3, "model.conv_blocks.conv1.filters": 6}))
    try:
        diff = dvc(project, "params", "diff").stdout
    finally:
        params_file.write_text(original)
    assert re.search(r"train\.epochs\s+1\s+3", diff), diff
    assert re.search(r"model\.conv_blocks\.conv1\.filters\s+4\s+6", diff), diff


def test_a_bad_param_fails_repro_with_one_line_and_leaves_nothing_half_written(project):
    params_file = project / "params.yaml"
    original = params_file.read_text()
    before = (project / "details" / "train_cpu.json").read_text()
    write_params(params_file, tiny_params(**{"train.optimizer": "adagrad"}))
    try:
        result = dvc(project, "repro", check=False)
    finally:
        params_file.write_text(original)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: params.yaml: train.optimizer = 'adagrad': "
                      "Input should be 'rmsprop', 'sgd' or 'adam'; to get its last good outputs back: "
                      "`dvc checkout train@cpu && git checkout -- metrics/train_cpu.json`"], result.stderr
    leftovers = [p for folder in ("data", "models", "metrics", "details", "plots", "reports")
                 if (project / folder).exists()
                 for p in (project / folder).glob(".*") if p.name != ".gitignore"]
    assert leftovers == []  # no temporary files or folders left behind
    # DVC removed the stage's outputs before running it; the next repro brings the same ones back.
    dvc(project, "repro")
    assert (project / "details" / "train_cpu.json").read_text().count("final_loss") == 1
    assert json_value(project / "details" / "train_cpu.json", "final_loss") == json_value(before, "final_loss")


def json_value(path_or_text, key):
    import json
    text = path_or_text.read_text() if isinstance(path_or_text, Path) else path_or_text
    return json.loads(text)[key]


def test_dvc_yaml_lists_params_that_exist_and_scripts_it_runs():
    """dvc.yaml tells the truth: listed params exist; each stage depends on its own script."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        assert f"stages/{name}.py" in stage["deps"], name
        assert f"-m stages.{name} " in stage["cmd"], name
        assert {p.split(".")[0] for p in stage["params"]} == set(SCHEMAS[name]), name
        for key in stage["params"]:
            node = params
            for part in key.replace("${item}", "cpu").split("."):
                assert part in node, f"{name} lists {key}, which params.yaml lacks"
                node = node[part]
    assert report.main  # report is a stage too


def test_params_yaml_is_valid_for_every_stage():
    from mnist_cnn.params import load_params
    loaded = load_params(ROOT / "params.yaml", fetch=FetchParams, preprocess=PreprocessParams,
                         model=ModelParams, train=TrainParams,
                         evaluate=EvaluateParams)
    assert loaded["train"].devices == ["cpu"]  # the default must run on any machine
    assert count_weights(loaded["model"]) == 96_844


def open_offline(page_file, script, screenshot):
    """Open a page in headless Chromium with the network off; return (problems, what `script` evaluates to).

    Problems: console errors and warnings, uncaught exceptions, failed requests.
    """
    from playwright.sync_api import sync_playwright

    problems = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_context(offline=True, viewport={"width": 1400, "height": 900}).new_page()
            page.on("console", lambda msg: msg.type in ("error", "warning") and problems.append(msg.text))
            page.on("pageerror", lambda err: problems.append(str(err)))
            page.on("requestfailed", lambda req: problems.append(f"failed: {req.url}"))
            page.goto(page_file.as_uri())
            page.wait_for_load_state("networkidle")
            result = page.evaluate(script)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return problems, result


@needs_chromium
def test_report_html_renders_offline_in_a_real_browser(project, tmp_path):
    """Headless Chromium, network off: every image loads, no console errors, the warning shows."""
    problems, (images, text) = open_offline(
        project / "reports" / "report.html",
        "[Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0]), document.body.innerText]",
        tmp_path / "report.png")
    assert problems == []
    assert len(images) == 3 and all(ok for _, ok in images), images  # curves, confusion, mistakes
    assert "WARNING: trained on the 7,000-image SAMPLE" in text and "Test accuracy" in text


# Per chart of the page: its id, the pixels drawn on its canvases that are not white, the images that loaded.
DRAWN = """Array.from(document.querySelectorAll('body > div[id]')).map(div => [
  div.id,
  Array.from(div.querySelectorAll('canvas')).reduce((sum, c) => {
    const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let ink = 0;
    for (let i = 0; i < px.length; i += 4) if (px[i + 3] > 0 && px[i] + px[i + 1] + px[i + 2] < 600) ink++;
    return sum + ink;
  }, 0),
  Array.from(div.querySelectorAll('img')).filter(i => i.complete && i.naturalWidth > 0).length])"""


def declared_plots(devices):
    """The page's chart ids for every plot dvc.yaml declares: DVC names a chart after its file."""
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    # but live/, the curves of a running train, empty once it is done
    files = [next(iter(plot)) for plot in dvc_yaml["plots"] if next(iter(plot)) != "live"]
    files += [next(iter(plot)).replace("${item}", d) for d in devices
              for plot in dvc_yaml["stages"]["evaluate"]["do"]["plots"]]
    return {re.sub(r"[^A-Za-z0-9]", "_", f) for f in files}


@needs_chromium
def test_dvc_plots_show_draws_every_declared_chart_offline(project, tmp_path):
    """`dvc plots show`'s page, network off: every chart dvc.yaml declares is drawn, by the Vega the page carries."""
    dvc(project, "plots", "show")
    page_file = project / "dvc_plots" / "index.html"
    assert not re.search(r"<script[^>]+src=", page_file.read_text())  # nothing to fetch: Vega is inside
    problems, drawn = open_offline(page_file, DRAWN, tmp_path / "plots.png")
    assert problems == []
    assert {chart for chart, _, _ in drawn} == declared_plots(["cpu"])
    for chart, ink, images in drawn:
        assert ink > 2000 or images == 1, (chart, ink, images)  # a chart with its axes and marks, or the picture


def test_the_classifier_is_a_dvc_artifact_that_others_can_get(project, tmp_path):
    """dvc.yaml's `artifacts:`: DVC lists it; a version registered with GTO is what `dvc artifacts get` fetches."""
    from mnist_cnn.backend import import_keras

    # DVC's own reading of dvc.yaml, in a process of its own: DVC in this one would take over its logging
    read = ("import json, sys; from dvc.repo import Repo; a = Repo(sys.argv[1]).artifacts.read()['dvc.yaml']"
            "['mnist-cnn']; print(json.dumps([a.type, a.path, a.labels]))")
    shown = subprocess.run([sys.executable, "-c", read, str(project)], capture_output=True, text=True, check=True)
    kind, path, labels = json.loads(shown.stdout)
    assert kind == "model" and path == "models/cpu/classifier.keras" and "mnist" in labels
    gto = subprocess.run(["gto", "register", "mnist-cnn"], cwd=project, env=dvc_env(project), capture_output=True,
                         text=True)
    assert gto.returncode == 0, gto.stderr
    try:
        dvc(project, "artifacts", "get", str(project), "mnist-cnn", "-o", str(tmp_path / "classifier.keras"))
    finally:
        subprocess.run(["git", "tag", "-d", "mnist-cnn@v0.0.1"], cwd=project, check=True, capture_output=True)
    keras = import_keras("tensorflow", device="cpu")
    classifier = keras.models.load_model(tmp_path / "classifier.keras")
    probabilities = classifier.predict(np.zeros((2, 28, 28), np.uint8), verbose=0)
    assert probabilities.shape == (2, 10) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)


def readme_commands(section):
    """The commands of the first bash block under the README's heading `## {section}`, as lists of words."""
    return [shlex.split(line.split("  #")[0]) for line in readme_block(section, "bash").splitlines() if line.strip()]


@pytest.mark.long
def test_the_readmes_experiments_section_runs_as_written(project):
    """Every command of README's Experiments section, in order, in one project; then a failure, as the table shows it.

    On the sample with a tiny network (the project fixture), so it takes a minute or two.
    """
    commands = readme_commands("Experiments")
    assert commands[0][:3] == ["dvc", "exp", "run"]
    assert commands[-1] == ["python", "-m", "tools.experiments", "--fail"]
    outputs = []
    try:
        for words in commands:
            if words[0] == "dvc":
                outputs.append(dvc(project, *words[1:]))
            else:
                program = sys.executable if words[0] == "python" else words[0]
                result = subprocess.run([program, *words[1:]], cwd=project, capture_output=True, text=True,
                                        env=dvc_env(project))
                assert result.returncode == 0, f"{words}:\n{result.stdout}\n{result.stderr}"
                outputs.append(result)
        by_command = {" ".join(words[:3]): out.stdout for words, out in zip(commands, outputs, strict=True)}
        assert ran(outputs[0]) == {"train@cpu", "evaluate@cpu", "report"}
        assert re.search(r"train\.epochs\s+1\s+3", by_command["dvc params diff"])
        overlay = plots_data(project / "dvc_plots" / "index.html", "reports_curves_loss_csv")
        assert {row["rev"] for row in overlay} == {"HEAD", "epochs3"}  # both runs' curves in one chart
        check_change_report(project, by_command["python -m tools.compare"])
        table = by_command["python -m tools.experiments"].splitlines()
        assert max(map(len, table)) <= 120, "\n".join(table)
        header = re.split(r"\s{2,}", table[0])
        assert header[:2] == ["Experiment", "State"] and "optimizer" in header and "cpu acc" in header
        workspace = re.split(r"\s{2,}", table[1].strip())  # the committed params beside epochs3's outputs
        assert workspace[:2] == ["workspace", "Changed"] and workspace[header.index("cpu acc")] == "-", table[1]
        sweep = [re.split(r"\s{2,}", line.strip()) for line in table if line.startswith("  ") and "└" not in line]
        optimizer = header.index("optimizer")
        states = {row[optimizer]: row[1] for row in sweep if row[header.index("epochs")] == "1"}
        assert states == {"rmsprop": "Success", "adam": "Success", "sgd": "Success"}, "\n".join(table)

        # A run that fails shows as failed, with its reason and no numbers, never with another run's.
        dvc(project, "exp", "run", "--queue", "-n", "broken", "-S", "train.optimizer=adagrad")
        assert dvc(project, "exp", "run", "--run-all", check=False).returncode == 0  # DVC's: 0 though one failed
        shown = subprocess.run([sys.executable, "-m", "tools.experiments", "--fail"], cwd=project,
                               capture_output=True, text=True, env=dvc_env(project))
        assert shown.returncode == 1 and shown.stderr.startswith("error: 1 experiment(s) failed: broken")
        table = shown.stdout.splitlines()
        row = next(i for i, line in enumerate(table) if line.strip().startswith("broken "))
        cells = re.split(r"\s{2,}", table[row].strip())
        assert cells[1] == "Failed" and cells[header.index("cpu acc")] == "-", table[row]
        assert table[row + 1].strip() == ("└ error: params.yaml: train.optimizer = 'adagrad': "
                                          "Input should be 'rmsprop', 'sgd' or 'adam'")
    finally:
        subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=project, check=True)
        dvc(project, "exp", "remove", "--all-commits")
        dvc(project, "repro")


def check_change_report(project, printed):
    """tools.compare's report of epochs3 against HEAD: both sides' numbers as their metrics files hold them, the
    changed param, each side's provenance from DVC's cache, and every chart and picture it links to drawn."""
    report = (project / "change-report" / "report.md").read_text()
    assert printed.startswith("wrote change-report/report.md: 1 param(s) differ"), printed
    assert "| train.epochs | 1 | 3 |" in report
    committed = json.loads(subprocess.run(["git", "show", "HEAD:metrics/evaluate_cpu.json"], cwd=project,
                                          capture_output=True, text=True, check=True).stdout)
    experiment = json.loads((project / "metrics" / "evaluate_cpu.json").read_text())  # epochs3's, just run
    accuracy = next(line for line in report.splitlines() if "| test.accuracy |" in line)
    assert [cell.strip() for cell in accuracy.split("|")[3:5]] == [
        f"{committed['test']['accuracy']:.5g}", f"{experiment['test']['accuracy']:.5g}"], accuracy
    code = next(line for line in report.splitlines() if line.startswith("| code |"))
    assert "experiment epochs3, from" in code
    cpu = next(line for line in report.splitlines() if line.startswith("| train@cpu |"))
    assert cpu.count("/physical_device:CPU:0 on ") == 2 and "not here" not in report  # both from DVC's cache
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {"loss.png", "accuracy.png", "predictions_cpu.png", "HEAD_mistakes_cpu.png",
            "epochs3_mistakes_cpu.png"} <= set(links), links
    for link in links:
        assert (project / "change-report" / link).read_bytes().startswith(b"\x89PNG"), link


def plots_data(page_file, chart):
    """The data DVC put into one chart of its page: the spec's inline values."""
    html = page_file.read_text()
    spec = html.split(f'<div id = "{chart}">', 1)[1].split("var spec = ", 1)[1].split(";\n", 1)[0]
    return json.loads(spec)["data"]["values"]


def test_a_damaged_cache_object_is_named_and_the_readmes_recovery_repairs_it(project):
    """DVC trusts its cache: an object damaged in place (same size, same time) is checked out as it is, and
    `dvc status` calls it up to date. The stage that reads it names it, and the command it gives (the
    README's "When things go wrong") repairs the cache; then the pipeline runs again as before.
    """
    dvc(project, "repro")  # whatever the tests before left: the workspace as its params say
    processed = project / "data" / "processed"
    want = json.loads((processed / "manifest.json").read_text())["files"]["x_train.npy"]["md5"]
    obj = project / ".dvc" / "cache" / "files" / "md5" / want[:2] / want[2:]
    stat = obj.stat()
    obj.chmod(0o644)
    data = bytearray(obj.read_bytes())
    data[-10:] = bytes(b ^ 0xFF for b in data[-10:])  # pixels of the last image: still a valid .npy
    obj.write_bytes(bytes(data))
    os.utime(obj, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    shutil.rmtree(processed)
    dvc(project, "checkout")
    assert "up to date" in dvc(project, "status").stdout  # DVC does not see it

    from mnist_cnn.files import file_md5
    assert file_md5(processed / "x_train.npy") != want  # the damaged copy is what the workspace has
    failed = dvc(project, "repro", "--single-item", "-f", "train@cpu", check=False)  # as a train.* change would
    assert failed.returncode != 0, failed.stdout
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "data/processed/x_train.npy is damaged" in errors[0], failed.stderr
    recovery = errors[0].rsplit("`", 2)[-2]
    assert recovery == f"rm -f .dvc/cache/files/md5/{want[:2]}/{want[2:]} && dvc repro --single-item -f preprocess"

    subprocess.run(recovery.replace("dvc ", f"{sys.executable} -m dvc ", 1), shell=True, cwd=project,
                   env=dvc_env(project), check=True, capture_output=True)
    assert file_md5(obj) == want and file_md5(processed / "x_train.npy") == want  # the cache holds it again
    dvc(project, "repro")  # and the pipeline runs on it
    assert ran(dvc(project, "repro")) == set()


HEAVY = ("tensorflow", "keras", "jax", "torch", "sklearn", "matplotlib", "dvc", "dvclive", "onnxruntime")


@pytest.mark.parametrize("stage", sorted(p.stem for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__"))
def test_importing_a_stage_loads_no_heavy_library(stage):
    """Each stage starts in its own process under `dvc repro`, and imports what it uses where it uses it
    (TensorFlow takes 5 s to import on 2 cores, scikit-learn 1.3 s): a module that imports another stage's
    module for its params schema must not pay for that stage's libraries."""
    out = subprocess.run([sys.executable, "-c", f"import sys, stages.{stage}; print(*sorted(m for m in {HEAVY!r} "
                          "if m in sys.modules))"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    assert out.split() == []


def loaded_while_running(stage, args):
    """The heavy libraries loaded once stage `stage`'s main() has run with `args`, in a process of its own."""
    code = (f"import sys; from stages import {stage}; {stage}.main(sys.argv[1:]); "
            f"print('loaded:', *sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout
    return out.splitlines()[-1].split()[1:]


def test_preprocess_and_evaluate_run_without_a_framework_or_scikit_learn(tmp_path, sample_raw, trained):
    """What a fresh repro pays for at start-up (docs/results-and-speed.md, Start-up): preprocess standardizes
    without scikit-learn, evaluate scores classifier.onnx on ONNX Runtime without TensorFlow or Keras
    (build_init_weights: tests/test_build_init_weights.py)."""
    from tests.conftest import write_raw

    raw = write_raw(tmp_path / "raw", {name: array[:500] for name, array in sample_raw.items()})
    params = write_params(tmp_path / "params.yaml", tiny_params())
    assert loaded_while_running("preprocess", ["--raw", raw, "--out", tmp_path / "data", "--params", params]) == []
    model, data = trained[0], trained[0].parent / "data"
    outs = ["--metrics", tmp_path / "m.json", "--details", tmp_path / "details.json", "--predictions",
            tmp_path / "p.csv", "--mistakes", tmp_path / "m.png"]
    assert loaded_while_running("evaluate", ["--device", "cpu", "--data", data, "--model", model, *outs,
                                             "--params", params]) == ["onnxruntime"]
    assert json.loads((tmp_path / "details.json").read_text())["computed_by"].startswith("onnxruntime ")


def test_dvc_plots_show_follows_a_running_train(project):
    """train copies its curves to live/ after each epoch (dvc.yaml declares the folder as plots, not as an
    output): `dvc plots show` draws them while the stage still runs; a finished run leaves the folder empty."""
    import signal
    import time

    from mnist_cnn.files import clear_copies
    from tests.conftest import set_dotted

    live = project / "live"
    assert not [path for path in live.rglob("*") if path.is_file() and path.name != ".gitignore"]  # the fixture's run
    params = yaml.safe_load((project / "params.yaml").read_text())
    set_dotted(params, "train.epochs", 2000)  # long enough to be watched; stopped below
    write_params(project / "params.yaml", params)
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train@cpu"], cwd=project, env=dvc_env(project),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        loss = live / "train_cpu" / "plots" / "metrics" / "train" / "loss.tsv"
        deadline = time.monotonic() + 300
        while not (loss.is_file() and len(loss.read_text().splitlines()) >= 2):  # a header and one epoch
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.5)
        shown = dvc(project, "plots", "show", "--json")
        assert proc.poll() is None  # still training
        data = json.loads(shown.stdout)["data"]
        curves = {name.rsplit("/", 1)[1] for name in data if name.startswith("live/train_cpu/")}
        assert {"loss.tsv", "accuracy.tsv", "learning_rate.tsv", "epoch_time_s.tsv"} <= curves
        points = data["live/train_cpu/plots/metrics/train/loss.tsv"][0]["content"]["data"]["values"]
        assert points[0]["step"] == "1" and float(points[0]["loss"]) > 0 and points[0]["rev"] == "workspace"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass  # it had ended already: the assertion above says why
        proc.communicate(timeout=120)
        subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=project, check=True)
        clear_copies(live)  # the stopped run's curves
        dvc(project, "checkout", "-f")


@pytest.mark.long
def test_a_search_picks_trials_runs_each_as_an_experiment_and_resumes_after_a_kill(project):
    """tools.search on the sample with the tiny network: 4 trials of the learning rate, chosen on validation.
    The search is killed (SIGKILL, itself and the `dvc exp run` under it, as a scheduler or a lost node would)
    while its second trial trains; run again, it runs that trial's params again, then the rest: 4 trials in all,
    each a DVC experiment holding its own learning rate and metrics; the workspace is the commit's again."""
    import signal
    import time

    spec = {"study": "t", "n_trials": 4, "startup_trials": 2, "seed": 1,
            "objective": {"metric": "details/train_cpu.json:final_val_loss", "direction": "minimize"},
            "fixed": {"train.validation_split": 0.2}, "space": {"train.learning_rate": {"low": 0.0005, "high": 0.01,
                                                                                          "log": True}}}
    (project / "t.yaml").write_text(yaml.safe_dump(spec))
    # From the committed run, as a user starts a search: the tests before this one leave the workspace changed
    # (a rerun's dvc.lock and metrics), which the search refuses.
    subprocess.run(["git", "checkout", "--", "."], cwd=project, check=True)
    dvc(project, "checkout", "-f")
    command = [sys.executable, "-m", "tools.search", "t.yaml"]
    log = project / "search.log"
    try:
        with open(log, "w") as out:
            proc = subprocess.Popen(command, cwd=project, env=dvc_env(project), stdout=out, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
            deadline = time.monotonic() + 400
            while not re.search(r"^t-0 \(.*\n(.*\n)*.*train@cpu", log.read_text(), re.MULTILINE):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            time.sleep(1)  # in t-1's train stage (its TensorFlow takes seconds to start)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        first = log.read_text()
        assert "t-1 (" not in first.split("t-0 (", 1)[1].split("\n", 1)[1], first  # t-1 had not finished

        again = subprocess.run(command, cwd=project, env=dvc_env(project), capture_output=True, text=True,
                               timeout=900)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr
        assert "t-1: cut short by the last search; runs again" in again.stdout
        assert "study t: 1 of 4 trials done" in again.stdout
        rates = {row["name"]: row for row in experiments(project) if row["name"].startswith("t-")}  # (others':
        # a failed experiment of the README test stays in DVC's queue, which `dvc exp remove --all-commits` keeps)
        assert set(rates) == {"t-0", "t-2", "t-3", "t-4"}, rates  # t-1 was cut short: no experiment of it
        committed = yaml.safe_load((project / "params.yaml").read_text())["train"]["learning_rate"]
        assert rates["t-0"]["learning_rate"] == committed  # the baseline: params.yaml's own rate
        assert len({row["learning_rate"] for row in rates.values()}) == 4
        assert all(0.0005 <= row["learning_rate"] <= 0.01 and row["validation_split"] == 0.2 and row["accuracy"] > 0
                   for row in rates.values()), rates
        assert re.search(r"^best: t-\d; `dvc exp apply t-\d`", again.stdout, re.MULTILINE)
        assert subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project,
                              capture_output=True, text=True).stdout == ""
    finally:
        subprocess.run(["git", "checkout", "--", "."], cwd=project, check=True)
        dvc(project, "exp", "remove", "--all-commits", check=False)
        shutil.rmtree(project / ".search", ignore_errors=True)
        dvc(project, "checkout", "-f")


def experiments(project):
    """[{name, learning_rate, validation_split, accuracy}] of the experiments `dvc exp show` lists."""
    shown = json.loads(dvc(project, "exp", "show", "--json").stdout)
    rows = []
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                train = data["params"]["params.yaml"]["data"]["train"]
                accuracy = data["metrics"]["metrics/evaluate_cpu.json"]["data"]["test"]["accuracy"]
                rows.append({"name": rev.get("name") or exp.get("name"), "learning_rate": train["learning_rate"],
                             "validation_split": train["validation_split"], "accuracy": accuracy})
    return rows
