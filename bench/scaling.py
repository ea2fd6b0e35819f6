"""How time and memory grow with the data: preprocess and train on 1x, 4x and 16x MNIST's training images.

    MNIST_NPZ=/path/to/mnist.npz python -m bench.scaling [--factors 1 4 16] [--epochs 1] \
        [--out bench/results/scaling.json]

For each factor k, in a temporary folder: fetch's raw arrays with k x 60,000 training images (MNIST's, then
k - 1 copies of them moved by random whole-pixel shifts of up to 3 pixels each way, made here a chunk at a
time, never kept) and MNIST's 10,000 test images; then `python -m stages.preprocess`, build_init_weights
(once) and `python -m stages.train` with the project's params.yaml but train.epochs = --epochs, each a process
of its own, as dvc.yaml runs them. For each stage: wall time and the peak of its anonymous memory (RssAnon,
sampled every 20 ms: the process's own memory, not the file-backed pages of the memory-mapped data, which the
kernel drops under pressure) and of VmHWM (everything resident, mapped files included). The figures to hold:
time close to linear in k, anonymous memory flat (within MARGIN_MB of k = 1's). Not a test: it measures.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

from mnist_cnn.backend import cpu_features, cpu_model
from mnist_cnn.files import NpyWriter, write_manifest

ROOT = Path(__file__).resolve().parent.parent
MARGIN_MB = 100  # a stage's peak anonymous memory at 16x may pass its peak at 1x by this much
CHUNK = 10_000


def moved(images, rng):
    """Each image shifted by its own whole-pixel amounts, up to 3 each way, the border filled with paper (0)."""
    out = np.zeros_like(images)
    dy, dx = rng.integers(-3, 4, size=(2, len(images)))
    for (sy, sx) in {(a, b) for a, b in zip(dy.tolist(), dx.tolist(), strict=True)}:
        pick = (dy == sy) & (dx == sx)
        src = images[pick][:, max(0, -sy):28 - max(0, sy), max(0, -sx):28 - max(0, sx)]
        out[np.flatnonzero(pick)[:, None, None], np.arange(max(0, sy), 28 - max(0, -sy))[None, :, None],
            np.arange(max(0, sx), 28 - max(0, -sx))[None, None, :]] = src
    return out


def write_raw(folder, mnist, factor, seed=0):
    """fetch's folder for `factor` x MNIST's training images, written a chunk at a time."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    x, y = mnist["x_train"], mnist["y_train"]
    images = NpyWriter(folder / "x_train.npy", np.uint8, (factor * len(x), 28, 28))
    digits = NpyWriter(folder / "y_train.npy", np.uint8, (factor * len(y),))
    for copy in range(factor):
        for start in range(0, len(x), CHUNK):
            chunk = x[start:start + CHUNK]
            images.write(chunk if copy == 0 else moved(chunk, rng))
            digits.write(y[start:start + CHUNK])
    images.close()
    digits.close()
    np.save(folder / "x_test.npy", mnist["x_test"])
    np.save(folder / "y_test.npy", mnist["y_test"])
    write_manifest(folder, "fetch")


def status_kb(pid, field):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(args, cwd):
    """Run `python -m args` to its end; (seconds, peak RssAnon MB, VmHWM MB) of that process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=os.environ | {"PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"anon": 0, "hwm": 0}

    def sample():
        while proc.poll() is None:
            peak["anon"] = max(peak["anon"], status_kb(proc.pid, "RssAnon"))
            peak["hwm"] = max(peak["hwm"], status_kb(proc.pid, "VmHWM"))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"bench: `python -m {' '.join(args)}` failed:\n{out[-3000:]}")
    return round(seconds, 2), round(peak["anon"] / 1024, 1), round(peak["hwm"] / 1024, 1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scaling.json")
    args = parser.parse_args(argv)
    npz = os.environ.get("MNIST_NPZ")
    if not npz or not Path(npz).is_file():
        sys.exit("bench.scaling: set MNIST_NPZ to the full mnist.npz (it grows MNIST's own training images)")
    with np.load(npz) as f:
        mnist = {name: f[name] for name in ("x_train", "y_train", "x_test", "y_test")}

    rows = []
    with tempfile.TemporaryDirectory(prefix="mnist-scaling-") as tmp:
        work = Path(tmp)
        (work / ".dvc").mkdir()  # the stages stage their outputs in .dvc/tmp, as in a project
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["train"]["epochs"] = args.epochs
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        subprocess.run([sys.executable, "-m", "stages.build_init_weights", "--out", "init", "--metrics", "m.json",
                        "--details", "md.json"], cwd=work, env=os.environ | {"PYTHONPATH": str(ROOT)}, check=True,
                       capture_output=True)
        for factor in args.factors:
            raw, data = work / f"raw{factor}", work / f"data{factor}"
            write_raw(raw, mnist, factor)
            pre = run_measured(["stages.preprocess", "--raw", str(raw), "--out", str(data)], work)
            train = run_measured(["stages.train", "--device", "cpu", "--data", str(data), "--init", "init",
                                  "--out", f"model{factor}", "--metrics", f"t{factor}.json",
                                  "--details", f"d{factor}.json", "--live", f"live{factor}"], work)
            details = json.loads((work / f"d{factor}.json").read_text())
            rows.append({"factor": factor, "train_images": factor * len(mnist["y_train"]),
                         "preprocess_s": pre[0], "preprocess_peak_anon_mb": pre[1], "preprocess_vmhwm_mb": pre[2],
                         "train_s": train[0], "fit_s": details["fit_time_s"], "train_peak_anon_mb": train[1],
                         "train_vmhwm_mb": train[2], "final_loss": details["final_loss"],
                         "processed_mb": round(sum(p.stat().st_size for p in data.iterdir()) / 1e6, 1)})
            print(json.dumps(rows[-1]), flush=True)
            for folder in (raw, data):
                for path in folder.iterdir():
                    path.unlink()
                folder.rmdir()
    first = rows[0]
    for row in rows:
        row["fit_s_per_factor"] = round(row["fit_s"] / row["factor"], 2)
        row["preprocess_s_per_factor"] = round(row["preprocess_s"] / row["factor"], 2)
        row["anon_growth_mb"] = {stage: round(row[f"{stage}_peak_anon_mb"] - first[f"{stage}_peak_anon_mb"], 1)
                                 for stage in ("preprocess", "train")}
    result = {"host_cpu": cpu_model(), "cpu_features": cpu_features(), "cores": os.cpu_count(),
              "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "epochs": args.epochs,
              "backend": params["base"]["backend"], "margin_mb": MARGIN_MB, "rows": rows,
              "memory_flat": all(max(r["anon_growth_mb"].values()) <= MARGIN_MB for r in rows)}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'k':>3} {'images':>9} {'prep s':>7} {'prep anon MB':>12} {'fit s':>7} {'fit s/k':>7} "
          f"{'train anon MB':>13} {'train HWM MB':>12}")
    for r in rows:
        print(f"{r['factor']:>3} {r['train_images']:>9,} {r['preprocess_s']:>7.1f} "
              f"{r['preprocess_peak_anon_mb']:>12.1f} "
              f"{r['fit_s']:>7.1f} {r['fit_s_per_factor']:>7.1f} {r['train_peak_anon_mb']:>13.1f} "
              f"{r['train_vmhwm_mb']:>12.1f}")
    print(f"memory flat within {MARGIN_MB} MB: {result['memory_flat']}; wrote {args.out} ({cpu_model()})")


if __name__ == "__main__":
    main()
