"""preset: a preset (params-<name>.yaml) as a DVC experiment, in one short command.

    python -m tools.preset fast               # dvc exp run -n fast -S model.conv_blocks.conv1.filters=16 -S ...
    python -m tools.preset accurate --queue   # any option of `dvc exp run` after the name
    python -m tools.preset fast --print       # the command, not run

A preset is a file of dotted keys of params.yaml and their values (params-fast.yaml, params-accurate.yaml).
This runs `dvc exp run -n <name>` with one `-S key=value` per key of the file: params.yaml stays the one file
you edit, the experiment is params.yaml with the preset's keys set (and `dvc params diff` lists each of them),
and DVC's queue, run cache and `dvc exp show` see a plain experiment. Before anything runs, each key must be
one of params.yaml and the result valid params: otherwise one line, and nothing runs. Not a pipeline stage: a
tool over DVC (Hydra's composition would do this too, but rewrites params.yaml on every run).
"""

import argparse
import os
import shlex
import signal
import sys
from pathlib import Path

from mnist_cnn.dvc_commands import value_text
from mnist_cnn.errors import UserError, printable
from mnist_cnn.params import PARAMS_FILE, check_sections, read_yaml, with_settings
from mnist_cnn.stage import run

def preset_file(root, name):
    return root / f"params-{name}.yaml"


def presets(root):
    """The presets found in `root`: params-<name>.yaml's names."""
    return sorted(path.name[len("params-"):-len(".yaml")] for path in root.glob("params-*.yaml"))


def read_preset(root, name):
    """{dotted key: value} of params-<name>.yaml, as DVC would read it (YAML 1.2)."""
    path = preset_file(root, name)
    if not path.is_file():
        raise UserError(f"no preset {printable(name)!r} here ({path.name} not found); the presets: "
                        f"{', '.join(presets(root)) or 'none'}")
    settings = read_yaml(path)
    if not isinstance(settings, dict) or not settings or not all(isinstance(key, str) for key in settings):
        raise UserError(f"{path.name} must map dotted keys of {PARAMS_FILE} to values, one per line "
                        f"(train.epochs: 2)")
    return settings


def command(name, settings, options):
    """`dvc exp run` of the preset: named after it unless the options name the experiment themselves."""
    named = any(option in ("-n", "--name") or option.startswith("--name=") for option in options)
    return (["dvc", "exp", "run"] + ([] if named else ["-n", name])
            + [word for key, value in settings.items() for word in ("-S", f"{key}={value_text(value)}")]
            + list(options))


def main(argv=None):
    """Check the preset; returns the `dvc exp run` command to run (None with --print, which prints it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="Options after the name go to `dvc exp run` as they are.")
    parser.add_argument("name", help="the preset: params-<name>.yaml (fast, accurate)")
    parser.add_argument("--print", action="store_true", help="print the command; run nothing")
    args, options = parser.parse_known_args(argv)
    root = Path.cwd()
    settings = read_preset(root, args.name)
    source = preset_file(root, args.name).name
    check_sections(with_settings(read_yaml(root / PARAMS_FILE), settings, source), f"{PARAMS_FILE} with {source}")
    words = command(args.name, settings, options)
    if args.print:
        print(shlex.join(words))
        return None
    print(f"preset {args.name}: {shlex.join(words)}", file=sys.stderr, flush=True)
    return words


def run_dvc(words):
    """dvc, in this Python's environment, in place of this process: its output, exit code and signals are the
    user's. run() ignores signals once main() is done; an ignored signal would stay ignored across exec."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.execv(sys.executable, [sys.executable, "-m", *words])


if __name__ == "__main__":
    chosen = []
    run(lambda: chosen.append(main()))
    if chosen[0]:
        run_dvc(chosen[0])
