"""Pipelined operations for one silo within one invocation.

Operations are queued locally; ids are assigned here, so creating values and
calls costs no round trip. A batch goes out when a result is needed (or the
invocation ends), once the invocation's evaluation has gone quiet on the
coordinator: every `compute` its concurrent branches reach without waiting on
anything outside this process rides in the same message, so the aggregations
of a phase (FedAvg's three) share one broker round trip.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from tff_amqp import protocol as p
from tff_amqp.errors import SiloError

# A batch waits until this many event-loop turns pass with no step of its
# invocation: a branch still being worked out (a selection, a zip, a map
# before its aggregation) steps every turn or few (measured: at most 3 quiet
# turns in a FedAvg round); one waiting on a reply or the coordinator's worker
# does not. An idle loop turns in microseconds, so waiting costs ~0.1 ms.
QUIET_TURNS = 6
# ... but never longer than this after its first `compute` (busy coordinator).
MAX_HOLD_SECONDS = 0.05


class Activity:
    """How far one invocation's evaluation has got: the executor counts a step
    at every building block it evaluates, outboxes at every operation queued.
    Outboxes read it to tell a busy invocation from one that waits."""

    def __init__(self) -> None:
        self.steps = 0

    def step(self) -> None:
        self.steps += 1


@dataclass(frozen=True)
class OutboxChannel:
    """Exactly what an outbox needs from its invocation, and nothing more: who
    sends, for which invocation and until when, the size limit its batches
    keep under, and the four calls it makes (an outbox cannot reach the
    runtime, the cohort or the local executor through it)."""

    sender: str
    invocation_id: str
    deadline_epoch: float
    max_message_bytes: int
    # Publish a batch to a silo: the future of its reply when one is expected.
    publish: Callable[[str, p.Envelope, bool], Awaitable[asyncio.Future[p.Result] | None]]
    # Chunks of a large result may arrive for (correlation id, silo, invocation id).
    expect_chunks: Callable[[str, str, str], None]
    # Wait for a silo's reply, bounded by the deadline and the silo's liveness.
    wait_for_reply: Callable[[str, asyncio.Future[p.Result]], Awaitable[p.Result]]
    # A silo's large result, sent as a chunked transfer.
    receive_blob: Callable[[str, p.BlobRef], Awaitable[bytearray]]
    # The invocation's progress, read (never changed) to time flushes.
    activity: Activity = field(default_factory=Activity)
    # Hand the invocation's close at a silo (its next batch number) to the
    # link, to ride a later batch to the silo; None: send it at once.
    defer_close: Callable[[str, int], None] | None = None


class SiloOutbox:
    """Queue of operations to one silo, flushed as batches in order."""

    def __init__(self, channel: OutboxChannel, silo: str, next_id: Callable[[], int]) -> None:
        self.silo = silo
        self._channel = channel
        self._next_id = next_id
        self._ops: list[p.Operation] = []
        # Bytes of values inline in the pending batch: flushed early so a
        # batch never reaches the broker's message size limit.
        self._inline_bytes = 0
        self._waiter: asyncio.Future[p.Result] | None = None
        # The pending hold of a scheduled flush (None: none scheduled); a
        # flush made otherwise (size budget, close) ends it.
        self._hold: object | None = None
        self._seq = itertools.count()
        # Published batches, in seq order, from the first one expecting a
        # reply that has not come: only such a batch can name functions and
        # be refused for them, and then it is sent again with every batch
        # after it (the silo refused those too; see _settle). Batches before
        # it passed the silo's intake and are not kept (their values can be
        # large).
        self._unconfirmed: dict[int, _Published] = {}
        self._publish_lock = asyncio.Lock()
        self._sends: set[asyncio.Task[None]] = set()
        self.opened = False
        self.closed = False

    # ------------------------------------------------------------ operations

    def open(self, *, clients: int | None = None, data_key: str | None = None) -> None:
        if not self.opened:
            self.opened = True
            self._ops.insert(0, p.Open(clients=clients, data_key=data_key))

    def create_value(self, serialized: bytes) -> int:
        budget = self._channel.max_message_bytes // 2
        if self._ops and self._inline_bytes + len(serialized) > budget:
            self._flush_now()
        self._inline_bytes += len(serialized)
        return self._add(lambda t: p.CreateValue(target=t, value=serialized))

    def create_blob_value(self, blob: p.BlobRef) -> int:
        """A value that travels as a chunked transfer (already published)."""
        return self._add(lambda t: p.CreateBlobValue(target=t, blob=blob))

    def create_data(self, key: str, type_spec: bytes) -> int:
        return self._add(lambda t: p.CreateData(target=t, key=key, type_spec=type_spec))

    def create_call(self, fn: int, arg: int | None) -> int:
        return self._add(lambda t: p.CreateCall(target=t, fn=fn, arg=arg))

    def create_struct(self, elements: list[tuple[str | None, int]]) -> int:
        return self._add(lambda t: p.CreateStruct(target=t, elements=tuple(elements)))

    def create_selection(self, source: int, index: int) -> int:
        return self._add(lambda t: p.CreateSelection(target=t, source=source, index=index))

    async def compute(self, source: int) -> bytes | bytearray:
        """Ask the silo to release value `source`; waits for the reply
        (bounded by the invocation's deadline and the silo's liveness)."""
        self._check_usable()
        self._ops.append(p.Compute(source=source))
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        waiter = self._waiter
        self._schedule_flush()
        result = await self._channel.wait_for_reply(self.silo, waiter)
        if source in result.blobs:
            return await self._channel.receive_blob(self.silo, result.blobs[source])
        if source not in result.values:
            raise p.ProtocolError(
                p.ErrorCode.MALFORMED, f"silo {self.silo!r} did not return value {source}"
            )
        return result.values[source]

    async def close(self) -> None:
        """Tell the silo to free the invocation (with pending operations, or
        deferred to ride a later batch); waits only for the publish."""
        if self.closed:
            return
        self.closed = True
        if self.opened:
            if self._ops or self._channel.defer_close is None:
                self._ops.append(p.Close())
                self._flush_now()
            else:
                # Once every earlier batch is published (the lock is taken in
                # order), the close may ride whatever goes to the silo next.
                async with self._publish_lock:
                    self._channel.defer_close(self.silo, next(self._seq))
        if self._sends:
            await asyncio.gather(*self._sends, return_exceptions=True)

    # ---------------------------------------------------------------- flushing

    def _add(self, make: Callable[[int], p.Operation]) -> int:
        self._check_usable()
        target = self._next_id()
        self._ops.append(make(target))
        self._channel.activity.step()
        return target

    def _check_usable(self) -> None:
        if self.closed:
            raise RuntimeError(f"invocation already closed at silo {self.silo!r}")
        if not self.opened:
            raise RuntimeError(f"silo {self.silo!r} used before it was opened")

    def _schedule_flush(self) -> None:
        if self._hold is None:
            hold = self._hold = object()
            loop = asyncio.get_running_loop()
            until = loop.time() + MAX_HOLD_SECONDS
            loop.call_soon(self._flush_when_quiet, hold, self._channel.activity.steps, 0, until)

    def _flush_when_quiet(self, hold: object, seen: int, quiet: int, until: float) -> None:
        if hold is not self._hold:
            return  # already flushed
        steps = self._channel.activity.steps
        quiet = quiet + 1 if steps == seen else 0
        loop = asyncio.get_running_loop()
        if quiet >= QUIET_TURNS or loop.time() >= until:
            self._flush_now()
        else:
            loop.call_soon(self._flush_when_quiet, hold, steps, quiet, until)

    def _flush_now(self) -> None:
        self._hold = None
        if not self._ops:
            return
        ops, self._ops = self._ops, []
        self._inline_bytes = 0
        waiter, self._waiter = self._waiter, None
        self._start(self._send(ops, waiter, next(self._seq)))

    def _start(self, sending: Coroutine[Any, Any, None]) -> None:
        """Run a send as a task of its own, kept until done (close waits)."""
        task = asyncio.create_task(sending)
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _publish(
        self, ops: list[p.Operation], seq: int, waiter: asyncio.Future[p.Result] | None
    ) -> asyncio.Future[p.Result] | None:
        """Publish batch `seq` (under the publish lock)."""
        channel = self._channel
        envelope = p.batch_envelope(
            sender=channel.sender,
            invocation_id=channel.invocation_id,
            correlation_id=p.new_id(),
            deadline=channel.deadline_epoch,
            operations=ops,
            seq=seq,
        )
        if waiter is not None:
            # Large results come back as chunks that name this batch.
            channel.expect_chunks(envelope.correlation_id, self.silo, channel.invocation_id)
        reply = await channel.publish(self.silo, envelope, waiter is not None)
        self._unconfirmed[seq] = _Published(ops, waiter)
        self._forget_passed(-1)
        return reply

    def _forget_passed(self, answered: int) -> None:
        """Stop keeping batches up to `answered` (its reply came, so they
        all passed the silo's intake) and those before the first batch
        still waiting for a reply."""
        for seq in list(self._unconfirmed):
            if seq > answered and self._unconfirmed[seq].waiter is not None:
                return
            del self._unconfirmed[seq]

    async def _send(
        self, ops: list[p.Operation], waiter: asyncio.Future[p.Result] | None, seq: int
    ) -> None:
        # Publishes leave in sequence order; replies are awaited outside the
        # lock so batches pipeline.
        try:
            async with self._publish_lock:
                reply = await self._publish(ops, seq, waiter)
        except BaseException as e:
            _fail(waiter, e)
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        if waiter is not None and reply is not None:
            await self._settle(seq, waiter, reply)

    async def _settle(
        self, seq: int, waiter: asyncio.Future[p.Result], reply: asyncio.Future[p.Result]
    ) -> None:
        """Hand batch `seq`'s result to `waiter`. A batch the silo refused for
        functions it named (before running anything; the link forgot what it
        knew of the silo) is sent again, carrying them, with every batch
        published after it: the silo refuses an invocation's later batches
        (EARLIER_BATCH_REFUSED) until the refused one comes again, and this
        batch's resend settles theirs. Every wait is bounded by the
        waiter's (the deadline and the silo's liveness)."""
        try:
            while True:
                try:
                    result = await reply
                except SiloError as e:
                    if e.code == p.ErrorCode.EARLIER_BATCH_REFUSED:
                        return  # sent again by the refused batch's _settle
                    if e.code != p.ErrorCode.MISSING_FUNCTIONS or seq not in self._unconfirmed:
                        raise
                    reply = await self._publish_again_from(seq)
                    continue
                # Every batch up to this one passed the silo's intake.
                self._forget_passed(seq)
                if not waiter.done():
                    waiter.set_result(result)
                return
        except BaseException as e:
            _fail(waiter, e)
            if not isinstance(e, asyncio.CancelledError):
                return
            raise

    async def _publish_again_from(self, seq: int) -> asyncio.Future[p.Result]:
        """Publish batch `seq` and every later one again, in order; the
        later ones are settled by tasks of their own. The future of
        `seq`'s new reply."""
        async with self._publish_lock:
            again = [(s, kept) for s, kept in self._unconfirmed.items() if s >= seq]
            replies = [
                (later, kept.waiter, await self._publish(kept.ops, later, kept.waiter))
                for later, kept in again
            ]
        first = None
        for later, waiter, reply in replies:
            if later == seq:
                first = reply
            elif waiter is not None and reply is not None:
                self._start(self._settle(later, waiter, reply))
        assert first is not None, f"batch {seq} expects a reply"
        return first


@dataclass(frozen=True)
class _Published:
    """A batch as published, kept until it is known to have passed the
    silo's intake (so it can be sent again)."""

    ops: list[p.Operation]
    waiter: asyncio.Future[p.Result] | None


def _fail(waiter: asyncio.Future[p.Result] | None, error: BaseException) -> None:
    """End `waiter` with `error` (cancelled when the reply was abandoned:
    the silo dropped, the invocation closed)."""
    if waiter is None or waiter.done():
        return
    if isinstance(error, asyncio.CancelledError):
        waiter.cancel()
        return
    waiter.set_exception(error)
    # Mark it retrieved: when the invocation already ended (e.g. at its
    # deadline) nobody awaits it, and asyncio would log it.
    waiter.exception()
