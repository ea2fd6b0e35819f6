"""DVC's command line as the tools drive it (`python -m dvc`, this interpreter's DVC): run it, read its JSON,
say why it failed; a value as `-S key=value` writes it; the git work tree an experiment runs in. Not imported
by any stage: a stage is what DVC runs, never what runs DVC."""

import json
import re
import subprocess
import sys

from mnist_cnn.errors import UserError


def reason(output):
    """The line that says why a run failed: a stage's own `error:` line, else DVC's last ERROR line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("error:")]
    theirs = [line for line in lines if line.startswith("ERROR")]
    return (ours or theirs or lines or ["no output"])[-1]


def dvc(*args, check=True, cwd=None):
    """`dvc args`, its output captured; a UserError with DVC's reason when it fails (unless check=False)."""
    result = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True, cwd=cwd)
    if check and result.returncode != 0:
        raise UserError(f"`dvc {' '.join(args)}` failed: {reason(result.stderr + result.stdout)}")
    return result


def dvc_json(*args, cwd=None):
    """The JSON a `dvc ... --json` command prints, or a UserError with DVC's message."""
    shown = subprocess.run([sys.executable, "-m", "dvc", *args, "--json"], capture_output=True, text=True, cwd=cwd)
    if shown.returncode != 0:
        raise UserError(f"`dvc {' '.join(args)} --json` failed: {' '.join(shown.stderr.split()) or 'no message'}")
    return json.loads(shown.stdout)


def run_shown(*args):
    """`dvc args`, its output shown as it comes; (exit status, the output's last 200 lines). Stopped with this
    process (a signal, Ctrl-C): DVC then stops its stage, rather than going on to write the workspace under a
    tool that has gone."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    seen = []
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            seen.append(line)
            del seen[:-200]
        return proc.wait(), "".join(seen)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def lock_outs(text):
    """{output path: its md5} for every output a dvc.lock's text names; {} for no text or a damaged lock."""
    import yaml

    try:
        stages = (yaml.safe_load(text or "") or {}).get("stages") or {}
        return {out["path"]: out.get("md5") for stage in stages.values() for out in stage.get("outs") or []}
    except (yaml.YAMLError, AttributeError, KeyError, TypeError):
        return {}


def value_text(value):
    """A value as `-S key=value` writes it: true, 0.004, 16, cosine. DVC parses it with Hydra's override
    grammar, in which `a,b` is a sweep and `true` a boolean: a string that would not come back as itself is
    quoted ("a,b", "true")."""
    if not isinstance(value, str):
        return json.dumps(value)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        override = OverridesParser.create().parse_overrides([f"key={value}"])[0]
        if not override.is_sweep_override() and override.value() == value:
            return value
    except Exception:  # noqa: BLE001 - Hydra's parse error: quoted below
        pass
    return json.dumps(value)


NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def is_ref_name(name):
    """A name git takes as a ref's last part: NAME's characters, no '..', not ending in '.' or '.lock'."""
    return bool(NAME.match(name)) and ".." not in name and not name.endswith((".", ".lock"))


def changed_files():
    """The files git tracks that differ from the commit (None where this is not a git work tree)."""
    result = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return None if result.returncode else [line[3:] for line in result.stdout.splitlines()]


def back_to_the_commit():
    """The files git tracks as the commit has them: an experiment run in the workspace leaves its own."""
    subprocess.run(["git", "checkout", "-q", "HEAD", "--", "."], check=True)
