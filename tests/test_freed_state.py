"""State is freed on failure, and requests nobody can receive fail at once
(issue 15, items 5 and 6). Real broker, the session's three real silo
processes (`silo_federation`), compared with TFF's native runtime where a
result exists.

- after a failed invocation every silo reports 0 active invocations within
  2 s (the batch carrying `close` frees the session even though the
  invocation failed);
- a batch without a deadline is refused (it would pin values in the worker);
- a heartbeat forged for a silo that has no queue makes the next invocation
  that needs it fail within 2 s with `SiloUnreachableError` naming it; under
  K of N the silo is dropped as unreachable, with a warning naming it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import aio_pika
import grpc
import numpy as np
import pytest
import tensorflow_federated as tff

import tff_amqp
from tests.support.computations import checked_sum, fed_sum
from tests.support.federation import Federation, replies_in, run_in, started_context
from tff_amqp import protocol as p
from tff_amqp.errors import PartialResultWarning, SiloUnreachableError, SiloWorkerError
from tff_amqp.local import LocalFederation
from tff_amqp.topology import Topology


def _statuses_after(context: Any, silos: list[str], since: float) -> dict[str, int] | None:
    """Active invocations each silo reported in a status message received
    after `since` (monotonic), or None while one has not reported since."""
    membership = context.runtime.membership
    found: dict[str, int] = {}
    for silo in silos:
        record = membership.record(silo)
        if record is None or record.last_seen <= since:
            return None
        found[silo] = record.status.active_invocations
    return found


def _wait_all_idle(context: Any, silos: list[str], since: float, timeout: float) -> dict[str, int]:
    """The silos' active invocations once every one reported 0 after `since`,
    or the last report when `timeout` passes first."""
    last: dict[str, int] | None = None
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        last = _statuses_after(context, silos, since) or last
        if last is not None and not any(last.values()) and _statuses_after(context, silos, since):
            return last
        time.sleep(0.05)
    return last or {}


def test_failed_invocation_frees_its_state_at_every_silo_within_2_s(
    amqp_context, native_context, silo_federation: Federation
) -> None:
    silos = sorted(silo_federation.silos)
    values = [1.0, -2.0, 3.0]
    with pytest.raises(grpc.RpcError) as native_error:
        run_in(native_context, checked_sum, values)
    for _ in range(2):  # twice: a second failure frees its state as well
        with pytest.raises(SiloWorkerError) as ours:
            run_in(amqp_context, checked_sum, values)
        failed_at = time.monotonic()
        assert ours.value.worker_status == native_error.value.code()
        # Heartbeats come every second: a report after the failure, within
        # 2 s, shows no invocation left at any silo.
        active = _wait_all_idle(amqp_context, silos, failed_at, timeout=2.0)
        assert active == dict.fromkeys(silos, 0), active
    # The silos still serve, with results equal to native.
    assert run_in(amqp_context, fed_sum, [1.0, 2.0, 4.0]) == run_in(
        native_context, fed_sum, [1.0, 2.0, 4.0]
    )


async def _publish_batch(url: str, topology: Topology, silo: str, envelope: p.Envelope) -> None:
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel()
        requests = await channel.get_exchange(topology.requests_exchange, ensure=False)
        await requests.publish(
            aio_pika.Message(
                p.encode(envelope),
                message_id=envelope.message_id,
                correlation_id=envelope.correlation_id,
            ),
            routing_key=topology.request_routing_key(silo),
        )


def test_batch_without_deadline_is_refused_and_pins_nothing(
    amqp_url: str, amqp_context, silo_federation: Federation
) -> None:
    silo = sorted(silo_federation.silos)[0]
    topology = Topology(silo_federation.name)
    link = amqp_context.runtime.link
    replies: list[p.Envelope] = []
    correlation = uuid.uuid4().hex

    def tap(payload: bytes) -> None:
        replies.extend(e for e in replies_in(payload) if e.correlation_id == correlation)

    link.taps.append(tap)
    try:
        # Opens an invocation and keeps a value, but carries no close and no
        # deadline: accepted, it would stay in the silo's worker forever.
        batch = p.batch_envelope(
            sender="coordinator",
            invocation_id=uuid.uuid4().hex,
            correlation_id=correlation,
            deadline=0.0,
            operations=[p.Open(clients=1), p.CreateValue(target=1, value=_f32_value(1.5))],
            seq=0,
        )
        sent_at = time.monotonic()
        asyncio.run(_publish_batch(amqp_url, topology, silo, batch))
        until = time.monotonic() + 10
        while not replies and time.monotonic() < until:
            time.sleep(0.05)
    finally:
        link.taps.remove(tap)
    assert len(replies) == 1, replies
    reply = replies[0]
    assert reply.kind is p.Kind.ERROR and reply.sender == silo
    assert isinstance(reply.body, p.ErrorReport)
    assert reply.body.code is p.ErrorCode.MALFORMED
    assert "without a deadline" in reply.body.message
    # No session was made: the silo's next reports show nothing active.
    active = _wait_all_idle(amqp_context, [silo], sent_at, timeout=3.0)
    assert active == {silo: 0}, active


def _wait_active(
    context: Any, silo: str, since: float, expected: int, timeout: float = 5.0
) -> int | None:
    """The silo's active invocations once a status after `since` reports
    `expected`, else the last reported (None: no report at all)."""
    last: int | None = None
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        found = _statuses_after(context, [silo], since)
        if found is not None:
            last = found[silo]
            if last == expected:
                return last
        time.sleep(0.05)
    return last


def test_a_close_riding_another_invocations_batch_frees_only_the_senders_session(
    amqp_url: str, amqp_context, silo_federation: Federation
) -> None:
    """A finished invocation's close rides the next batch to the silo
    (`Batch.closes`): the silo frees that session, and only when the batch
    comes from the coordinator that opened it."""
    silo = sorted(silo_federation.silos)[0]
    topology = Topology(silo_federation.name)
    owner, kept = "coordinator-owner", uuid.uuid4().hex

    def batch(sender: str, invocation: str, ops: list[p.Operation], closes=()) -> p.Envelope:
        return p.batch_envelope(
            sender=sender,
            invocation_id=invocation,
            correlation_id="",
            deadline=time.time() + 60,
            operations=ops,
            seq=0,
            closes=closes,
        )

    def send(envelope: p.Envelope) -> float:
        sent_at = time.monotonic()
        asyncio.run(_publish_batch(amqp_url, topology, silo, envelope))
        return sent_at

    opened = send(batch(owner, kept, [p.Open(clients=1), p.CreateValue(1, _f32_value(2.0))]))
    try:
        assert _wait_active(amqp_context, silo, opened, 1) == 1
        # Another sender's batch naming it frees nothing (its own invocation
        # opens and closes in the same batch).
        foreign = send(batch("intruder", uuid.uuid4().hex, [p.Open(clients=1), p.Close()], [kept]))
        time.sleep(1.5)  # a status or two after it
        assert _wait_active(amqp_context, silo, foreign, 1) == 1
        # The owner's next batch (of another invocation) carries the close.
        carried = send(batch(owner, uuid.uuid4().hex, [p.Open(clients=1), p.Close()], [kept]))
        assert _wait_active(amqp_context, silo, carried, 0) == 0
    finally:
        send(batch(owner, kept, [p.Close()]))


def _f32_value(x: float) -> bytes:
    from tensorflow_federated.python.core.impl.executors import value_serialization

    value, _ = value_serialization.serialize_value(np.float32(x), tff.TensorType(np.float32))
    return value.SerializeToString()


class _ForgedSilo:
    """Heartbeats, as the broker user the silos use (guest), for a silo name
    that has no request queue: a forgery, or a silo whose queue was deleted.
    Says goodbye when done, so the shared federation forgets it."""

    def __init__(self, amqp_url: str, topology: Topology, name: str) -> None:
        self.name = name
        self._url = amqp_url
        self._topology = topology
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> _ForgedSilo:
        self._thread.start()
        assert self._ready.wait(30), "forged silo did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    async def _run(self) -> None:
        topology = self._topology
        connection = await aio_pika.connect(self._url, timeout=10)
        async with connection:
            channel = await connection.channel()
            replies = await channel.get_exchange(topology.replies_exchange, ensure=False)
            status = p.SiloStatus(silo=self.name, clients=1, started_at=time.time())

            async def send(kind: p.Kind) -> None:
                envelope = p.Envelope(kind=kind, body=status, sender=self.name)
                await replies.publish(
                    aio_pika.Message(p.encode(envelope), user_id=connection.url.user),
                    routing_key=topology.reply_routing_key(self.name),
                )

            await send(p.Kind.HELLO)
            self._ready.set()
            while not self._stop.is_set():
                await send(p.Kind.HEARTBEAT)
                await asyncio.sleep(0.3)
            await send(p.Kind.GOODBYE)


@pytest.fixture
def forged_silo(amqp_url: str, silo_federation: Federation) -> Iterator[_ForgedSilo]:
    with _ForgedSilo(amqp_url, Topology(silo_federation.name), "zulu") as forged:
        yield forged


def test_forged_heartbeat_of_a_silo_without_queue_fails_within_2_s_naming_it(
    amqp_url: str, local: LocalFederation
) -> None:
    """Every live silo required (min_silos = the cohort): the silo without a
    queue fails the invocation at once, naming it. (Its own federation: the
    session's has its coordinator, and one federation has one.)"""
    local.start_silo("alpha")
    local.wait_ready(timeout=240)
    with (
        _ForgedSilo(amqp_url, Topology(local.federation), "zulu") as forged,
        started_context(amqp_url, local.federation, 2) as context,
    ):
        _wait_live(context.runtime.membership, forged.name)
        started = time.monotonic()
        with pytest.raises(SiloUnreachableError) as error:
            run_in(context, fed_sum, [1.0, 2.0, 3.0, 4.0])
        elapsed = time.monotonic() - started
        assert elapsed < 2.0, f"failed after {elapsed:.1f} s"
        assert error.value.silo == "zulu"
        assert "'zulu'" in str(error.value) and "tff-amqp status" in str(error.value)
        assert context.runtime.link.stats["unroutable"] >= 1


def test_forged_heartbeat_under_k_of_n_drops_the_silo_with_a_warning(
    amqp_context, native_context, forged_silo: _ForgedSilo
) -> None:
    """K of N (the session context needs only the real silos): the silo
    without a queue is dropped as unreachable, the result covers the others
    and equals native, and the warning names it."""
    membership = amqp_context.runtime.membership
    _wait_live(membership, forged_silo.name)
    values = [1.0, 2.0, 3.0, 4.0]
    started = time.monotonic()
    with pytest.warns(PartialResultWarning) as caught:
        result = run_in(amqp_context, fed_sum, values)
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, f"took {elapsed:.1f} s"
    # One client value per silo, in cohort order: the result covers the
    # values of the silos that took part.
    report = amqp_context.last_invocation
    assert len(report.cohort) == len(values)
    kept = [v for v, silo in zip(values, report.cohort) if silo in report.took_part]
    assert len(kept) == len(values) - 1
    assert result == run_in(native_context, fed_sum, kept)
    (warning,) = [w.message for w in caught if isinstance(w.message, PartialResultWarning)]
    assert warning.dropped == {"zulu": "unreachable"}
    assert report.dropped == {"zulu": "unreachable"}
    # Once the forger says goodbye the cohort is whole again: no warning.
    forged_silo.__exit__()
    until = time.monotonic() + 10
    while membership.is_live(forged_silo.name):
        assert time.monotonic() < until, "the forged silo's goodbye did not arrive"
        time.sleep(0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartialResultWarning)
        assert run_in(amqp_context, fed_sum, values) == run_in(native_context, fed_sum, values)


def _wait_live(membership: Any, silo: str) -> None:
    until = time.monotonic() + 10
    while not membership.is_live(silo):
        assert time.monotonic() < until, f"the heartbeat of {silo!r} did not arrive"
        time.sleep(0.05)


def _open_batch(link: Any, correlation: str) -> p.Envelope:
    """A batch of `link`'s coordinator instance that opens an invocation and
    keeps a value, with no close."""
    envelope = p.batch_envelope(
        sender=link.sender,
        invocation_id=uuid.uuid4().hex,
        correlation_id=correlation,
        deadline=time.time() + 300,
        operations=[p.Open(clients=1), p.CreateValue(target=1, value=_f32_value(1.5))],
        seq=0,
    )
    assert isinstance(envelope.body, p.Batch)
    body = dataclasses.replace(
        envelope.body,
        coordinator_instance=link.instance_id,
        coordinator_started=link.instance_started,
    )
    return dataclasses.replace(envelope, body=body)


def test_sessions_of_a_replaced_coordinator_instance_are_freed(
    amqp_url: str, local, native_context
) -> None:
    """A coordinator that dies mid-invocation leaves a session at the silo;
    the next coordinator instance's first batch frees it at once, and a late
    request of the dead instance is refused."""
    local.start_silo("solo")
    local.wait_ready(timeout=240)
    topology = Topology(local.federation)
    options = dict(federation=local.federation, min_silos=1, cohort_timeout=60.0, deadline=120.0)
    first = tff_amqp.create_sync_amqp_execution_context(amqp_url, **options)
    with first.start():
        dead = first.runtime.link
        # Its in-flight invocation: opened at the silo, never closed.
        old = _open_batch(dead, uuid.uuid4().hex)
        asyncio.run(_publish_batch(amqp_url, topology, "solo", old))
    # The first instance is gone; the silo still holds its session.
    second = tff_amqp.create_sync_amqp_execution_context(amqp_url, **options)
    with second.start():
        membership = second.runtime.membership
        until = time.monotonic() + 10
        while (record := membership.record("solo")) is None or (
            record.status.active_invocations < 1
        ):
            assert time.monotonic() < until, "the dead instance's session is not held"
            time.sleep(0.05)
        # The new instance's first batch tells the silo the old one is gone.
        values = [1.0, 2.0]
        assert run_in(second, fed_sum, values) == run_in(native_context, fed_sum, values)
        done = time.monotonic()
        active = _wait_all_idle(second, ["solo"], done, timeout=2.0)
        assert active == {"solo": 0}, active
        # A late request of the dead instance is refused, not run.
        late = _open_batch(dead, uuid.uuid4().hex)
        replies: list[p.Envelope] = []

        def tap(payload: bytes) -> None:
            replies.extend(
                e for e in replies_in(payload) if e.correlation_id == late.correlation_id
            )

        link = second.runtime.link
        link.taps.append(tap)
        try:
            asyncio.run(_publish_batch(amqp_url, topology, "solo", late))
            until = time.monotonic() + 10
            while not replies and time.monotonic() < until:
                time.sleep(0.05)
        finally:
            link.taps.remove(tap)
        assert [r.kind for r in replies] == [p.Kind.ERROR]
        assert isinstance(replies[0].body, p.ErrorReport)
        assert replies[0].body.code is p.ErrorCode.EXPIRED
        assert "later-started instance" in replies[0].body.message
        assert _wait_all_idle(second, ["solo"], time.monotonic(), timeout=2.0) == {"solo": 0}


async def _delete_queue(url: str, name: str) -> None:
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(name)


def test_stateless_round_fails_at_once_for_a_deleted_work_queue(
    amqp_url: str, tmp_path, local, native_context
) -> None:
    """The coordinator declares a silo's work queue before its first item;
    one deleted afterwards (by an operator) makes the next round fail at
    once naming the silo, instead of losing its items silently."""
    from tests.support.data import read_column, write_xy_clients
    from tests.test_stateless import slow_round
    from tff_amqp.local import wait_ready

    folder = write_xy_clients(tmp_path, 0, 3)
    worker = local.start_pool_worker("tiny", data={"xy": folder})
    wait_ready(worker, timeout=180)
    with tff_amqp.create_sync_amqp_mapreduce_context(
        amqp_url, federation=local.federation, cohort_timeout=60.0, deadline=120.0
    ) as context:
        _, total = run_in(context, slow_round, np.int64(0), tff_amqp.silo_data("xy"))
        assert total == len(read_column(folder, "x"))
        asyncio.run(_delete_queue(amqp_url, Topology(local.federation).work_queue("tiny")))
        started = time.monotonic()
        with pytest.raises(SiloUnreachableError) as error:
            run_in(context, slow_round, np.int64(0), tff_amqp.silo_data("xy"))
        elapsed = time.monotonic() - started
        assert error.value.silo == "tiny" and "work queue" in str(error.value)
        assert elapsed < 2.0, f"failed after {elapsed:.1f} s"
        assert context.link.stats["unroutable"] >= 1
