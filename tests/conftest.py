"""Shared fixtures: small real data from the committed sample, params for tiny runs, a trained model, and a
DVC copy of the project (git, `dvc init`, one `dvc repro` on the sample) with the helpers that drive it."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import settings

from mnist_cnn.params import EvaluateParams, FetchParams, ModelParams, PreprocessParams, TrainParams

ROOT = Path(__file__).resolve().parent.parent

# Hypothesis (tests/test_fuzz.py): the same examples on every run by default, so that CI is not a lottery;
# HYPOTHESIS_PROFILE=explore draws new ones each run, to look further.
settings.register_profile("default", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
SAMPLE = ROOT / "data" / "sample" / "mnist_sample.npz"


def full_mnist_npz(env):
    """Where fetch finds the full MNIST without downloading: MNIST_NPZ, else the Keras cache; None if neither."""
    from stages.fetch import keras_cache_file
    if env.get("MNIST_NPZ"):
        return Path(env["MNIST_NPZ"])
    cache = keras_cache_file(env)
    return cache if cache.is_file() else None


FULL_MNIST = full_mnist_npz(os.environ)  # found before the tests give themselves their own HOME (git_identity)


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # the README, then the manual in docs/


def doc_section(section):
    """The text under the heading `## {section}` of README.md or a page of docs/ (up to the next `## `)."""
    for page in DOCS:
        text = page.read_text()
        if f"\n## {section}\n" in text:
            return text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    raise AssertionError(f"no heading '## {section}' in README.md or docs/")


def readme_block(section, language):
    """The first ```{language} block under the heading `## {section}` (README.md or docs/): what the tests run
    as written."""
    return doc_section(section).split(f"```{language}\n", 1)[1].split("```", 1)[0]


def tiny_params(**overrides):
    """params.yaml's values with a small model and 1 epoch, so a run takes seconds."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["fetch"]["url"] = "http://127.0.0.1:9/mnist.npz"  # refused at once: no network in tests
    params["fetch"]["timeout_s"] = 5.0
    params["model"]["conv_blocks"] = {
        "conv1": {"filters": 4, "kernel_size": 3, "activation": "relu", "pool_size": 2},
        "conv2": {"filters": 8, "kernel_size": 3, "activation": "relu", "pool_size": 2},
    }
    params["model"]["dense_layers"] = {"dense1": {"units": 16, "activation": "relu"}}
    params["train"]["epochs"] = 1
    params["train"]["batch_size"] = 128
    for dotted, value in overrides.items():
        set_dotted(params, dotted, value)
    return params


def set_dotted(params, dotted, value):
    """params["a"]["b"] = value for the dotted key "a.b", as `dvc exp run -S a.b=value` sets it."""
    *path, last = dotted.split(".")
    node = params
    for key in path:
        node = node[key]
    node[last] = value


def set_params(repo, **changes):
    """Change keys of the repository's params.yaml, as a user editing it would."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for dotted, value in changes.items():
        set_dotted(params, dotted, value)
    write_params(repo / "params.yaml", params)


def write_raw(folder, raw):
    """Save the four arrays as fetch does, with its manifest; return the folder."""
    from mnist_cnn.files import write_manifest
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in raw.items():
        np.save(folder / f"{name}.npy", arr)
    write_manifest(folder, "fetch")
    return folder


def write_processed(folder, raw, procedure="published_split", seed=0):
    """Run preprocess on `raw` and save its arrays and scaler.json in `folder`, as the stage does; return both."""
    from stages import preprocess
    from mnist_cnn.files import write_manifest
    arrays, scaler = preprocess.preprocess(raw, procedure, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        np.save(folder / f"{name}.npy", arr)
    (folder / "scaler.json").write_text(json.dumps(scaler))
    write_manifest(folder, "preprocess")
    return arrays, scaler


def write_params(path, params):
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="session", autouse=True)
def git_identity(tmp_path_factory):
    """A git identity and an empty git configuration of the tests' own, whatever the account has.

    `dvc exp run` commits each experiment, so git needs a user name and email;
    a fresh account has none. HOME points at an empty folder so that the
    account's ~/.gitconfig (signing, hooks, aliases) cannot change what git does.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        mp.setenv("GIT_CONFIG_NOSYSTEM", "1")
        for who in ("AUTHOR", "COMMITTER"):
            mp.setenv(f"GIT_{who}_NAME", "pytest")
            mp.setenv(f"GIT_{who}_EMAIL", "pytest@example.com")
        yield


@pytest.fixture
def sample_raw():
    """The committed sample's four uint8 arrays (6,000 + 1,000 real MNIST images)."""
    with np.load(SAMPLE) as npz:
        return {name: npz[name] for name in npz.files}


@pytest.fixture
def isolated_env(monkeypatch, tmp_path):
    """No MNIST_NPZ and an empty Keras cache: fetch must fall back or fail."""
    monkeypatch.delenv("MNIST_NPZ", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    return tmp_path


def build_init(args):
    """build_init_weights's main() in this process, with Keras on TensorFlow first: the tests train in the same
    process afterwards, and Keras's backend is fixed once imported. As DVC runs it, the stage builds on Keras's
    NumPy backend (backend.keras_to_build); tests/test_build_init_weights.py checks that both write the same
    bytes."""
    from mnist_cnn.backend import import_keras
    from stages import build_init_weights

    import_keras("tensorflow", device="cpu")
    build_init_weights.main([str(arg) for arg in args])


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A model trained here on the sample (the seed's CNN, 2 epochs: about 95 %), for predict and serve.

    (model folder, raw test images, test labels, the network's own predictions on their standardized forms)."""
    from stages import train
    from mnist_cnn.backend import import_keras

    tmp = tmp_path_factory.mktemp("predict")
    with np.load(SAMPLE) as npz:
        raw = {name: npz[name] for name in npz.files}
    arrays, _ = write_processed(tmp / "data", raw)
    params = tiny_params(**{"train.epochs": 2, "train.batch_size": 64})
    params["model"] = yaml.safe_load((ROOT / "params.yaml").read_text())["model"]  # the seed's CNN
    p = write_params(tmp / "params.yaml", params)
    build_init(["--out", tmp / "init", "--metrics", tmp / "m.json", "--details", tmp / "md.json", "--params", p])
    train.main(["--device", "cpu", "--data", str(tmp / "data"), "--init", str(tmp / "init"), "--out", str(tmp / "cpu"),
                "--metrics", str(tmp / "t.json"), "--details", str(tmp / "d.json"), "--live", str(tmp / "live"),
                "--params", str(p)])
    keras = import_keras("tensorflow", device="cpu")
    oracle = keras.models.load_model(tmp / "cpu" / "model.keras").predict(arrays["x_test"][:20], verbose=0)
    return tmp / "cpu", raw["x_test"][:20], raw["y_test"][:20], oracle.argmax(axis=1)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Processed sample data (first 1,000 images) and tiny initial weights in a temp folder."""
    tmp = tmp_path_factory.mktemp("train")
    with np.load(SAMPLE) as npz:
        raw = {name: npz[name][:1000] for name in npz.files}
    write_processed(tmp / "data", raw)
    p = write_params(tmp / "params.yaml", tiny_params())
    build_init(["--out", tmp / "init", "--metrics", tmp / "model.json", "--details", tmp / "model_details.json",
                "--params", p])
    return tmp


def run_train(prepared, tmp_path, device="cpu", **overrides):
    tmp_path.mkdir(exist_ok=True)
    p = write_params(tmp_path / "params.yaml", tiny_params(**overrides))
    out = tmp_path / device
    from stages import train
    train.main(["--device", device, "--data", str(prepared / "data"), "--init", str(prepared / "init"),
                "--out", str(out), "--metrics", str(tmp_path / "m.json"), "--details", str(tmp_path / "d.json"),
                "--live", str(tmp_path / "live"), "--params", str(p)])
    return out, json.loads((tmp_path / "d.json").read_text())


# --- a DVC copy of the project, as a user runs it (the end-to-end tests share it) ---

PROJECT_FILES = [  # .gitignore: the folders tools write (change-report/), as in a clone
    "stages", "mnist_cnn", "tools", "dvc.yaml", "data/sample", ".dvcignore", ".gitignore", "templates",
    "live/.gitignore"]


ALL_CPU_STAGES = {"fetch", "preprocess", "build_init_weights", "train@cpu", "evaluate@cpu", "report"}


def dvc_env(project):
    env = {k: v for k, v in os.environ.items() if k != "MNIST_NPZ"}
    env["KERAS_HOME"] = str(project / ".keras_home")  # no Keras cache: fetch falls back to the sample
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # stages' `python` is ours
    env.pop("SSH_AUTH_SOCK", None)  # an SSH remote (tests/test_remote.py) logs in with the test's key, no agent's
    return env


def dvc(project, *args, check=True, timeout_s=600):
    """`dvc ARGS` in project, as the user's shell would run it; a run past timeout_s fails with what it printed."""
    try:
        result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=dvc_env(project),
                                capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        printed = "\n".join(out if isinstance(out, str) else (out or b"").decode(errors="replace")
                            for out in (err.stdout, err.stderr))
        raise AssertionError(f"dvc {' '.join(args)} did not end in {timeout_s} s in {project}:\n{printed}") from None
    if check and result.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed in {project}:\n{result.stdout}\n{result.stderr}")
    return result


def ran(result):
    """Names of the stages that actually ran (not skipped, not restored from DVC's run cache)."""
    return set(re.findall(r"^Running stage '([^']+)'", result.stdout, flags=re.M))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A git + DVC copy of the project with tiny params, after one full `dvc repro`."""
    return make_project(tmp_path_factory)


def copy_project(folder):
    """The project's files the pipeline needs, copied into `folder`, with tiny params; returns `folder`."""
    for name in PROJECT_FILES:
        src, dst = ROOT / name, folder / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    write_params(folder / "params.yaml", tiny_params())
    return folder


def make_project(tmp_path_factory):
    """The project fixture's folder (other test modules make their own with it)."""
    project = copy_project(tmp_path_factory.mktemp("project"))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    dvc(project, "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", project / ".dvc" / "config")  # the project's: plots page, no analytics
    commit(project, "the project, as cloned")  # DVCLive fails in a git repo without commits
    first = dvc(project, "repro")
    assert ran(first) == ALL_CPU_STAGES, first.stdout
    assert "NOT THE FULL MNIST" in first.stderr  # the fallback is loud
    commit(project, "baseline run")
    return project


def commit(project, message):
    """A commit as the tests' own git identity (conftest.git_identity), as `dvc exp run` makes them."""
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run(["git", "commit", "-qm", message], cwd=project, check=True)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


needs_chromium = pytest.mark.skipif(not CHROMIUM, reason="needs Chromium (Debian: apt-get install chromium)")


# Which params sections each stage reads (None: the section is read, its schema checked by another stage)
SCHEMAS = {
    "fetch": {"fetch": FetchParams},
    "preprocess": {"base": None, "preprocess": PreprocessParams},
    "build_init_weights": {"base": None, "model": ModelParams},
    "train": {"base": None, "train": TrainParams},
    "evaluate": {"evaluate": EvaluateParams},
    "report": {"base": None, "preprocess": None, "model": None, "train": None},
}


# A test that drives a DVC copy of the project (the `project` fixture: git, `dvc init`, a `dvc repro`) runs
# what a user runs, end to end: it is behind the e2e marker, as the modules that start sshd or a browser are,
# and as every test marked long (a minute or more: two devices, the queue) is.
END_TO_END_FIXTURES = {"project", "origin"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if END_TO_END_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("long"):
            item.add_marker(pytest.mark.e2e)
