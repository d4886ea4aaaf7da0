"""Concurrent invocations' requests (and their silos' replies) ride together:
one broker message per destination while an earlier one waits for its
confirm (transport/bundling.py, protocol.Bundle).

Unit tests drive the publisher with a fake broker whose confirms the test
releases; the real-broker test runs concurrent federated means through the
session's silo processes and compares each with TFF's native runtime."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import types

import pytest

from tests.support.computations import fed_mean
from tests.support.federation import SILO_NAMES, assert_close, run_in
from tff_amqp import protocol as p
from tff_amqp.coordinator.intake import Pending
from tff_amqp.coordinator.membership import Membership
from tff_amqp.coordinator.stateful.counts import snapshot
from tff_amqp.coordinator.stateful.link import CoordinatorLink
from tff_amqp.errors import SiloError
from tff_amqp.topology import Topology
from tff_amqp.transport.bundling import BundlingPublisher


def _batch(n: int, *, sender: str = "coordinator", deadline: float = 0.0) -> p.Envelope:
    return p.batch_envelope(
        sender=sender,
        invocation_id=f"inv-{n}",
        correlation_id=f"corr-{n}",
        deadline=deadline or time.time() + 60,
        operations=[p.Compute(source=n)],
        seq=0,
    )


class _Broker:
    """Records publishes; each waits for its confirm until the test releases it."""

    def __init__(self, *, routed: bool = True, fail: Exception | None = None) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.confirms: list[asyncio.Future[None]] = []
        self.routed = routed
        self.fail = fail

    async def send(self, routing_key: str, message) -> bool:
        self.sent.append((routing_key, message.body))
        confirm = asyncio.get_running_loop().create_future()
        self.confirms.append(confirm)
        await confirm
        if self.fail is not None:
            raise self.fail
        return self.routed

    def release(self) -> None:
        for confirm in self.confirms:
            if not confirm.done():
                confirm.set_result(None)

    def envelopes(self, index: int) -> list[p.Envelope]:
        """What the `index`th message carried (its members for a bundle)."""
        envelope = p.decode(self.sent[index][1])
        if envelope.kind is not p.Kind.BUNDLE:
            return [envelope]
        members = p.members(envelope)
        assert all(isinstance(m, p.Envelope) for m in members)
        return members  # type: ignore[return-value]


def _publisher(broker: _Broker, max_bytes: int = p.DEFAULT_MAX_MESSAGE_BYTES) -> BundlingPublisher:
    from tff_amqp.transport.connection import envelope_message

    return BundlingPublisher(
        "coordinator", broker.send, envelope_message, max_message_bytes=max_bytes
    )


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_what_is_published_in_one_loop_turn_and_behind_a_confirm_rides_together() -> None:
    broker = _Broker()
    publisher = _publisher(broker)
    envelopes = [_batch(n) for n in range(8)]
    # Three published in the same turn of the event loop: one message.
    tasks = [
        asyncio.create_task(publisher.publish("silo-a", e, p.encode(e))) for e in envelopes[:3]
    ]
    await _settle()
    assert len(broker.sent) == 1
    assert [e.message_id for e in broker.envelopes(0)] == [e.message_id for e in envelopes[:3]]
    # Five more while its confirm is awaited: they wait, then go as one bundle.
    tasks += [
        asyncio.create_task(publisher.publish("silo-a", e, p.encode(e))) for e in envelopes[3:]
    ]
    await _settle()
    assert len(broker.sent) == 1
    broker.release()
    await _settle()
    assert len(broker.sent) == 2
    assert [e.message_id for e in broker.envelopes(1)] == [e.message_id for e in envelopes[3:]]
    bundle = p.decode(broker.sent[1][1])
    assert bundle.kind is p.Kind.BUNDLE
    # It expires only when its latest member is late.
    assert bundle.deadline == max(e.deadline for e in envelopes[3:])
    broker.release()
    assert await asyncio.gather(*tasks) == [True] * 8
    assert publisher.stats == {"messages": 2, "bundles": 2, "bundled": 8}


async def test_a_lone_publish_waits_one_loop_turn_and_goes_alone() -> None:
    broker = _Broker()
    publisher = _publisher(broker)
    envelope = _batch(1)
    task = asyncio.create_task(publisher.publish("silo-a", envelope, p.encode(envelope)))
    await asyncio.sleep(0)  # the task starts: it yields one turn first
    assert broker.sent == []
    await asyncio.sleep(0)
    assert len(broker.sent) == 1
    assert p.decode(broker.sent[0][1]).kind is p.Kind.BATCH  # alone, not a bundle
    broker.release()
    assert await task is True


async def test_a_publish_cancelled_before_it_goes_is_not_sent_and_holds_nothing_up() -> None:
    broker = _Broker()
    publisher = _publisher(broker)
    first, second = _batch(1), _batch(2)
    cancelled = asyncio.create_task(publisher.publish("silo-a", first, p.encode(first)))
    await asyncio.sleep(0)  # waiting for its loop turn
    kept = asyncio.create_task(publisher.publish("silo-a", second, p.encode(second)))
    cancelled.cancel()
    await _settle()
    assert [e.message_id for i in range(len(broker.sent)) for e in broker.envelopes(i)] == [
        second.message_id
    ]
    broker.release()
    assert await kept is True
    assert cancelled.cancelled()


async def test_destinations_do_not_wait_for_each_other_and_bundle_false_goes_alone() -> None:
    broker = _Broker()
    publisher = _publisher(broker)
    a, b, c = _batch(1), _batch(2), _batch(3)
    tasks = [
        asyncio.create_task(publisher.publish("silo-a", a, p.encode(a))),
        asyncio.create_task(publisher.publish("silo-b", b, p.encode(b))),
        # A receiver that does not take bundles: never held back.
        asyncio.create_task(publisher.publish("silo-a", c, p.encode(c), bundle=False)),
    ]
    await _settle()
    # The one that does not bundle went at once; the others after their loop
    # turn, each alone (no confirm is awaited, yet neither waits for the other).
    sent = [(key, p.decode(body)) for key, body in broker.sent]
    assert [(key, e.message_id) for key, e in sent] == [
        ("silo-a", c.message_id),
        ("silo-a", a.message_id),
        ("silo-b", b.message_id),
    ]
    assert all(e.kind is p.Kind.BATCH for _, e in sent)
    broker.release()
    assert await asyncio.gather(*tasks) == [True, True, True]


async def test_a_bundle_never_exceeds_the_message_size_limit() -> None:
    broker = _Broker()
    payloads = [(e, p.encode(e)) for e in (_batch(n) for n in range(7))]
    limit = p.BUNDLE_OVERHEAD + 3 * (len(payloads[1][1]) + p.BUNDLE_MEMBER_OVERHEAD)
    publisher = _publisher(broker, max_bytes=limit)
    tasks = [asyncio.create_task(publisher.publish("s", e, b)) for e, b in payloads]
    for _ in range(4):
        await _settle()
        broker.release()
    await asyncio.gather(*tasks)
    sizes = [len(broker.envelopes(i)) for i in range(len(broker.sent))]
    # Bundles of at most 3 that fit the limit, nothing lost or reordered.
    assert sizes == [3, 3, 1]
    assert all(len(body) <= limit for _, body in broker.sent)
    carried = [e.message_id for i in range(len(sizes)) for e in broker.envelopes(i)]
    assert carried == [e.message_id for e, _ in payloads]


async def test_unroutable_and_failed_bundles_reach_every_member() -> None:
    broker = _Broker(routed=False)
    publisher = _publisher(broker)
    envelopes = [_batch(n) for n in range(3)]
    tasks = [asyncio.create_task(publisher.publish("s", e, p.encode(e))) for e in envelopes]
    await _settle()
    broker.release()
    await _settle()
    broker.release()
    assert await asyncio.gather(*tasks) == [False, False, False]

    broker = _Broker(fail=ConnectionError("channel closed"))
    publisher = _publisher(broker)
    tasks = [asyncio.create_task(publisher.publish("s", e, p.encode(e))) for e in envelopes]
    await _settle()
    broker.release()
    await _settle()
    broker.release()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results), results
    assert len(broker.sent) == 1  # one bundle of the three


def test_bundle_members_are_validated_one_by_one() -> None:
    good = _batch(1)
    nested = p.bundle_envelope("coordinator", [(good, p.encode(good))])
    foreign = _batch(2, sender="mallory")
    bundle = p.bundle_envelope(
        "coordinator",
        [
            (good, p.encode(good)),
            (nested, p.encode(nested)),
            (foreign, p.encode(foreign)),
        ],
    )
    bundle = p.decode(p.encode(bundle))
    members = p.members(bundle)
    assert isinstance(members[0], p.Envelope) and members[0].message_id == good.message_id
    assert isinstance(members[1], tuple) and "bundle" in str(members[1][1])
    assert isinstance(members[2], tuple) and "mallory" in str(members[2][1])
    # A member without a deadline makes the bundle's deadline none.
    none = p.Envelope(kind=p.Kind.RESULT, body=p.Result(values={}), sender="coordinator")
    assert p.bundle_envelope("coordinator", [(good, b""), (none, b"")]).deadline == 0.0


@pytest.mark.parametrize("messages", [[], "x", [b"ok", "not bytes"], [b""] * (p.MAX_BUNDLED + 1)])
def test_malformed_bundles_are_refused(messages) -> None:
    wire = p.encode(
        p.Envelope(kind=p.Kind.BUNDLE, body=p.Bundle(messages=(b"x",)), sender="coordinator")
    )
    import msgpack

    raw = msgpack.unpackb(wire, raw=False)
    raw["body"]["m"] = messages
    with pytest.raises(p.ProtocolError, match="bundle 'm'"):
        p.decode(msgpack.packb(raw, use_bin_type=True))


def test_bundle_capability_flags_round_trip_and_are_checked() -> None:
    status = p.SiloStatus(silo="alpha", clients=1, accepts_bundles=True)
    assert p.SiloStatus.from_wire(status.to_wire()).accepts_bundles
    assert "ab" not in p.SiloStatus(silo="alpha", clients=1).to_wire()
    batch = p.Batch(operations=(), seq=0, accepts_bundles=True)
    assert p.Batch.from_wire(batch.to_wire()).accepts_bundles
    with pytest.raises(p.ProtocolError, match="'ab' must be a boolean"):
        p.Batch.from_wire({**batch.to_wire(), "ab": "yes"})


class _RecordingEndpoint:
    """A silo's endpoint that records each error reply with whether replies
    were to be bundled when it went out."""

    def __init__(self) -> None:
        self.bundle_replies = False
        self.max_message_bytes = p.DEFAULT_MAX_MESSAGE_BYTES
        self.errors: list[tuple[p.ErrorCode, bool]] = []

    async def reply_error(self, inv: str, corr: str, code: p.ErrorCode, text: str) -> None:
        self.errors.append((code, self.bundle_replies))


async def test_a_refusal_is_bundled_as_the_batch_it_refuses_says() -> None:
    """A silo refusing a batch (functions it does not hold, past its
    deadline) answers as that batch's coordinator reads replies, not as the
    coordinator before it said."""
    from tff_amqp.silo.stateful.agent import SiloAgent, SiloConfig

    agent = SiloAgent(SiloConfig(name="alpha", broker_url="amqp://unused/", federation="fed"))
    endpoint = _RecordingEndpoint()
    agent.endpoint = endpoint  # type: ignore[assignment]

    def batch(n: int, *, bundles: bool, deadline: float = 0.0) -> p.Envelope:
        envelope = _batch(n, deadline=deadline)
        assert isinstance(envelope.body, p.Batch)
        missing = p.CreateKnownFunction(target=1, digest=bytes(32))
        body = dataclasses.replace(envelope.body, operations=(missing,), accepts_bundles=bundles)
        return dataclasses.replace(envelope, body=body)

    assert await agent._accept(batch(1, bundles=True)) is None
    assert await agent._accept(batch(2, bundles=False, deadline=time.time() - 1)) is None
    assert await agent._accept(batch(3, bundles=True, deadline=time.time() - 1)) is None
    assert endpoint.errors == [
        (p.ErrorCode.MISSING_FUNCTIONS, True),
        (p.ErrorCode.EXPIRED, False),
        (p.ErrorCode.EXPIRED, True),
    ]


async def test_a_dead_lettered_bundle_fails_each_request_it_carried() -> None:
    link = CoordinatorLink("amqp://unused/", Topology("fed"), Membership())
    loop = asyncio.get_running_loop()
    envelopes = [_batch(n) for n in range(3)]
    for e in envelopes:
        link._pending[e.correlation_id] = Pending("alpha", e.invocation_id, loop.create_future())
    bundle = p.bundle_envelope("coordinator", [(e, p.encode(e)) for e in envelopes[:2]])
    message = types.SimpleNamespace(
        type=str(p.Kind.BUNDLE),
        body=p.encode(bundle),
        correlation_id=None,
        headers={"x-death": [{"reason": "expired", "queue": "fed.requests.alpha"}]},
    )
    link._on_dead_letter(message)  # type: ignore[arg-type]
    for e in envelopes[:2]:
        error = link._pending[e.correlation_id].future.exception()
        assert isinstance(error, SiloError) and "dead-lettered" in str(error)
    # The request that was not in the bundle still waits.
    assert not link._pending[envelopes[2].correlation_id].future.done()


def test_concurrent_means_ride_in_bundles_and_equal_native(amqp_context, native_context):
    """Real broker, real silo processes: 16 federated means in flight at once
    share request messages to each silo and reply messages back, and worker
    calls at each silo; each result equals TFF native's."""
    values = [1.0, 2.5, -3.0, 4.0, 10.0, 0.5, 7.25]
    expected = run_in(native_context, fed_mean, values)
    run_in(amqp_context, fed_mean, values)  # warm
    link = amqp_context.runtime.link
    counts_before = amqp_context.run(snapshot(amqp_context.runtime, list(SILO_NAMES)))
    before = dict(link.stats)
    bundles_before = link._publisher.stats["bundles"]
    async_context = amqp_context._async_context

    async def many() -> list[object]:
        import tensorflow_federated as tff

        with tff.framework.get_context_stack().install(async_context):
            return await asyncio.gather(*(fed_mean(values) for _ in range(16)))

    results = amqp_context.run(many())
    for result in results:
        assert_close(result, expected)
    requests = link.stats["published"] - before["published"]
    messages = link.stats["request_messages"] - before["request_messages"]
    assert requests >= 16 * len(SILO_NAMES)
    # Some requests shared a message: fewer broker messages than requests.
    assert link._publisher.stats["bundles"] > bundles_before
    assert messages < requests, (messages, requests)
    replies = link.stats["replies"] - before["replies"]
    reply_messages = link.stats["reply_messages"] - before["reply_messages"]
    print(f"\n{requests} requests in {messages} messages, {replies} replies in {reply_messages}")
    # The silos' results of concurrent batches went back together too.
    assert reply_messages < replies, (reply_messages, replies)
    # Every session was freed (the snapshot waits for idle silos). A mean's
    # plan is evaluated in the silo's process: no worker call at all (the
    # next test shares worker calls between concurrent plans the worker runs).
    counts = amqp_context.run(snapshot(amqp_context.runtime, list(SILO_NAMES)))
    counts = counts.minus(counts_before)
    print(counts.silos)
    for silo in SILO_NAMES:
        assert counts.silo_total(silo) == 0, counts.silos[silo]


def test_concurrent_means_over_silo_data_share_worker_calls(
    amqp_context, native_context, silo_federation
):
    """The silos' own data rides with a batch's arguments, so concurrent
    invocations over `silo_data` share plan calls too (silo/stateful/fusion.py:
    their plans reduce datasets, so the worker runs them); each result
    equals TFF native's over the same client datasets."""
    import tff_amqp
    from tests.support.computations import mean_glucose
    from tests.support.federation import native_over

    expected = native_over(native_context, mean_glucose, silo_federation, SILO_NAMES)
    data = tff_amqp.silo_data("readings")
    run_in(amqp_context, mean_glucose, data)  # warm
    silos = list(SILO_NAMES)
    before = amqp_context.run(snapshot(amqp_context.runtime, silos))
    async_context = amqp_context._async_context

    async def many() -> list[object]:
        import tensorflow_federated as tff

        with tff.framework.get_context_stack().install(async_context):
            return await asyncio.gather(*(mean_glucose(data) for _ in range(12)))

    for result in amqp_context.run(many()):
        assert_close(result, expected)
    counts = amqp_context.run(snapshot(amqp_context.runtime, silos)).minus(before)
    print(counts.silos)
    for silo in silos:
        calls = counts.silos[silo]
        # Alone, each mean costs a silo one plan call and one compute.
        assert 1 <= calls.get("CreateCall", 0) < 12, calls
        assert 1 <= calls.get("Compute", 0) < 12, calls
