"""The broker configuration in broker/ works, and agrees with the code.

- broker/definitions.json imports into a real RabbitMQ and declares exactly the
  exchanges and coordinator permissions `tff-amqp provision` would;
- broker/rabbitmq-tls.conf.example (paths and ports substituted) starts a
  RabbitMQ that refuses a TLS client without a certificate and lets the
  coordinator log in with its certificate (EXTERNAL), into the vhost of the
  definitions;
- the provisioning permission regexes grant a silo its own names and nothing
  else (unit check of the expressions, beside the broker tests in
  test_security.py).
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import aiormq
import pytest

from tests.support.private_broker import PrivateBroker
from tests.support.tls import Pki
from tff_amqp.errors import BrokerUnreachableError
from tff_amqp.provision import (
    coordinator_permissions,
    federation_exchanges,
    silo_permissions,
)
from tff_amqp.retry import connect_within
from tff_amqp.topology import Topology
from tff_amqp.transport.connection import connect
from tff_amqp.transport.tls import TlsFiles

# Long real-broker tests: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

BROKER_DIR = Path(__file__).resolve().parents[1] / "broker"


def _definitions() -> dict:
    return json.loads((BROKER_DIR / "definitions.json").read_text())


def test_definitions_agree_with_provisioning() -> None:
    definitions = _definitions()
    topology = Topology("default")
    exchanges = {e["name"]: e["type"] for e in definitions["exchanges"]}
    assert exchanges == federation_exchanges(topology)
    assert all(e["durable"] for e in definitions["exchanges"])
    (permission,) = definitions["permissions"]
    expected = coordinator_permissions(topology)
    assert (permission["configure"], permission["write"], permission["read"]) == (
        expected.configure,
        expected.write,
        expected.read,
    )
    (policy,) = definitions["policies"]
    pattern = re.compile(policy["pattern"])
    for silo_queue in (
        topology.request_queue("a"),
        topology.bulk_queue("a"),
        topology.work_queue("a"),
    ):
        assert pattern.match(silo_queue)
    assert not pattern.match(topology.coordinator_queue)
    assert policy["definition"]["dead-letter-exchange"] == topology.dead_letter_exchange


def test_silo_permission_regexes_grant_only_its_own_names() -> None:
    topology = Topology("fed-1")
    perms = silo_permissions(topology, "a_1")
    read, write, topic = (re.compile(x) for x in (perms.read, perms.write, perms.topic_write))
    for own in (
        "tff.fed-1.req.a_1",
        "tff.fed-1.bulk.a_1",
        "tff.fed-1.work.a_1",
        "tff.fed-1.broadcast.a_1",
    ):
        assert read.match(own)
    for other in (
        "tff.fed-1.broadcast.b",
        "tff.fed-1.broadcast.a_12",
        "tff.fed-1.req.a_12",
        "tff.fed-1.req.b",
        "tff.fed-12.req.a_1",
        "tff.fed-1.coordinator",
        "tff.fed-1.req.a_1x",
        "tffXfed-1.req.a_1",
    ):
        assert not read.match(other), other
    assert write.match("tff.fed-1.replies")
    for other in ("", "amq.default", "tff.fed-1.requests", "tff.fed-1.replies2"):
        assert not write.match(other), other
    assert topic.match("reply.a_1") and topic.match("bulk.a_1")
    for other in ("reply.a_12", "reply.b", "reply.*", "reply.#", "bulk.b"):
        assert not topic.match(other), other
    # Configure: only its own lock queue (quorum federations), nothing else.
    configure = re.compile(perms.configure)
    assert configure.match("tff.fed-1.lock.a_1")
    for other in (
        "tff.fed-1.req.a_1",
        "tff.fed-1.lock.a_12",
        "tff.fed-1.lock.b",
        "tff.fed-1.lock.coordinator",
    ):
        assert not configure.match(other), other


def test_definitions_import_into_rabbitmq(tmp_path: Path) -> None:
    with PrivateBroker(tmp_path) as broker:
        broker.ctl("import_definitions", str(BROKER_DIR / "definitions.json"))
        exchanges = broker.ctl("list_exchanges", "-q", "-p", "tff", "name", "type")
        for name, kind in federation_exchanges(Topology("default")).items():
            assert f"{name}\t{kind}" in exchanges
        permissions = broker.ctl("list_user_permissions", "-q", "coordinator.default")
        assert "tff\t^tff\\.default\\..*$" in permissions
        policies = broker.ctl("list_policies", "-q", "-p", "tff")
        assert "tff-default-silo-queues" in policies


def _example_config(broker: PrivateBroker, pki: Pki, tls_port: int, admin_port: int) -> list[str]:
    substitutions = {
        "listeners.tcp.1": f"127.0.0.1:{broker.port}",
        "listeners.ssl.default": str(tls_port),
        "ssl_options.cacertfile": str(pki.ca_cert),
        "ssl_options.certfile": str(pki.server_cert),
        "ssl_options.keyfile": str(pki.server_key),
        "management.tcp.port": str(admin_port),
        "load_definitions": str(BROKER_DIR / "definitions.json"),
    }
    lines = []
    for line in (BROKER_DIR / "rabbitmq-tls.conf.example").read_text().splitlines():
        key = line.partition("=")[0].strip()
        if key in substitutions:
            line = f"{key} = {substitutions.pop(key)}"
        lines.append(line)
    assert not substitutions, f"the example no longer sets {sorted(substitutions)}"
    return lines


def test_tls_example_config_starts_and_enforces_certificates(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    broker = PrivateBroker(tmp_path, plugins=["rabbitmq_management", "rabbitmq_auth_mechanism_ssl"])
    tls_port = broker.reserve_port("amqps")
    admin_port = broker.reserve_port("management")
    broker.config_lines += _example_config(broker, pki, tls_port, admin_port)
    cert, key = pki.client("coordinator.default")
    url = f"amqps://coordinator.default@localhost:{tls_port}/tff?auth=external"

    async def declare_with_certificate() -> None:
        tls = TlsFiles(ca=pki.ca_cert, cert=cert, key=key)
        connection = await connect(url, name="example config", ssl_context=tls.context())
        try:
            channel = await connection.channel()
            await channel.declare_queue("tff.default.coordinator", auto_delete=True)
            with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
                await channel.declare_queue("not-this-federation")
        finally:
            await connection.close()

    async def without_certificate() -> None:
        tls = TlsFiles(ca=pki.ca_cert)
        connection = await connect(
            url, name="no cert", ssl_context=tls.context(), policy=connect_within(3)
        )
        await connection.close()

    with broker:
        asyncio.run(declare_with_certificate())
        with pytest.raises(BrokerUnreachableError):
            asyncio.run(without_certificate())
