"""Chunked transfer of large values: sizing, sending, and bounded reassembly.

A value above the inline limit does not ride in a batch or a result. It is cut
into chunks of at most `chunk_bytes_for(max_message_bytes)` (never more than
8 MiB), each a `Kind.CHUNK` message naming the transfer, its sequence number,
the chunk count, its byte offset and the SHA-256 of the whole value. Chunks
travel on a separate *bulk* connection and separate queues, so heartbeats and
small requests never wait behind them (head-of-line blocking happens per
connection in AMQP). A broadcast is published once with a ``CC`` header: the
broker copies it into every named silo's bulk queue.

The receiving side preallocates the announced size on the first chunk (bounded
by `max_pending_bytes` over all transfers), writes every chunk at its offset,
verifies the checksum once complete, and frees the buffer when the value is
taken, when its deadline passes, or when its invocation ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from tff_amqp import protocol as p
from tff_amqp.errors import CodedError
from tff_amqp.retry import RetryPolicy
from tff_amqp.transport.connection import publish_with_retry

log = logging.getLogger(__name__)

# Room for the envelope and AMQP properties around a chunk's data.
_ENVELOPE_HEADROOM = 64 * 1024
# Values up to this size stay inline in batches and results (fast path).
INLINE_LIMIT = 1024 * 1024
# Bytes a receiver may hold in partial or unclaimed transfers at once.
DEFAULT_MAX_PENDING_BYTES = 4 * 1024 * 1024 * 1024
# Chunks published concurrently (awaiting confirms) per transfer.
_PUBLISH_WINDOW = 4


def acked_after(
    handle: Callable[[AbstractIncomingMessage], None],
) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
    """A consumer callback for chunk messages: `handle` stores the chunk (or
    drops it), then the message is acked whatever happened. Acked after, not
    before: with a manual-ack consumer, the prefetch window is what bounds the
    chunk bytes in flight towards the process (and a stream needs the acks to
    keep delivering)."""

    async def on_message(message: AbstractIncomingMessage) -> None:
        try:
            handle(message)
        finally:
            await message.ack()

    return on_message


class TransferError(CodedError):
    """A chunked transfer failed: corrupt, too large, timed out or abandoned."""

    code: p.ErrorCode


def chunk_bytes_for(max_message_bytes: int) -> int:
    """Chunk size in force for a broker that accepts `max_message_bytes`."""
    if max_message_bytes < 4 * _ENVELOPE_HEADROOM:
        raise ValueError(
            f"max_message_bytes={max_message_bytes} is too small for chunked transfers; "
            f"use at least {4 * _ENVELOPE_HEADROOM} (RabbitMQ's default is 16 MiB in 4.x, "
            "128 MiB in 3.x)"
        )
    return min(p.MAX_CHUNK_BYTES, max_message_bytes - _ENVELOPE_HEADROOM)


def inline_limit_for(max_message_bytes: int) -> int:
    """Largest value sent inline; larger ones go as chunked transfers."""
    return min(INLINE_LIMIT, chunk_bytes_for(max_message_bytes) // 2)


async def checksum(data: bytes | bytearray | memoryview) -> bytes:
    """SHA-256 in a thread (hashlib releases the GIL on large buffers), so the
    event loop keeps serving heartbeats while hundreds of MB are hashed."""
    return await asyncio.to_thread(lambda: hashlib.sha256(data).digest())


@dataclass
class SendStats:
    transfers: int = 0
    chunks: int = 0
    bytes: int = 0


class BulkSender:
    """Publishes values as chunk messages on one (bulk) channel's exchange."""

    def __init__(
        self,
        exchange: AbstractExchange,
        *,
        sender: str,
        max_message_bytes: int,
        policy: RetryPolicy,
        user_id: str | None = None,
        instance: str = "",
    ) -> None:
        self._exchange = exchange
        # The sending process's instance id (silo side), stamped on every
        # chunk: the coordinator takes chunks only from the process it asked.
        self._instance = instance
        self._sender = sender
        self._max_message_bytes = max_message_bytes
        self.chunk_bytes = chunk_bytes_for(max_message_bytes)
        self._policy = policy
        self._user_id = user_id
        self.stats = SendStats()

    async def send(
        self,
        data: bytes | bytearray | memoryview,
        *,
        routing_key: str,
        cc: Sequence[str] = (),
        invocation_id: str,
        correlation_id: str = "",
        deadline: float,
        transfer: str | None = None,
    ) -> p.BlobRef:
        """Publish `data` as chunks to `routing_key` (and, via the broker's
        sender-selected distribution, to every key in `cc`). Returns once every
        chunk is confirmed by the broker."""
        view = memoryview(data).cast("B")
        blob = p.BlobRef(
            transfer=transfer or p.new_id(), size=len(view), sha256=await checksum(view)
        )
        count = max(1, -(-len(view) // self.chunk_bytes))
        window = asyncio.Semaphore(_PUBLISH_WINDOW)
        tasks: list[asyncio.Task[None]] = []
        try:
            for seq in range(count):
                await window.acquire()
                if tasks and tasks[-1].done() and tasks[-1].exception() is not None:
                    break
                offset = seq * self.chunk_bytes
                piece = view[offset : offset + self.chunk_bytes]
                task = asyncio.create_task(
                    self._publish_chunk(
                        p.Chunk(blob=blob, seq=seq, count=count, offset=offset, data=piece),  # type: ignore[arg-type]
                        routing_key=routing_key,
                        cc=cc,
                        invocation_id=invocation_id,
                        correlation_id=correlation_id,
                        deadline=deadline,
                    )
                )
                task.add_done_callback(lambda _: window.release())
                tasks.append(task)
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        self.stats.transfers += 1
        return blob

    async def _publish_chunk(
        self,
        chunk: p.Chunk,
        *,
        routing_key: str,
        cc: Sequence[str],
        invocation_id: str,
        correlation_id: str,
        deadline: float,
    ) -> None:
        envelope = p.Envelope(
            kind=p.Kind.CHUNK,
            body=chunk,
            sender=self._sender,
            invocation_id=invocation_id,
            correlation_id=correlation_id,
            deadline=deadline,
            instance=self._instance,
        )
        payload = p.encode(envelope, max_bytes=self._max_message_bytes)
        ttl = envelope.ttl_seconds()
        message = aio_pika.Message(
            payload,
            content_type=p.CONTENT_TYPE,
            message_id=envelope.message_id,
            correlation_id=correlation_id or None,
            type=str(p.Kind.CHUNK),
            user_id=self._user_id,
            # Chunks of a silo that is gone expire with the invocation instead
            # of piling up in its durable queue.
            expiration=max(ttl, 0.001) if ttl is not None else None,
            delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
            headers={"CC": list(cc)} if cc else None,
        )
        await publish_with_retry(self._exchange, message, routing_key, self._policy)
        self.stats.chunks += 1
        self.stats.bytes += len(payload)


@dataclass
class _Transfer:
    blob: p.BlobRef
    sender: str
    invocation_id: str
    expires: float  # time.monotonic()
    count: int = 0
    buffer: bytearray | None = None
    received: set[int] = field(default_factory=set)
    result: asyncio.Future[bytearray] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    verifying: bool = False


class Reassembler:
    """Collects the chunks of incoming transfers into preallocated buffers.

    Use as ``async with Reassembler(...) as r``: a sweeper frees transfers whose
    deadline has passed. `add` is fed by a consumer; `take` waits (bounded) for
    a complete, verified value and removes it.
    """

    def __init__(
        self,
        *,
        name: str,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        grace: float = 30.0,
        sweep_interval: float = 1.0,
    ) -> None:
        self.name = name
        self.max_pending_bytes = max_pending_bytes
        self._grace = grace
        self._sweep_interval = sweep_interval
        self._transfers: dict[str, _Transfer] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._verifying: set[asyncio.Future[None]] = set()
        # Invocations that ended: their late chunks are dropped, never buffered.
        self._ended: OrderedDict[str, None] = OrderedDict()
        self.stats: dict[str, int] = {
            "late_chunks": 0,
            "chunks": 0,
            "duplicate_chunks": 0,
            "completed": 0,
            "failed": 0,
            "expired": 0,
        }

    async def __aenter__(self) -> Reassembler:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start(self) -> None:
        """Start sweeping abandoned transfers (see `close`)."""
        self._sweeper = asyncio.create_task(self._sweep_loop(), name=f"reassembler-{self.name}")

    async def close(self) -> None:
        """Stop the sweeper and fail every transfer still in progress."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for task in list(self._verifying):
            task.cancel()
        for transfer_id in list(self._transfers):
            self._fail(transfer_id, TransferError(p.ErrorCode.EXPIRED, "receiver stopped"))

    @property
    def pending_bytes(self) -> int:
        return sum(len(t.buffer) for t in self._transfers.values() if t.buffer is not None)

    def _entry(self, blob: p.BlobRef, sender: str, invocation_id: str, expires: float) -> _Transfer:
        transfer = self._transfers.get(blob.transfer)
        if transfer is None:
            transfer = _Transfer(blob, sender, invocation_id, expires)
            self._transfers[blob.transfer] = transfer
        elif transfer.blob != blob or transfer.sender != sender:
            raise TransferError(
                p.ErrorCode.MALFORMED,
                f"{self.name}: transfer {blob.transfer} from {sender!r} does not match what "
                f"was announced ({transfer.blob.size} bytes from {transfer.sender!r})",
            )
        transfer.expires = max(transfer.expires, expires)
        return transfer

    def add(self, chunk: p.Chunk, *, sender: str, invocation_id: str, deadline: float) -> None:
        """Store one chunk. Problems fail the transfer (its waiter sees a clear
        error) and are raised to the caller for logging."""
        if invocation_id in self._ended:
            self.stats["late_chunks"] += 1
            return
        expires = time.monotonic() + max(deadline - time.time(), 0.0) + self._grace
        transfer = self._entry(chunk.blob, sender, invocation_id, expires)
        if transfer.result.done():
            self.stats["duplicate_chunks"] += 1
            return
        self.stats["chunks"] += 1
        if transfer.buffer is None:
            size = chunk.blob.size
            if self.pending_bytes + size > self.max_pending_bytes:
                error = TransferError(
                    p.ErrorCode.TOO_LARGE,
                    f"{self.name}: transfer {chunk.blob.transfer} of {size} bytes would exceed "
                    f"the limit of {self.max_pending_bytes} bytes held in transfers at once "
                    f"({self.pending_bytes} held now); raise max_pending_transfer_bytes",
                )
                self._fail(chunk.blob.transfer, error)
                raise error
            transfer.buffer = bytearray(size)
            transfer.count = chunk.count
        if chunk.count != transfer.count:
            error = TransferError(
                p.ErrorCode.MALFORMED,
                f"{self.name}: chunk {chunk.seq} of transfer {chunk.blob.transfer} announces "
                f"{chunk.count} chunks, earlier ones {transfer.count}",
            )
            self._fail(chunk.blob.transfer, error)
            raise error
        if chunk.seq in transfer.received:
            self.stats["duplicate_chunks"] += 1
            return
        transfer.buffer[chunk.offset : chunk.offset + len(chunk.data)] = chunk.data
        transfer.received.add(chunk.seq)
        if len(transfer.received) == transfer.count and not transfer.verifying:
            transfer.verifying = True
            task = asyncio.ensure_future(self._verify(transfer))
            self._verifying.add(task)
            task.add_done_callback(self._verifying.discard)

    async def _verify(self, transfer: _Transfer) -> None:
        assert transfer.buffer is not None
        digest = await checksum(transfer.buffer)
        if transfer.result.done():
            return
        if digest != transfer.blob.sha256:
            self._fail(
                transfer.blob.transfer,
                TransferError(
                    p.ErrorCode.MALFORMED,
                    f"{self.name}: transfer {transfer.blob.transfer} from {transfer.sender!r} "
                    "failed its SHA-256 check (corrupted or mixed chunks)",
                ),
            )
            return
        self.stats["completed"] += 1
        transfer.result.set_result(transfer.buffer)

    async def take(
        self, blob: p.BlobRef, *, sender: str, invocation_id: str, timeout: float
    ) -> bytearray:
        """Wait at most `timeout` seconds for the complete, verified value of
        `blob`, then forget it (the caller owns the buffer)."""
        expires = time.monotonic() + max(timeout, 0.0) + self._grace
        transfer = self._entry(blob, sender, invocation_id, expires)
        try:
            return await asyncio.wait_for(asyncio.shield(transfer.result), max(timeout, 0.0))
        except TimeoutError:
            got = len(transfer.received)
            raise TransferError(
                p.ErrorCode.EXPIRED,
                f"{self.name}: transfer {blob.transfer} of {blob.size} bytes from {sender!r} "
                f"incomplete after {timeout:.1f} s ({got} of {transfer.count or '?'} chunks "
                "arrived) at the invocation's deadline",
            ) from None
        finally:
            self._drop(blob.transfer)

    def discard_invocation(self, invocation_id: str) -> None:
        """Free every transfer of an invocation that ended."""
        self._ended[invocation_id] = None
        while len(self._ended) > 10_000:
            self._ended.popitem(last=False)
        for transfer_id, transfer in list(self._transfers.items()):
            if transfer.invocation_id == invocation_id:
                self._fail(
                    transfer_id,
                    TransferError(
                        p.ErrorCode.UNKNOWN_INVOCATION,
                        f"{self.name}: invocation {invocation_id[:8]} ended before transfer "
                        f"{transfer_id} was used",
                    ),
                )

    def _fail(self, transfer_id: str, error: TransferError) -> None:
        transfer = self._transfers.get(transfer_id)
        if transfer is None:
            return
        if not transfer.result.done():
            self.stats["failed"] += 1
            transfer.result.set_exception(error)
            transfer.result.exception()  # retrieved: a waiter may not exist
        # The buffer goes now; a tombstone (done future) drops late chunks.
        transfer.buffer = None
        transfer.received.clear()

    def _drop(self, transfer_id: str) -> None:
        transfer = self._transfers.pop(transfer_id, None)
        if transfer is not None:
            transfer.buffer = None

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval)
            now = time.monotonic()
            for transfer_id, transfer in list(self._transfers.items()):
                if now > transfer.expires:
                    if not transfer.result.done():
                        self.stats["expired"] += 1
                        log.warning(
                            "bulk.transfer_expired",
                            extra={
                                "receiver": self.name,
                                "transfer": transfer_id,
                                "chunks": len(transfer.received),
                                "of": transfer.count,
                            },
                        )
                    self._fail(
                        transfer_id,
                        TransferError(
                            p.ErrorCode.EXPIRED,
                            f"{self.name}: transfer {transfer_id} expired before it was used",
                        ),
                    )
                    self._drop(transfer_id)
