"""Parallel sweeps: DVC's queue with two workers, and experiments shared through a git remote with their artifacts.

On the sample with tiny settings (tests/test_pipeline.py's project fixture).
"""

import csv
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
import warnings

import pytest

from tests.conftest import readme_block
from tests.conftest import dvc, dvc_env, make_project

pytestmark = [pytest.mark.e2e, pytest.mark.long]
RATES = ("0.0005", "0.002", "0.004")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory)


def queue_logs(project):
    """The queue workers' logs, for a failure's message: what a user would read when the queue stalls."""
    logs = sorted((project / ".dvc" / "tmp" / "exps").rglob("*.out"))
    return "\n".join(f"--- {log.relative_to(project)}:\n{log.read_text(errors='replace')[-3000:]}" for log in logs)


def wait_for_the_queue(project, timeout_s=300):  # ~75 s on 2 cores
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        status = dvc(project, "queue", "status", timeout_s=120).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        time.sleep(1.0)
    raise AssertionError(f"the queue did not empty in {timeout_s} s:\n{status}\n{queue_logs(project)}")


def stop_the_workers(project):
    """Stops the queue's workers whatever state they are in: DVC's own stop, then any process still working in
    the project (a worker or its experiment) is killed, so that none outlives the test."""
    import psutil

    try:
        dvc(project, "queue", "stop", "--kill", check=False, timeout_s=120)
    except AssertionError:
        pass
    ours = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    for proc in psutil.process_iter(["pid", "cwd"]):
        cwd = proc.info["cwd"] or ""
        if proc.info["pid"] not in ours and (cwd == str(project) or cwd.startswith(f"{project}{os.sep}")):
            try:
                proc.kill()
            except psutil.Error:
                pass


def experiment_refs(project):
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=project,
                          capture_output=True, text=True, check=True).stdout.split()
    return {ref.rsplit("/", 1)[1]: ref for ref in refs}


def locked(project, ref):
    """(train@cpu's params, {output path: md5}) from the dvc.lock an experiment committed."""
    import yaml
    lock = yaml.safe_load(subprocess.run(["git", "show", f"{ref}:dvc.lock"], cwd=project, capture_output=True,
                                         text=True, check=True).stdout)
    stage = lock["stages"]["train@cpu"]
    return stage["params"]["params.yaml"], {out["path"]: out["md5"] for out in stage["outs"]}


def cached(project, md5):
    return project / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def test_a_two_worker_sweep_runs_every_experiment_apart_and_shares_the_cores(project, tmp_path):
    # docs/experiments.md's block, run as written (the environment as its variables say)
    block = readme_block("Two experiments at a time", "bash")
    lines = [shlex.split(line.split("  #")[0]) for line in block.splitlines() if line.strip()]
    assert lines[0][:4] == ["dvc", "exp", "run", "--queue"] and lines[1][2:] == ["dvc", "queue", "start", "-j", "2"]
    assert dict(word.split("=") for word in lines[1][:2]) == {"TF_NUM_INTRAOP_THREADS": "1",
                                                               "TF_NUM_INTEROP_THREADS": "1"}
    assert lines[0][-1] == f"train.learning_rate={','.join(RATES)}"
    before = set(experiment_refs(project))
    env = dvc_env(project) | dict(word.split("=") for word in lines[1][:2])
    try:
        for attempt in (1, 2):
            dvc(project, *lines[0][1:])
            started = subprocess.run([sys.executable, "-m", *lines[1][2:]], cwd=project, env=env,
                                     capture_output=True, text=True, timeout=300)
            assert started.returncode == 0 and "Started '2' new experiments task queue workers" in started.stdout
            try:
                status = wait_for_the_queue(project)
                break
            except AssertionError as stalled:
                # DVC's queue (celery on a file-system broker) now and then stops with tasks left "Running",
                # open upstream as treeverse/dvc#10398 and #10428: the sweep is run once more, from an empty
                # queue, and a second stall fails the test with both workers' logs
                if attempt == 2:
                    raise
                warnings.warn(f"DVC's queue stalled; the sweep runs once more. {stalled}", stacklevel=1)
                stop_the_workers(project)
                dvc(project, "queue", "remove", "--all", check=False, timeout_s=120)
                dvc(project, "exp", "remove", *[n for n in experiment_refs(project) if n not in before],
                    check=False)
        new = {name: ref for name, ref in experiment_refs(project).items() if name not in before}
        assert len(new) == len(RATES), status
        runs = {}
        for ref in new.values():
            params, outs = locked(project, ref)
            runs[str(params["train.learning_rate"])] = outs
            details = json.loads(cached(project, outs["details/train_cpu.json"]).read_text())
            assert details["thread_env"] == {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
        assert sorted(runs, key=float) == sorted(map(str, map(float, RATES)), key=float)
        # none clobbered another: three models, each the one its own dvc.lock names, in the cache
        assert len({outs["models/cpu"] for outs in runs.values()}) == len(RATES)
        # and the table lists each, with its own numbers
        rows = [row for row in csv.DictReader(io.StringIO(dvc(project, "exp", "show", "--csv").stdout))
                if row["Experiment"] in new]
        assert sorted(float(row["train.learning_rate"]) for row in rows) == sorted(map(float, RATES))
        assert len({row["test.loss"] for row in rows}) == len(RATES) and all(row["test.accuracy"] for row in rows)

        # Shared through a git remote (a bare repo here) and a DVC remote (a folder): a teammate gets one.
        origin, store = tmp_path / "origin.git", tmp_path / "store"
        subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
        subprocess.run(["git", "remote", "add", "origin", str(origin)], cwd=project, check=True)
        subprocess.run(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], cwd=project, check=True)
        dvc(project, "remote", "add", "--local", "-d", "store", str(store))
        name = next(iter(new))
        dvc(project, "exp", "push", "origin", name)
        clone = tmp_path / "clone"
        subprocess.run(["git", "clone", "-q", "-b", "main", str(origin), str(clone)], check=True)
        dvc(clone, "remote", "add", "--local", "-d", "store", str(store))
        dvc(clone, "exp", "pull", "origin", name)
        assert name in dvc(clone, "exp", "list", "--name-only").stdout
        dvc(clone, "exp", "apply", name)
        _, outs = locked(project, new[name])
        lock = (clone / "dvc.lock").read_text()
        assert outs["models/cpu"] in lock
        assert (clone / "models" / "cpu" / "classifier.keras").is_file()
        assert "Data and pipelines are up to date" in dvc(clone, "status").stdout
    finally:
        stop_the_workers(project)
        dvc(project, "exp", "remove", *[n for n in experiment_refs(project) if n not in before], check=False)
        subprocess.run(["git", "remote", "remove", "origin"], cwd=project)
        dvc(project, "remote", "remove", "--local", "store", check=False)
        subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=project, check=True)
        dvc(project, "checkout", "-f", check=False)

