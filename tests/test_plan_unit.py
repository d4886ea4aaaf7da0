"""Phase plans (tff_amqp/tff_worker/plan.py) without a broker.

The cache tests build plans from hand-written batches; the last test runs a
built plan on a real worker_binary and compares it with the same operations
applied one by one."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from tff_amqp import protocol as p
from tff_amqp.tff_worker.plan import Earlier, Inline, PlanCache, PlannedBatch, parse_value

MAP = b"M" * 32  # digests of the functions of the hand-written batches
SQUARE = b"S" * 32
CUBE = b"C" * 32


def _computation_of(digest: bytes) -> Any:
    """A stand-in function body per digest (distinct, so digests differ)."""
    from tensorflow_federated.proto.v0 import computation_pb2 as pb

    return pb.Computation(intrinsic=pb.Intrinsic(uri=f"stand_in_{digest.hex()[:8]}"))


def _resolver(functions: dict[int, bytes], earlier: dict[int, Earlier] | None = None) -> Any:
    """Ids of functions resolve to Inline, ids in `earlier` to that, any
    other id to an input of its own."""

    def resolve(value_id: int) -> Earlier | Inline:
        if value_id in functions:
            return Inline(functions[value_id])
        if earlier and value_id in earlier:
            return earlier[value_id]
        return Earlier(value_id)

    return resolve


def _map_batch(base: int, data: int, fn_digest: bytes = SQUARE) -> tuple[list[p.Operation], Any]:
    """map(fn, data) as the coordinator sends it: two functions, a struct of
    (fn, data), a call; ids start at `base`."""
    ops: list[p.Operation] = [
        p.CreateValue(target=base, value=b"map"),
        p.CreateValue(target=base + 1, value=b"fn"),
        p.CreateStruct(target=base + 2, elements=((None, base + 1), (None, data))),
        p.CreateCall(target=base + 3, fn=base, arg=base + 2),
    ]
    return ops, _resolver({base: MAP, base + 1: fn_digest})


def _plan(cache: PlanCache, ops: Sequence[p.Operation], resolve: Any) -> PlannedBatch:
    return cache.plan(ops, resolve, _computation_of)


def _locals(plan: PlannedBatch) -> list[Any]:
    from tensorflow_federated.proto.v0 import executor_pb2

    value = executor_pb2.Value.FromString(plan.serialized)
    return list(getattr(value.computation, "lambda").result.block.local)


def test_same_shape_with_other_ids_is_the_same_plan() -> None:
    cache = PlanCache()
    first = _plan(cache, *_map_batch(10, data=1))
    second = _plan(cache, *_map_batch(500, data=77))
    assert cache.built == 1
    assert second.digest == first.digest and second.serialized == first.serialized
    assert first.inputs == (1,) and second.inputs == (77,)
    # The same members hold the values, under the batch's own ids.
    assert first.outputs == {12: 0, 13: 1}
    assert second.outputs == {502: 0, 503: 1}


def test_another_function_or_structure_is_another_plan() -> None:
    cache = PlanCache()
    base = _plan(cache, *_map_batch(10, data=1))
    other_function = _plan(cache, *_map_batch(10, data=1, fn_digest=CUBE))
    ops, resolve = _map_batch(10, data=1)
    # The same operations plus one selection of the result.
    longer = _plan(cache, [*ops, p.CreateSelection(target=14, source=13, index=0)], resolve)
    # The struct's elements the other way round.
    swapped = [
        *ops[:2],
        p.CreateStruct(target=12, elements=((None, 1), (None, 11))),
        ops[3],
    ]
    reordered = _plan(cache, swapped, resolve)
    digests = {base.digest, other_function.digest, longer.digest, reordered.digest}
    assert len(digests) == 4
    assert cache.built == 4
    assert longer.outputs == {12: 0, 13: 1, 14: 2}


def test_released_values_are_gathered_in_the_results_last_member() -> None:
    """What a batch computes is gathered in one more member of the plan's
    result, so one Compute releases all of it; which values are released is
    part of the plan's shape."""
    cache = PlanCache()
    ops, resolve = _map_batch(10, data=1)
    ops = [*ops, p.CreateSelection(target=14, source=13, index=0)]
    none = cache.plan(ops, resolve, _computation_of)
    both = cache.plan(ops, resolve, _computation_of, released={13, 14, 99})
    again = cache.plan(
        [
            *_map_batch(20, data=5)[0],
            p.CreateSelection(target=24, source=23, index=0),
        ],
        _map_batch(20, data=5)[1],
        _computation_of,
        released={24, 23},
    )
    assert none.released == {} and none.released_at is None
    # 99 is not the batch's own value: not gathered.
    assert both.outputs == {12: 0, 13: 1, 14: 2} and both.released_at == 3
    assert both.released == {13: 0, 14: 1}
    assert again.digest == both.digest and again.released == {23: 0, 24: 1}
    assert none.digest != both.digest and cache.built == 2
    body = getattr(parse_value(both.serialized).computation, "lambda").result.block
    last = body.result.struct.element[3].value.struct.element
    assert [e.value.reference.name for e in last] == [
        e.value.reference.name for e in body.result.struct.element[1:3]
    ]


def test_each_input_is_one_parameter_position() -> None:
    cache = PlanCache()
    ops: list[p.Operation] = [
        p.CreateValue(target=20, value=b"fn"),
        p.CreateStruct(target=21, elements=((None, 9), (None, 3))),
        p.CreateCall(target=22, fn=20, arg=21),
        p.CreateStruct(target=23, elements=((None, 5), (None, 3), (None, 22))),
        p.CreateStruct(target=24, elements=((None, 23), (None, 9))),
    ]
    plan = _plan(cache, ops, _resolver({20: SQUARE}))
    # Inputs are ordered by how they are used (canonical), each once.
    assert sorted(plan.inputs) == [3, 5, 9]  # type: ignore[type-var]
    selections = sorted(
        (local.value.selection.source.reference.name, local.value.selection.index)
        for local in _locals(plan)
        if local.value.WhichOneof("computation") == "selection"
    )
    assert selections == [("plan_inputs", 0), ("plan_inputs", 1), ("plan_inputs", 2)]
    # The first struct's inputs swapped: another computation, another plan.
    swapped = [
        ops[0],
        p.CreateStruct(target=21, elements=((None, 3), (None, 9))),
        *ops[2:],
    ]
    other = _plan(cache, swapped, _resolver({20: SQUARE}))
    assert sorted(other.inputs) == [3, 5, 9]  # type: ignore[type-var]
    assert other.digest != plan.digest
    # The same batch again: the same plan, the same inputs in the same order.
    again = _plan(cache, ops, _resolver({20: SQUARE}))
    assert (again.digest, again.inputs) == (plan.digest, plan.inputs)
    assert cache.built == 2


def test_an_earlier_plans_member_is_an_input_with_its_member_index() -> None:
    cache = PlanCache()
    first_ops, resolve = _map_batch(10, data=1)
    first = _plan(cache, first_ops, resolve)
    # The next batch uses value 13 (member 1 of the first plan's result) and
    # value 12 (member 0), both through the one result handle, and data 1.
    handle: Hashable = ("plan", 0)
    earlier = {13: Earlier(handle, first.outputs[13]), 12: Earlier(handle, first.outputs[12])}
    ops: list[p.Operation] = [
        p.CreateValue(target=30, value=b"fn"),
        p.CreateStruct(target=31, elements=((None, 13), (None, 1), (None, 12))),
        p.CreateCall(target=32, fn=30, arg=31),
    ]
    second = _plan(cache, ops, _resolver({30: CUBE}, earlier))
    assert sorted(second.inputs, key=repr) == sorted([handle, 1], key=repr)
    at = second.inputs.index(handle)
    members = {
        local.name: (
            local.value.selection.source.selection.index,
            local.value.selection.index,
        )
        for local in _locals(second)
        if local.value.WhichOneof("computation") == "selection"
        and local.value.selection.source.WhichOneof("computation") == "selection"
    }
    # The handle's input selected at both members ...
    assert sorted(members.values()) == [(at, 0), (at, 1)]
    # ... and the struct takes them where the batch put them (nodes are in
    # the plan's canonical order, not necessarily the batch's).
    (struct,) = [
        local.value.struct
        for local in _locals(second)
        if local.value.WhichOneof("computation") == "struct"
    ]
    used = [element.value.reference.name for element in struct.element]
    assert members[used[0]] == (at, first.outputs[13])
    assert members[used[2]] == (at, first.outputs[12])
    assert used[1] not in members  # the data, input 1


def test_the_cache_is_bounded_in_bytes_too() -> None:
    cache = PlanCache()
    shapes = [_map_batch(10, data=1, fn_digest=bytes([i]) * 32) for i in range(3)]
    size = len(_plan(cache, *shapes[0]).serialized)
    cache.MAX_BYTES = 2 * size + size // 2  # room for two plans of this size
    _plan(cache, *shapes[1])
    _plan(cache, *shapes[2])  # evicts shape 0
    assert cache.built == 3
    _plan(cache, *shapes[2])
    _plan(cache, *shapes[1])
    assert cache.built == 3
    _plan(cache, *shapes[0])  # built again
    assert cache.built == 4


def test_independent_operations_in_another_order_reuse_the_plan() -> None:
    """The coordinator evaluates independent parts concurrently, so one phase
    may arrive with its operations in another order: same plan, and each
    value id is the same member of its result."""
    cache = PlanCache()
    first = [
        p.CreateValue(target=20, value=b"map"),
        p.CreateValue(target=21, value=b"fn"),
        p.CreateStruct(target=22, elements=((None, 21), (None, 1))),
        p.CreateCall(target=23, fn=20, arg=22),
        p.CreateValue(target=24, value=b"cube"),
        p.CreateStruct(target=25, elements=((None, 24), (None, 2))),
        p.CreateCall(target=26, fn=20, arg=25),
        p.CreateStruct(target=27, elements=((None, 23), (None, 26))),
    ]
    # The second map's operations first; then the first's.
    second = [first[0], first[4], first[5], first[6], first[1], first[2], first[3], first[7]]
    resolve = _resolver({20: MAP, 21: SQUARE, 24: CUBE})
    a, b = _plan(cache, first, resolve), _plan(cache, second, resolve)
    assert cache.built == 1
    assert a.digest == b.digest
    assert a.outputs == b.outputs
    assert a.inputs == b.inputs


def test_calls_told_apart_only_by_their_users_canonicalize_alike() -> None:
    """Two calls of one function on two inputs that are used alike look the
    same from below; only what uses them tells them apart (here one feeds a
    struct, the other is released). Both batch orders give one plan, and
    each value id the same member."""
    cache = PlanCache()
    first = [
        p.CreateValue(target=30, value=b"fn"),
        p.CreateCall(target=31, fn=30, arg=1),
        p.CreateCall(target=32, fn=30, arg=2),
        p.CreateStruct(target=33, elements=((None, 31), (None, 3))),
    ]
    second = [first[0], first[2], first[1], first[3]]
    resolve = _resolver({30: SQUARE})
    a = cache.plan(first, resolve, _computation_of, released={32})
    b = cache.plan(second, resolve, _computation_of, released={32})
    assert cache.built == 1
    assert a.digest == b.digest
    assert a.outputs == b.outputs and a.released == b.released
    assert a.inputs == b.inputs


def test_argument_values_in_another_order_reuse_the_plan() -> None:
    """The batch's argument values arrive in varying orders (the coordinator
    ships them concurrently); the plan takes them in an order of its own,
    told by `arguments_order`, so both orders are one plan, and the plan's
    members of the argument struct are the same values."""
    cache = PlanCache()
    holder = ("plan", 7)
    ops: list[p.Operation] = [
        p.CreateValue(target=30, value=b"square"),
        p.CreateValue(target=31, value=b"cube"),
        p.CreateCall(target=32, fn=30, arg=1),
        p.CreateCall(target=33, fn=31, arg=2),
        p.CreateStruct(target=34, elements=((None, 32), (None, 33), (None, 3))),
    ]
    plans = []
    for ids in ([1, 2, 3], [3, 2, 1], [2, 3, 1]):  # the argument struct's members
        earlier = {value_id: Earlier(holder, index) for index, value_id in enumerate(ids)}
        plan = cache.plan(
            ops,
            _resolver({30: SQUARE, 31: CUBE}, earlier),
            _computation_of,
            released={34},
            arguments=holder,
        )
        # The plan's k-th argument member, as a value id of this batch.
        plans.append((plan, [ids[index] for index in plan.arguments_order]))
    assert cache.built == 1
    (first, taken), *others = plans
    assert sorted(taken) == [1, 2, 3]
    for plan, other_taken in others:
        assert plan.digest == first.digest
        assert other_taken == taken
    # Without `arguments` the struct's order is the plan's: another plan.
    earlier = {value_id: Earlier(holder, index) for index, value_id in enumerate([3, 2, 1])}
    fixed = cache.plan(ops, _resolver({30: SQUARE, 31: CUBE}, earlier), _computation_of)
    assert fixed.arguments_order == () and cache.built == 2


def test_a_remembered_batch_order_gives_what_ordering_anew_gives() -> None:
    """A batch order seen before skips the canonical ordering: its inputs and
    members, for other ids and other input sources, equal a fresh cache's."""
    ops = [
        p.CreateValue(target=20, value=b"fn"),
        p.CreateStruct(target=21, elements=((None, 9), (None, 3))),
        p.CreateCall(target=22, fn=20, arg=21),
        p.CreateStruct(target=23, elements=((None, 5), (None, 3), (None, 22))),
    ]
    warm = PlanCache()
    _plan(warm, ops, _resolver({20: SQUARE}))
    shifted = [
        p.CreateValue(target=120, value=b"fn"),
        p.CreateStruct(target=121, elements=((None, 40), (None, 30))),
        p.CreateCall(target=122, fn=120, arg=121),
        p.CreateStruct(target=123, elements=((None, 50), (None, 30), (None, 122))),
    ]
    remembered = _plan(warm, shifted, _resolver({120: SQUARE}))
    fresh = _plan(PlanCache(), shifted, _resolver({120: SQUARE}))
    assert remembered == fresh
    assert sorted(remembered.inputs) == [30, 40, 50]  # type: ignore[type-var]
    assert warm.built == 1
    # Inputs used the other way round (40 twice): another order, another plan.
    crossed = [
        shifted[0],
        shifted[1],
        shifted[2],
        p.CreateStruct(target=123, elements=((None, 40), (None, 30), (None, 122))),
    ]
    assert _plan(warm, crossed, _resolver({120: SQUARE})) == _plan(
        PlanCache(), crossed, _resolver({120: SQUARE})
    )
    assert warm.built == 2


def test_the_cache_is_bounded_least_recently_used_first() -> None:
    cache = PlanCache()
    cache.MAX = 3
    shapes = [_map_batch(10, data=1, fn_digest=bytes([i]) * 32) for i in range(4)]
    for ops, resolve in shapes:
        _plan(cache, ops, resolve)
    assert cache.built == 4
    # Shape 0 went first; 1, 2, 3 are kept.
    _plan(cache, *shapes[1])
    assert cache.built == 4
    _plan(cache, *shapes[0])
    assert cache.built == 5
    # Shape 1 was used last-but-one, so 2 went when 0 came back.
    _plan(cache, *shapes[1])
    assert cache.built == 5
    _plan(cache, *shapes[2])
    assert cache.built == 6


# ------------------------------------------------- a plan on a worker_binary


def _function_values() -> dict[str, bytes]:
    """Serialized `Value`s of the functions of `sum(map(square, x))` as our
    coordinator sends them: the map and aggregate intrinsics, the
    TensorFlow computation, a TensorFlow add and an identity report."""
    import tensorflow as tf
    import tensorflow_federated as tff
    from tensorflow_federated.proto.v0 import executor_pb2
    from tensorflow_federated.python.core.environments.tensorflow_backend import (
        tensorflow_computation_factory as factory,
    )
    from tensorflow_federated.python.core.impl.compiler import building_blocks, intrinsic_defs
    from tensorflow_federated.python.core.impl.executors import value_serialization
    from tensorflow_federated.python.core.impl.types import computation_types, placements

    f32 = computation_types.TensorType(np.float32)
    at_clients = computation_types.FederatedType(f32, placements.CLIENTS)

    @tff.tensorflow.computation(np.float32)
    def square(x: Any) -> Any:
        return x * x

    square_value, _ = value_serialization.serialize_value(square, square.type_signature)
    add_proto, add_type = factory.create_binary_operator(tf.add, f32, f32)
    identity = building_blocks.Lambda(
        "accumulator", f32, building_blocks.Reference("accumulator", f32)
    )
    fn_type = computation_types.FunctionType(f32, f32)
    map_ = building_blocks.Intrinsic(
        intrinsic_defs.FEDERATED_MAP.uri,
        computation_types.FunctionType([fn_type, at_clients], at_clients),
    )
    aggregate = building_blocks.Intrinsic(
        intrinsic_defs.FEDERATED_AGGREGATE.uri,
        computation_types.FunctionType(
            [at_clients, f32, add_type, add_type, identity.type_signature],
            computation_types.FederatedType(f32, placements.SERVER),
        ),
    )

    def computation(proto: Any) -> bytes:
        return executor_pb2.Value(computation=proto).SerializeToString()

    return {
        "map": computation(map_.proto),
        "square": square_value.SerializeToString(),
        "aggregate": computation(aggregate.proto),
        "add": computation(add_proto),
        "identity": computation(identity.proto),
    }


def _sum_of_squares_batch(functions: dict[str, bytes]) -> list[p.Operation]:
    """Ids 1 (client values) and 2 (the zero) exist before the batch."""
    return [
        p.CreateValue(target=10, value=functions["map"]),
        p.CreateValue(target=11, value=functions["square"]),
        p.CreateStruct(target=12, elements=((None, 11), (None, 1))),
        p.CreateCall(target=13, fn=10, arg=12),
        p.CreateValue(target=14, value=functions["aggregate"]),
        p.CreateValue(target=15, value=functions["add"]),
        p.CreateValue(target=16, value=functions["identity"]),
        p.CreateStruct(
            target=17,
            elements=((None, 13), (None, 2), (None, 15), (None, 15), (None, 16)),
        ),
        p.CreateCall(target=18, fn=14, arg=17),
    ]


async def test_a_plan_runs_on_worker_binary_like_its_operations_one_by_one() -> None:
    import hashlib

    import tensorflow_federated as tff
    from tensorflow_federated.proto.v0 import executor_pb2
    from tensorflow_federated.python.core.impl.executors import value_serialization

    from tff_amqp.tff_worker.process import WorkerBinary

    values = [1.5, -2.0, 3.0]
    functions = _function_values()
    ops = _sum_of_squares_batch(functions)
    by_digest = {hashlib.sha256(v).digest(): v for v in functions.values()}
    digest_of = {
        op.target: hashlib.sha256(op.value).digest() for op in ops if isinstance(op, p.CreateValue)
    }
    cache = PlanCache()
    plan = cache.plan(
        ops,
        _resolver(digest_of),
        lambda digest: executor_pb2.Value.FromString(by_digest[digest]).computation,
    )
    assert sorted(plan.inputs) == [1, 2]  # in the canonical order
    data, _ = value_serialization.serialize_value(
        values, tff.FederatedType(np.float32, tff.CLIENTS)
    )
    zero, _ = value_serialization.serialize_value(np.float32(0.0), tff.TensorType(np.float32))

    async with WorkerBinary() as worker:
        executor = await worker.client.get_executor(len(values))
        try:
            existing = {1: await executor.create_value(data), 2: await executor.create_value(zero)}

            # One by one, as the silo's op-by-op path applies them.
            refs = dict(existing)
            for op in ops:
                match op:
                    case p.CreateValue():
                        refs[op.target] = await executor.create_value(
                            executor_pb2.Value.FromString(op.value)
                        )
                    case p.CreateStruct():
                        refs[op.target] = await executor.create_struct(
                            [(name, refs[ref]) for name, ref in op.elements]
                        )
                    case p.CreateCall():
                        refs[op.target] = await executor.create_call(refs[op.fn], refs[op.arg])
            one_by_one = await executor.compute(refs[18])

            # The plan: one CreateCall, then the aggregate's member selected.
            calls_before = executor.calls["CreateCall"]
            fn = await executor.create_value(executor_pb2.Value.FromString(plan.serialized))
            arg = await executor.create_struct([(None, existing[i]) for i in plan.inputs])  # type: ignore[index]
            result = await executor.create_call(fn, arg)
            assert executor.calls["CreateCall"] - calls_before == 1
            member = await executor.create_selection(result, plan.outputs[18])
            planned = await executor.compute(member)
            # A member that is a CLIENTS value is there too: the squares.
            squares = await executor.compute(
                await executor.create_selection(result, plan.outputs[13])
            )
        finally:
            await executor.close()

    planned_value, planned_type = value_serialization.deserialize_value(planned)
    one_by_one_value, one_by_one_type = value_serialization.deserialize_value(one_by_one)
    assert str(planned_type) == str(one_by_one_type) == "float32@SERVER"
    expected = float(np.sum(np.square(np.asarray(values, np.float32))))
    np.testing.assert_allclose(planned_value, one_by_one_value, rtol=0)
    np.testing.assert_allclose(planned_value, expected, rtol=1e-6)
    squares_value, _ = value_serialization.deserialize_value(squares)
    np.testing.assert_allclose(squares_value, np.square(values), rtol=1e-6)


def _session(
    client: Any,
    name: str,
    clients: int,
    phase_plans: bool | None = None,
    in_process_plans: bool = False,
) -> Any:
    """A silo's session for one invocation over `clients` clients, without
    data. Its plans run on the worker (these tests are about the worker's
    calls) unless `in_process_plans`."""
    import time

    from tff_amqp.silo.stateful.session import InvocationSession, PrivacyPolicy

    return InvocationSession(
        silo="unit",
        invocation_id=name,
        worker=client,
        policy=PrivacyPolicy(),
        resolve_data=lambda key, type_spec: (0, b""),
        count_clients=lambda key: clients,
        deadline=time.time() + 60,
        phase_plans=phase_plans,
        in_process_plans=in_process_plans,
    )


async def test_a_session_mixing_plans_and_op_by_op_batches_equals_op_by_op() -> None:
    """An InvocationSession on a real worker_binary, batches as a coordinator
    sends them: a plan; a batch with a Dispose (op by op) that uses a member
    of the plan and its functions; a plan that uses a member of the first
    plan again. Released values equal a session applying everything op by
    op, and the numbers; so do those of a session evaluating the plans in its
    own process (inprocess/plans.py), which runs the first plan on the
    worker only when the op-by-op batch needs one of its values there."""

    import tensorflow_federated as tff
    from tensorflow_federated.proto.v0 import executor_pb2
    from tensorflow_federated.python.core.impl.executors import value_serialization

    from tff_amqp.tff_worker.process import WorkerBinary

    values = [1.5, -2.0, 3.0]
    functions = _function_values()
    data, _ = value_serialization.serialize_value(
        values, tff.FederatedType(np.float32, tff.CLIENTS)
    )
    zero, _ = value_serialization.serialize_value(np.float32(0.0), tff.TensorType(np.float32))
    aggregate = ((None, 2), (None, 15), (None, 15), (None, 16))  # zero, add, add, report
    batches = [
        p.Batch(
            seq=0,
            operations=(
                p.Open(clients=len(values)),
                p.CreateValue(target=1, value=data.SerializeToString()),
                p.CreateValue(target=2, value=zero.SerializeToString()),
                *_sum_of_squares_batch(functions),
                p.Compute(source=18),
            ),
        ),
        p.Batch(
            seq=1,
            operations=(
                p.Dispose(targets=(12, 17)),
                p.CreateStruct(target=30, elements=((None, 13), *aggregate)),
                p.CreateCall(target=31, fn=14, arg=30),
                p.Compute(source=31),
            ),
        ),
        p.Batch(
            seq=2,
            operations=(
                p.CreateStruct(target=40, elements=((None, 11), (None, 13))),
                p.CreateCall(target=41, fn=10, arg=40),
                p.CreateStruct(target=42, elements=((None, 41), *aggregate)),
                p.CreateCall(target=43, fn=14, arg=42),
                p.Compute(source=43),
                p.Close(),
            ),
        ),
    ]

    async def released(
        worker: WorkerBinary, phase_plans: bool, in_process: bool = False
    ) -> tuple[dict[int, Any], int]:
        client = worker.new_client()
        session = _session(
            client, f"plans-{phase_plans}-{in_process}", len(values), phase_plans, in_process
        )
        out: dict[int, Any] = {}
        for batch in batches:
            for target, value in (await session.apply(batch)).items():
                out[target] = value_serialization.deserialize_value(
                    executor_pb2.Value.FromString(value)
                )[0]
        assert session.closed
        return out, client.calls["CreateCall"]

    async with WorkerBinary() as worker:
        planned, planned_calls = await released(worker, True)
        op_by_op, op_by_op_calls = await released(worker, False)
        in_process, in_process_calls = await released(worker, True, in_process=True)

    assert sorted(planned) == sorted(op_by_op) == sorted(in_process) == [18, 31, 43]
    for target in planned:
        np.testing.assert_allclose(planned[target], op_by_op[target], rtol=0)
        np.testing.assert_allclose(in_process[target], op_by_op[target], rtol=0)
    # In the silo's process, the plans of batches 0 and 2; batch 1 (op by op)
    # needs the first plan's member 13 on the worker: that plan runs there
    # then (one call), and the batch's own aggregate call.
    assert in_process_calls == 2, in_process_calls
    x = np.asarray(values, np.float32)
    np.testing.assert_allclose(planned[18], np.sum(x**2), rtol=1e-6)
    np.testing.assert_allclose(planned[31], np.sum(x**2), rtol=1e-6)
    np.testing.assert_allclose(planned[43], np.sum(x**4), rtol=1e-6)
    # Plans: one call per planned batch, plus the op-by-op batch's one.
    assert planned_calls == 3, planned_calls
    assert op_by_op_calls == 5, op_by_op_calls


async def test_a_session_releases_several_values_with_one_selection_and_one_compute() -> None:
    """A silo session on a real worker_binary: a batch that releases two
    aggregates (a sum of squares and the sum of the values) makes one plan
    call, one selection of the member gathering both and one Compute; the
    released values equal a session applying the batch op by op."""

    import tensorflow_federated as tff
    from tensorflow_federated.proto.v0 import executor_pb2
    from tensorflow_federated.python.core.impl.executors import value_serialization

    from tff_amqp.tff_worker.process import WorkerBinary

    values = [1.5, -2.0, 3.0, 0.25]
    functions = _function_values()
    data, _ = value_serialization.serialize_value(
        values, tff.FederatedType(np.float32, tff.CLIENTS)
    )
    zero, _ = value_serialization.serialize_value(np.float32(0.0), tff.TensorType(np.float32))
    batch = p.Batch(
        seq=0,
        operations=(
            p.Open(clients=len(values)),
            p.CreateValue(target=1, value=data.SerializeToString()),
            p.CreateValue(target=2, value=zero.SerializeToString()),
            *_sum_of_squares_batch(functions),
            # The plain sum of the values, with the same aggregate.
            p.CreateStruct(
                target=20, elements=((None, 1), (None, 2), (None, 15), (None, 15), (None, 16))
            ),
            p.CreateCall(target=21, fn=14, arg=20),
            p.Compute(source=18),
            p.Compute(source=21),
            p.Close(),
        ),
    )

    async def run(worker: WorkerBinary, phase_plans: bool) -> tuple[dict[int, bytes], Any]:
        client = worker.new_client()
        session = _session(client, f"gathered-{phase_plans}", len(values), phase_plans)
        out = {k: bytes(v) for k, v in (await session.apply(batch)).items()}
        assert session.closed
        return out, dict(client.calls)

    async with WorkerBinary() as worker:
        planned, calls = await run(worker, True)
        op_by_op, op_by_op_calls = await run(worker, False)

    assert calls.get("CreateCall") == 1 and calls.get("CreateSelection") == 1, calls
    assert calls.get("Compute") == 1, calls
    assert op_by_op_calls.get("Compute") == 2, op_by_op_calls
    assert sorted(planned) == sorted(op_by_op) == [18, 21]
    x = np.asarray(values, np.float32)
    for target, expected in ((18, np.sum(x**2)), (21, np.sum(x))):
        got = value_serialization.deserialize_value(executor_pb2.Value.FromString(planned[target]))
        reference = value_serialization.deserialize_value(
            executor_pb2.Value.FromString(op_by_op[target])
        )
        assert str(got[1]) == str(reference[1]) == "float32@SERVER"
        np.testing.assert_allclose(got[0], reference[0], rtol=0)
        np.testing.assert_allclose(got[0], expected, rtol=1e-6)
