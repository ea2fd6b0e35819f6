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
import json
import os
import shlex
import signal
import sys
from pathlib import Path

from mnist_cnn.errors import UserError, printable
from mnist_cnn.params import (PARAMS_FILE, BaseParams, EvaluateParams, FetchParams, ModelParams, PreprocessParams,
                              TrainParams, read_yaml, validate)
from mnist_cnn.stage import run

SCHEMAS = {"base": BaseParams, "fetch": FetchParams, "preprocess": PreprocessParams, "model": ModelParams,
           "train": TrainParams, "evaluate": EvaluateParams}


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


def applied(params, settings, source):
    """params (params.yaml's tree) with each dotted key of settings set; a key that is not there is refused."""
    import copy

    params = copy.deepcopy(params)
    for dotted, value in settings.items():
        *parents, last = dotted.split(".")
        node = params
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last not in node:
            raise UserError(f"{source}: {printable(dotted)} is not a key of {PARAMS_FILE}; "
                            f"a preset sets keys that are there (fix the key, or add it to {PARAMS_FILE})")
        node[last] = value
    return params


def check_valid(params, source):
    """Each section of the preset's params against its schema, as the stages will read them."""
    for name, schema in SCHEMAS.items():
        validate(params.get(name), schema, name, path=f"{PARAMS_FILE} with {source}")


def value_text(value):
    """A value as `-S key=value` writes it: true, 0.004, 16, cosine. DVC parses it with Hydra's override
    grammar, in which `a,b` is a sweep and `true` a boolean: a string that would not come back as itself is
    quoted ("a,b", "true")."""
    if not isinstance(value, str):
        return json.dumps(value)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        override = OverridesParser.create().parse_overrides([f"key={value}"])[0]
        if not override.is_sweep_override() and override.value() == value:
            return value
    except Exception:  # noqa: BLE001 - Hydra's parse error: quoted below
        pass
    return json.dumps(value)


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
    check_valid(applied(read_yaml(root / PARAMS_FILE), settings, source), source)
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
