"""A pool worker's bulk connection: a round's broadcast read from the silo's
stream, large accumulators sent as chunks.

The coordinator publishes a broadcast above the inline limit once per round
into every cohort silo's broadcast stream (``tff.F.broadcast.<silo>``); work
items only name it (`BlobRef`) and say from when to read. A stream, unlike a
queue, is not consumed away: every worker of the pool reads the same chunks,
and one that starts late still finds them (retention: see topology.py). A
worker reads the stream from that point with a short-lived consumer, keeps
the chunks of the wanted transfer only, verifies the SHA-256 (`Reassembler`),
and caches the value, so the shards of one round on one worker fetch it once.
The cache holds at most `MAX_CACHED` values and drops each when its round's
deadline passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from tff_amqp import protocol as p
from tff_amqp.silo.bulk import PREFETCH, BulkSettings, SiloBulkConnection
from tff_amqp.transport.bulk import (
    DEFAULT_MAX_PENDING_BYTES,
    Reassembler,
    TransferError,
    acked_after,
)
from tff_amqp.transport.schema import declare_broadcast_stream

log = logging.getLogger(__name__)

# Broadcasts kept at once: the current round's, and the next one's while the
# last items of the current round still run.
MAX_CACHED = 2


@dataclass
class _Cached:
    value: asyncio.Future[bytes]
    expires: float  # epoch seconds: the round's deadline


class PoolBulk(SiloBulkConnection):
    """Broadcasts from the silo's stream (cached per round), results as chunks."""

    def __init__(
        self,
        settings: BulkSettings,
        *,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        stats: dict[str, int] | None = None,
    ) -> None:
        super().__init__(settings, role="worker")
        self._max_pending_bytes = max_pending_bytes
        # Keyed by the whole BlobRef: a value is the one with that id, size and checksum.
        self._cache: OrderedDict[p.BlobRef, _Cached] = OrderedDict()
        # The owner's counters, if it passes them (the worker's metrics).
        self.stats = stats if stats is not None else {}
        self.stats.setdefault("broadcast_fetches", 0)
        self.stats.setdefault("broadcast_cache_hits", 0)
        # Chunk messages read from the stream, the wanted ones or not.
        self.stats.setdefault("broadcast_read_bytes", 0)

    async def _start_receiving(
        self, connection: AbstractRobustConnection, channel: AbstractChannel
    ) -> None:
        # Nothing is consumed until an item needs a broadcast; a worker that
        # may configure (guest mode) declares the stream so it exists early.
        # On a channel of its own: a refusal (a broker without streams, a
        # stream declared with other arguments) closes the channel, and must
        # not stop a worker whose rounds may never need a stream.
        if self._declare:
            own = await connection.channel()
            try:
                await declare_broadcast_stream(own, self.topology, self.silo)
            except Exception as e:
                log.warning(
                    "pool_worker.broadcast_stream_unavailable",
                    extra={"stream": self.topology.broadcast_queue(self.silo), "error": str(e)},
                )
            finally:
                with contextlib.suppress(Exception):
                    await own.close()

    async def close(self) -> None:
        for entry in self._cache.values():
            entry.value.cancel()
        self._cache.clear()
        await super().close()

    @property
    def cached(self) -> int:
        """Broadcasts held (or being fetched) in the cache."""
        return len(self._cache)

    async def broadcast(
        self, blob: p.BlobRef, *, since: float, round_id: str, deadline: float
    ) -> bytes:
        """The broadcast `blob` of round `round_id`: from the cache, or read
        from the silo's stream starting at `since` (epoch seconds), waiting at
        most until `deadline`."""
        self._evict()
        entry = self._cache.get(blob)
        if entry is not None and not _failed(entry.value):
            self.stats["broadcast_cache_hits"] += 1
            self._cache.move_to_end(blob)
            return await asyncio.shield(entry.value)
        self.stats["broadcast_fetches"] += 1
        task = asyncio.ensure_future(self._fetch(blob, since, round_id, deadline))
        task.add_done_callback(_retrieve)
        self._cache[blob] = _Cached(task, deadline)
        # Freed when its round is over even if no further item comes.
        asyncio.get_running_loop().call_later(max(0.0, deadline - time.time()) + 1.0, self._evict)
        while len(self._cache) > MAX_CACHED:
            self._cache.popitem(last=False)
        try:
            return await asyncio.shield(task)
        except BaseException:
            if self._cache.get(blob) is not None and task.done():
                del self._cache[blob]  # a failed fetch is not cached
            raise

    def _evict(self) -> None:
        # Dropped, not cancelled: an item may still await a fetch in flight,
        # which ends by itself at its deadline at the latest.
        now = time.time()
        for key, entry in list(self._cache.items()):
            if now > entry.expires:
                del self._cache[key]

    async def _fetch(self, blob: p.BlobRef, since: float, round_id: str, deadline: float) -> bytes:
        if self._connection is None:
            raise RuntimeError("worker bulk connection is not started")
        started = time.monotonic()
        read_before = self.stats["broadcast_read_bytes"]
        # A channel per fetch: its consumer and prefetch window end with it.
        channel = await self._connection.channel()
        try:
            await channel.set_qos(prefetch_count=PREFETCH)  # streams require a prefetch
            queue = await channel.get_queue(self.topology.broadcast_queue(self.silo), ensure=False)
            async with Reassembler(
                name=f"worker {self.silo} broadcast", max_pending_bytes=self._max_pending_bytes
            ) as reassembler:
                # Streams need manual acks to keep delivering.
                on_message = acked_after(lambda m: self._on_chunk(m, blob, reassembler))
                offset = datetime.datetime.fromtimestamp(max(0, int(since)), datetime.UTC)
                tag = await queue.consume(
                    on_message, no_ack=False, arguments={"x-stream-offset": offset}
                )
                try:
                    data = await reassembler.take(
                        blob,
                        sender="coordinator",
                        invocation_id=round_id,
                        timeout=deadline - time.time(),
                    )
                except TransferError as e:
                    raise TransferError(
                        e.code,
                        f"{e}; reading stream {self.topology.broadcast_queue(self.silo)} from "
                        f"{offset.isoformat()} (if no chunk arrived, the coordinator's clock may "
                        "be ahead of the broker's, or the stream's retention dropped it)",
                    ) from e
                finally:
                    with contextlib.suppress(Exception):
                        await queue.cancel(tag)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        value = bytes(data)  # immutable: shared by every shard that uses it
        log.info(
            "pool_worker.broadcast_fetched",
            extra={
                "transfer": blob.transfer,
                "bytes": blob.size,
                "read_bytes": self.stats["broadcast_read_bytes"] - read_before,
                "seconds": round(time.monotonic() - started, 3),
            },
        )
        return value

    def _on_chunk(
        self, message: AbstractIncomingMessage, blob: p.BlobRef, reassembler: Reassembler
    ) -> None:
        self.stats["broadcast_read_bytes"] += len(message.body)
        try:
            envelope = p.decode(message.body, max_bytes=self._max_message_bytes)
        except p.ProtocolError as e:
            log.warning("pool_worker.malformed_chunk", extra={"error": str(e)})
            return
        chunk = envelope.body
        # The stream holds other rounds' broadcasts too: only the wanted
        # transfer is buffered. Only the coordinator may publish into it
        # (write on tff.F.bulk), hence one sender name.
        if not isinstance(chunk, p.Chunk) or chunk.blob.transfer != blob.transfer:
            return
        try:
            reassembler.add(
                chunk,
                sender="coordinator",
                invocation_id=envelope.invocation_id,
                deadline=envelope.deadline or time.time() + 60.0,
            )
        except TransferError as e:
            log.warning("pool_worker.transfer_failed", extra={"error": str(e)})


def _retrieve(future: asyncio.Future[bytes]) -> None:
    # A fetch nobody awaits any more must not log "exception never retrieved".
    if not future.cancelled():
        future.exception()


def _failed(future: asyncio.Future[bytes]) -> bool:
    return future.done() and (future.cancelled() or future.exception() is not None)
