"""Async gRPC client of TFF's executor service (`ExecutorGroup`).

TFF's own stub is synchronous and blocks the event loop when called from
`async def`; this one uses `grpc.aio`, so silos and invocations run side by
side.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence

import grpc
from tensorflow_federated.proto.v0 import executor_pb2, executor_pb2_grpc

_MAX_BYTES = 2 * 1000 * 1000 * 1000
GRPC_OPTIONS = [
    ("grpc.max_message_length", _MAX_BYTES),
    ("grpc.max_receive_message_length", _MAX_BYTES),
    ("grpc.max_send_message_length", _MAX_BYTES),
]


class WorkerError(RuntimeError):
    """A worker_binary call failed; the message keeps TFF's own error text."""


async def _call(operation: str, coro: object) -> object:
    try:
        return await coro  # type: ignore[misc]
    except grpc.aio.AioRpcError as e:
        raise WorkerError(f"worker {operation} failed ({e.code().name}): {e.details()}") from None


class WorkerClient:
    """Entry point: executors inside the worker, one per CLIENTS cardinality."""

    # Pinned executors keep TensorFlow's per-executor caches and our cached
    # computations warm across invocations; bounded so odd cardinalities
    # cannot pile up.
    MAX_PINNED = 16

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = executor_pb2_grpc.ExecutorGroupStub(channel)
        self._pinned: dict[int | None, WorkerExecutor] = {}

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
        response = await _call("GetExecutor", self._stub.GetExecutor(request))
        return WorkerExecutor(self._stub, response.executor)  # type: ignore[attr-defined]


class WorkerExecutor:
    """One executor inside the worker (values of one CLIENTS cardinality)."""

    MAX_CACHED_COMPUTATIONS = 4096

    def __init__(
        self, stub: executor_pb2_grpc.ExecutorGroupStub, executor: executor_pb2.ExecutorId
    ) -> None:
        self._stub = stub
        self.executor = executor
        self.closed = False
        self.pinned = False
        self._computations: dict[bytes, asyncio.Future[executor_pb2.ValueRef]] = {}

    async def create_computation(
        self, serialized: bytes, value: executor_pb2.Value
    ) -> tuple[executor_pb2.ValueRef, bool]:
        """Embed a computation, reusing an identical one already embedded in
        this pinned executor (the same functions arrive every round). Returns
        (ref, cached); the caller must not dispose a cached ref."""
        key = hashlib.sha256(serialized).digest()
        future = self._computations.get(key)
        if future is None:
            if not self.pinned or len(self._computations) >= self.MAX_CACHED_COMPUTATIONS:
                return await self.create_value(value), False
            future = asyncio.ensure_future(self.create_value(value))
            self._computations[key] = future
        try:
            return await asyncio.shield(future), True
        except WorkerError:
            self._computations.pop(key, None)
            raise

    @property
    def executor_id(self) -> str:
        return self.executor.id

    async def create_value(self, value: executor_pb2.Value) -> executor_pb2.ValueRef:
        request = executor_pb2.CreateValueRequest(executor=self.executor, value=value)
        response = await _call("CreateValue", self._stub.CreateValue(request))
        return response.value_ref  # type: ignore[attr-defined]

    async def create_call(
        self, fn: executor_pb2.ValueRef, arg: executor_pb2.ValueRef | None = None
    ) -> executor_pb2.ValueRef:
        request = executor_pb2.CreateCallRequest(
            executor=self.executor, function_ref=fn, argument_ref=arg
        )
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
        response = await _call("CreateStruct", self._stub.CreateStruct(request))
        return response.value_ref  # type: ignore[attr-defined]

    async def create_selection(
        self, source: executor_pb2.ValueRef, index: int
    ) -> executor_pb2.ValueRef:
        request = executor_pb2.CreateSelectionRequest(
            executor=self.executor, source_ref=source, index=index
        )
        response = await _call("CreateSelection", self._stub.CreateSelection(request))
        return response.value_ref  # type: ignore[attr-defined]

    async def compute(self, ref: executor_pb2.ValueRef) -> executor_pb2.Value:
        request = executor_pb2.ComputeRequest(executor=self.executor, value_ref=ref)
        response = await _call("Compute", self._stub.Compute(request))
        return response.value  # type: ignore[attr-defined]

    async def dispose(self, refs: Sequence[executor_pb2.ValueRef]) -> None:
        if refs:
            request = executor_pb2.DisposeRequest(executor=self.executor, value_ref=list(refs))
            await _call("Dispose", self._stub.Dispose(request))

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
