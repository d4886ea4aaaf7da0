"""The stateful coordinator's connection to the broker.

Publishes request batches to silo queues; everything that comes back (results,
errors, silo status, dead-lettered requests) goes through the shared
`ReplyIntake`, which accepts a reply only from the silo the request went to:
routing key, sender, and a broker-validated user id that is the user the silo
said hello with.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange

from tff_amqp import protocol as p
from tff_amqp.coordinator.intake import Pending, ReplyIntake
from tff_amqp.coordinator.stateful.known_functions import KnownFunctions
from tff_amqp.errors import SiloUnreachableError
from tff_amqp.transport.bundling import BundlingPublisher
from tff_amqp.transport.connection import envelope_message, publish_with_retry
from tff_amqp.transport.schema import declare_exchange

log = logging.getLogger(__name__)

# A finished invocation's `close` waits this long for a batch to the same
# silo to ride on (the next invocation's, when they come back to back),
# before it goes as a message of its own. The silo frees the session that
# much later at most.
CLOSE_LINGER_SECONDS = 0.2


@dataclasses.dataclass(frozen=True)
class _NamedBatch:
    """A published batch that named functions or carried them in full: its
    answer tells what its silo process holds."""

    silo: str
    instance: str
    # (digest, size) of the functions it carried in full.
    carried: tuple[tuple[bytes, int], ...]
    # KnownFunctions.epoch when it was published.
    epoch: int


@dataclasses.dataclass(frozen=True)
class _DeferredClose:
    invocation_id: str
    seq: int
    deadline: float


class CoordinatorLink(ReplyIntake[p.Result]):
    """Publishing batches and matching their replies for one federation."""

    role = "coordinator"
    regime_stats = ("replies", "late_replies", "functions_missing")

    def _init_regime(self) -> None:
        self._late: set[str] = set()
        self._requests: AbstractExchange | None = None
        # This coordinator process, in every batch: a silo frees the sessions
        # of an earlier instance (one that died without closing them) when
        # this one's first batch arrives.
        self.instance_id = uuid.uuid4().hex
        self.instance_started = time.time()
        # The functions each silo process holds: named by digest, not resent.
        self.functions = KnownFunctions()
        # By correlation id, until answered (or abandoned).
        self._named: dict[str, _NamedBatch] = {}
        # Closes not yet sent, per silo, with the timer that sends them alone.
        self._closes: dict[str, list[_DeferredClose]] = {}
        self._close_timers: dict[str, asyncio.TimerHandle] = {}
        self._close_sends: set[asyncio.Task[None]] = set()
        self._publisher = BundlingPublisher(
            self.sender, self._publish, self._message_of, max_message_bytes=self.max_message_bytes
        )

    async def _declare_outbound(self, channel: AbstractChannel) -> None:
        self._requests = await declare_exchange(
            channel, self.topology, self.topology.requests_exchange
        )

    @staticmethod
    def _message_of(envelope: p.Envelope, payload: bytes) -> aio_pika.Message:
        # Expired requests are dead-lettered back to us, never run late (a
        # bundle expires at its latest member's deadline; the silo checks
        # each member's). Persistent: a request still queued when the broker
        # restarts is kept (its queue is durable); a confirm lost to a
        # dropped connection makes publish_with_retry send it again, and the
        # silo drops the duplicate by message id.
        return envelope_message(envelope, payload, persistent=True)

    async def _publish(self, routing_key: str, message: aio_pika.Message) -> bool:
        assert self._requests is not None
        # Mandatory: a request to a silo without a queue comes back at once
        # instead of vanishing while the invocation waits its deadline.
        routed = await publish_with_retry(
            self._requests, message, routing_key, self.publish_policy, mandatory=True
        )
        self.stats["request_messages"] += 1
        return routed

    # --------------------------------------------------------------- sending

    async def send(
        self, silo: str, envelope: p.Envelope, *, expect_reply: bool
    ) -> asyncio.Future[p.Result] | None:
        """Publish a batch to `silo`; if `expect_reply`, return the future of
        its result. Error replies fail the future with SiloError."""
        if self._requests is None:
            raise RuntimeError("coordinator link is not started")
        if isinstance(envelope.body, p.Batch):
            closes = envelope.body.closes + self._take_closes(silo, envelope.invocation_id)
            envelope = dataclasses.replace(
                envelope,
                body=dataclasses.replace(
                    envelope.body,
                    coordinator_instance=envelope.body.coordinator_instance or self.instance_id,
                    coordinator_started=envelope.body.coordinator_started or self.instance_started,
                    closes=closes,
                    accepts_bundles=True,
                ),
            )
        record = self.membership.record(silo)
        instance = self.membership.instance_of(silo)
        carried: tuple[tuple[bytes, int], ...] = ()
        batch = envelope.body if isinstance(envelope.body, p.Batch) else None
        # Only where a reply comes back: it says whether the silo had them.
        named = (
            expect_reply
            and bool(instance)
            and batch is not None
            and record is not None
            and record.status.holds_functions
        )
        if named and batch is not None:
            operations, carried = self.functions.name_known(silo, instance, batch.operations)
            envelope = dataclasses.replace(
                envelope, body=dataclasses.replace(batch, operations=operations)
            )
        payload = p.encode(envelope, max_bytes=self.max_message_bytes)
        future: asyncio.Future[p.Result] | None = None
        if expect_reply or envelope.correlation_id:
            future = asyncio.get_running_loop().create_future()
            # Pinned to the silo's current process: another's reply is refused.
            self._pending[envelope.correlation_id] = Pending(
                silo, envelope.invocation_id, future, instance or None
            )
            if named:
                corr = envelope.correlation_id
                self._named[corr] = _NamedBatch(silo, instance, carried, self.functions.epoch(silo))
                # Answered (see _deliver) or abandoned: forgotten either way.
                future.add_done_callback(lambda _: self._named.pop(corr, None))
        # Batches of concurrent invocations to one silo ride in one message
        # when the silo takes bundles (it says so in its hello / heartbeat).
        routed = await self._publisher.publish(
            self.topology.request_routing_key(silo),
            envelope,
            payload,
            bundle=record is not None and record.status.accepts_bundles,
        )
        if not routed:
            self._unroutable(silo, envelope.invocation_id)
        else:
            self._count_published(payload)
        return future if expect_reply else None

    def _functions_answered(self, correlation_id: str, envelope: p.Envelope) -> None:
        """A silo process answered a batch: once it ran, it holds what the
        batch carried; a MISSING_FUNCTIONS refusal means it holds none of
        what we thought (and answers to batches published before that teach
        nothing: the silo may have dropped what they carried since). Done as
        the answer is delivered, before anyone awaiting it resumes: a batch
        sent again at once must not name what the silo just said it lacks."""
        named = self._named.pop(correlation_id, None)
        if named is None:
            return
        if envelope.kind is p.Kind.RESULT:
            if named.carried:
                self.functions.learn(named.silo, named.instance, named.carried, named.epoch)
        elif (
            isinstance(envelope.body, p.ErrorReport)
            and envelope.body.code is p.ErrorCode.MISSING_FUNCTIONS
        ):
            log.warning(
                "coordinator.functions_missing",
                extra={"silo": named.silo, "error": envelope.body.message},
            )
            self.stats["functions_missing"] += 1
            self.functions.forget(named.silo)

    # ---------------------------------------------------------------- closing

    def defer_close(self, silo: str, invocation_id: str, seq: int, deadline: float) -> None:
        """Free `invocation_id` at `silo` with the next batch sent there, or
        on its own after CLOSE_LINGER_SECONDS: three of a federated mean's
        nine messages were closes. The invocation's batches to `silo` must
        all be published already (the silo's queue keeps their order)."""
        self._closes.setdefault(silo, []).append(_DeferredClose(invocation_id, seq, deadline))
        if silo not in self._close_timers:
            self._close_timers[silo] = asyncio.get_running_loop().call_later(
                CLOSE_LINGER_SECONDS, self._send_closes_soon, silo
            )

    def _take_closes(self, silo: str, carrier: str) -> tuple[str, ...]:
        if silo not in self._closes:
            return ()
        closes = self._closes.pop(silo)
        timer = self._close_timers.pop(silo, None)
        if timer is not None:
            timer.cancel()
        return tuple(c.invocation_id for c in closes if c.invocation_id != carrier)

    def _send_closes_soon(self, silo: str) -> None:
        self._close_timers.pop(silo, None)
        task = asyncio.get_running_loop().create_task(self._send_closes(silo))
        self._close_sends.add(task)
        task.add_done_callback(self._close_sends.discard)

    async def _send_closes(self, silo: str) -> None:
        """The deferred closes of `silo` as one message: the first
        invocation's `close` batch, carrying the others."""
        closes = self._closes.pop(silo, [])
        if not closes:
            return
        first = closes[0]
        envelope = p.batch_envelope(
            sender=self.sender,
            invocation_id=first.invocation_id,
            correlation_id="",
            deadline=first.deadline,
            operations=[p.Close()],
            seq=first.seq,
            closes=[c.invocation_id for c in closes[1:]],
        )
        try:
            await self.send(silo, envelope, expect_reply=False)
        except Exception as e:
            # The silo frees them at their deadline plus its grace instead.
            log.info(
                "coordinator.close_not_sent",
                extra={"silo": silo, "invocations": len(closes), "error": str(e)},
            )

    async def flush_closes(self, timeout: float = 10.0) -> None:
        """Send every deferred close now; waits at most `timeout` seconds (a
        close not sent by then is freed at the silo's sweep)."""
        for timer in self._close_timers.values():
            timer.cancel()
        self._close_timers.clear()
        for silo in list(self._closes):
            self._send_closes_soon(silo)
        if self._close_sends:
            await asyncio.wait(set(self._close_sends), timeout=timeout)

    async def close(self) -> None:
        if self._requests is not None:
            await self.flush_closes(timeout=5.0)
            await self._publisher.close(timeout=5.0)
        for task in self._close_sends:
            task.cancel()
        await super().close()

    def _unroutable(self, silo: str, invocation_id: str) -> None:
        """Fail every reply this invocation awaits from `silo` (including the
        request just returned): nothing sent to it can arrive."""
        self.stats["unroutable"] += 1
        log.warning("coordinator.unroutable", extra={"silo": silo, "invocation": invocation_id})
        error = SiloUnreachableError(silo)
        for pending in list(self._pending.values()):
            if (
                pending.silo == silo
                and pending.invocation_id == invocation_id
                and not pending.future.done()
            ):
                pending.future.set_exception(error)
                # Retrieved: a batch without a Compute has nobody awaiting it.
                pending.future.exception()

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

    def _on_unmatched(self, correlation_id: str, silo: str) -> None:
        if correlation_id in self._late:
            self._late.discard(correlation_id)
            self.stats["late_replies"] += 1
            log.info("coordinator.late_reply_discarded", extra={"silo": silo})
            return
        super()._on_unmatched(correlation_id, silo)

    def _deliver(
        self, correlation_id: str, pending: Pending[p.Result], envelope: p.Envelope, silo: str
    ) -> None:
        self.stats["replies"] += 1
        if pending.future.done():
            return
        self._functions_answered(correlation_id, envelope)
        if envelope.kind is p.Kind.RESULT:
            assert isinstance(envelope.body, p.Result)
            self._pending.pop(correlation_id, None)
            pending.future.set_result(envelope.body)
        elif envelope.kind is p.Kind.ERROR:
            assert isinstance(envelope.body, p.ErrorReport)
            pending.future.set_exception(self._silo_error(silo, envelope.body))
            # Retrieve the exception so asyncio does not warn when nobody
            # awaits it (a batch without a Compute: the silo's session fails
            # every later batch of the invocation with the same error).
            pending.future.exception()
