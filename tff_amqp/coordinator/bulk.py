"""The coordinator's bulk connection: large values to silos, large results back.
Shared by both coordinators: the stateful one sends values to silos' bulk
queues; the MapReduce one sends a round's broadcast into the silos' broadcast
streams (`send(..., streams=True)`); both reassemble silos' chunked results here.

A second broker connection, apart from the control link, so a transfer of
hundreds of MB never delays a heartbeat or a small request (AMQP frames of one
connection share one socket in order). Outgoing values are published once to
``tff.F.bulk`` with the first silo as routing key and the others in a ``CC``
header (sender-selected distribution): the broker fans them out.

Incoming chunks (``tff.F.coordinator.bulk``, bound to ``bulk.*`` on the reply
exchange) are validated like control replies: the routing key names the silo,
the envelope's sender matches it, the message carries a broker-validated
``user_id``, and the correlation id is one of a batch we sent to that silo and
still wait for. Anything else is rejected, logged and counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from tff_amqp import protocol as p
from tff_amqp.retry import COORDINATOR_PUBLISH
from tff_amqp.topology import Topology
from tff_amqp.transport.bulk import (
    DEFAULT_MAX_PENDING_BYTES,
    BulkSender,
    Reassembler,
    TransferError,
    acked_after,
    inline_limit_for,
)
from tff_amqp.transport.connection import connect
from tff_amqp.transport.schema import declare_exchange, declare_queue

log = logging.getLogger(__name__)

# Chunks delivered before we ack them: bounds what the broker pushes into
# this process (prefetch x chunk size) while transfers stream in.
_PREFETCH = 8


@dataclass(frozen=True)
class _Expected:
    silo: str
    invocation_id: str
    # The silo process asked (None: any process of the silo, as a pool's).
    instance: str | None = None


class CoordinatorBulk:
    """Sends chunked values to silos and reassembles chunked results."""

    def __init__(
        self,
        broker_url: str,
        topology: Topology,
        *,
        sender: str,
        max_message_bytes: int,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
    ) -> None:
        self.topology = topology
        self.sender = sender
        self.max_message_bytes = max_message_bytes
        self.inline_limit = inline_limit_for(max_message_bytes)
        self._url = broker_url
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._sender: BulkSender | None = None
        self._reassembler = Reassembler(name="coordinator", max_pending_bytes=max_pending_bytes)
        # correlation id of a batch with computes -> who may send chunks for it
        self._expected: dict[str, _Expected] = {}
        # stream_*: broadcasts published into pool streams (value bytes,
        # counted once per publish however many silos the broker copies to).
        self.stats: dict[str, int] = {
            "received_bytes": 0,
            "rejected_chunks": 0,
            # of them: chunks from another process of the silo than the one asked
            "rejected_instance": 0,
            "stream_transfers": 0,
            "stream_bytes": 0,
        }
        self._policy = COORDINATOR_PUBLISH

    @property
    def sent_bytes(self) -> int:
        """Bytes of chunk messages published (each broadcast counted once)."""
        return self._sender.stats.bytes if self._sender is not None else 0

    @property
    def transfers(self) -> int:
        return self._sender.stats.transfers if self._sender is not None else 0

    async def __aenter__(self) -> CoordinatorBulk:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        self._connection = await connect(self._url, name=f"tff-amqp coordinator {self.sender} bulk")
        try:
            self._reassembler.start()
            self._channel = await self._connection.channel()
            await self._channel.set_qos(prefetch_count=_PREFETCH)
            exchange = await declare_exchange(
                self._channel, self.topology, self.topology.bulk_exchange
            )
            # Like the control queue: survives a reconnect, expires a minute
            # after its consumer is gone.
            queue = await declare_queue(
                self._channel, self.topology, self.topology.coordinator_bulk_queue_spec()
            )
            await queue.consume(acked_after(self._handle), no_ack=False, exclusive=True)
            await queue.purge()
            self._sender = BulkSender(
                exchange,
                sender=self.sender,
                max_message_bytes=self.max_message_bytes,
                policy=self._policy,
            )
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        await self._reassembler.close()
        self._expected.clear()
        if self._connection is not None:
            try:
                await asyncio.wait_for(self._connection.close(), 5.0)
            except Exception:
                log.debug("closing bulk connection failed", exc_info=True)
            self._connection = None

    # --------------------------------------------------------------- sending

    async def send(
        self,
        data: bytes | bytearray | memoryview,
        silos: Sequence[str],
        *,
        invocation_id: str,
        deadline: float,
        streams: bool = False,
    ) -> p.BlobRef:
        """Publish `data` once for all `silos` (the broker copies it): into
        their bulk queues, or with `streams` into their broadcast streams
        (stateless regime: every worker of a pool reads it from there)."""
        if streams:
            keys = [self.topology.broadcast_routing_key(s) for s in silos]
        else:
            keys = [self.topology.request_routing_key(s) for s in silos]
        blob = await self._send(data, keys, list(silos), invocation_id, deadline)
        if streams:
            self.stats["stream_transfers"] += 1
            self.stats["stream_bytes"] += blob.size
        return blob

    async def _send(
        self,
        data: bytes | bytearray | memoryview,
        keys: list[str],
        silos: list[str],
        invocation_id: str,
        deadline: float,
    ) -> p.BlobRef:
        if self._sender is None:
            raise RuntimeError("coordinator bulk connection is not started")
        if not keys:
            raise ValueError("a transfer needs at least one silo")
        blob = await self._sender.send(
            data, routing_key=keys[0], cc=keys[1:], invocation_id=invocation_id, deadline=deadline
        )
        log.info(
            "coordinator.transfer_sent",
            extra={"transfer": blob.transfer, "bytes": blob.size, "silos": silos},
        )
        return blob

    # -------------------------------------------------------------- receiving

    def expect(
        self, correlation_id: str, silo: str, invocation_id: str, instance: str | None = None
    ) -> None:
        """Chunks for the batch `correlation_id` may come from `silo` (from
        its process `instance` only, when given)."""
        self._expected[correlation_id] = _Expected(silo, invocation_id, instance)

    def forget_invocation(self, invocation_id: str) -> None:
        for corr in [c for c, e in self._expected.items() if e.invocation_id == invocation_id]:
            del self._expected[corr]
        self._reassembler.discard_invocation(invocation_id)

    async def receive(
        self, silo: str, blob: p.BlobRef, *, invocation_id: str, timeout: float
    ) -> bytearray:
        """The value a silo sent as a chunked transfer (bounded wait)."""
        return await self._reassembler.take(
            blob, sender=silo, invocation_id=invocation_id, timeout=timeout
        )

    def _handle(self, message: AbstractIncomingMessage) -> None:
        self.stats["received_bytes"] += len(message.body)
        routing_key = message.routing_key or ""
        prefix = "bulk."
        silo = routing_key[len(prefix) :] if routing_key.startswith(prefix) else ""
        try:
            envelope = p.decode(message.body, max_bytes=self.max_message_bytes)
        except p.ProtocolError as e:
            return self._reject(silo, f"malformed chunk: {e}")
        if not p.is_valid_name(silo) or envelope.sender != silo:
            return self._reject(silo, f"sender {envelope.sender!r} does not match routing key")
        if not message.user_id:
            return self._reject(silo, "chunk has no validated user_id")
        if envelope.kind is not p.Kind.CHUNK:
            return self._reject(silo, f"expected a chunk, got {envelope.kind}")
        expected = self._expected.get(envelope.correlation_id)
        if expected is None or expected.silo != silo:
            return self._reject(silo, "no transfer expected from this silo for its correlation id")
        if expected.instance and envelope.instance != expected.instance:
            self.stats["rejected_instance"] += 1
            return self._reject(
                silo,
                f"chunk from process instance {envelope.instance[:8] or '?'}, not the silo's "
                f"process {expected.instance[:8]} that was asked",
            )
        assert isinstance(envelope.body, p.Chunk)
        try:
            self._reassembler.add(
                envelope.body,
                sender=silo,
                invocation_id=expected.invocation_id,
                deadline=envelope.deadline or time.time() + 60.0,
            )
        except TransferError as e:
            log.warning("coordinator.transfer_failed", extra={"silo": silo, "error": str(e)})

    def _reject(self, silo: str, reason: str) -> None:
        self.stats["rejected_chunks"] += 1
        log.warning("coordinator.rejected_chunk", extra={"silo": silo, "reason": reason})
