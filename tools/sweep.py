"""sweep: one list of experiments, shared by several hosts; each runs its share and pushes the results back.

    python -m tools.sweep SWEEP.yaml [--host I --hosts N] [--git-remote origin] [--dry-run]

Every host is a clone of the same commit that shares a git remote and a DVC remote (its default). Host I of N
takes the experiments whose place in the list is I modulo N: no host talks to another, nothing is locked, and
no experiment falls to two hosts. Each of its experiments is skipped if the git remote already holds it (a
task run again, after a crash or a requeue), else run with `dvc exp run --pull -n NAME -S ...` (stages whose
runs some host pushed with their run records are restored, not run) and pushed with `dvc exp push --run-cache`
(its git ref to the git remote, its outputs and run records to the DVC remote). Then, on any clone,
`dvc exp pull origin NAME ...` and `dvc exp show` list them all.

I and N come from --host and --hosts, else from the scheduler: a Slurm array (SLURM_ARRAY_TASK_ID,
SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT), a Kubernetes Indexed Job (JOB_COMPLETION_INDEX, with
SWEEP_HOSTS set to its completions). SWEEP.yaml names each experiment and the params it sets, or a grid:

    experiments:                 # name: {param: value}; names are git refs: letters, digits, . - _
      lr-0.0005: {train.learning_rate: 0.0005}
    grid:                        # and/or every combination of these, named after their values
      train.learning_rate: [0.002, 0.004]
      train.batch_size: [64, 128]

Exits 1 when an experiment failed (the others still run), with one line per failure.
"""

import argparse
import itertools
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from mnist_cnn.errors import UserError
from mnist_cnn.params import read_yaml
from mnist_cnn.stage import run

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def grid_name(combination):
    """An experiment's name from its grid values: {train.batch_size: 64, train.learning_rate: 0.002} ->
    'batch_size-64-learning_rate-0.002' (each key's last part; a git ref's characters only)."""
    parts = [f"{key.rsplit('.', 1)[-1]}-{'_'.join(map(str, value)) if isinstance(value, list) else value}"
             for key, value in combination.items()]
    return re.sub(r"[^A-Za-z0-9._-]", "_", "-".join(parts))[:100]


def experiments_of(spec, where="the sweep file"):
    """[(name, {param: value})] in the file's order: the listed experiments, then the grid's combinations."""
    if not isinstance(spec, dict) or not set(spec) <= {"experiments", "grid"} or not spec:
        raise UserError(f"{where}: expected `experiments:` and/or `grid:` at the top (see "
                        f"`python -m tools.sweep --help`)")
    listed = spec.get("experiments") or {}
    grid = spec.get("grid") or {}
    if not isinstance(listed, dict) or not all(isinstance(v, dict) and v for v in listed.values()):
        raise UserError(f"{where}: `experiments:` maps each name to the params it sets, e.g. "
                        f"lr-0.0005: {{train.learning_rate: 0.0005}}")
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise UserError(f"{where}: `grid:` maps each param to a list of values, e.g. "
                        f"train.learning_rate: [0.002, 0.004]")
    found = [(str(name), dict(sets)) for name, sets in listed.items()]
    found += [(grid_name(dict(zip(grid, values))), dict(zip(grid, values)))
              for values in itertools.product(*grid.values())]
    names = [name for name, _ in found]
    for name in names:
        if not NAME.match(name):
            raise UserError(f"{where}: experiment name {name!r}: use letters, digits, '.', '-' and '_' (a git ref)")
        if names.count(name) > 1:
            raise UserError(f"{where}: experiment name {name!r} appears twice; each must be unique")
    if not found:
        raise UserError(f"{where}: no experiment listed")
    return found


def host_of(args, environ):
    """(this host's index, the number of hosts): the options, else a Slurm array's or an Indexed Job's."""
    if args.host is not None or args.hosts is not None:
        if args.host is None or args.hosts is None:
            raise UserError("give both --host I and --hosts N")
        index, count, source = args.host, args.hosts, "--host/--hosts"
    elif "SLURM_ARRAY_TASK_ID" in environ:
        source = "Slurm array"
        try:
            index = int(environ["SLURM_ARRAY_TASK_ID"]) - int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
            count = int(environ["SLURM_ARRAY_TASK_COUNT"])
        except (KeyError, ValueError):
            raise UserError("Slurm array: SLURM_ARRAY_TASK_ID, _MIN and _COUNT must be whole numbers; run it as "
                            "`sbatch --array=0-N`") from None
    elif "JOB_COMPLETION_INDEX" in environ:
        source = "Kubernetes Indexed Job"
        if not environ.get("SWEEP_HOSTS", "").isdigit():
            raise UserError("Kubernetes Indexed Job: set SWEEP_HOSTS to the job's completions in the pod's env")
        index, count = int(environ["JOB_COMPLETION_INDEX"]), int(environ["SWEEP_HOSTS"])
    else:
        raise UserError("which host is this? give --host I --hosts N (I from 0), or run it as a Slurm array or a "
                        "Kubernetes Indexed Job")
    if not (count >= 1 and 0 <= index < count):
        raise UserError(f"{source}: host {index} of {count}: the index must be 0 to {count - 1}")
    return index, count


def share(experiments, index, count):
    """Host `index` of `count`'s experiments: every count-th from its index (round robin: shares within one)."""
    return experiments[index::count]


def dvc(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or [""]
        raise UserError(f"`dvc {' '.join(args)}` failed: {last[0]}")
    return result


def names_on(remote=None):
    """The experiments of this commit, on the git remote `remote` (None: here)."""
    return set(dvc("exp", "list", *([remote] if remote else []), "--name-only").stdout.split())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep", type=Path, help="the sweep's YAML file")
    parser.add_argument("--host", type=int, help="this host's index, from 0")
    parser.add_argument("--hosts", type=int, help="how many hosts share the sweep")
    parser.add_argument("--git-remote", default="origin", help="the git remote the hosts share (default: origin)")
    parser.add_argument("--dry-run", action="store_true", help="print this host's share and what the remote holds")
    args = parser.parse_args(argv)
    experiments = experiments_of(read_yaml(args.sweep), str(args.sweep))
    index, count = host_of(args, os.environ)
    mine = share(experiments, index, count)
    print(f"host {index} of {count}: {len(mine)} of {len(experiments)} experiments "
          f"({', '.join(name for name, _ in mine) or 'none'})", flush=True)
    done = names_on(args.git_remote)
    failed, ran, skipped = [], [], []
    for name, sets in mine:
        settings = [f"{key}={value}" for key, value in sets.items()]
        if name in done:
            skipped.append(name)
            print(f"{name}: on {args.git_remote} already; skipped", flush=True)
            continue
        if args.dry_run:
            print(f"{name}: would run {' '.join(settings)}")
            continue
        start = time.perf_counter()
        if name not in names_on():  # else it ran here and its push failed: push it now
            result = dvc("exp", "run", "--pull", "-n", name, *itertools.chain(*(("-S", s) for s in settings)),
                         check=False)
            if result.returncode != 0:
                why = [line for line in result.stderr.splitlines() if line.startswith(("ERROR", "error"))]
                failed.append(f"{name}: {(why or ['exit ' + str(result.returncode)])[-1]}")
                print(f"{name}: failed", flush=True)
                continue
        dvc("exp", "push", "--run-cache", args.git_remote, name)
        ran.append(name)
        print(f"{name}: ran and pushed in {time.perf_counter() - start:.0f} s ({' '.join(settings)})", flush=True)
    print(f"host {index} of {count}: {len(ran)} ran, {len(skipped)} already done, {len(failed)} failed")
    if failed:
        sys.exit("error: " + "\nerror: ".join(failed))


if __name__ == "__main__":
    run(main)
