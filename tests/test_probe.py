"""`python -m tff_amqp.observe.probe`, the exec probe of deploy/kubernetes:
healthy only while the process's heartbeats reach the broker (its
published-bytes counter grows), checked on a metrics endpoint served here
and on a real `tff-amqp silo`."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter

from tests.support.data import write_silo_csvs
from tff_amqp.local import SiloOptions
from tff_amqp.observe.metrics import MetricsServer
from tff_amqp.observe.probe import main


@pytest.fixture
def endpoint() -> Iterator[tuple[int, Counter]]:
    registry = CollectorRegistry()
    counter = Counter("tff_amqp_silo_published_bytes", "bytes published", registry=registry)
    with MetricsServer(registry, 0, addr="127.0.0.1") as server:
        yield server.port, counter


def test_healthy_while_heartbeats_are_published(endpoint):
    port, counter = endpoint
    stop = threading.Event()

    def heartbeats() -> None:
        while not stop.wait(0.2):
            counter.inc(120)

    thread = threading.Thread(target=heartbeats)
    thread.start()
    try:
        assert main(["--port", str(port), "--within", "3"]) == 0
    finally:
        stop.set()
        thread.join()


def test_unhealthy_when_no_heartbeat_is_published(endpoint, capsys):
    port, counter = endpoint
    counter.inc(120)
    assert main(["--port", str(port), "--within", "1"]) == 1
    assert "did not grow in 1 s" in capsys.readouterr().err


def test_unhealthy_without_the_metric_or_the_endpoint(endpoint, capsys):
    port, _ = endpoint
    assert main(["--port", str(port), "--within", "1", "--role", "worker"]) == 1
    assert "has no tff_amqp_worker_published_bytes_total" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert main(["--port", str(free), "--within", "1"]) == 1
    assert "no metrics at" in capsys.readouterr().err


def test_a_real_silo_is_healthy_until_it_stops(local, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = write_silo_csvs(tmp_path, 0, clients=2)
    silo = local.start_silo("probed", data={"rows": data}, options=SiloOptions(metrics_port=port))
    local.wait_ready(timeout=120)
    assert main(["--port", str(port), "--within", "5"]) == 0
    silo.stop()
    assert main(["--port", str(port), "--within", "2"]) == 1


def test_a_real_pool_worker_is_healthy(local, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = write_silo_csvs(tmp_path, 0, clients=2)
    local.start_pool_worker("pooled", data={"rows": data}, options=SiloOptions(metrics_port=port))
    local.wait_ready(timeout=120)
    assert main(["--port", str(port), "--within", "5", "--role", "worker"]) == 0
