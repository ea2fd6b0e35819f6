"""What the stages share: params loading and checking, atomic writes, Keras set-up.

Kept small on purpose: anything only one stage needs lives in that stage.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import typing
from contextlib import contextmanager
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
PARAMS_FILE = "params.yaml"
SECTIONS = ("base", "fetch", "preprocess", "model", "train", "evaluate")
BACKENDS = ("tensorflow", "jax", "torch")


class UserError(Exception):
    """A problem the user can fix (bad params, missing data): one line, no traceback.

    One line whatever it quotes: line breaks in it become spaces.
    """

    restorable = True  # under DVC, the last good outputs are worth naming (restore_hint)

    def __init__(self, message):
        super().__init__(" ".join(str(message).splitlines()))


class Damaged(UserError):
    """A file a stage reads is not the one its stage wrote: the line gives the repair, and checking out the
    reading stage's last outputs would not help (DVC's cache may hold the damaged copy)."""

    restorable = False


def __getattr__(name):
    """Strict and BaseParams live in stages/schema.py, imported (with pydantic) only when a stage asks."""
    if name in ("Strict", "BaseParams"):
        from stages import schema

        return getattr(schema, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: unwind (temporary outputs are removed on the way) and exit.

    A BaseException, as KeyboardInterrupt is, so that no library's `except Exception` swallows it.
    """


_held = {"depth": 0, "pending": None}  # see signals_held


def _interrupt(signum, frame):
    if _held["depth"]:
        _held["pending"] = _held["pending"] or signal.Signals(signum)
        return
    raise Interrupted(signal.Signals(signum))


@contextmanager
def signals_held():
    """SIGINT and SIGTERM wait for the end of the block, then interrupt as usual.

    For the steps that must not be cut in two: creating a temporary folder and
    taking charge of it, the renames into place, the removal of a temporary.
    A flag read by run()'s handler, not pthread_sigmask: the mask holds a
    signal off one thread only, and the kernel hands a process's SIGTERM to
    any thread that does not block it (OpenBLAS's, TensorFlow's), whose
    handler then interrupts the main thread mid-step all the same.
    """
    _held["depth"] += 1
    try:
        yield
    finally:
        _held["depth"] -= 1
        pending = _held["pending"]
        if pending and not _held["depth"]:
            _held["pending"] = None
            raise Interrupted(pending)


def run(main):
    """Run a stage's main(): a UserError becomes one line on stderr and exit 1.

    SIGINT (Ctrl-C) and SIGTERM (`kill`, `timeout`, a CI cancel) end it with one
    line too, exit 128 + the signal's number, after the temporary outputs are
    removed (atomic_path's cleanup runs as the exception unwinds).
    """
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    stage = os.environ.get("DVC_STAGE")  # DVC names the stage it runs (dvc/stage/run.py)
    if stage:
        watch_dvc()
    quiet = QuietStderr()
    try:
        with quiet:
            main()
        # done and written: a signal from here on (Python's shutdown would die of it) changes nothing
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if "tensorflow" in sys.modules:
            quick_exit()
    except UserError as err:
        sys.exit(f"error: {err}{restore_hint(stage) if err.restorable else ''}")
    except Interrupted as err:
        signum = err.args[0]
        why = "dvc, which ran this stage, is gone" if _dvc_gone.is_set() else f"interrupted by {signum.name}"
        print(f"error: {why}; nothing half-written was left (run it again to finish){restore_hint(stage)}",
              file=sys.stderr)
        sys.exit(128 + signum)


def restore_hint(stage, lock="dvc.lock", cache=".dvc/cache/files/md5"):
    """How to get a stage's last good outputs back, for the end of its error line; "" outside DVC.

    DVC deletes a stage's outputs before it runs it and, when the run fails,
    leaves dvc.lock naming the last good ones: `dvc checkout` puts back those
    its cache holds, in a second, where a rerun would retrain; those kept in
    git instead (`cache: false`: metrics, plots, the report) come back with
    `git checkout`.
    """
    root = Path.cwd()  # DVC runs our stages in the project's root: a queued experiment's in its own copy
    if ".dvc/tmp/exps" in root.as_posix():  # (DVC_ROOT names the workspace there): the workspace lost nothing
        return ""
    outs = (locked_stages(root / lock).get(stage) or {}).get("outs") or [] if stage else []
    tracked = git_tracked(root, [out["path"] for out in outs])
    in_git = [out["path"] for out in outs if out["path"] in tracked]
    if not all(git_matches(root, out) for out in outs if out["path"] in tracked):
        in_git = []  # git holds another run's copy (this one's was never staged): it would not match dvc.lock
    cached = [out for out in outs if out["path"] not in tracked and in_cache(out, root / cache)]
    steps = ([f"dvc checkout {stage}"] if cached else []) + ([f"git checkout -- {' '.join(in_git)}"] if in_git else [])
    if not steps:
        return ""
    return f"; to get its last good outputs back: `{' && '.join(steps)}`"


def git_tracked(root, paths):
    """The paths (files, or folders holding tracked files) that git tracks in `root`; empty without git."""
    import subprocess

    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--", *paths], cwd=root, capture_output=True,
                                timeout=10).stdout.decode(errors="replace").split("\0")
    except (OSError, subprocess.SubprocessError):
        return set()
    return {path for path in paths if any(f == path or f.startswith(path.rstrip("/") + "/") for f in listed if f)}


def git_matches(root, out):
    """Whether git's staged copy of a file output is the one dvc.lock names (folders: not checked)."""
    import subprocess

    if str(out.get("md5", "")).endswith(".dir"):
        return True
    try:
        blob = subprocess.run(["git", "cat-file", "blob", f":{out['path']}"], cwd=root, capture_output=True,
                              timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return hashlib.md5(blob).hexdigest() == out.get("md5")


def in_cache(out, cache):
    md5 = str(out.get("md5", ""))
    return len(md5) > 2 and (Path(cache) / md5[:2] / md5[2:]).is_file()


def locked_stages(lock):
    """The stage names dvc.lock records (foreach stages as DVC addresses them: train@cpu); {} if none."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        return YAML(typ="safe").load(Path(lock).read_text()).get("stages") or {}
    except (OSError, YAMLError, AttributeError, UnicodeDecodeError):
        return {}


def lock_restore_hint(path, lock="dvc.lock", cache=".dvc/cache/files/md5"):
    """For predict and serve: where dvc.lock names `path` as a stage's output whose files DVC's cache holds,
    the command that checks it out; None otherwise."""
    path = Path(path).as_posix().rstrip("/")
    for stage, record in locked_stages(lock).items():
        for out in record.get("outs") or []:
            if out.get("path", "").rstrip("/") == path and in_cache(out, cache):
                return f"dvc checkout {stage}"
    return None


_dvc_gone = threading.Event()
DVC_PROCESS = None  # (pid, start time) of the dvc running this stage, found as early as can be (stages/__init__)


def watch_dvc(interval_s=0.5):
    """End this stage, as SIGTERM would, once the `dvc` process that runs it is gone (Linux: reads /proc).

    Killing `dvc repro` (a closed terminal, a scheduler's SIGTERM) does not stop
    the stage it is running: it would go on and write its outputs behind DVC's
    back, after DVC has recorded nothing of it. DVC runs the stage through a
    shell, which may or may not exec it; the nearest ancestor that is not a
    shell is DVC, found when the stage's package is imported (stages/__init__).
    A daemon thread polls it and, once it is gone (its /proc entry gone, a
    zombie, or another process with its pid) or this process has another
    parent, signals this process.
    """
    parent = os.getppid()
    pid, started = DVC_PROCESS or dvc_ancestor()
    if pid is None:
        return  # no /proc: nothing to watch (macOS)

    def gone():
        return started is None or os.getppid() != parent or process_start(pid) != started

    def poll():
        while not gone():
            time.sleep(interval_s)
        _dvc_gone.set()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=poll, name="watch-dvc", daemon=True).start()


SHELLS = {"sh", "bash", "dash", "zsh", "ksh", "fish", "busybox"}


def dvc_ancestor():
    """(pid, start time) of the nearest ancestor that is not a shell; (1, None) when only init is left (DVC has
    gone already); (None, None) where /proc cannot tell."""
    pid = os.getppid()
    for _ in range(4):
        if pid <= 1:
            return 1, None
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return None, None
        if comm not in SHELLS:
            return pid, process_start(pid)
        pid = parent
    return None, None


def process_start(pid):
    """A process's start time (clock ticks since boot; /proc/<pid>/stat's 22nd field), None once it is gone.

    A process that has exited but not yet been waited for (a zombie: state Z or X) counts as gone.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


# TensorFlow's C++ log lines that say nothing a user can act on: absl's notice that it logs before being set
# up and the informational and warning lines after it ("oneDNN custom operations are on", twice per
# process), and tf.data's complaint that Keras's graph names an attribute this build lacks. TensorFlow
# 2.21 logs them through absl, which TF_CPP_MIN_LOG_LEVEL no longer reaches, before Python code can set
# anything: only the file descriptor can be filtered. Errors and fatal lines pass, as does all Python.
TF_NOISE = re.compile(rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
                      rb"|[IW]\d{4} [\d:.]+ +\d+ [\w./-]+:\d+\] "
                      rb"|E\d{4} [\d:.]+ +\d+ node_def_util\.cc:\d+\] NodeDef mentions attribute "
                      rb"use_unbounded_threadpool ")
SHOW_TF_LOGS = "MNIST_TF_LOGS"  # set to 1 to see every line


# The filter's own process: it reads the pipe to its end, whatever becomes of the stage (an abort, a crash),
# so a fatal line is passed on; a write that fails (a closed terminal) drops the text and keeps reading, so
# the stage never blocks on a full pipe.
FILTER = """
import os, re, sys
noise, out, pending = re.compile(sys.argv[1].encode("latin-1")), sys.stderr.buffer, b""
def say(text):
    try:
        out.write(text)
        out.flush()
    except OSError:
        pass
while chunk := os.read(0, 65536):
    *lines, pending = (pending + chunk).split(b"\\n")
    say(b"".join(line + b"\\n" for line in lines if not noise.match(line)))
if pending and not noise.match(pending):
    say(pending)
"""


class QuietStderr:
    """Within the block, lines written to file descriptor 2 that match TF_NOISE are dropped; the rest pass.

    The descriptor is pointed at a pipe read by a small process of its own,
    which writes every other line to the real stderr: it outlives this one,
    so even an abort's last words arrive. Leaving the block puts the
    descriptor back and waits (10 s at most: a child process of the stage
    may hold the pipe) for the filter to pass on what was written. Off where
    MNIST_TF_LOGS=1.
    """

    def __enter__(self):
        import subprocess

        self.filter = None
        if os.environ.get(SHOW_TF_LOGS) == "1":
            return self
        sys.stderr.flush()
        read_end, write_end = os.pipe()
        try:
            self.filter = subprocess.Popen([sys.executable, "-S", "-c", FILTER, TF_NOISE.pattern.decode("latin-1")],
                                           stdin=read_end)
        finally:
            os.close(read_end)
        self.saved = os.dup(2)
        os.dup2(write_end, 2)
        os.close(write_end)
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        import subprocess

        if self.filter is None:
            return
        sys.stderr.flush()
        os.dup2(self.saved, 2)  # the pipe's last writer here closes: the filter reads to its end and exits
        os.close(self.saved)
        try:
            self.filter.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass  # a child of the stage still holds the pipe: the filter goes on passing its lines
        self.filter = None


def quick_exit():
    """Exit 0 now, skipping Python's shutdown, once a stage that loaded TensorFlow is done.

    That shutdown (TensorFlow's thread pools and the teardown of the thousands
    of modules it loads) took 2.2 s of the evaluate stage's 13.9 s on 2 cores,
    in each of build_init_weights, train and evaluate, and writes nothing: by
    here every output is closed and renamed into place. Only the standard
    streams still hold text, so they are flushed first.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --- params -----------------------------------------------------------------

def load_params(path, **schemas):
    """Read params.yaml once and check the named sections against their schemas.

    `load_params("params.yaml", base=BaseParams, train=TrainParams)` returns
    {"base": BaseParams(...), "train": TrainParams(...)}.
    """
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path} must be a mapping of sections ({', '.join(SECTIONS)})")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise UserError(f"{path}: unknown section {unknown[0]!r}; allowed: {', '.join(SECTIONS)}")
    return {name: validate(raw.get(name), schema, name, path) for name, schema in schemas.items()}


def read_yaml(path):
    """params.yaml as DVC reads it: YAML 1.2 (ruamel.yaml's safe loader, DVC's own parser).

    PyYAML is YAML 1.1, where `1e-3` is a string and `on` is true: the stages
    would then see other values than `dvc params diff` and `-S` do. Duplicate
    keys and bytes that are not UTF-8 are refused rather than guessed at.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.constructor import DuplicateKeyError
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} not found: run from the project root, where params.yaml is") from None
    except UnicodeDecodeError as err:
        line = err.object[:err.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line} is not UTF-8 text (byte {err.object[err.start]:#04x}); "
                        f"save the file as UTF-8") from None
    try:
        return YAML(typ="safe").load(text)
    except DuplicateKeyError as err:
        raise UserError(f"{path}: line {err.problem_mark.line + 1}: {err.problem}; "
                        f"keep one of the two") from None
    except MarkedYAMLError as err:
        where = f"line {err.problem_mark.line + 1}: " if err.problem_mark else ""
        raise UserError(f"{path} is not valid YAML: {where}{err.problem or err.context}") from None
    except YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None


def validate(section, schema, name, path=PARAMS_FILE):
    """Check one section; the first problem becomes a one-line UserError naming the key."""
    from pydantic import ValidationError

    if section is None:
        raise UserError(f"{path}: section {name!r} is missing; see README.md for its keys")
    try:
        return schema.model_validate(section)
    except ValidationError as err:
        # A misspelt key is both unknown and missing; naming the unknown one helps more.
        first = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
        key = ".".join([name, *map(key_text, first["loc"])])
        if first["type"] == "extra_forbidden":
            allowed = _allowed_keys(schema, first["loc"][:-1])
            raise UserError(f"{path}: unknown key {key}; allowed here: {allowed}") from None
        if first["type"] == "missing":
            raise UserError(f"{path}: missing key {key}; add it (see README.md)") from None
        raise UserError(f"{path}: {key} = {first['input']!r}: {first['msg']}") from None


def key_text(part):
    """A key as the message shows it: plain names as they are, anything else quoted (no line breaks)."""
    part = str(part)
    return part if part.replace("_", "").isalnum() and part.isascii() else repr(part)


def _allowed_keys(schema, loc):
    """The field names of the schema found at `loc` (dict keys pass through)."""
    from pydantic import BaseModel

    for part in loc:
        if isinstance(schema, type) and issubclass(schema, BaseModel) and part in schema.model_fields:
            schema = schema.model_fields[part].annotation
        elif typing.get_origin(schema) is dict:
            schema = typing.get_args(schema)[1]
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return ", ".join(schema.model_fields)
    return "none"


# --- atomic outputs ---------------------------------------------------------

TMP_PREFIX = ".tmp-"  # .gitignore and .dvcignore name it: git never offers it, DVC never hashes it


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folder):
    """Remove the temporaries in `folder` whose process is gone (killed with SIGKILL, say)."""
    for path in Path(folder).glob(f"{TMP_PREFIX}*"):
        pid = path.name[len(TMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


@contextmanager
def atomic_path(final):
    """Yield a temporary path beside `final`; rename it into place on success.

    Works for files and folders. The temporary folder is `.tmp-<pid>-...`
    beside `final`: ignored by git and DVC, removed on any error or signal,
    and, after a SIGKILL, removed by the next run (its pid is gone). The
    temporary name keeps the final suffix (Keras insists on `.keras` and
    `.weights.h5`). An old folder is first renamed out of the way, so that
    `final` is at every moment either the old output, the new one, or absent:
    never half of either.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final.parent)
    tmp_dir = None
    try:
        with signals_held():  # a signal between mkdtemp and this try would leave the folder behind
            tmp_dir = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=f".{final.name}",
                                            dir=final.parent))
        tmp = tmp_dir / final.name
        yield tmp
        with signals_held():  # the two renames go together: between them there would be no output at all
            if final.is_dir() and not final.is_symlink():
                os.replace(final, tmp_dir / "old")
            os.replace(tmp, final)
    finally:
        if tmp_dir is not None:
            with signals_held():  # a signal mid-rmtree would leave half of it
                shutil.rmtree(tmp_dir, ignore_errors=True)


def to_json(data, **kwargs):
    """Strict JSON: a NaN or infinity is an error here, never `NaN` in a file that JSON readers refuse."""
    return json.dumps(data, allow_nan=False, **kwargs)


def write_json(path, data):
    text = to_json(data, indent=2) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def npz_headers(path, prefix=""):
    """{name: (shape, dtype)} of an .npz's arrays, from its zip directory and .npy headers only.

    A few KB are read whatever the file declares, so a hostile or damaged file
    is refused (a UserError, `prefix` before its path) in bounded memory and
    time: a member whose size does not match its header, Python objects, or a
    file that is not a zip of .npy arrays.
    """
    import zipfile

    import numpy as np

    try:
        with zipfile.ZipFile(path) as archive:
            headers = {}
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if read_header is None:
                        raise ValueError(f"array {name!r} has .npy format version {version}, not 1.0 or 2.0")
                    shape, _, dtype = read_header(member)
                    header_size = member.tell()
                if dtype.hasobject:
                    raise UserError(f"{prefix}{path}: array {name!r} holds Python objects; refusing to load it")
                if info.file_size != header_size + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                    raise UserError(f"{prefix}{path}: array {name!r}'s size does not match its header "
                                    f"{shape} {dtype}; the file is damaged")
                headers[name] = (tuple(shape), dtype)
            return headers
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError) as err:
        raise UserError(f"{prefix}cannot read {path} as .npz ({type(err).__name__}: "
                        f"{' '.join(str(err).split())}); the file is damaged or not an .npz") from None


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found: run `dvc repro` to make it") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is damaged (not JSON: {err}); run `dvc repro --single-item -f <stage>` with "
                        f"the stage of dvc.yaml that writes it") from None


# --- integrity of what stages read --------------------------------------------
# Each stage that writes a folder records in it the md5 (DVC 3's hash: the cache object's name) and
# size of every file; each stage that reads one checks the files it reads. DVC trusts its cache: an
# object damaged on disk (same size, same time) is checked out as it is, and `dvc status` calls it up
# to date. The check turns that into one line with the recovery that works.

MANIFEST = "manifest.json"


def file_md5(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def manifest(folder, stage):
    """The manifest of every file in `folder` (not in subfolders), as written by `stage`."""
    files = {f.name: {"md5": file_md5(f), "bytes": f.stat().st_size}
             for f in sorted(Path(folder).iterdir()) if f.is_file() and f.name != MANIFEST}
    return {"stage": stage, "files": files}


def write_manifest(folder, stage):
    """Record `folder`'s files; call it last, on the temporary folder, before it is renamed into place."""
    (Path(folder) / MANIFEST).write_text(to_json(manifest(folder, stage), indent=2) + "\n")


def check_files(folder, names):
    """Check that `folder`'s files `names` are the ones its stage wrote; a UserError naming the damaged one.

    The error gives the recovery: remove DVC's cached copy and run the stage again. Returns {name: md5}
    of the files checked, for a caller that records them (no need to hash them again).
    """
    folder = Path(folder)
    record = read_json(folder / MANIFEST)
    stage = record.get("stage", "?")
    for name in names:
        path, want = folder / name, record.get("files", {}).get(name)
        if want is None:
            raise UserError(f"{path} is not in {folder / MANIFEST}: run `dvc repro --single-item -f {stage}`")
        if not path.is_file():
            raise UserError(f"{path} not found: run `dvc repro` to make it")
        size = path.stat().st_size
        got = file_md5(path) if size == want["bytes"] else None
        if got != want["md5"]:
            found = f"{size} bytes" if got is None else f"md5 {got}"
            md5 = want["md5"]
            repair = f"rm -f .dvc/cache/files/md5/{md5[:2]}/{md5[2:]} && dvc repro --single-item -f {stage}"
            raise Damaged(f"{path} is damaged ({found}; {stage} wrote {want['bytes']} bytes, md5 {want['md5']}); "
                            f"DVC's cache may hold the damaged copy: `{repair}`")
    return {name: record["files"][name]["md5"] for name in names}


def import_onnxruntime():
    """ONNX Runtime, its telemetry off: otherwise importing it writes a device id under ~/.cache/Microsoft."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime

    return onnxruntime


# --- Keras --------------------------------------------------------------------

def import_keras(backend, device=None):
    """Import Keras on `backend`; device "cpu" hides every GPU from it.

    The backend and visible devices can only be chosen before the first import,
    which is why no stage imports Keras at module level.
    """
    if "keras" in sys.modules and os.environ.get("KERAS_BACKEND") != backend:
        raise UserError(f"Keras is already imported with another backend; cannot switch to {backend}")
    os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        if backend == "jax":
            os.environ["JAX_PLATFORMS"] = "cpu"
    try:
        with unimportable(*(name for name in KERAS_EXTRAS if name != backend)):
            import keras
    except ImportError as err:
        raise UserError(f"base.backend is {backend!r} but it cannot be imported ({err}); "
                        f"install it or set base.backend to tensorflow") from None
    if keras.backend.backend() != backend:
        raise UserError(f"Keras runs on {keras.backend.backend()!r}, not base.backend={backend!r}")
    if backend == "tensorflow":
        without_tf_data_autotune()
    return keras


# What importing Keras on TensorFlow also imports when it is installed, for parts
# no stage uses: TensorFlow Lite's JAX converter (jax, 1.1 s), Keras's
# scikit-learn wrappers (sklearn, 1.0 s) and its image gallery (matplotlib.pyplot,
# 1.0 s), out of the 8 s the import takes on 2 cores. Each is imported inside a
# try/except ImportError, so each is left out by making it unimportable for the
# import's duration; a stage that needs one imports it afterwards as usual.
KERAS_EXTRAS = ("jax", "sklearn", "matplotlib")


@contextmanager
def unimportable(*names):
    """Within this block, `import name` raises ImportError for each name not yet imported; after it, imports work."""
    blocked = [name for name in names if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # the import system's own marker for "cannot be imported"
    try:
        yield
    finally:
        for name in blocked:
            if sys.modules.get(name, False) is None:
                del sys.modules[name]


def without_tf_data_autotune():
    """Make the tf.data pipelines Keras builds from arrays (fit, evaluate, predict) run without autotuning.

    With autotuning on, each pipeline runs a tuning thread that sleeps for a
    period doubling up to a minute, and Keras's end of epoch (which drops the
    epoch's iterator) waits for it to wake: on 2 CPU cores the same epoch
    took 23 s or 45 s by chance, the difference spent with every core idle.
    Tuning buffer sizes changes no number: the same batches in the same order,
    the same weights to the bit. Keras has no public switch for the options of
    the datasets it builds, so this wraps its array adapter, once; the version
    is pinned and tests/test_train.py checks that the wrapper is in force.
    """
    import tensorflow as tf
    from keras.src.trainers.data_adapters import array_data_adapter

    adapter = array_data_adapter.ArrayDataAdapter
    if getattr(adapter.get_tf_dataset, "without_autotune", False):
        return
    keras_own = adapter.get_tf_dataset

    def get_tf_dataset(self):
        options = tf.data.Options()
        options.autotune.enabled = False
        return keras_own(self).with_options(options)

    get_tf_dataset.without_autotune, get_tf_dataset.keras_own = True, keras_own
    adapter.get_tf_dataset = get_tf_dataset
