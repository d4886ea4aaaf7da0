"""Local silo-side processes on this machine, owned by us: the one launcher.

Starts, waits for and always stops any of

- stateful silos (`tff-amqp silo`, `LocalFederation.start_silo`),
- pool workers (`tff-amqp worker --stateless`, `LocalFederation.start_pool_worker`),
- simulation hosts (`tff-amqp silos`, `LocalFederation.start_silo_host`),

each with its options (`SiloOptions`: TLS files, message limit, default
clients, metrics port, ...; per-process broker URL for provisioned
credentials). Used by `tff-amqp demo`, the benchmarks and the tests.

    with LocalFederation(broker_url, "demo") as local:
        local.start_silo("north", data={"readings": Path("north/")})
        local.wait_ready()
    # every process is stopped here: SIGTERM to its group, SIGKILL after 10 s

Every process runs in its own process group, dies with its parent
(PR_SET_PDEATHSIG: start them from a long-lived thread, a short-lived one
would take them with it), writes to its own log file and is stopped with
SIGTERM, then SIGKILL after a bounded wait (`tff_amqp/processes.py`).
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
from dataclasses import dataclass
from pathlib import Path

from tff_amqp.processes import (
    WORKER_THREADS_ENV,
    kill_process_group,
    spawn,
    stop_process_groups,
)

# The log event each command writes once it serves (a simulation host: once
# all of its silos do).
SILO_READY = "silo.ready"
POOL_WORKER_READY = "pool_worker.ready"
HOST_READY = "silo_host.ready"


def ready_pattern(event: str) -> re.Pattern[str]:
    """The JSON log line field that says `event` happened."""
    return re.compile(rf'"event":\s*"{re.escape(event)}"')


class ManagedProcess:
    """One child process in its own session, writing stdout+stderr to `log_path`.

    `ready_event` is the log event `wait_ready` waits for."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        ready_event: str = SILO_READY,
    ) -> None:
        self.name = name
        self.args = [str(a) for a in args]
        self.log_path = log_path
        self.ready_event = ready_event
        self._env = dict(env or {})
        self._cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None
        # Where this process's output begins: a name reused after an earlier
        # process exited appends to the same log, whose old "ready" line must
        # not count for the new process.
        self._log_offset = 0

    def start(self) -> ManagedProcess:
        """Start the process (once)."""
        if self.process is not None:
            raise RuntimeError(f"process {self.name!r} already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.process = spawn(self.args, self.log_path, env=self._env, cwd=self._cwd)
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
        """What this process has written to its log (not an earlier one's)."""
        try:
            with self.log_path.open("rb") as log_file:
                log_file.seek(self._log_offset)
                return log_file.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 30) -> str:
        """The last `n` lines of the log."""
        return "\n".join(self.log_text().splitlines()[-n:])

    def is_ready(self) -> bool:
        """Whether it has logged its ready event (one look, never raises)."""
        return ready_pattern(self.ready_event).search(self.log_text()) is not None

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
        if self.process is not None:
            kill_process_group(self.process)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the group, wait at most `timeout` s, then SIGKILL. Idempotent.
        Returns the exit code."""
        if self.process is None:
            return None
        stop_process_groups([self.process], timeout)
        return self.process.poll()

    def __repr__(self) -> str:
        pid = self.process.pid if self.process else None
        return f"ManagedProcess({self.name!r}, pid={pid}, log={str(self.log_path)!r})"


def wait_ready(
    processes: ManagedProcess | Iterable[ManagedProcess], timeout: float = 120.0
) -> None:
    """Wait until every process logged its ready event (one shared deadline);
    raise with the log tail of one that exits first (RuntimeError) or is late
    (TimeoutError)."""
    pending = [processes] if isinstance(processes, ManagedProcess) else list(processes)
    deadline = time.monotonic() + timeout
    while pending:
        pending = [p for p in pending if p.check_log(ready_pattern(p.ready_event)) is None]
        if pending and time.monotonic() >= deadline:
            tails = "\n".join(
                f"--- {p.name} (pid {p.pid}, {p.log_path}):\n{p.log_tail(10)}" for p in pending
            )
            raise TimeoutError(f"process(es) not ready within {timeout:g} s:\n{tails}")
        if pending:
            time.sleep(0.2)


class ProcessGroup:
    """Owns child processes; leaving the `with` block stops them all (bounded).
    Logs go to ``<log_dir>/<name>.log``."""

    def __init__(self, log_dir: Path | None = None) -> None:
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="tff-amqp-logs-"))
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
        ready_event: str = SILO_READY,
    ) -> ManagedProcess:
        """Start `args` as process `name`. A name may be reused only once its
        process has exited (a restart appends to the same log)."""
        old = self.processes.get(name)
        if old is not None and (old.process is None or old.running):
            raise ValueError(f"a process named {name!r} is already in this group")
        if old is not None:
            old.kill()  # reap it, and any straggler of its group
        process = ManagedProcess(
            name, args, self.log_dir / f"{name}.log", env=env, cwd=cwd, ready_event=ready_event
        )
        self.processes[name] = process
        process.start()
        return process

    def stop_all(self, timeout: float = 10.0) -> None:
        """SIGTERM every process, wait at most `timeout` s in total, SIGKILL the rest."""
        stop_process_groups([p.process for p in self.processes.values() if p.process], timeout)


@dataclass(frozen=True)
class SiloOptions:
    """How a silo-side process connects and what it allows: the flags the
    silo-side commands share (`tff_amqp/silo/options.py` and the silo policy
    flags); None / False leaves the command's default. A flag a command does
    not have is refused by that command, not here."""

    # Every command. This process's own broker URL (e.g. a provisioned silo's
    # user and password); default: the federation's.
    broker_url: str | None = None
    no_declare: bool = False
    heartbeat_interval: float | None = None
    connect_timeout: float | None = None
    # Silos and pool workers (not simulation hosts).
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_message_bytes: int | None = None
    metrics_port: int | None = None
    # Silos and simulation hosts (not pool workers).
    default_clients: int | None = None
    min_clients_per_aggregate: int | None = None
    allow_raw_client_values: bool = False
    # Anything else, appended as given (e.g. `--log-level info`).
    extra_args: tuple[str, ...] = ()
    # Environment variables set for the process (added to ours), e.g.
    # {"TFF_AMQP_PHASE_PLANS": "0"}.
    env: Mapping[str, str] | None = None

    def args(self) -> list[str]:
        valued = {
            "--heartbeat-interval": self.heartbeat_interval,
            "--connect-timeout": self.connect_timeout,
            "--tls-ca": self.tls_ca,
            "--tls-cert": self.tls_cert,
            "--tls-key": self.tls_key,
            "--max-message-bytes": self.max_message_bytes,
            "--metrics-port": self.metrics_port,
            "--default-clients": self.default_clients,
            "--min-clients-per-aggregate": self.min_clients_per_aggregate,
        }
        args = [a for flag, v in valued.items() if v is not None for a in (flag, str(v))]
        if self.no_declare:
            args.append("--no-declare")
        if self.allow_raw_client_values:
            args.append("--allow-raw-client-values")
        return [*args, *self.extra_args]


def local_worker_threads() -> int:
    """Threads per pool of each silo's TFF worker when several silos share
    this machine: a quarter of its cores, at least one. Measured on 2 cores
    with 3 silos: a federated mean 5-10 % faster than with TensorFlow's
    default pools (one thread per core in each of three workers, contending);
    TFF native, one worker alone, gains nothing from it."""
    return max(1, (os.cpu_count() or 1) // 4)


class LocalFederation(ProcessGroup):
    """Silo-side processes of one federation, as child processes.

    `silos` maps the name each was started under (a silo, a host, a worker
    `<silo>#<n>`) to its process; its log is ``<log_dir>/<command>-<name>.log``.
    Each may have its own `SiloOptions` (TLS, limits, its own broker URL...).

    The silos share this machine, so each one's TFF worker gets
    `worker_threads` threads per pool (default: a quarter of the cores, at
    least one; see `local_worker_threads`) instead of TensorFlow's one per
    core, unless $TFF_AMQP_WORKER_THREADS or a silo's `SiloOptions.env` says
    otherwise."""

    def __init__(
        self,
        broker_url: str,
        federation: str,
        *,
        log_dir: Path | None = None,
        worker_threads: int | None = None,
    ) -> None:
        super().__init__(log_dir)
        self.broker_url = broker_url
        self.federation = federation
        self.silos: dict[str, ManagedProcess] = {}
        self.worker_threads = worker_threads or local_worker_threads()

    def __enter__(self) -> LocalFederation:
        return self

    def start_silo(
        self,
        name: str,
        *,
        data: Mapping[str, Path | str] | None = None,
        options: SiloOptions | None = None,
    ) -> ManagedProcess:
        """`tff-amqp silo --name NAME`; does not wait (see `wait_ready`)."""
        return self._spawn(name, "silo", ["--name", name], data, options, SILO_READY)

    def start_silo_host(
        self,
        host: str,
        silos: Sequence[str],
        *,
        worker_mode: str = "shared",
        data: Mapping[str, Path | str] | None = None,
        options: SiloOptions | None = None,
    ) -> ManagedProcess:
        """Simulation mode: one `tff-amqp silos` process hosting `silos`
        (see docs/simulation.md). `host` names the process and its log."""
        args = ["--worker", worker_mode]
        for name in silos:
            args += ["--name", name]
        return self._spawn(host, "silos", args, data, options, HOST_READY)

    def start_pool_worker(
        self,
        silo: str,
        *,
        data: Mapping[str, Path | str] | None = None,
        options: SiloOptions | None = None,
    ) -> ManagedProcess:
        """One more pool worker of `silo` (`tff-amqp worker --stateless`),
        tracked as `<silo>#<n>`."""
        index = sum(1 for name in self.silos if name.startswith(f"{silo}#")) + 1
        return self._spawn(
            f"{silo}#{index}",
            "worker",
            ["--stateless", "--silo", silo],
            data,
            options,
            POOL_WORKER_READY,
        )

    def _spawn(
        self,
        name: str,
        command_name: str,
        args: Sequence[str],
        data: Mapping[str, Path | str] | None,
        options: SiloOptions | None,
        ready_event: str,
    ) -> ManagedProcess:
        options = options or SiloOptions()
        command = [
            sys.executable, "-m", "tff_amqp", command_name,
            "--broker", options.broker_url or self.broker_url, "--federation", self.federation,
            *args,
        ]  # fmt: skip
        for key, path in (data or {}).items():
            command += ["--data", f"{key}={path}"]
        command += options.args()
        # '#' of a worker's name would be awkward in a file name.
        process_name = f"{command_name}-{name}".replace("#", "-")
        env = dict(options.env or {})
        if WORKER_THREADS_ENV not in os.environ:
            env.setdefault(WORKER_THREADS_ENV, str(self.worker_threads))
        process = self.start(process_name, command, env=env, ready_event=ready_event)
        self.silos[name] = process
        return process

    def wait_ready(
        self, timeout: float = 120.0, processes: Iterable[ManagedProcess] | None = None
    ) -> None:
        """Wait until every process started here (or just `processes`) is ready."""
        wait_ready(self.silos.values() if processes is None else processes, timeout)

    def stop(self) -> None:
        self.stop_all()
        self.silos.clear()
