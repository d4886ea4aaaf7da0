"""`SiloOutbox` on its own: it sees its invocation only through an
`OutboxChannel`, so its pipelining rules are checked here with a recording
channel (the same rules over the real broker: tests/test_semantics.py and
tests/test_payloads.py)."""

from __future__ import annotations

import asyncio

from tff_amqp import protocol as p
from tff_amqp.coordinator.stateful.outbox import OutboxChannel, SiloOutbox


class RecordingChannel:
    """Publishes nowhere: records each batch and answers every `compute`
    with the value id's bytes."""

    def __init__(self, max_message_bytes: int = 1_000_000) -> None:
        self.batches: list[p.Envelope] = []
        self.expected: list[tuple[str, str, str]] = []
        self.max_message_bytes = max_message_bytes

    def channel(self) -> OutboxChannel:
        return OutboxChannel(
            sender="coordinator",
            invocation_id="inv",
            deadline_epoch=2e9,
            max_message_bytes=self.max_message_bytes,
            publish=self._publish,
            expect_chunks=lambda corr, silo, inv: self.expected.append((corr, silo, inv)),
            wait_for_reply=self._wait,
            receive_blob=self._blob,
        )

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
