"""Broker faults are not silo faults: every invocation still gets every silo.

Faults are injected only on a private RabbitMQ node this module starts itself
(its own node name, ports, cookie copy and data dir): the machine's shared
broker is never cut or restarted by tests.

Each invocation runs with ``min_silos=1`` and ``strict=True``: a coordinator
that took its own reconnect for dead silos would drop them (K of N) and
strict turns that into an error, so a passing result covers every silo. Each
result is compared with TFF's native runtime over the same clients' data.

- ``close_all_connections`` 0.8 s into a ~2 s round, 3 times;
- ``stop_app`` / ``start_app`` 0.8 s into a round, 3 times;
- ``kill -9`` of the broker and a restart (an outage shorter than the
  heartbeat timeout), 3 times: the very next invocation succeeds.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

import tff_amqp
from tests.support.broker import new_federation_name
from tests.support.computations import slow_mean
from tests.support.federation import Federation, native_over, run_in, start_federation, wait_live
from tests.support.private_broker import PrivateBroker, rabbitmq_available
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


@pytest.fixture(scope="module")
def expected(silos: Federation, native_context) -> float:
    """TFF native's result over every silo's clients."""
    return float(native_over(native_context, slow_mean, silos, NAMES))


def _context(broker: PrivateBroker, silos: Federation, **options):
    options.setdefault("heartbeat_timeout", 5.0)
    return tff_amqp.create_sync_amqp_execution_context(
        broker.url,
        federation=silos.name,
        min_silos=1,
        strict=True,
        cohort_timeout=60.0,
        deadline=120.0,
        **options,
    ).start()


def _round_with_fault(context, inject: Callable[[], None], *, at: float = 0.8) -> object:
    """Run one invocation; `inject` the fault `at` seconds into it. Returns
    the result (or the exception it raised)."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(run_in(context, slow_mean, tff_amqp.silo_data("readings")))
        except Exception as e:  # reported by the caller
            outcome.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(at)
    inject()
    worker.join(timeout=150)
    assert not worker.is_alive(), "the invocation hung after the fault"
    return outcome[0]


def _assert_all_silos(context, result: object, expected: float) -> None:
    if isinstance(result, Exception):
        raise AssertionError(f"invocation failed after a broker fault: {result!r}") from result
    np.testing.assert_allclose(result, expected, rtol=1e-9)
    report = context.last_invocation
    assert sorted(report.took_part) == sorted(NAMES) and not report.dropped


def test_connections_closed_mid_round_three_times_every_result_has_all_silos(
    broker, silos, expected
):
    with _context(broker, silos) as context:
        wait_live(context, NAMES, timeout=60.0)
        for _ in range(3):
            result = _round_with_fault(
                context, lambda: broker.ctl("close_all_connections", "tff-amqp fault injection")
            )
            _assert_all_silos(context, result, expected)
        assert context.runtime.link.stats["reconnects"] >= 3


def test_stop_app_start_app_mid_round_three_times_every_result_has_all_silos(
    broker, silos, expected
):
    def restart_app() -> None:
        broker.ctl("stop_app")
        broker.ctl("start_app")
        broker.ctl("await_startup")

    with _context(broker, silos) as context:
        wait_live(context, NAMES, timeout=60.0)
        for _ in range(3):
            _assert_all_silos(context, _round_with_fault(context, restart_app), expected)


def test_broker_killed_and_restarted_three_times_the_next_invocation_has_all_silos(
    broker, silos, expected
):
    # The node's restart takes several seconds here: the heartbeat timeout
    # covers the outage, as the scenario requires.
    with _context(broker, silos, heartbeat_timeout=30.0) as context:
        wait_live(context, NAMES, timeout=60.0)
        for _ in range(3):
            broker.kill()
            broker.start()
            started = time.monotonic()
            result = run_in(context, slow_mean, tff_amqp.silo_data("readings"))
            _assert_all_silos(context, result, expected)
            # Bounded by reconnects, not by any deadline or timeout.
            assert time.monotonic() - started < 30.0
