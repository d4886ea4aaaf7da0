"""Child processes for tests: own process group, own log file, bounded stop.

    with ProcessGroup(tmp_path / "logs") as group:
        silo = start_silo(group, amqp_url, federation, "alpha", {"readings": folder})
        wait_ready(silo)
        ...
    # every process is stopped here: SIGTERM to its group, SIGKILL after 10 s

Children inherit our environment, so they carry the session marker
TFF_AMQP_TEST_SESSION that the end-of-session leak check looks for. They also
ask Linux to SIGKILL them if the thread that started them dies, so none
outlives a crashed pytest. (Start them from the main thread: with
PR_SET_PDEATHSIG, a short-lived starting thread would take them with it.)
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tff_amqp.processes import die_with_parent, stop_process_group

READY_PATTERN = r'"event":\s*"silo\.ready"'


class ManagedProcess:
    """One child process in its own session, writing stdout+stderr to `log_path`."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.args = [str(a) for a in args]
        self.log_path = log_path
        self._env = dict(env or {})
        self._cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        """Start the process (once)."""
        if self.process is not None:
            raise RuntimeError(f"process {self.name!r} already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
                env={**os.environ, **self._env},
                cwd=self._cwd,
            )
        return self

    @property
    def pid(self) -> int:
        return self._started().pid

    @property
    def returncode(self) -> int | None:
        """Exit code (negative: killed by that signal), or None while running."""
        return self._started().poll()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _started(self) -> subprocess.Popen[bytes]:
        if self.process is None:
            raise RuntimeError(f"process {self.name!r} was never started")
        return self.process

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 30) -> str:
        """The last `n` lines of the log."""
        return "\n".join(self.log_text().splitlines()[-n:])

    def check_log(self, pattern: str | re.Pattern[str]) -> re.Match[str] | None:
        """One look at the log: the match, or None; raise (with the log tail) if
        the process has exited without logging it."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        exited = not self.running  # read before the log: its last lines count
        match = regex.search(self.log_text())
        if match is None and exited:
            raise RuntimeError(
                f"process {self.name!r} (pid {self.pid}) exited with code "
                f"{self.returncode} before logging {regex.pattern!r}; last log lines "
                f"({self.log_path}):\n{self.log_tail()}"
            )
        return match

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Poll the log until `pattern` matches; raise (with the log tail) if the
        process exits first or `timeout` seconds pass."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            match = self.check_log(regex)
            if match:
                return match
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"process {self.name!r} (pid {self.pid}) did not log {regex.pattern!r} "
                    f"within {timeout:g} s; last log lines ({self.log_path}):\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.1)

    def terminate(self) -> None:
        """SIGTERM the whole process group (no wait)."""
        if self.running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the whole process group, even if its leader already exited
        (a grandchild such as worker_binary may remain in it), and reap."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5.0)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the group, wait at most `timeout` s, then SIGKILL. Idempotent.
        Returns the exit code."""
        if self.process is None:
            return None
        stop_process_group(self.process, timeout)
        return self.process.poll()

    def __repr__(self) -> str:
        pid = self.process.pid if self.process else None
        return f"ManagedProcess({self.name!r}, pid={pid}, log={str(self.log_path)!r})"


class ProcessGroup:
    """Owns child processes; leaving the `with` block stops them all (bounded)."""

    def __init__(self, log_dir: Path | None = None) -> None:
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="tff-amqp-test-logs-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, ManagedProcess] = {}

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def __getitem__(self, name: str) -> ManagedProcess:
        return self.processes[name]

    def start(
        self,
        name: str,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ManagedProcess:
        """Start `args` as process `name`, logging to ``<log_dir>/<name>.log``."""
        if name in self.processes:
            raise ValueError(f"a process named {name!r} is already in this group")
        process = ManagedProcess(name, args, self.log_dir / f"{name}.log", env=env, cwd=cwd)
        self.processes[name] = process
        process.start()
        return process

    def stop_all(self, timeout: float = 10.0) -> None:
        """SIGTERM every process, wait at most `timeout` s in total, SIGKILL the rest."""
        processes = list(self.processes.values())
        for process in processes:
            process.terminate()
        deadline = time.monotonic() + timeout
        for process in processes:
            if process.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.process.wait(max(0.0, deadline - time.monotonic()))
        for process in processes:
            process.kill()


def start_silo(
    group: ProcessGroup,
    amqp_url: str,
    federation: str,
    name: str,
    data: Mapping[str, Path] | None = None,
    extra_args: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
) -> ManagedProcess:
    """Start `python -m tff_amqp silo` for one silo; does not wait (see wait_ready)."""
    args = [
        sys.executable,
        "-m",
        "tff_amqp",
        "silo",
        "--broker",
        amqp_url,
        "--federation",
        federation,
        "--name",
        name,
    ]
    for key, path in (data or {}).items():
        args += ["--data", f"{key}={path}"]
    args += list(extra_args)
    return group.start(f"silo-{name}", args, env=env)


def wait_ready(silos: ManagedProcess | Iterable[ManagedProcess], timeout: float = 90.0) -> None:
    """Wait until every silo logged ``"event": "silo.ready"`` (one shared
    deadline); raise with the log tail of a silo that exits first or is late."""
    regex = re.compile(READY_PATTERN)
    pending = [silos] if isinstance(silos, ManagedProcess) else list(silos)
    deadline = time.monotonic() + timeout
    while pending:
        pending = [silo for silo in pending if silo.check_log(regex) is None]
        if pending and time.monotonic() >= deadline:
            tails = "\n".join(
                f"--- {silo.name} (pid {silo.pid}, {silo.log_path}):\n{silo.log_tail(10)}"
                for silo in pending
            )
            raise TimeoutError(f"silo(s) not ready within {timeout:g} s:\n{tails}")
        if pending:
            time.sleep(0.2)


def _proc_stat(pid: int) -> tuple[str, str, int] | None:
    """(comm, state, ppid) of a process from /proc, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    return comm, fields[0], int(fields[1])


def child_pids_named(name: str, parent: int | None = None) -> set[int]:
    """Live (non-zombie) direct children of `parent` (default: us) called `name`."""
    parent = os.getpid() if parent is None else parent
    try:
        import psutil
    except ImportError:
        found = set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                stat = _proc_stat(int(entry.name))
                if stat and stat[0] == name[:15] and stat[1] != "Z" and stat[2] == parent:
                    found.add(int(entry.name))
        return found
    found = set()
    for child in psutil.Process(parent).children(recursive=False):
        with contextlib.suppress(psutil.Error):
            if child.name() == name and child.status() != psutil.STATUS_ZOMBIE:
                found.add(child.pid)
    return found


def marked_processes(marker_name: str, marker_value: str) -> list[tuple[int, str]]:
    """(pid, cmdline) of live processes other than us whose environment, as
    they were started, has ``marker_name=marker_value``."""
    wanted = f"{marker_name}={marker_value}".encode()
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        stat = _proc_stat(int(entry.name))
        if stat is None or stat[1] == "Z":
            continue
        if wanted in environ.split(b"\0"):
            command = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
            found.append((int(entry.name), command or f"[{stat[0]}]"))
    return found


def kill_pid(pid: int) -> None:
    """SIGKILL one process, ignoring it being gone already."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
