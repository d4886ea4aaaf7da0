"""Test session set-up: a real broker, per-test federations, process hygiene,
TFF's native context.

Every process a test starts inherits TFF_AMQP_TEST_SESSION; when the session
ends, any process still carrying it (a silo, a worker_binary, TFF's own
native worker) is killed and the session FAILS, naming it.

TensorFlow Federated is imported lazily inside fixtures (it takes ~6 s), so
collecting tests stays fast.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.broker import (
    BrokerUnreachable,
    delete_federation_entities,
    new_federation_name,
    provide_broker,
    redact,
)
from tests.support.processes import marked_processes
from tff_amqp.local import LocalFederation, ProcessGroup
from tff_amqp.processes import kill_pid, reaping_children

MARKER = "TFF_AMQP_TEST_SESSION"
os.environ.setdefault(MARKER, uuid.uuid4().hex)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")  # see tff_amqp/__init__.py

pytest_plugins = ["tests.support.federation"]

_LEAKS = pytest.StashKey[list[tuple[int, str]]]()


def pytest_report_header(config: pytest.Config) -> list[str]:
    url = os.environ.get("AMQP_URL")
    broker = redact(url) if url else "unset (testcontainers if Docker answers, else fail)"
    return [f"tff-amqp: AMQP_URL={broker}; {MARKER}={os.environ[MARKER]}"]


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """A reachable broker: AMQP_URL if set; else a testcontainers RabbitMQ if a
    Docker engine answers; else the test fails (never skips)."""
    try:
        with provide_broker(os.environ) as url:
            yield url
    except BrokerUnreachable as exc:
        pytest.fail(str(exc), pytrace=False)


_GROUPS = pytest.StashKey[list[ProcessGroup]]()


@pytest.fixture
def federation(amqp_url: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A federation name of this test alone (``t-<8 hex>``), so tests never see
    each other's queues. Afterwards its ``tff.<name>.*`` queues and exchanges
    are deleted, best effort: only on a broker on this machine whose
    `rabbitmqctl` works (listing costs ~0.7 s); elsewhere they stay (harmless,
    nobody else uses the name; the coordinator's queue is auto-delete).
    The test's processes are stopped first, so no silo declares them again."""
    name = new_federation_name()
    yield name
    for group in request.node.stash.get(_GROUPS, []):
        group.stop_all()
    delete_federation_entities(amqp_url, name)


@pytest.fixture
def process_group(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ProcessGroup]:
    """A ProcessGroup for this test; its processes are stopped after the test.
    Logs are under pytest's tmp dir (``.../logs<N>/<name>.log``)."""
    with ProcessGroup(tmp_path_factory.mktemp("logs")) as group:
        request.node.stash.setdefault(_GROUPS, []).append(group)
        yield group


@pytest.fixture
def local(
    amqp_url: str,
    federation: str,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[LocalFederation]:
    """The launcher (`tff_amqp.local.LocalFederation`) for this test's
    federation on the shared broker: silos, pool workers and simulation hosts
    started through it are stopped after the test, before `federation` deletes
    the broker objects. Logs are under pytest's tmp dir."""
    with LocalFederation(amqp_url, federation, log_dir=tmp_path_factory.mktemp("logs")) as group:
        request.node.stash.setdefault(_GROUPS, []).append(group)
        yield group


@pytest.fixture(scope="session")
def native_context() -> Iterator[Any]:
    """TFF's own native runtime (C++ worker_binary behind a RemoteExecutor), for
    parity checks: ``with tff.framework.get_context_stack().install(native_context)``.

    TFF's launcher starts worker_binary as our direct child and leaves it
    running; at teardown we SIGKILL the ones that appeared meanwhile. (They stay
    zombies until TFF's Popen reaps them, which keeps their pids from being
    reused before TFF's own exit-time kill.)
    """
    import tensorflow_federated as tff

    with reaping_children("worker_binary"):
        yield tff.backends.native.create_sync_local_cpp_execution_context()


@pytest.fixture(scope="session")
def test_context() -> Iterator[Any]:
    """TFF's test runtime: the native C++ worker with TFF's insecure bodies for
    the secure intrinsics (which the native runtime cannot run), for parity
    checks of `federated_secure_modular_sum` and friends. Its worker_binary is
    killed at teardown like the native context's."""
    import tensorflow_federated as tff

    with reaping_children("worker_binary"):
        yield tff.backends.test.create_sync_test_cpp_execution_context()


@pytest.fixture(scope="session", autouse=True)
def _tff_default_context_workers() -> Iterator[None]:
    """A TFF computation called with no context installed runs on TFF's
    default native context, whose launcher starts a worker_binary as our
    direct child and leaves it running (tests/test_silo_data.py does this).
    In a full run `native_context` reaps those at its teardown; this does the
    same for any subset (e.g. -m "not slow"), so the leak check below only
    reports processes tests really left behind (silos, their workers)."""
    with reaping_children("worker_binary"):
        yield


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After every fixture is torn down: no process carrying our marker may be
    left. Stragglers get 10 s (TFF_AMQP_LEAK_GRACE_SECONDS) to exit, then are
    killed, and the session fails."""
    marker = os.environ[MARKER]
    deadline = time.monotonic() + float(os.environ.get("TFF_AMQP_LEAK_GRACE_SECONDS", "10"))
    leftovers = marked_processes(MARKER, marker)
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.5)
        leftovers = marked_processes(MARKER, marker)
    if not leftovers:
        return
    for pid, _ in leftovers:
        kill_pid(pid)
    session.config.stash[_LEAKS] = leftovers
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    leftovers = config.stash.get(_LEAKS, None)
    if not leftovers:
        return
    terminalreporter.write_sep("=", "LEAKED PROCESSES: the session fails", red=True)
    for pid, command in leftovers:
        terminalreporter.write_line(f"pid {pid} (killed now): {command[:300]}")
