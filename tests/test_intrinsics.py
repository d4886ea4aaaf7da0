"""One computation per intrinsic the coordinator implements: each must reach
the coordinator's strategy as that intrinsic (counted by the runtime) and give
what TFF's runtime gives. docs/intrinsics.md names these cases as "tested by";
tests/test_docs_intrinsics.py keeps the two in step.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.core.backends.mapreduce import intrinsics as mr_intrinsics

from tests.support.federation import assert_close, run_in

F32_CLIENTS = tff.FederatedType(np.float32, tff.CLIENTS)
I32_CLIENTS = tff.FederatedType(np.int32, tff.CLIENTS)
F32_SERVER = tff.FederatedType(np.float32, tff.SERVER)
VALUES = [1.0, 2.5, -3.0, 4.0, 0.5]
INTS = [3, 9, 11, 6, 2]


@tff.tensorflow.computation(np.float32)
def _double(x):
    return x * 2.0


@tff.tensorflow.computation(np.float32, np.float32)
def _add(a, b):
    return a + b


@tff.tensorflow.computation(np.float32)
def _same(a):
    return a


@tff.tensorflow.computation
def _seven():
    return np.float32(7.0)


@tff.federated_computation(F32_CLIENTS)
def map_then_sum(x):
    return tff.federated_sum(tff.federated_map(_double, x))


@tff.federated_computation(F32_SERVER)
def map_all_equal(s):
    # A broadcast value mapped at the clients stays all-equal.
    mapped = tff.federated_map(_double, tff.federated_broadcast(s))
    return tff.federated_sum(mapped)


@tff.federated_computation(F32_CLIENTS, F32_CLIENTS)
def zip_at_clients(x, y):
    return tff.federated_sum(tff.federated_map(_add, tff.federated_zip((x, y))))


@tff.federated_computation(F32_SERVER, F32_SERVER)
def zip_at_server(a, b):
    return tff.federated_map(_add, tff.federated_zip((a, b)))


@tff.federated_computation(F32_CLIENTS)
def value_at_clients(x):
    return tff.federated_sum(tff.federated_value(np.float32(1.5), tff.CLIENTS)), tff.federated_sum(
        x
    )


@tff.federated_computation
def value_at_server():
    return tff.federated_value(np.float32(2.0), tff.SERVER)


@tff.federated_computation(F32_CLIENTS)
def eval_at_clients(x):
    return tff.federated_sum(tff.federated_eval(_seven, tff.CLIENTS)), tff.federated_sum(x)


@tff.federated_computation
def eval_at_server():
    return tff.federated_eval(_seven, tff.SERVER)


@tff.federated_computation(F32_SERVER, F32_CLIENTS)
def broadcast(s, x):
    at_clients = tff.federated_broadcast(s)
    return tff.federated_sum(tff.federated_map(_add, tff.federated_zip((x, at_clients))))


@tff.federated_computation(F32_SERVER)
def apply(s):
    return tff.federated_map(_double, s)


@tff.federated_computation(F32_CLIENTS)
def aggregate(x):
    return tff.federated_aggregate(x, np.float32(0.0), _add, _add, _same)


@tff.federated_computation(F32_CLIENTS)
def plain_sum(x):
    return tff.federated_sum(x)


_to_int = tff.tensorflow.computation(lambda v: tf.cast(v, tf.int32), np.float32)


@tff.federated_computation(F32_CLIENTS)
def secure_sum_bitwidth(x):
    return tff.federated_secure_sum_bitwidth(tff.federated_map(_to_int, x), 8)


@tff.federated_computation(I32_CLIENTS)
def secure_sum(x):
    return tff.federated_secure_sum(x, 100)


@tff.federated_computation(I32_CLIENTS)
def secure_modular_sum(x):
    return mr_intrinsics.federated_secure_modular_sum(x, 10)


F32_SEQ = tff.SequenceType(np.float32)


@tff.tensorflow.computation(np.float32)
def _squared(x):
    return x * x


@tff.federated_computation(F32_SEQ)
def sequence_reduce(ds):
    return tff.sequence_reduce(ds, np.float32(0.0), _add)


@tff.federated_computation(F32_SEQ)
def sequence_map(ds):
    return tff.sequence_reduce(tff.sequence_map(_squared, ds), np.float32(0.0), _add)


# name -> (computation, args, reference context fixture name)
CASES: dict[str, tuple[Callable[..., Any], tuple[Any, ...], str]] = {
    "federated_map": (map_then_sum, (VALUES,), "native_context"),
    "federated_zip_at_clients": (zip_at_clients, (VALUES, VALUES[::-1]), "native_context"),
    "federated_zip_at_server": (
        zip_at_server,
        (np.float32(1.0), np.float32(2.0)),
        "native_context",
    ),
    "federated_value_at_clients": (value_at_clients, (VALUES,), "native_context"),
    "federated_value_at_server": (value_at_server, (), "native_context"),
    "federated_eval_at_clients": (eval_at_clients, (VALUES,), "native_context"),
    "federated_eval_at_server": (eval_at_server, (), "native_context"),
    "federated_broadcast": (broadcast, (np.float32(3.0), VALUES), "native_context"),
    "federated_apply": (apply, (np.float32(4.0),), "native_context"),
    "federated_aggregate": (aggregate, (VALUES,), "native_context"),
    # TFF's native runtime has no secure intrinsics; TFF's test runtime runs
    # them with insecure bodies, the semantics documented here.
    "federated_secure_sum_bitwidth": (secure_sum_bitwidth, (VALUES,), "test_context"),
    "federated_secure_sum": (secure_sum, (INTS,), "test_context"),
    "federated_secure_modular_sum": (secure_modular_sum, (INTS,), "test_context"),
    "sequence_reduce": (sequence_reduce, (VALUES,), "native_context"),
    "sequence_map": (sequence_map, (VALUES,), "native_context"),
}


@pytest.mark.parametrize("uri", sorted(CASES))
def test_intrinsic(uri: str, request: pytest.FixtureRequest, amqp_context: Any) -> None:
    comp, args, reference_name = CASES[uri]
    reference = request.getfixturevalue(reference_name)
    counts = amqp_context.runtime.intrinsic_calls
    before = counts[uri]
    actual = run_in(amqp_context, comp, *args)
    assert counts[uri] > before, f"{uri} never reached the coordinator's strategy"
    assert_close(actual, run_in(reference, comp, *args))


# TFF 0.87's native compiler never emits these (federated_sum becomes
# federated_aggregate, generic operators become TensorFlow): the executor API
# still accepts them, so they are driven through it directly, with hand-built
# intrinsic calls, and checked against the arithmetic they stand for.
PAIR = tff.to_type(collections.OrderedDict(a=np.float32, b=(np.int32, [2])))
PAIR_VALUE = collections.OrderedDict(a=np.float32(1.5), b=np.array([3, -4], np.int32))


def _generic(uri: str) -> Any:
    from tensorflow_federated.python.core.impl.compiler import building_blocks

    return building_blocks.Intrinsic(uri, tff.FunctionType(tff.StructType([PAIR, PAIR]), PAIR))


def _direct(amqp_context: Any, intrinsic: Any, arg: Any, arg_type: Any, clients: int) -> Any:
    from tensorflow_federated.python.core.impl.types import placements

    from tff_amqp.coordinator.stateful.context import AmqpExecutorFactory

    factory = AmqpExecutorFactory(amqp_context.runtime)

    async def run() -> Any:
        executor = factory.create_executor({placements.CLIENTS: clients})
        try:
            fn = await executor.create_value(intrinsic.proto, intrinsic.type_signature)
            value = await executor.create_value(arg, arg_type)
            return await (await executor.create_call(fn, value)).compute()
        finally:
            await executor.invocation.close()

    return amqp_context.run(run())


def _intrinsic(uri: str, parameter: Any, result: Any) -> Any:
    from tensorflow_federated.python.core.impl.compiler import building_blocks

    return building_blocks.Intrinsic(uri, tff.FunctionType(parameter, result))


def test_intrinsic_federated_sum(amqp_context: Any) -> None:
    intrinsic = _intrinsic("federated_sum", F32_CLIENTS, F32_SERVER)
    assert_close(_direct(amqp_context, intrinsic, VALUES, F32_CLIENTS, len(VALUES)), sum(VALUES))


def test_intrinsic_federated_map_all_equal(amqp_context: Any) -> None:
    all_equal = tff.FederatedType(np.float32, tff.CLIENTS, all_equal=True)
    mapped = _intrinsic(
        "federated_map_all_equal", tff.StructType([_double.type_signature, all_equal]), all_equal
    )
    summed = _intrinsic("federated_sum", F32_CLIENTS, F32_SERVER)
    from tensorflow_federated.python.core.impl.compiler import building_blocks

    # sum(map_all_equal(double, value_at_clients(x))) over 4 clients: 8x.
    x = building_blocks.Reference("x", all_equal)
    body = building_blocks.Call(
        summed,
        building_blocks.Call(mapped, building_blocks.Struct([_double.to_building_block(), x])),
    )
    comp = building_blocks.Lambda("x", all_equal, body)
    assert_close(_direct(amqp_context, comp, np.float32(1.25), all_equal, 4), 1.25 * 2 * 4)


@pytest.mark.parametrize(
    ("uri", "op"),
    [
        ("generic_plus", np.add),
        ("generic_multiply", np.multiply),
        ("generic_divide", np.divide),
    ],
)
def test_intrinsic_generic_operators(uri: str, op: Any, amqp_context: Any) -> None:
    pair_type = tff.StructType([PAIR, PAIR])
    actual = _direct(amqp_context, _generic(uri), (PAIR_VALUE, PAIR_VALUE), pair_type, 1)
    assert_close(
        actual, [op(PAIR_VALUE["a"], PAIR_VALUE["a"]), op(PAIR_VALUE["b"], PAIR_VALUE["b"])]
    )
