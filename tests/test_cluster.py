"""Past one broker: clients that follow a 3-node RabbitMQ cluster.

The cluster is private to this module (tests/support/private_cluster.py:
three nodes on 127.0.0.1 with their own ports and data, joined with
`rabbitmqctl join_cluster`, always stopped); the machine's default node is
never touched.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator

import aio_pika
import pytest

from tests.support.private_broker import rabbitmq_available
from tests.support.private_cluster import PrivateCluster
from tff_amqp.errors import BrokerUnreachableError
from tff_amqp.retry import connect_within
from tff_amqp.transport.connection import FailoverConnection, broker_urls, connect, redact_url

# Starting three nodes takes half a minute: not in the fast subset.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateCluster]:
    if not rabbitmq_available():
        pytest.fail("cluster tests need a local RabbitMQ install to start private nodes")
    root = tmp_path_factory.mktemp("cluster")
    try:
        with PrivateCluster(root) as nodes:
            yield nodes
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_broker_urls_split_a_comma_separated_list_and_redact_each() -> None:
    urls = "amqp://u:secret@h1:5672/v, amqp://u:secret@h2:5673/v"
    assert broker_urls(urls) == ["amqp://u:secret@h1:5672/v", "amqp://u:secret@h2:5673/v"]
    assert "secret" not in redact_url(urls) and redact_url(urls).count("***") == 2
    assert broker_urls("amqp://h:5672/") == ["amqp://h:5672/"]


async def _round_trip(connection: aio_pika.abc.AbstractRobustConnection, queue: str) -> bytes:
    channel = await connection.channel()
    declared = await channel.declare_queue(queue, auto_delete=True)
    await channel.default_exchange.publish(aio_pika.Message(b"ping"), routing_key=queue)
    for _ in range(50):
        message = await declared.get(fail=False, no_ack=True)
        if message is not None:
            await channel.close()
            return message.body
        await asyncio.sleep(0.1)
    raise AssertionError("the message did not come back")


async def test_a_connection_fails_over_to_another_node_when_its_node_dies(
    cluster: PrivateCluster,
) -> None:
    connection = await connect(cluster.broker_url, name="tff-amqp failover test")
    try:
        assert isinstance(connection, FailoverConnection)
        first = connection.address
        assert await _round_trip(connection, "failover-before") == b"ping"
        victim = next(n for n in cluster.nodes if f":{n.port}/" in first)
        reconnected = asyncio.Event()
        connection.reconnect_callbacks.add(lambda *_: reconnected.set())
        killed_at = time.monotonic()
        victim.kill()
        try:
            await asyncio.wait_for(reconnected.wait(), 30)
            assert time.monotonic() - killed_at < 10.0
            assert connection.address != first
            assert await _round_trip(connection, "failover-after") == b"ping"
        finally:
            victim.start()
            cluster.await_members(len(cluster.nodes))
    finally:
        await connection.close()


async def test_first_connect_skips_a_dead_node(cluster: PrivateCluster) -> None:
    dead = cluster.nodes[0]
    dead.kill()
    try:
        connection = await connect(
            cluster.broker_url, name="tff-amqp skip test", policy=connect_within(20)
        )
        try:
            assert f":{dead.port}/" not in connection.address
            assert await _round_trip(connection, "skip-dead") == b"ping"
        finally:
            await connection.close()
    finally:
        dead.start()
        cluster.await_members(len(cluster.nodes))


async def test_no_live_node_is_a_clear_error_naming_every_address() -> None:
    unused = ",".join(f"amqp://guest:guest@127.0.0.1:{port}/" for port in (1, 2))
    with pytest.raises(BrokerUnreachableError) as caught:
        await connect(unused, name="tff-amqp nobody", policy=connect_within(2))
    assert "127.0.0.1:1/" in str(caught.value) and "127.0.0.1:2/" in str(caught.value)
