"""sweep: one list of experiments, shared by several hosts; each runs its share and pushes the results back.

    python -m tools.sweep SWEEP.yaml [--host I --hosts N] [--git-remote origin] [--dry-run]

Every host is a clone of the same commit that shares a git remote and a DVC remote (its default). Host I of N
takes the experiments whose place in the list is I modulo N: no host talks to another, nothing is locked, and
no experiment falls to two hosts. Each of its experiments is skipped if the git remote already holds it (a
task run again, after a crash or a requeue), else run with `dvc exp run --pull -n NAME -S ...` (stages whose
runs some host pushed with their run records are restored, not run) and pushed with `dvc exp push --run-cache`
(its git ref to the git remote, its outputs and run records to the DVC remote). Then, on any clone,
`dvc exp pull origin NAME ...` and `dvc exp show` list them all.

Each experiment starts from the commit: `dvc exp run` leaves an experiment's params, dvc.lock and metrics in
the workspace, so the committed files are put back before each experiment and after the last. The sweep
refuses to start on uncommitted changes to any file git tracks, which that would undo.

I and N come from --host and --hosts, else from the scheduler: a Slurm array (SLURM_ARRAY_TASK_ID,
SLURM_ARRAY_TASK_MIN, SLURM_ARRAY_TASK_STEP and SLURM_ARRAY_TASK_COUNT: `--array=0-3`, or with a step), a
Kubernetes Indexed Job (JOB_COMPLETION_INDEX, with SWEEP_HOSTS set to its completions). SWEEP.yaml names each
experiment and the params it sets, or a grid:

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
import sys
import time
from pathlib import Path

from mnist_cnn.dvc_commands import back_to_the_commit, changed_files, dvc, is_ref_name, reason, run_shown, value_text
from mnist_cnn.errors import UserError
from mnist_cnn.params import read_yaml
from mnist_cnn.stage import run

def override(key, value):
    """`-S key=value` as DVC reads it (Hydra's grammar): see value_text."""
    return f"{key}={value_text(value)}"


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
    combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    found += [(grid_name(sets), sets) for sets in combos]
    names = [name for name, _ in found]
    for name in names:
        if not is_ref_name(name):
            raise UserError(f"{where}: experiment name {name!r}: use letters, digits, '.', '-' and '_', no '..', "
                            f"not ending in '.' or '.lock' (a git ref)")
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
            first, step = int(environ.get("SLURM_ARRAY_TASK_MIN", "0")), int(environ.get("SLURM_ARRAY_TASK_STEP", "1"))
            offset, count = int(environ["SLURM_ARRAY_TASK_ID"]) - first, int(environ["SLURM_ARRAY_TASK_COUNT"])
        except (KeyError, ValueError):
            raise UserError("Slurm array: SLURM_ARRAY_TASK_ID, _MIN, _STEP and _COUNT must be whole numbers; run it "
                            "as `sbatch --array=0-N`") from None
        if step < 1 or offset % step:
            raise UserError(f"Slurm array: task {environ['SLURM_ARRAY_TASK_ID']} is not on the array's steps; run it "
                            f"as `sbatch --array=0-N` (a range, with or without a step, not a list)")
        index = offset // step
    elif "JOB_COMPLETION_INDEX" in environ:
        source = "Kubernetes Indexed Job"
        if not (environ.get("SWEEP_HOSTS", "").isascii() and environ.get("SWEEP_HOSTS", "").isdigit()):
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


def names_on(remote=None):
    """The experiments of this commit, on the git remote `remote` (None: here)."""
    return set(dvc("exp", "list", *([remote] if remote else []), "--name-only").stdout.split())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="the sweep's YAML file")
    parser.add_argument("--host", type=int, help="this host's index, from 0")
    parser.add_argument("--hosts", type=int, help="how many hosts share the sweep")
    parser.add_argument("--git-remote", default="origin", help="the git remote the hosts share (default: origin)")
    parser.add_argument("--dry-run", action="store_true", help="print this host's share and what the remote holds")
    args = parser.parse_args(argv)
    experiments = experiments_of(read_yaml(args.sweep), str(args.sweep))
    index, count = host_of(args, os.environ)
    mine = share(experiments, index, count)
    changed = changed_files()
    if changed is None:
        raise UserError("not in a git clone: run the sweep in a clone of the repository the hosts share")
    if changed and not args.dry_run:
        raise UserError(f"{len(changed)} file(s) differ from the commit ({', '.join(changed[:3])}): each experiment "
                        f"starts from the commit, which the sweep puts back; commit them, or `git stash`")
    print(f"host {index} of {count}: {len(mine)} of {len(experiments)} experiments "
          f"({', '.join(name for name, _ in mine) or 'none'})", flush=True)
    done = names_on(args.git_remote)
    failed, ran, skipped = [], [], []
    for name, sets in mine:
        settings = [override(key, value) for key, value in sets.items()]
        if name in done:
            skipped.append(name)
            print(f"{name}: on {args.git_remote} already; skipped", flush=True)
            continue
        if args.dry_run:
            print(f"{name}: would run {' '.join(settings)}")
            continue
        start = time.perf_counter()
        if name not in names_on():  # else it ran here and its push failed: push it now
            back_to_the_commit()  # not the last experiment's params
            code, output = run_shown("exp", "run", "--pull", "-n", name,
                                     *itertools.chain(*(("-S", s) for s in settings)))
            if code != 0:
                failed.append(f"{name}: {reason(output)}")
                print(f"{name}: failed", flush=True)
                continue
        try:
            dvc("exp", "push", "--run-cache", args.git_remote, name)
        except UserError as err:
            failed.append(f"{name}: ran, but not pushed: {err}")
            print(f"{name}: ran, not pushed", flush=True)
            continue
        ran.append(name)
        print(f"{name}: ran and pushed in {time.perf_counter() - start:.0f} s ({' '.join(settings)})", flush=True)
    if not args.dry_run:
        back_to_the_commit()
    print(f"host {index} of {count}: {len(ran)} ran, {len(skipped)} already done, {len(failed)} failed")
    if failed:
        sys.exit("error: " + "\nerror: ".join(failed))


if __name__ == "__main__":
    run(main)
