"""tools.compare: the change report's tables from DVC's diffs, each side's provenance from DVC's cache or, where
the cache lacks it, from git; the charts drawn offline. The report of a real experiment against its commit is
checked end to end in test_pipeline (the README's Experiments section runs it)."""

import hashlib
import json
import subprocess
import sys

import pytest

from mnist_cnn.errors import UserError
from tools import compare

CPU_DETAILS = {"device_name": "/physical_device:CPU:0", "cpu_model": "Test CPU 9000", "cpu_features": ["avx2", "fma"],
               "precision": "float32", "backend": "tensorflow", "backend_version": "2.21.0", "keras_version": "3.15.1"}
DATA_DETAILS = {"source": "keras_cache", "full_mnist": True, "train_images": 60000, "test_images": 10000}
REPORT = ("# MNIST CNN: training report\n\nData: **full MNIST**, 60,000 training images.\n\nCPU: Test CPU 9000.\n\n"
          "| run | accuracy | fit |\n|---|---|---|\n| ours, cpu | 99.10% | 115.2 s |\n")


def git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git repo holding what a run commits (dvc.lock naming the details' hashes, metrics, the report), and a
    DVC cache folder that holds nothing yet; the test runs in it."""
    files = {"details/train_cpu.json": json.dumps(CPU_DETAILS), "details/data.json": json.dumps(DATA_DETAILS)}
    outs = {path: hashlib.md5(text.encode()).hexdigest() for path, text in files.items()}
    lock = {"schema": "2.0", "stages": {
        "fetch": {"outs": [{"path": "details/data.json", "md5": outs["details/data.json"]}]},
        "train@cpu": {"outs": [{"path": "details/train_cpu.json", "md5": outs["details/train_cpu.json"]}]}}}
    (tmp_path / "metrics").mkdir()
    (tmp_path / "reports").mkdir()
    (tmp_path / "dvc.lock").write_text(json.dumps(lock))
    (tmp_path / "metrics" / "data.json").write_text('{"full_mnist": true}')
    (tmp_path / "reports" / "report.md").write_text(REPORT)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "a run | with a pipe")
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    return tmp_path, cache, files, outs


def put_in_cache(cache, files, outs):
    for path, text in files.items():
        (cache / outs[path][:2]).mkdir(exist_ok=True)
        (cache / outs[path][:2] / outs[path][2:]).write_text(text)


def test_a_side_not_in_the_cache_says_so_and_shows_what_git_holds(repo):
    _, cache, files, outs = repo
    rows = dict(compare.provenance(compare.resolve("HEAD"), cache))
    assert rows["data"] == "full MNIST (from metrics/data.json in git)"
    assert "train@cpu" not in rows
    assert "details/train_cpu.json of HEAD is not in this clone's DVC cache (`dvc pull` fetches it)" in rows["not here"]
    assert rows["its report (git)"] == ("Data: **full MNIST**, 60,000 training images. / CPU: Test CPU 9000. / "
                                        "ours, cpu: 99.10%, 115.2 s")

    put_in_cache(cache, files, outs)
    rows = dict(compare.provenance(compare.resolve("HEAD"), cache))
    assert rows["data"] == "full MNIST (60,000 training images; source keras_cache)"
    assert rows["train@cpu"] == ("/physical_device:CPU:0 on Test CPU 9000 (avx2, fma); float32; "
                                 "tensorflow 2.21.0, Keras 3.15.1")
    assert "not here" not in rows and rows["code"].endswith("(a run | with a pipe)")


def test_a_damaged_cache_object_is_a_missing_detail_never_a_wrong_one(repo):
    _, cache, files, outs = repo
    put_in_cache(cache, {**files, "details/train_cpu.json": "{not json"}, outs)
    rows = dict(compare.provenance(compare.resolve("HEAD"), cache))
    assert "train@cpu" not in rows
    assert "details/train_cpu.json of HEAD is damaged in DVC's cache" in rows["not here"]


def test_sides_are_commits_or_experiments_and_a_wrong_name_is_one_line(repo):
    folder, _, _, _ = repo
    head = git(folder, "rev-parse", "HEAD")
    (folder / "metrics" / "data.json").write_text('{"full_mnist": false}')
    git(folder, "commit", "-qam", "an experiment's commit")
    experiment = git(folder, "rev-parse", "HEAD")
    git(folder, "reset", "-q", "--hard", head)
    git(folder, "update-ref", f"refs/exps/{head[:2]}/{head[2:]}/lr-high", experiment)  # where DVC keeps one

    side = compare.resolve("lr-high")
    assert side.commit == experiment and side.code.startswith(f"experiment lr-high, from {head[:7]} (a run")
    assert compare.resolve("HEAD").commit == head
    with pytest.raises(UserError, match=r"^'nope' is neither a commit, a branch nor an experiment here"):
        compare.resolve("nope")
    with pytest.raises(UserError, match="the workspace can only be the target"):
        compare.resolve("workspace")


def test_params_and_metrics_tables_from_dvcs_diffs():
    params = {"params.yaml": {"train.epochs": {"old": 5, "new": 3}, "train.devices": {"old": ["cpu"], "new": None}}}
    assert compare.params_rows(params) == [("train.devices", '["cpu"]', "null"), ("train.epochs", "5", "3")]
    metrics = {"metrics/evaluate_cpu.json": {"test.accuracy": {"old": 0.991, "new": 0.9885, "diff": -0.0025}},
               "metrics/data.json": {"full_mnist": {"old": True, "new": False}},
               "metrics/model.json": {"weights": {"old": 96844, "new": 96844, "diff": 0}},
               "metrics/train_gpu.json": {"fit_time_s": {"old": None, "new": 14.7}}}
    assert compare.metrics_rows(metrics) == [
        ("metrics/data.json", "full_mnist", "True", "False", "changed"),
        ("metrics/evaluate_cpu.json", "test.accuracy", "0.991", "0.9885", "-0.0025 (-0.3%)"),
        ("metrics/model.json", "weights", "96,844", "96,844", "="),
        ("metrics/train_gpu.json", "fit_time_s", "-", "14.7", "changed")]
    lines = compare.table(["a", "b|c"], [("x|y", 1)])
    assert lines == ["| a | b\\|c |", "|---|---|", "| x\\|y | 1 |"]


def test_charts_are_drawn_offline_and_live_curves_are_left_out(tmp_path):
    spec = {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "title": "Loss per epoch",
            "data": {"values": [{"epoch": 1, "loss": 0.2, "rev": "HEAD"}, {"epoch": 2, "loss": 0.1, "rev": "HEAD"}]},
            "mark": "line", "encoding": {"x": {"field": "epoch", "type": "quantitative"},
                                         "y": {"field": "loss", "type": "quantitative"}}}
    picture = tmp_path / "mistakes.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n picture")
    plots = {"reports/curves/loss.csv": [{"type": "vega", "revisions": ["HEAD", "exp"], "content": spec}],
             "live/train_cpu/plots/metrics/train/loss.tsv": [{"type": "vega", "revisions": ["HEAD"], "content": spec}],
             "plots/mistakes_cpu.png": [{"type": "image", "revisions": ["HEAD~1"], "url": str(picture)}]}
    out = tmp_path / "out"
    out.mkdir()
    charts, images = compare.render(plots, out)
    assert charts == [("Loss per epoch", "loss.png", ["HEAD", "exp"])]
    assert images == [("plots/mistakes_cpu.png", "HEAD~1", "HEAD_1_mistakes_cpu.png")]
    png = (out / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000  # a drawn chart, not an empty canvas
    assert sorted(p.name for p in out.iterdir()) == ["HEAD_1_mistakes_cpu.png", "loss.png"]


def test_outside_a_project_it_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.compare"], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(compare.Path(compare.__file__).parents[1]), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: run it in the project's root (where dvc.yaml is), in a git clone"]


def test_a_name_both_a_branch_and_an_experiment_is_refused_not_guessed(repo):
    folder, _, _, _ = repo
    head = git(folder, "rev-parse", "HEAD")
    git(folder, "branch", "twice")
    git(folder, "update-ref", f"refs/exps/{head[:2]}/{head[2:]}/twice", head)
    with pytest.raises(UserError, match=r"^'twice' names both a commit \(or branch\) and an experiment"):
        compare.resolve("twice")


@pytest.mark.parametrize("what", ["a file", "a folder of other things"])
def test_out_never_replaces_what_is_not_a_report(repo, what):
    folder, _, _, _ = repo
    out = folder / "docs"
    if what == "a file":
        out.write_text("mine")
    else:
        out.mkdir()
        (out / "notes.md").write_text("mine")
    with pytest.raises(UserError, match=r"docs exists and is not a change report's folder"):
        compare.check_out_folder(out)
    earlier = folder / "change-report"
    earlier.mkdir()
    (earlier / "report.md").write_text("# What `workspace` changed against `HEAD`\n")
    compare.check_out_folder(earlier)  # an earlier report: replaced
    compare.check_out_folder(folder / "absent")
