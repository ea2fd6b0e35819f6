"""The plumbing every stage shares: run(), signals held and turned into a clean exit, the watch on the dvc
process that runs the stage, TensorFlow's log noise filtered from stderr, the restore hint, the quick exit.

`python -m stages.<name>` imports stages/__init__.py first, which calls on_start(): from then on a signal
ends the stage with one line, and under DVC the dvc process is noted before the seconds of imports.
"""

import hashlib
import os
import re
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from mnist_cnn.errors import UserError, out_of_space, printable


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: unwind (temporary outputs are removed on the way) and exit.

    A BaseException, as KeyboardInterrupt is, so that no library's `except Exception` swallows it.
    """


_held = {"depth": 0, "pending": None, "raised": None}  # see signals_held; raised: the signal last raised


def _interrupt(signum, frame):
    if _held["depth"]:
        _held["pending"] = _held["pending"] or signal.Signals(signum)
        return
    _raise_interrupted(signal.Signals(signum))


def _raise_interrupted(signum):
    """Raise Interrupted, first telling stderr's filter (QuietStderr) to hold what follows: the exception lands
    wherever the main thread is, inside a library's C code too, and what that code prints as it is cut off
    is not the run's story (seen on Python 3.13: TensorFlow's nest, interrupted inside an __import__ called
    from C++, printed "SystemError: ... returned a result with an exception set" and its traceback). Once
    run() has handled the interruption the held lines are dropped and it writes the one line that is, on the
    real stderr; if the process dies first (an abort), the filter prints them, so a fatal line is never lost."""
    _held["raised"] = signum
    if _quiet["on"]:
        try:
            os.write(2, MUTE_MARK + b"\n")
        except OSError:
            pass
    raise Interrupted(signum)


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
            _raise_interrupted(pending)


_at_once = {"on": False}  # see exit_at_once_on_failure


def exit_at_once_on_failure():
    """From now on a failure ends the process right after its line: skipped, the interpreter's shutdown, which
    in a process of a multi-process job would wait for the others (JAX's shutdown barrier), who may be gone."""
    _at_once["on"] = True


def _leave(code, line):
    if not _at_once["on"]:
        sys.exit(line if code == 1 else code)
    if line:
        print(line, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_written = []  # the outputs this run renamed into place (files.atomic_path), removed if it then fails


def wrote(path):
    _written.append(Path(path))


def discard_written():
    """Remove what this run wrote: a stage that fails after writing one output leaves none of this run's
    (DVC removed the last run's before it started), so no output is of another run than its neighbours."""
    with signals_held():
        while _written:
            path = _written.pop()
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


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
    _written.clear()
    _held["raised"] = None
    try:
        with quiet:
            try:
                main()
            except (Exception, Interrupted) as err:  # not SystemExit: a tool's own verdict (predict: some failed)
                discard_written()
                if _held["raised"] and not isinstance(err, Interrupted):
                    # a library caught the interruption and raised its own error instead (TensorFlow, tracing a
                    # graph, turns it into "TypeError: Failed to convert elements"): it is still the signal
                    raise Interrupted(_held["raised"]) from None
                raise
        # done and written: a signal from here on (Python's shutdown would die of it) changes nothing
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if "tensorflow" in sys.modules:
            quick_exit()
    except UserError as err:
        _leave(1, f"error: {err}{restore_hint(stage) if err.restorable else ''}")
    except OSError as err:
        why = out_of_space(err)
        if not why:
            raise
        # written outside atomic_path (a library's own temporary file, say): one line all the same
        _leave(1, f"error: cannot write {printable(err.filename or 'a file')}: {why}; free some space (or raise "
                  f"`ulimit -f`) and run again; nothing of this run was kept{restore_hint(stage)}")
    except Interrupted as err:
        signum = err.args[0]
        why = "dvc, which ran this stage, is gone" if _dvc_gone.is_set() else f"interrupted by {signum.name}"
        print(f"error: {why}; nothing half-written was left (run it again to finish){restore_hint(stage)}",
              file=sys.stderr)
        _leave(128 + signum, "")
    except Exception as err:
        if not _at_once["on"]:
            raise
        _leave(1, f"error: {job_failure(err)}")


def job_failure(err):
    """One line for an error a process of a multi-process job did not expect: most often the collectives'
    ("Gloo all-reduce failed: ... Connection closed by peer") when another process died."""
    text = " ".join(str(err).split())
    if "Gloo" in text:
        return f"lost contact with another process of the job ({text[text.index('Gloo'):][:160]})"
    return f"{type(err).__name__}: {printable(text)[:200]}"


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

# Written to the filter's pipe when a signal interrupts the stage: the filter holds every line after it
# (see _raise_interrupted), and drops them once run() has handled the interruption (HANDLED_MARK, written as
# QuietStderr stops), else passes them on at the end: a process that died on the way (an abort) keeps its
# last words. Between control characters no library prints (NUL cannot pass in argv).
MUTE_MARK = b"\x01mnist_cnn: interrupted\x01"
HANDLED_MARK = b"\x01mnist_cnn: handled\x01"
_quiet = {"on": False}  # whether fd 2 is QuietStderr's pipe now


# The filter's own process: it reads the pipe to its end, whatever becomes of the stage (an abort, a crash),
# so a fatal line is passed on (after a signal's mark, held until the end: dropped if run() handled the
# interruption, else passed on, the last 200 lines); a write that fails (a closed terminal) drops the text
# and keeps reading, so the stage never blocks on a full pipe.
FILTER = """
import collections, os, re, sys
noise, out, pending = re.compile(sys.argv[1].encode("latin-1")), sys.stderr.buffer, b""
mute, handled = sys.argv[2].encode("latin-1"), sys.argv[3].encode("latin-1")
state, held = "pass", collections.deque(maxlen=200)  # pass, then hold after the mute mark, drop once handled
def say(text):
    try:
        out.write(text)
        out.flush()
    except OSError:
        pass
while chunk := os.read(0, 65536):
    *lines, pending = (pending + chunk).split(b"\\n")
    for line in lines:
        if handled in line:
            state = "drop"  # run() has the interruption in hand and writes its own line
        elif mute in line:
            state = "hold" if state == "pass" else state
        elif state == "hold":
            held.append(line)
        elif state == "pass" and not noise.match(line):
            say(line + b"\\n")
if state == "hold":  # the stage died before run() handled the interruption: its last words, as written
    held.append(pending)
    say(b"\\n".join(line for line in held if not noise.match(line)))
elif state == "pass" and pending and not noise.match(pending):
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
            self.filter = subprocess.Popen([sys.executable, "-S", "-c", FILTER, TF_NOISE.pattern.decode("latin-1"),
                                            MUTE_MARK.decode("latin-1"), HANDLED_MARK.decode("latin-1")],
                                           stdin=read_end)
        finally:
            os.close(read_end)
        self.saved = os.dup(2)
        os.dup2(write_end, 2)
        os.close(write_end)
        _quiet["on"] = True
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        import subprocess

        if self.filter is None:
            return
        sys.stderr.flush()
        if _held["raised"]:  # an interruption, unwound to here: what the filter held is dropped
            try:
                os.write(2, HANDLED_MARK + b"\n")
            except OSError:
                pass
        _quiet["on"] = False
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
    of modules it loads) takes seconds
    in each of build_init_weights, train and evaluate, and writes nothing: by
    here every output is closed and renamed into place. Only the standard
    streams still hold text, so they are flushed first.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def exit_while_starting(signum, frame):
    name = signal.Signals(signum).name
    os.write(2, f"error: interrupted by {name} while starting; nothing was written (run it again)\n".encode())
    os._exit(128 + signum)


def on_start():
    """From the first line of `python -m stages.<name>`: a signal ends the stage with one line while it imports
    (nothing is written yet, so there is nothing to clean; once main() runs, run() takes over); under DVC,
    note which process is dvc now, before the seconds of imports it could die in (watch_dvc)."""
    global DVC_PROCESS
    signal.signal(signal.SIGINT, exit_while_starting)
    signal.signal(signal.SIGTERM, exit_while_starting)
    if os.environ.get("DVC_STAGE"):
        DVC_PROCESS = dvc_ancestor()
