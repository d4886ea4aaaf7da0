"""Slow, frozen, crashed and restarted silos never hang a round nor corrupt it.
Real broker, real silo processes, faults injected here (broker faults are in
test_broker_faults.py, on a private broker node).

Tests run in file order on one 4-silo federation; the last ones kill silos.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator

import aio_pika
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow.python.data.experimental.ops import testing as tf_data_testing

import tff_amqp
from tests.support.computations import ROW, mean_glucose
from tests.support.data import read_column
from tests.support.federation import (
    Federation,
    local_federation,
    native_over,
    run_in,
    start_federation,
    wait_live,
)
from tff_amqp import protocol as p
from tff_amqp.errors import (
    CohortError,
    InvocationTimeoutError,
    QuorumError,
    SiloError,
)
from tff_amqp.topology import Topology

# Long real-broker tests: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

NAMES = ("alpha", "bravo", "charlie", "delta")


@pytest.fixture(scope="module")
def four_silos(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("four")
    with local_federation(amqp_url, root / "logs") as local:
        yield start_federation(local, root, names=NAMES, clients_per_silo=(2, 1, 3, 2))


def _context(amqp_url: str, federation: Federation, **options) -> tff_amqp.AmqpSyncExecutionContext:
    options.setdefault("cohort_timeout", 60.0)
    options.setdefault("deadline", 120.0)
    return tff_amqp.create_sync_amqp_execution_context(
        amqp_url, federation=federation.name, **options
    ).start()


def _direct_mean(federation: Federation, silos) -> float:
    values = [v for s in silos for v in read_column(federation.silos[s], "glucose")]
    return float(np.mean(np.asarray(values, np.float32).astype(np.float64)))


def test_frozen_silo_is_dropped_after_the_straggler_timeout(amqp_url, four_silos, native_context):
    frozen = four_silos.local.silos["delta"].process
    others = [n for n in NAMES if n != "delta"]
    with _context(amqp_url, four_silos, min_silos=4) as warm_up:
        # Cold silos take more than a second on their first round; with a
        # 1 s straggler timeout that round would (rightly) drop one.
        everyone = run_in(warm_up, mean_glucose, tff_amqp.silo_data("readings"))
        np.testing.assert_allclose(everyone, _direct_mean(four_silos, NAMES), rtol=1e-9)
    # A long heartbeat timeout, so this exercises the straggler path, not liveness.
    with _context(
        amqp_url, four_silos, min_silos=3, straggler_timeout=1.0, heartbeat_timeout=60.0
    ) as context:
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            result = run_in(context, mean_glucose, tff_amqp.silo_data("readings"))
            elapsed = time.monotonic() - started
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        assert elapsed < 1.0 + 2.0, f"round took {elapsed:.2f} s with straggler_timeout=1"
        np.testing.assert_allclose(
            result, native_over(native_context, mean_glucose, four_silos, others), rtol=1e-6
        )
        np.testing.assert_allclose(result, _direct_mean(four_silos, others), rtol=1e-9)

        # The thawed silo's late reply is discarded and counted, and it takes
        # part in the next invocation again.
        link = context.runtime.link
        deadline = time.monotonic() + 20
        while link.stats["late_replies"] < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert link.stats["late_replies"] >= 1
        again = run_in(context, mean_glucose, tff_amqp.silo_data("readings"))
        np.testing.assert_allclose(again, everyone, rtol=1e-9)


def test_quorum_grace_ends_the_phase_soon_after_the_quorum_answered(amqp_url, four_silos):
    frozen = four_silos.local.silos["alpha"].process
    others = [n for n in NAMES if n != "alpha"]
    with _context(amqp_url, four_silos, min_silos=4) as warm_up:
        run_in(warm_up, mean_glucose, tff_amqp.silo_data("readings"))  # warm silos
    # No straggler timeout: without the grace this round would wait for the
    # frozen silo until the 120 s deadline.
    with _context(
        amqp_url, four_silos, min_silos=3, quorum_grace=0.5, heartbeat_timeout=60.0
    ) as context:
        wait_live(context, NAMES)
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            result = run_in(context, mean_glucose, tff_amqp.silo_data("readings"))
            elapsed = time.monotonic() - started
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
    assert elapsed < 0.5 + 2.5, f"round took {elapsed:.2f} s with quorum_grace=0.5"
    np.testing.assert_allclose(result, _direct_mean(four_silos, others), rtol=1e-9)


@tff.tensorflow.computation(tff.SequenceType(ROW))
def slow_count(rows):
    # Several seconds of work inside TensorFlow (in the silo's worker), far
    # longer than the heartbeat timeout below.
    pause = tf.data.Dataset.range(1).apply(tf_data_testing.sleep(4_000_000))
    waited = pause.reduce(np.int64(0), lambda acc, x: acc + x)
    return rows.reduce(np.int64(0), lambda n, _: n + 1) + waited


@tff.federated_computation(tff.FederatedType(tff.SequenceType(ROW), tff.CLIENTS))
def slow_total(rows):
    return tff.federated_sum(tff.federated_map(slow_count, rows))


def test_long_local_work_is_not_mistaken_for_a_dead_silo(amqp_url, four_silos):
    rows = sum(len(read_column(four_silos.silos[s], "glucose")) for s in NAMES)
    with _context(amqp_url, four_silos, min_silos=4, heartbeat_timeout=2.0) as context:
        wait_live(context, NAMES)
        started = time.monotonic()
        total = run_in(context, slow_total, tff_amqp.silo_data("readings"))
        assert time.monotonic() - started > 4.0  # the work really took longer than 2 s
        assert context.runtime.membership.live()  # nobody was declared dead
    assert total == rows


def test_quorum_that_cannot_form_is_a_clear_error_within_the_cohort_timeout(amqp_url, four_silos):
    with _context(amqp_url, four_silos, min_silos=5, cohort_timeout=2.0) as context:
        started = time.monotonic()
        with pytest.raises(CohortError) as error:
            run_in(context, mean_glucose, tff_amqp.silo_data("readings"))
        assert time.monotonic() - started < 2.0 + 3.0
    message = str(error.value)
    assert "4 live silo(s)" in message and "min_silos=5" in message
    for name in NAMES:
        assert name in message


def test_duplicate_delivery_of_a_request_is_executed_once(amqp_url, four_silos):
    from tensorflow_federated.python.core.impl.executors import value_serialization

    topology = Topology(four_silos.name)
    value, _ = value_serialization.serialize_value(np.float32(7.0), tff.TensorType(np.float32))
    envelope = p.batch_envelope(
        sender="test",
        invocation_id=uuid.uuid4().hex,
        correlation_id=uuid.uuid4().hex,
        deadline=time.time() + 60,
        operations=[
            p.Open(clients=1),
            p.CreateValue(target=1, value=value.SerializeToString()),
            p.Compute(source=1),
        ],
        seq=0,
    )

    async def exchange() -> list[p.Envelope]:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            replies = await channel.get_exchange(topology.replies_exchange)
            probe = await channel.declare_queue(exclusive=True)
            await probe.bind(replies, routing_key=topology.reply_routing_key("alpha"))
            requests = await channel.get_exchange(topology.requests_exchange)
            message = aio_pika.Message(p.encode(envelope), message_id=envelope.message_id)
            for _ in range(2):  # the same message, delivered twice
                await requests.publish(message, routing_key="alpha")
            seen: list[p.Envelope] = []
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                incoming = await probe.get(no_ack=True, fail=False)
                if incoming is None:
                    await asyncio.sleep(0.1)
                    continue
                reply = p.decode(incoming.body)
                if reply.correlation_id == envelope.correlation_id:
                    seen.append(reply)
            closing = p.batch_envelope(
                sender="test",
                invocation_id=envelope.invocation_id,
                correlation_id="",
                deadline=time.time() + 60,
                operations=[p.Close()],
                seq=1,
            )
            await requests.publish(aio_pika.Message(p.encode(closing)), routing_key="alpha")
            return seen

    seen = asyncio.run(exchange())
    assert [r.kind for r in seen] == [p.Kind.RESULT]
    result = seen[0].body
    assert isinstance(result, p.Result) and set(result.values) == {1}


class _GhostSilo:
    """A silo that announces itself and keeps sending heartbeats but never
    takes a request from its queue (a consumer wedged outside our control)."""

    def __init__(self, amqp_url: str, topology: Topology, name: str) -> None:
        self.name = name
        self._url = amqp_url
        self._topology = topology
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.left_in_queue: int | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> _GhostSilo:
        self._thread.start()
        assert self._ready.wait(30), "ghost silo did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def queued_requests(self) -> int:
        async def count() -> int:
            connection = await aio_pika.connect(self._url)
            async with connection:
                channel = await connection.channel()
                queue = await channel.declare_queue(
                    self._topology.request_queue(self.name), passive=True
                )
                return queue.declaration_result.message_count or 0

        return asyncio.run(count())

    async def _run(self) -> None:
        topology = self._topology
        connection = await aio_pika.connect(self._url)
        async with connection:
            channel = await connection.channel()
            requests = await channel.get_exchange(topology.requests_exchange)
            replies = await channel.get_exchange(topology.replies_exchange)
            queue = await channel.declare_queue(
                topology.request_queue(self.name),
                durable=True,
                arguments={"x-dead-letter-exchange": topology.dead_letter_exchange},
            )
            await queue.bind(requests, routing_key=topology.request_routing_key(self.name))
            status = p.SiloStatus(
                silo=self.name, clients=1, data_keys=("readings",), started_at=time.time()
            )
            self._ready.set()
            while not self._stop.is_set():
                heartbeat = p.Envelope(kind=p.Kind.HEARTBEAT, body=status, sender=self.name)
                await replies.publish(
                    aio_pika.Message(p.encode(heartbeat), user_id=connection.url.user),
                    routing_key=topology.reply_routing_key(self.name),
                )
                await asyncio.sleep(0.3)
            await queue.delete(if_unused=False, if_empty=False)


def test_expired_request_is_dead_lettered_back_and_never_run_late(amqp_url, four_silos):
    topology = Topology(four_silos.name)
    with _GhostSilo(amqp_url, topology, "echo") as ghost:
        with _context(
            amqp_url, four_silos, min_silos=5, deadline=4.0, heartbeat_timeout=30.0
        ) as context:
            wait_live(context, [*NAMES, "echo"])
            started = time.monotonic()
            with pytest.raises((InvocationTimeoutError, SiloError)) as error:
                run_in(context, mean_glucose, tff_amqp.silo_data("readings"))
            elapsed = time.monotonic() - started
            # Whichever notices first (the coordinator's own deadline or the
            # broker's dead-letter), the error names the deadline and the silo.
            message = str(error.value)
            assert "'echo'" in message and ("deadline" in message or "expired" in message)
            assert elapsed < 4.0 + 3.0, f"failed after {elapsed:.1f} s with a 4 s deadline"
            # The request did not stay in the silo's queue to run late: the
            # broker expired it and dead-lettered it back to the coordinator.
            link = context.runtime.link
            waited_until = time.monotonic() + 10
            while link.stats["dead_lettered"] < 1 and time.monotonic() < waited_until:
                time.sleep(0.1)
            assert link.stats["dead_lettered"] >= 1
            assert ghost.queued_requests() == 0


def test_killed_silo_is_dropped_when_the_quorum_holds(amqp_url, four_silos, native_context):
    victim = four_silos.local.silos["bravo"].process
    others = [n for n in NAMES if n != "bravo"]
    with _context(amqp_url, four_silos, min_silos=3, heartbeat_timeout=2.0) as context:
        wait_live(context, NAMES)
        os.kill(victim.pid, signal.SIGKILL)
        started = time.monotonic()
        result = run_in(context, mean_glucose, tff_amqp.silo_data("readings"))
        assert time.monotonic() - started < 2.0 + 4.0
        np.testing.assert_allclose(
            result, native_over(native_context, mean_glucose, four_silos, others), rtol=1e-6
        )


def test_restarted_silo_rejoins_for_the_next_invocation(amqp_url, four_silos):
    local = four_silos.local
    old = local.silos["bravo"].process
    if old.poll() is None:  # run alone, the test before did not kill it
        os.kill(old.pid, signal.SIGKILL)
    old.wait(timeout=30)
    local.start_silo("bravo", data={"readings": four_silos.silos["bravo"]})
    # min_silos=4: the cohort only forms once the restarted silo is back.
    with _context(amqp_url, four_silos, min_silos=4, cohort_timeout=180.0) as context:
        result = run_in(context, mean_glucose, tff_amqp.silo_data("readings"))
        assert [r.name for r in context.runtime.membership.live()] == list(NAMES)
    np.testing.assert_allclose(result, _direct_mean(four_silos, NAMES), rtol=1e-9)


def test_quorum_lost_mid_round_is_a_clear_error_before_the_deadline(amqp_url, four_silos):
    victim = four_silos.local.silos["charlie"].process
    with _context(
        amqp_url, four_silos, min_silos=4, heartbeat_timeout=2.0, deadline=120.0
    ) as context:
        wait_live(context, NAMES)
        link = context.runtime.link
        published_before = link.stats["published"]
        killed_at: list[float] = []

        def kill_once_requests_are_out() -> None:
            # Kill while the silos work on the round (slow_total takes ~4 s).
            until = time.monotonic() + 60
            while link.stats["published"] == published_before and time.monotonic() < until:
                time.sleep(0.05)
            time.sleep(0.5)
            os.kill(victim.pid, signal.SIGKILL)
            killed_at.append(time.monotonic())

        killer = threading.Thread(target=kill_once_requests_are_out)
        killer.start()
        with pytest.raises(QuorumError) as error:
            run_in(context, slow_total, tff_amqp.silo_data("readings"))
        failed_at = time.monotonic()
        killer.join(timeout=60)
    assert killed_at, "the silo was never killed"
    # Lost within the heartbeat timeout (plus heartbeat period and margin),
    # far from the 120 s deadline.
    assert failed_at - killed_at[0] < 2.0 + 4.0
    message = str(error.value)
    assert "lost its quorum" in message and "min_silos=4" in message and "'charlie'" in message
