"""Async gRPC client of TFF's executor service (`ExecutorGroup`).

TFF's own stub is synchronous and blocks the event loop when called from
`async def`; this one uses `grpc.aio`, so silos and invocations run side by
side.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
from collections.abc import Callable, Sequence

import grpc
from tensorflow_federated.proto.v0 import executor_pb2, executor_pb2_grpc

_MAX_BYTES = 2 * 1000 * 1000 * 1000
GRPC_OPTIONS = [
    ("grpc.max_message_length", _MAX_BYTES),
    ("grpc.max_receive_message_length", _MAX_BYTES),
    ("grpc.max_send_message_length", _MAX_BYTES),
]


_SERVICE = "/tensorflow_federated.v0.ExecutorGroup"
# Field numbers: CreateValueRequest.value = 1, ComputeResponse.value = 1,
# Value.computation = 2, Value.struct = 3, Struct.element = 1,
# Struct.Element.value = 2 (checked against executor_pb2's descriptors in tests).
_VALUE_FIELD_TAG = 0x0A
_COMPUTATION_FIELD = 2
_STRUCT_FIELD_TAG = 3 << 3 | 2
_ELEMENT_FIELD_TAG = 1 << 3 | 2
_ELEMENT_VALUE_FIELD = 2


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise ValueError("truncated varint")


def serialized_is_computation(value: bytes | bytearray | memoryview) -> bool:
    """Whether a serialized `Value` holds a computation (its one field is the
    first tag), without parsing it."""
    view = memoryview(value)
    if not len(view):
        return False
    tag, _ = _read_varint(view, 0)
    return tag >> 3 == _COMPUTATION_FIELD


def _value_of_response(raw: bytes) -> memoryview:
    """The serialized `Value` inside a serialized `ComputeResponse`, as a view
    (no copy, no parse)."""
    view = memoryview(raw)
    if not len(view) or view[0] != _VALUE_FIELD_TAG:
        raise ValueError("ComputeResponse does not start with its value field")
    length, start = _read_varint(view, 1)
    if start + length != len(view):
        raise ValueError("ComputeResponse has fields besides its value")
    return view[start:]


def struct_members(value: bytes | memoryview) -> list[memoryview]:
    """The serialized member `Value`s of a serialized struct `Value`, as views
    (no copy, no parse); ValueError if it is not laid out as one."""
    view = memoryview(value)
    if not len(view):
        return []  # an empty Value: no members
    tag, pos = _read_varint(view, 0)
    if tag != _STRUCT_FIELD_TAG:
        raise ValueError("the Value is not a struct")
    length, pos = _read_varint(view, pos)
    if pos + length != len(view):
        raise ValueError("the Value has fields besides its struct")
    members: list[memoryview] = []
    while pos < len(view):
        tag, pos = _read_varint(view, pos)
        length, pos = _read_varint(view, pos)
        if tag != _ELEMENT_FIELD_TAG or pos + length > len(view):
            raise ValueError("unexpected field in a struct Value")
        end, member = pos + length, view[0:0]
        while pos < end:
            tag, pos = _read_varint(view, pos)
            length, pos = _read_varint(view, pos)
            if tag & 7 != 2 or pos + length > end:
                raise ValueError("unexpected field in a struct element")
            if tag >> 3 == _ELEMENT_VALUE_FIELD:
                member = view[pos : pos + length]
            pos += length
        members.append(member)
    return members


def struct_value(members: Sequence[bytes | memoryview]) -> bytes:
    """A serialized struct `Value` of serialized member `Value`s (unnamed),
    composed without parsing them."""
    out = bytearray()
    for member in members:
        element = len(member)
        element_head = bytes([_ELEMENT_VALUE_FIELD << 3 | 2]) + _varint(element)
        out += bytes([_ELEMENT_FIELD_TAG]) + _varint(len(element_head) + element)
        out += element_head
        out += member
    return bytes([_STRUCT_FIELD_TAG]) + _varint(len(out)) + bytes(out)


class WorkerError(RuntimeError):
    """A worker_binary call failed; the message keeps TFF's own error text,
    `status` the gRPC status name when the worker answered with one."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status


async def _call(operation: str, coro: object) -> object:
    try:
        return await coro  # type: ignore[misc]
    except grpc.aio.AioRpcError as e:
        raise WorkerError(
            f"worker {operation} failed ({e.code().name}): {e.details()}", e.code().name
        ) from None


class WorkerClient:
    """Entry point: executors inside the worker, one per CLIENTS cardinality.

    `calls` counts the gRPC calls made through this client and its executors,
    by method name (what an invocation costs in worker round trips; reported
    by silos in their status and by the benchmarks)."""

    # Pinned executors keep TensorFlow's per-executor caches and our cached
    # computations warm across invocations; bounded so odd cardinalities
    # cannot pile up.
    MAX_PINNED = 16

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = executor_pb2_grpc.ExecutorGroupStub(channel)
        self._channel = channel
        self._pinned: dict[int | None, WorkerExecutor] = {}
        self.calls: collections.Counter[str] = collections.Counter()

    async def shared_executor(self, clients: int | None) -> WorkerExecutor:
        """The executor for this cardinality, kept alive for reuse. Callers
        dispose of their own values and never close it."""
        executor = self._pinned.get(clients)
        if executor is None:
            executor = await self.get_executor(clients)
            if len(self._pinned) < self.MAX_PINNED:
                executor.pinned = True
                self._pinned.setdefault(clients, executor)
                executor = self._pinned[clients]
        return executor

    async def get_executor(self, clients: int | None) -> WorkerExecutor:
        from tensorflow_federated.python.core.impl.executors import value_serialization
        from tensorflow_federated.python.core.impl.types import placements

        cardinalities = {} if clients is None else {placements.CLIENTS: clients}
        request = executor_pb2.GetExecutorRequest(
            cardinalities=value_serialization.serialize_cardinalities(cardinalities)
        )
        self.calls["GetExecutor"] += 1
        response = await _call("GetExecutor", self._stub.GetExecutor(request))
        return WorkerExecutor(
            self._stub,
            response.executor,  # type: ignore[attr-defined]
            channel=self._channel,
            calls=self.calls,
        )


class WorkerExecutor:
    """One executor inside the worker (values of one CLIENTS cardinality)."""

    MAX_CACHED_COMPUTATIONS = 4096

    def __init__(
        self,
        stub: executor_pb2_grpc.ExecutorGroupStub,
        executor: executor_pb2.ExecutorId,
        *,
        channel: grpc.aio.Channel | None = None,
        calls: collections.Counter[str] | None = None,
    ) -> None:
        self._stub = stub
        self.calls: collections.Counter[str] = calls if calls is not None else collections.Counter()
        # Raw calls (serialized values passed through) for large values:
        # parsing or serializing 200 MB of protobuf holds the GIL ~0.5 s.
        self._create_raw = (
            channel.unary_unary(
                f"{_SERVICE}/CreateValue",
                request_serializer=None,
                response_deserializer=executor_pb2.CreateValueResponse.FromString,
            )
            if channel is not None
            else None
        )
        self._compute_raw = (
            channel.unary_unary(
                f"{_SERVICE}/Compute",
                request_serializer=executor_pb2.ComputeRequest.SerializeToString,
                response_deserializer=None,
            )
            if channel is not None
            else None
        )
        self.executor = executor
        self.closed = False
        self.pinned = False
        self._computations: dict[bytes, asyncio.Future[executor_pb2.ValueRef]] = {}
        # Disposals requested while one is in flight wait for it, then go
        # together in one call (the sessions of concurrent invocations end
        # together: their closes ride one batch).
        self._disposing = False
        self._disposals: list[tuple[list[executor_pb2.ValueRef], asyncio.Future[None]]] = []
        self._dispose_tasks: set[asyncio.Task[None]] = set()

    async def create_computation(
        self,
        serialized: bytes,
        value: executor_pb2.Value | Callable[[], executor_pb2.Value],
        *,
        digest: bytes | None = None,
    ) -> tuple[executor_pb2.ValueRef, bool]:
        """Embed a computation, reusing an identical one already embedded in
        this pinned executor (the same functions arrive every round). Returns
        (ref, cached); the caller must not dispose a cached ref. `value` may
        be a function that parses it, called only on a miss; `digest`, the
        SHA-256 of `serialized` if the caller has it."""
        key = digest or hashlib.sha256(serialized).digest()
        future = self._computations.get(key)
        if future is None:
            parsed = value() if callable(value) else value
            if not self.pinned or len(self._computations) >= self.MAX_CACHED_COMPUTATIONS:
                return await self.create_value(parsed), False
            future = asyncio.ensure_future(self.create_value(parsed))
            self._computations[key] = future
        try:
            return await asyncio.shield(future), True
        except WorkerError:
            self._computations.pop(key, None)
            raise

    async def create_value(self, value: executor_pb2.Value) -> executor_pb2.ValueRef:
        request = executor_pb2.CreateValueRequest(executor=self.executor, value=value)
        self.calls["CreateValue"] += 1
        response = await _call("CreateValue", self._stub.CreateValue(request))
        return response.value_ref  # type: ignore[attr-defined]

    async def create_value_serialized(
        self, value: bytes | bytearray | memoryview
    ) -> executor_pb2.ValueRef:
        """CreateValue from a serialized `Value`, passed through unparsed."""
        if self._create_raw is None:
            parsed = executor_pb2.Value()
            parsed.ParseFromString(memoryview(value))
            return await self.create_value(parsed)
        head = executor_pb2.CreateValueRequest(executor=self.executor).SerializeToString()
        request = b"".join((head, bytes([_VALUE_FIELD_TAG]), _varint(len(value)), value))
        self.calls["CreateValue"] += 1
        response = await _call("CreateValue", self._create_raw(request))
        return response.value_ref  # type: ignore[attr-defined]

    async def compute_serialized(self, ref: executor_pb2.ValueRef) -> bytes | memoryview:
        """Compute, returning the serialized `Value` without parsing it."""
        if self._compute_raw is None:
            return (await self.compute(ref)).SerializeToString()
        request = executor_pb2.ComputeRequest(executor=self.executor, value_ref=ref)
        self.calls["Compute"] += 1
        raw = await _call("Compute", self._compute_raw(request))
        try:
            return _value_of_response(raw)  # type: ignore[arg-type]
        except ValueError:
            # Unexpected layout: let protobuf handle it.
            return executor_pb2.ComputeResponse.FromString(raw).value.SerializeToString()  # type: ignore[arg-type]

    async def create_call(
        self, fn: executor_pb2.ValueRef, arg: executor_pb2.ValueRef | None = None
    ) -> executor_pb2.ValueRef:
        request = executor_pb2.CreateCallRequest(
            executor=self.executor, function_ref=fn, argument_ref=arg
        )
        self.calls["CreateCall"] += 1
        response = await _call("CreateCall", self._stub.CreateCall(request))
        return response.value_ref  # type: ignore[attr-defined]

    async def create_struct(
        self, elements: Sequence[tuple[str | None, executor_pb2.ValueRef]]
    ) -> executor_pb2.ValueRef:
        request = executor_pb2.CreateStructRequest(
            executor=self.executor,
            element=[
                executor_pb2.CreateStructRequest.Element(name=name or None, value_ref=ref)
                for name, ref in elements
            ],
        )
        self.calls["CreateStruct"] += 1
        response = await _call("CreateStruct", self._stub.CreateStruct(request))
        return response.value_ref  # type: ignore[attr-defined]

    async def create_selection(
        self, source: executor_pb2.ValueRef, index: int
    ) -> executor_pb2.ValueRef:
        request = executor_pb2.CreateSelectionRequest(
            executor=self.executor, source_ref=source, index=index
        )
        self.calls["CreateSelection"] += 1
        response = await _call("CreateSelection", self._stub.CreateSelection(request))
        return response.value_ref  # type: ignore[attr-defined]

    async def compute(self, ref: executor_pb2.ValueRef) -> executor_pb2.Value:
        request = executor_pb2.ComputeRequest(executor=self.executor, value_ref=ref)
        self.calls["Compute"] += 1
        response = await _call("Compute", self._stub.Compute(request))
        return response.value  # type: ignore[attr-defined]

    async def dispose(self, refs: Sequence[executor_pb2.ValueRef]) -> None:
        """Free `refs` in the worker. While another disposal is in flight this
        waits for it and then goes in one call with the others that waited."""
        if not refs:
            return
        if self._disposing:
            done = asyncio.get_running_loop().create_future()
            self._disposals.append((list(refs), done))
            await done
            return
        self._disposing = True
        try:
            await self._dispose_now(list(refs))
        finally:
            self._next_disposal()

    async def _dispose_now(self, refs: list[executor_pb2.ValueRef]) -> None:
        request = executor_pb2.DisposeRequest(executor=self.executor, value_ref=refs)
        self.calls["Dispose"] += 1
        await _call("Dispose", self._stub.Dispose(request))

    def _next_disposal(self) -> None:
        if not self._disposals:
            self._disposing = False
            return
        groups, self._disposals = self._disposals, []
        task = asyncio.get_running_loop().create_task(self._dispose_groups(groups))
        self._dispose_tasks.add(task)
        task.add_done_callback(self._dispose_tasks.discard)

    async def _dispose_groups(
        self, groups: list[tuple[list[executor_pb2.ValueRef], asyncio.Future[None]]]
    ) -> None:
        errors: list[Exception | None] = [None] * len(groups)
        try:
            try:
                await self._dispose_now([ref for refs, _ in groups for ref in refs])
            except WorkerError:
                # One group's bad ref must neither keep the others' values
                # alive nor fail their callers: each group alone.
                for i, (refs, _) in enumerate(groups):
                    try:
                        await self._dispose_now(refs)
                    except WorkerError as e:
                        errors[i] = e
        except BaseException:
            for _, done in groups:
                done.cancel()
            raise
        finally:
            self._next_disposal()
        for (_, done), error in zip(groups, errors, strict=True):
            if done.done():
                continue
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)
                done.exception()  # retrieved: its caller may be gone

    async def close(self) -> None:
        """Dispose of the executor; idempotent, never raises."""
        if self.closed:
            return
        self.closed = True
        try:
            await self._stub.DisposeExecutor(
                executor_pb2.DisposeExecutorRequest(executor=self.executor), timeout=5.0
            )
        except Exception:
            pass
