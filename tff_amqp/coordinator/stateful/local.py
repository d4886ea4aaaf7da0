"""The coordinator's side of one invocation: a facade over the coordinator's
TFF worker (`tff_worker.WorkerExecutor`, shared by invocations so its caches
stay warm) that records every value this invocation creates there, so that
closing the invocation disposes of exactly those.

Calls, structs and selections are deferred: each is recorded as a protocol
operation and named by an integer id at once. When a value is needed for
real (computed, serialized for the silos), everything recorded so far runs
as one phase plan (tff_worker/plan.py, as a silo runs a batch): one worker
call for the SERVER part of a phase instead of one per operation. Values the
plan created are members of its result, selected only when needed."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tensorflow_federated.proto.v0 import executor_pb2

from tff_amqp import protocol as p
from tff_amqp.coordinator.stateful import values
from tff_amqp.inprocess import value_wire
from tff_amqp.tff_worker import WorkerError
from tff_amqp.tff_worker.plan import PlanCache, PlannedBatch, call_plan, resolver

if TYPE_CHECKING:
    from tff_amqp.coordinator.stateful.runtime import CoordinatorRuntime
    from tff_amqp.tff_worker import WorkerExecutor

log = logging.getLogger(__name__)

# Plans depend only on the shape of what was recorded (the same phase of the
# same computation has the same shape every round): shared by invocations.
_PLANS = PlanCache()

# Below this many bytes a value is serialized on the event loop: a thread hop
# costs more than the work (measured ~0.1 ms inline against ~0.9 ms in a thread).
INLINE_SERIALIZE_BYTES = 64 * 1024


async def serialize_host(value: object, type_spec: Any) -> bytes:
    """A host value serialized as a TFF `Value`: inline when small, in a
    thread when large (the event loop keeps serving heartbeats)."""
    return (await serialize_typed(value, type_spec))[0]


async def serialize_typed(value: object, type_spec: Any) -> tuple[bytes, Any]:
    """`serialize_host`, with the type TFF serialized the value as."""

    def serialize() -> tuple[bytes, Any]:
        # Large tensors are copied once, straight into the bytes (value_wire).
        return value_wire.serialize(value, type_spec)

    if host_nbytes(value) <= INLINE_SERIALIZE_BYTES:
        return serialize()
    return await asyncio.to_thread(serialize)


def _deserialize(data: bytes, type_spec: Any) -> object:
    proto = executor_pb2.Value()
    proto.ParseFromString(memoryview(data))
    return value_wire.deserialize(proto, type_spec)


def host_nbytes(value: object) -> int:
    """About how many bytes a Python value holds (its arrays' sizes; an
    unknown object counts as large, so it is serialized in a thread)."""
    import numpy as np
    from tensorflow_federated.python.common_libs import structure

    if isinstance(value, structure.Struct):
        return sum(host_nbytes(v) for v in structure.flatten(value))
    if isinstance(value, dict):
        return sum(host_nbytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(host_nbytes(v) for v in value)
    if isinstance(value, np.ndarray | np.generic):
        return int(value.nbytes)
    if isinstance(value, bool | int | float | complex | str | bytes):
        return 8 if not isinstance(value, str | bytes) else len(value)
    return INLINE_SERIALIZE_BYTES + 1


@dataclass
class _PlanCall:
    """One plan's call: its result holds every value the plan created."""

    key: int
    operations: int
    result: asyncio.Future[Any]


class LocalExecutor:
    """SERVER-placed and unplaced values of one invocation, in the
    coordinator's TFF worker. Hands out value ids (the invocation wraps them
    in values); a value exists in the worker only once something needs it."""

    def __init__(self, runtime: CoordinatorRuntime) -> None:
        self._runtime = runtime
        self._executor: WorkerExecutor | None = None
        self._lock = asyncio.Lock()
        self._ids = itertools.count()
        # id -> its worker reference, once it has one.
        self._refs: dict[int, asyncio.Future[Any]] = {}
        # Functions by id: (digest, serialized Value); inlined in plans, and
        # embedded (shared, by digest) only if an operation outside a plan
        # uses one. Their protos by digest, to build plans from.
        self._functions: dict[int, tuple[bytes, bytes]] = {}
        self._function_protos: dict[bytes, executor_pb2.Value] = {}
        # Operations recorded and not yet run (the next plan).
        self._pending: list[p.Operation] = []
        self._pending_ids: set[int] = set()
        # Values created by a plan: id -> (its call, index in the result).
        self._members: dict[int, tuple[_PlanCall, int]] = {}
        self._plan_calls: dict[int, _PlanCall] = {}
        # id(value) -> its local id / computed proto / serialized bytes; the
        # values are kept alive in _pins so their ids cannot be reused.
        self._local_ids: dict[int, asyncio.Future[int]] = {}
        self._computed: dict[int, asyncio.Future[executor_pb2.Value]] = {}
        self._serialized: dict[int, asyncio.Future[bytes]] = {}
        self._pins: list[object] = []
        self._owned_refs: list[Any] = []

    async def executor(self) -> WorkerExecutor:
        """The coordinator worker's executor, shared by invocations (warm
        caches); this invocation disposes of the values it created."""
        async with self._lock:
            if self._executor is None:
                self._executor = await self._runtime.worker.client.shared_executor(0)
            return self._executor

    def _owned(self, ref: Any) -> Any:
        self._owned_refs.append(ref)
        return ref

    # ------------------------------------------------------------ recording

    async def create_value(self, value: executor_pb2.Value) -> int:
        """An argument value, created in the worker now (its errors surface here)."""

        async def create() -> Any:
            return self._owned(await (await self.executor()).create_value(value))

        return await self._created(create)

    async def create_call(self, fn: int, arg: int | None) -> int:
        return self._record(p.CreateCall(target=next(self._ids), fn=fn, arg=arg))

    async def create_selection(self, source: int, index: int) -> int:
        return self._record(p.CreateSelection(target=next(self._ids), source=source, index=index))

    async def create_struct(self, elements: Sequence[tuple[str | None, int]]) -> int:
        return self._record(p.CreateStruct(target=next(self._ids), elements=tuple(elements)))

    def _record(self, op: p.CreateCall | p.CreateStruct | p.CreateSelection) -> int:
        self._pending.append(op)
        self._pending_ids.add(op.target)
        return op.target

    async def _created(self, create: Any) -> int:
        value_id = next(self._ids)
        future = asyncio.ensure_future(create())
        future.add_done_callback(_retrieve)
        self._refs[value_id] = future
        await future
        return value_id

    def _function(self, value: values.FunctionValue) -> int:
        proto, serialized = self._runtime.function_wire(value)
        digest = hashlib.sha256(serialized).digest()
        value_id = next(self._ids)
        self._functions[value_id] = (digest, serialized)
        self._function_protos[digest] = proto
        return value_id

    # ------------------------------------------------------------- running

    def _ref(self, value_id: int) -> asyncio.Future[Any]:
        """The worker reference of a value id: runs what is recorded if the
        value is among it; a plan's member or a function becomes a worker
        value of its own only here, when something needs it as one."""
        future = self._refs.get(value_id)
        if future is not None:
            return future
        if value_id in self._pending_ids:
            self._flush()
            future = self._refs.get(value_id)
            if future is not None:
                return future
        member = self._members.get(value_id)
        function = self._functions.get(value_id)
        if member is not None:
            future = asyncio.ensure_future(self._select(*member))
        elif function is not None:
            future = asyncio.ensure_future(self._embed(*function))
        else:
            raise KeyError(f"the coordinator's worker holds no value {value_id}")
        future.add_done_callback(_retrieve)
        self._refs[value_id] = future
        return future

    def _flush(self) -> None:
        """Run everything recorded: one plan, or op by op below two
        operations (a plan would add a worker call, not save one).

        Flushes never interleave: this runs without yielding to the event
        loop from taking the recorded operations to registering where each
        of their values will be, so whatever is recorded meanwhile (by tasks
        that run while the plan is in flight) goes into the next flush."""
        operations, self._pending = self._pending, []
        self._pending_ids.clear()
        if len(operations) < 2:
            for op in operations:
                future = asyncio.ensure_future(self._run(op))
                future.add_done_callback(_retrieve)
                self._refs[op.target] = future  # type: ignore[attr-defined]
            return
        plan = _PLANS.plan(
            operations,
            resolver(self._functions, self._members, self._ref),
            self._computation_of,
        )
        inputs = [
            self._plan_calls[source[1]].result if isinstance(source, tuple) else self._ref(source)  # type: ignore[arg-type]
            for source in plan.inputs
        ]
        key = next(self._ids)
        result = asyncio.ensure_future(self._call_plan(plan, inputs, len(operations)))
        result.add_done_callback(_retrieve)
        call = _PlanCall(key=key, operations=len(operations), result=result)
        self._plan_calls[key] = call
        for target, index in plan.outputs.items():
            self._members[target] = (call, index)
        log.debug("coordinator.plan", extra={"operations": len(operations), "plans": _PLANS.built})

    def _computation_of(self, digest: bytes) -> Any:
        return self._function_protos[digest].computation

    async def _call_plan(
        self, plan: PlannedBatch, inputs: list[asyncio.Future[Any]], operations: int
    ) -> Any:
        executor = await self.executor()
        owned: list[Any] = []
        try:
            return self._owned(await call_plan(executor, plan, inputs, owned))
        except WorkerError as e:
            raise WorkerError(
                f"coordinator, phase plan of {operations} operations: {e}", e.status
            ) from e
        finally:
            self._owned_refs.extend(owned)

    async def _run(self, op: p.Operation) -> Any:
        """One recorded operation, on its own."""
        executor = await self.executor()
        match op:
            case p.CreateCall():
                fn = self._ref(op.fn)
                arg = self._ref(op.arg) if op.arg is not None else None
                ref = await executor.create_call(await fn, await arg if arg is not None else None)
            case p.CreateStruct():
                elements = [(name, self._ref(ref)) for name, ref in op.elements]
                ref = await executor.create_struct([(name, await e) for name, e in elements])
            case p.CreateSelection():
                ref = await executor.create_selection(await self._ref(op.source), op.index)
            case _:
                raise TypeError(f"cannot run {op!r} locally")
        return self._owned(ref)

    async def _select(self, call: _PlanCall, index: int) -> Any:
        executor = await self.executor()
        return self._owned(await executor.create_selection(await call.result, index))

    async def _embed(self, digest: bytes, serialized: bytes) -> Any:
        executor = await self.executor()
        ref, shared = await executor.create_computation(
            serialized, self._function_protos[digest], digest=digest
        )
        return ref if shared else self._owned(ref)

    # --------------------------------------------------------------- values

    async def compute(self, value: values.LocalValue) -> object:
        proto = await self._proto(value)
        return value_wire.deserialize(proto, value.type_signature)

    async def compute_serialized_value(self, value: values.SerializedValue) -> object:
        """A value held serialized, as TFF's runtime would return it (parsed
        here: a worker round trip would only copy it twice more)."""
        if len(value.serialized) <= INLINE_SERIALIZE_BYTES:
            return _deserialize(value.serialized, value.type_signature)
        return await asyncio.to_thread(_deserialize, value.serialized, value.type_signature)

    async def _proto(self, value: values.LocalValue) -> executor_pb2.Value:
        key = id(value)
        if key not in self._computed:
            self._pins.append(value)
            ref = self._ref(value.ref)

            async def compute() -> executor_pb2.Value:
                return await (await self.executor()).compute(await ref)

            self._computed[key] = asyncio.ensure_future(compute())
        return await self._computed[key]

    async def to_local(self, value: values.CoordinatorValue) -> int:
        """The id of `value` inside the coordinator's worker."""
        if isinstance(value, values.LocalValue):
            return value.ref  # type: ignore[no-any-return]
        if isinstance(value, values.ClientsValue):
            raise TypeError(
                "a CLIENTS-placed value cannot be moved to the coordinator; only federated "
                "aggregations release client data"
            )
        key = id(value)
        if key not in self._local_ids:
            self._pins.append(value)
            self._local_ids[key] = asyncio.ensure_future(self._materialize(value))
        return await self._local_ids[key]

    async def _materialize(self, value: values.CoordinatorValue) -> int:
        if isinstance(value, values.StructValue):
            ids = await asyncio.gather(*(self.to_local(v) for _, v in value.elements))
            return await self.create_struct(
                [(name, i) for (name, _), i in zip(value.elements, ids)]
            )
        if isinstance(value, values.FunctionValue):
            return self._function(value)
        if isinstance(value, values.HostValue | values.SerializedValue):

            async def create() -> Any:
                serialized = await self.serialized(value)  # type: ignore[arg-type]
                executor = await self.executor()
                return self._owned(await executor.create_value_serialized(serialized))

            return await self._created(create)
        raise TypeError(f"cannot materialize {type(value).__name__} locally")

    def serialized_now(
        self, value: values.LocalValue | values.HostValue | values.SerializedValue
    ) -> bytes | None:
        """`serialized(value)` if it is already at hand (None: await it)."""
        if isinstance(value, values.SerializedValue):
            return value.serialized
        key = id(value)
        future = self._serialized.get(key)
        if future is None and isinstance(value, values.HostValue):
            # A small host value (a constant) is serialized here and now.
            if host_nbytes(value.value) > INLINE_SERIALIZE_BYTES:
                return None
            serialized = value_wire.serialize(value.value, value.type_signature)[0]
            self._pins.append(value)
            future = asyncio.get_running_loop().create_future()
            future.set_result(serialized)
            self._serialized[key] = future
        if future is None or not future.done() or future.cancelled() or future.exception():
            return None
        return future.result()

    async def serialized(
        self, value: values.LocalValue | values.HostValue | values.SerializedValue
    ) -> bytes:
        """`value` serialized for shipping to silos (computed once)."""
        if isinstance(value, values.SerializedValue):
            return value.serialized
        key = id(value)
        if key not in self._serialized:
            self._pins.append(value)
            self._serialized[key] = asyncio.ensure_future(self._serialize(value))
        return await self._serialized[key]

    async def _serialize(self, value: values.LocalValue | values.HostValue) -> bytes:
        if isinstance(value, values.HostValue):
            return await serialize_host(value.value, value.type_signature)
        key = id(value)
        if key in self._computed:  # already computed for the coordinator itself
            return (await self._computed[key]).SerializeToString()
        # Serialized by the worker, never parsed here: one copy of a large
        # value instead of a proto plus its serialization.
        ref = self._ref(value.ref)
        data = await (await self.executor()).compute_serialized(await ref)
        return bytes(data) if len(data) <= self._runtime.bulk.inline_limit else data  # type: ignore[return-value]

    def cancel(self) -> None:
        """Stop work still in flight (the invocation is closing)."""
        self._pending.clear()
        self._pending_ids.clear()
        for future in [
            *self._refs.values(),
            *(call.result for call in self._plan_calls.values()),
            *self._local_ids.values(),
            *self._computed.values(),
            *self._serialized.values(),
        ]:
            if not future.done():
                future.cancel()

    async def dispose(self, timeout: float = 5.0) -> None:
        """Free this invocation's values in the worker (bounded, never raises):
        argument values, plan results, selections, inputs' structs; not the
        computations the executor caches for every invocation."""
        if self._executor is not None and self._owned_refs:
            try:
                await asyncio.wait_for(self._executor.dispose(self._owned_refs), timeout)
            except Exception:
                log.debug("disposing local values failed", exc_info=True)
            self._owned_refs.clear()
        self._pending.clear()
        self._pending_ids.clear()
        self._members.clear()
        self._plan_calls.clear()
        self._pins.clear()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: whoever awaits it reports it
