"""The command blocks of the README and of docs/: each is run by a test (as written, or with the substitutions
its marker names), by .ci/run, or is marked as not run with the reason.

Each ```bash or ```python block has, on the line before it, `<!-- run: tests/FILE.py::TEST, ... -->`,
`<!-- run: .ci/run -->` or `<!-- not run: REASON -->`; this file checks the markers and runs the blocks
that no other test does.
"""

import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import DOCS, ROOT

FENCE = re.compile(r"^```(bash|python)\n(.*?)^```", re.M | re.S)
MARKER = re.compile(r"<!-- (run|not run): (.+?) -->\n$")


def blocks(path=None):
    """[(marker kind, marker text, block text)] of every bash or python block of `path` (default: README.md and
    every page of docs/), in order."""
    if path is None:
        return [found for page in DOCS for found in blocks(page)]
    text = path.read_text()
    found = []
    for match in FENCE.finditer(text):
        before = text[:match.start()]
        marker = MARKER.search(before[before.rfind("\n", 0, len(before) - 1) + 1:])
        found.append((marker.group(1), marker.group(2)) + (match.group(2),) if marker else (None, None,
                                                                                           match.group(2)))
    return found


def commands(block):
    return [shlex.split(line.split("  #")[0]) for line in block.splitlines() if line.strip() and line[0] != "#"]


def is_subsequence(words, line):
    it = iter(line)
    return all(word in it for word in words)


def test_every_readme_block_is_run_or_says_why_not():
    found = blocks()
    assert len(found) >= 20
    ci = [line.split() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    for kind, text, block in found:
        assert kind, f"a block without a run / not run marker:\n{block}"
        if kind == "not run":
            assert len(text) > 10, text  # a reason, not a shrug
            continue
        for target in re.split(r",\s*", re.sub(r" \(.*\)$", "", text)):
            if target == ".ci/run":
                for words in commands(block):  # each command, its words in order, in a line of .ci/run
                    assert any(is_subsequence(words, line) for line in ci), (words, ".ci/run")
                continue
            file, test = target.split("::")
            body = function_source(ROOT / file, test)
            assert body is not None, f"{target} does not exist"
            # the test reads its block from the README, or the marker says it writes the commands itself
            assert re.search(r"README|readme", body) or "as the test" in text, f"{target} does not read the README"


def function_source(path, name):
    """The source of the function `name` in `path` (None if there is none)."""
    import ast
    text = path.read_text()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_source_segment(text, node)
    return None


def test_a_block_without_a_marker_is_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- run: .ci/run -->\n```bash\npytest\n```\n\ntext\n\n```bash\ndvc repro\n```\n")
    assert [kind for kind, _, _ in blocks(page)] == ["run", None]


def test_predict_reads_the_example_photos_as_the_readme_says(trained, tmp_path):
    model = trained[0]
    block = next(block for kind, text, block in blocks() if "test_predict_reads_the_example_photos" in (text or ""))
    shutil.copytree(ROOT / "data" / "examples", tmp_path / "data" / "examples",
                    ignore=shutil.ignore_patterns("*.28x28.png"))
    line = block.split("  #")[0].strip() + f" --model {model}"
    result = subprocess.run(["bash", "-c", line.replace("python ", f"{sys.executable} ", 1)], cwd=tmp_path,
                            capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    answers = dict(re.findall(r"^data/examples/(\S+\.jpg): (\d)", result.stdout, flags=re.M))
    photos = sorted(p.name for p in (ROOT / "data" / "examples").glob("*.jpg"))
    assert sorted(answers) == photos
    assert all((tmp_path / "data" / "examples" / p.replace(".jpg", ".28x28.png")).is_file() for p in photos)
    # a model trained 2 epochs on the sample: most, not all, photos read right (the README's model reads all)
    assert sum(answers[p] == p[-5] for p in photos) >= len(photos) - 2, answers


ONE_LINE_EXPERIMENTS = [block for kind, text, block in blocks()
                        if "test_the_readmes_one_line_experiments_run_in_a_tiny_project" in (text or "")]


def tiny_network_with_the_blocks_it_sets(params_file, words):
    """The tiny network has two conv blocks; a command that sets a key of a third (the fast preset's conv3) gets
    a small third block to set it on, in the workspace's params.yaml, which `dvc exp run` takes as it is."""
    params = yaml.safe_load(params_file.read_text())
    blocks = params["model"]["conv_blocks"]
    for setting in [w for i, w in enumerate(words) if words[i - 1] == "-S" and w.startswith("model.conv_blocks.")]:
        name = setting.split(".")[2]
        blocks.setdefault(name, {"filters": 8, "kernel_size": 3, "activation": "relu", "pool_size": None})
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from tests.conftest import make_project
    return make_project(tmp_path_factory)


@pytest.mark.long
@pytest.mark.parametrize("block", ONE_LINE_EXPERIMENTS, ids=lambda b: b.split()[3].split("=")[0])
def test_the_readmes_one_line_experiments_run_in_a_tiny_project(project, block):
    from tests.conftest import dvc, dvc_env
    from tools import preset

    assert len(ONE_LINE_EXPERIMENTS) == 4

    try:
        for words in commands(block):
            if words[:3] == ["python", "-m", "tools.preset"]:  # a preset: the tool runs dvc exp run, as for a user
                name, options = words[3], words[4:]
                shutil.copy(ROOT / f"params-{name}.yaml", project)
                words = preset.command(name, preset.read_preset(ROOT, name), options)  # what the tool runs
                tiny_network_with_the_blocks_it_sets(project / "params.yaml", words)
                ran = subprocess.run([sys.executable, "-m", "tools.preset", name, *options], cwd=project,
                                     env=dvc_env(project), capture_output=True, text=True, timeout=600)
                assert ran.returncode == 0, ran.stderr
                assert ran.stderr.startswith(f"preset {name}: {' '.join(words)}\n"), ran.stderr
            else:
                assert words[:3] == ["dvc", "exp", "run"], words
                tiny_network_with_the_blocks_it_sets(project / "params.yaml", words)
                dvc(project, *words[1:])
            params = yaml.safe_load((project / "params.yaml").read_text())
            for setting in [w for i, w in enumerate(words) if words[i - 1] == "-S"]:
                key, value = setting.split("=", 1)
                node = params
                for part in key.split("."):
                    node = node[part]
                assert node == yaml.safe_load(value), setting  # the experiment's params, in the workspace
            metrics = yaml.safe_load((project / "metrics" / "evaluate_cpu.json").read_text())
            assert metrics["test"]["accuracy"] > 0.2
            subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=project, check=True)
    finally:
        subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=project, check=True)
        for copied in project.glob("params-*.yaml"):
            copied.unlink()
        dvc(project, "checkout", "-f")


def test_the_quick_starts_figures_are_the_recorded_runs():
    """Each row of the Quick start's table per CPU is a run of bench/results/default_runs.json, with its commit and
    date."""
    import json
    runs = json.loads((ROOT / "bench" / "results" / "default_runs.json").read_text())["runs"]
    quick = (ROOT / "README.md").read_text().split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in quick.splitlines() if line.startswith("| ") and "%" in line]
    assert len(rows) == len(runs)
    for row, run in zip(rows, runs, strict=True):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[0].startswith(run["cpu"]), (cells[0], run["cpu"])
        assert cells[1] == f"{run['test_accuracy'] * 100:.2f} %" and cells[2] == str(run["errors"])
        assert cells[5].startswith(f"{run['commit']}, {run['date']}")
        if run["fit_time_s"]:
            assert cells[4].startswith(f"{run['fit_time_s']:.1f} s")


def test_the_readme_is_short_and_every_link_of_it_and_docs_leads_somewhere():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300  # the manual is in docs/

    def slug(heading):
        return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")

    for page in DOCS:
        text = page.read_text()
        for target in re.findall(r"\]\((?!https?:)([^)\s]+)\)", text):
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.name}: {target}"
            if anchor:
                headings = {slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}
                assert anchor in headings, f"{page.name}: {target}"
