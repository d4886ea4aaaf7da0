"""The test broker: where it is, whether it answers, and clean-up of a federation.

Nothing here imports `tff_amqp`, so the infrastructure can be tested on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import aio_pika

T = TypeVar("T")

LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/"
NO_BROKER_MESSAGE = (
    "no broker: set AMQP_URL (e.g. amqp://guest:guest@127.0.0.1:5672/) or run "
    "scripts/setup.sh which starts the local RabbitMQ, or start Docker "
    "(the tests then start a RabbitMQ container with testcontainers)"
)
TESTCONTAINERS_IMAGE = "rabbitmq:3.13-management"


class BrokerUnreachable(RuntimeError):
    """The broker at a URL did not accept an AMQP connection in time."""


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def new_federation_name() -> str:
    """A federation name no other test uses: ``t-<8 hex>``."""
    return f"t-{uuid.uuid4().hex[:8]}"


def run_async(factory: Callable[[], Awaitable[T]], timeout: float) -> T:
    """Run a coroutine to completion on a private event loop in its own thread.

    Safe from sync fixtures, from inside a running loop, and it never touches
    the event loop pytest-asyncio keeps for the session.
    """
    result: list[Any] = []
    error: list[BaseException] = []

    async def bounded() -> T:
        return await asyncio.wait_for(factory(), timeout)

    def target() -> None:
        try:
            result.append(asyncio.run(bounded()))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="tests-run-async", daemon=True)
    thread.start()
    thread.join(timeout + 10.0)
    if thread.is_alive():
        raise TimeoutError(f"coroutine did not finish within {timeout:.0f} s")
    if error:
        raise error[0]
    return result[0]


def docker_engine_available(timeout: float = 5.0) -> bool:
    """True if `docker info` answers (exit 0) within `timeout` seconds."""
    if shutil.which("docker") is None:
        return False
    try:
        return (
            subprocess.run(
                ["docker", "info"],
                capture_output=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def check_broker(url: str, timeout: float = 20.0) -> None:
    """Open and close one AMQP connection; retry until `timeout` (a broker may
    still be starting). Raise BrokerUnreachable naming the URL and the error."""

    async def probe() -> None:
        connection = await aio_pika.connect(url, timeout=5, client_properties=_props("probe"))
        await connection.close()

    deadline = time.monotonic() + timeout
    while True:
        try:
            run_async(probe, timeout=10.0)
            return
        except Exception as exc:
            if time.monotonic() >= deadline:
                raise BrokerUnreachable(
                    f"RabbitMQ at {redact(url)} did not accept a connection within "
                    f"{timeout:.0f} s ({type(exc).__name__}: {exc}). {NO_BROKER_MESSAGE}"
                ) from exc
        time.sleep(1.0)


@contextlib.contextmanager
def provide_broker(
    environ: Mapping[str, str],
    *,
    docker_available: Callable[[], bool] | None = None,
    container_factory: Callable[[str], Any] | None = None,
    check: Callable[..., None] | None = None,
) -> Iterator[str]:
    """The test broker's URL, in this order: ``AMQP_URL`` if set (checked to
    answer); else a testcontainers RabbitMQ if a Docker engine answers
    (stopped on exit); else BrokerUnreachable with NO_BROKER_MESSAGE. The
    callables are parameters so each branch can be tested without Docker."""
    docker_available = docker_available or docker_engine_available
    check = check or check_broker
    url = environ.get("AMQP_URL")
    if url:
        check(url)
        yield url
        return
    if docker_available():
        if container_factory is None:
            from testcontainers.rabbitmq import RabbitMqContainer

            container_factory = RabbitMqContainer
        with container_factory(TESTCONTAINERS_IMAGE) as container:
            url = container_url(container)
            check(url, timeout=60)
            yield url
        return
    raise BrokerUnreachable(NO_BROKER_MESSAGE)


def container_url(container: Any) -> str:
    """The AMQP URL of a started testcontainers RabbitMqContainer."""
    host = container.get_container_host_ip()
    port = container.get_exposed_port(container.port)
    return f"amqp://{container.username}:{container.password}@{host}:{port}/"


def _props(purpose: str) -> dict[str, Any]:
    return {"connection_name": f"tff-amqp tests: {purpose}"}


def _vhost(url: str) -> str:
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def _is_local(url: str) -> bool:
    return urlsplit(url).hostname in {"127.0.0.1", "localhost", "::1"}


def _rabbitmqctl_names(kind: str, vhost: str) -> list[str] | None:
    """Names from `rabbitmqctl list_<kind> name`, or None if rabbitmqctl is
    missing or refuses (e.g. not root)."""
    if shutil.which("rabbitmqctl") is None:
        return None
    try:
        done = subprocess.run(
            ["rabbitmqctl", f"list_{kind}", "-q", "--no-table-headers", "-p", vhost, "name"],
            capture_output=True,
            text=True,
            timeout=15,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def federation_entities(url: str, federation: str) -> tuple[list[str], list[str]] | None:
    """(queues, exchanges) named ``tff.<federation>.*`` on a local broker, or
    None when they cannot be listed cheaply (remote broker, no rabbitmqctl)."""
    if not _is_local(url):
        return None
    prefix = f"tff.{federation}."
    vhost = _vhost(url)
    queues = _rabbitmqctl_names("queues", vhost)
    exchanges = _rabbitmqctl_names("exchanges", vhost)
    if queues is None or exchanges is None:
        return None
    return (
        [q for q in queues if q.startswith(prefix)],
        [e for e in exchanges if e.startswith(prefix)],
    )


def delete_federation_entities(url: str, federation: str, timeout: float = 30.0) -> list[str]:
    """Best effort: delete the queues and exchanges of one federation.

    Listing uses `rabbitmqctl` (about 0.7 s a call), so this only works for a
    broker on this machine with rabbitmqctl usable by us; otherwise it does
    nothing and the broker keeps them (they are harmless: every test uses its
    own federation name, and the coordinator's queue is auto-delete anyway).
    Deleting goes over AMQP. Returns the names deleted; never raises.
    """
    try:
        found = federation_entities(url, federation)
    except Exception:
        return []
    if not found or not (found[0] or found[1]):
        return []
    queues, exchanges = found

    async def delete() -> list[str]:
        deleted: list[str] = []
        connection = await aio_pika.connect(url, timeout=5, client_properties=_props("cleanup"))
        try:
            for kind, names in (("queue", queues), ("exchange", exchanges)):
                for name in names:
                    channel = await connection.channel()
                    with contextlib.suppress(Exception):
                        if kind == "queue":
                            await channel.queue_delete(name)
                        else:
                            await channel.exchange_delete(name)
                        deleted.append(name)
                    with contextlib.suppress(Exception):
                        await channel.close()
        finally:
            await connection.close()
        return deleted

    try:
        return run_async(delete, timeout=timeout)
    except Exception:
        return []
