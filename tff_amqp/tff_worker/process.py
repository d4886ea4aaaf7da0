"""Owning one local TFF `worker_binary` process.

TFF's own launcher leaves `worker_binary` running after Python exits, and the
orphan keeps the parent's stdout/stderr open, so anything reading that output
waits forever. Here the worker writes to its own log file, runs in its own
process group, is SIGKILLed by the kernel if its parent dies
(PR_SET_PDEATHSIG), and `stop()` is bounded: SIGTERM, wait, SIGKILL.

worker_binary listens on all interfaces without TLS and has no flag to bind
elsewhere; we only ever connect through 127.0.0.1, and the port is random.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path

import grpc

from tff_amqp.processes import spawn, stop_process_group, worker_thread_env
from tff_amqp.tff_worker.client import GRPC_OPTIONS, WorkerClient, WorkerError

log = logging.getLogger(__name__)

_LIVE: weakref.WeakSet[WorkerBinary] = weakref.WeakSet()


def find_worker_binary() -> Path:
    """The worker_binary shipped inside the tensorflow-federated wheel."""
    import importlib.util

    spec = importlib.util.find_spec("tensorflow_federated")
    if spec is None or not spec.submodule_search_locations:
        raise WorkerError("tensorflow-federated is not installed (run scripts/setup.sh)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "worker_binary"
    if not path.is_file():
        raise WorkerError(
            f"TFF's worker_binary is missing at {path}; reinstall tensorflow-federated"
        )
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WorkerBinary:
    """A running worker_binary with an async gRPC client.

    async with WorkerBinary() as worker:
        executor = await worker.client.get_executor(clients=3)
    """

    def __init__(
        self,
        *,
        max_concurrent_computation_calls: int = -1,
        max_message_megabytes: int = 2000,
        startup_timeout: float = 60.0,
    ) -> None:
        self._max_calls = max_concurrent_computation_calls
        self._max_mb = max_message_megabytes
        self._startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._channel: grpc.aio.Channel | None = None
        self._client: WorkerClient | None = None
        self._log_dir: str | None = None
        self.port: int | None = None

    async def __aenter__(self) -> WorkerBinary:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def client(self) -> WorkerClient:
        if self._client is None:
            raise WorkerError("worker_binary is not started")
        return self._client

    def new_client(self) -> WorkerClient:
        """Another client on this worker's channel, with its own pinned
        executors and computation cache (one per silo when silos share a
        worker; see tff_amqp.silo.stateful.host)."""
        if self._channel is None or self._client is None:
            raise WorkerError("worker_binary is not started")
        return WorkerClient(self._channel)

    @property
    def log_path(self) -> Path | None:
        return Path(self._log_dir) / "worker_binary.log" if self._log_dir else None

    def log_tail(self, lines: int = 20) -> str:
        path = self.log_path
        if path is None or not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    async def start(self) -> None:
        if self._process is not None:
            return
        binary = find_worker_binary()
        try:
            env = worker_thread_env()  # a bad setting fails before anything starts
        except ValueError as e:
            raise WorkerError(str(e)) from None
        self._log_dir = tempfile.mkdtemp(prefix="tff-amqp-worker-")
        self.port = _free_port()
        command = [
            str(binary),
            f"--port={self.port}",
            f"--max_concurrent_computation_calls={self._max_calls}",
            f"--grpc_max_message_length_megabytes={self._max_mb}",
        ]
        assert self.log_path is not None
        self._process = spawn(command, self.log_path, env=env)
        _LIVE.add(self)
        self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}", options=GRPC_OPTIONS)
        started = time.monotonic()
        try:
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise
        self._client = WorkerClient(self._channel)
        log.debug(
            "worker.started",
            extra={"pid": self.pid, "port": self.port, "seconds": time.monotonic() - started},
        )

    async def _wait_ready(self) -> None:
        assert self._channel is not None and self._process is not None
        deadline = time.monotonic() + self._startup_timeout
        while True:
            if self._process.poll() is not None:
                raise WorkerError(
                    f"worker_binary exited during start-up with code {self._process.returncode}:"
                    f"\n{self.log_tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerError(
                    f"worker_binary did not accept connections on 127.0.0.1:{self.port} within "
                    f"{self._startup_timeout:.0f} s:\n{self.log_tail()}"
                )
            try:
                await asyncio.wait_for(self._channel.channel_ready(), min(remaining, 0.5))
                return
            except TimeoutError:
                continue

    async def stop(self) -> None:
        """Close the channel and kill the process group. Bounded, idempotent."""
        if self._channel is not None:
            channel, self._channel = self._channel, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), 2.0)
        self._client = None
        if self._process is not None:
            process, self._process = self._process, None
            await asyncio.to_thread(stop_process_group, process, 5.0)
        _LIVE.discard(self)
        if self._log_dir is not None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None

    def kill_now(self) -> None:
        """Synchronous last resort (interpreter exit)."""
        if self._process is not None and self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._process.pid, signal.SIGKILL)


@atexit.register
def _kill_leftovers() -> None:
    for worker in list(_LIVE):
        worker.kill_now()
