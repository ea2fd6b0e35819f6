"""Sharing results through a DVC remote, as README's "Sharing results: a DVC remote" says, against real servers.

Two remotes: a folder (a shared directory) and an SSH server, OpenSSH's own sshd started on localhost with
a throwaway host key and user key, reached through DVC's ssh plugin (dvc-ssh). The tiny pipeline runs once
on the committed sample (module fixture `origin`) and is pushed; fresh git clones then pull it, restore a
run of other params from the run cache instead of training, run only the last stages with
`dvc repro --pull --allow-missing`, and, two clones sharing one remote, a GPU host trains and pushes while a
CPU host evaluates that model and reports without training it.
"""

import contextlib
import getpass
import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT, SAMPLE, doc_section, set_params
from tests.conftest import ALL_CPU_STAGES, commit, copy_project, dvc, dvc_env, ran

SECTION = "Sharing results: a DVC remote"  # docs/sharing.md's
pytestmark = [pytest.mark.e2e, pytest.mark.long]
SSHD = Path("/usr/sbin/sshd")
NO_SSHD = f"{SSHD} not found: install OpenSSH's server (Debian: apt-get install openssh-server; .ci/run does)"
CACHED = "Stage '{}' is cached - skipping run, checking out outputs"  # what DVC 3.67 prints on a run-cache hit


def readme_push_run_files():
    """The README's script that sends the files the run records name (`python - <<'EOF'` … `EOF`), as written:
    `dvc push --run-cache` sends only the records, `dvc push` only the workspace's cached outputs."""
    return doc_section(SECTION).split("python - <<'EOF'", 1)[1].split("\n", 1)[1].split("\nEOF\n", 1)[0]


@dataclass
class Remote:
    name: str
    url: str
    local: dict = field(default_factory=dict)  # `dvc remote modify --local` settings: credentials, never committed


def git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def md5(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def sshd_server(folder):
    """OpenSSH's sshd on 127.0.0.1, its own config, host key and user key in `folder`; stopped whatever happens.

    Yields (port, user, private key file). Only the key in `folder` logs in, as the user running the tests.
    """
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"pytest {name}", "-f",
                        str(folder / name)], check=True)
    (folder / "authorized_keys").write_text((folder / "user_key.pub").read_text())
    if os.geteuid() == 0:  # sshd run by root needs its privilege separation folder, which Debian's service makes
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    port = free_port()
    (folder / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {folder / 'host_key'}
AuthorizedKeysFile {folder / 'authorized_keys'}
PidFile {folder / 'sshd.pid'}
UsePAM no
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
Subsystem sftp internal-sftp
""")
    log = folder / "sshd.log"
    with log.open("w") as out:
        server = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(folder / "sshd_config")],
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while True:
            if server.poll() is not None:
                raise AssertionError(f"sshd exited with status {server.returncode}:\n{log.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(64).startswith(b"SSH-2.0-"):
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"sshd did not answer on port {port} within 15 s:\n{log.read_text()}")
            time.sleep(0.1)
        yield port, getpass.getuser(), folder / "user_key"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture(scope="module")
def remotes(tmp_path_factory):
    """The remotes: "folder", a shared directory; "ssh", sshd on localhost (when installed). Neither exists yet:
    the first push creates it."""
    storage = tmp_path_factory.mktemp("storage")
    found = {"folder": Remote("shared", str(storage / "shared"))}
    if not SSHD.exists():
        yield found
        return
    with sshd_server(tmp_path_factory.mktemp("sshd")) as (port, user, keyfile):
        found["ssh"] = Remote("store", f"ssh://127.0.0.1:{port}{storage}/ssh", {"user": user, "keyfile": str(keyfile)})
        yield found


def remote_of(remotes, kind):
    if kind not in remotes:
        pytest.skip(NO_SSHD)
    return remotes[kind]


def set_credentials(repo, remote):
    for key, value in remote.local.items():
        dvc(repo, "remote", "modify", "--local", remote.name, key, value)


@pytest.fixture(scope="module")
def origin(tmp_path_factory, remotes):
    """The first host: the tiny pipeline run and committed with the remotes' URLs; then a run of other params
    (train.epochs=2) pushed with the run cache and never committed. (repository, md5 of that run's classifier)."""
    repo = copy_project(tmp_path_factory.mktemp("origin"))
    git(repo, "init", "-q")
    dvc(repo, "init", "-q")
    (repo / ".dvc" / "config").write_text((ROOT / ".dvc" / "config").read_text())  # plots page, no analytics
    for remote in remotes.values():
        dvc(repo, "remote", "add", remote.name, remote.url)
        set_credentials(repo, remote)
    commit(repo, "the project, as cloned")
    assert ran(dvc(repo, "repro")) == ALL_CPU_STAGES
    commit(repo, "baseline run")

    set_params(repo, **{"train.epochs": 2})
    assert ran(dvc(repo, "repro", "evaluate@cpu")) == {"train@cpu", "evaluate@cpu"}  # report: no run record
    other = md5(repo / "models" / "cpu" / "classifier.keras")
    git(repo, "checkout", "--", ".")  # back to the committed run: that one stays in the run cache only
    dvc(repo, "checkout")
    assert "up to date" in dvc(repo, "status").stdout
    for remote in remotes.values():  # as the README says: the data, the run records, the files they name
        dvc(repo, "remote", "default", "--local", remote.name)
        dvc(repo, "push", "--run-cache")
        pushed = subprocess.run([sys.executable, "-"], input=readme_push_run_files(), cwd=repo, env=dvc_env(repo),
                                capture_output=True, text=True)
        assert pushed.returncode == 0 and pushed.stdout.endswith("files pushed\n"), pushed.stdout + pushed.stderr
    assert md5(repo / "models" / "cpu" / "classifier.keras") != other
    return repo, other


def clone(source, where, remote):
    """A teammate's fresh clone: git clone, then the remote's credentials and default in .dvc/config.local.

    Written as the README's `dvc remote modify --local` and `dvc remote default --local` write it (`origin` runs
    those commands): three DVC start-ups fewer per clone."""
    git(where.parent, "clone", "-q", str(source), where.name)
    settings = "".join(f"    {key} = {value}\n" for key, value in remote.local.items())
    (where / ".dvc" / "config.local").write_text(f"[core]\n    remote = {remote.name}\n"
                                                  + (f"['remote \"{remote.name}\"']\n{settings}" if settings else ""))
    return where


def lock_outs(repo):
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return sorted({out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])})


@pytest.mark.parametrize("kind", ["folder", "ssh"])
def test_a_fresh_clone_pulls_every_output_and_reruns_nothing(origin, remotes, kind, tmp_path):
    repo, _ = origin
    remote = remote_of(remotes, kind)
    team = clone(repo, tmp_path / "team", remote)
    assert "keyfile" not in (team / ".dvc" / "config").read_text()  # credentials stay in .dvc/config.local
    assert ".dvc/config.local" not in git(repo, "ls-files", ".dvc")
    assert not (team / "models" / "cpu").exists()  # git alone brings no data

    dvc(team, "pull")
    missing = [path for path in lock_outs(team) if not (team / path).exists()]
    assert missing == []
    assert "Data and pipelines are up to date." in dvc(team, "status").stdout
    again = dvc(team, "repro")
    assert ran(again) == set() and "is cached" not in again.stdout, again.stdout
    for path in ("models/cpu/classifier.keras", "data/processed/x_test.npy", "details/train_cpu.json"):
        assert md5(team / path) == md5(repo / path), path
    assert not (Path(os.environ["HOME"]) / ".ssh").exists()  # nothing written to any ~/.ssh (no known_hosts)


def test_a_run_of_other_params_pushed_elsewhere_is_restored_not_retrained(origin, remotes, tmp_path):
    repo, other = origin
    team = clone(repo, tmp_path / "team", remote_of(remotes, "ssh"))
    result = dvc(team, "exp", "run", "--pull", "-S", "train.epochs=2")  # the run records, then what stages need
    for stage in ("train@cpu", "evaluate@cpu"):
        assert CACHED.format(stage) in result.stdout, result.stdout
    assert ran(result) <= {"report"}, result.stdout  # report's outputs are in git: no run cache for it
    assert md5(team / "models" / "cpu" / "classifier.keras") == other


def test_repro_pull_allow_missing_runs_only_the_last_stages_without_the_data(origin, remotes, tmp_path):
    repo, _ = origin
    team = clone(repo, tmp_path / "team", remote_of(remotes, "ssh"))
    dvc(team, "pull", "build_init_weights", "train@cpu", "evaluate@cpu")  # as the README says: what report reads
    dvc(team, "pull", "details/data.json")
    set_params(team, **{"evaluate.batch_size": 500})
    result = dvc(team, "repro", "--pull", "--allow-missing")
    for stage in ("fetch", "preprocess", "build_init_weights", "train@cpu"):
        assert f"Stage '{stage}' didn't change, skipping" in result.stdout, result.stdout
    assert "evaluate@cpu" in ran(result) <= {"evaluate@cpu", "report"}, result.stdout
    assert not (team / "data" / "raw").exists()  # fetch's output: never pulled; data/processed, for evaluate
    ours, theirs = (json.loads((r / "metrics" / "evaluate_cpu.json").read_text())["test"] for r in (team, repo))
    assert ours["accuracy"] == theirs["accuracy"] and ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6)


def test_the_ssh_remote_does_not_check_the_host_key_as_the_readme_warns(origin, remotes, tmp_path):
    """OpenSSH refuses a server whose key contradicts known_hosts; DVC's ssh remote (dvc-ssh, sshfs) connects."""
    repo, _ = origin
    remote = remote_of(remotes, "ssh")
    port = urlsplit(remote.url).port
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "impostor")], check=True)
    ssh_dir = tmp_path / "home" / ".ssh"  # a HOME of this test's own: nobody's real ~/.ssh is read or written
    ssh_dir.mkdir(parents=True)
    known_hosts = ssh_dir / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {' '.join((tmp_path / 'impostor.pub').read_text().split()[:2])}\n")
    (ssh_dir / "config").write_text(f"Host *\n  StrictHostKeyChecking yes\n  UserKnownHostsFile {known_hosts}\n")
    openssh = subprocess.run(["ssh", "-F", str(ssh_dir / "config"), "-o", "GlobalKnownHostsFile=/dev/null",
                              "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i", remote.local["keyfile"],
                              "-p", str(port), f"{remote.local['user']}@127.0.0.1", "true"],
                             capture_output=True, text=True)
    assert openssh.returncode == 255 and "Host key verification failed" in openssh.stderr, openssh.stderr
    env = dvc_env(repo)
    env["HOME"] = str(ssh_dir.parent)
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--cloud", "-r", remote.name], cwd=repo, env=env,
                            capture_output=True, text=True)
    assert status.returncode == 0 and "in sync" in status.stdout, status.stdout + status.stderr
    assert known_hosts.read_text().count("\n") == 1  # nor written


def stage_command(repo, stage, item):
    """The command line dvc.yaml gives a foreach stage for `item`, as argv, run by this Python."""
    cmd = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][stage]["do"]["cmd"].replace("${item}", item)
    argv = shlex.split(cmd)
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


def test_a_gpu_host_trains_and_pushes_a_cpu_host_evaluates_its_model_without_training(origin, remotes, tmp_path):
    repo, _ = origin
    remote = remote_of(remotes, "ssh")

    gpu_host = clone(repo, tmp_path / "gpu_host", remote)
    dvc(gpu_host, "pull")  # the data and initial weights: fetch, preprocess and build_init_weights do not run
    set_params(gpu_host, **{"train.devices": ["cpu", "gpu"]})
    # In place of the README's `dvc exp run --pull -S 'train.devices=[cpu,gpu]' train@gpu` (this machine has no
    # GPU, and train@gpu refuses to run without one): the stage's own command with --device cpu, its outputs
    # recorded as train@gpu's. Only here, in a temporary clone: no run labeled GPU comes from a CPU elsewhere.
    argv = stage_command(gpu_host, "train", "gpu")
    argv[argv.index("--device") + 1] = "cpu"
    subprocess.run(argv, cwd=gpu_host, env=dvc_env(gpu_host), check=True, capture_output=True)
    dvc(gpu_host, "commit", "-f", "train@gpu")
    commit(gpu_host, "train.devices=[cpu,gpu], trained on the GPU host")
    dvc(gpu_host, "push")

    cpu_host = clone(gpu_host, tmp_path / "cpu_host", remote)
    result = dvc(cpu_host, "repro", "--pull")
    assert ran(result) == {"evaluate@gpu", "report"}, result.stdout
    assert "Pulling data for stage: 'train@gpu'" in result.stdout, result.stdout  # pulled, never run
    assert "gpu model on 1000 test images" in result.stdout  # evaluate@gpu ran here, on this host's CPU
    model = Path("models", "gpu", "classifier.keras")
    assert md5(cpu_host / model) == md5(gpu_host / model)
    assert "Data and pipelines are up to date." in dvc(cpu_host, "status").stdout

    with np.load(SAMPLE) as sample:
        np.savez(tmp_path / "digits.npz", x=sample["x_test"][:3])
        digits = sample["y_test"][:3]
    predicted = subprocess.run([sys.executable, "-m", "tools.predict", str(tmp_path / "digits.npz"),
                                "--model", "models/gpu"], cwd=cpu_host, env=dvc_env(cpu_host),
                               capture_output=True, text=True)
    assert predicted.returncode == 0, predicted.stderr
    lines = predicted.stdout.splitlines()
    assert [line.split(": ")[0] for line in lines] == [f"{tmp_path / 'digits.npz'}:x[{i}]" for i in range(3)]
    assert sum(int(line.split(": ")[1].split()[0]) == d for line, d in zip(lines, digits, strict=True)) >= 2


def readme_blocks(section, language="bash"):
    """Every ```{language} block under the heading `## {section}` (up to the next `## `), in order."""
    body = doc_section(section)
    return [part.split("```", 1)[0] for part in body.split(f"```{language}\n")[1:]]


def test_the_readmes_first_two_blocks_share_a_run_as_written(remotes, tmp_path):
    """A clone whose committed dvc.lock is another CPU's run (its model's hash is not this one's) runs the
    pipeline, then follows the README's blocks in order: commit the run with the remote, push; a teammate's
    fresh clone pulls every output and has nothing to run. Substituted: the host, users and key (the local
    sshd's), the team's repository (a bare one here)."""
    remote = remote_of(remotes, "ssh")
    upstream = copy_project(tmp_path / "upstream")
    git(upstream, "init", "-q")
    dvc(upstream, "init", "-q")
    (upstream / ".dvc" / "config").write_text((ROOT / ".dvc" / "config").read_text())
    commit(upstream, "the project")
    dvc(upstream, "repro")
    lock = yaml.safe_load((upstream / "dvc.lock").read_text())
    for out in lock["stages"]["train@cpu"]["outs"]:
        if out["path"] == "models/cpu":  # the run of another CPU: other bits, another hash
            out["md5"] = "0123456789abcdef0123456789abcdef.dir"
    (upstream / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    commit(upstream, "the committed run, made on another CPU")
    team = tmp_path / "server" / "mnist-cnn.git"  # cloned as mnist-cnn, as the README's URL is
    team.parent.mkdir()
    git(tmp_path, "clone", "-q", "--bare", str(upstream), str(team))
    git(tmp_path, "clone", "-q", str(team), "alice")

    substitutes = {"ssh://host.example.com/srv/dvc/mnist": remote.url, "user alice": f"user {remote.local['user']}",
                   "user bob": f"user {remote.local['user']}", "~/.ssh/id_ed25519": remote.local["keyfile"],
                   "https://git.example.com/team/mnist-cnn.git": str(team)}
    blocks = readme_blocks(SECTION)[:2]
    assert "git add .dvc/config dvc.lock" in blocks[0] and blocks[1].startswith("git clone ")
    for key in substitutes:
        assert key in blocks[0] + blocks[1], key  # the README still says what is substituted
    outputs = []
    for where, block in zip((tmp_path / "alice", tmp_path), blocks, strict=True):
        for key, value in substitutes.items():
            block = block.replace(key, value)
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=where, env=dvc_env(where),
                                capture_output=True, text=True)
        assert result.returncode == 0, f"{block}\n{result.stdout}\n{result.stderr}"
        outputs.append(result.stdout)
    teammate = tmp_path / "mnist-cnn"
    assert "Data and pipelines are up to date." in outputs[1]
    assert [path for path in lock_outs(teammate) if not (teammate / path).exists()] == []
    assert md5(teammate / "models/cpu/classifier.keras") == md5(tmp_path / "alice/models/cpu/classifier.keras")

    # the recipe before this one committed .dvc/config alone: a clone then has the other CPU's dvc.lock
    git(tmp_path / "alice", "checkout", "-q", "HEAD~1", "--", "dvc.lock")
    git(tmp_path / "alice", "commit", "-q", "-m", "the other CPU's dvc.lock again")
    git(tmp_path / "alice", "push", "-q")
    stale = clone(team, tmp_path / "stale", remote)
    failed = dvc(stale, "pull", check=False)
    assert failed.returncode != 0 and "Checkout failed" in failed.stderr, failed.stderr


def test_two_hosts_share_one_sweep_and_run_each_experiment_once(origin, remotes, tmp_path):
    """Two clones of the team's repository, one DVC remote (the sshd): `python -m tools.sweep` on both at once,
    host 0 and 1 of 2. Every experiment is run by one host and pushed; the hosts run again (a requeued task)
    and run nothing; a third clone pulls them all and `dvc exp show` lists each with its params and metrics."""
    remote = remote_of(remotes, "ssh")
    repo, _ = origin
    team = tmp_path / "team.git"
    git(tmp_path, "clone", "-q", "--bare", str(repo), str(team))
    sweep = tmp_path / "sweep.yaml"
    # host 0 runs small-batch, then learning_rate-0.004-epochs-2, which must not inherit the batch size
    sweep.write_text("experiments:\n  small-batch: {train.batch_size: 32}\n"
                     "grid:\n  train.learning_rate: [0.002, 0.004]\n  train.epochs: [2]\n")
    names = {"small-batch", "learning_rate-0.002-epochs-2", "learning_rate-0.004-epochs-2"}
    hosts = [clone(team, tmp_path / f"host{i}", remote) for i in range(2)]

    def start(i):
        return subprocess.Popen([sys.executable, "-m", "tools.sweep", str(sweep), "--host", str(i), "--hosts", "2"],
                                cwd=hosts[i], env=dvc_env(hosts[i]), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    runs = [start(i) for i in range(2)]  # at once, as two machines would
    logs = [proc.communicate(timeout=900)[0] for proc in runs]
    assert all(proc.returncode == 0 for proc in runs), "\n".join(logs)
    ran_by = {i: {line.split(":")[0] for line in log.splitlines() if ": ran and pushed" in line}
              for i, log in enumerate(logs)}
    assert ran_by[0] == {"small-batch", "learning_rate-0.004-epochs-2"}
    assert ran_by[1] == {"learning_rate-0.002-epochs-2"}
    refs = git(team, "for-each-ref", "--format=%(refname)", "refs/exps").split()
    assert sorted(ref.rsplit("/", 1)[-1] for ref in refs) == sorted(names)  # each once, on the git remote

    again = [start(i) for i in range(2)]
    logs = [proc.communicate(timeout=300)[0] for proc in again]
    assert all(proc.returncode == 0 for proc in again) and "0 ran, 2 already done" in logs[0], "\n".join(logs)
    assert "0 ran, 1 already done" in logs[1]

    viewer = clone(team, tmp_path / "viewer", remote)
    dvc(viewer, "exp", "pull", "origin", *sorted(names))
    shown = json.loads(dvc(viewer, "exp", "show", "--json").stdout)
    found = {}
    for commit_row in shown:
        for exp in commit_row.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                params = data.get("params", {}).get("params.yaml", {}).get("data", {})
                metrics = data.get("metrics", {}).get("metrics/evaluate_cpu.json", {}).get("data", {})
                found[exp.get("name") or rev.get("name")] = (params["train"], metrics["test"]["accuracy"])
    assert set(found) == names, found
    committed = yaml.safe_load((repo / "params.yaml").read_text())["train"]
    assert found["small-batch"][0]["batch_size"] == 32 != committed["batch_size"]
    for name in ("learning_rate-0.002-epochs-2", "learning_rate-0.004-epochs-2"):  # each from the commit's params
        assert found[name][0]["batch_size"] == committed["batch_size"] and found[name][0]["epochs"] == 2
    assert found["learning_rate-0.004-epochs-2"][0]["learning_rate"] == 0.004
    assert all(0 < accuracy <= 1 for _, accuracy in found.values())
