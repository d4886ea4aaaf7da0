"""TLS: a silo and the coordinator connect with amqps://, verify the broker and
log in with their client certificates (EXTERNAL, user = certificate CN), and
run a computation; without a certificate, or with one from another CA, the
broker refuses the connection.

Runs on a PRIVATE RabbitMQ node with a TLS listener (the shared broker is never
reconfigured). The node's management API lets `tff-amqp provision --cert-cn`
create the certificate user.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support.broker import new_federation_name
from tests.support.data import write_silo_csvs
from tests.support.federation import run_in
from tests.support.private_broker import PrivateBroker
from tests.support.tls import Pki
from tff_amqp.errors import BrokerUnreachableError
from tff_amqp.local import LocalFederation, SiloOptions
from tff_amqp.retry import connect_within
from tff_amqp.transport.connection import connect
from tff_amqp.transport.tls import TlsFiles

# Long real-broker tests: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

CERT_CN = "silo-tls-alpha"
COORDINATOR_CN = "coordinator-tls"


class TlsBroker:
    def __init__(self, broker: PrivateBroker, pki: Pki, tls_port: int, admin_port: int) -> None:
        self.broker = broker
        self.pki = pki
        self.tls_port = tls_port
        self.admin_url = f"http://guest:guest@127.0.0.1:{admin_port}/"

    @property
    def amqps_base(self) -> str:
        return f"amqps://localhost:{self.tls_port}/"


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    root = tmp_path_factory.mktemp("tls")
    pki = Pki.create(root / "pki")
    broker = PrivateBroker(
        root,
        plugins=["rabbitmq_management", "rabbitmq_auth_mechanism_ssl"],
    )
    tls_port = broker.reserve_port("amqps")
    admin_port = broker.reserve_port("management")
    broker.config_lines += [
        f"listeners.ssl.default = {tls_port}",
        f"ssl_options.cacertfile = {pki.ca_cert}",
        f"ssl_options.certfile = {pki.server_cert}",
        f"ssl_options.keyfile = {pki.server_key}",
        "ssl_options.verify = verify_peer",
        "ssl_options.fail_if_no_peer_cert = true",
        "auth_mechanisms.1 = EXTERNAL",
        # PLAIN stays for guest on the loopback plain listener (the test's admin).
        "auth_mechanisms.2 = PLAIN",
        "ssl_cert_login_from = common_name",
        f"management.tcp.port = {admin_port}",
        "management.tcp.ip = 127.0.0.1",
    ]
    with broker:
        yield TlsBroker(broker, pki, tls_port, admin_port)


def _provision(args: list[str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "tff_amqp", "provision", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def _refused(url: str, tls: TlsFiles) -> str:
    async def attempt() -> None:
        connection = await connect(
            url, name="tls test", policy=connect_within(3.0), ssl_context=tls.context()
        )
        await connection.close()

    with pytest.raises(BrokerUnreachableError) as caught:
        asyncio.run(attempt())
    return str(caught.value)


def test_silo_and_coordinator_connect_with_client_certificates_and_serve(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    import tff_amqp
    from tests.support.computations import fed_sum

    federation = new_federation_name()
    url = _provision(
        [
            "add-silo", "alpha", "--federation", federation, "--broker", tls_broker.admin_url,
            "--amqp-url", tls_broker.amqps_base, "--cert-cn", CERT_CN,
        ]
    )  # fmt: skip
    assert url == f"amqps://{CERT_CN}@localhost:{tls_broker.tls_port}/?auth=external"
    users = tls_broker.broker.ctl("list_users", "-q")
    assert CERT_CN in users
    cert, key = tls_broker.pki.client(CERT_CN)
    folder = write_silo_csvs(tmp_path, 0, 2)
    options = SiloOptions(
        no_declare=True, tls_ca=tls_broker.pki.ca_cert, tls_cert=cert, tls_key=key
    )
    with LocalFederation(url, federation, log_dir=tmp_path / "logs") as local:
        local.start_silo("alpha", data={"readings": folder}, options=options)
        local.wait_ready(timeout=180)
        # The coordinator too: amqps with its own certificate, given in the
        # URL's query (aiormq reads cafile/certfile/keyfile from it).
        coordinator_url = _provision(
            [
                "add-coordinator", "--federation", federation, "--broker", tls_broker.admin_url,
                "--amqp-url", tls_broker.amqps_base, "--cert-cn", COORDINATOR_CN,
            ]
        )  # fmt: skip
        coordinator_cert, coordinator_key = tls_broker.pki.client(COORDINATOR_CN)
        coordinator_url += (
            f"&cafile={tls_broker.pki.ca_cert}&certfile={coordinator_cert}"
            f"&keyfile={coordinator_key}"
        )
        context = tff_amqp.create_sync_amqp_execution_context(
            coordinator_url, federation=federation, min_silos=1, cohort_timeout=60.0
        )
        try:
            assert run_in(context, fed_sum, [1.5, 2.5]) == pytest.approx(4.0)
            # Checked while the coordinator is connected.
            connections = tls_broker.broker.ctl(
                "list_connections", "-q", "user", "ssl", "auth_mechanism"
            )
        finally:
            context.close()
        assert "guest" not in connections
        assert f"{CERT_CN}\ttrue\tEXTERNAL" in connections
        assert f"{COORDINATOR_CN}\ttrue\tEXTERNAL" in connections


def test_without_client_certificate_the_broker_refuses(tls_broker: TlsBroker) -> None:
    url = f"amqps://{CERT_CN}@localhost:{tls_broker.tls_port}/?auth=external"
    message = _refused(url, TlsFiles(ca=tls_broker.pki.ca_cert))
    assert "cannot reach" in message or "refused" in message


def test_certificate_from_another_ca_is_refused(tls_broker: TlsBroker, tmp_path: Path) -> None:
    stranger = Pki.create(tmp_path / "other-ca", ca_name="someone else's CA")
    cert, key = stranger.client(CERT_CN)  # right name, wrong issuer
    url = f"amqps://{CERT_CN}@localhost:{tls_broker.tls_port}/?auth=external"
    _refused(url, TlsFiles(ca=tls_broker.pki.ca_cert, cert=cert, key=key))


def test_broker_with_untrusted_certificate_is_refused_by_the_silo(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    """Peer verification works both ways: a CA the broker's certificate does
    not chain to makes the client refuse the broker."""
    stranger = Pki.create(tmp_path / "other-ca", ca_name="not the broker's CA")
    cert, key = tls_broker.pki.client(CERT_CN)
    url = f"amqps://{CERT_CN}@localhost:{tls_broker.tls_port}/?auth=external"
    message = _refused(url, TlsFiles(ca=stranger.ca_cert, cert=cert, key=key))
    assert "CERTIFICATE_VERIFY_FAILED" in message


def test_pool_worker_connects_with_a_client_certificate_and_serves_a_round(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    """`tff-amqp worker` has the silo's TLS options: a stateless round runs with
    the worker and the coordinator both on amqps with client certificates, and
    the worker's own metrics endpoint counts the items."""
    import tensorflow as tf
    import tensorflow_federated as tff

    import tff_amqp
    from tests.support.computations import ROW
    from tests.support.data import read_column
    from tests.support.private_broker import free_port
    from tests.test_observe import scrape, value

    federation = new_federation_name()
    cn = "worker-tls-beta"
    url = _provision(
        [
            "add-silo", "beta", "--federation", federation, "--broker", tls_broker.admin_url,
            "--amqp-url", tls_broker.amqps_base, "--cert-cn", cn,
        ]
    )  # fmt: skip
    coordinator_url = _provision(
        [
            "add-coordinator", "--federation", federation, "--broker", tls_broker.admin_url,
            "--amqp-url", tls_broker.amqps_base, "--cert-cn", COORDINATOR_CN,
        ]
    )  # fmt: skip
    cert, key = tls_broker.pki.client(cn)
    coordinator_cert, coordinator_key = tls_broker.pki.client(COORDINATOR_CN)
    coordinator_url += (
        f"&cafile={tls_broker.pki.ca_cert}&certfile={coordinator_cert}&keyfile={coordinator_key}"
    )
    folder = write_silo_csvs(tmp_path, 1, 3)
    metrics_port = free_port()

    @tff.tensorflow.computation(tff.SequenceType(ROW))
    def count(rows: object) -> object:
        return rows.reduce(np.int64(0), lambda n, _: n + 1)  # type: ignore[attr-defined]

    @tff.tensorflow.computation(np.int64, np.int64)
    def add(a: object, b: object) -> object:
        return tf.add(a, b)

    @tff.federated_computation(
        tff.FederatedType(np.int64, tff.SERVER),
        tff.FederatedType(tff.SequenceType(ROW), tff.CLIENTS),
    )
    def count_round(state: object, rows: object) -> object:
        total = tff.federated_sum(tff.federated_map(count, rows))
        return tff.federated_map(add, (state, total)), total

    options = SiloOptions(
        no_declare=True, tls_ca=tls_broker.pki.ca_cert, tls_cert=cert, tls_key=key,
        metrics_port=metrics_port,
    )  # fmt: skip
    with LocalFederation(url, federation, log_dir=tmp_path / "logs") as local:
        local.start_pool_worker("beta", data={"readings": folder}, options=options)
        local.wait_ready(timeout=180)
        context = tff_amqp.create_sync_amqp_mapreduce_context(
            coordinator_url, federation=federation, min_silos=1, shards_per_silo=2
        )
        try:
            state, total = run_in(
                context, count_round, np.int64(10), tff_amqp.silo_data("readings")
            )
            connections = tls_broker.broker.ctl(
                "list_connections", "-q", "user", "ssl", "auth_mechanism"
            )
        finally:
            context.close()
        items = value(scrape(metrics_port), "tff_amqp_worker_items_total", silo="beta")
    rows = len(read_column(folder, "glucose"))
    assert total == rows and state == 10 + rows
    assert f"{cn}\ttrue\tEXTERNAL" in connections
    assert items == 2  # one per shard
