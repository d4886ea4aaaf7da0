"""Phase plans evaluated in the silo's process (tff_amqp/inprocess/plans.py),
against the same plans on a real worker_binary: equal bit for bit, no worker
call where the plan is element-wise arithmetic, the worker where it is not;
awkward cohorts (one client, none). Over real silos and the broker:
tests/test_phase_plans.py (the session's silos evaluate plans in process)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tests.test_plan_unit import _function_values, _session, _sum_of_squares_batch
from tff_amqp import protocol as p
from tff_amqp.inprocess import plans


def _serialized(value: Any, type_spec: Any) -> bytes:
    from tensorflow_federated.python.core.impl.executors import value_serialization

    proto, _ = value_serialization.serialize_value(value, type_spec)
    return proto.SerializeToString()


def _read(serialized: bytes) -> Any:
    from tensorflow_federated.proto.v0 import executor_pb2
    from tensorflow_federated.python.core.impl.executors import value_serialization

    return value_serialization.deserialize_value(executor_pb2.Value.FromString(serialized))[0]


def _phase(functions: dict[str, bytes], values: list[float]) -> p.Batch:
    at_clients = tff.FederatedType(np.float32, tff.CLIENTS)
    return p.Batch(
        seq=0,
        operations=(
            p.Open(clients=len(values)),
            p.CreateValue(target=1, value=_serialized(values, at_clients)),
            p.CreateValue(target=2, value=_serialized(np.float32(0.0), tff.TensorType(np.float32))),
            *_sum_of_squares_batch(functions),
            p.Compute(source=18),
            p.Close(),
        ),
    )


async def _released(worker: Any, batch: p.Batch, in_process: bool) -> tuple[bytes, int]:
    """The released aggregate and the worker calls it took (but the one
    `GetExecutor` of a new client, which a silo makes once per cohort size)."""
    client = worker.new_client()
    session = _session(client, f"in-process-{in_process}", 0, True, in_process)
    out = await session.apply(batch)
    assert session.closed
    calls = {call: n for call, n in client.calls.items() if call != "GetExecutor"}
    return out[18], sum(calls.values())


@pytest.mark.parametrize("values", [[1.5, -2.0, 3.0], [2.5], [3e38, 3e38, -1.0]])
async def test_a_plan_in_process_equals_the_worker_bit_for_bit_without_a_worker_call(
    values: list[float],
) -> None:
    from tff_amqp.tff_worker.process import WorkerBinary

    functions = _function_values()
    async with WorkerBinary() as worker:
        here, calls_here = await _released(worker, _phase(functions, values), True)
        there, calls_there = await _released(worker, _phase(functions, values), False)
    assert calls_here == 0
    assert calls_there > 0
    # The same proto a worker's Compute gives: the same value and type.
    assert np.asarray(_read(here)).dtype == np.asarray(_read(there)).dtype == np.float32
    np.testing.assert_array_equal(_read(here), _read(there))
    with np.errstate(over="ignore"):
        expected = np.float32(0.0)
        for v in values:
            expected = expected + np.float32(v) * np.float32(v)
    np.testing.assert_array_equal(_read(here), expected)


def test_no_client_at_all_aggregates_to_the_zero_and_placements_are_kept() -> None:
    from tensorflow_federated.proto.v0 import executor_pb2

    zero = executor_pb2.Value.FromString(_serialized(np.float32(4.0), tff.TensorType(np.float32)))
    none = plans.read_value(zero, 0)
    assert none == np.float32(4.0)
    everyone = executor_pb2.Value.FromString(
        _serialized(np.float32(2.0), tff.FederatedType(np.float32, tff.CLIENTS, all_equal=True))
    )
    assert plans.read_value(everyone, 3) == plans.Clients((np.float32(2.0),) * 3)
    assert plans.read_value(everyone, 0) == plans.Clients(())
    # An aggregate over no client is `report(zero)`.
    aggregate = plans._INTRINSICS["federated_aggregate"]
    add = lambda arg, _clients: arg[0] + arg[1]  # noqa: E731
    report = lambda arg, _clients: arg * np.float32(2.0)  # noqa: E731
    from tensorflow_federated.python.common_libs import structure

    arg = structure.Struct(
        [(None, v) for v in (plans.Clients(()), np.float32(4.0), add, add, report)]
    )
    assert aggregate(arg, 0) == plans.Server(np.float32(8.0))


def test_values_other_than_numbers_are_left_to_the_worker() -> None:
    from tensorflow_federated.proto.v0 import executor_pb2

    strings = executor_pb2.Value.FromString(
        _serialized(["a", "b"], tff.FederatedType(np.str_, tff.CLIENTS))
    )
    with pytest.raises(plans.Unsupported):
        plans.read_value(strings, 2)
    counts = executor_pb2.Value.FromString(
        _serialized([1.0, 2.0], tff.FederatedType(np.float32, tff.CLIENTS))
    )
    with pytest.raises(plans.Unsupported, match="another size"):
        plans.read_value(counts, 3)


@tff.tensorflow.computation(np.float32)
def root(x: Any) -> Any:
    return tf.sqrt(x)


async def test_a_plan_with_a_function_not_run_here_runs_on_the_worker() -> None:
    from tensorflow_federated.python.core.impl.executors import value_serialization

    from tff_amqp.tff_worker.process import WorkerBinary

    functions = _function_values()
    root_value, _ = value_serialization.serialize_value(root, root.type_signature)
    functions["square"] = root_value.SerializeToString()
    values = [4.0, 9.0, 0.25]
    async with WorkerBinary() as worker:
        here, calls_here = await _released(worker, _phase(functions, values), True)
        there, _ = await _released(worker, _phase(functions, values), False)
    assert calls_here > 0
    np.testing.assert_array_equal(_read(here), _read(there))
    np.testing.assert_allclose(_read(here), 2.0 + 3.0 + 0.5, rtol=1e-6)


async def test_large_arguments_are_left_to_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """NumPy work runs on the silo's event loop: past IN_PROCESS_MAX_BYTES of
    argument values the worker runs the plan (here the bound is lowered)."""
    from tff_amqp.silo.stateful import session as session_module
    from tff_amqp.tff_worker.process import WorkerBinary

    functions = _function_values()
    values = [1.5, -2.0, 3.0]
    async with WorkerBinary() as worker:
        small, calls_small = await _released(worker, _phase(functions, values), True)
        monkeypatch.setattr(session_module, "IN_PROCESS_MAX_BYTES", 16)
        large, calls_large = await _released(worker, _phase(functions, values), True)
    assert calls_small == 0
    assert calls_large > 0
    np.testing.assert_array_equal(_read(small), _read(large))
