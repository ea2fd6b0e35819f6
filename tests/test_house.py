"""The layout holds: stages/ is the DAG, one package beneath it, imports run one way, dvc.yaml's code deps are
exactly what each stage imports, and every private-API shim lives in mnist_cnn/backend.py."""

import ast
import re

import pytest
import yaml

from tests.conftest import ROOT

PACKAGE, STAGES, TOOLS, BENCH = "mnist_cnn", "stages", "tools", "bench"
STAGE_LINES = 200  # a stage is a short main() over the package: reading it shows the steps, not their bodies


def python_files(folder):
    return sorted((ROOT / folder).glob("*.py"))


def imported(path):
    """Every module `path` imports, at the top or inside a function: ["mnist_cnn.params", "numpy", ...].

    `from mnist_cnn import files` counts as mnist_cnn.files (a module of the package), `from mnist_cnn import
    SIDE` as mnist_cnn itself.
    """
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append(node.module)
            top = node.module.split(".")[0]
            found += [f"{node.module}.{alias.name}" for alias in node.names
                      if (ROOT / top / f"{alias.name}.py").is_file() and node.module == top]
    return found


def package_closure(path):
    """The files of mnist_cnn/ that running `path` loads: what it imports of the package, and what those import."""
    seen, todo = set(), [path]
    while todo:
        for module in imported(todo.pop()):
            parts = module.split(".")
            if parts[0] != PACKAGE:
                continue
            for name in {"__init__", *parts[1:2]}:
                file = ROOT / PACKAGE / f"{name}.py"
                if file.is_file() and file not in seen:
                    seen.add(file)
                    todo.append(file)
    return {file.relative_to(ROOT).as_posix() for file in seen}


def dvc_stages():
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_stages_holds_exactly_what_dvc_yaml_runs_each_short():
    scripts = {path.stem for path in python_files(STAGES)} - {"__init__"}
    assert scripts == set(dvc_stages())
    for name in scripts:
        lines = len((ROOT / STAGES / f"{name}.py").read_text().splitlines())
        assert lines <= STAGE_LINES, f"stages/{name}.py is {lines} lines: move what it shares into {PACKAGE}/"


@pytest.mark.parametrize("folder, may_import", [
    (STAGES, {PACKAGE}),         # a stage imports the package, never another stage
    (TOOLS, {PACKAGE}),          # so does a tool
    (BENCH, {PACKAGE, BENCH}),   # a benchmark may share bench's helpers
    (PACKAGE, {PACKAGE}),        # the package imports nothing above it
])
def test_imports_run_one_way(folder, may_import):
    ours = {PACKAGE, STAGES, TOOLS, BENCH, "tests"}
    for path in python_files(folder):
        for module in imported(path):
            top = module.split(".")[0]
            assert top not in ours - may_import, f"{path.relative_to(ROOT)} imports {module}"


def test_the_package_has_no_import_cycle():
    graph = {path.stem: {m.split(".")[1] for m in imported(path) if m.startswith(PACKAGE + ".")}
             for path in python_files(PACKAGE)}
    done, visiting = set(), []

    def visit(module):
        assert module not in visiting, f"import cycle: {' -> '.join(visiting[visiting.index(module):] + [module])}"
        if module in done:
            return
        visiting.append(module)
        for other in graph.get(module, ()):
            visit(other)
        visiting.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_each_stage_depends_on_exactly_the_code_it_runs():
    """dvc.yaml lists, of the code, a stage's script, stages/__init__.py (run first by `python -m`) and the
    modules of the package it loads: a missing one would leave a stale result after an edit, an extra one
    rerun a stage for nothing (report does not rerun when the fit loop changes)."""
    for name, stage in dvc_stages().items():
        deps = {dep for dep in stage.get("do", stage)["deps"] if dep.endswith(".py")}
        script = ROOT / STAGES / f"{name}.py"
        want = {f"{STAGES}/{name}.py", f"{STAGES}/__init__.py"} | package_closure(script)
        assert deps == want, (f"{name}: dvc.yaml lists {sorted(deps - want)}, which it does not run, and lacks "
                              f"{sorted(want - deps)}")
    assert f"{PACKAGE}/training.py" not in dvc_stages()["report"]["deps"]


def test_no_script_edits_sys_path():
    for folder in (STAGES, TOOLS, BENCH, PACKAGE):
        for path in python_files(folder):
            assert "sys.path" not in path.read_text(), f"{path.relative_to(ROOT)}: run it with `python -m`"


# What reaches into a framework's private parts: Keras's internals, TensorFlow's, the import system's marker
PRIVATE = re.compile(r"keras\.src|tensorflow\.python|_pywrap|sys\.modules\[[^]]+\] = None")


def test_every_private_api_shim_is_in_the_backend_module():
    for folder in (STAGES, TOOLS, BENCH, PACKAGE):
        for path in python_files(folder):
            if path == ROOT / PACKAGE / "backend.py":
                continue
            hits = [line.strip() for line in path.read_text().splitlines() if PRIVATE.search(line)]
            assert not hits, f"{path.relative_to(ROOT)} reaches into a private API: {hits[0]}"
    assert len(PRIVATE.findall((ROOT / PACKAGE / "backend.py").read_text())) >= 3


def test_one_source_for_mnists_shape_and_classes():
    """28 and 10 are written once, in mnist_cnn/__init__.py; code elsewhere names them (SIDE, N_CLASSES)."""
    for folder in (STAGES, PACKAGE):
        for path in python_files(folder):
            if path.name == "__init__.py":
                continue
            tree = ast.parse(path.read_text())
            docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                          if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                          and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
            for node in ast.walk(tree):
                if (isinstance(node, ast.Constant) and type(node.value) is int and node.value in (28, 10)
                        and id(node) not in docstrings and is_shape_or_classes(path, node)):
                    pytest.fail(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value} written out; "
                                f"use mnist_cnn.SIDE or N_CLASSES")


def is_shape_or_classes(path, node):
    """28 is always MNIST's side; 10 is the class count unless it is another quantity (a timeout, a limit)."""
    line = path.read_text().splitlines()[node.lineno - 1]
    if node.value == 28:
        return True
    return bool(re.search(r"\b(digits?|classes|to_categorical|zeros\(\(10|range\(10\))", line))


def jsonc(path):
    """A JSON-with-comments file (devcontainer.json, VS Code's files): its // lines dropped, then parsed."""
    import json

    return json.loads("\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("//")))


def test_the_dev_container_sets_up_as_the_readme_says():
    """The README's "To work on the project" block, the dev container's set-up and CI's packages agree, and the
    editor recommendations are the container's."""
    import shlex

    from tests.test_readme import blocks

    readme = [block for kind, text, block in blocks(ROOT / "README.md")
              if text and "test_the_dev_container_sets_up_as_the_readme_says" in text]
    assert len(readme) == 1
    steps = [shlex.split(step) for line in readme[0].splitlines() if line.strip() for step in line.split(" && ")]
    container = jsonc(ROOT / ".devcontainer" / "devcontainer.json")
    assert [shlex.split(step) for step in container["postCreateCommand"].split(" && ")] == steps
    assert ["pip", "install", "-r", "requirements.txt"] in steps

    def packages(words):  # what an `apt-get install` installs: the words after "install", less its options
        return {word for word in words[words.index("install") + 1:] if not word.startswith(("-", ">"))}

    wanted = packages(next(words for words in steps if words[:3] == ["sudo", "apt-get", "install"]))
    ci = (ROOT / ".ci" / "run").read_text().replace("\\\n", " ")  # continued lines joined
    ci_install = next(line for line in ci.splitlines() if "apt-get install" in line)
    assert packages(ci_install.split("&&")[-1].split()) == wanted, ci_install
    assert {"chromium", "openssh-server"} <= wanted
    editor = jsonc(ROOT / ".vscode" / "extensions.json")["recommendations"]
    assert editor == container["customizations"]["vscode"]["extensions"] and "Iterative.dvc" in editor
