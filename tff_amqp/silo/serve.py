"""The serve loop both silo-side processes share (the stateful silo agent and
the stateless pool worker).

Start: connect (the broker first: an unreachable broker fails fast and
cheap), own a TFF worker, find or declare the queue, consume it, say hello.
Stop: the regime's own clean-up, goodbye, close the connection, stop the TFF
worker; bounded and idempotent, and run too when a start fails half-way.
A message that cannot be decoded is counted, logged and answered with an
error reply where the regime can route one. What a decoded message means is
the regime's business (`_on_message`, `_queue`, the hooks below).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any, Self

import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from tff_amqp import protocol as p
from tff_amqp.errors import SiloNameTakenError
from tff_amqp.event_loop import running_kind
from tff_amqp.silo.data import DataError, SiloDataStore
from tff_amqp.silo.endpoint import EndpointConfig, SiloEndpoint
from tff_amqp.tff_worker import WorkerBinary, WorkerClient, WorkerError
from tff_amqp.topology import Topology
from tff_amqp.transport.schema import hold_lock

log = logging.getLogger(__name__)

# Seconds between re-reads of the columns a silo advertises.
SCHEMA_REFRESH = 60.0


class Service:
    """`async with service:` starts it and stops it; a start that fails
    stops whatever it had started before the error propagates."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError


def _freeze_startup_heap() -> None:
    """Move everything allocated so far (TensorFlow, TFF, the data store:
    the process's lifetime) out of the cyclic garbage collector's reach.
    Its full collections otherwise walk that heap of ~10^6 objects while
    requests wait: CPython's recipe for long-lived servers (`gc.freeze`)."""
    gc.collect()
    gc.freeze()


class SiloServer(Service):
    """One silo-side process on the broker: its endpoint (connection, hello,
    heartbeat, goodbye, replies), its TFF worker and its queue consumer.

    `worker`: a client of a TFF worker owned by someone else (the simulation
    host shares one between silos); by default the process starts and stops
    one of its own.
    """

    # Names the process in logs, its connection and error texts ("silo", "worker").
    role = "silo"
    # Whether this process must be the only consumer of its queue (a
    # stateful silo: one process per name; pool workers of a silo share one).
    exclusive = False
    # Whether this process takes bundles of requests (said in its status).
    accepts_bundles = False
    # Whether batches may name functions sent earlier by digest (its status says).
    holds_functions = False

    def __init__(
        self,
        config: EndpointConfig,
        *,
        silo: str,
        prefetch: int,
        stats: dict[str, int],
        worker: WorkerClient | None = None,
    ) -> None:
        self.silo = silo
        self.topology = Topology(config.federation, config.queue_type)
        self.data = SiloDataStore(silo, config.data)
        self.stats = stats
        self.endpoint = SiloEndpoint(
            config, silo=silo, role=self.role, status=self._status, stats=stats
        )
        self._prefetch = prefetch
        self._injected_worker = worker
        self._worker: WorkerBinary | None = None
        self._started_at = time.time()
        self._advertise_counts = config.advertise_counts
        self._schemas: tuple[p.DataSchema, ...] = ()
        self._schemas_read_at = 0.0
        self._schemas_reading: asyncio.Future[tuple[p.DataSchema, ...]] | None = None

    async def _start(self) -> None:
        # The broker first: an unreachable broker should fail fast and cheap.
        channel = await self.endpoint.connect(prefetch=self._prefetch)
        if self._injected_worker is None:
            self._worker = WorkerBinary()
            await self._worker.start()
        queue = await self._queue(channel)
        await self._before_consume()
        # Read once, before the hello: what columns each data key has.
        self._schemas = await asyncio.to_thread(self.data.schemas, counts=self._advertise_counts)
        self._schemas_read_at = time.monotonic()
        _freeze_startup_heap()
        await self._consume(queue)
        await self.endpoint.announce()
        self._serving()
        log.info(
            f"{self.role}.ready",
            extra={
                "silo": self.silo,
                "federation": self.topology.federation,
                "queue": queue.name,
                **self._ready_details(),
                "data_keys": self.data.keys,
                "worker_pid": self._worker.pid if self._worker is not None else None,
                "event_loop": running_kind(),
            },
        )

    async def _consume(self, queue: AbstractQueue) -> None:
        """Consume the queue; an exclusive process refused by the broker
        (another consumer holds the queue) fails with an error naming the
        holder, before it said hello or took any message."""
        if not self.exclusive:
            await queue.consume(self._on_message, no_ack=False)
            return
        if self.topology.quorum:
            # Quorum queues do not enforce exclusive consumers: the lock does.
            try:
                await hold_lock(queue.channel, self.topology, self.silo)
            except aiormq.exceptions.ChannelLockedResource as e:
                lock = self.topology.lock_queue(self.silo)
                raise SiloNameTakenError(
                    await self._name_taken_message(f"{lock} (a lock queue)", e)
                ) from e
        try:
            await queue.consume(self._on_message, no_ack=False, exclusive=True)
        except aiormq.exceptions.ChannelAccessRefused as e:
            raise SiloNameTakenError(await self._name_taken_message(queue.name, e)) from e

    async def _name_taken_message(self, queue: str, error: Exception) -> str:
        # Long enough to hear the holder's next heartbeat.
        window = min(3.0, 2 * self.endpoint.heartbeat_interval + 0.5)
        held = await self.endpoint.holder(window)
        if held is None:
            who = f"another process (not heard from within {window:.1f} s)"
        else:
            status, instance = held
            who = (
                f"another process: host {status.host or '?'}, pid {status.pid or '?'}, "
                f"instance {instance[:8] or '?'}"
            )
        broker = " ".join(str(error).split())[:200]
        federation = self.topology.federation
        return (
            f"{self.role} {self.silo!r} of federation {federation!r} is already served by "
            f"{who}. The broker refused this process the exclusive consumer on {queue} "
            f"({broker}). `tff-amqp status --federation {federation}` shows the host, pid and "
            f"instance of each silo (its broker connection is named 'tff-amqp {self.role} "
            f"{self.silo} (host:pid)'); stop that process, or start this one with another "
            "--name. Nothing was consumed."
        )

    async def stop(self) -> None:
        """Stop the regime's work, say goodbye, close the broker connection
        and stop the TFF worker. Bounded and idempotent."""
        await self._stop_work()
        await self.endpoint.close()
        if self._worker is not None:
            await self._worker.stop()
            self._worker = None
        log.info(f"{self.role}.stopped", extra={"silo": self.silo, **self.stats})

    # ----------------------------------------------------------- the regime's

    async def _queue(self, channel: AbstractChannel) -> AbstractQueue:
        """The queue the process consumes (declared, or only looked up)."""
        raise NotImplementedError

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        raise NotImplementedError

    async def _before_consume(self) -> None:
        """Start what must run before the first message arrives."""

    def _serving(self) -> None:
        """Called once the process consumes and has said hello."""

    def _ready_details(self) -> dict[str, Any]:
        return {}

    async def _stop_work(self) -> None:
        """Stop the regime's own work (before goodbye)."""

    async def _refuse_malformed(
        self, message: AbstractIncomingMessage, inv: str, corr: str, error: p.ProtocolError
    ) -> None:
        """Answer (or dead-letter) a message that could not be decoded."""
        raise NotImplementedError

    def _active(self) -> int:
        """What the status reports as active invocations (or items)."""
        return 0

    def _allows_raw_client_values(self) -> bool:
        return False

    # ------------------------------------------------------------- shared

    async def _decode(self, message: AbstractIncomingMessage) -> p.Envelope | None:
        """The message's envelope; None if it was malformed (then counted,
        logged and refused)."""
        try:
            return p.decode(message.body, max_bytes=self.endpoint.max_message_bytes)
        except p.ProtocolError as e:
            await self._refuse_undecodable(message, message.body, e)
            return None

    async def _refuse_undecodable(
        self, message: AbstractIncomingMessage, payload: bytes, error: p.ProtocolError
    ) -> None:
        """Count, log and answer a message (or a bundle's member) that did not
        decode, routed by the ids that can still be read from `payload`."""
        self.stats["malformed"] += 1
        log.warning(f"{self.role}.malformed", extra={"code": str(error.code), "error": str(error)})
        inv, corr = p.peek_ids(payload)
        await self._refuse_malformed(message, inv, corr, error)

    def _status(self) -> p.SiloStatus:
        try:
            clients = self.data.default_num_clients()
        except DataError:
            # Data folder changed under us: still alive, report no clients.
            clients = 0
        return p.SiloStatus(
            silo=self.silo,
            clients=clients,
            data_keys=tuple(self.data.keys),
            active_invocations=self._active(),
            allow_raw_client_values=self._allows_raw_client_values(),
            started_at=self._started_at,
            host=self.endpoint.host,
            pid=self.endpoint.pid,
            data_schemas=self._current_schemas(),
            worker_calls=self._worker_calls(),
            accepts_bundles=self.accepts_bundles,
            holds_functions=self.holds_functions,
        )

    def _current_schemas(self) -> tuple[p.DataSchema, ...]:
        """The advertised columns, re-read in a thread at most every
        SCHEMA_REFRESH seconds (files change while a silo runs); a status
        never waits for the read, it carries the last one."""
        reading = self._schemas_reading
        if reading is not None and reading.done():
            self._schemas_reading = None
            if not reading.cancelled() and reading.exception() is None:
                self._schemas = reading.result()
        stale = time.monotonic() - self._schemas_read_at >= SCHEMA_REFRESH
        if stale and self._schemas_read_at and self._schemas_reading is None:
            self._schemas_read_at = time.monotonic()
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return self._schemas
            self._schemas_reading = loop.run_in_executor(
                None, lambda: self.data.schemas(counts=self._advertise_counts)
            )
        return self._schemas

    def _worker_calls(self) -> tuple[tuple[str, int], ...]:
        """Calls this process made to its TFF worker so far (a simulation
        host gives each silo its own client, so its own count)."""
        client = self._injected_worker
        if client is None and self._worker is not None:
            try:
                client = self._worker.client
            except WorkerError:  # not started yet, or stopping
                return ()
        return tuple(sorted(client.calls.items())) if client is not None else ()
