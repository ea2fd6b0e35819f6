"""experiments: the experiments table in a terminal's width: state, the params that differ, the headline metrics.

    python -m tools.experiments [--md] [--width N] [--fail] [any option of `dvc exp show`, e.g. -A]

Reads `dvc exp show --json` and prints one row per experiment (and the
workspace and the commit they came from): its name, its state (Success,
Failed, Queued, Running), the params whose values differ between the rows,
and the metrics of `dvc metrics show`: test accuracy and loss and fit time per
device, the weight count, whether the full MNIST was used. An experiment that
did not finish shows no metrics (DVC lists it with the numbers of the
workspace it was queued from) and, when it failed, the line under it gives the
one-line reason from its log. Nor does the workspace when `dvc status` finds
its outputs out of date (after `git checkout params.yaml`, say): its params
and its numbers would belong to different runs. The table fits the terminal
(120 columns in a log) whatever differs. --fail exits 1 when a listed
experiment failed: `dvc exp run --run-all` exits 0 even then. Not a pipeline
stage: a tool over DVC.
"""

import argparse
import json
import re
import shutil
import textwrap

from mnist_cnn.dvc_commands import dvc_json
from mnist_cnn.errors import UserError
from mnist_cnn.stage import run

FINISHED = ("Success", "")  # a finished experiment, the workspace and a commit have metrics of their own
STALE = "Changed"
STALE_NOTE = "the workspace's outputs are not from its params and code (`dvc status`); `dvc repro` updates them"
# Short labels for the headline metrics, in the order the table shows them; other metrics follow.
LABELS = {"test.accuracy": "acc", "test.loss": "loss", "fit_time_s": "fit s", "weights": "weights",
          "full_mnist": "full MNIST"}


def flatten(tree, prefix=""):
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def metric_columns(files):
    """{metrics file: {key: value}} -> {label: (value, key)}; metrics/evaluate_cpu.json's test.accuracy: 'cpu acc'.

    A device's metrics first and together, each group in LABELS's order; then the others.
    """
    columns = []
    for path, values in files.items():
        device = re.fullmatch(r".*/(?:train|evaluate)_(\w+)\.json", path)
        prefix = f"{device.group(1)} " if device else ""
        for key, value in flatten(values).items():
            rank = list(LABELS).index(key) if key in LABELS else len(LABELS)
            columns.append((not device, prefix, rank, prefix + LABELS.get(key, key), (value, key)))
    return {label: value for *_, label, value in sorted(columns, key=lambda column: column[:3])}


def state(rev, executor):
    """An experiment's state as DVC knows it: Success, Failed, Queued or Running."""
    if executor:
        return executor["state"].capitalize()
    return "Failed" if rev.get("error") else "Success"  # run in the workspace, or by a queue worker now gone


def failure_reason(executor):
    """The failed run's own one-line error (our stages print 'error: ...'), else DVC's last ERROR line."""
    log = ((executor or {}).get("local") or {}).get("log")
    try:
        lines = [line.strip() for line in open(log, encoding="utf-8", errors="replace")] if log else []
    except OSError:
        lines = []
    ours = [line for line in lines if line.startswith("error: ")]
    theirs = [line for line in lines if line.startswith("ERROR: ")]
    return (ours or theirs or ["the reason is in `dvc queue logs <name>`"])[-1]


def rows_from(show, workspace_changed=False):
    """`dvc exp show --json` -> [{"name", "state", "params", "metrics", "reason", "depth"}], in DVC's order.

    workspace_changed: `dvc status` found the workspace's outputs out of date.
    """
    rows = []

    def row(rev, name, executor, depth):
        data = rev.get("data") or {}
        params = flatten(((data.get("params") or {}).get("params.yaml") or {}).get("data") or {})
        metrics = metric_columns({path: (entry or {}).get("data") or {}
                                  for path, entry in (data.get("metrics") or {}).items()})
        status = state(rev, executor) if depth else (STALE if name == "workspace" and workspace_changed else "")
        rows.append({"name": name, "state": status, "params": params, "depth": depth,
                     "metrics": metrics if status in FINISHED else {},  # never another run's numbers
                     "reason": failure_reason(executor) if status == "Failed" else STALE_NOTE if status == STALE
                     else None})

    for baseline in show:
        rev = baseline["rev"]
        name = "workspace" if rev == "workspace" else f"{baseline.get('name') or 'commit'} ({rev[:7]})"
        row(baseline, name, None, 0)
        for experiment in baseline.get("experiments") or []:
            last = experiment["revs"][-1]
            row(last, experiment.get("name") or last.get("name") or last["rev"][:7], experiment.get("executor"), 1)
    return rows


def differing(rows):
    """The params whose values are not the same in every row, in params.yaml's order."""
    keys = list(dict.fromkeys(key for r in rows for key in r["params"]))
    return [key for key in keys if len({json.dumps(r["params"].get(key)) for r in rows}) > 1]


def param_cell(value):
    """A param as params.yaml writes it (what `-S key=value` takes)."""
    return "-" if value is None else json.dumps(value) if isinstance(value, bool | list) else str(value)


def metric_cell(value_and_key):
    value, key = value_and_key or (None, "")
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}" if key.endswith("_s") else f"{value:.4f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def short_names(keys):
    """Each dotted key by its last part, or as many last parts as make it unique among `keys`."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if sum(other.endswith(tail) and (other == tail or other.endswith("." + tail)) for other in keys) == 1:
                break
        names[key] = tail
    return names


def aligned(grid):
    widths = [max(len(str(c)) for c in column) for column in zip(*grid, strict=True)]
    return ["  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip() for cells in grid]


def table(rows, markdown=False, width=120):
    """The rows as a text table (or Markdown); a row's reason (failed, or out of date) on the line under it.

    Fits in `width` columns whatever differs: the params that differ are
    columns while they fit (named by the shortest unique end of their key),
    else each row's params go on a line of their own under it; and a table
    whose metrics alone are too wide becomes one block of `label value`
    lines per row.
    """
    params = differing(rows)
    metrics = list(dict.fromkeys(key for r in rows for key in r["metrics"]))
    names = [("  " * r["depth"]) + r["name"] if not markdown else r["name"] for r in rows]
    param_cells = [[param_cell(r["params"].get(k)) for k in params] for r in rows]
    metric_cells = [[metric_cell(r["metrics"].get(k)) for k in metrics] for r in rows]
    if markdown:
        header = ["Experiment", "State", *params, *metrics]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join([n, r["state"] or "-", *pc, *mc]) + " |"
                  for n, r, pc, mc in zip(names, rows, param_cells, metric_cells, strict=True)]
        reasons = [f"- **{r['name']}** {r['state'].lower()}: {r['reason']}" for r in rows if r["reason"]]
        return "\n".join(lines + ([""] + reasons if reasons else []))

    def under(text, lead="    └ "):
        return textwrap.wrap(text, width=width, initial_indent=lead, subsequent_indent=" " * len(lead))

    short = short_names(params)
    for layout in ("columns", "param lines", "blocks"):
        header = ["Experiment", "State", *([short[k] for k in params] if layout == "columns" else []), *metrics]
        grid = [header] + [[n, r["state"] or "-", *(pc if layout == "columns" else []), *mc]
                           for n, r, pc, mc in zip(names, rows, param_cells, metric_cells, strict=True)]
        lines = aligned(grid)
        if layout == "blocks" or max(map(len, lines)) <= width:
            break
    if layout == "blocks":  # even without the params, the metrics are wider than the terminal
        out = []
        for n, r, pc, mc in zip(names, rows, param_cells, metric_cells, strict=True):
            out.append(f"{n}  {r['state'] or '-'}")
            cells = [f"{short[k]}={v}" for k, v in zip(params, pc, strict=True)]
            cells += [f"{k}: {v}" for k, v in zip(metrics, mc, strict=True)]
            out += under(",  ".join(cells), lead="      ")
            out += under(r["reason"]) if r["reason"] else []
        return "\n".join(out)
    out = [lines[0]]
    for r, pc, line in zip(rows, param_cells, lines[1:], strict=True):
        out.append(line)
        if layout == "param lines" and params:
            out += under("  ".join(f"{short[k]}={v}" for k, v in zip(params, pc, strict=True)), lead="      ")
        if r["reason"]:
            out += under(r["reason"])
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--md", action="store_true", help="a Markdown table")
    parser.add_argument("--width", type=int, default=shutil.get_terminal_size((120, 24)).columns,
                        help="wrap failure reasons at this width (default: the terminal's)")
    parser.add_argument("--fail", action="store_true",
                        help="exit 1 when a listed experiment failed (`dvc exp run --run-all` exits 0 all the same)")
    args, dvc_args = parser.parse_known_args(argv)
    rows = rows_from(dvc_json("exp", "show", *dvc_args), workspace_changed=bool(dvc_json("status")))
    print(table(rows, markdown=args.md, width=args.width))
    failed = [r["name"] for r in rows if r["state"] == "Failed"]
    if args.fail and failed:
        raise UserError(f"{len(failed)} experiment(s) failed: {', '.join(failed)} (the reason under each above)")


if __name__ == "__main__":
    run(main)
