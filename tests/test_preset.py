"""tools.preset: a preset file becomes one `dvc exp run` whose -S settings are exactly the file's, checked
against params.yaml before anything runs."""

import os
import shlex
import signal
import subprocess
import sys

import pytest

from tests.conftest import DOCS, ROOT
from mnist_cnn.dvc_commands import value_text
from tools import preset


def dvc_reads(setting):
    """A -S key=value as DVC parses it: Hydra's override grammar (dvc/utils/hydra.py); a sweep is refused."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    override = OverridesParser.create().parse_overrides([setting])[0]
    assert not override.is_sweep_override(), setting
    return override.key_or_group, override.value()


@pytest.mark.parametrize("name", ["fast", "accurate"])
def test_a_presets_command_sets_every_key_of_its_file_and_nothing_else(name):
    settings = preset.read_preset(ROOT, name)
    words = preset.command(name, settings, [])
    assert words[:5] == ["dvc", "exp", "run", "-n", name]
    pairs = [dvc_reads(words[i + 1]) for i, word in enumerate(words) if word == "-S"]
    assert dict(pairs) == settings
    assert len(pairs) == len(settings) and len(words) == 5 + 2 * len(settings)
    # the docs run each preset with the tool, in one short line
    assert any(line.startswith(f"python -m tools.preset {name}") for page in DOCS
               for line in page.read_text().splitlines())


@pytest.mark.parametrize("value", ["cosine", "a,b", "true", "10", "null", "with space", "it's", "x=y", "[1]", ""])
def test_a_string_comes_back_to_dvc_as_the_same_string(value):
    """`-S` is Hydra's grammar: `a,b` would be a sweep, `true` a boolean; the preset's string stays a string."""
    assert dvc_reads(f"train.lr_schedule={value_text(value)}") == ("train.lr_schedule", value)


def test_options_after_the_name_go_to_dvc_and_a_name_of_their_own_replaces_the_presets():
    settings = {"train.epochs": 2, "train.lr_schedule": "cosine", "model.batch_norm": True}
    assert preset.command("fast", settings, ["--queue"]) == [
        "dvc", "exp", "run", "-n", "fast", "-S", "train.epochs=2", "-S", "train.lr_schedule=cosine",
        "-S", "model.batch_norm=true", "--queue"]
    for named in (["-n", "mine"], ["--name", "mine"], ["--name=mine"]):
        words = preset.command("fast", settings, named)
        assert words.count("fast") == 0 and words[-len(named):] == named


def write(folder, name, text):
    (folder / name).write_text(text)


@pytest.fixture
def folder(tmp_path):
    write(tmp_path, "params.yaml", (ROOT / "params.yaml").read_text())
    return tmp_path


@pytest.mark.parametrize("text, message", [
    ("train.epoch: 3\n", "params-mine.yaml: train.epoch is not a key of params.yaml"),
    ("train.epochs.more: 3\n", "params-mine.yaml: train.epochs.more is not a key of params.yaml"),
    ("nothing.here: 1\n", "params-mine.yaml: nothing.here is not a key of params.yaml"),
    ("train.epochs: 0\n", "params.yaml with params-mine.yaml: train.epochs = 0: Input should be greater than 0"),
    ("train.optimizer: adamw\n", "params.yaml with params-mine.yaml: train.optimizer = 'adamw'"),
    ("- train.epochs\n", "params-mine.yaml must map dotted keys of params.yaml to values"),
    ("", "params-mine.yaml must map dotted keys of params.yaml to values"),
])
def test_a_bad_preset_is_one_line_and_runs_nothing(folder, text, message):
    write(folder, "params-mine.yaml", text)
    result = subprocess.run([sys.executable, "-m", "tools.preset", "mine"], cwd=folder, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr


def test_an_unknown_preset_names_the_ones_there(folder):
    write(folder, "params-fast.yaml", "train.epochs: 2\n")
    write(folder, "params-slow.yaml", "train.epochs: 9\n")
    result = subprocess.run([sys.executable, "-m", "tools.preset", "fats"], cwd=folder, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: no preset 'fats' here (params-fats.yaml not found); the presets: "
                                     "fast, slow")


def test_print_shows_the_command_and_runs_nothing(folder):
    write(folder, "params-fast.yaml", "train.epochs: 2\nmodel.batch_norm: true\n")
    result = subprocess.run([sys.executable, "-m", "tools.preset", "fast", "--print", "--queue"], cwd=folder,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout) == ["dvc", "exp", "run", "-n", "fast", "-S", "train.epochs=2",
                                          "-S", "model.batch_norm=true", "--queue"]


def test_dvc_takes_the_process_over_with_signals_at_their_defaults(folder, monkeypatch):
    """The tool ends in an exec of `python -m dvc`: dvc's exit code and Ctrl-C are the user's. run() ignores
    signals once main() is done, and an ignored signal stays ignored across exec: they are reset first."""
    execs = []

    def fake_exec(path, argv):
        execs.append((path, argv, signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))

    monkeypatch.setattr(preset.os, "execv", fake_exec)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        preset.run_dvc(["dvc", "exp", "run", "-n", "fast", "-S", "train.epochs=2"])
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])
    assert execs == [(sys.executable, [sys.executable, "-m", "dvc", "exp", "run", "-n", "fast", "-S",
                                       "train.epochs=2"], signal.SIG_DFL, signal.SIG_DFL)]
