"""The DVC pipeline as a user drives it: `dvc repro` in a temporary copy, on the sample, tiny settings.

The caching table: after a full run, a second `dvc repro` runs nothing, and a
change to one params section reruns exactly the stages that read it.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages import build_init_weights, evaluate, fetch, preprocess, report, train
from tests.conftest import ROOT, tiny_params, write_params

PROJECT_FILES = ["stages", "dvc.yaml", "data/sample", ".dvcignore"]
ALL_CPU_STAGES = {"fetch", "preprocess", "build_init_weights", "train@cpu", "evaluate@cpu", "report"}


def dvc(project, *args, check=True):
    env = {k: v for k, v in os.environ.items() if k != "MNIST_NPZ"}
    env["KERAS_HOME"] = str(project / ".keras_home")  # no Keras cache: fetch falls back to the sample
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # stages' `python` is ours
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env,
                            capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def ran(result):
    """Names of the stages that actually ran (not skipped, not restored from DVC's run cache)."""
    return set(re.findall(r"^Running stage '([^']+)'", result.stdout, flags=re.M))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A git + DVC copy of the project with tiny params, after one full `dvc repro`."""
    project = tmp_path_factory.mktemp("project")
    for name in PROJECT_FILES:
        src, dst = ROOT / name, project / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    write_params(project / "params.yaml", tiny_params())
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    dvc(project, "init", "-q")
    dvc(project, "config", "core.analytics", "false")
    commit(project, "the project, as cloned")  # DVCLive fails in a git repo without commits
    first = dvc(project, "repro")
    assert ran(first) == ALL_CPU_STAGES, first.stdout
    assert "NOT THE FULL MNIST" in first.stderr  # the fallback is loud
    commit(project, "baseline run")
    return project


def commit(project, message):
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", message],
                   cwd=project, check=True)


def test_second_repro_runs_nothing(project):
    assert ran(dvc(project, "repro")) == set()


@pytest.mark.parametrize("key, value, must_run, may_run", [
    ("train.epochs", 2, {"train@cpu", "evaluate@cpu", "report"}, set()),
    ("train.learning_rate", 0.002, {"train@cpu", "evaluate@cpu", "report"}, set()),
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
        dvc(project, "repro")  # back to the baseline (restored from DVC's run cache)
    assert ran(dvc(project, "repro")) == set()


def test_the_report_names_the_sample_and_the_metrics_are_readable(project):
    text = (project / "reports" / "report.md").read_text()
    assert "SAMPLE of MNIST, not the full data set" in text and "96,844" not in text  # tiny model
    shown = dvc(project, "metrics", "show").stdout
    for name in ("test.accuracy", "fit_time_s", "full_mnist", "weights"):
        assert name in shown


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
    before = (project / "metrics" / "train_cpu.json").read_text()
    write_params(params_file, tiny_params(**{"train.optimizer": "adagrad"}))
    try:
        result = dvc(project, "repro", check=False)
    finally:
        params_file.write_text(original)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: params.yaml: train.optimizer = 'adagrad': "
                      "Input should be 'rmsprop', 'sgd' or 'adam'"], result.stderr
    leftovers = [p for folder in ("data", "models", "metrics", "plots", "reports") if (project / folder).exists()
                 for p in (project / folder).glob(".*") if p.name != ".gitignore"]
    assert leftovers == []  # no temporary files or folders left behind
    # DVC removed the stage's outputs before running it; the next repro brings the same ones back.
    dvc(project, "repro")
    assert (project / "metrics" / "train_cpu.json").read_text().count("final_loss") == 1
    assert json_value(project / "metrics" / "train_cpu.json", "final_loss") == json_value(before, "final_loss")


def json_value(path_or_text, key):
    import json
    text = path_or_text.read_text() if isinstance(path_or_text, Path) else path_or_text
    return json.loads(text)[key]


SCHEMAS = {
    "fetch": {"fetch": fetch.FetchParams},
    "preprocess": {"base": None, "preprocess": preprocess.PreprocessParams},
    "build_init_weights": {"base": None, "model": build_init_weights.ModelParams},
    "train": {"base": None, "train": train.TrainParams},
    "evaluate": {"base": None, "evaluate": evaluate.EvaluateParams},
    "report": {"base": None, "preprocess": None, "model": None, "train": None},
}


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
    from stages.common import load_params
    loaded = load_params(ROOT / "params.yaml", fetch=fetch.FetchParams, preprocess=preprocess.PreprocessParams,
                         model=build_init_weights.ModelParams, train=train.TrainParams,
                         evaluate=evaluate.EvaluateParams)
    assert loaded["train"].devices == ["cpu"]  # the default must run on any machine
    assert build_init_weights.count_weights(loaded["model"]) == 96_844


def test_an_experiment_runs_and_shows_beside_the_baseline(project):
    """`dvc exp run` applies its result to the workspace; undone at the end."""
    try:
        result = dvc(project, "exp", "run", "-S", "model.conv_blocks.conv1.filters=6", "-n", "wider")
        assert ran(result) == {"build_init_weights", "train@cpu", "evaluate@cpu", "report"}
        shown = dvc(project, "exp", "show", "--no-pager", "--md").stdout
        assert "wider" in shown and "test.accuracy" in shown and "model.conv_blocks.conv1.filters" in shown
    finally:
        subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=project, check=True)
        dvc(project, "repro")


def readme_command(prefix):
    """The README's command line that starts with `prefix`, as a list of words."""
    import shlex
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.strip().startswith(prefix):
            return shlex.split(line.strip().split("  #")[0])
    raise AssertionError(f"README.md has no command starting with {prefix!r}")


def test_the_readmes_queued_optimizer_sweep(project):
    """The README's sweep, as written: queue three optimizers, run the queue, show the readable table."""
    import time
    dvc(project, *readme_command("dvc exp run --queue")[1:])
    dvc(project, "queue", "start")
    deadline = time.monotonic() + 600
    while re.search(r"\b(Queued|Running)\b", dvc(project, "queue", "status").stdout):
        assert time.monotonic() < deadline, "the queue did not finish in 10 minutes"
        time.sleep(2)
    assert dvc(project, "queue", "status").stdout.count("Success") == 3
    table = dvc(project, *readme_command("dvc exp show --drop")[1:], "--md").stdout
    header, _, *rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("|")]
    columns = [c.strip() for c in header]
    assert {"train.optimizer", "test.accuracy", "fit_time_s", "architecture", "train.epochs"} <= set(columns)
    optimizers = {row[columns.index("train.optimizer")].strip() for row in rows}
    assert {"rmsprop", "adam", "sgd"} <= optimizers and len(columns) <= 10


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not CHROMIUM, reason="needs Chromium (Debian: apt-get install chromium)")
def test_report_html_renders_offline_in_a_real_browser(project, tmp_path):
    """Headless Chromium, network off: every image loads, no console errors, the warning shows."""
    from playwright.sync_api import sync_playwright

    page_file = project / "reports" / "report.html"
    problems = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        context = browser.new_context(offline=True)
        page = context.new_page()
        page.on("console", lambda msg: msg.type in ("error", "warning") and problems.append(msg.text))
        page.on("pageerror", lambda err: problems.append(str(err)))
        page.on("requestfailed", lambda req: problems.append(f"failed: {req.url}"))
        page.goto(page_file.as_uri())
        images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0])")
        text = page.inner_text("body")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert problems == []
    assert len(images) == 3 and all(ok for _, ok in images), images  # curves, confusion, mistakes
    assert "WARNING: trained on the 7,000-image SAMPLE" in text and "Test accuracy" in text
