"""The coordinator's connection to the broker.

Publishes request batches to silo queues, consumes the coordinator queue
(results, errors, silo status, dead-lettered requests) and matches replies to
their pending requests by correlation id. A reply is accepted only from the
silo the request went to: routing key, sender, and a broker-validated user id
that is the user the silo said hello with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
    ExchangeType,
)

from tff_amqp import protocol as p
from tff_amqp.coordinator.membership import Membership
from tff_amqp.errors import SiloError, TffAmqpError
from tff_amqp.retry import COORDINATOR_PUBLISH
from tff_amqp.topology import Topology
from tff_amqp.transport.connection import connect, publish_with_retry

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    silo: str
    invocation_id: str
    future: asyncio.Future[p.Result]


async def consume_coordinator_queue(
    channel: AbstractChannel,
    topology: Topology,
    on_message: Callable[[AbstractIncomingMessage], Awaitable[None]],
) -> None:
    """Declare the federation's coordinator queue (bound to silo replies and
    to dead-lettered requests) and consume it exclusively. Shared by both
    regimes' coordinators, so the queue's arguments always agree.

    Not exclusive itself: the queue (and replies in flight) survives a dropped
    connection, and the robust connection resumes consuming it; it is deleted
    after a minute without a consumer. One coordinator per federation is
    enforced by consuming it exclusively."""
    replies = await channel.declare_exchange(
        topology.replies_exchange, ExchangeType.TOPIC, durable=True
    )
    dead = await channel.declare_exchange(
        topology.dead_letter_exchange, ExchangeType.FANOUT, durable=True
    )
    queue = await channel.declare_queue(
        topology.coordinator_queue,
        durable=False,
        auto_delete=False,
        arguments={"x-expires": 60_000},
    )
    await queue.bind(replies, routing_key=topology.reply_binding_key())
    await queue.bind(dead)
    try:
        await queue.consume(on_message, no_ack=True, exclusive=True)
    except aiormq.exceptions.ChannelAccessRefused as e:
        raise TffAmqpError(
            f"another coordinator is already running for federation "
            f"{topology.federation!r} (it consumes {topology.coordinator_queue} "
            "exclusively); stop it or use a different federation"
        ) from e
    # Replies and heartbeats left from an earlier coordinator are stale.
    # (Purging after consuming, so a second coordinator cannot purge ours.)
    await queue.purge()


class CoordinatorLink:
    """Publishing and reply matching for one federation."""

    def __init__(
        self,
        broker_url: str,
        topology: Topology,
        membership: Membership,
        *,
        max_message_bytes: int = p.DEFAULT_MAX_MESSAGE_BYTES,
        sender: str = "coordinator",
    ) -> None:
        self.topology = topology
        self.membership = membership
        self.max_message_bytes = max_message_bytes
        self.sender = sender
        self.stats: dict[str, int] = {
            "published": 0,
            "published_bytes": 0,
            "replies": 0,
            "unknown_replies": 0,
            "rejected_replies": 0,
            "rejected_user_id": 0,
            "malformed": 0,
            "dead_lettered": 0,
            "received_bytes": 0,
            "late_replies": 0,
            "reconnects": 0,
        }
        self._late: set[str] = set()
        # Observers of every raw payload that reaches the coordinator (audits,
        # tests proving no client rows ever arrive).
        self.taps: list[Callable[[bytes], None]] = []
        self._url = broker_url
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._requests: AbstractExchange | None = None
        self._pending: dict[str, _Pending] = {}
        # While the robust connection reconnects, publishes are retried.
        self.publish_policy = COORDINATOR_PUBLISH

    async def start(self) -> None:
        self._connection = await connect(self._url, name=f"tff-amqp coordinator {self.sender}")
        self._connection.reconnect_callbacks.add(self._on_reconnect)
        self._channel = await self._connection.channel()
        await self._channel.set_qos(prefetch_count=256)
        self._requests = await self._channel.declare_exchange(
            self.topology.requests_exchange, ExchangeType.DIRECT, durable=True
        )
        try:
            await consume_coordinator_queue(self._channel, self.topology, self._on_message)
        except TffAmqpError:
            await self.close()
            raise

    def _on_reconnect(self, *_: object) -> None:
        self.stats["reconnects"] += 1
        self.membership.mark_stale()
        log.warning("coordinator.reconnected", extra={"federation": self.topology.federation})

    async def close(self) -> None:
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.cancel()
        self._pending.clear()
        if self._connection is not None:
            try:
                await asyncio.wait_for(self._connection.close(), 5.0)
            except Exception:
                log.debug("closing broker connection failed", exc_info=True)
            self._connection = None

    # --------------------------------------------------------------- sending

    async def send(
        self, silo: str, envelope: p.Envelope, *, expect_reply: bool
    ) -> asyncio.Future[p.Result] | None:
        """Publish a batch to `silo`; if `expect_reply`, return the future of
        its result. Error replies fail the future with SiloError."""
        if self._requests is None:
            raise RuntimeError("coordinator link is not started")
        payload = p.encode(envelope, max_bytes=self.max_message_bytes)
        future: asyncio.Future[p.Result] | None = None
        if expect_reply or envelope.correlation_id:
            future = asyncio.get_running_loop().create_future()
            self._pending[envelope.correlation_id] = _Pending(silo, envelope.invocation_id, future)
        ttl = envelope.ttl_seconds()
        message = aio_pika.Message(
            payload,
            content_type=p.CONTENT_TYPE,
            message_id=envelope.message_id,
            correlation_id=envelope.correlation_id or None,
            type=str(envelope.kind),
            timestamp=time.time(),
            # Expired requests are dead-lettered back to us, never run late.
            expiration=max(ttl, 0.001) if ttl is not None else None,
        )
        await publish_with_retry(
            self._requests, message, self.topology.request_routing_key(silo), self.publish_policy
        )
        self.stats["published"] += 1
        self.stats["published_bytes"] += len(payload)
        return future if expect_reply else None

    def forget(self, correlation_id: str) -> None:
        pending = self._pending.pop(correlation_id, None)
        if pending is not None and not pending.future.done():
            pending.future.cancel()

    def forget_silo(self, invocation_id: str, silo: str) -> None:
        """Stop waiting for a dropped silo; its replies will count as late."""
        for corr, pending in list(self._pending.items()):
            if pending.invocation_id == invocation_id and pending.silo == silo:
                self._late.add(corr)
                self.forget(corr)
        while len(self._late) > 100_000:
            self._late.pop()

    def forget_invocation(self, invocation_id: str) -> None:
        for corr in [c for c, pend in self._pending.items() if pend.invocation_id == invocation_id]:
            self.forget(corr)

    # -------------------------------------------------------------- receiving

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.stats["received_bytes"] += len(message.body)
        for tap in self.taps:
            tap(message.body)
        headers = message.headers or {}
        if "x-death" in headers:
            self._on_dead_letter(message)
            return
        try:
            envelope = p.decode(message.body, max_bytes=self.max_message_bytes)
        except p.ProtocolError as e:
            self.stats["malformed"] += 1
            log.warning(
                "coordinator.malformed_reply",
                extra={"routing_key": message.routing_key, "error": str(e)},
            )
            return
        silo = self.topology.silo_from_reply_key(message.routing_key or "")
        if silo is None or envelope.sender != silo:
            self.stats["rejected_replies"] += 1
            log.warning(
                "coordinator.rejected_reply",
                extra={
                    "routing_key": message.routing_key,
                    "sender": envelope.sender,
                    "reason": "sender does not match routing key",
                },
            )
            return
        if envelope.kind in (p.Kind.HELLO, p.Kind.HEARTBEAT, p.Kind.GOODBYE):
            assert isinstance(envelope.body, p.SiloStatus)
            if envelope.body.silo != silo:
                self.stats["rejected_replies"] += 1
                return
            await self.membership.observe(envelope.kind, envelope.body, message.user_id)
            return
        await self.membership_touch(silo, message.user_id)
        pending = self._pending.get(envelope.correlation_id)
        if pending is None and envelope.correlation_id in self._late:
            self._late.discard(envelope.correlation_id)
            self.stats["late_replies"] += 1
            log.info("coordinator.late_reply_discarded", extra={"silo": silo})
            return
        if pending is None:
            self.stats["unknown_replies"] += 1
            log.debug("coordinator.unknown_reply", extra={"corr": envelope.correlation_id})
            return
        if pending.silo != silo:
            self.stats["rejected_replies"] += 1
            log.warning(
                "coordinator.rejected_reply",
                extra={"silo": silo, "expected": pending.silo, "reason": "wrong silo"},
            )
            return
        user_problem = self.membership.reply_user_problem(silo, message.user_id)
        if user_problem is not None:
            self.stats["rejected_replies"] += 1
            self.stats["rejected_user_id"] += 1
            log.warning(
                "coordinator.rejected_reply",
                extra={"silo": silo, "user_id": message.user_id, "reason": user_problem},
            )
            return
        self.stats["replies"] += 1
        if pending.future.done():
            return
        if envelope.kind is p.Kind.RESULT:
            assert isinstance(envelope.body, p.Result)
            self._pending.pop(envelope.correlation_id, None)
            pending.future.set_result(envelope.body)
        elif envelope.kind is p.Kind.ERROR:
            assert isinstance(envelope.body, p.ErrorReport)
            pending.future.set_exception(
                SiloError.from_report(
                    silo,
                    str(envelope.body.code),
                    envelope.body.message,
                    envelope.body.worker_status,
                )
            )
            # Retrieve the exception so asyncio does not warn when nobody
            # awaits it (a batch without a Compute: the silo's session fails
            # every later batch of the invocation with the same error).
            pending.future.exception()

    async def membership_touch(self, silo: str, user_id: str | None) -> None:
        record = self.membership.record(silo)
        if record is not None:
            record.last_seen = time.monotonic()

    def _on_dead_letter(self, message: AbstractIncomingMessage) -> None:
        self.stats["dead_lettered"] += 1
        corr = message.correlation_id or ""
        pending = self._pending.get(corr)
        reason = "expired"
        deaths = (message.headers or {}).get("x-death")
        if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
            reason = str(deaths[0].get("reason", reason))
            queue = str(deaths[0].get("queue", "?"))
        else:
            queue = "?"
        log.warning(
            "coordinator.dead_letter", extra={"corr": corr, "reason": reason, "queue": queue}
        )
        if pending is not None and not pending.future.done():
            pending.future.set_exception(
                SiloError(
                    pending.silo,
                    str(p.ErrorCode.EXPIRED),
                    f"request to silo {pending.silo!r} was dead-lettered from {queue} "
                    f"({reason}): the silo did not take it before the invocation's deadline",
                )
            )
            pending.future.exception()
