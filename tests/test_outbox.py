"""`SiloOutbox` on its own: it sees its invocation only through an
`OutboxChannel`, so its pipelining rules are checked here with a recording
channel (the same rules over the real broker: tests/test_semantics.py and
tests/test_payloads.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from tff_amqp import protocol as p
from tff_amqp.coordinator.stateful.outbox import (
    MAX_HOLD_SECONDS,
    Activity,
    OutboxChannel,
    SiloOutbox,
)
from tff_amqp.errors import SiloError


class RecordingChannel:
    """Publishes nowhere: records each batch and answers every `compute`
    with the value id's bytes."""

    def __init__(self, max_message_bytes: int = 1_000_000) -> None:
        self.batches: list[p.Envelope] = []
        self.expected: list[tuple[str, str, str]] = []
        self.max_message_bytes = max_message_bytes
        # The invocation's progress, stepped by tests that play its branches.
        self.activity = Activity()
        # Closes handed to the link to ride a later batch: (silo, seq, batches
        # published by then).
        self.deferred: list[tuple[str, int, int]] = []

    def channel(self, *, defer_closes: bool = False) -> OutboxChannel:
        return OutboxChannel(
            sender="coordinator",
            invocation_id="inv",
            deadline_epoch=2e9,
            max_message_bytes=self.max_message_bytes,
            publish=self._publish,
            expect_chunks=lambda corr, silo, inv: self.expected.append((corr, silo, inv)),
            wait_for_reply=self._wait,
            receive_blob=self._blob,
            activity=self.activity,
            defer_close=self._defer if defer_closes else None,
        )

    def _defer(self, silo: str, seq: int) -> None:
        # Published batches before it: the close must follow every one.
        self.deferred.append((silo, seq, len(self.batches)))

    async def _publish(
        self, silo: str, envelope: p.Envelope, expect_reply: bool
    ) -> asyncio.Future[p.Result] | None:
        self.batches.append(envelope)
        if not expect_reply:
            return None
        assert isinstance(envelope.body, p.Batch)
        computes = [op.source for op in envelope.body.operations if isinstance(op, p.Compute)]
        future = asyncio.get_running_loop().create_future()
        future.set_result(p.Result(values={s: str(s).encode() for s in computes}))
        return future

    async def _wait(self, silo: str, future: asyncio.Future[p.Result]) -> p.Result:
        return await future

    async def _blob(self, silo: str, blob: p.BlobRef) -> bytearray:
        raise AssertionError("no blob expected")

    def operations(self, index: int) -> list[type]:
        body = self.batches[index].body
        assert isinstance(body, p.Batch)
        return [type(op) for op in body.operations]


def _outbox(recording: RecordingChannel) -> SiloOutbox:
    ids = iter(range(1, 1000))
    outbox = SiloOutbox(recording.channel(), "north", lambda: next(ids))
    outbox.open(clients=None)
    return outbox


def test_computes_of_one_event_loop_turn_ride_one_batch() -> None:
    async def run() -> tuple[RecordingChannel, list[bytes | bytearray]]:
        recording = RecordingChannel()
        outbox = _outbox(recording)
        a = outbox.create_value(b"a")
        b = outbox.create_value(b"b")
        results = await asyncio.gather(outbox.compute(a), outbox.compute(b))
        await outbox.close()
        return recording, list(results)

    recording, results = asyncio.run(run())
    assert results == [b"1", b"2"]
    assert len(recording.batches) == 2  # the computes' batch, then the close
    assert recording.operations(0) == [p.Open, p.CreateValue, p.CreateValue, p.Compute, p.Compute]
    assert recording.operations(1) == [p.Close]
    assert [e.body.seq for e in recording.batches] == [0, 1]  # type: ignore[union-attr]
    # Chunks of a large result may only come for the batch that asked for it.
    assert recording.expected == [(recording.batches[0].correlation_id, "north", "inv")]
    assert all(e.sender == "coordinator" and e.invocation_id == "inv" for e in recording.batches)


def test_inline_values_past_half_the_message_limit_flush_early() -> None:
    async def run() -> RecordingChannel:
        recording = RecordingChannel(max_message_bytes=1000)
        outbox = _outbox(recording)
        outbox.create_value(b"x" * 400)
        outbox.create_value(b"y" * 400)  # 800 > 1000 // 2: the first goes out alone
        await asyncio.sleep(0)  # let the flushed batch publish
        first = len(recording.batches)
        await outbox.close()
        assert first == 1
        return recording

    recording = asyncio.run(run())
    assert recording.operations(0) == [p.Open, p.CreateValue]
    assert recording.operations(1) == [p.CreateValue, p.Close]
    assert recording.expected == []  # no compute, no reply and no chunks expected


def test_computes_reached_while_the_invocation_still_steps_ride_one_batch() -> None:
    """FedAvg's shape: aggregations reach `compute` turns apart while the
    coordinator still works them out (steps); they share one message."""

    async def run() -> RecordingChannel:
        recording = RecordingChannel()
        outbox = _outbox(recording)
        activity = recording.activity

        async def branch(value: bytes, turns: int) -> bytes | bytearray:
            for _ in range(turns):  # working out the aggregation, a step a turn
                activity.step()
                await asyncio.sleep(0)
            return await outbox.compute(outbox.create_value(value))

        await asyncio.gather(branch(b"a", 0), branch(b"b", 5), branch(b"c", 12))
        await outbox.close()
        return recording

    recording = asyncio.run(run())
    assert len(recording.batches) == 2  # the three computes, then the close
    assert recording.operations(0).count(p.Compute) == 3


def test_a_batch_goes_out_once_the_invocation_is_quiet_or_held_too_long() -> None:
    async def run(busy: bool) -> tuple[RecordingChannel, float]:
        recording = RecordingChannel()
        outbox = _outbox(recording)
        activity = recording.activity
        stop = asyncio.Event()

        async def spinning() -> None:  # a branch that never reaches a compute
            while not stop.is_set():
                activity.step()
                await asyncio.sleep(0)

        spinner = asyncio.create_task(spinning()) if busy else None
        started = time.monotonic()
        await outbox.compute(outbox.create_value(b"a"))
        waited = time.monotonic() - started
        stop.set()
        if spinner is not None:
            await spinner
        await outbox.close()
        return recording, waited

    _, quiet = asyncio.run(run(busy=False))
    assert quiet < MAX_HOLD_SECONDS  # nothing else steps: out after a few turns
    recording, held = asyncio.run(run(busy=True))
    assert MAX_HOLD_SECONDS <= held < MAX_HOLD_SECONDS + 1.0  # bounded
    assert recording.operations(0) == [p.Open, p.CreateValue, p.Compute]


def test_a_close_with_nothing_pending_is_deferred_after_every_batch() -> None:
    """With a link that lets closes ride later batches, an outbox with no
    operations pending sends no close of its own: it hands the next batch
    number to the link once all of its batches are published. With
    operations pending, the close rides them as before."""

    async def run(pending: bool) -> RecordingChannel:
        recording = RecordingChannel()
        ids = iter(range(1, 1000))
        outbox = SiloOutbox(recording.channel(defer_closes=True), "north", lambda: next(ids))
        outbox.open(clients=None)
        a = outbox.create_value(b"a")
        await outbox.compute(a)
        if pending:
            outbox.create_value(b"b")
        await outbox.close()
        return recording

    deferred = asyncio.run(run(pending=False))
    assert len(deferred.batches) == 1
    assert deferred.deferred == [("north", 1, 1)]
    assert not any(isinstance(op, p.Close) for op in deferred.batches[0].body.operations)  # type: ignore[union-attr]

    with_pending = asyncio.run(run(pending=True))
    assert with_pending.deferred == []
    assert with_pending.operations(1) == [p.CreateValue, p.Close]


class RefusingChannel(RecordingChannel):
    """The silo of tests/test_function_names.py in miniature: it refuses the
    first batch for functions it no longer holds, and every batch published
    after it (EARLIER_BATCH_REFUSED) until that batch comes again; the
    refusal comes back only once the second batch is on its way."""

    def __init__(self) -> None:
        super().__init__()
        self._replies: list[asyncio.Future[p.Result]] = []
        self.first_published = asyncio.Event()

    async def _publish(
        self, silo: str, envelope: p.Envelope, expect_reply: bool
    ) -> asyncio.Future[p.Result] | None:
        reply = await super()._publish(silo, envelope, expect_reply)
        self.first_published.set()
        assert isinstance(envelope.body, p.Batch)
        seq = envelope.body.seq
        if len(self.batches) <= 2 and reply is not None:
            # Original batches 0 and 1: answered with refusals, later.
            refusal = asyncio.get_running_loop().create_future()
            self._replies.append(refusal)
            if seq == 1:
                codes = (p.ErrorCode.MISSING_FUNCTIONS, p.ErrorCode.EARLIER_BATCH_REFUSED)
                for future, code in zip(self._replies, codes, strict=True):
                    future.set_exception(SiloError(silo, str(code), f"refused ({code})"))
            return refusal
        return reply


def test_a_batch_refused_for_missing_functions_is_sent_again_with_every_later_batch() -> None:
    """Two batches went out before the silo's refusal of the first came
    back: both are sent again, in order, and each compute gets its value."""

    async def run() -> tuple[RefusingChannel, list[bytes | bytearray]]:
        recording = RefusingChannel()
        outbox = _outbox(recording)
        a = outbox.create_value(b"a")
        first = asyncio.create_task(outbox.compute(a))
        await recording.first_published.wait()
        b = outbox.create_value(b"b")
        second = asyncio.create_task(outbox.compute(b))
        values = await asyncio.wait_for(asyncio.gather(first, second), timeout=5)
        await outbox.close()
        return recording, values

    recording, values = asyncio.run(run())
    assert values == [b"1", b"2"]
    seqs = [envelope.body.seq for envelope in recording.batches]  # type: ignore[union-attr]
    # Batches 0 and 1, then both again in order, then the close.
    assert seqs == [0, 1, 0, 1, 2], seqs
    assert recording.operations(2) == recording.operations(0)
    assert recording.operations(3) == recording.operations(1)


def test_only_batches_a_refusal_could_send_again_are_kept() -> None:
    """A batch is kept (values and all) only from the first batch still
    waiting for its reply on: only that one can be refused for functions it
    named and take the later ones with it. Values flushed early for size
    with no reply pending are let go once published."""

    async def run() -> None:
        recording = RecordingChannel(max_message_bytes=1000)
        outbox = _outbox(recording)
        outbox.create_value(b"x" * 400)
        outbox.create_value(b"y" * 400)  # the first goes out alone, no reply expected
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(recording.batches) == 1
        assert outbox._unconfirmed == {}
        # A compute whose reply is held back: it and what follows are kept.
        held: asyncio.Future[p.Result] = asyncio.get_running_loop().create_future()
        published = asyncio.Event()
        answer = recording._publish

        async def holding(silo: str, envelope: p.Envelope, expect_reply: bool):
            reply = await answer(silo, envelope, expect_reply)
            published.set()
            return None if reply is None else held

        outbox._channel = dataclasses.replace(outbox._channel, publish=holding)
        z = outbox.create_value(b"z")
        computing = asyncio.create_task(outbox.compute(z))
        await asyncio.wait_for(published.wait(), 5)
        published.clear()
        outbox.create_value(b"w" * 400)
        outbox.create_value(b"v" * 400)  # flushed early behind the pending compute
        await asyncio.wait_for(published.wait(), 5)
        assert len(recording.batches) == 3
        assert sorted(outbox._unconfirmed) == [1, 2]
        z_value = p.Result(values={z: b"z"})
        held.set_result(z_value)
        assert await computing == b"z"
        assert outbox._unconfirmed == {}
        await outbox.close()

    asyncio.run(run())
