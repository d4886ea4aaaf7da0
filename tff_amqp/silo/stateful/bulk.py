"""A silo's bulk connection: chunked values in, chunked results out.

Separate from the control connection (requests, replies, heartbeats), so a
large transfer in either direction never delays a heartbeat. It uses only
what a provisioned silo may: it reads ``tff.F.bulk.<silo>`` and writes to
``tff.F.replies`` with routing key ``bulk.<silo>`` (the sending side is the
shared `SiloBulkConnection`).
"""

from __future__ import annotations

import logging

from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from tff_amqp import protocol as p
from tff_amqp.silo.bulk import BulkSettings, SiloBulkConnection
from tff_amqp.transport.bulk import Reassembler, TransferError, acked_after
from tff_amqp.transport.schema import declare_queue

log = logging.getLogger(__name__)


class SiloBulk(SiloBulkConnection):
    """Receives chunked values for one silo and sends its large results."""

    def __init__(self, settings: BulkSettings, *, max_pending_bytes: int) -> None:
        super().__init__(settings)
        self.reassembler = Reassembler(
            name=f"silo {settings.silo}", max_pending_bytes=max_pending_bytes
        )
        self.stats: dict[str, int] = {"malformed_chunks": 0}

    async def _start_receiving(
        self, connection: AbstractRobustConnection, channel: AbstractChannel
    ) -> None:
        """Consume the silo's chunk queue."""
        self.reassembler.start()
        if self._declare:
            queue = await declare_queue(
                channel, self.topology, self.topology.bulk_queue_spec(self.silo)
            )
        else:
            queue = await channel.get_queue(self.topology.bulk_queue(self.silo), ensure=False)
        await queue.consume(acked_after(self._handle), no_ack=False)

    async def close(self) -> None:
        """Fail transfers in progress and close the connection. Idempotent."""
        await self.reassembler.close()
        await super().close()

    async def receive(self, blob: p.BlobRef, *, invocation_id: str, timeout: float) -> bytearray:
        """The value the coordinator sent as transfer `blob` (bounded wait)."""
        return await self.reassembler.take(
            blob, sender="coordinator", invocation_id=invocation_id, timeout=timeout
        )

    def forget_invocation(self, invocation_id: str) -> None:
        self.reassembler.discard_invocation(invocation_id)

    def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            envelope = p.decode(message.body, max_bytes=self._max_message_bytes)
        except p.ProtocolError as e:
            self.stats["malformed_chunks"] += 1
            log.warning("silo.malformed_chunk", extra={"error": str(e)})
            return
        if envelope.kind is not p.Kind.CHUNK or not isinstance(envelope.body, p.Chunk):
            self.stats["malformed_chunks"] += 1
            log.warning("silo.malformed_chunk", extra={"error": f"kind {envelope.kind}"})
            return
        if envelope.expired():
            return  # the invocation is over; the coordinator no longer waits
        try:
            # Only the coordinator may publish to tff.F.bulk (broker
            # permissions), so the sender is recorded under one name.
            self.reassembler.add(
                envelope.body,
                sender="coordinator",
                invocation_id=envelope.invocation_id,
                deadline=envelope.deadline,
            )
        except TransferError as e:
            log.warning("silo.transfer_failed", extra={"error": str(e)})
