"""A sweep through DVC's queue: one worker with all the cores against two with half each.

    MNIST_NPZ=/path/to/mnist.npz python -m bench.sweep [--experiments 4] [--epochs 1] [--out bench/results/sweep.json]

In a temporary git + DVC copy of the project, on the full MNIST (it refuses the
sample), `dvc repro` first with train.epochs = --epochs (not timed). Then,
for -j 1 and -j 2 in turn, it queues --experiments experiments (`dvc exp run
--queue -S train.learning_rate=...`, other rates for each -j, so that DVC's
run cache restores none of them) and times `dvc queue start -j J` until the
queue is empty. Each of J workers gets cores / J threads
through TensorFlow's own variables (TF_NUM_INTRAOP_THREADS,
TF_NUM_INTEROP_THREADS), set in the environment of `dvc queue start`, which
the workers inherit; each run records them (details/train_cpu.json:
thread_env). Prints a table and writes JSON. Not a test: it measures.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from bench.speed import ENV, GIT, PartFailed, experiment_rows, make_project, set_params, wait_for_the_queue
from mnist_cnn.backend import cpu_features, cpu_model

ROOT = Path(__file__).resolve().parent.parent
def dvc(work, *args, env=ENV):
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=work, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"bench: `dvc {' '.join(args)}` failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def thread_share(cores, workers):
    share = str(max(1, cores // workers))
    return {"TF_NUM_INTRAOP_THREADS": share, "TF_NUM_INTEROP_THREADS": share}


def experiments(work, rates):
    """{learning rate: (fit s, test accuracy)} of the experiments with those rates, from `dvc exp show --csv`."""
    found = {}
    for row in experiment_rows(work):
        rate = float(row["train.learning_rate"])
        if rate in rates and row["fit_time_s"]:
            found[rate] = (float(row["fit_time_s"]), float(row["test.accuracy"]))
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiments", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sweep.json")
    args = parser.parse_args(argv)
    cores = os.cpu_count()
    work = Path(tempfile.mkdtemp(prefix="mnist-sweep-"))
    print(f"bench: working in {work}", flush=True)
    make_project(work)
    set_params(work / "params.yaml", {"train.epochs": args.epochs})  # the baseline's training: as short
    dvc(work, "repro")
    if not json.loads((work / "metrics" / "data.json").read_text())["full_mnist"]:
        sys.exit("bench: fetch fell back to the sample; give it the full MNIST (MNIST_NPZ=/path/to/mnist.npz)")
    subprocess.run(["git", "add", "-A"], cwd=work, check=True)
    subprocess.run([*GIT, "commit", "-qm", "the default run"], cwd=work, check=True)
    result = {"host_cpu": cpu_model(), "cpu_features": cpu_features(), "cores": cores,
              "python": platform.python_version(), "experiments": args.experiments, "epochs": args.epochs,
              "sweeps": []}
    for workers in (1, 2):
        # other rates for each sweep: the run cache must restore none of them
        rates = [round(0.0005 * (i + 1) + 0.0001 * workers, 6) for i in range(args.experiments)]
        dvc(work, "exp", "run", "--queue", "-S", f"train.learning_rate={','.join(map(str, rates))}")
        threads = thread_share(cores, workers)
        env = dict(ENV, **threads, GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost",
                   GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@localhost")
        print(f"bench: {args.experiments} experiments, -j {workers}, {threads['TF_NUM_INTRAOP_THREADS']} "
              f"thread(s) each ...", flush=True)
        start = time.perf_counter()
        dvc(work, "queue", "start", "-j", str(workers), env=env)
        try:
            wait_for_the_queue(work, timeout_s=3600)
            wall = time.perf_counter() - start
            found = experiments(work, rates)
        except PartFailed as err:
            sys.exit(f"bench: {err}")
        fits = [fit for fit, _ in found.values()]
        result["sweeps"].append({
            "workers": workers, "threads_each": int(threads["TF_NUM_INTRAOP_THREADS"]), "wall_s": round(wall, 1),
            "succeeded": len(found),
            "fit_s_each": [round(f, 1) for f in fits], "per_experiment_s": round(wall / args.experiments, 1),
            "test_accuracy": {str(rate): acc for rate, (_, acc) in sorted(found.items())}})
        print(f"bench: -j {workers}: {wall:.0f} s", flush=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"{result['host_cpu']}, {cores} cores: {args.experiments} experiments of {args.epochs} epoch(s)",
             "workers  threads each  sweep wall s  per experiment s  fit s each (median)  succeeded"]
    for s in result["sweeps"]:
        median = statistics.median(s["fit_s_each"]) if s["fit_s_each"] else float("nan")
        lines.append(f"{s['workers']:<7}  {s['threads_each']:<12}  {s['wall_s']:<12}  {s['per_experiment_s']:<16}  "
                     f"{median:<19.1f}  {s['succeeded']}/{args.experiments}")
    print("\n".join(lines))
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
