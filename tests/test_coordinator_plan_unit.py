"""The coordinator's LocalExecutor against a stand-in worker (no broker, no
worker_binary): what it records runs as one plan call when a value is
needed, and a worker error in a plan says so. Results are compared with
TFF's native runtime in test_work_counts.py and the conformance suites."""

from __future__ import annotations

import collections
import itertools
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from tff_amqp.coordinator.stateful import values
from tff_amqp.coordinator.stateful.local import LocalExecutor
from tff_amqp.tff_worker import WorkerError


class _StandInWorker:
    """Counts calls, hands out distinct refs; `fail_calls` makes CreateCall fail."""

    def __init__(self, *, fail_calls: bool = False) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.disposed: list[Any] = []
        self._refs = itertools.count()
        self._fail_calls = fail_calls

    def _ref(self, method: str) -> str:
        self.calls[method] += 1
        return f"{method}#{next(self._refs)}"

    async def create_value(self, value: Any) -> str:
        return self._ref("CreateValue")

    async def create_computation(self, serialized: bytes, value: Any, *, digest: bytes) -> Any:
        return self._ref("CreateValue"), True  # cached: never disposed by an invocation

    async def create_call(self, fn: Any, arg: Any = None) -> str:
        if self._fail_calls:
            raise WorkerError("stand-in failure", "INTERNAL")
        return self._ref("CreateCall")

    async def create_struct(self, elements: Any) -> str:
        return self._ref("CreateStruct")

    async def create_selection(self, source: Any, index: int) -> str:
        return self._ref("CreateSelection")

    async def compute_serialized(self, ref: Any) -> bytes:
        self.calls["Compute"] += 1
        return b""

    async def dispose(self, refs: Any) -> None:
        self.calls["Dispose"] += 1
        self.disposed.extend(refs)


def _local(worker: _StandInWorker) -> LocalExecutor:
    async def shared_executor(clients: int) -> _StandInWorker:
        return worker

    client = SimpleNamespace(shared_executor=shared_executor)
    runtime = SimpleNamespace(
        worker=SimpleNamespace(client=client), bulk=SimpleNamespace(inline_limit=1024)
    )
    return LocalExecutor(runtime)  # type: ignore[arg-type]


async def _serialize(local: LocalExecutor, value_id: int) -> bytes:
    """What shipping a recorded value to the silos asks of the local executor."""
    from tensorflow_federated.python.core.impl.types import computation_types

    value = values.LocalValue(None, value_id, computation_types.TensorType(np.float32))  # type: ignore[arg-type]
    return await local.serialized(value)


async def _record(local: LocalExecutor) -> int:
    """Two argument values, a call on them, a struct and a selection."""
    from tensorflow_federated.proto.v0 import executor_pb2

    fn = await local.create_value(executor_pb2.Value())
    arg = await local.create_value(executor_pb2.Value())
    called = await local.create_call(fn, arg)
    pair = await local.create_struct([(None, called), (None, arg)])
    return await local.create_selection(pair, 0)


async def test_recorded_operations_run_as_one_plan_call_when_needed() -> None:
    worker = _StandInWorker()
    local = _local(worker)
    selected = await _record(local)
    assert worker.calls == {"CreateValue": 2}  # nothing recorded has run yet
    await _serialize(local, selected)
    # The plan embedded (cached), its two inputs as one struct, one call,
    # then the wanted member selected from the plan's result and computed.
    assert worker.calls == {
        "CreateValue": 3,
        "CreateStruct": 1,
        "CreateCall": 1,
        "CreateSelection": 1,
        "Compute": 1,
    }
    await local.dispose()
    # Everything the invocation created is disposed of; the cached plan is not.
    assert len(worker.disposed) == 2 + 1 + 1 + 1


async def test_a_worker_error_in_a_plan_names_the_plan() -> None:
    local = _local(_StandInWorker(fail_calls=True))
    selected = await _record(local)
    with pytest.raises(WorkerError, match=r"coordinator, phase plan of 3 operations: stand-in"):
        await _serialize(local, selected)
