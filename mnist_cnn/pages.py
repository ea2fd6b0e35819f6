"""The report's two renderings of the same facts (facts.py): report.md and a self-contained report.html
(images embedded, so it opens offline in any browser), and the training curves as CSV for `dvc plots`."""

import base64
import html
import io

import numpy as np

from mnist_cnn import IMAGE_SHAPE, N_CLASSES
from mnist_cnn.facts import PROCEDURES, SEED_FIGURES
from mnist_cnn.params import SCALERS
from mnist_cnn.tables import LAYER_COLUMNS, layer_rows
from mnist_cnn.tables import markdown_table as table


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


def render_markdown(facts):
    """report.md: the facts as Markdown tables."""
    params, data, model, runs = facts.params, facts.data, facts.model, facts.runs
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
           f"- inputs {SCALERS[params['preprocess'].scaler]}, shaped (N, {', '.join(map(str, IMAGE_SHAPE))}), "
           f"float32", "",
           "## Model", "", table(LAYER_COLUMNS, layer_rows(model["layer_table"], bold_total=True)), "",
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
                  for d, (t, *_) in runs.items()]),
           "", "CPU time counts all the process's threads: on a shared host, a fit whose cores were taken "
               "away shows fewer cores busy and a longer fit time for the same CPU time."]
    if set(runs) == {"cpu", "gpu"}:
        speedup = runs["cpu"].train["fit_time_s"] / runs["gpu"].train["fit_time_s"]
        out += ["", f"The GPU fit was {speedup:.1f}x as fast as the CPU fit."]
    cpu_names = {run.train["cpu_model"] for run in runs.values()}
    out += ["", f"CPU: {', '.join(sorted(cpu_names))}.", "", "## Test metrics", ""]
    for device, (_, ev, conf, *_) in runs.items():
        test = ev["test"]
        out += [f"### {device} model", "",
                f"Test accuracy **{test['accuracy']:.2%}**, loss {test['loss']:.4f}, "
                f"{test['errors']} errors in {test['images']:,} images.", "",
                table(["digit", "precision", "recall"],
                      [[d, f"{c['precision']:.4f}", f"{c['recall']:.4f}"] for d, c in ev["per_class"].items()]),
                "", "Confusion matrix (rows: true digit, columns: predicted):", "",
                table(["true \\ predicted"] + [str(d) for d in range(N_CLASSES)],
                      [[d] + list(conf[d]) for d in range(N_CLASSES)]), ""]
    ours = [[f"ours, {d}", f"{ev['test']['accuracy']:.2%}", f"{t['fit_time_s']:.1f} s", t["device_name"]]
            for d, (t, ev, *_) in runs.items()]
    out += ["## Beside the seed notebook", "",
            table(["run", "test accuracy", f"fit time, {train.epochs} epochs", "device"],
                  [["seed (published, 5 epochs)", f"{SEED_FIGURES['test_accuracy']:.1%}",
                    f"{SEED_FIGURES['fit_time_s']} s", SEED_FIGURES["device_name"]]] + ours), ""]
    return "\n".join(out)


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
    for t in range(N_CLASSES):
        for p in range(N_CLASSES):
            if conf[t, p]:
                ax.text(p, t, conf[t, p], ha="center", va="center", fontsize=7,
                        color="white" if t == p else "black")
    ax.set(xticks=range(N_CLASSES), yticks=range(N_CLASSES), xlabel="predicted", ylabel="true",
           title=f"Confusion matrix, test set ({device})")
    fig.tight_layout()
    return fig


def fit_time_figure(runs):
    import matplotlib.pyplot as plt
    names = [f"{d}\n{t['device_name'][:30]}" for d, (t, *_) in runs.items()] + ["seed\nGTX 960"]
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


def render_html(facts):
    """report.html: the same facts, with figures, in one self-contained page."""
    import matplotlib
    matplotlib.use("Agg")
    params, data, model, runs = facts.params, facts.data, facts.model, facts.runs
    train, esc = params["train"], html.escape
    if data["full_mnist"]:
        banner = (f'<p class="ok">Data: full MNIST, {data["train_images"]:,} training and '
                  f'{data["test_images"]:,} test images (source: {esc(data["source"])}).</p>')
    else:
        banner = (f'<p class="warn">WARNING: trained on the {data["train_images"] + data["test_images"]:,}-image '
                  f"SAMPLE of MNIST, not the full data set. Figures are not comparable with the seed's. "
                  f"Provide the data (see README) and run <code>dvc repro -f fetch &amp;&amp; dvc repro</code>.</p>")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>MNIST CNN report</title>"
             f"<style>{CSS}</style></head><body><h1>MNIST CNN: training report</h1>", banner,
             html_table(["provenance", ""], facts.provenance, cls="text"), "<h2>Our numbers beside the seed's</h2>",
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
              f"</code>; preprocessing <code>{esc(params['preprocess'].procedure)}</code>, inputs "
              f"{esc(SCALERS[params['preprocess'].scaler])}.</p>",
              html_table(LAYER_COLUMNS, layer_rows(model["layer_table"])),
              "<h3>Training settings</h3>",
              html_table(["setting", "value"], [[k, v] for k, v in train.model_dump().items()
                                                if k not in ("cpu", "gpu")], cls="text")]
    for device, (t, ev, conf, curves, mistakes) in runs.items():  # a facts.Run each
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
