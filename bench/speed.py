"""The speed benchmark: our train@cpu against the seed notebook's code, and the pipeline's own overhead.

    MNIST_NPZ=/path/to/mnist.npz python -m bench.speed [--quick] [--repeats 3] [--out bench/results/results.json]
    MNIST_NPZ=/path/to/mnist.npz python -m bench.speed --pipeline-only --out bench/results/pipeline.json

In a temporary copy of the project, on the full MNIST (it refuses the sample):
  1. a fresh end-to-end `dvc repro` (and each stage's share of it), a no-op
     `dvc repro`, and an evaluate-only params change, each timed;
  2. the reference (bench.reference, the notebook's procedure) and our
     train stage at the seed's settings (the default params), from the same
     initial weights and data, alternating A B B A A B ... so that a slow phase
     of the machine, or a place in the order, hits both; medians of fit time, samples/s, peak RSS of the
     training process, and test accuracy of each;
  3. the fast preset (params-fast.yaml) over --fast-seeds seeds (5), each from its own
     initial weights, the test set's accuracy read after every epoch (bench.fast_preset):
     time to 99 % per seed and their mean, each seed's accuracy;
  4. a training step op by op (bench.step_profile), summarized;
  5. the ceiling: the CPU's float32 and bfloat16 matrix-product rates (bench.peak, before
     and after the runs, the better kept) and the models' training FLOPs give the time no
     code could beat for each timed figure, and each figure's ratio to it.
Writes everything to a JSON file, with the CPU's name and features, and prints a table.
--quick: one run of each (the fast preset's seeds stay). A part that fails (a stage's
error on some CPU) is recorded with its error line and the benchmark goes on; it then
exits 1 at the end, keeping its temporary copy and log.
Not a test: it asserts nothing, it measures.
"""

import argparse
import csv
import io
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

import yaml
from mnist_cnn.backend import cpu_features, cpu_model, has_bfloat16_units
from mnist_cnn.errors import UserError
from mnist_cnn.params import with_settings

ROOT = Path(__file__).resolve().parent.parent
COPY = ["stages", "mnist_cnn", "tools", "bench", "data/sample", "templates", "dvc.yaml", "params.yaml",
        "params-fast.yaml", ".dvcignore"]
# dvc.yaml's commands say `python`: make that this interpreter, as an activated virtualenv would.
ENV = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
GIT = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]  # commits in the copy, by any account
# Issue #23's targets: the fit against the seed's code and against the CPU's float32 matmul peak; the fast
# preset's time to 99 % (mean of its seeds, each seed and the mean above an accuracy); the time around the fit.
TARGETS = {"fit_ratio": 0.6, "peak_share": 0.6, "accuracy_points": 0.15, "train_rss_mb": 800,
           "fast_to_99_s": 10.0, "fast_to_99_s_bf16": 5.0, "fast_min_accuracy": 0.989, "fast_mean_accuracy": 0.99,
           "noop_repro_s": 3.0, "fresh_overhead_s": 20.0, "evaluate_change_s": 15.0, "queued_overhead_s": 15.0}


def sh(args, cwd, log, lines=None):
    """Run a command, its output appended to `log`; return (wall seconds, peak RSS of the process in MB).

    Given a list as `lines`, each output line is also appended to it, with the
    seconds since the start at which it came.
    """
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(map(str, args))}\n")
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(list(map(str, args)), cwd=cwd, stdout=out if lines is None else subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=ENV, text=True)
        if lines is not None:
            with proc.stdout:
                for line in proc.stdout:
                    lines.append((time.perf_counter() - start, line.rstrip("\n")))
                    out.write(line)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise PartFailed(f"`{' '.join(map(str, args[:4]))} ...` failed (exit {code}): {last_error(log)}")
    return wall, usage.ru_maxrss / 1024


class PartFailed(Exception):
    """One part of the benchmark failed: recorded in the results, and the benchmark goes on."""


def last_error(log):
    """The line of `log` that says what went wrong: the last `error:` line, else its last non-empty line."""
    lines = [line.strip() for line in Path(log).read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("error:", "ERROR:")) or "Error:" in line]
    return (errors or lines or ["(no output)"])[-1][:300]


def attempt(failures, name, function, *args):
    """function(*args), or None where it failed: the reason recorded in `failures[name]` and printed, so a
    part that fails on some CPU (an export, a precision) is a result, never the end of the benchmark."""
    try:
        return function(*args)
    except Exception as err:  # noqa: BLE001 - whatever a part raises is that part's result, and the rest goes on
        failures[name] = str(err) or type(err).__name__
        print(f"bench: {name} FAILED: {err}", flush=True)
        return None


def stage_times(lines, end):
    """Seconds from each of DVC's "Running stage 'x':" lines to the next (or to `end`): the stage's own
    process plus DVC's hashing and locking after it, the first entry ("dvc") being DVC's start-up."""
    starts = [(0.0, "dvc")] + [(t, line.split("'")[1]) for t, line in lines if line.startswith("Running stage '")]
    ends = [t for t, _ in starts[1:]] + [end]
    return {name: round(stop - t, 1) for (t, name), stop in zip(starts, ends, strict=True)}


def copy_project(work, names):
    """Copy the project's files and folders `names` into `work` (no caches, no benchmark results)."""
    for name in names:
        src, dst = ROOT / name, work / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "results*.json"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)


def make_project(work):
    """A git + DVC copy of the project (DVCLive wants a commit) in `work`."""
    copy_project(work, COPY)
    (work / ".gitignore").write_text("/bench_runs/\n/bench.log\n")  # the benchmark's own files, not the project's
    for args in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                 [sys.executable, "-m", "dvc", "config", "core.analytics", "false"],
                 ["git", "add", "-A"], [*GIT, "commit", "-qm", "bench"]):
        subprocess.run(args, cwd=work, check=True, capture_output=True)


def set_params(path, overrides):
    """Write params.yaml with dotted-key overrides applied."""
    try:
        params = with_settings(yaml.safe_load(path.read_text()), overrides, "bench")
    except UserError as err:
        sys.exit(f"bench: {err}")
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def run_ours(work, params, tag, log):
    """Our train stage on the CPU, then evaluate (untimed); returns the run's figures."""
    out = work / "bench_runs" / tag
    python = sys.executable
    _, rss = sh([python, "-m", "stages.train", "--device", "cpu", "--data", "data/processed",
                 "--init", "models/init", "--out", out / "model", "--metrics", out / "train_metrics.json",
                 "--details", out / "train.json", "--live", out / "live", "--params", params], work, log)
    sh([python, "-m", "stages.evaluate", "--device", "cpu", "--data", "data/processed", "--model", out / "model",
        "--metrics", out / "evaluate.json", "--details", out / "evaluate_details.json", "--predictions",
        out / "p.csv", "--mistakes", out / "m.png", "--params", params], work, log)
    train = json.loads((out / "train.json").read_text())
    test = json.loads((out / "evaluate.json").read_text())["test"]
    return {"fit_time_s": train["fit_time_s"], "fit_cpu_s": train["fit_cpu_s"], "samples_per_s": train["samples_per_s"],
            "test_accuracy": test["accuracy"], "peak_rss_mb": rss, "precision": train["precision"]}


def run_script(work, tag, log, module, *args):
    """A bench module (`python -m bench.<name>`) that writes its result as JSON to --out; returns (result, peak
    RSS in MB)."""
    out = work / "bench_runs" / f"{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    _, rss = sh([sys.executable, "-m", module, *args, "--out", out], work, log)
    return json.loads(out.read_text()), rss


def run_reference(work, tag, log):
    result, rss = run_script(work, tag, log, "bench.reference", "--data", "data/processed", "--init", "models/init")
    return {"fit_time_s": result["fit_time_s"], "fit_cpu_s": result["fit_cpu_s"],
            "samples_per_s": result["samples_per_s"], "test_accuracy": result["test_accuracy"], "peak_rss_mb": rss}


def run_profile(work, log):
    """bench/step_profile.py at the seed's settings in the copy (after its fresh repro): a step, op by op."""
    return run_script(work, "step_profile", log, "bench.step_profile")[0]


def profile_summary(profile, top=5):
    """A few lines: the step's time and where it goes (the ops taking most of it, dispatch, input pipeline)."""
    lines = [f"a step at the seed's settings (bench.step_profile, batch {profile['batch_size']}, "
             f"oneDNN {'on' if profile['onednn'] else 'off'}): {profile['step_untraced_ms']:.1f} ms; "
             f"no op running {profile['no_op_running_ms']:.1f} ms, input pipeline "
             f"{profile['input_pipeline_ms']:.1f} ms (own threads); the ops taking most of it:"]
    for op in profile["ops"][:top]:
        rate = f", {op['gflops']:.0f} GFLOP/s" if op.get("gflops") else ""
        lines.append(f"  {op['layer']} {op['pass']} {op['op']}: {op['ms_per_step']:.1f} ms{rate}")
    return "\n".join(lines)


def run_peak(work, tag, log):
    return run_script(work, tag, log, "bench.peak")[0]


def ceiling(peaks, train_flops_per_image, images, epochs):
    """The seed's fit-time floor: its training FLOPs at the best float32 matmul rate measured."""
    float32 = max(p["float32_gflops"] for p in peaks)
    bfloat16 = max(p["bfloat16_gflops"] for p in peaks)
    return {"float32_gflops": float32, "bfloat16_gflops": bfloat16, "train_flops_per_image": train_flops_per_image,
            "floor_fit_s": train_flops_per_image * images * epochs / (float32 * 1e9)}


def fast_summary(seeds, floor_s, bfloat16_units):
    """The fast preset over its seeds: mean time to 99 % (a seed that never reaches it is a miss: no mean),
    each seed's and the mean test accuracy, the floors of one epoch at each peak, the target that applies."""
    done = [s for s in seeds if "failed" not in s]
    times = [s["time_to_99_s"] for s in done]
    accuracies = [s["test_accuracy"] for s in done]
    target = TARGETS["fast_to_99_s_bf16" if bfloat16_units else "fast_to_99_s"]
    mean = statistics.mean(times) if times and None not in times and len(done) == len(seeds) else None
    summary = {"seeds": seeds, "precision": done[0]["precision"] if done else None,
               "mean_time_to_99_s": mean, "misses": sum(t is None for t in times) + len(seeds) - len(done),
               "mean_test_accuracy": statistics.mean(accuracies) if accuracies else None,
               "min_test_accuracy": min(accuracies) if accuracies else None,
               "target_s": target, "floor_epoch_s": floor_s}
    summary["met"] = bool(mean is not None and mean <= target
                          and summary["min_test_accuracy"] >= TARGETS["fast_min_accuracy"]
                          and summary["mean_test_accuracy"] >= TARGETS["fast_mean_accuracy"])
    return summary


def median_of(runs):
    """The runs' median of each figure; a setting that is not a number (the precision) from the first run."""
    return {key: statistics.median(run[key] for run in runs) if isinstance(runs[0][key], (int, float))
            else runs[0][key] for key in runs[0]}


def overhead(work, log):
    """Timings of the pipeline itself: fresh, no-op, evaluate-only change."""
    dvc = [sys.executable, "-m", "dvc", "repro"]
    lines = []
    fresh_s, _ = sh(dvc, work, log, lines)
    data = json.loads((work / "metrics" / "data.json").read_text())
    if not data["full_mnist"]:
        sys.exit("bench: the pipeline ran on the 7,000-image sample; give it the full MNIST "
                 "(MNIST_NPZ=/path/to/mnist.npz, or the Keras cache) and run again")
    fit_s = json.loads((work / "metrics" / "train_cpu.json").read_text())["fit_time_s"]
    noop_s, _ = sh(dvc, work, log)
    original = (work / "params.yaml").read_text()
    set_params(work / "params.yaml", {"evaluate.batch_size": 500})
    evaluate_s, _ = sh(dvc, work, log)
    (work / "params.yaml").write_text(original)
    return {"fresh_repro_s": fresh_s, "fresh_fit_s": fit_s, "fresh_overhead_s": fresh_s - fit_s,
            "fresh_stages_s": stage_times(lines, fresh_s), "noop_repro_s": noop_s, "evaluate_change_s": evaluate_s}


def wait_for_the_queue(work, timeout_s):
    """Poll `dvc queue status` until nothing is queued or running; return the final status text."""
    deadline = time.perf_counter() + timeout_s
    status = ""
    while time.perf_counter() < deadline:
        status = queue_status(work)
        if not any(word in status for word in ("Queued", "Running")):
            return status
        time.sleep(2.0)  # each `dvc queue status` takes a core for a moment: poll seldom (at most 2 s late)
    raise PartFailed(f"the queue did not empty in {timeout_s} s: {' '.join(status.split())[:200]}")


def queue_status(work):
    return subprocess.run([sys.executable, "-m", "dvc", "queue", "status"], cwd=work, env=ENV, capture_output=True,
                          text=True).stdout


def wait_for_the_experiment(work, name, timeout_s):
    """The time.perf_counter() at which experiment `name` was done, i.e. its git ref (refs/exps/.../name) was
    written, which DVC does once the run is committed and `dvc exp show` lists it; None if the queue emptied
    without it (a failed run).

    The ref is polled with git every 0.2 s, which costs nothing a timing would see; `dvc queue status`, a DVC
    start-up that takes a core for a second or more, only every 15 s.
    """
    start = time.perf_counter()
    deadline, next_status = start + timeout_s, start + 15.0
    while time.perf_counter() < deadline:
        refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=work,
                              capture_output=True, text=True).stdout.split()
        if any(ref.rsplit("/", 1)[-1] == name for ref in refs):
            return time.perf_counter()
        if time.perf_counter() >= next_status:
            if not any(word in queue_status(work) for word in ("Queued", "Running")):
                return None
            next_status = time.perf_counter() + 15.0
        time.sleep(0.2)
    raise PartFailed(f"the queued experiment was not done in {timeout_s} s")


def experiment_rows(work):
    """The experiments' rows of `dvc exp show --csv` (the baselines left out), each a dict by column."""
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--csv"], cwd=work, env=ENV,
                           capture_output=True, text=True)
    if shown.returncode != 0:
        raise PartFailed(f"`dvc exp show --csv` failed: {shown.stderr.strip()[-200:]}")
    return [row for row in csv.DictReader(io.StringIO(shown.stdout)) if row["typ"] != "baseline"]


def queued_experiment(work, log):
    """One experiment through DVC's queue, as a user runs one (`dvc exp run --queue`, then `dvc queue start`),
    timed from `dvc queue start` until the experiment is done (its ref written): its wall time, its fit, and the
    rest (the copy DVC makes, the stages' start-ups, evaluate and report, DVC's own work), which is what issue #23
    caps.
    One epoch at another learning rate, so that the run cache restores nothing."""
    for args in (["git", "add", "-A"], [*GIT, "commit", "-qm", "the fresh run"]):
        sh(args, work, log)
    dvc = [sys.executable, "-m", "dvc"]
    sh([*dvc, "exp", "run", "--queue", "-n", "queued", "-S", "train.learning_rate=0.00123", "-S", "train.epochs=1"],
       work, log)
    start = time.perf_counter()
    sh([*dvc, "queue", "start"], work, log)
    done = wait_for_the_experiment(work, "queued", timeout_s=1800)
    status = wait_for_the_queue(work, timeout_s=600)  # its worker's last steps, untimed
    if done is None or "Success" not in status:
        raise PartFailed(f"the queued experiment did not succeed: {' '.join(status.split())[:200]}")
    fit = next((float(row["fit_time_s"]) for row in experiment_rows(work)
                if row["Experiment"] == "queued" and row["fit_time_s"]), None)
    if fit is None:
        raise PartFailed("`dvc exp show` lists no fit time for the queued experiment")
    wall = done - start  # from `dvc queue start` to the experiment's ref
    return {"queued_wall_s": round(wall, 1), "queued_fit_s": fit, "queued_overhead_s": round(wall - fit, 1)}


def table(result):
    """The figures against their targets and floors; a part that failed shows as FAILED, one not run as -."""
    t, top, pipe = TARGETS, result.get("ceiling"), result.get("pipeline")
    ref, ours, fast = result.get("reference"), result.get("ours"), result.get("fast_preset")

    def ok(flag):
        return "yes" if flag else "NO"

    def cell(part, text):
        """`text()` where the part ran, else - (its FAILED row, at the end, says why)."""
        if part is not None:
            return text()
        return "-"

    def spread(name):
        times = [run["fit_time_s"] for run in result["runs"][name]]
        return f"{result[name]['fit_time_s']:.1f}" + (f" ({min(times):.0f}-{max(times):.0f})" if len(times) > 1 else "")

    def share(run):
        return top["floor_fit_s"] / run["fit_time_s"]

    rows = [("", "reference", "ours", "ours/ref", "target", "met")]
    if ref and ours:
        rows.append(("fit time, 5 epochs (s)", spread("reference"), spread("ours"), f"{result['fit_ratio']:.2f}",
                     f"<= {t['fit_ratio']}x", ok(result["fit_ratio"] <= t["fit_ratio"])))
    else:
        rows.append(("fit time, 5 epochs (s)", cell(ref, lambda: spread("reference")),
                     cell(ours, lambda: spread("ours")), "", f"<= {t['fit_ratio']}x", "NO"))
    if top:
        rows += [
            ("floor: its FLOPs at fp32 matmul peak (s)", f"{top['floor_fit_s']:.1f}", f"{top['floor_fit_s']:.1f}", "",
             f"{top['float32_gflops']:.0f} GFLOP/s", ""),
            ("share of that peak (%)", cell(ref, lambda: f"{100 * share(ref):.0f}"),
             cell(ours, lambda: f"{100 * share(ours):.0f}"), "", f">= {100 * t['peak_share']:.0f}",
             ok(ours is not None and share(ours) >= t["peak_share"])),
        ]
    if ref and ours:
        rows += [
            ("CPU time in fit (s), all threads", f"{ref['fit_cpu_s']:.1f}", f"{ours['fit_cpu_s']:.1f}",
             f"{ours['fit_cpu_s'] / ref['fit_cpu_s']:.2f}", "", ""),
            ("cores busy in fit (of " + str(result["machine"]["cores"]) + ")",
             f"{ref['fit_cpu_s'] / ref['fit_time_s']:.2f}", f"{ours['fit_cpu_s'] / ours['fit_time_s']:.2f}",
             "", "", ""),
            ("samples/s", f"{ref['samples_per_s']:.0f}", f"{ours['samples_per_s']:.0f}",
             f"{ours['samples_per_s'] / ref['samples_per_s']:.2f}", "", ""),
            ("test accuracy (%)", f"{100 * ref['test_accuracy']:.2f}", f"{100 * ours['test_accuracy']:.2f}",
             f"{100 * (ours['test_accuracy'] - ref['test_accuracy']):+.2f} pt", f"within {t['accuracy_points']} pt",
             ok(abs(ours["test_accuracy"] - ref["test_accuracy"]) * 100 <= t["accuracy_points"])),
        ]
    if ours:
        rows.append(("peak RSS of training (MB)", cell(ref, lambda: f"{ref['peak_rss_mb']:.0f}"),
                     f"{ours['peak_rss_mb']:.0f}", "", f"<= {t['train_rss_mb']} MB",
                     ok(ours["peak_rss_mb"] <= t["train_rss_mb"])))
    if fast:
        seeds = [s for s in fast["seeds"] if "failed" not in s]
        rows.append((f"fast preset ({fast['precision']}): time to 99 % (s), mean of {len(fast['seeds'])} seeds", "",
                     "-" if fast["mean_time_to_99_s"] is None else f"{fast['mean_time_to_99_s']:.1f}",
                     f"{fast['misses']} missed or failed", f"<= {fast['target_s']:g} s", ok(fast["met"])))
        if seeds:
            rows.append(("fast preset: test accuracy (%), mean / lowest", "",
                         f"{100 * fast['mean_test_accuracy']:.2f} / {100 * fast['min_test_accuracy']:.2f}", "",
                         f">= {100 * t['fast_mean_accuracy']:.1f} / {100 * t['fast_min_accuracy']:.1f}", ""))
        if fast.get("floor_epoch_s"):
            floor = fast["floor_epoch_s"]
            rows.append(("fast preset: an epoch at fp32 / bf16 peak (s)", "",
                         f"{floor['float32']:.1f} / {floor['bfloat16']:.1f}", "", "", ""))
    if pipe:
        rows += [
            ("no-op dvc repro (s)", "", f"{pipe['noop_repro_s']:.1f}", "", f"<= {t['noop_repro_s']}",
             ok(pipe["noop_repro_s"] <= t["noop_repro_s"])),
            ("fresh dvc repro (s)", "", f"{pipe['fresh_repro_s']:.1f} (fit {pipe['fresh_fit_s']:.1f})", "",
             f"<= fit + {t['fresh_overhead_s']:.0f}", ok(pipe["fresh_overhead_s"] <= t["fresh_overhead_s"])),
            ("evaluate-only change (s)", "", f"{pipe['evaluate_change_s']:.1f}", "", f"<= {t['evaluate_change_s']}",
             ok(pipe["evaluate_change_s"] <= t["evaluate_change_s"])),
        ]
    queued = result.get("queued")
    if queued:
        rows.append(("queued experiment, 1 epoch (s)", "",
                     f"{queued['queued_wall_s']:.1f} (fit {queued['queued_fit_s']:.1f})", "",
                     f"<= fit + {t['queued_overhead_s']:.0f}",
                     ok(queued["queued_overhead_s"] <= t["queued_overhead_s"])))
    rows += [(f"FAILED: {name}", "", reason[:60], "", "", "NO") for name, reason in result.get("failures", {}).items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


def seed_params(work, seed):
    """A params file with the fast preset applied and base.seed set, and its own initial weights."""
    params = work / "bench_runs" / f"fast-seed{seed}" / "params.yaml"
    params.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "params.yaml", params)
    set_params(params, {**yaml.safe_load((work / "params-fast.yaml").read_text()), "base.seed": seed})
    return params


def run_fast_seed(work, seed, log):
    """The fast preset from the seed's own initial weights: bench.fast_preset's per-epoch record."""
    params = seed_params(work, seed)
    folder = params.parent
    sh([sys.executable, "-m", "stages.build_init_weights", "--out", folder / "init", "--metrics",
        folder / "init_metrics.json", "--details", folder / "init_details.json", "--params", params], work, log)
    result, rss = run_script(work, f"fast-seed{seed}/result", log, "bench.fast_preset", "--params", params,
                             "--init", folder / "init")
    flops = json.loads((folder / "init_details.json").read_text())["train_flops_per_image"]
    return {**result, "peak_rss_mb": rss, "train_flops_per_image": flops}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one run of each instead of --repeats")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each (default 3)")
    parser.add_argument("--fast-seeds", type=int, default=5, help="seeds of the fast preset (default 5)")
    parser.add_argument("--out", type=Path, help="the results file (default: bench/results/results.json; "
                        "with --pipeline-only, bench/results/pipeline.json)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary project copy")
    parser.add_argument("--pipeline-only", action="store_true",
                        help="only the pipeline's timings and a queued experiment (step 1, ~5 minutes), "
                             "printed and written to --out")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    args.out = args.out or ROOT / "bench" / "results" / ("pipeline.json" if args.pipeline_only else "results.json")

    work = Path(tempfile.mkdtemp(prefix="mnist-bench-"))
    log = work / "bench.log"
    print(f"bench: working in {work} (log: {log})")
    failures = {}
    make_project(work)
    peaks = []
    if not args.pipeline_only:
        print("bench: the CPU's matmul peak ...", flush=True)
        peaks.append(attempt(failures, "peak, before", run_peak, work, "peak0", log))
    print("bench: fresh dvc repro, no-op repro, evaluate-only change ...", flush=True)
    pipeline = attempt(failures, "pipeline", overhead, work, log)
    if args.pipeline_only:
        queued = pipeline and attempt(failures, "queued experiment", queued_experiment, work, log)
        return finish(work, args, failures, write_pipeline_only, args.out, pipeline, queued)
    if pipeline is None:  # no data, no initial weights: nothing else can run
        return finish(work, args, failures, write_result, args.out, {"machine": machine_facts(), "targets": TARGETS,
                                                                     "failures": failures})
    runs = {"reference": [], "ours": []}
    for i in range(repeats):
        # A B, B A, A B, ...: whatever a run's place in the order does to it (the host's
        # scheduling after a busy spell, a warm page cache) falls on both alike
        order = ["reference", "ours"] if i % 2 == 0 else ["ours", "reference"]
        print(f"bench: round {i + 1}/{repeats}: {order[0]}, then {order[1]} ...", flush=True)
        for name in order:
            run = (attempt(failures, f"reference, run {i + 1}", run_reference, work, f"reference{i}", log)
                   if name == "reference" else
                   attempt(failures, f"ours, run {i + 1}", run_ours, work, work / "params.yaml", f"ours{i}", log))
            if run is not None:
                runs[name].append(run)
    seed = yaml.safe_load((work / "params.yaml").read_text())["base"]["seed"]
    fast_seeds = []
    for k in range(args.fast_seeds):
        print(f"bench: fast preset, seed {seed + k} ({k + 1} of {args.fast_seeds}) ...", flush=True)
        fast_seeds.append(attempt(failures, f"fast preset, seed {seed + k}", run_fast_seed, work, seed + k, log)
                          or {"seed": seed + k, "failed": failures[f"fast preset, seed {seed + k}"]})
    print("bench: a step op by op ...", flush=True)
    profile = attempt(failures, "step profile", run_profile, work, log)
    peaks.append(attempt(failures, "peak, after", run_peak, work, "peak1", log))
    print("bench: a queued experiment ...", flush=True)
    queued = attempt(failures, "queued experiment", queued_experiment, work, log)
    peaks = [p for p in peaks if p is not None]
    features = cpu_features()
    result = {"machine": machine_facts(), "repeats": repeats, "targets": TARGETS, "failures": failures,
              "runs": runs, "pipeline": pipeline, "queued": queued, "peaks": peaks, "step_profile": profile}
    for name in ("reference", "ours"):
        result[name] = median_of(runs[name]) if runs[name] else None
    if result["reference"] and result["ours"]:
        result["fit_ratio"] = result["ours"]["fit_time_s"] / result["reference"]["fit_time_s"]
    seed_run = json.loads((work / "details" / "train_cpu.json").read_text())  # the fresh repro's
    train_flops = json.loads((work / "details" / "model.json").read_text())["train_flops_per_image"]
    result["ceiling"] = ceiling(peaks, train_flops, seed_run["train_images"], seed_run["epochs"]) if peaks else None
    fast_flops = next((s["train_flops_per_image"] for s in fast_seeds if "failed" not in s), None)
    floor_epoch = ({kind: fast_flops * seed_run["train_images"] / (result["ceiling"][f"{kind}_gflops"] * 1e9)
                    for kind in ("float32", "bfloat16")} if fast_flops and peaks else None)
    result["fast_preset"] = fast_summary(fast_seeds, floor_epoch, has_bfloat16_units(features))
    result["floors"] = floors(result)
    return finish(work, args, failures, write_result, args.out, result)


def floors(result):
    """Each timed figure beside the time no code could beat (its FLOPs at the matmul peak), and the ratio."""
    top, out = result["ceiling"], {}
    if not top:
        return out
    for name in ("reference", "ours"):
        if result[name]:
            out[f"{name}_fit_s"] = {"figure": result[name]["fit_time_s"], "floor": top["floor_fit_s"],
                                    "share_of_peak": top["floor_fit_s"] / result[name]["fit_time_s"]}
    fast = result["fast_preset"]
    if fast["floor_epoch_s"]:
        kind = "bfloat16" if fast["precision"] == "mixed_bfloat16" else "float32"
        for seed in fast["seeds"]:
            if "failed" not in seed and seed["time_to_99_s"] is not None:
                epochs = next(e["epoch"] for e in seed["epochs"] if e["test_accuracy"] >= 0.99)
                floor = fast["floor_epoch_s"][kind] * epochs
                out[f"fast_seed{seed['seed']}_to_99_s"] = {"figure": seed["time_to_99_s"], "floor": floor,
                                                           "share_of_peak": floor / seed["time_to_99_s"]}
    return out


def finish(work, args, failures, write, *what):
    """Write and print what was measured; keep the copy (with its log) where a part failed; exit 1 then."""
    write(*what)
    if failures:
        print(f"bench: {len(failures)} part(s) failed: {', '.join(failures)}; the copy and its log stay in {work}")
        sys.exit(1)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def write_result(out, result):
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(machine_line(result["machine"]))
    if "pipeline" in result:
        print(table(result))
        print(by_stage(result["pipeline"]))
        if result["step_profile"]:
            print(profile_summary(result["step_profile"]))
        for seed in result["fast_preset"]["seeds"]:
            print(f"fast preset, seed {seed['seed']}: " + (f"FAILED ({seed['failed']})" if "failed" in seed else
                  ", ".join(f"epoch {e['epoch']} {e['epoch_s']:.1f} s {100 * e['test_accuracy']:.2f} %"
                            for e in seed["epochs"])))
    for name, reason in result["failures"].items():
        print(f"FAILED: {name}: {reason}")
    print(f"wrote {out}")


def machine_facts():
    """The CPU and the software, and what was measured: the project's commit (`dirty` where its tracked files had
    changes beside it) and the day."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"cpu": cpu_model(), "cpu_features": cpu_features(), "cores": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform(),
            "commit": git("rev-parse", "--short", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "-uno")),
            "date": time.strftime("%Y-%m-%d", time.gmtime())}


def machine_line(machine):
    return f"{machine['cpu']}, {machine['cores']} cores ({', '.join(machine['cpu_features']) or 'no flags read'})"


def by_stage(pipeline):
    """One line: the fresh repro's seconds per stage."""
    return ("fresh dvc repro by stage (s; each with DVC's hashing and locking after it): "
            + ", ".join(f"{name} {secs:.1f}" + (f" (fit {pipeline['fresh_fit_s']:.1f})" if name == "train@cpu" else "")
                        for name, secs in pipeline["fresh_stages_s"].items()))


def write_pipeline_only(out, pipeline, queued):
    machine = machine_facts()
    out.write_text(json.dumps({"machine": machine, "targets": TARGETS, "pipeline": pipeline, "queued": queued},
                              indent=2) + "\n")
    print(machine_line(machine))
    if pipeline is None:
        return
    if queued:
        print(f"a queued experiment of 1 epoch: {queued['queued_wall_s']:.1f} s from `dvc queue start` to its end, "
              f"of which fit {queued['queued_fit_s']:.1f} s (+{queued['queued_overhead_s']:.1f} s; "
              f"target +{TARGETS['queued_overhead_s']:.0f})")
    print(f"fresh dvc repro {pipeline['fresh_repro_s']:.1f} s, of which fit {pipeline['fresh_fit_s']:.1f} s "
          f"(+{pipeline['fresh_overhead_s']:.1f} s; target +{TARGETS['fresh_overhead_s']:.0f}); "
          f"no-op {pipeline['noop_repro_s']:.1f} s (target {TARGETS['noop_repro_s']}); "
          f"evaluate-only change {pipeline['evaluate_change_s']:.1f} s (target {TARGETS['evaluate_change_s']})")
    print(by_stage(pipeline))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
