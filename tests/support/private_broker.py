"""A private RabbitMQ node for tests that need other broker settings (here: a
16 MiB max_message_size, RabbitMQ 4.x's default) without touching the shared
broker. The node runs in its own process group with its own name, ports and
data directory, and is stopped (with its Erlang processes) afterwards; the
shared epmd is left alone.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def private_rabbitmq(*, config: str = "", start_timeout: float = 120.0) -> Iterator[str]:
    """Start a RabbitMQ node with extra `config` lines (rabbitmq.conf syntax);
    yield its AMQP URL (guest/guest on 127.0.0.1); stop it and delete its
    directory on exit."""
    node = f"t{uuid.uuid4().hex[:8]}@localhost"
    port, dist_port = _free_port(), _free_port()
    # Packaged rabbitmq-server drops to the `rabbitmq` user: the node's
    # directory must be its own, outside root-only temp folders.
    base = Path(tempfile.mkdtemp(prefix=f"tff-amqp-{node.split('@')[0]}-"))
    base.chmod(0o755)
    conf = base / "rabbitmq.conf"
    conf.write_text(
        f"listeners.tcp.default = 127.0.0.1:{port}\n"
        "loopback_users = none\n"
        "vm_memory_high_watermark.relative = 0.2\n"
        "disk_free_limit.absolute = 50MB\n" + config + "\n"
    )
    plugins = base / "enabled_plugins"
    plugins.write_text("[].\n")
    _give_to_rabbitmq_user(base)
    env = {
        **os.environ,
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_CONFIG_FILE": str(conf),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
        "RABBITMQ_PID_FILE": str(base / "node.pid"),
        "RABBITMQ_FEATURE_FLAGS_FILE": str(base / "feature_flags"),
        "RABBITMQ_QUORUM_DIR": str(base / "quorum"),
        "RABBITMQ_STREAM_DIR": str(base / "stream"),
        "ERL_CRASH_DUMP": str(base / "erl_crash.dump"),
    }
    log = open(base / "server.out", "wb")
    process = subprocess.Popen(
        ["rabbitmq-server"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_until_up(process, node, env, base, start_timeout)
        yield f"amqp://guest:guest@127.0.0.1:{port}/"
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(
                ["rabbitmqctl", "-n", node, "stop"], env=env, timeout=60, capture_output=True
            )
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(30)
        # The node's beam.smp and its helpers share the process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def _give_to_rabbitmq_user(base: Path) -> None:
    try:
        user = pwd.getpwnam("rabbitmq")
    except KeyError:
        return
    if os.geteuid() != 0:
        return
    for path in [base, *base.rglob("*")]:
        os.chown(path, user.pw_uid, user.pw_gid)


def _wait_until_up(
    process: subprocess.Popen[bytes], node: str, env: dict[str, str], base: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"private RabbitMQ node {node} exited ({process.returncode}): "
                + (base / "server.out").read_text(errors="replace")[-2000:]
            )
        result = subprocess.run(
            ["rabbitmqctl", "-n", node, "await_startup", "--timeout", "5"],
            env=env,
            capture_output=True,
            timeout=30,
        )
        if result.returncode == 0:
            return
        time.sleep(1.0)
    raise TimeoutError(f"private RabbitMQ node {node} did not start within {timeout:.0f} s")
