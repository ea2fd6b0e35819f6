"""The experiments table, from `dvc exp show --json` as DVC 3 writes it (the end-to-end run is in test_pipeline)."""

import pytest

from tools import experiments
from mnist_cnn.errors import UserError


def rev(name, optimizer, accuracy, error=None):
    params = {"base": {"seed": 42}, "train": {"optimizer": optimizer, "epochs": 5, "devices": ["cpu"]}}
    metrics = {"metrics/evaluate_cpu.json": {"data": {"test": {"accuracy": accuracy, "loss": 0.03}}},
               "metrics/train_cpu.json": {"data": {"fit_time_s": 61.234}},
               "metrics/model.json": {"data": {"weights": 96844}},
               "metrics/data.json": {"data": {"full_mnist": True}}}
    return {"rev": f"{name:0<40}"[:40], "name": name, "error": error,
            "data": {"params": {"params.yaml": {"data": params}}, "metrics": metrics}}


@pytest.fixture
def show(tmp_path):
    log = tmp_path / "failed.out"
    log.write_text("Running stage 'train@cpu':\nerror: params.yaml: train.optimizer = 'adagrad': Input should be "
                   "'rmsprop', 'sgd' or 'adam'\nERROR: failed to reproduce 'train@cpu': exited with 1\n")
    executor = {"state": "failed", "local": {"log": str(log)}}
    head = dict(rev("a1b2c3d", "rmsprop", 0.9902), name="main")
    head["experiments"] = [
        {"name": "fond-perp", "executor": None, "revs": [rev("fond-perp", "adam", 0.9910)]},
        # DVC hands a failed run the metrics of the workspace it was queued from: here 0.9902 again
        {"name": "sunk-yarn", "executor": executor,
         "revs": [rev("sunk-yarn", "adagrad", 0.9902, {"msg": "Experiment run failed", "type": ""})]},
        {"name": "lazy-dog", "executor": {"state": "queued", "local": None}, "revs": [rev("lazy-dog", "sgd", 0.9902)]},
    ]
    return [dict(rev("workspace", "rmsprop", 0.9902), rev="workspace", name=None), head]


def test_rows_say_each_experiments_state_and_never_show_another_runs_numbers(show):
    rows = {r["name"]: r for r in experiments.rows_from(show)}
    assert list(rows) == ["workspace", "main (a1b2c3d)", "fond-perp", "sunk-yarn", "lazy-dog"]
    assert [rows[n]["state"] for n in rows] == ["", "", "Success", "Failed", "Queued"]
    assert rows["fond-perp"]["metrics"]["cpu acc"] == (0.9910, "test.accuracy")
    assert rows["sunk-yarn"]["metrics"] == {} and rows["lazy-dog"]["metrics"] == {}
    assert rows["sunk-yarn"]["reason"] == ("error: params.yaml: train.optimizer = 'adagrad': "
                                           "Input should be 'rmsprop', 'sgd' or 'adam'")  # ours, not DVC's ERROR


def test_the_table_shows_the_params_that_differ_and_the_headline_in_120_columns(show):
    lines = experiments.table(experiments.rows_from(show)).splitlines()
    assert lines[0].split() == ["Experiment", "State", "optimizer", "cpu", "acc", "cpu", "loss", "cpu", "fit",
                                "s", "weights", "full", "MNIST"]  # the epochs are the same everywhere: not shown
    assert lines[3].split() == ["fond-perp", "Success", "adam", "0.9910", "0.0300", "61.2", "96,844", "yes"]
    assert lines[4].split() == ["sunk-yarn", "Failed", "adagrad", "-", "-", "-", "-", "-"]
    assert lines[5].strip().startswith("└ error: params.yaml: train.optimizer = 'adagrad'")
    assert max(map(len, lines)) <= 120


def test_a_long_reason_wraps_at_the_width(show):
    lines = experiments.table(experiments.rows_from(show), width=60).splitlines()
    reason = lines[lines.index(next(line for line in lines if "└" in line)):]
    assert len(reason) > 1 and all(len(line) <= 60 for line in reason[:-1])


def test_markdown_lists_the_failures_under_the_table(show):
    text = experiments.table(experiments.rows_from(show), markdown=True)
    assert "| sunk-yarn | Failed | adagrad | - | - | - | - | - |" in text
    assert text.splitlines()[-1] == ("- **sunk-yarn** failed: error: params.yaml: train.optimizer = 'adagrad': "
                                     "Input should be 'rmsprop', 'sgd' or 'adam'")


def test_a_workspace_out_of_date_shows_no_numbers(show):
    """After `git checkout params.yaml` the workspace pairs the committed params with an experiment's outputs."""
    rows = {r["name"]: r for r in experiments.rows_from(show, workspace_changed=True)}
    assert rows["workspace"]["state"] == "Changed" and rows["workspace"]["metrics"] == {}
    assert "`dvc repro` updates them" in rows["workspace"]["reason"]
    assert rows["main (a1b2c3d)"]["metrics"]  # a commit's numbers are its own


def many_params(show, n):
    """Each experiment differs from the others in `n` params with long names."""
    for i, baseline in enumerate(show):
        for j, exp in enumerate(baseline.get("experiments") or []):
            train = exp["revs"][-1]["data"]["params"]["params.yaml"]["data"]["train"]
            for k in range(n):
                train[f"a_rather_long_parameter_name_{k}"] = f"value-{i}-{j}-{k}-" + "x" * (k % 7)
    return show


@pytest.mark.parametrize("n, width", [(0, 120), (6, 120), (12, 120), (40, 120), (6, 80), (3, 60)])
def test_the_table_fits_its_width_whatever_differs(show, n, width):
    rows = experiments.rows_from(many_params(show, n))
    lines = experiments.table(rows, width=width).splitlines()
    assert max(map(len, lines)) <= width, "\n".join(lines)
    text = "\n".join(lines)
    for r in rows:  # nothing is dropped: every row, every param that differs, every metric value
        assert r["name"] in text
        for key in experiments.differing(rows):
            assert experiments.param_cell(r["params"].get(key)) in text
    assert "0.9910" in text and "adagrad" in text


def test_params_are_named_by_the_shortest_unique_end_of_their_key():
    assert experiments.short_names(["train.optimizer", "train.epochs", "train.cpu.onednn", "model.dropout",
                                    "train.augment.zoom", "model.l2.dense", "train.lr"]) == {
        "train.optimizer": "optimizer", "train.epochs": "epochs", "train.cpu.onednn": "onednn",
        "model.dropout": "dropout", "train.augment.zoom": "zoom", "model.l2.dense": "dense", "train.lr": "lr"}
    assert experiments.short_names(["model.l2.dense", "model.l2.conv", "a.conv"]) == {
        "model.l2.dense": "dense", "model.l2.conv": "l2.conv", "a.conv": "a.conv"}


def test_fail_exits_non_zero_when_a_listed_experiment_failed(show, monkeypatch, capsys):
    answers = {"exp": show, "status": {}}
    monkeypatch.setattr(experiments, "dvc_json", lambda *args: answers[args[0]])
    experiments.main([])  # the table alone: exit 0, as `dvc exp run --run-all` does
    with pytest.raises(UserError, match=r"^1 experiment\(s\) failed: sunk-yarn"):
        experiments.main(["--fail"])
    assert "sunk-yarn" in capsys.readouterr().out  # the table is printed first
    show[1]["experiments"].pop(1)  # no failure left
    experiments.main(["--fail"])
