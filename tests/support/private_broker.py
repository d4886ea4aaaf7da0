"""A private RabbitMQ node for one test: its own config, plugins, ports and data.

The shared broker at 127.0.0.1:5672 must never be restarted or reconfigured,
so tests that need other settings (a TLS listener, a smaller
``max_message_size``, a broker to restart) start their own node:

    with PrivateBroker(tmp_path, config=["max_message_size = 16777216"]) as broker:
        broker.url            # amqp://guest:guest@127.0.0.1:<port>/
        broker.ctl("list_queues")
        broker.restart()
        broker.kill(); broker.start()   # kill -9, then back with its data
    # stopped here: `rabbitmqctl stop`, then SIGKILL of its process group

The node runs as the current user (root on CI) straight from
``/usr/lib/rabbitmq/bin`` (the ``/usr/sbin`` wrappers switch to the rabbitmq
user), with ``HOME`` in its own directory holding a copy of the Erlang cookie
so ``rabbitmqctl -n <node>`` reaches it. The shared epmd is used, never stopped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

RABBITMQ_BIN = Path(os.environ.get("TFF_AMQP_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
SYSTEM_COOKIE = Path("/var/lib/rabbitmq/.erlang.cookie")


class PrivateBrokerError(RuntimeError):
    """The private node did not start (or stop) in time; carries its log tail."""


def free_port() -> int:
    """A TCP port nobody listens on right now (bind to 0, read, release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rabbitmq_available() -> bool:
    return (RABBITMQ_BIN / "rabbitmq-server").exists() and SYSTEM_COOKIE.exists()


class PrivateBroker:
    """One RabbitMQ node in `root`, started and stopped by us (bounded)."""

    def __init__(
        self,
        root: Path,
        *,
        config: Iterable[str] = (),
        plugins: Iterable[str] = (),
        files: Mapping[str, bytes] | None = None,
        start_timeout: float = 90.0,
    ) -> None:
        self.root = Path(root) / f"rabbit-{uuid.uuid4().hex[:8]}"
        self.node = f"t{uuid.uuid4().hex[:10]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.extra_ports: dict[str, int] = {}
        self.config_lines = list(config)
        self.plugins = list(plugins)
        self.files = dict(files or {})
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None

    # ----------------------------------------------------------------- set-up

    def reserve_port(self, name: str) -> int:
        """A free port for an extra listener (e.g. TLS); call before start()."""
        self.extra_ports[name] = free_port()
        return self.extra_ports[name]

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def log_path(self) -> Path:
        return self.root / "log" / "server.out"

    def path(self, name: str) -> Path:
        """Where a file passed in `files` was written."""
        return self.root / name

    def _env(self) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_", "HOME"))
        }
        env.update(
            HOME=str(self.root / "home"),
            RABBITMQ_CONF_ENV_FILE=str(self.root / "rabbitmq-env.conf"),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.root / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.root / "log"),
            RABBITMQ_CONFIG_FILE=str(self.root / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.root / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(self.root / "rabbit.pid"),
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    def _write_files(self) -> None:
        home = self.root / "home"
        home.mkdir(parents=True, exist_ok=True)
        (self.root / "log").mkdir(exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            shutil.copyfile(SYSTEM_COOKIE, cookie)
            cookie.chmod(0o400)
        (self.root / "rabbitmq-env.conf").write_text("")
        (self.root / "rabbitmq.conf").write_text(
            "\n".join(["loopback_users.guest = true", *self.config_lines]) + "\n"
        )
        plugins = ", ".join(self.plugins)
        (self.root / "enabled_plugins").write_text(f"[{plugins}].\n")
        for name, content in self.files.items():
            (self.root / name).write_bytes(content)

    # -------------------------------------------------------------- lifecycle

    def __enter__(self) -> PrivateBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the node and wait (bounded) until it accepts AMQP connections."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"private broker {self.node} is already running")
        self._write_files()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                cwd=self.root,
                start_new_session=True,
            )
        try:
            self._await_startup()
        except BaseException:
            self.stop()
            raise

    def _await_startup(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise PrivateBrokerError(
                    f"private RabbitMQ {self.node} exited with code {self.process.returncode} "
                    f"while starting:\n{self.log_tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PrivateBrokerError(
                    f"private RabbitMQ {self.node} did not start within "
                    f"{self.start_timeout:.0f} s:\n{self.log_tail()}"
                )
            done = self.ctl_run("await_startup", "--timeout", str(max(1, int(min(remaining, 20)))))
            if done.returncode == 0 and self._accepts_tcp():
                return
            time.sleep(0.5)

    def _accepts_tcp(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 2):
            return True
        return False

    def stop(self, timeout: float = 30.0) -> None:
        """`rabbitmqctl stop` (bounded), then SIGKILL whatever is left of the
        node's process group. Idempotent; leaves the data directory (restart)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                subprocess.run(
                    [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, "stop"],
                    env=self._env(),
                    capture_output=True,
                    timeout=timeout,
                    stdin=subprocess.DEVNULL,
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        # beam.smp, erl_child_setup, inet_gethost: all in the node's group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        """`kill -9` of the node (its whole process group): no clean
        shutdown, clients see their connections drop. `start()` brings it
        back with its data directory (durable queues, persistent messages)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        self.process = None

    # ---------------------------------------------------------------- control

    def ctl_run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run `rabbitmqctl -n <node> ARGS`; raise with its output if it fails."""
        done = self.ctl_run(*args, timeout=timeout)
        if done.returncode != 0:
            raise PrivateBrokerError(
                f"rabbitmqctl {' '.join(args)} failed ({done.returncode}): "
                f"{done.stdout}{done.stderr}"
            )
        return done.stdout

    def log_tail(self, lines: int = 30) -> str:
        texts = []
        for path in sorted((self.root / "log").glob("*")):
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                texts.append(f"--- {path.name}:\n" + "\n".join(tail))
        return "\n".join(texts)


@contextlib.contextmanager
def private_rabbitmq(*, config: str = "", start_timeout: float = 120.0) -> Iterator[str]:
    """A private node with extra `rabbitmq.conf` lines (e.g. a 16 MiB
    `max_message_size`); yields its AMQP URL and removes everything after."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="tff-amqp-rabbit-"))
    try:
        lines = [line for line in config.splitlines() if line.strip()]
        with PrivateBroker(root, config=lines, start_timeout=start_timeout) as broker:
            yield broker.url
    finally:
        shutil.rmtree(root, ignore_errors=True)
