"""Every params value that selects a code path, end to end: train -> export -> evaluate -> predict.

The values below each take another branch of the code (another kernel, layer,
loss, optimizer, backend, device split or precision). Running every
combination would take hours; every *pair* of values is covered by a few
dozen runs (a pairwise covering array, built here deterministically), each on
tiny data in a process of its own, as DVC runs the stages. What the CPU
decides is covered too: `precision: auto` resolves from the CPU's flags, which
a row may replace (the kinds of CPU the project has met), and oneDNN's
instruction set can be capped (ONEDNN_MAX_CPU_ISA), so a machine with AMX also
runs the kernels of one with AVX2 only.

`pytest` runs a representative few rows; `pytest -m matrix` runs the others
(.ci/run does).
"""

import importlib.util
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, tiny_params, write_params, write_processed

# A value per branch. torch joins where it is installed (its CPU wheels are not on every index).
BACKENDS = ["tensorflow", "jax"] + (["torch"] if importlib.util.find_spec("torch") else [])
FACTORS = {
    "train.precision": ["float32", "mixed_bfloat16", "auto"],
    "base.backend": BACKENDS,
    "train.optimizer": ["rmsprop", "sgd", "adam"],
    "train.lr_schedule": ["constant", "exponential", "step", "cosine"],
    "train.loss": ["categorical_crossentropy", "sparse_categorical_crossentropy", "binary_crossentropy",
                   "mean_squared_error"],
    "model.output_activation": ["softmax", "sigmoid"],
    "model.batch_norm": [False, True],
    "train.augment": ["off", "on"],
    "train.replicas": [1, 2],
    "train.cpu.onednn": [True, False, None],
    "cpu": ["this one", "AVX2 only", "AVX-512 with BF16", "AMX"],
}
# What `precision: auto` reads, per kind of CPU met (cpu_features of /proc/cpuinfo); "this one": not replaced.
CPU_FLAGS = {
    "AVX2 only": ["avx2", "fma"],
    "AVX-512 with BF16": ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"],
    "AMX": ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"],
}
LEARNING_RATES = {"rmsprop": 0.003, "adam": 0.003, "sgd": 0.1}  # each learns the tiny net in 3 short epochs


def allowed(row):
    """The combinations that params.yaml accepts (the others are refused in one line, tested elsewhere)."""
    backend = row.get("base.backend")
    if backend == "torch" and row.get("train.replicas") == 2:
        return False
    if backend not in (None, "tensorflow") and row.get("train.cpu.onednn") is not None:
        return False  # oneDNN is TensorFlow's switch: on another backend only null says something true
    return True


def pairwise(factors, allowed):
    """Rows (dicts) in which every allowed pair of values of two factors appears at least once.

    Greedy and deterministic: each new row starts from an uncovered pair and
    takes, factor by factor, the value covering the most uncovered pairs.
    """
    names = list(factors)
    uncovered = {((a, va), (b, vb)) for a, b in itertools.combinations(names, 2)
                 for va in factors[a] for vb in factors[b] if allowed({a: va, b: vb})}
    rows = []
    while uncovered:
        (a, va), (b, vb) = min(uncovered, key=lambda pair: (names.index(pair[0][0]), names.index(pair[1][0]),
                                                             repr(pair)))
        row = {a: va, b: vb}
        for name in names:
            if name in row:
                continue
            best = max(factors[name], key=lambda v: (allowed({**row, name: v}), sum(
                ((n, row[n]), (name, v)) in uncovered or ((name, v), (n, row[n])) in uncovered for n in row)))
            row[name] = best
        row = {name: row[name] for name in names}
        assert allowed(row), row
        rows.append(row)
        uncovered -= {((x, row[x]), (y, row[y])) for x, y in itertools.combinations(names, 2)}
    return rows


ROWS = pairwise(FACTORS, allowed)
# The contributor's few: TensorFlow in float32; bfloat16 with the layers it changes; JAX over two devices
FEW = [next(i for i, r in enumerate(ROWS) if r["base.backend"] == "tensorflow" and r["train.precision"] == "float32"),
       next(i for i, r in enumerate(ROWS) if r["train.precision"] == "mixed_bfloat16" and r["model.batch_norm"]),
       next(i for i, r in enumerate(ROWS) if r["base.backend"] == "jax" and r["train.replicas"] == 2)]


def test_the_rows_cover_every_allowed_pair():
    for (a, values_a), (b, values_b) in itertools.combinations(FACTORS.items(), 2):
        for va, vb in itertools.product(values_a, values_b):
            if allowed({a: va, b: vb}):
                assert any(row[a] == va and row[b] == vb for row in ROWS), (a, va, b, vb)
    assert len(ROWS) < 40  # a covering array, not the 20,000-odd combinations


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tests.conftest import SAMPLE
    folder = tmp_path_factory.mktemp("matrix_data")
    with np.load(SAMPLE) as npz:
        raw = {"x_train": npz["x_train"][:2000], "y_train": npz["y_train"][:2000],
               "x_test": npz["x_test"][:500], "y_test": npz["y_test"][:500]}
    write_processed(folder / "data", raw)
    np.savez(folder / "test_images.npz", x=raw["x_test"][:200])
    return folder


def row_params(row):
    changes = {key: value for key, value in row.items() if key not in ("cpu", "train.augment")}
    changes.update({"train.learning_rate": LEARNING_RATES[row["train.optimizer"]], "train.epochs": 3,
                    "train.batch_size": 64})
    if row["train.augment"] == "on":
        changes.update({"train.augment.rotation": 10.0, "train.augment.shift": 0.1, "train.augment.zoom": 0.1})
    if row["base.backend"] == "torch" or (row["base.backend"] == "tensorflow" and row["train.replicas"] > 1):
        changes["train.steps_per_execution"] = 1  # the only setting there (train.check_train refuses others)
    return tiny_params(**changes)


def stage_commands(folder):
    """The stages as dvc.yaml runs them, each in a process of its own (a backend is chosen once per process)."""
    p = ["--params", str(folder / "params.yaml")]
    return [
        ["stages.build_init_weights", "--out", folder / "init", "--metrics", folder / "mm.json",
         "--details", folder / "md.json", *p],
        ["stages.train", "--device", "cpu", "--data", folder / "data", "--init", folder / "init", "--out",
         folder / "cpu", "--metrics", folder / "tm.json", "--details", folder / "td.json",
         "--live", folder / "live", *p],
        ["stages.evaluate", "--device", "cpu", "--data", folder / "data", "--model", folder / "cpu", "--metrics",
         folder / "em.json", "--details", folder / "ed.json", "--predictions", folder / "predictions.csv",
         "--mistakes", folder / "mistakes.png", *p],
        ["tools.predict", folder / "test_images.npz", "--model", folder / "cpu", "--json"],
    ]


# Run before a stage, in its process: what `precision: auto` reads, as another kind of CPU shows it.
FLAGS_SHIM = """
import json, runpy, sys
from mnist_cnn import training
flags = json.loads(sys.argv.pop(1))
training.cpu_features = lambda cpuinfo=None: flags  # what training.set_up reads
sys.argv[0] = sys.argv[1]
runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)
"""


def run_row(row, data, folder):
    folder.mkdir()
    os.symlink(data / "data", folder / "data")
    os.symlink(data / "test_images.npz", folder / "test_images.npz")
    write_params(folder / "params.yaml", row_params(row))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if row["cpu"] == "AVX2 only":
        env["ONEDNN_MAX_CPU_ISA"] = "AVX2"  # oneDNN's kernels for a CPU without AVX-512, whatever this one has
    for module, *args in stage_commands(folder):
        start = [sys.executable, "-m", module]
        if row["cpu"] in CPU_FLAGS:
            start = [sys.executable, "-c", FLAGS_SHIM, json.dumps(CPU_FLAGS[row["cpu"]]), module]
        result = subprocess.run([*start, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"{module} {row}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return json.loads(result.stdout)  # predict's answers


def check_row(row, folder, answers):
    details = json.loads((folder / "td.json").read_text())
    flags = CPU_FLAGS.get(row["cpu"], details["cpu_features"])
    bf16 = row["train.precision"] == "mixed_bfloat16" or (
        row["train.precision"] == "auto" and ("avx512_bf16" in flags or "amx_bf16" in flags))
    assert details["precision"] == ("mixed_bfloat16" if bf16 else "float32")
    assert details["backend"] == row["base.backend"] and details["replicas"] == row["train.replicas"]
    if bf16:
        assert set(details["float32_vs_trained"]) == {"images", "max_probability_difference", "other_digit_share"}
    if row["base.backend"] == "tensorflow":
        if row["train.cpu.onednn"] is not None:  # null: TensorFlow's own choice for this CPU
            assert details["onednn"] == row["train.cpu.onednn"]
        assert (folder / "cpu" / "classifier.onnx").is_file()  # exported, whatever the precision
    metrics = json.loads((folder / "ed.json").read_text())["test"]
    majority = np.bincount(np.load(folder / "data" / "y_test.npy")).max() / metrics["images"]
    assert metrics["accuracy"] > majority  # evaluate itself refuses a model that learned nothing
    # predict (ONNX Runtime, or Keras where there is no ONNX file) reads the test images as evaluate's model did
    evaluated = [int(line.split(",")[2]) for line in (folder / "predictions.csv").read_text().splitlines()[1:201]]
    read = [answer["digit"] for answer in answers]
    assert np.mean(np.array(read) == np.array(evaluated)) >= 0.99, row


@pytest.mark.e2e
@pytest.mark.parametrize("index", FEW)
def test_a_representative_few_settings_run_end_to_end(index, data, tmp_path):
    check_row(ROWS[index], tmp_path / "row", run_row(ROWS[index], data, tmp_path / "row"))


OTHERS = [i for i in range(len(ROWS)) if i not in FEW]


@pytest.fixture(scope="module")
def others(data, tmp_path_factory):
    """The other rows, run two at a time (each row's processes mostly start up, on one core), as they finish:
    {index: (folder, predict's answers) or the exception}."""
    from concurrent.futures import ThreadPoolExecutor

    def attempt(index):
        folder = tmp_path_factory.mktemp(f"row{index}") / "row"
        try:
            return folder, run_row(ROWS[index], data, folder)
        except Exception as err:  # noqa: BLE001  (the row's own test reports it)
            return err

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(OTHERS, pool.map(attempt, OTHERS), strict=True))


@pytest.mark.matrix
@pytest.mark.parametrize("index", OTHERS)
def test_every_pair_of_settings_runs_end_to_end(index, others):
    if isinstance(others[index], Exception):
        raise others[index]
    check_row(ROWS[index], *others[index])
