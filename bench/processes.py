"""One model trained by 1 and by 2 processes on this host (train.processes, on jax), and what their collectives
cost per step.

    MNIST_NPZ=/path/to/mnist.npz python -m bench.processes [--counts 1 2] [--epochs 1] \
        [--out bench/results/processes.json]

In a temporary folder: fetch, preprocess and build_init_weights as dvc.yaml runs them, with the project's
params.yaml but base.backend: jax and train.epochs = --epochs; then `python -m stages.train` once per count
(each a job of that many processes, started by the stage), recording its fit time, final loss and wall time.
Then the collectives alone: two processes join a job and time, 200 times, the all-reduce of one step's
gradients (as many float32 numbers as the network has weights) over gloo, which every step of a 2-process fit
makes once. Not a test: it measures. Both processes share this host's cores: on one host, processes buy no
speed (each core already works for the one process); they are for hosts with more cores or GPUs than one
process can use, and for a cluster.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from mnist_cnn.backend import cpu_features, cpu_model
from mnist_cnn.processes import free_port, job_from_env, start_job

ROOT = Path(__file__).resolve().parent.parent
REPEATS = 200


def allreduce_rank(size, out):
    """In one process of a job: time REPEATS all-reduces of `size` float32 numbers; rank 0 writes the result."""
    job = job_from_env(os.environ, int(os.environ["WORLD_SIZE"]))
    start_job(job)
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()), ("batch",))
    local = np.full((1, size), job.rank + 1.0, np.float32)
    spread = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("batch")), local)
    summed = jax.jit(lambda a: a.sum(axis=0), out_shardings=NamedSharding(mesh, PartitionSpec()))
    check = np.asarray(summed(spread).addressable_shards[0].data)
    assert np.all(check == sum(range(1, job.count + 1))), check[:4]
    for _ in range(10):
        summed(spread).block_until_ready()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        summed(spread).block_until_ready()
        times.append(time.perf_counter() - start)
    if job.rank == 0:
        Path(out).write_text(json.dumps({"numbers": size, "median_ms": round(1e3 * float(np.median(times)), 3),
                                         "p90_ms": round(1e3 * float(np.percentile(times, 90)), 3)}))
    jax.distributed.shutdown()


def stage(work, *args):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", *args], cwd=work, env=os.environ | {"PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"bench: `python -m {' '.join(args)}` failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "processes.json")
    parser.add_argument("--allreduce", nargs=2, metavar=("SIZE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.allreduce:
        return allreduce_rank(int(args.allreduce[0]), args.allreduce[1])
    if not Path(os.environ.get("MNIST_NPZ", "")).is_file():
        sys.exit("bench.processes: set MNIST_NPZ to the full mnist.npz")

    rows = []
    with tempfile.TemporaryDirectory(prefix="mnist-processes-") as tmp:
        work = Path(tmp)
        (work / ".dvc").mkdir()
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["base"]["backend"], params["train"]["epochs"] = "jax", args.epochs
        for count in args.counts:
            params["train"]["processes"] = count
            (work / "params.yaml").write_text(yaml.safe_dump(params))
            if not rows:
                stage(work, "stages.fetch", "--out", "raw", "--metrics", "f.json", "--details", "fd.json")
                stage(work, "stages.preprocess", "--raw", "raw", "--out", "data")
                stage(work, "stages.build_init_weights", "--out", "init", "--metrics", "m.json", "--details", "md.json")
            wall = stage(work, "stages.train", "--device", "cpu", "--data", "data", "--init", "init",
                         "--out", f"model{count}", "--metrics", f"t{count}.json", "--details", f"d{count}.json",
                         "--live", f"live{count}")
            details = json.loads((work / f"d{count}.json").read_text())
            steps = -(-details["train_images"] // details["batch_size"]) * details["epochs"]
            rows.append({"processes": count, "fit_s": details["fit_time_s"], "wall_s": round(wall, 1),
                         "ms_per_step": round(1e3 * details["fit_time_s"] / steps, 2),
                         "final_loss": details["final_loss"], "final_accuracy": details["final_accuracy"]})
            print(json.dumps(rows[-1]), flush=True)
        weights = json.loads((work / "m.json").read_text())["weights"]
        port, out = free_port(), work / "allreduce.json"
        ranks = [subprocess.Popen([sys.executable, "-m", "bench.processes", "--allreduce", str(weights), str(out)],
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  env=os.environ | {"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                                    "MASTER_PORT": str(port), "JAX_PLATFORMS": "cpu"})
                 for rank in range(2)]
        errors = [rank.communicate(timeout=600)[1] for rank in ranks]
        if any(rank.returncode for rank in ranks):
            sys.exit(f"bench: the all-reduce processes failed:\n{errors[0][-2000:]}\n{errors[1][-2000:]}")
        allreduce = json.loads(out.read_text())
    result = {"host_cpu": cpu_model(), "cpu_features": cpu_features(), "cores": os.cpu_count(),
              "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "backend": "jax",
              "epochs": args.epochs, "batch_size": params["train"]["batch_size"], "rows": rows,
              "allreduce_2_processes": allreduce}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'processes':>9} {'fit s':>7} {'ms/step':>8} {'final loss':>10}")
    for r in rows:
        print(f"{r['processes']:>9} {r['fit_s']:>7.1f} {r['ms_per_step']:>8.2f} {r['final_loss']:>10.4f}")
    print(f"all-reduce of one step's {allreduce['numbers']:,} gradients between 2 processes: median "
          f"{allreduce['median_ms']} ms (90th percentile {allreduce['p90_ms']} ms); wrote {args.out} ({cpu_model()})")


if __name__ == "__main__":
    main()
