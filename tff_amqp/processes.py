"""Owning child processes: they die with us and stop within a bound.

Shared by everything that starts processes (a silo's TFF worker, the local
launcher in `tff_amqp/local.py`, and through it tests, benchmarks and the demo).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1

# Threads of each TFF worker a process starts (TensorFlow's inter-op and
# intra-op pools); unset or 0: TensorFlow's default, one per core. Several
# workers on one machine (a local federation: a silo's worker each) would
# otherwise each run pools as wide as the machine, and their threads contend.
WORKER_THREADS_ENV = "TFF_AMQP_WORKER_THREADS"


def worker_thread_env() -> dict[str, str] | None:
    """The environment sizing a TFF worker's thread pools, from
    $TFF_AMQP_WORKER_THREADS (None: TensorFlow's default); ValueError if
    it is not a whole number."""
    raw = os.environ.get(WORKER_THREADS_ENV, "").strip()
    if not raw:
        return None
    try:
        threads = int(raw)
    except ValueError:
        threads = -1
    if threads < 0:
        raise ValueError(
            f"{WORKER_THREADS_ENV}={raw!r}: expected a whole number of threads "
            "(0 or unset: TensorFlow's default, one per core)"
        )
    if threads == 0:
        return None
    return {"TF_NUM_INTRAOP_THREADS": str(threads), "TF_NUM_INTEROP_THREADS": str(threads)}


def die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGKILL this child when its parent dies, so
    no process outlives us even if we are SIGKILLed."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(
    command: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start `command` as an owned child: its own process group (so a group
    stop also reaches its children), SIGKILLed when its parent dies, output
    appended to `log_path` (never our stdout: an orphan holding it would hang
    a pipeline). `env` is added to ours."""
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
            env={**os.environ, **env} if env else None,
            cwd=cwd,
        )


def stop_process_groups(
    processes: Iterable[subprocess.Popen[bytes]], timeout: float = 10.0
) -> None:
    """SIGTERM every process group, wait at most `timeout` in total (so many
    processes stop in parallel, not one bound after another), then SIGKILL."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(max(0.0, deadline - time.monotonic()))
    for process in processes:
        kill_process_group(process)


def stop_process_group(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the process group, wait at most `timeout`, then SIGKILL it."""
    stop_process_groups([process], timeout)


def kill_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the group and reap its leader. Also when the leader already
    exited: stragglers of the group (e.g. a worker_binary) may remain."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5.0)


def proc_stat(pid: int) -> tuple[str, str, int] | None:
    """(comm, state, ppid) of a process from /proc, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    return comm, fields[0], int(fields[1])


def child_pids_named(name: str, parent: int | None = None) -> set[int]:
    """Live (non-zombie) direct children of `parent` (default: us) called `name`
    (psutil if installed, else a walk of /proc)."""
    parent = os.getpid() if parent is None else parent
    try:
        import psutil
    except ImportError:
        found = set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                stat = proc_stat(int(entry.name))
                # /proc's comm is the name cut to 15 characters.
                if stat and stat[0] == name[:15] and stat[1] != "Z" and stat[2] == parent:
                    found.add(int(entry.name))
        return found
    found = set()
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(parent).children(recursive=False):
            with contextlib.suppress(psutil.Error):
                if child.name() == name and child.status() != psutil.STATUS_ZOMBIE:
                    found.add(child.pid)
    return found


def kill_pid(pid: int) -> None:
    """SIGKILL one process, ignoring it being gone already."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def reaping_children(name: str) -> Iterator[None]:
    """SIGKILL, on exit, our children called `name` that appeared meanwhile:
    TFF's native launcher starts `worker_binary` as our child and leaves it
    running (its orphan would outlive tests and benchmarks)."""
    before = child_pids_named(name)
    try:
        yield
    finally:
        for pid in child_pids_named(name) - before:
            kill_pid(pid)
