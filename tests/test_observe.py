"""Watching a federation: the progress display, and Prometheus metrics scraped
from a coordinator and a real silo process while they work."""

from __future__ import annotations

import io
import socket
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.data import read_column, write_silo_csvs
from tff_amqp.local import SiloOptions, wait_ready
from tff_amqp.observe.events import InvocationEvents
from tff_amqp.observe.metrics import CoordinatorMetrics
from tff_amqp.observe.progress import ProgressDisplay, progress_enabled


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of http://127.0.0.1:PORT/metrics, keyed by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(
        v
        for (n, sample_labels), v in samples.items()
        if n == name and set(labels.items()) <= set(sample_labels)
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shown(stream: io.StringIO) -> str:
    """What a terminal shows on the last line (tqdm redraws it after a \\r)."""
    return stream.getvalue().split("\r")[-1].rstrip()


def test_progress_shows_selection_replies_waiting_and_drops():
    stream = io.StringIO()
    events = InvocationEvents()
    events.add(ProgressDisplay(stream))
    events.invocation_started("abcdef0123")
    events.cohort_chosen("abcdef0123", ["north", "south", "east"], 0.4)
    events.gather_started("abcdef0123", ["north", "south", "east"])
    events.silo_replied("abcdef0123", "north")
    text = stream.getvalue()
    assert "[abcdef01] selected 3 silo(s): north, south, east" in text
    assert "1/3" in text and "waiting on: east, south" in text
    # A second, overlapping gather: north is waited on again until it replies twice.
    events.gather_started("abcdef0123", ["north", "south", "east"])
    events.silo_replied("abcdef0123", "south")
    events.silo_replied("abcdef0123", "south")
    assert shown(stream).endswith("waiting on: east, north")
    events.silo_replied("abcdef0123", "north")
    assert "replied: 2/3" in shown(stream) and shown(stream).endswith("waiting on: east")
    events.silos_dropped("abcdef0123", ["east"], "straggler")
    events.gather_finished("abcdef0123", ["north", "south"], 1.0)
    events.invocation_finished("abcdef0123", True, 1.5)
    text = stream.getvalue()
    assert "[abcdef01] dropped straggler(s): east" in text
    assert "[abcdef01] done in 1.50 s: 2/3 silo(s) took part (north, south); dropped east" in text


def test_progress_is_off_unless_asked_or_at_a_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert progress_enabled(None, io.StringIO()) is False
    assert progress_enabled(None, Tty()) is True
    assert progress_enabled(False, Tty()) is False
    assert progress_enabled(True, io.StringIO()) is True


def test_a_failing_observer_never_breaks_the_run():
    class Broken:
        def silo_replied(self, invocation: str, silo: str) -> None:
            raise RuntimeError("observer bug")

    seen = []

    class Recorder:
        def silo_replied(self, invocation: str, silo: str) -> None:
            seen.append(silo)

    events = InvocationEvents()
    events.add(Broken())
    events.add(Recorder())
    events.silo_replied("i", "north")
    assert seen == ["north"]


def test_coordinator_metrics_count_drops_and_outcomes_in_their_own_registry():
    stats = {"published": 7, "late_replies": 2}
    membership = SimpleNamespace(live=lambda: [1, 2])
    first = CoordinatorMetrics("f1", membership, lambda: stats)
    second = CoordinatorMetrics("f1", membership, lambda: stats)
    first.silos_dropped("i", ["a", "b"], "straggler")
    first.invocation_finished("i", False, 0.2)
    sample = first.registry.get_sample_value
    assert (
        sample(
            "tff_amqp_coordinator_silos_dropped_total", {"federation": "f1", "reason": "straggler"}
        )
        == 2
    )
    assert (
        sample("tff_amqp_coordinator_invocations_total", {"federation": "f1", "outcome": "error"})
        == 1
    )
    assert sample("tff_amqp_coordinator_late_replies_total", {"federation": "f1"}) == 2
    assert sample("tff_amqp_coordinator_live_silos", {"federation": "f1"}) == 2
    stats["late_replies"] = 5  # read live at scrape time
    assert sample("tff_amqp_coordinator_late_replies_total", {"federation": "f1"}) == 5
    # A second coordinator in the same process has its own, untouched registry.
    assert (
        second.registry.get_sample_value(
            "tff_amqp_coordinator_silos_dropped_total", {"federation": "f1", "reason": "straggler"}
        )
        is None
    )


def test_a_taken_metrics_port_is_a_clear_error():
    from prometheus_client import CollectorRegistry

    from tff_amqp.errors import TffAmqpError
    from tff_amqp.observe.metrics import MetricsServer

    with MetricsServer(CollectorRegistry(), 0) as first:
        with pytest.raises(
            TffAmqpError, match=f"cannot serve Prometheus metrics on .*:{first.port}"
        ):
            MetricsServer(CollectorRegistry(), first.port)


@pytest.mark.slow
def test_metrics_endpoints_of_coordinator_and_silo_move_during_a_run(
    amqp_url, federation, local, tmp_path
):
    """A real silo process with --metrics-port and a coordinator context with
    metrics_port=0: both endpoints are scraped between invocations, and the
    counters for invocations, batches, bytes and phase latencies move."""
    import numpy as np
    import tensorflow_federated as tff

    import tff_amqp
    from tests.support.computations import ROW

    folder = write_silo_csvs(tmp_path, 0, clients=2)
    silo_port = free_port()
    silo = local.start_silo(
        "metered",
        data={"readings": folder},
        options=SiloOptions(metrics_port=silo_port, extra_args=("--log-level", "info")),
    )
    wait_ready(silo, timeout=240)

    @tff.tensorflow.computation(tff.SequenceType(ROW))
    def total(rows):
        return rows.reduce(np.float32(0), lambda acc, r: acc + r["glucose"])

    @tff.federated_computation(tff.FederatedType(tff.SequenceType(ROW), tff.CLIENTS))
    def federated_total(rows):
        return tff.federated_sum(tff.federated_map(total, rows))

    context = tff_amqp.create_sync_amqp_execution_context(
        amqp_url,
        federation=federation,
        min_silos=1,
        cohort_timeout=120.0,
        metrics_port=0,
        progress=False,
    )
    with context:
        context.start()
        port = context.runtime.telemetry.metrics_port
        assert port
        coordinator_before, silo_before = scrape(port), scrape(silo_port)
        results = []
        for _ in range(2):
            with tff.framework.get_context_stack().install(context):
                results.append(float(federated_total(tff_amqp.silo_data("readings"))))
            coordinator, silo_samples = scrape(port), scrape(silo_port)
            assert value(coordinator, "tff_amqp_coordinator_invocations_total", outcome="ok") == (
                len(results)
            )
        expected = float(np.sum(np.asarray(read_column(folder, "glucose"), np.float32)))
        assert results == pytest.approx([expected, expected], rel=1e-5)

    def moved(after, before, name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert (
        moved(coordinator, coordinator_before, "tff_amqp_coordinator_published_messages_total") >= 2
    )
    assert moved(coordinator, coordinator_before, "tff_amqp_coordinator_published_bytes_total") > 0
    assert moved(coordinator, coordinator_before, "tff_amqp_coordinator_received_bytes_total") > 0
    assert (
        moved(
            coordinator,
            coordinator_before,
            "tff_amqp_coordinator_gather_replies_total",
            silo="metered",
        )
        == 2
    )
    for phase in ("cohort", "gather", "invocation"):
        assert value(coordinator, "tff_amqp_coordinator_phase_seconds_count", phase=phase) >= 2
    assert value(coordinator, "tff_amqp_coordinator_live_silos") == 1
    assert value(coordinator, "tff_amqp_coordinator_reconnects_total") == 0

    labels = {"silo": "metered", "federation": federation}
    assert moved(silo_samples, silo_before, "tff_amqp_silo_invocations_total", **labels) == 2
    assert moved(silo_samples, silo_before, "tff_amqp_silo_batches_total", **labels) >= 2
    assert moved(silo_samples, silo_before, "tff_amqp_silo_received_bytes_total", **labels) > 0
    assert moved(silo_samples, silo_before, "tff_amqp_silo_published_bytes_total", **labels) > 0
    assert value(silo_samples, "tff_amqp_silo_batch_seconds_count", outcome="ok", **labels) >= 2
    assert value(silo_samples, "tff_amqp_silo_errors_total", **labels) == 0
    # The silo logged where its endpoint listens.
    assert silo.check_log(f'"metrics.listening".*"port": {silo_port}')


@pytest.mark.slow
def test_a_frozen_silo_shows_up_as_a_dropped_straggler_and_a_late_reply(
    amqp_url, federation, local, tmp_path
):
    """Real silo processes, one frozen (SIGSTOP) during an invocation with a
    1 s straggler timeout: the progress display names the dropped straggler,
    and the coordinator's endpoint counts the drop and, once the silo thaws,
    its late reply."""
    import os
    import signal
    import time

    import tensorflow_federated as tff

    import tff_amqp
    from tests.support.computations import mean_glucose

    silos = {}
    for index, name in enumerate(("steady", "frozen")):
        folder = write_silo_csvs(tmp_path, index, clients=2)
        silos[name] = local.start_silo(name, data={"readings": folder})
    wait_ready(silos.values(), timeout=240)

    def run(context):
        with tff.framework.get_context_stack().install(context):
            return float(mean_glucose(tff_amqp.silo_data("readings")))

    # Warm up both silos (a cold first round can exceed 1 s on its own).
    with tff_amqp.create_sync_amqp_execution_context(
        amqp_url, federation=federation, min_silos=2, cohort_timeout=120.0, progress=False
    ) as warm_up:
        run(warm_up)

    stream = io.StringIO()
    context = tff_amqp.create_sync_amqp_execution_context(
        amqp_url,
        federation=federation,
        min_silos=1,
        cohort_timeout=120.0,
        straggler_timeout=1.0,
        heartbeat_timeout=60.0,  # the straggler path, not liveness
        metrics_port=0,
        progress=False,
    )
    with context:
        context.start()
        context.runtime.events.add(ProgressDisplay(stream))
        port = context.runtime.telemetry.metrics_port
        frozen = silos["frozen"].pid
        os.kill(frozen, signal.SIGSTOP)
        try:
            run(context)
        finally:
            os.kill(frozen, signal.SIGCONT)
        samples = scrape(port)
        assert value(samples, "tff_amqp_coordinator_silos_dropped_total", reason="straggler") == 1
        assert value(samples, "tff_amqp_coordinator_invocations_total", outcome="ok") == 1
        deadline = time.monotonic() + 30
        while value(scrape(port), "tff_amqp_coordinator_late_replies_total") < 1:
            assert time.monotonic() < deadline, "the thawed silo's late reply was not counted"
            time.sleep(0.3)
    text = stream.getvalue()
    assert "selected 2 silo(s): frozen, steady" in text
    assert "dropped straggler(s): frozen" in text
    assert (
        "done in" in text and "1/2 silo(s) took part (steady); dropped frozen (straggler)" in text
    )
