"""compare: what a change did to a run, as a Markdown report to read or post on a pull request.

    python -m tools.compare [BASE] [TARGET] [--out change-report]

BASE and TARGET are each a git commit or branch, an experiment's name (as `dvc exp show` lists it), or
`workspace` (TARGET only: the files as they are now). BASE defaults to HEAD and TARGET to the workspace, so
with no arguments the report is of what was run since the last commit; `python -m tools.compare main
epochs3` is the experiment epochs3 against main.

OUT/report.md holds, for both sides: where each run comes from (the code's commit, the data, and per device
the CPU, its vector units, the precision and the libraries), the params that differ (`dvc params diff`), every
headline metric with its change (`dvc metrics diff`, one row per device's numbers), and as PNG files beside
it the charts that `dvc plots diff` draws (loss, accuracy, learning rate and time per epoch of both runs
overlaid, the confusion matrix of each run's model per device) and each run's most confident mistakes. The
charts are drawn by Vega-Lite in-process (vl-convert): no browser, no network. A side whose details are not
in this clone's DVC cache (a commit cloned but never pulled) says so, and shows what git holds of it: the
headline metrics, the curves, the predictions and the report's own lines. The folder is written whole or
not at all.
"""

import argparse
import functools
import hashlib
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


from mnist_cnn.dvc_commands import dvc, dvc_json, lock_outs
from mnist_cnn.errors import UserError
from mnist_cnn.files import atomic_path, read_json, to_json
from mnist_cnn.stage import run

WORKSPACE = "workspace"
DETAILS = "details/{stage}.json"  # what a stage recorded beside its metrics: in DVC's cache, not in git
# The lines of a run's report.md (in git) that say where it ran, for a side whose details are not cached.
REPORT_PROVENANCE = re.compile(r"^(Data: |CPU: |\| ours, )")


@dataclass(frozen=True)
class Side:
    name: str  # as the user wrote it, and as DVC labels its charts
    commit: str | None  # None: the workspace
    code: str  # where its code comes from, in words


def git(*args, check=True):
    result = subprocess.run(["git", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise UserError(f"`git {' '.join(args)}` failed: {' '.join(result.stderr.split()) or 'no message'}")
    return result.stdout.strip() if result.returncode == 0 else None


def experiment_refs(name):
    """The git refs of the experiments called `name` (refs/exps/<baseline>/<name>), newest first."""
    listed = git("for-each-ref", "--sort=-committerdate", "--format=%(refname)", "refs/exps", check=False) or ""
    return [ref for ref in listed.splitlines() if ref.rsplit("/", 1)[-1] == name and ref.count("/") >= 4]


def resolve(name, target=False):
    """A Side from what the user named: the workspace, an experiment or a commit (a branch, a tag, HEAD~1)."""
    head = git("rev-parse", "--verify", "-q", "HEAD^{commit}", check=False)
    if name == WORKSPACE:
        if not target:
            raise UserError("the base must be a commit or an experiment: the workspace can only be the target")
        changed = (git("status", "--porcelain", "--untracked-files=no", check=False) or "").splitlines()
        over = f"over {describe(head)}" if head else "(no commit yet)"
        stale = sorted(dvc_json("status"))
        return Side(name, None, f"the workspace {over}" + (f", {len(changed)} tracked file(s) changed"
                                                              if changed else ", no tracked file changed")
                    + (f"; OUT OF DATE: its outputs are not from its params and code (`dvc status`: "
                       f"{', '.join(stale)}); `dvc repro` first" if stale else ""))
    refs = experiment_refs(name)
    commit = git("rev-parse", "--verify", "-q", f"{name}^{{commit}}", check=False)
    if commit and refs:  # DVC would take the commit, we the experiment: say so rather than mix the two
        raise UserError(f"{name!r} names both a commit (or branch) and an experiment: give the commit's hash, or "
                        f"rename the experiment (`dvc exp rename {name} <new name>`)")
    if commit:
        return Side(name, commit, describe(commit))
    if refs:
        here = [ref for ref in refs if head and ref.split("/")[2] + ref.split("/")[3] == head]
        if len(refs) > 1 and not here:
            raise UserError(f"{len(refs)} experiments are called {name!r}, none from this commit: name one by its "
                            f"commit (`dvc exp show -A --sha` lists them)")
        commit = git("rev-parse", (here or refs)[0])
        return Side(name, commit, f"experiment {name}, from {describe(commit + '^')}")
    raise UserError(f"{name!r} is neither a commit, a branch nor an experiment here (`git log --oneline` and "
                    f"`dvc exp show` list them)")


def describe(rev, limit=60):
    """A commit as `abc1234 (its subject)`, the subject cut to `limit` characters."""
    found = git("log", "-1", "--format=%h %s", rev, check=False)
    if not found:
        return rev
    sha, subject = (found.split(" ", 1) + [""])[:2]
    return f"{sha} ({subject if len(subject) <= limit else subject[:limit - 1] + '…'})"


def read_side(side, path):
    """The text of `path` as git holds it at the side's commit (the workspace: on disk); None where absent."""
    if side.commit is None:
        try:
            return Path(path).read_text()
        except (OSError, UnicodeDecodeError):
            return None
    return git("show", f"{side.commit}:{path}", check=False)


@functools.cache  # read once per side: provenance asks for each stage's detail
def locked_outs(side):
    """{output path: its md5} for every output the side's dvc.lock names; {} without one."""
    return lock_outs(read_side(side, "dvc.lock"))


def cached_details(side, stage, cache):
    """(what a stage recorded at that side, None) or (None, why it is not here)."""
    path = DETAILS.format(stage=stage)
    if side.commit is None:
        try:
            found = read_json(path)
        except UserError:
            return None, f"{path} is not in the workspace (`dvc checkout` or `dvc repro` puts it there)"
        return (found, None) if isinstance(found, dict) and found else (None, f"{path} holds nothing")
    md5 = locked_outs(side).get(path)
    if not md5:
        return None, f"{path} is not in that commit's dvc.lock"
    cached = Path(cache) / md5[:2] / md5[2:]
    if not cached.is_file():
        how = f"`dvc exp pull <remote> {side.name}`" if side.code.startswith("experiment") else "`dvc pull`"
        return None, f"{path} of {side.name} is not in this clone's DVC cache ({how} fetches it)"
    data = cached.read_bytes()
    if hashlib.md5(data).hexdigest() != md5:
        return None, (f"{path} of {side.name} is damaged in DVC's cache (its hash is not the one dvc.lock names; "
                      f"`dvc pull -f` fetches it again)")
    try:
        found = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None, f"{path} of {side.name} is not JSON in DVC's cache"
    return (found, None) if isinstance(found, dict) and found else (None, f"{path} of {side.name} holds nothing")


def devices_of(side):
    """The devices the side trained on: its train@<device> stages, in dvc.lock's order."""
    return [path.split("_", 1)[1].removesuffix(".json") for path in locked_outs(side)
            if path.startswith("details/train_")]


def report_line(line):
    """A line of report.md as a cell shows it: a table row's cells joined ("ours, cpu: 99.10%, 115.2 s, ...")."""
    line = line.strip()
    if not line.startswith("|"):
        return line
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    return f"{cells[0]}: {', '.join(cells[1:])}"


def provenance(side, cache):
    """[(what, for this side)]: code, data, and per device its CPU, precision and libraries; and, where DVC's
    cache lacks a detail, why, and what git holds instead (the run's report's own lines)."""
    rows = [("code", side.code)]
    missing = []
    data, why = cached_details(side, "data", cache)
    if data:
        images = data.get("train_images")
        rows.append(("data", f"{'full MNIST' if data.get('full_mnist') else 'the 7,000-image SAMPLE'} "
                             f"({f'{images:,}' if isinstance(images, int) else '?'} training images; "
                             f"source {data.get('source')})"))
    else:
        missing.append(why)
        headline = read_side(side, "metrics/data.json")
        full = re.search(r'"full_mnist":\s*(true|false)', headline or "")
        rows.append(("data", {"true": "full MNIST", "false": "the 7,000-image SAMPLE", None: "not recorded"}[
            full and full.group(1)] + " (from metrics/data.json in git)"))
    for device in devices_of(side):
        train, why = cached_details(side, f"train_{device}", cache)
        if not train:
            missing.append(why)
            continue
        features = ", ".join(train.get("cpu_features") or []) or "none of AVX2, AVX-512, AMX"
        rows.append((f"train@{device}", f"{train.get('device_name')} on {train.get('cpu_model')} ({features}); "
                                        f"{train.get('precision')}; {train.get('backend')} "
                                        f"{train.get('backend_version')}, Keras {train.get('keras_version')}"))
    if missing:
        rows.append(("not here", "; ".join(missing)))
        kept = [report_line(line) for line in (read_side(side, "reports/report.md") or "").splitlines()
                if REPORT_PROVENANCE.match(line)]
        rows.append(("its report (git)", " / ".join(kept) if kept else "no reports/report.md at that side"))
    return rows


def number(value):
    """A metric as the table shows it: up to 5 significant digits; booleans and text as they are."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-" if value is None else str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.5g}"


def change(old, new):
    if isinstance(old, bool) or isinstance(new, bool) or not all(isinstance(v, int | float) for v in (old, new)):
        return "" if old == new else "changed"
    diff = new - old
    if diff == 0:
        return "="
    relative = f" ({diff / abs(old):+.1%})" if old else ""
    return f"{diff:+.4g}{relative}"


def cell(text):
    """Text safe in a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(header, rows):
    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(cell, row)) + " |" for row in rows]


def params_rows(diff):
    """`dvc params diff --json` -> [(param, old, new)], the file named where it is not params.yaml."""
    return [(key if file == "params.yaml" else f"{file}: {key}", to_json(values.get("old")),
             to_json(values.get("new"))) for file, keys in sorted(diff.items()) for key, values in sorted(keys.items())]


def metrics_rows(diff):
    """`dvc metrics diff --all --json` -> [(file, metric, old, new, change)], a device's numbers in its own row."""
    return [(file, key, number(values.get("old")), number(values.get("new")), change(values.get("old"),
                                                                                   values.get("new")))
            for file, keys in sorted(diff.items()) for key, values in sorted(keys.items())]


def chart_name(plot_id):
    """A PNG's file name for a plot: reports/curves/loss.csv -> loss.png, plots/predictions_cpu.csv ->
    predictions_cpu.png."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(plot_id).stem) + ".png"


def title_of(spec, plot_id):
    title = spec.get("title")
    title = title.get("text") if isinstance(title, dict) else title
    return str(title or plot_id)


def render(plots, into):
    """Every vega chart of `dvc plots diff --json` as a PNG in `into`: [(title, file name, revisions)]; the
    image plots (mistakes) as [(plot id, revision, file name)], copied in from DVC's output."""
    import vl_convert

    charts, images = [], []
    for plot_id, entries in plots.items():
        if plot_id.startswith("live"):  # a running train's copy: not a run's result
            continue
        for entry in entries:
            if entry.get("type") == "vega":
                name = chart_name(plot_id)
                try:
                    (into / name).write_bytes(vl_convert.vegalite_to_png(entry["content"], scale=1.5))
                except (ValueError, RuntimeError) as err:  # vl-convert's errors for a spec it cannot draw
                    raise UserError(f"the chart of {plot_id} could not be drawn: {str(err)[:200]}") from None
                charts.append((title_of(entry["content"], plot_id), name, entry.get("revisions") or []))
            elif entry.get("type") == "image" and entry.get("url") and Path(entry["url"]).is_file():
                rev = (entry.get("revisions") or ["?"])[0]
                name = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', rev)}_{Path(plot_id).name}"
                shutil.copyfile(entry["url"], into / name)
                images.append((plot_id, rev, name))
    return charts, images


def markdown(base, target, params, metrics, charts, images, errors, cache):
    """The report, from the diffs DVC gave and the charts drawn."""
    lines = [f"# What `{target.name}` changed against `{base.name}`", "",
             f"Made by `python -m tools.compare {base.name} {target.name}`: params and metrics by `dvc params diff` "
             f"and `dvc metrics diff`, charts by `dvc plots diff` drawn offline.", "", "## Where each run comes from",
             ""]
    left, right = dict(provenance(base, cache)), dict(provenance(target, cache))
    keys = list(dict.fromkeys([*left, *right]))
    lines += table(["", f"base: {base.name}", f"target: {target.name}"],
                   [(key, left.get(key, "-"), right.get(key, "-")) for key in keys])
    lines += ["", "## Params that differ", ""]
    lines += table(["param", base.name, target.name], params_rows(params)) if params else ["None: the same params."]
    lines += ["", "## Metrics", ""]
    lines += (table(["file", "metric", base.name, target.name, "change"], metrics_rows(metrics)) if metrics
              else ["Neither side has metrics (run `dvc repro` first)."])
    if charts:
        lines += ["", "## Charts", "", "Both runs in each chart (the curves overlaid, each run's series in a "
                                       "colour of its own; a confusion matrix per run side by side).", ""]
        for title, name, revisions in charts:
            lines += [f"### {title}", "", f"![{title}: {', '.join(revisions)}]({name})", ""]
    if images:
        lines += ["## The most confident mistakes", ""]
        for plot_id in dict.fromkeys(plot for plot, _, _ in images):
            drawn = {rev: name for plot, rev, name in images if plot == plot_id}
            lines += table([f"{side.name}: `{plot_id}`" for side in (base, target)],
                           [[f"![{side.name}]({drawn[side.name]})" if side.name in drawn else "not at this side"
                             for side in (base, target)]]) + [""]
    if errors:
        lines += ["## Not drawn", ""] + [f"- {error}" for error in errors]
    return "\n".join(lines).rstrip() + "\n"


def plot_errors(shown):
    """DVC's errors for plots it could not read at a side, one line each."""
    found = []
    for plot_id, by_rev in (shown.get("errors") or {}).items() if isinstance(shown.get("errors"), dict) else []:
        for rev, error in (by_rev.items() if isinstance(by_rev, dict) else [("?", by_rev)]):
            found.append(f"`{plot_id}` at {rev}: {error}")
    for error in shown.get("errors") or [] if isinstance(shown.get("errors"), list) else []:
        found.append(f"{error.get('name', '')} at {error.get('rev', '?')}: {error.get('msg', error)}")
    return found


def check_out_folder(out):
    """The report's folder is replaced whole: refuse anything there but an earlier report (or nothing)."""
    if not out.exists() and not out.is_symlink():
        return
    report = out / "report.md"
    ours = out.is_dir() and not out.is_symlink() and (
        not any(out.iterdir()) or (report.is_file() and report.read_text(errors="replace").startswith("# What `")))
    if not ours:
        raise UserError(f"{out} exists and is not a change report's folder: it would be replaced; "
                        f"name another with --out")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", nargs="?", default="HEAD", help="a commit, branch or experiment (default: HEAD)")
    parser.add_argument("target", nargs="?", default=WORKSPACE,
                        help="a commit, branch or experiment, or `workspace` (the default)")
    parser.add_argument("--out", type=Path, default=Path("change-report"),
                        help="the folder to write report.md and its PNGs into (default: change-report)")
    args = parser.parse_args(argv)
    if git("rev-parse", "--is-inside-work-tree", check=False) != "true" or not Path("dvc.yaml").is_file():
        raise UserError("run it in the project's root (where dvc.yaml is), in a git clone")
    base, target = resolve(args.base), resolve(args.target, target=True)
    if base.commit == target.commit:
        raise UserError(f"{base.name} and {target.name} are the same commit: nothing to compare")
    check_out_folder(args.out)
    revs = [base.name] + ([] if target.commit is None else [target.name])
    cache = Path(dvc("cache", "dir").stdout.strip()) / "files" / "md5"
    params = dvc_json("params", "diff", *revs)
    metrics = dvc_json("metrics", "diff", *revs, "--all")
    with tempfile.TemporaryDirectory() as drawn, atomic_path(args.out) as out:
        shown = dvc_json("plots", "diff", *revs, "-o", drawn)
        out.mkdir()
        charts, images = render(shown.get("data") or {}, out)
        report = markdown(base, target, params, metrics, charts, images, plot_errors(shown), cache)
        (out / "report.md").write_text(report)
    print(f"wrote {args.out / 'report.md'}: {len(params.get('params.yaml', {}))} param(s) differ, "
          f"{sum(map(len, metrics.values()))} metric(s), {len(charts)} chart(s), {len(images)} picture(s) of mistakes")


if __name__ == "__main__":
    run(main)
