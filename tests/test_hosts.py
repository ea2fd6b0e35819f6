"""tools/sweep.py: one list of experiments shared by several hosts, each taking its share by index. The
real two-host sweep over an sshd remote is tests/test_remote.py's; here, the rules, with the schedulers'
variables simulated."""

import argparse

import pytest

from mnist_cnn.errors import UserError
from mnist_cnn.dvc_commands import reason
from tools.sweep import experiments_of, grid_name, host_of, override, share


def test_the_experiments_are_the_listed_then_the_grids_in_the_files_order():
    spec = {"experiments": {"slow": {"train.learning_rate": 0.0005}},
            "grid": {"train.learning_rate": [0.002, 0.004], "train.batch_size": [64, 128]}}
    found = experiments_of(spec)
    assert [name for name, _ in found] == ["slow", "learning_rate-0.002-batch_size-64",
                                           "learning_rate-0.002-batch_size-128", "learning_rate-0.004-batch_size-64",
                                           "learning_rate-0.004-batch_size-128"]
    assert found[2][1] == {"train.learning_rate": 0.002, "train.batch_size": 128}


@pytest.mark.parametrize("spec, message", [
    ({"runs": {}}, "expected `experiments:` and/or `grid:`"),
    ({"experiments": {"a": 1}}, "maps each name to the params it sets"),
    ({"grid": {"train.epochs": 3}}, "maps each param to a list of values"),
    ({"experiments": {"bad name": {"train.epochs": 1}}}, "experiment name 'bad name'"),
    ({"experiments": {"a..b": {"train.epochs": 1}}}, "experiment name 'a..b'"),
    ({"experiments": {"x.lock": {"train.epochs": 1}}}, "experiment name 'x.lock'"),
    ({"experiments": {"x.": {"train.epochs": 1}}}, "experiment name 'x.'"),
    ({"experiments": {"learning_rate-0.1": {"train.epochs": 1}}, "grid": {"train.learning_rate": [0.1]}},
     "appears twice"),
])
def test_a_sweep_file_written_wrong_is_one_line(spec, message):
    with pytest.raises(UserError, match=message):
        experiments_of(spec, "sweep.yaml")


def test_grid_names_are_git_refs():
    assert grid_name({"train.devices": ["cpu", "gpu"]}) == "devices-cpu_gpu"


def options(host=None, hosts=None):
    return argparse.Namespace(host=host, hosts=hosts)


@pytest.mark.parametrize("args, environ, expected", [
    (options(1, 3), {}, (1, 3)),
    (options(), {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "4"}, (2, 4)),
    (options(), {"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "2",
                 "SLURM_ARRAY_TASK_COUNT": "4"}, (3, 4)),  # --array=0-7:2
    (options(), {"JOB_COMPLETION_INDEX": "2", "SWEEP_HOSTS": "3"}, (2, 3)),
])
def test_which_host_this_is_comes_from_the_options_or_the_scheduler(args, environ, expected):
    assert host_of(args, environ) == expected


@pytest.mark.parametrize("args, environ, message", [
    (options(), {}, "which host is this"),
    (options(1), {}, "give both --host I and --hosts N"),
    (options(3, 3), {}, "host 3 of 3: the index must be 0 to 2"),
    (options(), {"JOB_COMPLETION_INDEX": "0"}, "set SWEEP_HOSTS"),
    (options(), {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "2"}, "must be whole numbers"),
    (options(), {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "4"},
     "not on the array's steps"),
    (options(), {"JOB_COMPLETION_INDEX": "0", "SWEEP_HOSTS": "\u00b2"}, "set SWEEP_HOSTS"),
])
def test_a_host_named_wrong_is_one_line(args, environ, message):
    with pytest.raises(UserError, match=message):
        host_of(args, environ)


@pytest.mark.parametrize("total, hosts", [(1, 1), (5, 2), (7, 3), (2, 4)])
def test_the_shares_cover_every_experiment_once_and_differ_by_one_at_most(total, hosts):
    experiments = [(f"e{i}", {}) for i in range(total)]
    shares = [share(experiments, index, hosts) for index in range(hosts)]
    taken = [name for part in shares for name, _ in part]
    assert sorted(taken) == sorted(name for name, _ in experiments) and len(taken) == total
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_each_setting_is_written_as_dvc_reads_it():
    assert override("train.learning_rate", 0.002) == "train.learning_rate=0.002"
    assert override("train.devices", ["cpu", "gpu"]) == 'train.devices=["cpu", "gpu"]'
    assert override("train.gpu.memory_limit_mb", None) == "train.gpu.memory_limit_mb=null"
    assert override("train.shuffle", False) == "train.shuffle=false"
    assert override("train.optimizer", "adam") == "train.optimizer=adam"


def test_the_reason_of_a_failure_is_the_stages_own_line():
    output = ("Running stage 'train@cpu':\nerror: params.yaml: train.epochs = 0: Input should be greater than 0\n"
              "ERROR: failed to reproduce 'train@cpu': failed to run: python -m stages.train, exited with 1\n")
    assert reason(output) == "error: params.yaml: train.epochs = 0: Input should be greater than 0"
    assert reason("ERROR: unexpected error\n") == "ERROR: unexpected error"
