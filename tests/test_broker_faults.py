"""A flaky broker never hangs a round nor corrupts it.

Faults are injected only on a private RabbitMQ node this module starts itself
(its own node name, ports, cookie copy and data dir): the machine's shared
broker is never cut or restarted by tests.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

import tff_amqp
from tests.support.broker import new_federation_name
from tests.support.computations import mean_glucose
from tests.support.federation import Federation, run_in, start_federation
from tests.support.private_broker import PrivateBroker, rabbitmq_available
from tests.test_failures import _context, _direct_mean, _wait_live
from tff_amqp.errors import TffAmqpError
from tff_amqp.local import LocalFederation

# Long real-broker tests: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

NAMES = ("alpha", "bravo", "charlie")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBroker]:
    if not rabbitmq_available():
        pytest.fail("broker fault tests need a local RabbitMQ install to start a private node")
    root = tmp_path_factory.mktemp("faults")
    try:
        with PrivateBroker(root) as node:
            yield node
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def silos(broker: PrivateBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("fault-silos")
    with LocalFederation(broker.url, new_federation_name(), log_dir=root / "logs") as local:
        yield start_federation(local, root, names=NAMES, clients_per_silo=(2, 1, 3))


def test_connections_closed_mid_run_then_the_next_invocation_succeeds(broker, silos):
    expected = _direct_mean(silos, NAMES)
    outcomes: list[object] = []
    stop = threading.Event()
    with _context(broker.url, silos, min_silos=len(NAMES), deadline=30.0) as context:

        def keep_running() -> None:
            while not stop.is_set():
                try:
                    outcomes.append(run_in(context, mean_glucose, tff_amqp.silo_data("readings")))
                except TffAmqpError as e:  # failing clearly is allowed, hanging is not
                    outcomes.append(e)

        worker = threading.Thread(target=keep_running)
        worker.start()
        try:
            time.sleep(1.0)
            broker.ctl("close_all_connections", "tff-amqp fault injection")
            time.sleep(3.0)
        finally:
            stop.set()
            worker.join(timeout=60)
        assert not worker.is_alive(), "an invocation hung after the connections were closed"
        for outcome in outcomes:
            if not isinstance(outcome, Exception):
                np.testing.assert_allclose(outcome, expected, rtol=1e-9)
        _wait_live(context, NAMES)
        np.testing.assert_allclose(
            run_in(context, mean_glucose, tff_amqp.silo_data("readings")), expected, rtol=1e-9
        )
    assert any(not isinstance(o, Exception) for o in outcomes)


def test_broker_restart_between_rounds(broker, silos):
    expected = _direct_mean(silos, NAMES)
    with _context(broker.url, silos, min_silos=len(NAMES), cohort_timeout=90.0) as context:
        np.testing.assert_allclose(
            run_in(context, mean_glucose, tff_amqp.silo_data("readings")), expected, rtol=1e-9
        )
        broker.ctl("stop_app")
        broker.ctl("start_app")
        broker.ctl("await_startup")
        np.testing.assert_allclose(
            run_in(context, mean_glucose, tff_amqp.silo_data("readings")), expected, rtol=1e-9
        )
