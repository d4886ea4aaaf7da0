"""The stateless coordinator's connection to the broker.

It is the federation's coordinator: it consumes `tff.<fed>.coordinator`
exclusively (so it cannot run beside a stateful coordinator of the same
federation), publishes work items to `tff.<fed>.work` (routing key = silo),
and matches results to work items by item id. A result is accepted only from
the silo the item went to (routing key, sender and a broker-validated
`user_id`); a second result for the same item (a redelivered item that two
workers finished) is counted and dropped, so each item is merged once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
    ExchangeType,
)

from tff_amqp import protocol as p
from tff_amqp.coordinator.link import consume_coordinator_queue
from tff_amqp.coordinator.membership import Membership
from tff_amqp.errors import SiloError, TffAmqpError
from tff_amqp.retry import COORDINATOR_PUBLISH
from tff_amqp.topology import Topology
from tff_amqp.transport.connection import connect, publish_with_retry
from tff_amqp.transport.schema import declare_work_queue

log = logging.getLogger(__name__)


@dataclass
class _PendingItem:
    silo: str
    round_id: str
    future: asyncio.Future[p.WorkResult]


class WorkLink:
    """Publishing work items and collecting their results for one federation."""

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
            "results": 0,
            "duplicate_results": 0,
            "late_results": 0,
            "unknown_replies": 0,
            "rejected_replies": 0,
            "rejected_user_id": 0,
            "malformed": 0,
            "dead_lettered": 0,
            "reconnects": 0,
        }
        self._url = broker_url
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._work: AbstractExchange | None = None
        self._pending: dict[str, _PendingItem] = {}
        # Items already answered (False) or given up on with their silo (True):
        # a later reply is a duplicate, or late.
        self._finished: dict[str, bool] = {}
        self._declared: set[str] = set()
        self.publish_policy = COORDINATOR_PUBLISH

    async def start(self) -> None:
        self._connection = await connect(self._url, name=f"tff-amqp mapreduce {self.sender}")
        self._connection.reconnect_callbacks.add(self._on_reconnect)
        self._channel = await self._connection.channel()
        await self._channel.set_qos(prefetch_count=256)
        self._work = await self._channel.declare_exchange(
            self.topology.work_exchange, ExchangeType.DIRECT, durable=True
        )
        try:
            await consume_coordinator_queue(self._channel, self.topology, self._on_message)
        except TffAmqpError:
            await self.close()
            raise

    def _on_reconnect(self, *_: object) -> None:
        self.stats["reconnects"] += 1
        self.membership.mark_stale()
        log.warning("mapreduce.reconnected", extra={"federation": self.topology.federation})

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

    async def ensure_work_queue(self, silo: str) -> None:
        """Declare the silo's work queue before the first item goes to it, so
        items wait there for workers that have not started yet."""
        if silo in self._declared:
            return
        if self._channel is None:
            raise RuntimeError("mapreduce link is not started")
        await declare_work_queue(self._channel, self.topology, silo)
        self._declared.add(silo)

    async def publish(self, silo: str, envelope: p.Envelope) -> asyncio.Future[p.WorkResult]:
        """Publish one work item; return the future of its result."""
        if self._work is None:
            raise RuntimeError("mapreduce link is not started")
        payload = p.encode(envelope, max_bytes=self.max_message_bytes)
        future: asyncio.Future[p.WorkResult] = asyncio.get_running_loop().create_future()
        self._pending[envelope.correlation_id] = _PendingItem(silo, envelope.invocation_id, future)
        ttl = envelope.ttl_seconds()
        message = aio_pika.Message(
            payload,
            content_type=p.CONTENT_TYPE,
            message_id=envelope.message_id,
            correlation_id=envelope.correlation_id,
            type=str(envelope.kind),
            timestamp=time.time(),
            # Persistent: a work queue is durable, and items outlive a broker
            # restart. Expired items are dead-lettered back to us, never run late.
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            expiration=max(ttl, 0.001) if ttl is not None else None,
        )
        await publish_with_retry(
            self._work, message, self.topology.request_routing_key(silo), self.publish_policy
        )
        self.stats["published"] += 1
        self.stats["published_bytes"] += len(payload)
        return future

    def finish(self, item_id: str, *, dropped: bool = False) -> None:
        """Stop waiting for an item (answered, or its silo was dropped); any
        later reply for it is counted (duplicate or late) and discarded."""
        pending = self._pending.pop(item_id, None)
        if pending is not None and not pending.future.done():
            pending.future.cancel()
        self._finished[item_id] = dropped
        while len(self._finished) > 100_000:
            self._finished.pop(next(iter(self._finished)))

    # -------------------------------------------------------------- receiving

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if "x-death" in (message.headers or {}):
            self._on_dead_letter(message)
            return
        try:
            envelope = p.decode(message.body, max_bytes=self.max_message_bytes)
        except p.ProtocolError as e:
            self.stats["malformed"] += 1
            log.warning("mapreduce.malformed_reply", extra={"error": str(e)})
            return
        silo = self.topology.silo_from_reply_key(message.routing_key or "")
        if silo is None or envelope.sender != silo:
            self.stats["rejected_replies"] += 1
            log.warning(
                "mapreduce.rejected_reply",
                extra={"routing_key": message.routing_key, "reason": "sender != routing key"},
            )
            return
        if envelope.kind in (p.Kind.HELLO, p.Kind.HEARTBEAT, p.Kind.GOODBYE):
            assert isinstance(envelope.body, p.SiloStatus)
            if envelope.body.silo != silo:
                self.stats["rejected_replies"] += 1
                return
            await self.membership.observe(envelope.kind, envelope.body, message.user_id)
            return
        item_id = envelope.correlation_id
        pending = self._pending.get(item_id)
        if pending is None:
            if item_id in self._finished:
                late = self._finished[item_id]
                self.stats["late_results" if late else "duplicate_results"] += 1
                log.info(
                    "mapreduce.late_result" if late else "mapreduce.duplicate_result",
                    extra={"item": item_id, "silo": silo},
                )
            else:
                self.stats["unknown_replies"] += 1
            return
        if pending.silo != silo:
            self.stats["rejected_replies"] += 1
            log.warning(
                "mapreduce.rejected_reply",
                extra={"silo": silo, "expected": pending.silo, "reason": "wrong silo"},
            )
            return
        user_problem = self.membership.reply_user_problem(silo, message.user_id)
        if user_problem is not None:
            self.stats["rejected_replies"] += 1
            self.stats["rejected_user_id"] += 1
            log.warning(
                "mapreduce.rejected_reply",
                extra={"silo": silo, "user_id": message.user_id, "reason": user_problem},
            )
            return
        record = self.membership.record(silo)
        if record is not None:
            record.last_seen = time.monotonic()
        if envelope.kind is p.Kind.WORK_RESULT and isinstance(envelope.body, p.WorkResult):
            self.stats["results"] += 1
            pending.future.set_result(envelope.body)
        elif envelope.kind is p.Kind.ERROR and isinstance(envelope.body, p.ErrorReport):
            pending.future.set_exception(
                SiloError.from_report(
                    silo,
                    str(envelope.body.code),
                    envelope.body.message,
                    envelope.body.worker_status,
                )
            )
        else:
            self.stats["malformed"] += 1
            return
        self.finish(item_id)

    def _on_dead_letter(self, message: AbstractIncomingMessage) -> None:
        self.stats["dead_lettered"] += 1
        item_id = message.correlation_id or ""
        pending = self._pending.get(item_id)
        deaths = (message.headers or {}).get("x-death")
        reason, queue = "expired", "?"
        if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
            reason = str(deaths[0].get("reason", reason))
            queue = str(deaths[0].get("queue", queue))
        log.warning("mapreduce.dead_letter", extra={"item": item_id, "reason": reason})
        if pending is not None and not pending.future.done():
            pending.future.set_exception(
                SiloError(
                    pending.silo,
                    str(p.ErrorCode.EXPIRED),
                    f"work item for silo {pending.silo!r} was dead-lettered from {queue} "
                    f"({reason}): no worker of the silo completed it before the deadline",
                )
            )
            self.finish(item_id)
