"""A silo-side process's presence on the broker, shared by both of them (the
stateful `tff-amqp silo` and the stateless pool worker).

One robust, outbound-only connection; the federation's replies exchange;
hello, a heartbeat beside the work, goodbye; and every publish as the silo's
broker user (validated `user_id`) on routing key ``reply.<silo>``. What the
process consumes, and what it does with it, is its own business.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from tff_amqp import protocol as p
from tff_amqp.errors import CodedError
from tff_amqp.retry import SILO_PUBLISH, connect_within
from tff_amqp.topology import Topology
from tff_amqp.transport.bundling import BundlingPublisher
from tff_amqp.transport.connection import (
    connect,
    envelope_message,
    publish_with_retry,
    username_of,
)
from tff_amqp.transport.schema import declare_exchange

if TYPE_CHECKING:
    from tff_amqp.silo.sources import DataSource
    from tff_amqp.transport.tls import TlsFiles

log = logging.getLogger(__name__)

# Error texts (TensorFlow's can be long) are cut to fit an error report.
MAX_ERROR_CHARS = 60_000
# A status message expires after this many heartbeat intervals (at least
# STATUS_TTL_MIN seconds): older ones say nothing about the silo now.
STATUS_TTL_HEARTBEATS = 5
STATUS_TTL_MIN = 5.0


@dataclass(frozen=True, kw_only=True)
class EndpointConfig:
    """What both silo-side processes' configurations say about their presence
    on the broker (each process's config adds its own fields)."""

    broker_url: str
    federation: str
    data: tuple[DataSource, ...] = ()
    # The federation's queue type ("classic" or "quorum"; see Topology).
    queue_type: str = "classic"
    heartbeat_interval: float = 1.0
    # Declare exchanges and the process's queue (needs configure permission).
    # Provisioned silos have them created by `tff-amqp provision` instead.
    declare_topology: bool = True
    max_message_bytes: int = p.DEFAULT_MAX_MESSAGE_BYTES
    # Bounded wait for the broker at start-up (then robust reconnection).
    connect_timeout: float = 30.0
    # amqps:// settings: CA to verify the broker, client certificate (EXTERNAL auth).
    tls: TlsFiles | None = None
    # Advertise each data key's row count in the hello (column names and
    # kinds are always advertised; counts only on request).
    advertise_counts: bool = False


class ServingError(CodedError):
    """A request a silo-side process answers with an error reply: the
    protocol code, the message, and the gRPC status of the TFF worker error
    behind it, if any."""

    code: p.ErrorCode

    def __init__(
        self, code: p.ErrorCode, message: str, *, worker_status: str | None = None
    ) -> None:
        super().__init__(code, message)
        self.worker_status = worker_status


class SiloEndpoint:
    """Connection, status messages and publishing for one silo-side process.

    `role` names the process in logs and errors ("silo", "worker"); `status`
    builds the hello / heartbeat / goodbye body when one is sent; `stats`
    are the owner's counters (these keep published bytes and reconnects).
    """

    def __init__(
        self,
        config: EndpointConfig,
        *,
        silo: str,
        role: str,
        status: Callable[[], p.SiloStatus],
        stats: dict[str, int],
    ) -> None:
        self.topology = Topology(config.federation, config.queue_type)
        self.silo = silo
        self.role = role
        self.user_id = username_of(config.broker_url)
        self.max_message_bytes = config.max_message_bytes
        self.heartbeat_interval = config.heartbeat_interval
        self.status_ttl = max(STATUS_TTL_HEARTBEATS * config.heartbeat_interval, STATUS_TTL_MIN)
        self.stats = stats
        self.stats.setdefault("published_bytes", 0)
        self.stats.setdefault("reconnects", 0)
        # Who this process is: a fresh instance id per start (stamped on
        # every hello / heartbeat / reply), its host and pid (in the status,
        # and in the broker connection's name, so an operator can find it).
        self.instance = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        # Called after the robust connection came back.
        self.reconnect_callbacks: list[Callable[[], None]] = []
        self._config = config
        self._status = status
        self._ssl_context = config.tls.context() if config.tls else None
        self._connection: AbstractRobustConnection | None = None
        self._replies: AbstractExchange | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        # Results and errors of concurrent requests ride together to a
        # coordinator that takes bundles (its batches say so).
        self.bundle_replies = False
        self._publisher = BundlingPublisher(
            silo, self._publish, self._message_of, max_message_bytes=config.max_message_bytes
        )

    async def connect(self, *, prefetch: int) -> AbstractChannel:
        """Connect (bounded by the connect timeout) and open the channel the
        process consumes on; the replies exchange is declared or, for a
        provisioned silo, only looked up."""
        self._connection = await connect(
            self._config.broker_url,
            name=f"tff-amqp {self.role} {self.silo} ({self.host}:{self.pid})",
            policy=connect_within(self._config.connect_timeout),
            ssl_context=self._ssl_context,
        )
        self._connection.reconnect_callbacks.add(self._on_reconnect)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        if self._config.declare_topology:
            self._replies = await declare_exchange(
                channel, self.topology, self.topology.replies_exchange
            )
        else:
            self._replies = await channel.get_exchange(self.topology.replies_exchange, ensure=False)
        return channel

    async def holder(self, window: float) -> tuple[p.SiloStatus, str] | None:
        """Best effort: (status, instance) of another live process serving
        this silo, from its next hello / heartbeat within `window` seconds,
        or None (nothing heard, or this user may not declare the temporary
        queue, as a provisioned silo's user may not). Used only to name the
        holder in the error of a process refused the silo's name."""
        if self._connection is None:
            return None
        heard: asyncio.Future[tuple[p.SiloStatus, str]] = asyncio.get_running_loop().create_future()

        async def on_message(message: AbstractIncomingMessage) -> None:
            with contextlib.suppress(p.ProtocolError):
                envelope = p.decode(message.body, max_bytes=self.max_message_bytes)
                body = envelope.body
                if (
                    isinstance(body, p.SiloStatus)
                    and envelope.kind is not p.Kind.GOODBYE
                    and envelope.instance != self.instance
                    and not heard.done()
                ):
                    heard.set_result((body, envelope.instance))

        channel = None
        try:
            channel = await self._connection.channel()
            queue = await channel.declare_queue(
                f"{self.topology.prefix}.status.{uuid.uuid4().hex[:8]}",
                exclusive=True,
                auto_delete=True,
            )
            replies = await channel.get_exchange(self.topology.replies_exchange, ensure=False)
            await queue.bind(replies, routing_key=self.topology.reply_routing_key(self.silo))
            await queue.consume(on_message, no_ack=True)
            return await asyncio.wait_for(heard, window)
        except Exception:  # permissions, timeout: the error says how to find it instead
            return None
        finally:
            if channel is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(channel.close(), 2.0)

    async def announce(self) -> None:
        """Say hello, then keep a heartbeat going beside the work (long local
        training never silences it)."""
        await self._publish_status(p.Kind.HELLO)
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")

    async def close(self) -> None:
        """Stop the heartbeat, say goodbye and close the connection. Bounded
        and idempotent."""
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
            self._heartbeat_task = None
        if self._connection is not None and not self._connection.is_closed:
            await self._publisher.close(timeout=2.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._publish_status(p.Kind.GOODBYE), 2.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._connection.close(), 5.0)
        self._connection = None

    def _on_reconnect(self, *_: object) -> None:
        self.stats["reconnects"] += 1
        log.warning(f"{self.role}.reconnected", extra={"silo": self.silo})
        for callback in self.reconnect_callbacks:
            callback()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.heartbeat_interval)
            try:
                await self._publish_status(p.Kind.HEARTBEAT)
            except Exception as e:  # reconnecting; the robust connection recovers
                log.debug(f"{self.role}.heartbeat_failed", extra={"error": str(e)})

    async def _publish_status(self, kind: p.Kind) -> None:
        await self.publish(p.Envelope(kind=kind, body=self._status(), sender=self.silo))

    # ------------------------------------------------------------ publishing

    async def reply_error(
        self,
        invocation_id: str,
        correlation_id: str,
        code: p.ErrorCode,
        message: str,
        *,
        worker_status: str | None = None,
    ) -> None:
        report = p.ErrorReport(code=code, message=message, worker_status=worker_status)
        await self.publish(self.error_envelope(invocation_id, correlation_id, report))

    def error_envelope(
        self, invocation_id: str, correlation_id: str, report: p.ErrorReport
    ) -> p.Envelope:
        """The error reply `report` to a request (its message cut to fit)."""
        return p.Envelope(
            kind=p.Kind.ERROR,
            body=dataclasses.replace(report, message=report.message[:MAX_ERROR_CHARS]),
            sender=self.silo,
            invocation_id=invocation_id,
            correlation_id=correlation_id,
        )

    async def publish(self, envelope: p.Envelope) -> None:
        """Publish as the silo's user; a reply too large for one message is
        answered with an error, never silently dropped."""
        if self._replies is None:
            raise RuntimeError(f"{self.role} is not started")
        envelope = dataclasses.replace(envelope, instance=self.instance)
        try:
            payload = p.encode(envelope, max_bytes=self.max_message_bytes)
        except p.ProtocolError as e:
            if envelope.kind is p.Kind.ERROR:
                raise
            await self.reply_error(
                envelope.invocation_id,
                envelope.correlation_id,
                e.code,
                f"{self.role} {self.silo!r}: {e}",
            )
            return
        status = envelope.kind in p.STATUS_KINDS
        await self._publisher.publish(
            self.topology.reply_routing_key(self.silo),
            envelope,
            payload,
            bundle=self.bundle_replies and not status,
        )
        self.stats["published_bytes"] += len(payload)

    def _message_of(self, envelope: p.Envelope, payload: bytes) -> aio_pika.Message:
        # Replies carry no expiration: the coordinator decides what is late.
        # Status messages do: one older than a few heartbeats, left in the
        # coordinator's durable queue, must not make a later coordinator
        # think this silo is live.
        # Results and errors are persistent: one queued for the coordinator
        # when the broker restarts is kept (its queue is durable).
        status = envelope.kind in p.STATUS_KINDS
        return envelope_message(
            envelope,
            payload,
            user_id=self.user_id,
            expires=False,
            ttl=self.status_ttl if status else None,
            persistent=not status,
        )

    async def _publish(self, routing_key: str, message: aio_pika.Message) -> bool:
        assert self._replies is not None
        # Not mandatory (publish_with_retry's default), unlike the coordinator's
        # requests: RabbitMQ 3.x would otherwise return every reply, and a
        # reply nobody can route to (no coordinator running) has nobody to
        # tell; the coordinator's own deadline covers a lost one. Retried
        # across reconnects; the coordinator drops duplicate replies.
        return await publish_with_retry(self._replies, message, routing_key, SILO_PUBLISH)
