"""tools.search: the search file checked before anything runs; trials run as `dvc exp run -n <study>-<n>` from
the commit (DVC replaced here by a stand-in that writes what a run writes); the baseline first; failures counted
and named; a search cut short resumes from its journal. The real thing, with DVC and training on tiny data, is
test_search_e2e in tests/test_pipeline.py."""

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import optuna
import pytest
import yaml

from mnist_cnn.errors import UserError
from tools import search

ROOT = Path(__file__).resolve().parent.parent
SEARCH = {"study": "lr", "n_trials": 5, "startup_trials": 2, "seed": 0,
          "objective": {"metric": "details/train_cpu.json:final_val_loss", "direction": "minimize"},
          "fixed": {"train.validation_split": 0.1, "train.epochs": 2},
          "space": {"train.learning_rate": {"low": 0.0002, "high": 0.01, "log": True}}}


def git(folder, *args):
    return subprocess.run(["git", *args], cwd=folder, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def clone(tmp_path, monkeypatch):
    """A git clone of the project's params and a dvc.lock whose git-tracked output is metrics/; runs in it."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"train@cpu": {"outs": [
        {"path": "metrics/train_cpu.json", "md5": "0" * 32}, {"path": "details/train_cpu.json", "md5": "1" * 32}]}}}))
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "train_cpu.json").write_text("{}")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "committed run")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_search(folder, **changes):
    spec = {**SEARCH, **changes}
    (folder / "search.yaml").write_text(yaml.safe_dump(spec))
    return [str(folder / "search.yaml")]


class FakeDvc:
    """`dvc exp run -n NAME -S k=v ...` as DVC does it to the workspace: params.yaml gets the values, the trial's
    outputs are written; the validation loss is least at learning rate 0.002. fail_at: names that fail."""

    def __init__(self, fail_at=(), kill_at=None, taken=()):
        self.calls, self.fail_at, self.kill_at = [], set(fail_at), kill_at
        self.made, self.checkouts = set(taken), 0

    def install(self, monkeypatch):
        monkeypatch.setattr(search, "run_shown", self)
        monkeypatch.setattr(search, "taken_names", lambda: set(self.made))  # DVC's experiments of the commit
        monkeypatch.setattr(search, "checkout_outputs", self.checkout)
        return self

    def checkout(self):
        self.checkouts += 1

    def __call__(self, *args):
        assert args[:3] == ("exp", "run", "-n")
        name = args[3]
        sets = dict(word.split("=", 1) for word in args[5::2])
        self.calls.append((name, sets))
        params = yaml.safe_load(Path("params.yaml").read_text())
        for key, value in sets.items():
            section, leaf = key.split(".")
            params[section][leaf] = yaml.safe_load(value)
        Path("params.yaml").write_text(yaml.safe_dump(params))
        Path("metrics/train_cpu.json").write_text(json.dumps({"fit_time_s": 1.0}))
        if name == self.kill_at:
            raise KeyboardInterrupt  # the search is killed mid-trial: nothing told to Optuna
        if name in self.fail_at:
            return 1, "Running stage 'train@cpu'\nerror: train: the loss diverged at epoch 1\nERROR: failed\n"
        lr = float(sets["train.learning_rate"])
        Path("details").mkdir(exist_ok=True)
        Path("details/train_cpu.json").write_text(json.dumps({"final_val_loss": 0.03 + (math.log10(lr / 0.002)) ** 2}))
        self.made.add(name)
        return 0, "ok\n"


def study(folder, name="lr"):
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(folder / ".search" / f"{name}.jsonl")))
    return optuna.load_study(study_name=name, storage=storage)


def test_the_baseline_runs_first_then_trials_until_n_trials_each_an_experiment_from_the_commit(clone, monkeypatch,
                                                                                                capsys):
    fake = FakeDvc().install(monkeypatch)
    search.main(write_search(clone))
    names = [name for name, _ in fake.calls]
    assert names == ["lr-0", "lr-1", "lr-2", "lr-3", "lr-4"]
    assert fake.calls[0][1] == {"train.validation_split": "0.1", "train.epochs": "2", "train.learning_rate": "0.001"}
    assert all(0.0002 <= float(sets["train.learning_rate"]) <= 0.01 for _, sets in fake.calls)
    assert len({sets["train.learning_rate"] for _, sets in fake.calls}) == 5
    assert git(clone, "status", "--porcelain", "--untracked-files=no") == ""  # the commit's params are back
    trials = study(clone).trials
    assert [t.user_attrs["experiment"] for t in trials] == names and trials[0].user_attrs["baseline"]
    out = capsys.readouterr().out
    best = min(trials, key=lambda t: t.value)
    assert f"best: {best.user_attrs['experiment']}; `dvc exp apply {best.user_attrs['experiment']}`" in out
    assert "(params.yaml's)" in out
    assert "lr-0 (train.learning_rate=0.001): details/train_cpu.json:final_val_loss = " in out
    assert fake.checkouts == 1  # the committed run's DVC outputs back, not the last trial's


def test_a_failed_trial_counts_is_named_and_the_search_goes_on(clone, monkeypatch):
    fake = FakeDvc(fail_at={"lr-1"}).install(monkeypatch)
    with pytest.raises(SystemExit) as ended:
        search.main(write_search(clone, n_trials=3))
    assert str(ended.value) == "error: lr-1: train: the loss diverged at epoch 1"
    assert [name for name, _ in fake.calls] == ["lr-0", "lr-1", "lr-2"]
    states = [t.state for t in study(clone).trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                      optuna.trial.TrialState.COMPLETE]


def test_a_search_cut_short_resumes_running_the_cut_trial_again_first(clone, monkeypatch, capsys):
    fake = FakeDvc(kill_at="lr-2").install(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        search.main(write_search(clone, n_trials=4))
    cut = fake.calls[-1][1]
    assert git(clone, "status", "--porcelain", "--untracked-files=no") != ""  # the cut trial's params.yaml

    again = FakeDvc(taken=fake.made).install(monkeypatch)
    search.main(write_search(clone, n_trials=4))
    assert [name for name, _ in again.calls] == ["lr-3", "lr-4"]
    assert again.calls[0][1] == cut  # the cut trial's params, first
    assert "lr-2: cut short by the last search; runs again" in capsys.readouterr().out
    trials = study(clone).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[3].user_attrs["rerun_of"] == 2 and len(search.counted(trials)) == 4

    search.main(write_search(clone, n_trials=4))  # done: nothing more runs
    assert len(again.calls) == 2 and again.checkouts == 1


def test_a_finished_study_never_touches_edits_made_since(clone, monkeypatch, capsys):
    fake = FakeDvc().install(monkeypatch)
    search.main(write_search(clone, n_trials=2))
    edited = (clone / "params.yaml").read_text().replace("learning_rate: 0.001", "learning_rate: 0.0005")
    (clone / "params.yaml").write_text(edited)  # the rate adopted, as the docs say
    with pytest.raises(UserError, match=r"^1 file\(s\) differ from the commit \(params.yaml\)"):
        search.main(write_search(clone, n_trials=2))
    assert (clone / "params.yaml").read_text() == edited and fake.checkouts == 1


def test_a_journal_of_another_search_or_names_taken_by_one_are_refused(clone, monkeypatch):
    fake = FakeDvc().install(monkeypatch)
    search.main(write_search(clone, n_trials=2))
    wider = {"train.learning_rate": {"low": 0.0001, "high": 0.01, "log": True}}
    with pytest.raises(UserError, match=r"^the study 'lr' in .search/lr.jsonl began with another search file"):
        search.main(write_search(clone, n_trials=3, space=wider))
    search.main(write_search(clone, n_trials=3))  # more trials of the same search: fine
    assert len(fake.calls) == 3

    shutil.rmtree(clone / ".search")  # the journal gone, DVC's experiments lr-0 ... still there
    with pytest.raises(UserError, match=r"^experiments named like this study's trials exist already "
                                        r"\(lr-0, lr-1, lr-2\): `dvc exp remove lr-0 lr-1 lr-2`"):
        search.main(write_search(clone))
    assert len(fake.calls) == 3


def test_ranges_of_two_ints_are_ints_and_any_float_makes_a_float():
    made = search.distributions({
        "train.batch_size": search.Range(low=32, high=256, log=True),
        "train.lr_decay_epochs": search.Range(low=1, high=3.0),
        "train.momentum": search.Range(low=0.0, high=0.9)})
    assert type(made["train.batch_size"]).__name__ == "IntDistribution" and made["train.batch_size"].log
    assert type(made["train.lr_decay_epochs"]).__name__ == "FloatDistribution"
    assert type(made["train.momentum"]).__name__ == "FloatDistribution"


def test_other_changes_to_the_clone_stop_it_before_anything_runs(clone, monkeypatch):
    FakeDvc().install(monkeypatch)
    (clone / "params.yaml").write_text((clone / "params.yaml").read_text() + "\n# mine\n")
    Path(clone / "notes.txt").write_text("untracked: not in the way")
    git(clone, "add", "notes.txt")
    with pytest.raises(UserError, match=r"^2 file\(s\) differ from the commit \(notes.txt, params.yaml"):
        search.main(write_search(clone))


@pytest.mark.parametrize(("changes", "message"), [
    ({"space": {"train.learning_rat": {"low": 0.001, "high": 0.01}}},
     r"search.yaml \(space\): train.learning_rat is not a key of params.yaml"),
    ({"space": {"train.learning_rate": {"low": 0.002, "high": 0.01, "log": True}}},
     r"baseline: true, but params.yaml's train.learning_rate = 0.001 is outside the space"),
    ({"space": {"train.optimizer": {"choices": ["rmsprop", "adagrad"]}}},
     r"search.yaml: space.train.optimizer = 'adagrad'.*train.optimizer = 'adagrad'"),
    ({"space": {"train.learning_rate": {"low": 0.01, "high": 0.001}}}, r"space.train.learning_rate: needs low < high"),
    ({"n_trials": 0}, r"search.yaml: search.n_trials = 0: Input should be greater than or equal to 1"),
    ({"objective": {"metric": "details/train_cpu.json", "direction": "minimize"}}, r"search.objective.metric"),
    ({"fixed": {"train.learning_rate": 0.01}}, r"train.learning_rate both fixed and searched"),
    ({"studdy": "x"}, r"unknown key search.studdy"),
    ({"objective": {"metric": "details/train_gpu.json:final_val_loss", "direction": "minimize"}},
     r"objective.metric's file details/train_gpu.json is not an output of the committed pipeline"),
])
def test_a_wrong_search_file_is_one_line_before_anything_runs(clone, monkeypatch, changes, message):
    fake = FakeDvc().install(monkeypatch)
    with pytest.raises(UserError, match=message):
        search.main(write_search(clone, **changes))
    assert fake.calls == [] and not (clone / ".search").exists()


def test_the_committed_search_file_is_valid_and_its_baseline_lies_in_its_space():
    from mnist_cnn.params import read_yaml

    params = read_yaml(ROOT / "params.yaml")
    spec, dists = search.read_search(ROOT / "search.yaml", params)
    assert search.baseline_params(params, spec, dists, "search.yaml") == {
        key: params["train"][key.split(".")[1]] for key in spec.space}
    assert spec.objective.metric.startswith("details/train_cpu.json:final_val")  # chosen on validation
    assert spec.fixed["train.validation_split"] > 0


def test_a_tool_stopped_mid_run_stops_the_dvc_under_it(tmp_path, monkeypatch):
    """run_shown's `dvc`, when the tool is interrupted (here: Ctrl-C while it shows a line), gets SIGTERM and is
    waited for: it never goes on writing the workspace under a search that has gone."""
    from mnist_cnn import dvc_commands

    fake = tmp_path / "dvc"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text(
        "import os, signal, sys, time\n"
        "def stop(*_):\n"
        f"    open({str(tmp_path / 'stopped')!r}, 'w').write(str(os.getpid())); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('Running stage train@cpu', flush=True)\n"
        "time.sleep(60)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))

    class CtrlC:
        def write(self, text):
            raise KeyboardInterrupt

        def flush(self):
            pass

    monkeypatch.setattr("sys.stdout", CtrlC())
    with pytest.raises(KeyboardInterrupt):
        dvc_commands.run_shown("exp", "run")
    pid = int((tmp_path / "stopped").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone, and waited for


def test_a_fresh_runs_products_do_not_stop_the_search_but_params_edits_do(clone, monkeypatch, capsys):
    """After the user's own `dvc repro` (its dvc.lock and metrics differ from the commit's: the fit time), the
    search starts, saying it puts them back; an edited params.yaml beside them still stops it."""
    fake = FakeDvc().install(monkeypatch)
    (clone / "metrics" / "train_cpu.json").write_text('{"fit_time_s": 143.7}')
    (clone / "dvc.lock").write_text((clone / "dvc.lock").read_text() + "# rerun\n")
    search.main(write_search(clone, n_trials=1))
    assert len(fake.calls) == 1
    assert "note: the workspace's run (dvc.lock, metrics/train_cpu.json) is put back" in capsys.readouterr().out

    (clone / "metrics" / "train_cpu.json").write_text('{"fit_time_s": 143.7}')
    (clone / "params.yaml").write_text((clone / "params.yaml").read_text() + "# mine\n")
    with pytest.raises(UserError, match=r"^2 file\(s\) differ from the commit"):
        search.main(write_search(clone, n_trials=2))
    assert (clone / "params.yaml").read_text().endswith("# mine\n") and len(fake.calls) == 1
