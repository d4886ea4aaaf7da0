"""A stateless worker: one of a silo's pool of interchangeable workers.

It consumes the silo's shared work queue (`tff.<fed>.work.<silo>`, competing
consumers) with prefetch 1, runs each MapReduce work item on its local
`worker_binary` over the silo's local data, publishes the shard's accumulator
with a publisher confirm, and only then acks the item. A worker that dies
mid-item never acks it, so RabbitMQ redelivers it to another worker of the
silo; the coordinator merges each item id once.

Unlike a silo agent (which acks on receipt), a worker holds the item unacked
while it works: RabbitMQ's `consumer_timeout` (30 min by default) bounds how
long a work item may take; see docs/stateless.md.

Workers announce themselves with the silo's hello / heartbeat / goodbye
(their own `started_at` tells workers of one silo apart), so the coordinator
counts a silo live while any of its workers is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from tff_amqp import protocol as p
from tff_amqp.silo.bulk import BulkSettings
from tff_amqp.silo.data import DataError
from tff_amqp.silo.endpoint import EndpointConfig, ServingError
from tff_amqp.silo.pool.broadcast import PoolBulk
from tff_amqp.silo.pool.shard import ShardRunner, shard_bounds
from tff_amqp.silo.serve import SiloServer
from tff_amqp.tff_worker import WorkerBinary, WorkerError
from tff_amqp.topology import Topology, check_silo_name
from tff_amqp.transport.bulk import TransferError
from tff_amqp.transport.schema import declare_work_queue

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PoolWorkerConfig(EndpointConfig):
    """Everything a stateless worker needs to run (keyword arguments only;
    `declare_topology` covers the work queue)."""

    silo: str
    # Refuse work items whose shard has fewer clients than this (a shard's
    # accumulator is what leaves the silo; see docs/privacy.md).
    min_clients_per_item: int = 1

    def __post_init__(self) -> None:
        check_silo_name(self.silo)
        Topology(self.federation)
        if self.min_clients_per_item < 1:
            raise ValueError("min_clients_per_item must be at least 1")
        if not self.heartbeat_interval > 0:
            raise ValueError("heartbeat_interval must be a positive number of seconds")


class ItemError(ServingError):
    """A work item that cannot succeed on any worker (bad data key, privacy,
    a failing computation): answered with an error reply, then acked.
    `worker_status`: the gRPC status of the TFF worker error behind it."""


class PoolWorker(SiloServer):
    """One worker: a worker_binary, a work-queue consumer and a heartbeat
    (started and stopped by the shared serve loop, `tff_amqp.silo.serve`).

    async with PoolWorker(config) as worker:
        ...  # serves until the block ends
    """

    # Serialized client datasets kept per (data key, element type, client):
    # the same shards come back every round.
    MAX_CACHED_CLIENTS = 4096

    role = "pool_worker"

    def __init__(self, config: PoolWorkerConfig) -> None:
        self.config = config
        stats: dict[str, int] = {
            "items": 0,
            "errors": 0,
            "redelivered": 0,
            "expired": 0,
            "malformed": 0,
        }
        # One item at a time: a second one would wait unacked behind the
        # first (counting towards consumer_timeout) instead of going to an
        # idle worker of the pool.
        super().__init__(config, silo=config.silo, prefetch=1, stats=stats)
        # Called with (seconds, ok) after each work item (metrics).
        self.item_observers: list[Callable[[float, bool], None]] = []
        self._busy = 0
        # Set when this worker can no longer run items (its worker_binary died).
        self.failed = asyncio.Event()
        self._client_values: OrderedDict[tuple[str, bytes, int], object] = OrderedDict()
        # Large broadcasts in, large accumulators out (its own connection).
        self.bulk: PoolBulk | None = None

    async def _queue(self, channel: AbstractChannel) -> AbstractQueue:
        if self.config.declare_topology:
            await declare_work_queue(channel, self.topology, self.config.silo)
        return await channel.get_queue(self.topology.work_queue(self.config.silo), ensure=False)

    async def _before_consume(self) -> None:
        # Large broadcasts in, large accumulators out, on a connection of its own.
        self.bulk = PoolBulk(
            BulkSettings.of(
                self.config,
                self.topology,
                silo=self.config.silo,
                user_id=self.endpoint.user_id,
                instance=self.endpoint.instance,
            ),
            stats=self.stats,
        )
        await self.bulk.start()

    async def _stop_work(self) -> None:
        if self.bulk is not None:
            await self.bulk.close()
            self.bulk = None

    # Stopping closes the connection with an item in progress unacked, so the
    # broker redelivers it to another worker of the pool.

    # ------------------------------------------------------------------ intake

    async def _refuse_malformed(
        self, message: AbstractIncomingMessage, inv: str, corr: str, error: p.ProtocolError
    ) -> None:
        if corr:
            await self.endpoint.reply_error(inv, corr, error.code, str(error))
            await message.ack()
        else:
            # Nobody to answer: dead-letter it to the coordinator's queue.
            await message.reject(requeue=False)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        envelope = await self._decode(message)
        if envelope is None:
            return
        if message.redelivered:
            self.stats["redelivered"] += 1
        log.info(
            "pool_worker.item_started",
            extra={"item": envelope.correlation_id, "redelivered": bool(message.redelivered)},
        )
        self._busy += 1
        started = time.monotonic()
        try:
            reply = await self._handle(envelope)
        finally:
            self._busy -= 1
        for observe in self.item_observers:
            observe(time.monotonic() - started, reply.kind is p.Kind.WORK_RESULT)
        execution_failed = (
            isinstance(reply.body, p.ErrorReport) and reply.body.code is p.ErrorCode.EXECUTION
        )
        if await self._worker_binary_died(failed=execution_failed):
            # Our worker_binary died under the item: not the item's fault.
            # Give it back to the pool and stop (a supervisor restarts us).
            log.error("pool_worker.worker_binary_died", extra={"item": envelope.correlation_id})
            await message.nack(requeue=True)
            self.failed.set()
            return
        # Ack only after the reply is confirmed by the broker: if we die
        # before this line, the item is redelivered to another worker.
        await self.endpoint.publish(reply)
        await message.ack()

    async def _worker_binary_died(self, *, failed: bool, grace: float = 2.0) -> bool:
        """Whether our worker_binary is gone. After a failed item, look again
        for up to `grace` seconds: a killed process closes its sockets (so the
        item fails with UNAVAILABLE) a moment before it can be reaped."""
        worker = self._require_worker()
        if not failed:
            return not worker.is_running
        until = time.monotonic() + grace
        while worker.is_running:
            if time.monotonic() >= until:
                return False
            await asyncio.sleep(0.02)
        return True

    async def _handle(self, envelope: p.Envelope) -> p.Envelope:
        """The reply to a work item: its result or an error."""
        started = time.monotonic()
        try:
            if envelope.kind is not p.Kind.WORK or not isinstance(envelope.body, p.WorkItem):
                raise ItemError(
                    p.ErrorCode.MALFORMED,
                    f"a stateless worker only accepts 'work' messages, got {envelope.kind!r}",
                )
            if not envelope.correlation_id:
                raise ItemError(p.ErrorCode.MALFORMED, "work item without an item id ('corr')")
            if envelope.expired():
                self.stats["expired"] += 1
                raise ItemError(
                    p.ErrorCode.EXPIRED,
                    "work item received after its round's deadline; not executed",
                )
            item = await self._with_broadcast(envelope, envelope.body)
            result = await self._chunked(envelope, await self._run(item))
        except Exception as e:
            if isinstance(e, ItemError):
                error = e
                log.warning(
                    "pool_worker.item_failed",
                    extra={"item": envelope.correlation_id, "code": str(e.code), "error": str(e)},
                )
            else:
                # Anything unexpected still gets an answer (and the item its
                # ack): an unanswered item would sit unacked here forever.
                log.exception("pool_worker.item_crashed", extra={"item": envelope.correlation_id})
                error = ItemError(p.ErrorCode.EXECUTION, f"{type(e).__name__}: {e}")
            self.stats["errors"] += 1
            return self.endpoint.error_envelope(
                envelope.invocation_id,
                envelope.correlation_id,
                p.ErrorReport(
                    error.code,
                    f"silo {self.config.silo!r} worker: {error}",
                    worker_status=error.worker_status,
                ),
            )
        self.stats["items"] += 1
        log.info(
            "pool_worker.item_done",
            extra={
                "item": envelope.correlation_id,
                "shard": result.shard,
                "clients": result.clients,
                "seconds": round(time.monotonic() - started, 3),
            },
        )
        return p.Envelope(
            kind=p.Kind.WORK_RESULT,
            body=result,
            sender=self.config.silo,
            invocation_id=envelope.invocation_id,
            correlation_id=envelope.correlation_id,
        )

    async def _with_broadcast(self, envelope: p.Envelope, item: p.WorkItem) -> p.WorkItem:
        """The item with its broadcast inline: a large one is read from the
        silo's stream once per round and worker (cached), then shared."""
        if item.broadcast_blob is None:
            return item
        bulk = self._require_bulk()
        try:
            value = await bulk.broadcast(
                item.broadcast_blob,
                since=item.broadcast_since,
                round_id=envelope.invocation_id,
                deadline=envelope.deadline or time.time() + 600.0,
            )
        except TransferError as e:
            raise ItemError(e.code, f"broadcast not received: {e}") from e
        return dataclasses.replace(item, broadcast=value, broadcast_blob=None)

    async def _chunked(self, envelope: p.Envelope, result: p.WorkResult) -> p.WorkResult:
        """A result above the inline limit goes as a chunked transfer first
        (to the coordinator's bulk queue); the reply then names it."""
        bulk = self._require_bulk()
        if len(result.accumulator) <= bulk.inline_limit:
            return result
        blob = await bulk.send(
            result.accumulator,
            invocation_id=envelope.invocation_id,
            correlation_id=envelope.correlation_id,
            deadline=envelope.deadline or time.time() + 600.0,
        )
        return p.WorkResult(result.shard, result.clients, b"", blob=blob)

    def _require_bulk(self) -> PoolBulk:
        if self.bulk is None:
            raise RuntimeError("worker is not started")
        return self.bulk

    async def _run(self, item: p.WorkItem) -> p.WorkResult:
        from tensorflow_federated.proto.v0 import executor_pb2

        work, zero, accumulate, broadcast = (
            _parse_value(item.work, "work"),
            _parse_value(item.zero, "zero"),
            _parse_value(item.accumulate, "accumulate"),
            _parse_value(item.broadcast, "broadcast"),
        )
        work_type = _function_type(work, "work")
        accumulate_type = _function_type(accumulate, "accumulate")
        try:
            total = self.data.num_clients(item.data_key)
        except DataError as e:
            raise ItemError(p.ErrorCode.DATA, str(e)) from e
        start, stop = shard_bounds(total, item.shard, item.shards)
        executor = await self._require_worker().client.shared_executor(0)
        if stop == start:
            # An empty shard (more shards than clients): zero() says so.
            ref, cached = await executor.create_computation(item.zero, zero)
            call = await executor.create_call(ref)
            value = await executor.compute(call)
            await executor.dispose([call] if cached else [call, ref])
            return p.WorkResult(item.shard, 0, value.SerializeToString())
        if stop - start < self.config.min_clients_per_item:
            raise ItemError(
                p.ErrorCode.PRIVACY,
                f"refuses to release an accumulator over {stop - start} client(s) (shard "
                f"{item.shard} of {item.shards} of {total}): its policy requires at least "
                f"{self.config.min_clients_per_item} per work item. Use fewer shards per silo.",
            )
        data_type = work_type.parameter[0]  # type: ignore[index]
        data = await asyncio.to_thread(
            self._client_values_for, item.data_key, data_type, start, stop
        )
        runner = ShardRunner(executor)
        try:
            accumulator = await runner.run(
                work=(item.work, work),
                zero=(item.zero, zero),
                accumulate=(item.accumulate, accumulate),
                broadcast=broadcast,
                client_data=data,
                work_param_names=_param_names(work_type),
                accumulate_param_names=_param_names(accumulate_type),
            )
        except WorkerError as e:
            raise ItemError(p.ErrorCode.EXECUTION, str(e), worker_status=e.status) from e
        assert isinstance(accumulator, executor_pb2.Value)
        return p.WorkResult(item.shard, stop - start, accumulator.SerializeToString())

    def _client_values_for(
        self, key: str, data_type: object, start: int, stop: int
    ) -> list[object]:
        """Each client's dataset in [start, stop) as a Value of `data_type`
        (a sequence type); blocking (file reads), so run in a thread."""
        from tensorflow_federated.python.core.impl.executors import value_serialization
        from tensorflow_federated.python.core.impl.types import (
            computation_types,
            type_serialization,
        )

        if not isinstance(data_type, computation_types.SequenceType):
            raise ItemError(
                p.ErrorCode.DATA,
                f"the work computation takes {data_type} per client, but silo data is a "
                "sequence per client ({T*})",
            )
        type_key = type_serialization.serialize_type(data_type).SerializeToString()
        missing = [c for c in range(start, stop) if (key, type_key, c) not in self._client_values]
        if missing:
            try:
                datasets = self.data.client_datasets(key, data_type.element)
            except DataError as e:
                raise ItemError(p.ErrorCode.DATA, str(e)) from e
            for client in missing:
                value, _ = value_serialization.serialize_value(datasets[client], data_type)
                self._client_values[(key, type_key, client)] = value
                while len(self._client_values) > self.MAX_CACHED_CLIENTS:
                    self._client_values.popitem(last=False)
        values = []
        for client in range(start, stop):
            self._client_values.move_to_end((key, type_key, client))
            values.append(self._client_values[(key, type_key, client)])
        return values

    # ------------------------------------------------------------- publishing

    def _active(self) -> int:
        return self._busy

    def _require_worker(self) -> WorkerBinary:
        if self._worker is None:
            raise RuntimeError("worker is not started")
        return self._worker


def _parse_value(serialized: bytes, what: str) -> object:
    from tensorflow_federated.proto.v0 import executor_pb2

    try:
        return executor_pb2.Value.FromString(serialized)
    except Exception as e:
        raise ItemError(p.ErrorCode.MALFORMED, f"work item {what!r} is not a TFF Value: {e}") from e


def _function_type(value: object, what: str) -> object:
    from tensorflow_federated.python.core.impl.types import computation_types, type_serialization

    if value.WhichOneof("value") != "computation":  # type: ignore[attr-defined]
        raise ItemError(p.ErrorCode.MALFORMED, f"work item {what!r} is not a computation")
    type_spec = type_serialization.deserialize_type(value.computation.type)  # type: ignore[attr-defined]
    if not isinstance(type_spec, computation_types.FunctionType):
        raise ItemError(p.ErrorCode.MALFORMED, f"work item {what!r} is not a function")
    return type_spec


def _param_names(function_type: object) -> tuple[str | None, str | None]:
    """Names of a 2-element parameter struct (TFF checks them on calls)."""
    from tensorflow_federated.python.common_libs import structure
    from tensorflow_federated.python.core.impl.types import computation_types

    parameter = function_type.parameter  # type: ignore[attr-defined]
    if not isinstance(parameter, computation_types.StructType) or len(parameter) != 2:
        raise ItemError(
            p.ErrorCode.MALFORMED, f"expected a function of 2 arguments, got {function_type}"
        )
    first, second = structure.name_list_with_nones(parameter)
    return first, second
