"""Aggregates folded on the coordinator in NumPy (numpy_ops): the same results
and dtypes as TFF's native runtime, no calls to the coordinator's worker where
merge and report are element-wise arithmetic, and the worker as before where
they are anything else."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tests.support.federation import SILO_NAMES, assert_close, run_in
from tff_amqp.coordinator.stateful.counts import snapshot
from tff_amqp.inprocess import numpy_ops

# Long real-broker tests: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

VALUES = [1.0, 2.5, -3.0, 4.0, 10.0, 0.5, 7.25]
INTS = [3, -7, 2**30, 2**30, 5, 0, 11]  # the int32 sum wraps, as in TF
TYPES = collections.OrderedDict(
    f32=(np.float32, [2]), f64=np.float64, i32=np.int32, i64=(np.int64, [3])
)
MIXED_CLIENTS = tff.FederatedType(tff.to_type(TYPES), tff.CLIENTS)
MIXED = [
    collections.OrderedDict(
        f32=np.array([v, -v / 3], np.float32),
        f64=np.float64(v / 7),
        i32=np.int32(i),
        i64=np.array([i, -2 * i, 2**40 + i], np.int64),
    )
    for v, i in zip(VALUES, INTS, strict=True)
]


@tff.federated_computation(MIXED_CLIENTS)
def sum_min_max_mixed(x):
    return (
        tff.federated_sum(x),
        tff.federated_min(x.i64),
        tff.federated_max(x.f32),
        tff.federated_mean(x.f64),
        tff.federated_mean(x.f32, weight=x.f64),
    )


@tff.federated_computation(tff.FederatedType(np.int32, tff.CLIENTS))
def int_sum_min_max(x):
    return tff.federated_sum(x), tff.federated_min(x), tff.federated_max(x)


def _leaf_dtypes(value):
    import tree

    from tests.support.federation import _normalize

    return [np.asarray(leaf).dtype for leaf in tree.flatten(_normalize(value))]


@tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
def zipped_aggregates_then_applied(x):
    pair = tff.federated_zip(
        collections.OrderedDict(total=tff.federated_sum(x), top=tff.federated_max(x))
    )
    return tff.federated_map(
        tff.tensorflow.computation(lambda p: p["total"] * 2.0 - p["top"]), pair
    ), pair


@pytest.mark.parametrize(
    "comp, arg",
    [
        (sum_min_max_mixed, MIXED),
        (int_sum_min_max, INTS),
        (zipped_aggregates_then_applied, VALUES),
    ],
    ids=["mixed", "int32", "zip"],
)
def test_folded_in_numpy_like_native(comp, arg, amqp_context, native_context):
    expected = run_in(native_context, comp, arg)
    actual = run_in(amqp_context, comp, arg)
    assert_close(actual, expected)
    assert _leaf_dtypes(actual) == _leaf_dtypes(expected)


def test_mean_needs_no_merge_or_report_on_the_coordinator_worker(amqp_context, native_context):
    from tests.support.computations import fed_mean

    run_in(amqp_context, fed_mean, VALUES)
    before = amqp_context.run(snapshot(amqp_context.runtime, list(SILO_NAMES)))
    actual = run_in(amqp_context, fed_mean, VALUES)
    counts = amqp_context.run(snapshot(amqp_context.runtime, list(SILO_NAMES))).minus(before)
    assert_close(actual, run_in(native_context, fed_mean, VALUES))
    # No partial enters the coordinator's worker, no struct is built there.
    assert "CreateValue" not in counts.coordinator, counts.coordinator
    assert "CreateStruct" not in counts.coordinator, counts.coordinator


# A merge TFF's own factories do not produce: not element-wise arithmetic
# between parameters (a constant, a square root), so it runs on the worker.
@tff.tensorflow.computation(np.float32, np.float32)
def root_of_squares(a, b):
    return tf.sqrt(a * a + b * b)


@tff.tensorflow.computation(np.float32)
def halve(a):
    return a * 0.5


@tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
def custom_aggregate(x):
    return tff.federated_aggregate(x, np.float32(0.0), root_of_squares, root_of_squares, halve)


def test_general_merge_and_report_fall_back_to_the_worker(amqp_context, native_context):
    positive = [abs(v) for v in VALUES]
    expected = run_in(native_context, custom_aggregate, positive)
    assert_close(run_in(amqp_context, custom_aggregate, positive), expected)


def test_only_elementwise_arithmetic_is_taken():
    from tensorflow_federated.python.core.impl.compiler import building_blocks
    from tensorflow_federated.python.core.impl.computation import computation_impl

    def bb(comp):
        proto = computation_impl.ConcreteComputation.get_proto(comp)
        return building_blocks.ComputationBuildingBlock.from_proto(proto)

    @tff.tensorflow.computation(np.int32, np.int32)
    def int_divide(a, b):
        return tf.math.truediv(a, b)

    @tff.tensorflow.computation((np.float32, [2]), (np.float32, [2]))
    def add_vectors(a, b):
        return a + b

    assert numpy_ops.host_function(bb(root_of_squares)) is None
    assert numpy_ops.host_function(bb(int_divide)) is None
    halved = numpy_ops.host_function(bb(halve))  # with a small constant
    assert halved is not None
    assert halved(np.float32(3.0)) == np.float32(1.5)
    assert halved(np.float32(3.0)).dtype == np.float32
    add = numpy_ops.host_function(bb(add_vectors))
    assert add is not None
    from tensorflow_federated.python.common_libs import structure

    out = add(
        structure.Struct(
            [(None, np.array([1, 2], np.float32)), (None, np.array([0.5, 0.25], np.float32))]
        )
    )
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [1.5, 2.25])


def test_small_constants_are_computed_here_large_ones_are_not():
    from tensorflow_federated.python.common_libs import structure
    from tensorflow_federated.python.core.impl.compiler import building_blocks
    from tensorflow_federated.python.core.impl.computation import computation_impl

    def bb(comp):
        proto = computation_impl.ConcreteComputation.get_proto(comp)
        return building_blocks.ComputationBuildingBlock.from_proto(proto)

    @tff.tensorflow.computation
    def weight_and_zeros():
        return np.float32(1.0), tf.zeros([3], tf.int64)

    @tff.tensorflow.computation
    def big_zeros():
        return tf.constant(np.zeros([100_000], np.float32))

    @tff.tensorflow.computation
    def random():
        return tf.random.uniform([2])

    ok, value = numpy_ops.constant_value(bb(weight_and_zeros))
    assert ok and isinstance(value, structure.Struct)
    assert value[0] == np.float32(1.0) and value[0].dtype == np.float32
    np.testing.assert_array_equal(value[1], np.zeros([3], np.int64))
    assert value[1].dtype == np.int64
    assert numpy_ops.constant_value(bb(big_zeros)) == (False, None)
    assert numpy_ops.constant_value(bb(random)) == (False, None)


# Element-wise computations with every op numpy_ops runs, compared with
# TensorFlow's own result for the same inputs (TFF's native runtime), bit for
# bit, also where results overflow or are not numbers.
@tff.tensorflow.computation((np.float32, [5]), (np.float32, [5]))
def every_float_op(a, b):
    return (
        tf.math.squared_difference(a, b),
        tf.square(a) - tf.abs(b),
        -a * 2.5 + b / 3.0,
        tf.maximum(a, b) - tf.minimum(a, 1.0),
    )


@tff.tensorflow.computation((np.int32, [4]), (np.int32, [4]))
def every_int_op(a, b):
    return tf.math.squared_difference(a, b), tf.abs(a) - tf.square(b) * 3, -a


def test_elementwise_ops_equal_tensorflow_bit_for_bit(native_context):
    from tensorflow_federated.python.common_libs import structure
    from tensorflow_federated.python.core.impl.compiler import building_blocks
    from tensorflow_federated.python.core.impl.computation import computation_impl

    def bb(comp):
        proto = computation_impl.ConcreteComputation.get_proto(comp)
        return building_blocks.ComputationBuildingBlock.from_proto(proto)

    floats = (
        np.array([1.5, -2.0, 3e38, 0.0, np.nan], np.float32),
        np.array([0.25, 7.0, -3e38, -0.0, 1.0], np.float32),
    )
    ints = (np.array([3, -7, 2**31 - 1, 0], np.int32), np.array([-2, 5, 40000, 0], np.int32))
    for comp, args in ((every_float_op, floats), (every_int_op, ints)):
        host = numpy_ops.host_function(bb(comp))
        assert host is not None, comp
        ours = host(structure.Struct([(None, args[0]), (None, args[1])]))
        theirs = run_in(native_context, comp, *args)
        for mine, native in zip(ours, theirs, strict=True):
            assert mine.dtype == native.dtype
            np.testing.assert_array_equal(mine, native)
