"""report: what was run, on which data, and how it did, as Markdown and as one HTML page.

    python -m stages.report --details details --plots plots --live dvclive \
        --summary models/init/summary.md --out reports --curves reports/curves

Reads the details, per-epoch logs and predictions of every device in
train.devices, the layer table that build_init_weights wrote and the params,
and sets our figures beside the seed notebook's published ones. report.html
is self-contained (images embedded), so it opens offline in any browser.
--curves gets one CSV per training curve (loss, accuracy, learning rate,
epoch time), every device and split in one file, so that `dvc plots` draws
one chart per curve whichever devices ran and whether or not validation did.
"""

import argparse
import base64
import csv
import html
import io
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np

from stages.build_init_weights import ModelParams
from stages.common import PARAMS_FILE, BaseParams, Damaged, UserError, atomic_path, load_params, read_json, run
from stages.preprocess import PreprocessParams
from stages.train import TrainParams, check_train

# The seed notebook's published figures: 5 epochs of the same CNN, batch 64, rmsprop.
SEED_FIGURES = {"test_accuracy": 0.990, "fit_time_s": 20.6, "device_name": "NVIDIA GeForce GTX 960"}
PROCEDURES = {
    "published_split": "published 60,000 / 10,000 split; scaler fitted on the training images only",
    "pooled_resplit": "the seed's: all 70,000 pooled, scaler fitted on all, shuffled, re-split 60,000 / 10,000",
}


def confusion_from_csv(path, stage="evaluate@cpu"):
    """10 x 10 counts, rows = true digit, columns = predicted, from evaluate's predictions CSV."""
    counts = np.zeros((10, 10), dtype=int)
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                counts[int(row["actual"]), int(row["predicted"])] += 1
    except FileNotFoundError:
        raise UserError(f"{path} not found: run `dvc repro` to make it") from None
    except (KeyError, ValueError, IndexError, TypeError, UnicodeDecodeError) as err:
        raise Damaged(f"{path} is damaged ({type(err).__name__}: {err}); run `dvc repro --single-item -f {stage}` "
                        f"to write it again") from None
    return counts


def read_curves(live_dir, stage="train@cpu"):
    """DVCLive's per-epoch TSVs: {"train/loss": [values by epoch], "eval/loss": [...], ...}."""
    curves = {}
    for tsv in sorted((Path(live_dir) / "plots" / "metrics").glob("*/*.tsv")):
        try:
            with open(tsv, newline="") as f:
                curves[f"{tsv.parent.name}/{tsv.stem}"] = [float(r[tsv.stem])
                                                           for r in csv.DictReader(f, delimiter="\t")]
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as err:
            raise Damaged(f"{tsv} is damaged ({type(err).__name__}: {err}); run `dvc repro --single-item -f {stage}` "
                            f"to write it again") from None
    if not curves:
        raise UserError(f"no per-epoch log in {live_dir}: run `dvc repro` to make it")
    return curves


CURVES = ("loss", "accuracy", "learning_rate", "epoch_time_s")


def curve_rows(runs_curves, metric):
    """[(epoch, series, value)] of one curve over devices and splits; epochs from 1, as DVCLive logged them."""
    rows = []
    for device, curves in runs_curves.items():
        for split, name in (("train", "training"), ("eval", "validation")):
            values = curves.get(f"{split}/{metric}")
            series = device if metric in ("learning_rate", "epoch_time_s") else f"{device} {name}"
            rows += [(epoch, series, value) for epoch, value in enumerate(values or [], start=1)]
    return rows


def curves_csv(rows, metric):
    lines = [f"epoch,series,{metric}"] + [f"{epoch},{series},{value!r}" for epoch, series, value in rows]
    return "\n".join(lines) + "\n"


def summary_rows(summary):
    """The rows of build_init_weights's Markdown layer table, header first, emphasis dropped."""
    lines = [line.strip().strip("|") for line in summary.splitlines() if line.strip().startswith("|")]
    rows = [[cell.strip().replace("**", "") for cell in line.split("|")] for line in lines]
    return [row for row in rows if not set("".join(row)) <= set("-: ")]


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render(params, data, model, summary, runs):
    """The report's Markdown. `runs` maps device -> (train metrics, evaluate metrics, confusion)."""
    base, train, arch = params["base"], params["train"], params["model"]
    if data["full_mnist"]:
        data_line = (f"Data: **full MNIST**, {data['train_images']:,} training and {data['test_images']:,} "
                     f"test images (source: {data['source']}).")
    else:
        data_line = (f"> **WARNING: trained on the {data['train_images'] + data['test_images']:,}-image "
                     f"SAMPLE of MNIST, not the full data set** ({data['train_images']:,} training, "
                     f"{data['test_images']:,} test). Figures are not comparable with the seed's. "
                     f"Provide the data (see README) and run `dvc repro -f fetch && dvc repro`.")
    out = ["# MNIST CNN: training report", "", data_line, "",
           "## Data and preprocessing", "",
           f"- procedure: `{params['preprocess'].procedure}`: {PROCEDURES[params['preprocess'].procedure]}",
           "- inputs standardized per pixel (StandardScaler), shaped (N, 28, 28, 1), float32", "",
           "## Model", "", summary.strip(), "",
           f"{model['weights']:,} weights; output activation `{arch.output_activation}`; "
           f"L2 penalty conv {arch.l2.conv}, dense {arch.l2.dense}; dropout {arch.dropout}; "
           f"Keras backend `{base.backend}`; seed {base.seed}.", "",
           "## Training settings", "",
           table(["setting", "value"], [
               ["epochs", train.epochs], ["batch size", train.batch_size], ["optimizer", train.optimizer],
               ["learning rate", train.learning_rate], ["learning-rate schedule", train.lr_schedule],
               ["momentum", train.momentum], ["Nesterov", train.nesterov], ["loss", train.loss],
               ["shuffle each epoch", train.shuffle], ["validation split", train.validation_split],
               ["devices", ", ".join(train.devices)]]), "",
           "## Fit time per device", "",
           table(["device", "name (as the framework reports it)", "fit time", "per epoch", "images/s",
                  "CPU time (cores busy)", "final train accuracy"],
                 [[d, f"{t['device_name']} ({t['backend']} {t['backend_version']}, Keras {t['keras_version']})",
                   f"{t['fit_time_s']:.1f} s", f"{t['time_per_epoch_s']:.2f} s", f"{t['samples_per_s']:,.0f}",
                   f"{t['fit_cpu_s']:.1f} s ({t['cores_busy']:.1f})", f"{t['final_accuracy']:.4f}"]
                  for d, (t, _, _) in runs.items()]),
           "", "CPU time counts all the process's threads: on a shared host, a fit whose cores were taken "
               "away shows fewer cores busy and a longer fit time for the same CPU time."]
    if set(runs) == {"cpu", "gpu"}:
        speedup = runs["cpu"][0]["fit_time_s"] / runs["gpu"][0]["fit_time_s"]
        out += ["", f"The GPU fit was {speedup:.1f}x as fast as the CPU fit."]
    cpu_names = {t["cpu_model"] for t, _, _ in runs.values()}
    out += ["", f"CPU: {', '.join(sorted(cpu_names))}.", "", "## Test metrics", ""]
    for device, (_, ev, conf) in runs.items():
        test = ev["test"]
        out += [f"### {device} model", "",
                f"Test accuracy **{test['accuracy']:.2%}**, loss {test['loss']:.4f}, "
                f"{test['errors']} errors in {test['images']:,} images.", "",
                table(["digit", "precision", "recall"],
                      [[d, f"{c['precision']:.4f}", f"{c['recall']:.4f}"] for d, c in ev["per_class"].items()]),
                "", "Confusion matrix (rows: true digit, columns: predicted):", "",
                table(["true \\ predicted"] + [str(d) for d in range(10)],
                      [[d] + list(conf[d]) for d in range(10)]), ""]
    ours = [[f"ours, {d}", f"{ev['test']['accuracy']:.2%}", f"{t['fit_time_s']:.1f} s", t["device_name"]]
            for d, (t, ev, _) in runs.items()]
    out += ["## Beside the seed notebook", "",
            table(["run", "test accuracy", f"fit time, {train.epochs} epochs", "device"],
                  [["seed (published, 5 epochs)", f"{SEED_FIGURES['test_accuracy']:.1%}",
                    f"{SEED_FIGURES['fit_time_s']} s", SEED_FIGURES["device_name"]]] + ours), ""]
    return "\n".join(out)


CODE = ["stages", "dvc.yaml", "params.yaml"]  # what makes the results; the results themselves are always new here


def code_version():
    """The git commit of the code and params the report was made from ('+ changes' when they differ from it)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *CODE], capture_output=True,
                               text=True, check=True).stdout.strip()
        return commit + (" + uncommitted changes to the code or params" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def versions(runs):
    names = ["numpy", "scikit-learn", "dvc", "dvclive", "matplotlib"]
    found = {"python": platform.python_version()}
    for t, *_ in runs.values():
        found["keras"] = t["keras_version"]
        found[t["backend"]] = t["backend_version"]
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def png_data_uri(fig):
    import matplotlib.pyplot as plt
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def curves_figure(device, curves):
    """Loss, accuracy and learning rate per epoch: training and, when there is one, validation."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, metric in zip(axes, ["loss", "accuracy", "learning_rate"], strict=True):
        for split, style in (("train", "-o"), ("eval", "--s")):
            values = curves.get(f"{split}/{metric}")
            if values:
                label = "training" if split == "train" else "validation"
                ax.plot(range(1, len(values) + 1), values, style, label=label)
        ax.set(title=f"{metric.replace('_', ' ')} ({device})", xlabel="epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def confusion_figure(device, conf):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 4.4))
    ax.imshow(np.log1p(conf), cmap="Blues")
    for t in range(10):
        for p in range(10):
            if conf[t, p]:
                ax.text(p, t, conf[t, p], ha="center", va="center", fontsize=7,
                        color="white" if t == p else "black")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true",
           title=f"Confusion matrix, test set ({device})")
    fig.tight_layout()
    return fig


def fit_time_figure(runs):
    import matplotlib.pyplot as plt
    names = [f"{d}\n{t['device_name'][:28]}" for d, (t, *_) in runs.items()] + ["seed\nGTX 960"]
    seconds = [t["fit_time_s"] for t, *_ in runs.values()] + [SEED_FIGURES["fit_time_s"]]
    fig, ax = plt.subplots(figsize=(6, 2.6))
    bars = ax.barh(names, seconds, color=["tab:blue", "tab:green", "tab:gray"][:len(names)])
    ax.bar_label(bars, fmt="%.1f s")
    ax.set(xlabel="fit time (s)", title="Fit time per device")
    fig.tight_layout()
    return fig


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
table.text td{text-align:left}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.warn{background:#fff3cd;border:2px solid #d39e00;padding:1em;font-weight:bold}
.ok{background:#e8f5e9;border:1px solid #7cb342;padding:.6em 1em}code{background:#f4f4f4;padding:0 .2em}"""


def html_table(header, rows, cls="numbers"):
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class='{cls}'><tr>{head}</tr>{body}</table>"


def render_html(params, data, model, summary, runs, provenance):
    """The self-contained HTML report. `runs` maps device -> (train, evaluate, confusion, curves, mistakes PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    train, esc = params["train"], html.escape
    layers = summary_rows(summary)  # header, then one row per layer and the total
    if data["full_mnist"]:
        banner = (f'<p class="ok">Data: full MNIST, {data["train_images"]:,} training and '
                  f'{data["test_images"]:,} test images (source: {esc(data["source"])}).</p>')
    else:
        banner = (f'<p class="warn">WARNING: trained on the {data["train_images"] + data["test_images"]:,}-image '
                  f"SAMPLE of MNIST, not the full data set. Figures are not comparable with the seed's. "
                  f"Provide the data (see README) and run <code>dvc repro -f fetch &amp;&amp; dvc repro</code>.</p>")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>MNIST CNN report</title>"
             f"<style>{CSS}</style></head><body><h1>MNIST CNN: training report</h1>", banner,
             html_table(["provenance", ""], provenance, cls="text"), "<h2>Our numbers beside the seed's</h2>",
             html_table(["run", "test accuracy", f"fit time, {train.epochs} epochs", "device"],
                        [["seed notebook (published, 5 epochs)", f"{SEED_FIGURES['test_accuracy']:.1%}",
                          f"{SEED_FIGURES['fit_time_s']} s", SEED_FIGURES["device_name"]]]
                        + [[f"ours, {d}", f"{ev['test']['accuracy']:.2%}", f"{t['fit_time_s']:.1f} s",
                            t["device_name"]] for d, (t, ev, *_) in runs.items()])]
    if len(runs) > 1:
        parts.append(f"<img alt='fit time per device' src='{png_data_uri(fit_time_figure(runs))}'>")
    arch = params["model"]
    parts += [f"<h2>Model</h2><p>{model['weights']:,} weights; L2 penalty conv {arch.l2.conv}, dense "
              f"{arch.l2.dense}; dropout {arch.dropout}; Keras backend <code>{esc(params['base'].backend)}"
              f"</code>; preprocessing <code>{esc(params['preprocess'].procedure)}</code>.</p>",
              html_table(layers[0], layers[1:]),
              "<h3>Training settings</h3>",
              html_table(["setting", "value"], [[k, v] for k, v in train.model_dump().items()
                                                if k not in ("cpu", "gpu")], cls="text")]
    for device, (t, ev, conf, curves, mistakes) in runs.items():
        test = ev["test"]
        parts += [f"<h2>{device} model</h2>",
                  f"<p>Test accuracy <b>{test['accuracy']:.2%}</b>, loss {test['loss']:.4f}, "
                  f"{test['errors']} errors in {test['images']:,} images; fit {t['fit_time_s']:.1f} s on "
                  f"{esc(t['device_name'])}.</p>",
                  f"<img alt='{device} training curves' src='{png_data_uri(curves_figure(device, curves))}'>",
                  f"<img alt='{device} confusion matrix' src='{png_data_uri(confusion_figure(device, conf))}'>",
                  html_table(["digit", "precision", "recall"],
                             [[d, f"{c['precision']:.4f}", f"{c['recall']:.4f}"] for d, c in ev["per_class"].items()]),
                  f"<h3>The most confident mistakes ({device})</h3>",
                  "<p>Test images the model got wrong with the highest confidence; under each, the true digit, "
                  "the digit the model read, the image's index in the test set and the model's confidence.</p>",
                  f"<img alt='{device} most confident mistakes' "
                  f"src='data:image/png;base64,{base64.b64encode(mistakes).decode()}'>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--details", type=Path, required=True, help="folder of the stages' details")
    parser.add_argument("--plots", type=Path, required=True, help="folder of evaluate's predictions and images")
    parser.add_argument("--live", type=Path, required=True, help="folder of train's DVCLive logs")
    parser.add_argument("--summary", type=Path, required=True, help="build_init_weights's layer table")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md and report.html")
    parser.add_argument("--curves", type=Path, required=True, help="folder for the training curves' CSVs")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    args = parser.parse_args(argv)
    params = load_params(args.params, base=BaseParams, preprocess=PreprocessParams,
                         model=ModelParams, train=TrainParams)
    check_train(params["train"], params["base"].backend)

    try:
        summary = args.summary.read_text()
        runs = {d: (read_json(args.details / f"train_{d}.json"), read_json(args.details / f"evaluate_{d}.json"),
                    confusion_from_csv(args.plots / f"predictions_{d}.csv", f"evaluate@{d}"),
                    read_curves(args.live / f"train_{d}", f"train@{d}"),
                    (args.plots / f"mistakes_{d}.png").read_bytes())
                for d in params["train"].devices}
    except FileNotFoundError as err:
        raise UserError(f"{err.filename} not found: run `dvc repro` to make it") from None
    data, model = read_json(args.details / "data.json"), read_json(args.details / "model.json")
    provenance = [["data", f"{data['source']} ({'full MNIST' if data['full_mnist'] else 'SAMPLE'})"],
                  ["code version", code_version()],
                  ["devices", "; ".join(f"{d}: {t['device_name']} ({t['cpu_model']})" for d, (t, *_) in runs.items())],
                  ["libraries", ", ".join(f"{k} {v}" for k, v in versions(runs).items())]]
    markdown = render(params, data, model, summary, {d: r[:3] for d, r in runs.items()})
    page = render_html(params, data, model, summary, runs, provenance)
    args.out.mkdir(parents=True, exist_ok=True)
    with (atomic_path(args.out / "report.md") as md, atomic_path(args.out / "report.html") as page_file,
          atomic_path(args.curves) as curves):
        md.write_text(markdown)
        page_file.write_text(page)
        curves.mkdir()
        for metric in CURVES:
            rows = curve_rows({d: r[3] for d, r in runs.items()}, metric)
            (curves / f"{metric}.csv").write_text(curves_csv(rows, metric))
    print(f"wrote {args.out / 'report.md'}, {args.out / 'report.html'} and {args.curves}/ "
          f"({', '.join(f'{m}.csv' for m in CURVES)})")


if __name__ == "__main__":
    run(main)
