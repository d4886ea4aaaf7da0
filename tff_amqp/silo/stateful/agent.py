"""The silo agent: connects out to the broker and serves executor requests.

A silo opens only outbound connections. It consumes its own request queue,
acknowledges each message on receipt (the coordinator's deadline owns retries,
and RabbitMQ's consumer_timeout must never fire during long local work),
applies each invocation's batches in order on its local ``worker_binary``, and
publishes results and heartbeats to the federation's reply exchange.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from tff_amqp import protocol as p
from tff_amqp.silo.bulk import BulkSettings
from tff_amqp.silo.endpoint import EndpointConfig
from tff_amqp.silo.serve import SiloServer
from tff_amqp.silo.stateful.bulk import SiloBulk
from tff_amqp.silo.stateful.functions import FunctionStore, RefusedBatches, held_functions
from tff_amqp.silo.stateful.session import InvocationSession, PrivacyPolicy, SessionError
from tff_amqp.tff_worker import WorkerClient
from tff_amqp.topology import Topology, check_silo_name
from tff_amqp.transport.bulk import DEFAULT_MAX_PENDING_BYTES, TransferError
from tff_amqp.transport.connection import ack_queued
from tff_amqp.transport.schema import declare_queue

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SiloConfig(EndpointConfig):
    """Everything a silo agent needs to run (keyword arguments only)."""

    name: str
    policy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    # Clients of an invocation that gives this silo no client data (no
    # silo_data argument, no client list), e.g. `federated_value(x, CLIENTS)`
    # alone: 0, as in TFF's native runtime, unless the operator says otherwise.
    default_clients: int = 0
    prefetch: int = 32
    # Bytes held at once in incoming chunked transfers (partial or unclaimed).
    max_pending_transfer_bytes: int = DEFAULT_MAX_PENDING_BYTES
    # Sessions idle this long past their deadline are freed even without Close.
    session_grace: float = 30.0
    # Functions kept by digest for later batches to name (0: none); from
    # TFF_AMQP_HELD_FUNCTIONS when set (see functions.py).
    held_functions: int = field(default_factory=held_functions)

    def __post_init__(self) -> None:
        check_silo_name(self.name)
        if self.held_functions < 0:
            raise ValueError("held_functions must be 0 or more")
        if self.default_clients < 0:
            raise ValueError("default_clients must be 0 or more")
        Topology(self.federation)  # validates the federation name


# The values of an invocation whose close rides another invocation's batch
# are freed once that batch has run, or after this many seconds if it runs
# longer (training): the worker serves a Dispose before the calls behind it
# (a CreateValue waited 2-5 ms for one), and the carrying batch is what the
# coordinator waits for now.
CLOSE_AFTER_CARRIER_SECONDS = 1.0


@dataclass(frozen=True)
class _Finish:
    """The invocation is over; free it after `after` (its carrier's batch)."""

    after: asyncio.Future[None] | None


class _InvocationRunner:
    """Applies the batches of one invocation strictly in arrival order."""

    def __init__(
        self, agent: SiloAgent, session: InvocationSession, coordinator: tuple[str, str]
    ) -> None:
        self.session = session
        # (sender, instance id) of the coordinator process that opened it.
        self.coordinator = coordinator
        self._agent = agent
        # Batches to apply, each with the future it resolves once applied;
        # _Finish: the invocation is over (its close rode another invocation's
        # batch), once the batches before it are applied.
        self._queue: asyncio.Queue[tuple[p.Envelope, asyncio.Future[None]] | _Finish] = (
            asyncio.Queue()
        )
        self._task = asyncio.create_task(self._run(), name=f"invocation-{session.invocation_id}")

    def submit(self, envelope: p.Envelope) -> asyncio.Future[None]:
        """Queue a batch; the future resolves once it has been applied (or
        dropped: the session ended first)."""
        applied = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((envelope, applied))
        return applied

    def finish(self, after: asyncio.Future[None] | None = None) -> None:
        self._queue.put_nowait(_Finish(after))

    async def _run(self) -> None:
        carried = False
        try:
            while not self.session.closed:
                item = await self._queue.get()
                if isinstance(item, _Finish):
                    carried = item.after is not None
                    if item.after is not None and not item.after.done():
                        await asyncio.wait([item.after], timeout=CLOSE_AFTER_CARRIER_SECONDS)
                    break
                envelope, applied = item
                try:
                    await self._agent._process_batch(self.session, envelope)
                finally:
                    _resolve(applied)
        finally:
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if not isinstance(item, _Finish):
                    _resolve(item[1])
            await self.session.close()
            log.debug(
                "silo.session_freed",
                extra={"invocation": self.session.invocation_id, "carried_close": carried},
            )
            self._agent._forget(self.session.invocation_id)
            if self._agent.bulk is not None:
                self._agent.bulk.forget_invocation(self.session.invocation_id)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class SiloAgent(SiloServer):
    """One silo: a worker_binary, a request consumer and a heartbeat (started
    and stopped by the shared serve loop, `tff_amqp.silo.serve`).

    `worker`: a client of a worker_binary owned by someone else (the
    simulation host in `tff_amqp.silo.stateful.host` shares one between silos); by
    default the agent starts and stops a worker_binary of its own.
    """

    role = "silo"
    # One process per silo name: a second is refused at start (exclusive
    # consumer on the request queue), so no two processes serve one silo.
    exclusive = True
    # Concurrent invocations' batches arrive together in one message.
    accepts_bundles = True

    def __init__(self, config: SiloConfig, *, worker: WorkerClient | None = None) -> None:
        self.config = config
        stats = {
            "batches": 0,
            "errors": 0,
            "duplicates": 0,
            "expired": 0,
            "malformed": 0,
            "invocations": 0,
            "received_bytes": 0,
            "published_bytes": 0,
            "reconnects": 0,
            "bundles": 0,
        }
        super().__init__(
            config, silo=config.name, prefetch=config.prefetch, stats=stats, worker=worker
        )
        # Called with (seconds, ok) after each batch (metrics).
        self.batch_observers: list[Callable[[float, bool], None]] = []
        self.bulk: SiloBulk | None = None
        self._runners: dict[str, _InvocationRunner] = {}
        # Functions sent once are kept by digest; batches may name them
        # (functions.py), unless the store is configured empty.
        self._functions = FunctionStore(max_functions=config.held_functions)
        self.holds_functions = config.held_functions > 0
        self._refused = RefusedBatches()
        self._seen_ids: OrderedDict[str, None] = OrderedDict()
        # The latest-started instance seen per coordinator name, as (start
        # time, instance id): an earlier-started one is gone (one coordinator
        # per federation), so its sessions are freed and its batches refused.
        self._coordinators: dict[str, tuple[float, str]] = {}
        self._sweeper_task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    async def _queue(self, channel: AbstractChannel) -> AbstractQueue:
        if self.config.declare_topology:
            return await declare_queue(
                channel, self.topology, self.topology.request_queue_spec(self.config.name)
            )
        return await channel.get_queue(self.topology.request_queue(self.config.name), ensure=False)

    async def _before_consume(self) -> None:
        # Large values travel on a connection of their own (after the control
        # topology exists: it declares nothing the control side needs).
        self.bulk = SiloBulk(
            BulkSettings.of(
                self.config,
                self.topology,
                silo=self.config.name,
                user_id=self.endpoint.user_id,
                instance=self.endpoint.instance,
            ),
            max_pending_bytes=self.config.max_pending_transfer_bytes,
        )
        await self.bulk.start()

    def _serving(self) -> None:
        self._sweeper_task = asyncio.create_task(self._sweep_loop(), name="sweeper")
        self.ready.set()

    def _ready_details(self) -> dict[str, Any]:
        return {"clients": self.data.default_num_clients()}

    async def _stop_work(self) -> None:
        """Free every invocation (and the bulk connection) before goodbye."""
        if self._sweeper_task is not None:
            self._sweeper_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper_task
            self._sweeper_task = None
        for runner in list(self._runners.values()):
            await runner.stop()
        self._runners.clear()
        if self.bulk is not None:
            await self.bulk.close()
            self.bulk = None

    # ------------------------------------------------------------------ intake

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # Ack on receipt: the coordinator's deadline owns retries, and a
        # long-held unacked message would trip RabbitMQ's consumer_timeout.
        await ack_queued(message)
        self.stats["received_bytes"] += len(message.body)
        envelope = await self._decode(message)
        if envelope is None:
            return
        if envelope.kind is not p.Kind.BUNDLE:
            await self._on_envelope(envelope)
            return
        self.stats["bundles"] += 1
        for member in p.members(envelope, max_bytes=self.endpoint.max_message_bytes):
            if isinstance(member, tuple):
                await self._refuse_undecodable(message, *member)
            else:
                await self._on_envelope(member)

    async def _on_envelope(self, envelope: p.Envelope) -> None:
        """One request (alone, or a member of a bundle)."""
        if envelope.message_id in self._seen_ids:
            self.stats["duplicates"] += 1
            log.info("silo.duplicate", extra={"message_id": envelope.message_id})
            return
        self._remember(envelope.message_id)
        applied: asyncio.Future[None] | None = None
        try:
            applied = await self._accept(envelope)
        finally:
            # After this batch is queued, and freed once it has run (see
            # CLOSE_AFTER_CARRIER_SECONDS), whatever becomes of it.
            self._finish_closed(envelope, applied)

    async def _accept(self, envelope: p.Envelope) -> asyncio.Future[None] | None:
        """Refuse `envelope` (None) or queue it for its invocation's runner:
        the future of its being applied."""
        if isinstance(envelope.body, p.Batch) and not self._replaced(envelope):
            # Replies, refusals included, as the latest coordinator reads
            # them (one coordinator per federation).
            self.endpoint.bundle_replies = envelope.body.accepts_bundles
        refusal = self._refusal(envelope)
        if refusal is not None:
            code, text = refusal
            stale = self._runners.get(envelope.invocation_id)
            if code is p.ErrorCode.EXPIRED and stale is not None:
                # The invocation is past its deadline at the coordinator too:
                # free its session now rather than at the sweep.
                await stale.stop()
            await self.endpoint.reply_error(
                envelope.invocation_id,
                envelope.correlation_id,
                code,
                f"silo {self.config.name!r} {text}",
            )
            return None
        try:
            envelope = self._take_functions(envelope)
        except p.ProtocolError as e:
            await self.endpoint.reply_error(
                envelope.invocation_id,
                envelope.correlation_id,
                e.code,
                f"silo {self.config.name!r} {e}",
            )
            self._free_if_closing(envelope)
            return None
        await self._note_coordinator(envelope)
        runner = self._runners.get(envelope.invocation_id)
        if runner is None:
            if not envelope.invocation_id:
                await self.endpoint.reply_error(
                    "", envelope.correlation_id, p.ErrorCode.MALFORMED, "missing invocation id"
                )
                return None
            session = InvocationSession(
                silo=self.config.name,
                invocation_id=envelope.invocation_id,
                worker=self._worker_client(),
                policy=self.config.policy,
                resolve_data=self._resolve_data,
                count_clients=self._count_clients,
                deadline=envelope.deadline,
                fetch_blob=self._blob_fetcher(envelope.invocation_id, envelope.deadline),
            )
            sender, instance, _ = _coordinator_of(envelope)
            runner = _InvocationRunner(self, session, (sender, instance))
            self._runners[envelope.invocation_id] = runner
            self.stats["invocations"] += 1
        return runner.submit(envelope)

    def _take_functions(self, envelope: p.Envelope) -> p.Envelope:
        """`envelope` with the functions its batch names given in full, taken
        in the order the queue delivers (the order the coordinator sent);
        ProtocolError when this silo lacks one, or refused an earlier batch
        of the invocation that has not come again."""
        assert isinstance(envelope.body, p.Batch)
        seq = envelope.body.seq
        blocking = self._refused.blocking(envelope.invocation_id, seq)
        if blocking is not None:
            raise p.ProtocolError(
                p.ErrorCode.EARLIER_BATCH_REFUSED,
                f"refused batch {blocking} of this invocation for functions it no longer "
                f"holds, so it refuses batch {seq} until that one comes again; the "
                "coordinator sends both again",
            )
        try:
            body = self._functions.take(envelope.body)
        except p.ProtocolError:
            self.stats["errors"] += 1
            self._refused.refuse(envelope.invocation_id, seq, envelope.deadline)
            raise
        self._refused.passed(envelope.invocation_id, seq)
        return replace(envelope, body=body)

    def _free_if_closing(self, envelope: p.Envelope) -> None:
        """A refused batch that closes its invocation still frees it (once
        the batches before it are applied), as a failed one does: the
        coordinator sends it again only while the invocation runs, and its
        values would otherwise stay until the deadline's sweep."""
        assert isinstance(envelope.body, p.Batch)
        if not any(isinstance(op, p.Close) for op in envelope.body.operations):
            return
        self._refused.forget(envelope.invocation_id)
        runner = self._runners.get(envelope.invocation_id)
        if runner is not None and runner.coordinator[0] == envelope.sender:
            runner.finish()

    def _finish_closed(self, envelope: p.Envelope, after: asyncio.Future[None] | None) -> None:
        """Free the invocations whose close rides this batch (whatever becomes
        of the batch itself), after `after`: only the sending coordinator's own."""
        if not isinstance(envelope.body, p.Batch):
            return
        for invocation_id in envelope.body.closes:
            self._refused.forget(invocation_id)
            runner = self._runners.get(invocation_id)
            if runner is not None and runner.coordinator[0] == envelope.sender:
                runner.finish(after)

    def _refusal(self, envelope: p.Envelope) -> tuple[p.ErrorCode, str] | None:
        """Why a request is answered with an error before any session sees
        it (not a batch, or past its deadline), if it is."""
        if envelope.kind is not p.Kind.BATCH:
            return p.ErrorCode.MALFORMED, f"only accepts 'batch' messages, got {envelope.kind!r}"
        if self._replaced(envelope):
            self.stats["expired"] += 1
            return (
                p.ErrorCode.EXPIRED,
                "received a request from a coordinator instance that a later-started instance "
                "of the same coordinator replaced; its invocations were freed, not executed",
            )
        if envelope.expired():
            self.stats["expired"] += 1
            return p.ErrorCode.EXPIRED, "received the request after its deadline; not executed"
        if not envelope.deadline:
            # Every session is bounded by its deadline (plus the grace): a
            # batch without one could pin values in the worker forever.
            self.stats["malformed"] += 1
            return (
                p.ErrorCode.MALFORMED,
                "refuses a batch without a deadline (deadline 0): a session must end; "
                "the coordinator always sets one (ContextOptions.deadline)",
            )
        return None

    async def _refuse_malformed(
        self, message: AbstractIncomingMessage, inv: str, corr: str, error: p.ProtocolError
    ) -> None:
        corr = corr or (message.correlation_id or "")
        await self.endpoint.reply_error(
            inv, corr, error.code, f"silo {self.config.name!r}: {error}"
        )

    async def _process_batch(self, session: InvocationSession, envelope: p.Envelope) -> None:
        batch = envelope.body
        assert isinstance(batch, p.Batch)
        if session.is_duplicate(batch.seq):
            self.stats["duplicates"] += 1
            return
        self.stats["batches"] += 1
        wants_reply = any(isinstance(op, p.Compute) for op in batch.operations)
        started = time.monotonic()
        try:
            released = await session.apply(batch)
        except SessionError as e:
            self.stats["errors"] += 1
            self._observe_batch(started, ok=False)
            log.warning(
                "silo.batch_failed",
                extra={"invocation": session.invocation_id, "code": str(e.code), "error": str(e)},
            )
            await self.endpoint.reply_error(
                session.invocation_id,
                envelope.correlation_id,
                e.code,
                str(e),
                worker_status=e.worker_status,
            )
            return
        self._observe_batch(started, ok=True)
        if wants_reply:
            try:
                released, blobs = await self._send_large(session, envelope, released)
            except TransferError as e:
                await self.endpoint.reply_error(
                    session.invocation_id, envelope.correlation_id, e.code, str(e)
                )
                return
            await self.endpoint.publish(
                p.Envelope(
                    kind=p.Kind.RESULT,
                    body=p.Result(values=released, blobs=blobs),
                    sender=self.config.name,
                    invocation_id=session.invocation_id,
                    correlation_id=envelope.correlation_id,
                )
            )
        log.debug(
            "silo.batch_applied", extra={"invocation": session.invocation_id, "seq": batch.seq}
        )

    def _observe_batch(self, started: float, *, ok: bool) -> None:
        for observer in self.batch_observers:
            observer(time.monotonic() - started, ok)

    def _blob_fetcher(
        self, invocation_id: str, deadline: float
    ) -> Callable[[p.BlobRef], Awaitable[bytearray]]:
        async def fetch(blob: p.BlobRef) -> bytearray:
            if self.bulk is None:
                raise TransferError(p.ErrorCode.EXPIRED, "the silo is stopping")
            # Bounded: an operation waits for its value at most until the
            # invocation's deadline (or a minute if it has none).
            timeout = deadline - time.time() if deadline else 60.0
            return await self.bulk.receive(blob, invocation_id=invocation_id, timeout=timeout)

        return fetch

    async def _send_large(
        self, session: InvocationSession, envelope: p.Envelope, released: dict[int, bytes]
    ) -> tuple[dict[int, bytes], dict[int, p.BlobRef]]:
        """Values above the inline limit go as chunked transfers on the bulk
        connection, before the result that names them."""
        if self.bulk is None:
            return released, {}
        inline: dict[int, bytes] = {}
        blobs: dict[int, p.BlobRef] = {}
        for value_id, data in released.items():
            if len(data) <= self.bulk.inline_limit:
                inline[value_id] = data
                continue
            blobs[value_id] = await self.bulk.send(
                data,
                invocation_id=session.invocation_id,
                correlation_id=envelope.correlation_id,
                deadline=envelope.deadline,
            )
        return inline, blobs

    def _replaced(self, envelope: p.Envelope) -> bool:
        """Whether the batch comes from a coordinator instance that a
        later-started instance of the same coordinator replaced."""
        sender, instance, started = _coordinator_of(envelope)
        current = self._coordinators.get(sender)
        return bool(instance) and current is not None and (started, instance) < current

    async def _note_coordinator(self, envelope: p.Envelope) -> None:
        """A new instance of a coordinator (it restarted): the old instance
        is gone (one coordinator per federation), so free its sessions now
        instead of at their deadline plus the grace."""
        sender, instance, started = _coordinator_of(envelope)
        if not instance:
            return
        previous = self._coordinators.get(sender)
        if previous is not None and previous >= (started, instance):
            return
        self._coordinators[sender] = (started, instance)
        if previous is None:
            return
        stale = [r for r in self._runners.values() if r.coordinator == (sender, previous[1])]
        if stale:
            log.info(
                "silo.coordinator_replaced",
                extra={"coordinator": sender, "freed_invocations": len(stale)},
            )
        for runner in stale:
            self.stats["freed_sessions"] = self.stats.get("freed_sessions", 0) + 1
            await runner.stop()

    def _forget(self, invocation_id: str) -> None:
        self._runners.pop(invocation_id, None)

    def _remember(self, message_id: str) -> None:
        self._seen_ids[message_id] = None
        while len(self._seen_ids) > 10_000:
            self._seen_ids.popitem(last=False)

    # ------------------------------------------------------------------- data

    def _resolve_data(self, key: str, type_bytes: bytes) -> tuple[int, bytes]:
        from tensorflow_federated.proto.v0 import computation_pb2
        from tensorflow_federated.python.core.impl.types import (
            computation_types,
            placements,
            type_serialization,
        )

        type_spec = type_serialization.deserialize_type(computation_pb2.Type.FromString(type_bytes))
        if not (
            isinstance(type_spec, computation_types.FederatedType)
            and type_spec.placement is placements.CLIENTS
        ):
            raise SessionError(
                p.ErrorCode.DATA, f"silo_data({key!r}) must be CLIENTS-placed, got {type_spec}"
            )
        value = self.data.federated_value(key, type_spec)
        return self.data.num_clients(key), value.SerializeToString()

    def _count_clients(self, key: str | None) -> int:
        return self.data.num_clients(key) if key is not None else self.config.default_clients

    # ------------------------------------------------------------- publishing

    def _active(self) -> int:
        return len(self._runners)

    def _allows_raw_client_values(self) -> bool:
        return self.config.policy.allow_raw_client_values

    async def _sweep_loop(self) -> None:
        """Free invocations whose coordinator went away without a `close`:
        nothing is kept past the invocation's deadline plus a grace period."""
        while True:
            await asyncio.sleep(min(5.0, self.config.session_grace))
            now = time.time()
            self._refused.expire(now, self.config.session_grace)
            for runner in list(self._runners.values()):
                deadline = runner.session.deadline
                if deadline and now > deadline + self.config.session_grace:
                    log.info(
                        "silo.session_expired",
                        extra={"invocation": runner.session.invocation_id},
                    )
                    self.stats["expired_sessions"] = self.stats.get("expired_sessions", 0) + 1
                    await runner.stop()

    def _worker_client(self) -> WorkerClient:
        if self._injected_worker is not None:
            return self._injected_worker
        if self._worker is None:
            raise RuntimeError("silo agent is not started")
        return self._worker.client


def _coordinator_of(envelope: p.Envelope) -> tuple[str, str, float]:
    """(coordinator name, instance id, its start time) of a batch (instance
    "" when it names none)."""
    body = envelope.body
    if not isinstance(body, p.Batch):
        return envelope.sender, "", 0.0
    return envelope.sender, body.coordinator_instance, body.coordinator_started


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
