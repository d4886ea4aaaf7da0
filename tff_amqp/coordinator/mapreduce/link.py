"""The stateless coordinator's connection to the broker.

It publishes work items to `tff.<fed>.work` (routing key = silo) and matches
results to work items by item id; the intake it shares with the stateful
coordinator (`ReplyIntake`) accepts a result only from the silo the item went
to (routing key, sender, and a broker-validated `user_id` that is the user
the silo's workers said hello with). A second result for the same item (a
redelivered item that two workers finished) is counted and dropped, so each
item is merged once.
"""

from __future__ import annotations

import asyncio
import logging

from aio_pika.abc import AbstractChannel, AbstractExchange

from tff_amqp import protocol as p
from tff_amqp.coordinator.intake import Pending, ReplyIntake
from tff_amqp.errors import SiloUnreachableError
from tff_amqp.transport.connection import envelope_message, publish_with_retry
from tff_amqp.transport.schema import (
    declare_broadcast_stream,
    declare_exchange,
    declare_work_queue,
)

log = logging.getLogger(__name__)


class WorkLink(ReplyIntake[p.WorkResult]):
    """Publishing work items and collecting their results for one federation."""

    role = "mapreduce"
    regime_stats = ("results", "duplicate_results", "late_results")

    def _init_regime(self) -> None:
        self._work: AbstractExchange | None = None
        # Items already answered (False) or given up on with their silo (True):
        # a later reply is a duplicate, or late.
        self._finished: dict[str, bool] = {}
        self._declared: set[str] = set()
        self._streams: set[str] = set()

    async def _declare_outbound(self, channel: AbstractChannel) -> None:
        self._work = await declare_exchange(channel, self.topology, self.topology.work_exchange)

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

    async def ensure_broadcast_stream(self, silo: str) -> None:
        """Declare the silo's broadcast stream before a large broadcast goes
        into it (provisioned silos cannot declare; workers only read it)."""
        if silo in self._streams:
            return
        if self._channel is None:
            raise RuntimeError("mapreduce link is not started")
        await declare_broadcast_stream(self._channel, self.topology, silo)
        self._streams.add(silo)

    async def publish(self, silo: str, envelope: p.Envelope) -> asyncio.Future[p.WorkResult]:
        """Publish one work item; return the future of its result."""
        if self._work is None:
            raise RuntimeError("mapreduce link is not started")
        payload = p.encode(envelope, max_bytes=self.max_message_bytes)
        future: asyncio.Future[p.WorkResult] = asyncio.get_running_loop().create_future()
        self._pending[envelope.correlation_id] = Pending(silo, envelope.invocation_id, future)
        # Persistent: a work queue is durable, and items outlive a broker
        # restart. Expired items are dead-lettered back to us, never run late.
        message = envelope_message(envelope, payload, persistent=True)
        # Mandatory: an item for a work queue that no longer exists (deleted
        # after we declared it) comes back at once instead of vanishing.
        routed = await publish_with_retry(
            self._work,
            message,
            self.topology.request_routing_key(silo),
            self.publish_policy,
            mandatory=True,
        )
        if not routed:
            self.stats["unroutable"] += 1
            log.warning(
                "mapreduce.unroutable", extra={"silo": silo, "item": envelope.correlation_id}
            )
            # Declared again before the next item goes to this silo.
            self._declared.discard(silo)
            self._pending.pop(envelope.correlation_id, None)
            future.set_exception(SiloUnreachableError(silo, "work queue"))
            future.exception()  # retrieved: a round that already ended never awaits it
            return future
        self._count_published(payload)
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

    def _on_unmatched(self, correlation_id: str, silo: str) -> None:
        if correlation_id not in self._finished:
            super()._on_unmatched(correlation_id, silo)
            return
        late = self._finished[correlation_id]
        self.stats["late_results" if late else "duplicate_results"] += 1
        log.info(
            "mapreduce.late_result" if late else "mapreduce.duplicate_result",
            extra={"item": correlation_id, "silo": silo},
        )

    def _deliver(
        self,
        correlation_id: str,
        pending: Pending[p.WorkResult],
        envelope: p.Envelope,
        silo: str,
    ) -> None:
        if envelope.kind is p.Kind.WORK_RESULT and isinstance(envelope.body, p.WorkResult):
            self.stats["results"] += 1
            pending.future.set_result(envelope.body)
        elif envelope.kind is p.Kind.ERROR and isinstance(envelope.body, p.ErrorReport):
            pending.future.set_exception(self._silo_error(silo, envelope.body))
        else:
            self.stats["malformed"] += 1
            return
        self.finish(correlation_id)

    def _dead_letter_message(self, silo: str, queue: str, reason: str) -> str:
        return (
            f"work item for silo {silo!r} was dead-lettered from {queue} ({reason}): no "
            "worker of the silo completed it before the deadline"
        )

    def _after_dead_letter(self, correlation_id: str) -> None:
        self.finish(correlation_id)
