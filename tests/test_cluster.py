"""Past one broker: clients that follow a 3-node RabbitMQ cluster.

The cluster is private to this module (tests/support/private_cluster.py:
three nodes on 127.0.0.1 with their own ports and data, joined with
`rabbitmqctl join_cluster`, always stopped); the machine's default node is
never touched.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import statistics
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import tff_amqp
from tests.support.broker import new_federation_name
from tests.support.data import write_silo_csvs, write_xy_clients
from tests.support.federation import Federation, assert_close, native_over, run_in, wait_live
from tests.support.private_broker import free_port, rabbitmq_available
from tests.support.private_cluster import PrivateCluster
from tff_amqp.errors import BrokerUnreachableError, QueueTypeMismatchError
from tff_amqp.local import LocalFederation, SiloOptions
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


# ------------------------------------------- a quorum federation on the cluster

NAMES = ("alpha", "bravo", "charlie")
QUORUM = ("--queue-type", "quorum")
# Awkward on purpose: one silo with a single client, one with three.
CLIENTS_PER_SILO = (2, 1, 3)


class QuorumFederation(Federation):
    """The quorum federation, and what only its FedAvg test needs: each silo's
    x/y client data (key `xy`) and Prometheus port (batch and duplicate
    counts)."""

    def __init__(
        self,
        local: LocalFederation,
        silos: dict[str, Path],
        xy: dict[str, Path],
        metrics_ports: dict[str, int],
    ) -> None:
        super().__init__(local, silos)
        self.xy = xy
        self.metrics_ports = metrics_ports


@pytest.fixture(scope="module")
def quorum_federation(
    cluster: PrivateCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[QuorumFederation]:
    """Three silos given every node's address, their queues quorum queues."""
    root = tmp_path_factory.mktemp("quorum-silos")
    with LocalFederation(cluster.broker_url, new_federation_name(), log_dir=root / "logs") as local:
        readings: dict[str, Path] = {}
        xy: dict[str, Path] = {}
        ports: dict[str, int] = {}
        for i, name in enumerate(NAMES):
            clients = CLIENTS_PER_SILO[i]
            readings[name] = write_silo_csvs(root, i, clients)
            xy[name] = write_xy_clients(root, i, clients)
            ports[name] = free_port()
            local.start_silo(
                name,
                data={"readings": readings[name], "xy": xy[name]},
                options=SiloOptions(metrics_port=ports[name], extra_args=QUORUM),
            )
        local.wait_ready(timeout=240)
        yield QuorumFederation(local, readings, xy, ports)


def _quorum_context(cluster: PrivateCluster, federation: Federation, **options):
    return tff_amqp.create_sync_amqp_execution_context(
        cluster.broker_url,
        federation=federation.name,
        queue_type="quorum",
        cohort_timeout=60.0,
        deadline=120.0,
        **options,
    ).start()


def test_a_quorum_federation_runs_on_the_cluster_and_equals_native(
    cluster, quorum_federation, native_context
):
    from tests.support.computations import mean_glucose

    with _quorum_context(cluster, quorum_federation) as context:
        wait_live(context, NAMES, timeout=60.0)
        result = run_in(context, mean_glucose, tff_amqp.silo_data("readings"))
    expected = native_over(native_context, mean_glucose, quorum_federation, NAMES)
    np.testing.assert_allclose(result, expected, rtol=1e-9)
    listing = cluster.nodes[0].ctl("list_queues", "-q", "--no-table-headers", "name", "type")
    types = dict(line.split()[:2] for line in listing.splitlines() if line.strip())
    prefix = f"tff.{quorum_federation.name}"
    for silo in NAMES:
        assert types[f"{prefix}.req.{silo}"] == "quorum"
        assert types[f"{prefix}.bulk.{silo}"] == "quorum"
    assert types[f"{prefix}.coordinator"] == "quorum"


def test_a_process_with_the_other_queue_type_is_refused_saying_how_to_migrate(
    cluster, quorum_federation
):
    context = tff_amqp.create_sync_amqp_execution_context(
        cluster.broker_url, federation=quorum_federation.name, queue_type="classic"
    )
    with pytest.raises(QueueTypeMismatchError) as caught:
        context.start()
    context.close()
    message = str(caught.value)
    assert "quorum queue" in message and "--queue-type quorum" in message
    assert f"tff-amqp federation remove {quorum_federation.name}" in message


def test_the_node_leading_most_queues_killed_mid_round_every_result_has_all_silos(
    cluster, quorum_federation, native_context
):
    """kill -9 of the node that leads most of the federation's quorum
    queues, 0.8 s into a ~2 s round: the round still covers every silo (no
    min_silos: nothing may be dropped) and equals native; the next rounds
    too, while the node restarts and rejoins."""
    import threading

    from tests.support.computations import slow_mean

    expected = native_over(native_context, slow_mean, quorum_federation, NAMES)
    prefix = f"tff.{quorum_federation.name}."
    with _quorum_context(cluster, quorum_federation) as context:
        wait_live(context, NAMES, timeout=60.0)
        started = time.monotonic()
        np.testing.assert_allclose(
            run_in(context, slow_mean, tff_amqp.silo_data("readings")), expected, rtol=1e-9
        )
        normal = time.monotonic() - started
        leaders = cluster.leaders(prefix)
        victim = cluster.node_named(max(leaders, key=lambda n: leaders[n]))
        outcome: list[object] = []

        def run() -> None:
            try:
                outcome.append(run_in(context, slow_mean, tff_amqp.silo_data("readings")))
            except Exception as e:  # asserted below
                outcome.append(e)

        worker = threading.Thread(target=run)
        started = time.monotonic()
        worker.start()
        time.sleep(0.8)
        victim.kill()
        worker.join(timeout=150)
        with_kill = time.monotonic() - started
        assert not worker.is_alive(), "the round hung after the node was killed"
        try:
            if isinstance(outcome[0], Exception):
                raise AssertionError(f"round failed after the node died: {outcome[0]!r}")
            np.testing.assert_allclose(outcome[0], expected, rtol=1e-9)
            assert sorted(context.last_invocation.took_part) == sorted(NAMES)
            # At most one heartbeat timeout (5 s) longer than a normal round.
            assert with_kill < normal + 5.0, f"{with_kill:.1f} s vs {normal:.1f} s normally"
            np.testing.assert_allclose(
                run_in(context, slow_mean, tff_amqp.silo_data("readings")), expected, rtol=1e-9
            )
        finally:
            victim.start()
            cluster.await_members(len(cluster.nodes))
        np.testing.assert_allclose(
            run_in(context, slow_mean, tff_amqp.silo_data("readings")), expected, rtol=1e-9
        )


def _silo_stat(port: int, name: str) -> float:
    """One counter of a silo's Prometheus endpoint (`tff_amqp_silo_<name>_total`)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == f"tff_amqp_silo_{name}_total"
    )


def _silo_work(context, federation: QuorumFederation) -> dict[str, tuple[float, float, int]]:
    """Per silo, once every earlier invocation has ended (its clean-up too):
    (batches applied, duplicates dropped, TFF worker calls that run
    something) so far. Embeddings (CreateValue) are left out: a silo embeds a
    phase plan the first time it sees its shape, which a round whose
    aggregations the coordinator happened to batch differently may do once
    more; a batch applied twice would show in its calls and computes."""
    from tff_amqp.coordinator.stateful.counts import snapshot

    counts = context.run(snapshot(context.runtime, list(NAMES), timeout=30.0))
    return {
        silo: (
            _silo_stat(federation.metrics_ports[silo], "batches"),
            _silo_stat(federation.metrics_ports[silo], "duplicates"),
            counts.silo_total(silo) - counts.silos.get(silo, {}).get("CreateValue", 0),
        )
        for silo in NAMES
    }


def test_fedavg_five_rounds_with_the_leader_heavy_node_killed_in_round_three(
    cluster, quorum_federation, native_context
):
    """FedAvg, 5 rounds, each compared with TFF native; in round 3 the node
    leading most of the federation's quorum queues is killed (kill -9)
    mid-round and restarted after it. Every round equals native; every
    round applies at each silo exactly the batches and TFF worker calls of
    an undisturbed round (a redelivered request is dropped as a duplicate,
    never executed again); the round with the kill takes at most one
    heartbeat timeout longer than the median of the others."""
    import threading

    import tensorflow_federated as tff

    from tests.support.computations import XY_ROW, fedavg_round
    from tff_amqp.silo.data import DataSource, SiloDataStore

    initialize, fedavg = fedavg_round()
    datasets = []
    for silo in NAMES:
        store = SiloDataStore(silo, [DataSource("xy", quorum_federation.xy[silo])])
        datasets += store.client_datasets("xy", tff.to_type(XY_ROW))
    native_state = run_in(native_context, initialize)
    prefix = f"tff.{quorum_federation.name}."
    with _quorum_context(cluster, quorum_federation) as context:
        wait_live(context, NAMES, timeout=60.0)
        heartbeat_timeout = context.runtime.options.heartbeat_timeout
        stats = context.runtime.link.stats
        state = run_in(context, initialize)
        assert_close(state, native_state)
        took: list[float] = []
        work = [_silo_work(context, quorum_federation)]
        victim = None
        try:
            for round_number in range(1, 6):
                outcome: list[object] = []

                def run(state=state, outcome=outcome) -> None:
                    try:
                        outcome.append(run_in(context, fedavg, state, tff_amqp.silo_data("xy")))
                    except Exception as e:  # asserted below
                        outcome.append(e)

                if round_number == 3:
                    leaders = cluster.leaders(prefix)
                    victim = cluster.node_named(max(leaders, key=lambda n: leaders[n]))
                worker = threading.Thread(target=run)
                replies_before = stats["replies"]
                started = time.monotonic()
                worker.start()
                if round_number == 3:
                    # Mid-round: requests are out and the first reply is in.
                    while stats["replies"] == replies_before and worker.is_alive():
                        time.sleep(0.001)
                    assert worker.is_alive(), "round 3 ended before the node could be killed"
                    victim.kill()
                worker.join(timeout=150)
                took.append(time.monotonic() - started)
                assert not worker.is_alive(), f"round {round_number} hung"
                if isinstance(outcome[0], Exception):
                    raise AssertionError(f"round {round_number} failed: {outcome[0]!r}")
                native = run_in(native_context, fedavg, native_state, datasets)
                assert_close(outcome[0].state, native.state)
                assert_close(outcome[0].metrics, native.metrics)
                assert sorted(context.last_invocation.took_part) == sorted(NAMES)
                state, native_state = outcome[0].state, native.state
                if victim is not None and victim.process is None:
                    victim.start()
                    cluster.await_members(len(cluster.nodes))
                work.append(_silo_work(context, quorum_federation))
        finally:
            if victim is not None and victim.process is None:
                victim.start()
                cluster.await_members(len(cluster.nodes))
    # Per round and silo: batches applied and worker calls made (not the
    # duplicates, which a redelivery after the kill may legitimately add).
    per_round = [
        {s: (after[s][0] - before[s][0], after[s][2] - before[s][2]) for s in NAMES}
        for before, after in itertools.pairwise(work)
    ]
    # Round 1 makes more worker calls: a silo creates a computation it has not
    # seen once and reuses it after. From round 2 on every round is alike.
    batches = {s: per_round[0][s][0] for s in NAMES}
    for round_number, done in enumerate(per_round, start=1):
        assert {s: b for s, (b, _) in done.items()} == batches, f"round {round_number}: {done}"
        if round_number > 1:
            assert done == per_round[1], f"round {round_number} did {done}, round 2 {per_round[1]}"
    assert all(b > 0 and calls > 0 for b, calls in per_round[1].values())
    others = took[:2] + took[3:]
    assert took[2] <= statistics.median(others) + heartbeat_timeout, (
        f"round 3 took {took[2]:.1f} s, the others {', '.join(f'{t:.1f}' for t in others)} s"
    )
    # The model learned (equal to native, and not a no-op).
    assert np.abs(np.asarray(state.global_model_weights.trainable[0])).sum() > 0


def test_a_rolling_restart_of_every_node_fails_no_invocation(
    cluster, quorum_federation, native_context
):
    """Each node in turn stopped and started again (the way an upgrade
    goes) while invocations keep running: none fails, each equals native
    over every silo."""
    import threading

    from tests.support.computations import mean_glucose

    expected = native_over(native_context, mean_glucose, quorum_federation, NAMES)
    outcomes: list[object] = []
    stop = threading.Event()
    with _quorum_context(cluster, quorum_federation) as context:
        wait_live(context, NAMES, timeout=60.0)

        def keep_running() -> None:
            while not stop.is_set():
                try:
                    result = run_in(context, mean_glucose, tff_amqp.silo_data("readings"))
                    outcomes.append((result, sorted(context.last_invocation.took_part)))
                except Exception as e:  # asserted below
                    outcomes.append(e)

        worker = threading.Thread(target=keep_running)
        worker.start()
        try:
            for node in cluster.nodes:
                node.stop()
                time.sleep(2.0)  # invocations run on the other two meanwhile
                node.start()
                cluster.await_members(len(cluster.nodes))
                time.sleep(1.0)
        finally:
            stop.set()
            worker.join(timeout=150)
    assert not worker.is_alive(), "an invocation hung during the rolling restart"
    failures = [o for o in outcomes if isinstance(o, Exception)]
    assert not failures, f"{len(failures)} of {len(outcomes)} invocations failed: {failures[:3]!r}"
    assert len(outcomes) >= 3
    for result, took_part in outcomes:  # type: ignore[misc]
        np.testing.assert_allclose(result, expected, rtol=1e-9)
        assert took_part == sorted(NAMES)
