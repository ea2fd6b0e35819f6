"""train.processes: one model trained by several processes (mnist_cnn.processes), and the data feed they share
(training.batches). The jobs of Slurm, Kubernetes and torchrun are simulated by their variables; the real runs
start two processes on this host, each a jax start-up and a fit: marked e2e, with the end-to-end tests."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from mnist_cnn.errors import UserError
from mnist_cnn.params import TrainParams, check_train, validate
from mnist_cnn.processes import DEFAULT_PORT, Job, check_job, first_host, job_from_env
from mnist_cnn.training import batches, check_shares, epoch_order, share
from tests.conftest import ROOT, tiny_params, write_params

# --- who is who, from the scheduler's variables ---


@pytest.mark.parametrize("environ, job", [
    ({"RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "node7", "MASTER_PORT": "1234"},
     Job("node7:1234", 4, 1, "RANK/WORLD_SIZE")),
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_JOB_NODELIST": "gpu[03-05,9],cpu1"},
     Job(f"gpu03:{DEFAULT_PORT}", 3, 2, "Slurm")),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a,b", "MASTER_ADDR": "b"},
     Job(f"b:{DEFAULT_PORT}", 2, 0, "Slurm")),
    ({"JOB_COMPLETION_INDEX": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "train-0.train", "MASTER_PORT": "29501"},
     Job("train-0.train:29501", 2, 1, "Kubernetes Indexed Job")),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "a"}, None),  # one task: no job
    ({"PATH": "/usr/bin"}, None),
])
def test_the_job_is_read_from_each_schedulers_variables(environ, job):
    assert job_from_env(environ, 2) == job


def test_a_scheduler_task_that_trains_alone_is_no_job():
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "a"}
    assert job_from_env(slurm, 1) is None  # a task of an allocation, training alone (train.processes: 1)
    assert job_from_env(slurm, 4) == Job(f"a:{DEFAULT_PORT}", 4, 3, "Slurm")
    pod = {"JOB_COMPLETION_INDEX": "2"}
    assert job_from_env(pod, 1) is None  # a pod of an Indexed Job that runs experiments of its own
    with pytest.raises(UserError, match="set WORLD_SIZE"):
        job_from_env(pod, 2)


@pytest.mark.parametrize("environ, message", [
    ({"JOB_COMPLETION_INDEX": "0", "MASTER_ADDR": "x"}, "Kubernetes Indexed Job: set WORLD_SIZE"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR is not set"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "x"}, "rank 2 is not below the job's 2 processes"),
    ({"RANK": "one", "WORLD_SIZE": "2", "MASTER_ADDR": "x"}, "RANK = 'one' is not a whole number"),
    ({"RANK": "\u00b2", "WORLD_SIZE": "2", "MASTER_ADDR": "x"}, "is not a whole number"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "99999"}, "MASTER_PORT = '99999'"),
])
def test_a_job_named_wrong_is_one_line(environ, message):
    with pytest.raises(UserError, match=message):
        job_from_env(environ, 2)


@pytest.mark.parametrize("nodelist, host", [("node01", "node01"), ("node[01-04]", "node01"),
                                            ("gpu[7,9-10]", "gpu7"), ("a,b", "a"), ("n-[10-11],x", "n-10")])
def test_the_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_a_job_of_another_size_than_train_processes_is_refused():
    check_job(None, 2)
    check_job(Job("h:1", 2, 0, "Slurm"), 2)
    with pytest.raises(UserError, match=r"this job \(Slurm\) has 4 processes but train.processes = 2; set "
                                        r"train.processes: 4"):
        check_job(Job("h:1", 4, 0, "Slurm"), 2)


def train_params(**overrides):
    return validate(tiny_params(**overrides)["train"], TrainParams, "train", "params.yaml")


@pytest.mark.parametrize("backend", ["tensorflow", "torch"])
def test_a_backend_that_cannot_is_refused_naming_the_one_that_can(backend):
    with pytest.raises(UserError, match=rf"train.processes = 2 runs on jax only .* on {backend}, .* set "
                                        r"base.backend: jax, or train.processes: 1"):
        check_train(train_params(**{"train.processes": 2, "train.steps_per_execution": 1}), backend)
    check_train(train_params(**{"train.processes": 2}), "jax")


def test_processes_and_replicas_together_are_refused():
    with pytest.raises(UserError, match="train.processes = 2 with train.replicas = 2"):
        check_train(train_params(**{"train.processes": 2, "train.replicas": 2}), "jax")


def test_batches_the_processes_cannot_share_equally_are_refused():
    check_shares(1000, train_params(**{"train.processes": 2, "train.batch_size": 128}))  # last batch: 104
    with pytest.raises(UserError, match="train.batch_size = 100 does not split into train.processes = 3"):
        check_shares(1000, train_params(**{"train.processes": 3, "train.batch_size": 100}))
    with pytest.raises(UserError, match=r"the last training batch holds 41 of 1,001 images"):
        check_shares(1001, train_params(**{"train.processes": 2, "train.batch_size": 64}))
    with pytest.raises(UserError, match=r"the last validation batch holds 1 of 101 images"):
        check_shares(1001, train_params(**{"train.processes": 2, "train.batch_size": 100,
                                           "train.validation_split": 0.1}))


def test_what_the_processes_would_refuse_is_refused_before_they_start(prepared, tmp_path):
    from stages import train

    params = write_params(tmp_path / "params.yaml", tiny_params(**{"base.backend": "jax", "train.processes": 3,
                                                                     "train.batch_size": 96}))
    with pytest.raises(UserError, match=r"^params.yaml: the last training batch holds 40 of 1,000 images"):
        train.main(["--device", "cpu", "--data", str(prepared / "data"), "--init", str(prepared / "init"),
                    "--out", str(tmp_path / "cpu"), "--metrics", str(tmp_path / "m.json"), "--details",
                    str(tmp_path / "d.json"), "--live", str(tmp_path / "live"), "--params", str(params)])
    assert not any(p.name.startswith("mnist-cnn-processes-") for p in Path(tempfile.gettempdir()).iterdir()
                   if p.stat().st_mtime > time.time() - 60)


# --- the feed every process reads ---


def test_each_epochs_order_is_a_permutation_drawn_from_the_seed_and_the_epoch():
    a, b = epoch_order(1000, 42, 0, True), epoch_order(1000, 42, 0, True)
    assert np.array_equal(a, b) and np.array_equal(np.sort(a), np.arange(1000))
    assert not np.array_equal(a, epoch_order(1000, 42, 1, True))
    assert not np.array_equal(a, epoch_order(1000, 43, 0, True))
    assert np.array_equal(epoch_order(10, 42, 3, False), np.arange(10))


def test_the_processes_shares_make_up_the_one_process_batch():
    batch = np.arange(100, 164)
    parts = [share(batch, rank, 4) for rank in range(4)]
    assert all(len(part) == 16 for part in parts) and np.array_equal(np.concatenate(parts), batch)


def test_the_feed_reads_a_memory_mapped_file_every_image_once_an_epoch(tmp_path):
    from mnist_cnn.backend import import_keras

    keras = import_keras("tensorflow", device="cpu")
    np.save(tmp_path / "p.npy", np.arange(250)[:, None, None] * np.ones((1, 2, 2), np.int32))
    mapped = np.load(tmp_path / "p.npy", mmap_mode="r")
    y = np.arange(250) % 10
    one = batches(keras, mapped, y, 0, 200, 64, "sparse_categorical_crossentropy", seed=1, shuffle=True)
    two = [batches(keras, mapped, y, 0, 200, 64, "sparse_categorical_crossentropy", seed=1, shuffle=True,
                   rank=rank, count=2) for rank in range(2)]
    firsts = []
    for epoch in range(2):
        seen = []
        for k in range(len(one)):
            images, labels = one[k]  # read in order, as Keras reads them
            parts = [each[k] for each in two]
            assert np.array_equal(np.concatenate([p[0] for p in parts]), images)
            assert np.array_equal(images[:, 0, 0] % 10, labels)  # each image with its own digit
            assert np.array_equal(one.batch(epoch, k)[0], images)  # after a whole pass, the next epoch
            seen.extend(images[:, 0, 0])
        assert sorted(seen) == list(range(200)) and len(one) == 4  # the first 200 rows, each once
        firsts.append(one.batch(epoch, 0)[0][:, 0, 0])
    assert not np.array_equal(*firsts)  # a new order each epoch
    for k in range(3):  # a pass dropped half-way (tf.distribute's first iterator) is read again as the same epoch
        one[k]
    assert np.array_equal(one[0][0], one.batch(2, 0)[0])
    validation = batches(keras, mapped, y, 200, 250, 64, "categorical_crossentropy", seed=1, shuffle=False)
    images, labels = validation[0]
    assert np.array_equal(images[:, 0, 0], np.arange(200, 250)) and labels.shape == (50, 10)


def test_a_fit_reads_each_epochs_batches_in_its_own_order_each_once():
    """On tensorflow, whose pipelines read ahead of the epoch they are in: the fit's reads are epoch 0's batches
    in order, then epoch 1's, ..., each the slice of its epoch's order."""
    from mnist_cnn.backend import import_keras

    keras = import_keras("tensorflow", device="cpu")
    n, size = 200, 16
    pixels = (np.arange(n)[:, None, None] % 251).astype(np.uint8) * np.ones((1, 2, 2), np.uint8)
    feed = batches(keras, pixels, np.arange(n) % 10, 0, n, size, "sparse_categorical_crossentropy", seed=5,
                   shuffle=True)
    reads = []
    cls = type(feed)
    own = cls.batch

    def recording(self, epoch, k):
        reads.append((epoch, k))
        images, labels = own(self, epoch, k)
        assert np.array_equal(images[:, 0, 0], epoch_order(n, 5, epoch, True)[k * size:(k + 1) * size] % 251)
        return images, labels

    cls.batch = recording
    model = keras.Sequential([keras.Input((2, 2), dtype="uint8"), keras.layers.Flatten(), keras.layers.Dense(10)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), steps_per_execution=4)
    model.fit(feed, epochs=3, verbose=0, shuffle=False)
    steps = -(-n // size)
    assert reads[:3 * steps] == [(e, k) for e in range(3) for k in range(steps)]


# --- real jobs of two processes on this host ---


def run_stage(prepared, folder, timeout=600, **overrides):
    """`python -m stages.train` as dvc.yaml runs it, on the prepared tiny data; (process, out folder)."""
    folder.mkdir(exist_ok=True)
    params = write_params(folder / "params.yaml", tiny_params(**{"base.backend": "jax", **overrides}))
    args = ["--device", "cpu", "--data", str(prepared / "data"), "--init", str(prepared / "init"),
            "--out", str(folder / "cpu"), "--metrics", str(folder / "m.json"), "--details", str(folder / "d.json"),
            "--live", str(folder / "live"), "--params", str(params)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
    return subprocess.Popen([sys.executable, "-m", "stages.train", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE), folder


# Two processes against one, at the same global batch, on the same batches: the weights differ by the order of
# the gradient sums only. Measured 5e-8 after one epoch of the tiny network (AMD EPYC, AVX2): 1e-6 leaves room.
TWO_PROCESS_TOLERANCE = 1e-6


@pytest.mark.e2e
def test_two_processes_train_the_weights_one_process_trains(prepared, tmp_path):
    from mnist_cnn.backend import import_keras

    runs = {n: run_stage(prepared, tmp_path / str(n), **{"train.processes": n, "train.epochs": 2}) for n in (1, 2)}
    for n, (proc, _) in runs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        if n == 2:
            assert "2 processes (started here, 2 devices)" in out and "[Gloo]" not in out + err
    keras = import_keras("tensorflow", device="cpu")  # a .keras file reads on any backend
    weights = {n: keras.models.load_model(folder / "cpu" / "model.keras").get_weights()
               for n, (_, folder) in runs.items()}
    assert len(weights[1]) == len(weights[2]) > 4
    worst = max(float(np.abs(a - b).max()) for a, b in zip(weights[1], weights[2], strict=True))
    assert worst <= TWO_PROCESS_TOLERANCE
    details = json.loads((tmp_path / "2" / "d.json").read_text())
    assert details["processes"] == 2 and details["job"] == "started here" and len(details["replica_devices"]) == 2
    assert not list((tmp_path / "1").glob("rank*"))


def children_of(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.e2e
@pytest.mark.parametrize("victim", ["worker", "launcher"])
def test_a_process_that_dies_ends_the_others_with_one_line_and_nothing_written(prepared, tmp_path, victim):
    proc, folder = run_stage(prepared, tmp_path / victim, **{"train.processes": 2, "train.epochs": 500})
    deadline = time.monotonic() + 120
    while True:  # until both are past their start-up (a few CPU seconds each), into the fit
        workers = [p for p in children_of(proc.pid) if "stages.train" in " ".join(p.cmdline())]
        if len(workers) == 2 and all(p.cpu_times().user > 8 for p in workers):
            break
        assert time.monotonic() < deadline and proc.poll() is None, "the two processes never started"
        time.sleep(0.5)
    rank1 = next(p for p in workers if p.environ().get("RANK") == "1")
    killed_at = time.monotonic()
    if victim == "worker":
        rank1.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - killed_at
        assert proc.returncode == 1 and took < 15
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "process 1 of 2 was killed by SIGKILL; the others were stopped" in lines[0], err
        logs = Path(lines[0].split("the processes' logs: ")[1].rstrip("/)"))
        assert "nothing was written" in lines[0] and (logs / "process0.log").is_file()
        shutil.rmtree(logs)
    else:
        proc.send_signal(signal.SIGKILL)  # the stage itself, as `kill -9` or an OOM killer would
        proc.communicate(timeout=60)
        gone, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, f"processes outlived their stage: {alive}"
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)
    assert not (folder / "cpu").exists() and not (folder / "live").exists() and not (folder / "d.json").exists()


@pytest.mark.e2e
def test_a_job_a_scheduler_started_trains_and_only_its_first_process_writes(prepared, tmp_path):
    """As `srun` would start them on one node: two processes of the stage's command, each told only its
    SLURM_PROCID, SLURM_NTASKS and the node list (no launcher here). The first writes every output; the other,
    in its own folder, writes none and still ends 0."""
    from mnist_cnn.processes import free_port

    port = free_port()
    procs = []
    for rank in range(2):
        folder = tmp_path / f"task{rank}"
        folder.mkdir()
        params = write_params(folder / "params.yaml", tiny_params(**{"base.backend": "jax", "train.processes": 2}))
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "stages.train", "--device", "cpu", "--data", str(prepared / "data"),
             "--init", str(prepared / "init"), "--out", str(folder / "cpu"), "--metrics", str(folder / "m.json"),
             "--details", str(folder / "d.json"), "--live", str(folder / "live"), "--params", str(params)],
            cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = [proc.communicate(timeout=600) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert "2 processes (Slurm, 2 devices)" in outputs[0][0]
    assert not [line for line in outputs[1][0].splitlines() if line.strip() and not line.startswith("[Gloo]")]
    first, other = tmp_path / "task0", tmp_path / "task1"
    assert (first / "cpu" / "model.keras").is_file() and json.loads((first / "d.json").read_text())["job"] == "Slurm"
    assert sorted(p.name for p in other.iterdir()) == ["params.yaml"]
