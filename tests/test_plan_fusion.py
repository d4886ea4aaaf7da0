"""The same phase plan of concurrent invocations runs in one worker call
(silo/stateful/fusion.py), on a real worker_binary: each invocation's
released values equal what it computes alone, a later batch can still use
the fused plan's members, and a member that fails at the worker gets its own
error while the others get their results. Over the real broker with silo
processes: tests/test_bundling.py (concurrent means, worker calls counted)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from tests.test_plan_unit import _function_values, _sum_of_squares_batch
from tests.test_plan_unit import _session as _unit_session
from tff_amqp import protocol as p
from tff_amqp.silo.stateful import session as session_module
from tff_amqp.silo.stateful.session import InvocationSession, SessionError

AGGREGATE = ((None, 2), (None, 15), (None, 15), (None, 16))  # zero, add, add, report


def _first_phase(functions: dict[str, bytes], data: Any, zero: Any) -> p.Batch:
    return p.Batch(
        seq=0,
        operations=(
            p.Open(clients=3),
            p.CreateValue(target=1, value=data.SerializeToString()),
            p.CreateValue(target=2, value=zero.SerializeToString()),
            *_sum_of_squares_batch(functions),
            p.Compute(source=18),
        ),
    )


# Uses members of the first phase's plan (the map's result 13, the square 11).
SECOND_PHASE = p.Batch(
    seq=1,
    operations=(
        p.CreateStruct(target=40, elements=((None, 11), (None, 13))),
        p.CreateCall(target=41, fn=10, arg=40),
        p.CreateStruct(target=42, elements=((None, 41), *AGGREGATE)),
        p.CreateCall(target=43, fn=14, arg=42),
        p.Compute(source=43),
        p.Close(),
    ),
)


def _serialized(values: list[Any], dtype: Any) -> tuple[Any, Any]:
    import tensorflow_federated as tff
    from tensorflow_federated.python.core.impl.executors import value_serialization

    data, _ = value_serialization.serialize_value(values, tff.FederatedType(dtype, tff.CLIENTS))
    zero, _ = value_serialization.serialize_value(dtype(0), tff.TensorType(dtype))
    return data, zero


def _session(client: Any, name: str) -> InvocationSession:
    return _unit_session(client, name, clients=3)


def _value(serialized: bytes) -> Any:
    from tensorflow_federated.proto.v0 import executor_pb2
    from tensorflow_federated.python.core.impl.executors import value_serialization

    return value_serialization.deserialize_value(executor_pb2.Value.FromString(serialized))[0]


async def test_concurrent_invocations_share_one_plan_call_and_keep_their_own_values() -> None:
    from tff_amqp.tff_worker.process import WorkerBinary

    functions = _function_values()
    inputs = [[1.5, -2.0, 3.0], [0.5, 1.0, 2.0], [4.0, 0.0, -1.0], [2.0, 2.0, 2.0], [1, 2, 3]]
    async with WorkerBinary() as worker:
        client = worker.new_client()
        sessions = [_session(client, f"fused-{i}") for i in range(len(inputs))]
        first = [
            _first_phase(functions, *_serialized([float(v) for v in values], np.float32))
            for values in inputs
        ]
        calls_before = dict(client.calls)
        released = await asyncio.gather(*(s.apply(b) for s, b in zip(sessions, first)))
        plan_calls = client.calls["CreateCall"] - calls_before.get("CreateCall", 0)
        computes = client.calls["Compute"] - calls_before.get("Compute", 0)
        # The second phase uses the fused first phase's members (selected now).
        second = await asyncio.gather(*(s.apply(SECOND_PHASE) for s in sessions))
        assert all(s.closed for s in sessions)

    for values, out, later in zip(inputs, released, second):
        x = np.asarray(values, np.float32)
        np.testing.assert_allclose(_value(out[18]), np.sum(x**2), rtol=1e-6)
        np.testing.assert_allclose(_value(later[43]), np.sum(x**4), rtol=1e-6)
    # The first ran alone (one plan call, one compute); the four that came
    # while it ran, in one call and one compute (not four of each).
    assert plan_calls == 2, plan_calls
    assert computes == 2, computes


async def test_a_member_that_fails_at_the_worker_fails_alone() -> None:
    from tff_amqp.tff_worker.process import WorkerBinary

    functions = _function_values()
    good = _first_phase(functions, *_serialized([1.0, 2.0, 3.0], np.float32))
    # Strings where the plan squares float32: the worker refuses this one.
    _, zero = _serialized([1.0, 2.0, 3.0], np.float32)
    bad_data, _ = _serialized(["a", "b", "c"], np.str_)
    bad = _first_phase(functions, bad_data, zero)
    async with WorkerBinary() as worker:
        client = worker.new_client()
        sessions = [_session(client, f"isolated-{i}") for i in range(4)]
        fuser = dict(session_module._FUSER.stats)
        outcomes = await asyncio.gather(
            *(s.apply(b) for s, b in zip(sessions, [good, good, bad, good])),
            return_exceptions=True,
        )
        for session in sessions:
            await session.close()
    # The three that waited ran as one group, which failed, then one by one.
    stats = session_module._FUSER.stats
    assert stats["calls"] - fuser["calls"] == 1 + 3, (fuser, stats)
    assert isinstance(outcomes[2], SessionError), outcomes[2]
    assert outcomes[2].code is p.ErrorCode.EXECUTION
    for i in (0, 1, 3):
        assert not isinstance(outcomes[i], BaseException), outcomes[i]
        np.testing.assert_allclose(_value(outcomes[i][18]), 14.0, rtol=1e-6)  # type: ignore[index]


class _FakeExecutor:
    """Stands in for a worker executor: records the fused calls' sizes and
    answers each with one released float per member."""

    def __init__(self) -> None:
        self.groups: list[int] = []
        self.release = asyncio.Event()

    async def create_computation(self, serialized, value, digest=None):
        return "fn", True

    async def create_value(self, value):
        self.groups.append(len(value.struct.element))
        return ("args", len(value.struct.element))

    async def create_call(self, fn, arg):
        await self.release.wait()
        return ("fused", arg[1])

    async def create_selection(self, source, index):
        return ("selected", source, index)

    async def compute_serialized(self, ref):
        from tensorflow_federated.proto.v0 import executor_pb2

        value = executor_pb2.Value()
        for i in range(ref[1][1]):
            member = value.struct.element.add().value.struct.element.add().value
            member.struct.element.add().value.struct.SetInParent()
            member.struct.element[0].name = f"m{i}"
        return value.SerializeToString()

    async def dispose(self, refs):
        return None


async def test_groups_are_bounded_in_count_and_bytes(monkeypatch) -> None:
    from tensorflow_federated.proto.v0 import executor_pb2

    from tff_amqp.silo.stateful import fusion
    from tff_amqp.tff_worker.plan import PlannedBatch

    plan = PlannedBatch(
        digest=b"d" * 32,
        serialized=executor_pb2.Value(
            computation={"lambda": {"parameter_name": "x", "result": {"reference": {"name": "x"}}}}
        ).SerializeToString(),
        inputs=(("plan", 0),),
        outputs={7: 0},
    )
    argument = executor_pb2.Value()
    argument.struct.element.add().value.array.float32_list.value.extend([1.0] * 100)
    monkeypatch.setattr(fusion, "MAX_GROUP_BYTES", 3 * argument.ByteSize())
    fuser = fusion.PlanFuser()
    executor = _FakeExecutor()
    first_ran = asyncio.Event()

    async def alone() -> None:
        first_ran.set()
        await executor.release.wait()

    first = asyncio.create_task(fuser.run(executor, plan, argument, (0,), alone))  # type: ignore[arg-type]
    await first_ran.wait()
    waiting = [
        asyncio.create_task(fuser.run(executor, plan, argument, (0,), alone))  # type: ignore[arg-type]
        for _ in range(7)
    ]
    await asyncio.sleep(0)
    executor.release.set()
    assert await first is None  # it ran alone, the ordinary way
    outcomes = await asyncio.gather(*waiting)
    # Seven waited: groups of at most three (the byte bound), in order.
    assert executor.groups == [3, 3, 1]
    assert all(set(o.released) == {0} for o in outcomes)
