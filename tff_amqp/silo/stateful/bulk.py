"""A silo's bulk connection: chunked values in, chunked results out.

Separate from the control connection (requests, replies, heartbeats), so a
large transfer in either direction never delays a heartbeat. It uses only
what a provisioned silo may: it reads ``tff.F.bulk.<silo>`` and writes to
``tff.F.replies`` with routing key ``bulk.<silo>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from tff_amqp import protocol as p
from tff_amqp.retry import SILO_PUBLISH, RetryPolicy
from tff_amqp.topology import Topology
from tff_amqp.transport.bulk import (
    BulkSender,
    Reassembler,
    TransferError,
    inline_limit_for,
)
from tff_amqp.transport.connection import connect
from tff_amqp.transport.schema import declare_exchange, declare_queue

log = logging.getLogger(__name__)

_PREFETCH = 8


class SiloBulk:
    """Receives chunked values for one silo and sends its large results."""

    def __init__(
        self,
        broker_url: str,
        topology: Topology,
        *,
        silo: str,
        user_id: str,
        max_message_bytes: int,
        max_pending_bytes: int,
        declare_topology: bool,
        connect_policy: RetryPolicy,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.topology = topology
        self._ssl_context = ssl_context
        self.silo = silo
        self.inline_limit = inline_limit_for(max_message_bytes)
        self._url = broker_url
        self._user_id = user_id
        self._max_message_bytes = max_message_bytes
        self._declare = declare_topology
        self._connect_policy = connect_policy
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._sender: BulkSender | None = None
        self.reassembler = Reassembler(name=f"silo {silo}", max_pending_bytes=max_pending_bytes)
        self.stats: dict[str, int] = {"malformed_chunks": 0}

    async def __aenter__(self) -> SiloBulk:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect and consume the silo's chunk queue; on failure, close."""
        self._connection = await connect(
            self._url,
            name=f"tff-amqp silo {self.silo} bulk",
            policy=self._connect_policy,
            ssl_context=self._ssl_context,
        )
        try:
            self.reassembler.start()
            self._channel = await self._connection.channel()
            await self._channel.set_qos(prefetch_count=_PREFETCH)
            queue_name = self.topology.bulk_queue(self.silo)
            if self._declare:
                replies = await declare_exchange(
                    self._channel, self.topology, self.topology.replies_exchange
                )
                queue = await declare_queue(
                    self._channel, self.topology, self.topology.bulk_queue_spec(self.silo)
                )
            else:
                replies = await self._channel.get_exchange(
                    self.topology.replies_exchange, ensure=False
                )
                queue = await self._channel.get_queue(queue_name, ensure=False)
            await queue.consume(self._on_message, no_ack=False)
            self._sender = BulkSender(
                replies,
                sender=self.silo,
                max_message_bytes=self._max_message_bytes,
                policy=SILO_PUBLISH,
                user_id=self._user_id,
            )
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Fail transfers in progress and close the connection. Idempotent."""
        await self.reassembler.close()
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._connection.close(), 5.0)
            self._connection = None

    async def receive(self, blob: p.BlobRef, *, invocation_id: str, timeout: float) -> bytearray:
        """The value the coordinator sent as transfer `blob` (bounded wait)."""
        return await self.reassembler.take(
            blob, sender="coordinator", invocation_id=invocation_id, timeout=timeout
        )

    async def send(
        self, data: bytes, *, invocation_id: str, correlation_id: str, deadline: float
    ) -> p.BlobRef:
        """Send a large result to the coordinator as a chunked transfer."""
        if self._sender is None:
            raise RuntimeError("silo bulk connection is not started")
        return await self._sender.send(
            data,
            routing_key=self.topology.bulk_reply_routing_key(self.silo),
            invocation_id=invocation_id,
            correlation_id=correlation_id,
            deadline=deadline,
        )

    def forget_invocation(self, invocation_id: str) -> None:
        self.reassembler.discard_invocation(invocation_id)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            self._handle(message)
        finally:
            await message.ack()

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
