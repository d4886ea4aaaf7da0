"""One invocation of a computation: its cohort, deadline, and where values live.

The invocation owns the coordinator-local worker executor (SERVER and unplaced
values) and one outbox per cohort silo (CLIENTS values). It moves values
between places: materializing server values for silos, and receiving silo
aggregates. It never moves a CLIENTS value to the coordinator except through a
silo's release, which the silo's privacy policy governs.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.core.impl.compiler import building_blocks
from tensorflow_federated.python.core.impl.executors import value_serialization
from tensorflow_federated.python.core.impl.types import (
    computation_types,
    placements,
    type_serialization,
)

from tff_amqp import protocol as p
from tff_amqp.coordinator.quorum import phase_cutoff
from tff_amqp.coordinator.stateful.outbox import SiloOutbox
from tff_amqp.coordinator.stateful.values import (
    ClientsValue,
    CoordinatorValue,
    FunctionValue,
    LocalValue,
    StructValue,
)
from tff_amqp.errors import InvocationTimeoutError, QuorumError, SiloError
from tff_amqp.transport.bulk import TransferError

if TYPE_CHECKING:
    from tff_amqp.coordinator.stateful.link import CoordinatorLink
    from tff_amqp.coordinator.stateful.runtime import CoordinatorRuntime
    from tff_amqp.tff_worker import WorkerExecutor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientAssignment:
    """How an invocation's clients map to silos: explicit client lists are
    split into contiguous chunks; `None` means silos use their own data."""

    chunks: dict[str, tuple[int, int]] | None

    def size(self, silo: str) -> int | None:
        if self.chunks is None:
            return None
        start, stop = self.chunks[silo]
        return stop - start


class Invocation:
    """State of one invocation across the coordinator and its cohort."""

    def __init__(self, runtime: CoordinatorRuntime, clients: int | None) -> None:
        self.runtime = runtime
        self.id = uuid.uuid4().hex
        self.sender = runtime.options.coordinator_name
        self.started = time.monotonic()
        self.deadline_epoch = time.time() + runtime.options.deadline
        self._deadline_monotonic = self.started + runtime.options.deadline
        self._clients = clients
        self._ids = itertools.count(1)
        self._cohort: list[str] | None = None
        # Answers an aggregation phase needs (set with the cohort).
        self.quorum = runtime.options.min_silos
        self._cohort_lock = asyncio.Lock()
        self._assignment = ClientAssignment(None)
        self._outboxes: dict[str, SiloOutbox] = {}
        self._local: WorkerExecutor | None = None
        self._local_lock = asyncio.Lock()
        # (id(value), place) -> materialized id/ref; values kept alive in _pins
        self._silo_cache: dict[tuple[int, str], asyncio.Future[int]] = {}
        self._local_cache: dict[int, asyncio.Future[Any]] = {}
        self._computed: dict[int, asyncio.Future[executor_pb2.Value]] = {}
        self._serialized: dict[int, asyncio.Future[bytes]] = {}
        # (key, silos) -> chunked transfer of a large value, published once
        # for all those silos (the broker fans it out)
        self._uploads: dict[tuple[object, tuple[str, ...]], asyncio.Future[p.BlobRef]] = {}
        self._pins: list[object] = []
        self._local_refs: list[Any] = []
        self.dropped: set[str] = set()
        self.closed = False
        # Silos whose replies are being awaited right now (for deadline errors).
        self._awaiting: dict[str, int] = {}
        self._interrupted: set[str] = set()
        self.events = runtime.events
        self.events.invocation_started(self.id)

    @property
    def link(self) -> CoordinatorLink:
        return self.runtime.link

    # ------------------------------------------------------------------ time

    def remaining(self) -> float:
        return self._deadline_monotonic - time.monotonic()

    def waiting_on(self) -> list[str]:
        """Silos whose replies this invocation is waiting for (or was, when
        its wait was cancelled)."""
        waiting = {silo for silo, count in self._awaiting.items() if count > 0}
        return sorted(waiting | self._interrupted)

    def describe_wait(self) -> str:
        """Where the invocation stands, for an error raised at its deadline."""
        silos = self.waiting_on()
        if silos:
            names = ", ".join(repr(s) for s in silos)
            return (
                f"invocation {self.id[:8]} was waiting for silo(s) {names} "
                "(a request left unread in a silo's queue expires at the deadline and is "
                "dead-lettered back, never run late)"
            )
        if self._cohort is None:
            return f"invocation {self.id[:8]} had not formed its cohort yet"
        return f"invocation {self.id[:8]} was working at the coordinator (no silo reply pending)"

    async def wait_for_silo(self, silo: str, future: asyncio.Future[p.Result]) -> p.Result:
        """Wait for a silo's reply, bounded by the deadline, failing at once if
        the silo's heartbeats lapse."""
        self._awaiting[silo] = self._awaiting.get(silo, 0) + 1
        try:
            return await self._wait_for_silo(silo, future)
        except asyncio.CancelledError:
            # Cancelled at the deadline: remember whom we were waiting for.
            self._interrupted.add(silo)
            raise
        finally:
            self._awaiting[silo] -= 1

    async def _wait_for_silo(self, silo: str, future: asyncio.Future[p.Result]) -> p.Result:
        membership = self.runtime.membership
        while True:
            remaining = self.remaining()
            if remaining <= 0:
                raise InvocationTimeoutError(
                    f"invocation {self.id[:8]} passed its deadline of "
                    f"{self.runtime.options.deadline:.1f} s waiting for silo {silo!r}"
                )
            done, _ = await asyncio.wait({future}, timeout=min(remaining, 0.5))
            if done:
                if future.cancelled() and silo in self.dropped:
                    raise SiloError(
                        silo, "dropped", f"silo {silo!r} was dropped from invocation {self.id[:8]}"
                    )
                return future.result()
            if not membership.is_live(silo):
                record = membership.record(silo)
                ago = time.monotonic() - record.last_seen if record else float("nan")
                raise SiloError(
                    silo,
                    "lost",
                    f"silo {silo!r} stopped sending heartbeats (last seen {ago:.1f} s ago) while "
                    f"invocation {self.id[:8]} waited for it",
                )

    # ---------------------------------------------------------------- cohort

    async def cohort(self) -> list[str]:
        """The silos of this invocation, chosen once (bounded wait)."""
        async with self._cohort_lock:
            if self._cohort is None:
                options = self.runtime.options
                timeout = min(options.cohort_timeout, max(self.remaining(), 0.0))
                waiting_since = time.monotonic()
                if self._clients == 0:
                    # No client takes part: aggregations return their zero, as in
                    # TFF's native runtime, and no silo is asked anything.
                    silos = []
                else:
                    silos = await self.runtime.membership.wait_for_cohort(
                        options.min_silos, options.max_silos, timeout
                    )
                if self._clients is not None:
                    # Explicit client lists: no silo gets an empty share.
                    silos = silos[: min(len(silos), self._clients)]
                    self._assignment = _split(self._clients, silos)
                self._cohort = silos
                # K of N counts silos that can take part: with fewer clients than
                # min_silos, every selected silo is needed, and no more.
                self.quorum = min(options.min_silos, len(silos))
                for silo in silos:
                    self._outboxes[silo] = SiloOutbox(self, silo, lambda: next(self._ids))
                log.info("invocation.cohort", extra={"invocation": self.id[:8], "silos": silos})
                self.events.cohort_chosen(self.id, silos, time.monotonic() - waiting_since)
            return self._cohort

    async def outbox(self, silo: str, *, data_key: str | None = None) -> SiloOutbox:
        await self.cohort()
        outbox = self._outboxes[silo]
        if not outbox.opened:
            outbox.open(clients=self._assignment.size(silo), data_key=data_key)
        return outbox

    # ------------------------------------------------------------ local side

    async def local(self) -> WorkerExecutor:
        """The coordinator worker's executor, shared by invocations (warm
        caches); this invocation disposes of the values it created."""
        async with self._local_lock:
            if self._local is None:
                self._local = await self.runtime.worker.client.shared_executor(0)
            return self._local

    def _owned(self, ref: Any) -> Any:
        self._local_refs.append(ref)
        return ref

    async def create_local(
        self, value: executor_pb2.Value, type_spec: computation_types.Type
    ) -> LocalValue:
        ref = self._owned(await (await self.local()).create_value(value))
        return LocalValue(self, ref, type_spec)

    async def local_call(self, fn: Any, arg: Any | None) -> Any:
        return self._owned(await (await self.local()).create_call(fn, arg))

    async def local_selection(self, source: Any, index: int) -> Any:
        return self._owned(await (await self.local()).create_selection(source, index))

    async def compute_local(self, value: LocalValue) -> object:
        proto = await self._local_proto(value)
        result, _ = value_serialization.deserialize_value(proto, value.type_signature)
        return result

    async def _local_proto(self, value: LocalValue) -> executor_pb2.Value:
        key = id(value)
        if key not in self._computed:
            self._pins.append(value)
            self._computed[key] = asyncio.ensure_future((await self.local()).compute(value.ref))
        return await self._computed[key]

    async def to_local(self, value: CoordinatorValue) -> Any:
        """A reference to `value` inside the coordinator's worker."""
        if isinstance(value, LocalValue):
            return value.ref
        if isinstance(value, ClientsValue):
            raise TypeError(
                "a CLIENTS-placed value cannot be moved to the coordinator; only federated "
                "aggregations release client data"
            )
        key = id(value)
        if key not in self._local_cache:
            self._pins.append(value)
            self._local_cache[key] = asyncio.ensure_future(self._materialize_local(value))
        return await self._local_cache[key]

    async def _materialize_local(self, value: CoordinatorValue) -> Any:
        local = await self.local()
        if isinstance(value, StructValue):
            refs = await asyncio.gather(*(self.to_local(v) for _, v in value.elements))
            return self._owned(
                await local.create_struct(
                    [(name, ref) for (name, _), ref in zip(value.elements, refs)]
                )
            )
        if isinstance(value, FunctionValue):
            proto, serialized = self.runtime.function_wire(value)
            ref, shared = await local.create_computation(serialized, proto)
            return ref if shared else self._owned(ref)
        raise TypeError(f"cannot materialize {type(value).__name__} locally")

    # ------------------------------------------------------------- silo side

    async def to_silo(self, value: CoordinatorValue, silo: str) -> int:
        """The id of `value` at `silo`, sending it there once if needed."""
        if isinstance(value, ClientsValue):
            if silo not in value.ids:
                raise SiloError(silo, "bad_reference", f"value is not present at silo {silo!r}")
            return value.ids[silo]
        key = (id(value), silo)
        if key not in self._silo_cache:
            self._pins.append(value)
            self._silo_cache[key] = asyncio.ensure_future(self._materialize_at_silo(value, silo))
        return await self._silo_cache[key]

    async def _materialize_at_silo(self, value: CoordinatorValue, silo: str) -> int:
        if isinstance(value, StructValue):
            ids = await asyncio.gather(*(self.to_silo(v, silo) for _, v in value.elements))
            outbox = await self.outbox(silo)
            return outbox.create_struct([(name, i) for (name, _), i in zip(value.elements, ids)])
        if isinstance(value, FunctionValue):
            _, serialized = self.runtime.function_wire(value)
        elif isinstance(value, LocalValue):
            # Server values are computed and serialized once, then shipped.
            serialized = await self._local_bytes(value)
        else:
            raise TypeError(f"cannot send {type(value).__name__} to a silo")
        return await self._ship(id(value), serialized, silo)

    async def _ship(
        self, key: object, serialized: bytes, silo: str, *, broadcast: bool = True
    ) -> int:
        """Create a serialized value at `silo`: inline if small, else as a
        chunked transfer. A `broadcast` value is needed by every active silo,
        so its transfer is published once for all of them (keyed by `key`)."""
        outbox = await self.outbox(silo)
        if len(serialized) <= self.runtime.bulk.inline_limit:
            return outbox.create_value(serialized)
        silos = tuple(self.active_silos()) if broadcast else (silo,)
        if silo not in silos:
            silos = (silo,)
        blob = await self._upload(key, serialized, silos)
        return outbox.create_blob_value(blob)

    async def _upload(self, key: object, data: bytes, silos: tuple[str, ...]) -> p.BlobRef:
        upload = self._uploads.get((key, silos))
        if upload is None:
            upload = asyncio.ensure_future(
                self.runtime.bulk.send(
                    data, silos, invocation_id=self.id, deadline=self.deadline_epoch
                )
            )
            self._uploads[(key, silos)] = upload
        return await upload

    async def ship_to(self, value: LocalValue, silos: Sequence[str]) -> dict[str, int]:
        """Create a server value at just these silos (its id at each); if large,
        one transfer published once for all of them."""
        serialized = await self._local_bytes(value)
        self._pins.append(value)
        ids: dict[str, int] = {}
        for silo in silos:
            outbox = await self.outbox(silo)
            if len(serialized) <= self.runtime.bulk.inline_limit:
                ids[silo] = outbox.create_value(serialized)
            else:
                blob = await self._upload(id(value), serialized, tuple(silos))
                ids[silo] = outbox.create_blob_value(blob)
        return ids

    async def receive_blob(self, silo: str, blob: p.BlobRef) -> bytearray:
        """A silo's large result, sent as a chunked transfer (bounded by the
        invocation's deadline)."""
        try:
            return await self.runtime.bulk.receive(
                silo, blob, invocation_id=self.id, timeout=self.remaining()
            )
        except TransferError as e:
            raise SiloError(silo, str(e.code), str(e)) from e

    async def _local_bytes(self, value: LocalValue) -> bytes:
        key = id(value)
        if key not in self._serialized:
            self._serialized[key] = asyncio.ensure_future(self._serialize_local(value))
        return await self._serialized[key]

    async def _serialize_local(self, value: LocalValue) -> bytes:
        key = id(value)
        if key in self._computed:  # already computed for the coordinator itself
            return (await self._computed[key]).SerializeToString()
        # Serialized by the worker, never parsed here: one copy of a large
        # value instead of a proto plus its serialization.
        data = await (await self.local()).compute_serialized(value.ref)
        return bytes(data) if len(data) <= self.runtime.bulk.inline_limit else data  # type: ignore[return-value]

    async def call_at_silos(
        self,
        fn: CoordinatorValue,
        arg: CoordinatorValue | None,
        result_type: computation_types.Type,
    ) -> ClientsValue:
        await self.cohort()
        silos = self.active_silos()

        async def at(silo: str) -> int:
            fn_id = await self.to_silo(fn, silo)
            arg_id = await self.to_silo(arg, silo) if arg is not None else None
            return (await self.outbox(silo)).create_call(fn_id, arg_id)

        ids = await asyncio.gather(*(at(s) for s in silos))
        return ClientsValue(self, dict(zip(silos, ids)), result_type)

    async def gather_from_silos(self, value: ClientsValue) -> dict[str, executor_pb2.Value]:
        """Ask every active silo to release its part of `value` (aggregates,
        normally). K of N: once the phase's cut-off has passed (see
        `phase_cutoff`) and at least `min_silos` answered, proceed without the
        others; a silo whose heartbeats lapse is dropped at once if the quorum
        still holds. Dropped silos take no further part in this invocation."""
        options = self.runtime.options
        silos = [s for s in value.ids if s not in self.dropped]
        tasks = {asyncio.ensure_future(self._release(s, value.ids[s])): s for s in silos}
        results: dict[str, executor_pb2.Value] = {}
        lost: dict[str, SiloError] = {}
        started = time.monotonic()
        quorum_at: float | None = None
        pending = set(tasks)
        self.events.gather_started(self.id, silos)
        try:
            while pending:
                if quorum_at is None and len(results) >= self.quorum:
                    quorum_at = time.monotonic()
                cutoff = phase_cutoff(
                    started, quorum_at, options.straggler_timeout, options.quorum_grace
                )
                budget: float | None = None
                if cutoff is not None:
                    left = cutoff - time.monotonic()
                    if left <= 0 and len(results) >= self.quorum:
                        break
                    budget = left if left > 0 else None
                done, pending = await asyncio.wait(
                    pending, timeout=budget, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    silo, error = tasks[task], task.exception()
                    if error is None:
                        results[silo] = task.result()
                        self.events.silo_replied(self.id, silo)
                    elif isinstance(error, SiloError) and error.code in ("lost", "dropped"):
                        lost[silo] = error
                    else:
                        raise error
                if len(results) + len(pending) < self.quorum:
                    raise QuorumError(
                        f"invocation {self.id[:8]} lost its quorum: {len(results)} silo(s) "
                        f"answered, {len(pending)} still pending, {self.quorum} needed "
                        f"(min_silos={options.min_silos}, cohort of {len(self._cohort or [])}); "
                        + "; ".join(str(e) for e in lost.values())
                    )
        finally:
            for task in pending:
                task.cancel()
        self.events.gather_finished(self.id, list(results), time.monotonic() - started)
        stragglers = [s for s in silos if s not in results]
        if stragglers:
            self.drop(stragglers, reason="lost" if set(stragglers) <= set(lost) else "straggler")
        return results

    async def _release(self, silo: str, value_id: int) -> executor_pb2.Value:
        outbox = await self.outbox(silo)
        value = executor_pb2.Value()
        # memoryview: a large reassembled buffer is parsed without a copy.
        value.ParseFromString(memoryview(await outbox.compute(value_id)))
        return value

    def active_silos(self) -> list[str]:
        return [s for s in (self._cohort or []) if s not in self.dropped]

    def drop(self, silos: Sequence[str], *, reason: str) -> None:
        """Exclude silos from the rest of this invocation and tell them to free
        its state; their late replies are discarded (and counted)."""
        silos = [s for s in silos if s not in self.dropped]
        if not silos:
            return
        self.events.silos_dropped(self.id, silos, reason)
        for silo in silos:
            self.dropped.add(silo)
            self.link.forget_silo(self.id, silo)
            outbox = self._outboxes.get(silo)
            if outbox is not None:
                self.runtime.in_background(outbox.close())
        log.warning(
            "invocation.dropped_silos",
            extra={
                "invocation": self.id[:8],
                "silos": list(silos),
                "reason": reason,
                "remaining": self.active_silos(),
            },
        )

    async def create_clients_value(
        self, value: object, type_spec: computation_types.FederatedType
    ) -> ClientsValue:
        silos = await self.cohort()
        if type_spec.all_equal:
            # One value for every silo: serialized once, shipped once.
            serialized = await asyncio.to_thread(_serialize, value, type_spec)
            key = object()
            ids = {silo: await self._ship(key, serialized, silo) for silo in silos}
            return ClientsValue(self, ids, type_spec)

        async def part_for(silo: str) -> bytes:
            if not isinstance(value, list | tuple):
                raise TypeError(
                    f"a CLIENTS-placed argument must be a list of client values or "
                    f"tff_amqp.silo_data(KEY); got {type(value).__name__}"
                )
            chunk = self._assignment.chunks
            if chunk is None:
                raise ValueError("client lists need a known CLIENTS cardinality")
            start, stop = chunk[silo]
            part = list(value[start:stop])
            return await asyncio.to_thread(_serialize, part, type_spec)

        parts = await asyncio.gather(*(part_for(silo) for silo in silos))
        ids: dict[str, int] = {}
        for silo, serialized in zip(silos, parts):
            # Each silo's part is its own (unicast) transfer if large.
            ids[silo] = await self._ship(object(), serialized, silo, broadcast=False)
        return ClientsValue(self, ids, type_spec)

    async def create_silo_data(
        self, key: str, type_spec: computation_types.FederatedType
    ) -> ClientsValue:
        if type_spec.placement is not placements.CLIENTS or type_spec.all_equal:
            raise TypeError(
                f"tff_amqp.silo_data({key!r}) stands for per-client data and must be passed "
                f"where a CLIENTS-placed (not all-equal) value is expected, not {type_spec}"
            )
        silos = await self.cohort()
        type_bytes = type_serialization.serialize_type(type_spec).SerializeToString()
        ids = {}
        for silo in silos:
            outbox = await self.outbox(silo, data_key=key)
            ids[silo] = outbox.create_data(key, type_bytes)
        return ClientsValue(self, ids, type_spec)

    async def release_clients_value(self, value: ClientsValue) -> object:
        """Compute a CLIENTS value at the coordinator: each silo must agree to
        release it (by default, silos refuse raw client values)."""
        parts = await self.gather_from_silos(value)
        type_spec = value.type_signature
        assert isinstance(type_spec, computation_types.FederatedType)
        members: list[object] = []
        for silo in value.ids:
            if silo not in parts:
                continue
            result, _ = value_serialization.deserialize_value(parts[silo], type_spec)
            if type_spec.all_equal:
                return result
            members.extend(result)  # type: ignore[arg-type]
        return members

    # ---------------------------------------------------------------- ending

    async def close(self) -> None:
        """Free the invocation's state everywhere. Bounded, never raises."""
        if self.closed:
            return
        self.closed = True

        async def close_outbox(outbox: SiloOutbox) -> None:
            try:
                await asyncio.wait_for(outbox.close(), 5.0)
            except Exception:
                log.debug("closing silo outbox failed", exc_info=True)

        await asyncio.gather(*(close_outbox(o) for o in self._outboxes.values()))
        self.link.forget_invocation(self.id)
        self.runtime.bulk.forget_invocation(self.id)
        for future in [
            *self._uploads.values(),
            *self._silo_cache.values(),
            *self._local_cache.values(),
            *self._computed.values(),
            *self._serialized.values(),
        ]:
            if not future.done():
                future.cancel()
        if self._local is not None and self._local_refs:
            try:
                await asyncio.wait_for(self._local.dispose(self._local_refs), 5.0)
            except Exception:
                log.debug("disposing local values failed", exc_info=True)
            self._local_refs.clear()
        self._pins.clear()


def _split(clients: int, silos: Sequence[str]) -> ClientAssignment:
    if not silos:
        return ClientAssignment({})
    base, extra = divmod(clients, len(silos))
    chunks, start = {}, 0
    for i, silo in enumerate(silos):
        stop = start + base + (1 if i < extra else 0)
        chunks[silo] = (start, stop)
        start = stop
    return ClientAssignment(chunks)


def _serialize(value: object, type_spec: computation_types.Type) -> bytes:
    proto, _ = value_serialization.serialize_value(value, type_spec)
    return proto.SerializeToString()


def function_proto(value: FunctionValue) -> executor_pb2.Value:
    bb = value.building_block
    if isinstance(bb, building_blocks.Lambda | building_blocks.Block) and not value.scope.is_empty:
        free = _free_references(bb)
        if free:
            raise NotImplementedError(
                f"cannot ship a function that closes over {sorted(free)}; tff-amqp sends only "
                "closed functions (the native compiler produces these)"
            )
    return executor_pb2.Value(computation=bb.proto)


def _free_references(bb: building_blocks.ComputationBuildingBlock) -> set[str]:
    from tensorflow_federated.python.core.impl.compiler import transformation_utils

    return set(transformation_utils.get_map_of_unbound_references(bb)[bb])
