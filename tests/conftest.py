"""Shared fixtures: small real data from the committed sample, and params for tiny runs."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import settings

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
    from stages.common import write_manifest
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in raw.items():
        np.save(folder / f"{name}.npy", arr)
    write_manifest(folder, "fetch")
    return folder


def write_processed(folder, raw, procedure="published_split", seed=0):
    """Run preprocess on `raw` and save its arrays and scaler.json in `folder`, as the stage does; return both."""
    from stages import preprocess
    from stages.common import write_manifest
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


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A model trained here on the sample (the seed's CNN, 2 epochs: about 95 %), for predict and serve.

    (model folder, raw test images, test labels, the network's own predictions on their standardized forms)."""
    from stages import build_init_weights, train
    from stages.common import import_keras

    tmp = tmp_path_factory.mktemp("predict")
    with np.load(SAMPLE) as npz:
        raw = {name: npz[name] for name in npz.files}
    arrays, _ = write_processed(tmp / "data", raw)
    params = tiny_params(**{"train.epochs": 2, "train.batch_size": 64})
    params["model"] = yaml.safe_load((ROOT / "params.yaml").read_text())["model"]  # the seed's CNN
    p = write_params(tmp / "params.yaml", params)
    build_init_weights.main(["--out", str(tmp / "init"), "--metrics", str(tmp / "m.json"),
                             "--details", str(tmp / "md.json"), "--params", str(p)])
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
    from stages import build_init_weights
    build_init_weights.main(["--out", str(tmp / "init"), "--metrics", str(tmp / "model.json"),
                             "--details", str(tmp / "model_details.json"), "--params", str(p)])
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
