"""report: what was run, on which data, and how it did, as Markdown and as one HTML page.

    python -m stages.report --details details --plots plots --live dvclive --out reports --curves reports/curves

Reads the details, per-epoch logs and predictions of every device in
train.devices and the params (mnist_cnn.facts gathers them once), and sets
our figures beside the seed notebook's published ones. report.md and
report.html render the same facts (mnist_cnn.pages); report.html is
self-contained (images embedded), so it opens offline in any browser.
--curves gets one CSV per training curve (loss, accuracy, learning rate,
epoch time), every device and split in one file, so that `dvc plots` draws
one chart per curve whichever devices ran and whether or not validation did.
"""

import argparse
from pathlib import Path

from mnist_cnn.facts import gather
from mnist_cnn.files import atomic_path
from mnist_cnn.pages import CURVES, curve_rows, curves_csv, render_html, render_markdown
from mnist_cnn.params import (PARAMS_FILE, BaseParams, ModelParams, PreprocessParams, TrainParams, check_train,
                              load_params)
from mnist_cnn.stage import run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--details", type=Path, required=True, help="folder of the stages' details")
    parser.add_argument("--plots", type=Path, required=True, help="folder of evaluate's predictions and images")
    parser.add_argument("--live", type=Path, required=True, help="folder of train's DVCLive logs")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md and report.html")
    parser.add_argument("--curves", type=Path, required=True, help="folder for the training curves' CSVs")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    args = parser.parse_args(argv)
    params = load_params(args.params, base=BaseParams, preprocess=PreprocessParams,
                         model=ModelParams, train=TrainParams)
    check_train(params["train"], params["base"].backend)

    facts = gather(params, args.details, args.plots, args.live)
    markdown, page = render_markdown(facts), render_html(facts)
    args.out.mkdir(parents=True, exist_ok=True)
    with (atomic_path(args.out / "report.md") as md, atomic_path(args.out / "report.html") as page_file,
          atomic_path(args.curves) as curves):
        md.write_text(markdown)
        page_file.write_text(page)
        curves.mkdir()
        for metric in CURVES:
            rows = curve_rows({device: run.curves for device, run in facts.runs.items()}, metric)
            (curves / f"{metric}.csv").write_text(curves_csv(rows, metric))
    print(f"wrote {args.out / 'report.md'}, {args.out / 'report.html'} and {args.curves}/ "
          f"({', '.join(f'{m}.csv' for m in CURVES)})")


if __name__ == "__main__":
    run(main)
