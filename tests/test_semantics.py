"""TFF semantics the coordinator must keep in awkward cases, each compared with
TFF's native runtime in the same test (three real silo processes).

- fewer client values than silos (the cohort shrinks, the quorum with it);
- an empty client list (aggregations return their zero, as native does);
- no CLIENTS-placed argument at all (a silo then has 0 clients unless it says
  otherwise with --default-clients);
- aggregates whose value is all-equal at CLIENTS, or whose zero has a static
  shape where the accumulator's is dynamic;
- secure sums of structures, and the secure modular sum;
- a worker error inside a silo reaches the caller with the worker's gRPC status.
"""

from __future__ import annotations

import collections

import grpc
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.core.backends.mapreduce import intrinsics as mr_intrinsics

from tests.support.computations import F32_CLIENTS, checked_sum, fed_sum
from tests.support.federation import assert_close, run_in
from tff_amqp.errors import SiloError, SiloWorkerError

I32_CLIENTS = tff.FederatedType(np.int32, tff.CLIENTS)


@tff.federated_computation(F32_CLIENTS)
def sum_and_mean(x):
    return tff.federated_sum(x), tff.federated_mean(x)


@pytest.mark.parametrize("values", [[2.5], [1.0, -4.0], [1.0, 2.0, 3.0, 4.0]])
def test_fewer_or_uneven_clients_than_silos(values, amqp_context, native_context):
    expected = run_in(native_context, sum_and_mean, values)
    assert_close(run_in(amqp_context, sum_and_mean, values), expected)


def test_empty_client_list_sums_to_zero(amqp_context, native_context):
    expected = run_in(native_context, fed_sum, [])
    actual = run_in(amqp_context, fed_sum, [])
    assert actual == expected == 0.0


@tff.federated_computation
def count_default_clients():
    return tff.federated_sum(tff.federated_value(1, tff.CLIENTS))


def test_no_clients_argument_counts_zero_clients(amqp_context, native_context):
    expected = run_in(native_context, count_default_clients)
    assert expected == 0
    assert run_in(amqp_context, count_default_clients) == expected


@tff.tensorflow.computation(np.float32)
def _identity_f32(a):
    return a


@tff.federated_computation(tff.FederatedType(np.float32, tff.SERVER), F32_CLIENTS)
def aggregate_of_broadcast(server_value, x):
    # The value aggregated is all-equal at CLIENTS (a broadcast): the silo-side
    # aggregate must be typed as the intrinsic declares, not as the value is.
    @tff.tensorflow.computation(np.float32, np.float32)
    def add(a, b):
        return a + b

    broadcast = tff.federated_broadcast(server_value)
    return (
        tff.federated_aggregate(broadcast, np.float32(0.0), add, add, _identity_f32),
        tff.federated_sum(x),
    )


@tff.tensorflow.computation
def _empty_ints():
    return tf.zeros([0], tf.int32)


@tff.tensorflow.computation(tff.TensorType(np.int32, [None]), np.int32)
def _append(acc, v):
    return tf.concat([acc, tf.reshape(v, [1])], axis=0)


@tff.tensorflow.computation(tff.TensorType(np.int32, [None]), tff.TensorType(np.int32, [None]))
def _concat(a, b):
    return tf.concat([a, b], axis=0)


@tff.tensorflow.computation(tff.TensorType(np.int32, [None]))
def _sorted(a):
    return tf.sort(a)


@tff.federated_computation(I32_CLIENTS)
def collect_sorted(x):
    # The zero has a static shape [0]; the accumulator's is [None].
    return tff.federated_aggregate(x, _empty_ints(), _append, _concat, _sorted)


def test_aggregate_of_all_equal_value(amqp_context, native_context):
    args = (np.float32(1.5), [1.0, 2.0, 3.0, 4.0])
    expected = run_in(native_context, aggregate_of_broadcast, *args)
    assert_close(run_in(amqp_context, aggregate_of_broadcast, *args), expected)


def test_aggregate_with_dynamic_accumulator_shape(amqp_context, native_context):
    values = [5, -1, 7, 3, 3]
    expected = run_in(native_context, collect_sorted, values)
    actual = run_in(amqp_context, collect_sorted, values)
    np.testing.assert_array_equal(actual, expected)
    np.testing.assert_array_equal(actual, sorted(values))


STRUCT = collections.OrderedDict(a=np.int32, b=(np.int64, [2]))
STRUCT_CLIENTS = tff.FederatedType(tff.to_type(STRUCT), tff.CLIENTS)
STRUCT_VALUES = [
    collections.OrderedDict(a=np.int32(i), b=np.array([i, 2 * i], np.int64)) for i in range(5)
]


@tff.federated_computation(STRUCT_CLIENTS)
def secure_sum_of_struct(x):
    return (
        tff.federated_secure_sum_bitwidth(x, collections.OrderedDict(a=8, b=12)),
        tff.federated_secure_sum(x, 100),
    )


@tff.federated_computation(STRUCT_CLIENTS)
def plain_sum_of_struct(x):
    return tff.federated_sum(x), tff.federated_sum(x)


@tff.federated_computation(tff.FederatedType(tff.StructType([]), tff.CLIENTS))
def secure_sum_of_empty_struct(x):
    return tff.federated_secure_sum_bitwidth(x, ())


def test_secure_sums_of_structs_have_plain_sum_semantics(amqp_context, native_context):
    expected = run_in(native_context, plain_sum_of_struct, STRUCT_VALUES)
    assert_close(run_in(amqp_context, secure_sum_of_struct, STRUCT_VALUES), expected)


def test_secure_sum_of_empty_struct(amqp_context, native_context):
    values = [(), (), ()]
    actual = run_in(amqp_context, secure_sum_of_empty_struct, values)
    assert len(actual) == 0


@tff.federated_computation(I32_CLIENTS)
def modular_sum(x):
    return (
        mr_intrinsics.federated_secure_modular_sum(x, 7),
        mr_intrinsics.federated_secure_modular_sum(
            tff.federated_zip((x, x)), (np.int32(5), np.int32(1000))
        ),
    )


def test_secure_modular_sum(amqp_context, test_context):
    values = [3, 9, 11, 6, 2, 30, 4]
    expected = run_in(test_context, modular_sum, values)
    actual = run_in(amqp_context, modular_sum, values)
    assert_close(actual, expected)
    total = sum(values)
    assert_close(actual, (total % 7, (total % 5, total % 1000)))


def test_worker_error_keeps_its_grpc_status(amqp_context, native_context):
    values = [1.0, -2.0, 3.0]
    with pytest.raises(grpc.RpcError) as native_error:
        run_in(native_context, checked_sum, values)
    with pytest.raises(SiloError) as ours:
        run_in(amqp_context, checked_sum, values)
    # The SiloError names the silo and chains the gRPC error native raises,
    # with the same status code.
    assert isinstance(ours.value, SiloWorkerError)
    assert isinstance(ours.value.__cause__, grpc.RpcError)
    assert ours.value.__cause__.code() == native_error.value.code()
    assert ours.value.worker_status == native_error.value.code()
    assert "negative client value" in str(ours.value)


@tff.tensorflow.computation(np.float32, np.float32)
def _scaled(x, factor):
    return x * factor


@tff.tensorflow.computation(np.float32, np.float32)
def _next_state(state, total):
    return state + total / 10.0


@tff.federated_computation(
    tff.FederatedType(np.float32, tff.SERVER), tff.FederatedType(np.float32, tff.CLIENTS)
)
def one_round(state, data):
    scaled = tff.federated_map(_scaled, tff.federated_zip((data, tff.federated_broadcast(state))))
    total = tff.federated_sum(scaled)
    return tff.federated_map(_next_state, tff.federated_zip((state, total))), total


@pytest.mark.parametrize("form", ["map_reduce", "distribute_aggregate"])
def test_round_trip_through_tff_forms_runs_on_the_stateful_context(
    form, amqp_context, native_context
):
    # Computations rebuilt from a MapReduceForm / DistributeAggregateForm carry
    # the secure sums (of <>) and the secure modular sum that every such form has.
    mr = tff.backends.mapreduce
    if form == "map_reduce":
        rebuilt = mr.get_computation_for_map_reduce_form(
            mr.get_map_reduce_form_for_computation(one_round)
        )
    else:
        rebuilt = mr.get_computation_for_distribute_aggregate_form(
            mr.get_distribute_aggregate_form_for_computation(one_round)
        )
    args = (np.float32(2.0), [1.0, 2.0, 3.0, -4.0, 0.5])
    expected = run_in(native_context, one_round, *args)
    assert_close(run_in(amqp_context, rebuilt, *args), expected)
    assert_close(
        run_in(amqp_context, rebuilt, np.float32(1.0), [3.0]),
        run_in(native_context, one_round, np.float32(1.0), [3.0]),
    )
