"""DVC's command line as the tools drive it (`python -m dvc`, this interpreter's DVC): run, read its JSON, say
why it failed. Not imported by any stage: a stage is what DVC runs, never what runs DVC.
"""

import json
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
    """`dvc args`, its output shown as it comes; (exit status, the output's last 200 lines)."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    seen = []
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        seen.append(line)
        del seen[:-200]
    return proc.wait(), "".join(seen)
