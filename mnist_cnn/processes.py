"""One model trained by several processes (train.processes): which process this is, from the scheduler that
started it or from the train stage itself; starting the processes on one host; ending them all when one dies.

The engine is Keras's distribution API on JAX (jax.distributed over gloo on CPUs, NCCL on GPUs): every process
runs the same fit on its share of each batch, and the gradients are summed across them before each update.
Only the first process (rank 0) writes outputs.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import typing
from pathlib import Path

from mnist_cnn.errors import UserError

DEFAULT_PORT = 29500         # the coordinator's port where the job names none (torchrun's default)
INIT_TIMEOUT_S = 120         # how long a process waits for all the others to join
HEARTBEAT_TIMEOUT_S = 10     # a process silent this long is dead to the others (JAX's default: 100)
STOP_GRACE_S = 5             # after a rank dies, how long the others get to stop on SIGTERM before SIGKILL


LAUNCHER_PID = "MNIST_CNN_LAUNCHER"  # set in the processes the stage starts: each ends itself if it is gone


class Job(typing.NamedTuple):
    coordinator: str  # host:port of rank 0, where JAX's coordination service listens
    count: int        # processes in the job
    rank: int         # this process, from 0
    source: str       # which variables named them


def first_host(nodelist):
    """The first host of a Slurm node list: 'node[03-05,9],gpu1' -> 'node03'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match or not match.group(1):
        raise UserError(f"SLURM_JOB_NODELIST = {nodelist!r} names no host; set MASTER_ADDR to the first task's host")
    prefix, ranges = match.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def _int(environ, name, source):
    value = environ.get(name, "")
    if not (value.isascii() and value.isdigit()):
        raise UserError(f"{source}: {name} = {value!r} is not a whole number; the job's launcher should set it")
    return int(value)


def job_from_env(environ, processes):
    """The job this process is one of, from the variables its launcher set; None when it runs alone.

    torchrun style (also what the train stage sets for the processes it starts): RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT. Slurm (`srun`): SLURM_PROCID, SLURM_NTASKS, and MASTER_ADDR or else the first host of
    SLURM_JOB_NODELIST. A Kubernetes Indexed Job: JOB_COMPLETION_INDEX, with WORLD_SIZE and MASTER_ADDR set in
    the pod's spec (the first pod's stable name). The port is MASTER_PORT, else DEFAULT_PORT. A job of one
    process is no job: the stage then starts train.processes itself.

    Slurm's variables, and an Indexed Job's index without WORLD_SIZE, count only when train.processes
    (`processes`) is above 1: a task of a Slurm allocation or of an Indexed Job that runs experiments of its
    own (tools/sweep.py) trains alone. RANK and WORLD_SIZE always count: they say this is one of a job.
    """
    if "RANK" in environ and "WORLD_SIZE" in environ:
        source = "started here" if LAUNCHER_PID in environ else "RANK/WORLD_SIZE"
        rank, count = _int(environ, "RANK", source), _int(environ, "WORLD_SIZE", source)
        host = environ.get("MASTER_ADDR")
    elif "JOB_COMPLETION_INDEX" in environ and ("WORLD_SIZE" in environ or processes > 1):
        source = "Kubernetes Indexed Job"
        rank = _int(environ, "JOB_COMPLETION_INDEX", source)
        if "WORLD_SIZE" not in environ:
            raise UserError(f"{source}: set WORLD_SIZE (the job's completions) and MASTER_ADDR (the first pod's "
                            f"host name) in the pod's env")
        count, host = _int(environ, "WORLD_SIZE", source), environ.get("MASTER_ADDR")
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ and processes > 1:
        source, rank, count = "Slurm", _int(environ, "SLURM_PROCID", "Slurm"), _int(environ, "SLURM_NTASKS", "Slurm")
        host = environ.get("MASTER_ADDR") or (first_host(environ["SLURM_JOB_NODELIST"])
                                              if environ.get("SLURM_JOB_NODELIST") else None)
    else:
        return None
    if count <= 1:
        return None
    if not host:
        raise UserError(f"{source}: MASTER_ADDR is not set; set it to the host of the job's first process")
    if not rank < count:
        raise UserError(f"{source}: this process's rank {rank} is not below the job's {count} processes")
    port = environ.get("MASTER_PORT", str(DEFAULT_PORT))
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise UserError(f"{source}: MASTER_PORT = {port!r} is not a port number")
    return Job(f"{host}:{port}", count, rank, source)


def check_job(job, processes):
    if job is not None and job.count != processes:
        raise UserError(f"this job ({job.source}) has {job.count} processes but train.processes = {processes}; "
                        f"set train.processes: {job.count} (`dvc exp run -S train.processes={job.count}`), or start "
                        f"{processes}")


def start_job(job):
    """Join the job: JAX's coordination service, with gloo for the collectives of CPU processes. Before Keras
    builds anything; each process then sees every process's devices."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        # jax.distributed itself, not keras.distribution.initialize (which calls it): its timeouts must be short,
        # or a process whose peer died waits 100 s to hear of it
        jax.distributed.initialize(job.coordinator, job.count, job.rank, initialization_timeout=INIT_TIMEOUT_S,
                                   heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 - JAX raises its runtime's errors as they come
        raise UserError(f"process {job.rank} of {job.count} could not join the job at {job.coordinator} "
                        f"({' '.join(str(err).split())[:200]}); check that every process started, "
                        f"and the address") from None


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def watch_launcher(environ):
    """In a process the train stage started: exit at once if that stage is gone (killed with SIGKILL, say), so
    no process trains on, or writes, for a run that no longer exists."""
    pid = environ.get(LAUNCHER_PID)
    if not pid or not pid.isdigit():
        return

    def watch():
        while os.getppid() == int(pid):
            time.sleep(0.5)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="launcher-watch").start()


NOISE = re.compile(r"^\[Gloo\] ")  # gloo's greeting on each process's stdout: "Rank 0 is connected to 1 peer ranks"


def last_line(path):
    """A process's last error line in its log (else its last line), without the prefix `error: `."""
    try:
        lines = [line for line in Path(path).read_text(errors="replace").splitlines()
                 if line.strip() and not NOISE.match(line)]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [""])[-1].removeprefix("error: ")


def how_it_ended(code):
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"failed (exit {code})"


def run_here(module, argv, count, environ=None, poll_s=0.1):
    """Start `count` processes of `python -m module argv` on this host as one job, wait for them all.

    The first writes to this terminal; every process's stderr goes to a log file, kept and named when one of
    them fails (the first's is shown after a success: its warnings). When one dies, the others are stopped
    within seconds and one line says which died and why.
    """
    environ = dict(os.environ if environ is None else environ)
    port = free_port()
    logs = Path(tempfile.mkdtemp(prefix="mnist-cnn-processes-"))
    processes, keep = [], False
    try:
        for rank in range(count):
            env = {**environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(count),
                   "RANK": str(rank), LAUNCHER_PID: str(os.getpid())}
            with open(logs / f"process{rank}.log", "wb") as log:
                processes.append(subprocess.Popen([sys.executable, "-m", module, *argv], env=env,
                                                  stdout=subprocess.PIPE if rank == 0 else log, stderr=log))
        forwarding = threading.Thread(target=forward, args=(processes[0].stdout, sys.stdout), daemon=True)
        forwarding.start()
        while True:
            codes = [p.poll() for p in processes]
            failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                # the cause, not its echo: a process killed, else the first to fail by its own error
                rank = next((r for r in failed if codes[r] < 0), failed[0])
                why = "" if codes[rank] < 0 else last_line(logs / f"process{rank}.log")
                keep = True
                raise UserError(f"train.processes: process {rank} of {count} {how_it_ended(codes[rank])}"
                                f"{': ' + why if why else ''}; the others were stopped; nothing was written "
                                f"(the processes' logs: {logs}/)")
            if all(code == 0 for code in codes):
                break
            time.sleep(poll_s)
        forwarding.join(timeout=10)
        sys.stderr.write((logs / "process0.log").read_text(errors="replace"))  # its warnings, after the fact
    finally:
        stop(processes)
        if not keep:
            for path in logs.iterdir():
                path.unlink()
            logs.rmdir()


def forward(source, to):
    """Copy the first process's output, line by line, to this terminal, without gloo's greeting."""
    for line in iter(source.readline, b""):
        if not NOISE.match(line.decode(errors="replace")):
            to.write(line.decode(errors="replace"))
            to.flush()


def stop(processes):
    """SIGTERM to each process still running, then SIGKILL after STOP_GRACE_S."""
    alive = [p for p in processes if p.poll() is None]
    for p in alive:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in alive:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def finish_job():
    """Leave the job: every process waits here for all the others (JAX's shutdown barrier), so that none exits
    while another still needs it, and a quick exit after this skips nothing."""
    import jax

    jax.distributed.shutdown()
