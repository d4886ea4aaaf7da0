"""What both regimes' coordinators share on the broker: the connection, the
federation's coordinator queue, and the intake of everything silos send.

A `ReplyIntake` owns the robust connection and consumes the coordinator queue
exclusively (one coordinator per federation, whichever regime). For every
message it applies the same rules: decode within the size limit; the sender
must be the silo of the routing key; hello / heartbeat / goodbye go to the
membership; a reply is matched to its pending request by correlation id and
used only if it comes from the silo the request went to, with a
broker-validated `user_id` equal to the user that silo said hello with, and
(stateful) from the process instance the silo had when the request was sent;
a new instance of a silo fails the requests the old one owed
(`SiloRestartedError`);
dead-lettered requests fail their request at once. The regimes differ only
in what they publish and in what a matched reply means, which subclasses say
in `_declare_outbound`, `_on_unmatched` and `_deliver`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from tff_amqp import protocol as p
from tff_amqp.coordinator.membership import Membership
from tff_amqp.errors import SiloError, SiloRestartedError, TffAmqpError
from tff_amqp.retry import COORDINATOR_PUBLISH
from tff_amqp.topology import Topology
from tff_amqp.transport.connection import ack_queued, connect
from tff_amqp.transport.schema import declare_exchange, declare_queue, hold_lock

log = logging.getLogger(__name__)

R = TypeVar("R")


@dataclass
class Pending(Generic[R]):
    """A request (batch or work item) waiting for its silo's reply."""

    silo: str
    invocation_id: str
    future: asyncio.Future[R]
    # The silo's instance when the request was sent: only that process's
    # reply is used (None: any process of the silo may answer, as a pool's).
    instance: str | None = None


async def consume_coordinator_queue(
    channel: AbstractChannel,
    topology: Topology,
    on_message: Callable[[AbstractIncomingMessage], Awaitable[None]],
) -> None:
    """Declare the federation's coordinator queue (bound to silo replies and
    to dead-lettered requests) and consume it exclusively.

    Not exclusive itself, and durable: the queue (and replies in flight)
    survives a dropped connection and a broker restart, and the robust
    connection resumes consuming it; it is deleted after a minute without a
    consumer. One coordinator per federation is enforced by consuming it
    exclusively. Each reply is acked once handled, so one delivered just
    before the connection dropped is delivered again, not lost."""
    queue = await declare_queue(channel, topology, topology.coordinator_queue_spec())
    await queue.bind(await declare_exchange(channel, topology, topology.dead_letter_exchange))
    try:
        if topology.quorum:
            # Quorum queues do not enforce exclusive consumers: the lock does.
            await hold_lock(channel, topology, "coordinator")
        await queue.consume(_acked_after(on_message), no_ack=False, exclusive=True)
    except (aiormq.exceptions.ChannelAccessRefused, aiormq.exceptions.ChannelLockedResource) as e:
        raise TffAmqpError(
            f"another coordinator is already running for federation "
            f"{topology.federation!r} (it consumes {topology.coordinator_queue} "
            "exclusively); stop it or use a different federation"
        ) from e
    # Replies and heartbeats left from an earlier coordinator are stale.
    # (Purging after consuming, so a second coordinator cannot purge ours.)
    await queue.purge()


def _acked_after(
    handle: Callable[[AbstractIncomingMessage], Awaitable[None]],
) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
    async def on_message(message: AbstractIncomingMessage) -> None:
        try:
            await handle(message)
        finally:
            # A channel that closed meanwhile redelivers it; duplicates are
            # dropped by message id.
            with contextlib.suppress(Exception):
                await ack_queued(message)

    return on_message


class ReplyIntake(Generic[R]):
    """The coordinator's broker connection and reply intake (see the module
    docstring); subclasses add publishing and reply semantics."""

    # Prefix of log events ("coordinator", "mapreduce").
    role = "coordinator"
    # Counters of what a reply means in this regime (besides the shared ones).
    regime_stats: tuple[str, ...] = ()

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
            # Broker messages carrying requests out / replies in (a bundle is
            # one message for several requests or replies).
            "request_messages": 0,
            "reply_messages": 0,
            "received_bytes": 0,
            "unknown_replies": 0,
            "rejected_replies": 0,
            "rejected_user_id": 0,
            "rejected_instance": 0,
            "malformed": 0,
            "dead_lettered": 0,
            # requests/work items the broker returned: no queue for the silo
            "unroutable": 0,
            "reconnects": 0,
        }
        # Observers of every raw payload that reaches the coordinator (audits,
        # tests proving no client rows ever arrive).
        self.taps: list[Callable[[bytes], None]] = []
        # While the robust connection reconnects, publishes are retried.
        self.publish_policy = COORDINATOR_PUBLISH
        self._url = broker_url
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._pending: dict[str, Pending[R]] = {}
        self.stats.update(dict.fromkeys(self.regime_stats, 0))
        membership.instance_listeners.append(self._on_silo_restarted)
        self._init_regime()

    def _init_regime(self) -> None:
        """Set up what this regime's publishing and replies keep."""

    # -------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._connection = await connect(self._url, name=f"tff-amqp {self.role} {self.sender}")
        self._connection.reconnect_callbacks.add(self._on_reconnect)
        self._connection.close_callbacks.add(self._on_connection_lost)
        self._channel = await self._connection.channel()
        await self._channel.set_qos(prefetch_count=256)
        await self._declare_outbound(self._channel)
        try:
            await consume_coordinator_queue(self._channel, self.topology, self._on_message)
        except TffAmqpError:
            await self.close()
            raise

    async def _declare_outbound(self, channel: AbstractChannel) -> None:
        """Declare what this regime publishes to (`declare_exchange`)."""

    def _on_connection_lost(self, *_: object) -> None:
        # Not evidence against any silo (see Membership): they keep their
        # liveness while we are away.
        self.membership.coordinator_disconnected()

    def _on_reconnect(self, *_: object) -> None:
        self.stats["reconnects"] += 1
        self.membership.coordinator_reconnected()
        log.warning(f"{self.role}.reconnected", extra={"federation": self.topology.federation})

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

    def _count_published(self, payload: bytes) -> None:
        self.stats["published"] += 1
        self.stats["published_bytes"] += len(payload)

    # ---------------------------------------------------------------- intake

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.stats["received_bytes"] += len(message.body)
        for tap in self.taps:
            tap(message.body)
        if "x-death" in (message.headers or {}):
            self._on_dead_letter(message)
            return
        envelope = self._decode_reply(message.body, message.routing_key)
        if envelope is None:
            return
        if envelope.kind is not p.Kind.BUNDLE:
            if envelope.kind not in p.STATUS_KINDS:
                self.stats["reply_messages"] += 1
            await self._on_envelope(envelope, message.routing_key, message.user_id)
            return
        self.stats["reply_messages"] += 1
        for member in p.members(envelope, max_bytes=self.max_message_bytes):
            if isinstance(member, tuple):
                self._malformed(message.routing_key, member[1])
            else:
                await self._on_envelope(member, message.routing_key, message.user_id)

    def _decode_reply(self, payload: bytes, routing_key: str | None) -> p.Envelope | None:
        try:
            return p.decode(payload, max_bytes=self.max_message_bytes)
        except p.ProtocolError as e:
            self._malformed(routing_key, e)
            return None

    def _malformed(self, routing_key: str | None, error: p.ProtocolError) -> None:
        self.stats["malformed"] += 1
        log.warning(
            f"{self.role}.malformed_reply",
            extra={"routing_key": routing_key, "error": str(error)},
        )

    async def _on_envelope(
        self, envelope: p.Envelope, routing_key: str | None, user_id: str | None
    ) -> None:
        """One message from a silo (alone, or a member of a bundle): accepted
        only from the silo its routing key names, with that silo's user."""
        silo = self.topology.silo_from_reply_key(routing_key or "")
        if silo is None or envelope.sender != silo:
            self._reject(
                routing_key=routing_key,
                sender=envelope.sender,
                reason="sender does not match routing key",
            )
            return
        if envelope.kind in p.STATUS_KINDS:
            assert isinstance(envelope.body, p.SiloStatus)
            if envelope.body.silo != silo:
                self.stats["rejected_replies"] += 1
                return
            await self.membership.observe(envelope.kind, envelope.body, user_id, envelope.instance)
            return
        if envelope.kind is p.Kind.BUNDLE:
            self._reject(silo=silo, reason="a bundle inside a bundle")
            return
        record = self.membership.record(silo)
        if record is not None and record.instance in ("", envelope.instance):
            # Any reply of a silo's live process is as good as a heartbeat.
            record.last_seen = time.monotonic()
        corr = envelope.correlation_id
        pending = self._pending.get(corr)
        if pending is None:
            self._on_unmatched(corr, silo)
            return
        if pending.silo != silo:
            self._reject(silo=silo, expected=pending.silo, reason="wrong silo")
            return
        user_problem = self.membership.reply_user_problem(silo, user_id)
        if user_problem is not None:
            self.stats["rejected_user_id"] += 1
            self._reject(silo=silo, user_id=user_id, reason=user_problem)
            return
        if pending.instance is not None and envelope.instance != pending.instance:
            # Another process of the silo (an impostor, or a restart): its
            # reply is not the one the request was sent to; never mixed in.
            self.stats["rejected_instance"] += 1
            self._reject(
                silo=silo,
                instance=envelope.instance[:8],
                expected=pending.instance[:8],
                reason="reply from another process instance of the silo",
            )
            return
        self._deliver(corr, pending, envelope, silo)

    def _on_silo_restarted(self, silo: str, old: str, new: str) -> None:
        """A new process serves `silo`: fail the replies the old one owed
        (a SiloRestartedError, code "lost": a gather drops the silo)."""
        failed = 0
        for pending in list(self._pending.values()):
            if (
                pending.silo == silo
                and pending.instance is not None
                and pending.instance != new
                and not pending.future.done()
            ):
                pending.future.set_exception(SiloRestartedError(silo, pending.instance or old, new))
                # Retrieved, so asyncio does not warn when nobody awaits it.
                pending.future.exception()
                failed += 1
        log.warning(
            f"{self.role}.silo_restarted",
            extra={"silo": silo, "old": old[:8], "new": new[:8], "failed_requests": failed},
        )

    def _reject(self, **extra: Any) -> None:
        self.stats["rejected_replies"] += 1
        log.warning(f"{self.role}.rejected_reply", extra=extra)

    def _on_unmatched(self, correlation_id: str, silo: str) -> None:
        """A reply for nothing pending (late, duplicate, or unknown)."""
        self.stats["unknown_replies"] += 1
        log.debug(f"{self.role}.unknown_reply", extra={"corr": correlation_id, "silo": silo})

    def _deliver(
        self, correlation_id: str, pending: Pending[R], envelope: p.Envelope, silo: str
    ) -> None:
        """Use an accepted reply."""
        raise NotImplementedError

    @staticmethod
    def _silo_error(silo: str, report: p.ErrorReport) -> SiloError:
        return SiloError.from_report(silo, str(report.code), report.message, report.worker_status)

    # ----------------------------------------------------------- dead letters

    def _on_dead_letter(self, message: AbstractIncomingMessage) -> None:
        self.stats["dead_lettered"] += 1
        reason, queue = "expired", "?"
        deaths = (message.headers or {}).get("x-death")
        if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
            reason = str(deaths[0].get("reason", reason))
            queue = str(deaths[0].get("queue", queue))
        for corr in self._dead_correlations(message):
            log.warning(
                f"{self.role}.dead_letter", extra={"corr": corr, "reason": reason, "queue": queue}
            )
            pending = self._pending.get(corr)
            if pending is not None and not pending.future.done():
                pending.future.set_exception(
                    SiloError(
                        pending.silo,
                        str(p.ErrorCode.EXPIRED),
                        self._dead_letter_message(pending.silo, queue, reason),
                    )
                )
                # Retrieved, so asyncio does not warn when nobody awaits it.
                pending.future.exception()
                self._after_dead_letter(corr)

    def _dead_correlations(self, message: AbstractIncomingMessage) -> list[str]:
        """The requests a dead-lettered message carried: its own correlation
        id, or for a bundle (our own message, returned) each member's."""
        if message.type != str(p.Kind.BUNDLE):
            return [message.correlation_id or ""]
        try:
            bundle = p.decode(message.body, max_bytes=self.max_message_bytes)
            members = p.members(bundle, max_bytes=self.max_message_bytes)
        except p.ProtocolError:
            return []
        return [m.correlation_id for m in members if isinstance(m, p.Envelope)]

    def _dead_letter_message(self, silo: str, queue: str, reason: str) -> str:
        return (
            f"request to silo {silo!r} was dead-lettered from {queue} ({reason}): the silo "
            "did not take it before the invocation's deadline"
        )

    def _after_dead_letter(self, correlation_id: str) -> None:
        """Bookkeeping once a dead-lettered request has failed."""
