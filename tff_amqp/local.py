"""A local federation: silo agent processes on this machine, owned by us.

Used by `tff-amqp demo` and the benchmarks. Every process is started in its
own process group, dies with its parent (PR_SET_PDEATHSIG), writes to its own
log file (never our stdout: an orphan holding it would hang a pipeline), and
is stopped with SIGTERM, then SIGKILL after a bounded wait.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tff_amqp.processes import die_with_parent, stop_process_group


@dataclass
class SiloProcess:
    """One running `tff-amqp silo` process."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    # The log event that says it is serving (a silo host logs it once all
    # of its silos are).
    ready_event: str = "silo.ready"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.process.poll() is None


class LocalFederation:
    """Starts and stops silo agents as child processes.

    with LocalFederation(broker_url, "demo") as federation:
        federation.start_silo("north", data={"readings": Path("north/")})
    """

    def __init__(self, broker_url: str, federation: str, *, log_dir: Path | None = None) -> None:
        self.broker_url = broker_url
        self.federation = federation
        self._own_log_dir = log_dir is None
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="tff-amqp-logs-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.silos: dict[str, SiloProcess] = {}

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start_silo(
        self,
        name: str,
        *,
        data: Mapping[str, Path] | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> SiloProcess:
        args = ["--name", name]
        for key, path in (data or {}).items():
            args += ["--data", f"{key}={path}"]
        return self._spawn(name, "silo", [*args, *extra_args], env, ready_event="silo.ready")

    def start_silo_host(
        self,
        host: str,
        silos: Sequence[str],
        *,
        worker_mode: str = "shared",
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> SiloProcess:
        """Simulation mode: one `tff-amqp silos` process hosting `silos`
        (see docs/simulation.md). `host` names the process and its log."""
        args = ["--worker", worker_mode]
        for name in silos:
            args += ["--name", name]
        return self._spawn(host, "silos", [*args, *extra_args], env, ready_event="silo_host.ready")

    def _spawn(
        self,
        name: str,
        command_name: str,
        args: Sequence[str],
        env: Mapping[str, str] | None,
        *,
        ready_event: str,
    ) -> SiloProcess:
        if name in self.silos and self.silos[name].running:
            raise ValueError(f"{name!r} is already running in this local federation")
        command = [
            sys.executable,
            "-m",
            "tff_amqp",
            command_name,
            "--broker",
            self.broker_url,
            "--federation",
            self.federation,
            *args,
        ]
        log_path = self.log_dir / f"{command_name}-{name}.log"
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
                env={**os.environ, **(env or {})},
            )
        silo = SiloProcess(name, process, log_path, ready_event)
        self.silos[name] = silo
        return silo

    def start_worker(
        self,
        silo: str,
        *,
        data: Mapping[str, Path] | None = None,
        extra_args: Sequence[str] = (),
    ) -> SiloProcess:
        """Start one more stateless worker (`tff-amqp worker --stateless`) of
        `silo`'s pool; tracked (and stopped) like a silo, as `<silo>#<n>`."""
        index = sum(1 for name in self.silos if name.startswith(f"{silo}#")) + 1
        args = ["--stateless", "--silo", silo]
        for key, path in (data or {}).items():
            args += ["--data", f"{key}={path}"]
        return self._spawn(
            f"{silo}#{index}", "worker", [*args, *extra_args], None, ready_event="worker.ready"
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until every silo logged `silo.ready` (bounded); raise with the
        log tail of a silo that exited or never became ready."""
        deadline = time.monotonic() + timeout
        pending = dict(self.silos)
        while pending:
            for name, silo in list(pending.items()):
                if f'"{silo.ready_event}"' in silo.log_tail(200):
                    del pending[name]
                elif not silo.running:
                    raise RuntimeError(
                        f"silo {name!r} exited with code {silo.process.returncode}:\n"
                        f"{silo.log_tail()}"
                    )
            if pending and time.monotonic() > deadline:
                names = ", ".join(pending)
                raise TimeoutError(
                    f"silo(s) {names} not ready after {timeout:.0f} s; last log lines:\n"
                    + "\n".join(s.log_tail(5) for s in pending.values())
                )
            if pending:
                time.sleep(0.2)

    def stop(self) -> None:
        for silo in self.silos.values():
            stop_process_group(silo.process)
        self.silos.clear()
