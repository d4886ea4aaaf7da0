"""Test session set-up: a real broker, process hygiene, TFF's native context.

Every process a test starts inherits TFF_AMQP_TEST_SESSION; when the session
ends, any process still carrying it (a silo, a worker_binary, TFF's own
native worker) is killed and the session FAILS, naming it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TFF_AMQP_TEST_SESSION", uuid.uuid4().hex)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_MARKER = f"TFF_AMQP_TEST_SESSION={os.environ['TFF_AMQP_TEST_SESSION']}".encode()

pytest_plugins = ["tests.support.federation"]


def _docker_engine_available() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _check_broker(url: str) -> None:
    import asyncio

    from tff_amqp.retry import RetryPolicy
    from tff_amqp.transport.connection import connect

    async def probe() -> None:
        connection = await connect(url, name="tff-amqp tests", policy=RetryPolicy(total_timeout=20))
        await connection.close()

    asyncio.run(probe())


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """AMQP_URL if set; else a testcontainers RabbitMQ if Docker runs; else fail."""
    url = os.environ.get("AMQP_URL")
    if url:
        _check_broker(url)
        yield url
        return
    if _docker_engine_available():
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3.13-management") as container:
            params = container.get_connection_params()
            url = (
                f"amqp://{params.credentials.username}:{params.credentials.password}"
                f"@{params.host}:{params.port}/"
            )
            _check_broker(url)
            yield url
        return
    pytest.fail(
        "no RabbitMQ broker for the integration tests: set AMQP_URL "
        "(e.g. amqp://guest:guest@127.0.0.1:5672/), or run `bash scripts/test.sh`, which starts "
        "the local RabbitMQ, or start a Docker engine for testcontainers.",
        pytrace=False,
    )


def _descendant_workers() -> list[int]:
    return [pid for pid, cmd in _marked_processes() if b"worker_binary" in cmd]


@pytest.fixture(scope="session")
def native_context() -> Iterator[Any]:
    """TFF's own native runtime (C++ worker_binary behind RemoteExecutor), for
    parity checks. TFF's launcher leaves its worker running; we kill it."""
    import tensorflow_federated as tff

    context = tff.backends.native.create_sync_local_cpp_execution_context()
    before = set(_descendant_workers())
    try:
        yield context
    finally:
        for pid in set(_descendant_workers()) - before:
            _kill(pid)


def _marked_processes() -> list[tuple[int, bytes]]:
    """(pid, cmdline) of processes other than us carrying this session's marker."""
    found = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").strip()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            continue
        if _MARKER in environ.split(b"\0"):
            found.append((int(entry.name), cmdline))
    return found


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Give processes stopped during teardown a moment to exit.
    deadline = time.monotonic() + 10
    leftovers = _marked_processes()
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.5)
        leftovers = _marked_processes()
    if leftovers:
        for pid, _ in leftovers:
            _kill(pid)
        lines = "\n".join(
            f"  pid {pid}: {cmd.decode(errors='replace')[:200]}" for pid, cmd in leftovers
        )
        print(f"\nLEAKED PROCESSES (killed now), the test session fails:\n{lines}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
