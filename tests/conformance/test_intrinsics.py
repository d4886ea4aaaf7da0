"""Federated intrinsics on tff-amqp against TFF's native runtime, under every
client distribution: sums (plain, secure, modular), means, min/max,
aggregate with dynamic accumulators, broadcasts, sequence intrinsics, and
sums over no clients at all."""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tests.conformance.harness import (
    DIST_PARAMS,
    DISTRIBUTIONS,
    ROW,
    WITH_EMPTY_PARAMS,
    Both,
    conform,
)
from tests.support.federation import assert_close

ROWS_AT_CLIENTS = tff.FederatedType(tff.SequenceType(ROW), tff.CLIENTS)


@tff.tensorflow.computation(tff.SequenceType(ROW))
def client_stats(rows: tf.data.Dataset) -> Any:
    """Per client: row count, sum of ages (int32), sum and max of glucose."""

    def step(acc: Any, row: Any) -> Any:
        return OrderedDict(
            count=acc["count"] + 1,
            age_sum=acc["age_sum"] + row["age"],
            glucose_sum=acc["glucose_sum"] + row["glucose"],
            glucose_max=tf.maximum(acc["glucose_max"], row["glucose"]),
        )

    zero = OrderedDict(
        count=np.int32(0),
        age_sum=np.int32(0),
        glucose_sum=np.float32(0.0),
        glucose_max=np.float32(-1e30),
    )
    return rows.reduce(zero, step)


def exact(actual: Any, expected: Any) -> None:
    """Integers compare exactly (assert_close would allow rounding)."""
    import tree

    a, e = tree.flatten(actual), tree.flatten(expected)
    assert len(a) == len(e)
    for x, y in zip(a, e, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype, (x, y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@tff.federated_computation(ROWS_AT_CLIENTS)
def sums(rows: Any) -> Any:
    stats = tff.federated_map(client_stats, rows)
    return (
        tff.federated_sum(stats.count),
        tff.federated_sum(stats.age_sum),
        tff.federated_sum(stats.glucose_sum),
    )


@pytest.mark.parametrize("dist", WITH_EMPTY_PARAMS)
def test_federated_sum(both: Both, dist: Any) -> None:
    actual, expected = both.run(sums, dist)
    exact(actual[:2], expected[:2])
    assert_close(actual[2], expected[2])
    assert int(expected[0]) == sum(len(r["age"]) for r in both.rows(dist)[1])


@tff.federated_computation(ROWS_AT_CLIENTS)
def secure_sums(rows: Any) -> Any:
    stats = tff.federated_map(client_stats, rows)
    pair = tff.federated_zip((stats.count, stats.age_sum))
    return (
        tff.federated_secure_sum_bitwidth(pair, 20),
        tff.federated_secure_sum(stats.count, 1000),
        tff.backends.mapreduce.federated_secure_modular_sum(stats.age_sum, 97),
    )


@pytest.mark.parametrize("dist", WITH_EMPTY_PARAMS)
def test_secure_sums_of_structs_and_modular(both: Both, dist: Any) -> None:
    # TFF's semantics (replace_secure_intrinsics_with_bodies): bitwidth and
    # max-input sums are plain sums; the modular sum is the sum of each
    # client's value mod 97, taken mod 97.
    actual, expected = both.run(secure_sums, dist)
    exact(actual, expected)
    ages = [int(r["age"].sum()) for r in both.rows(dist)[1]]
    assert int(expected[2]) == sum(a % 97 for a in ages) % 97


@tff.federated_computation(ROWS_AT_CLIENTS)
def quantized_secure_sums(rows: Any) -> Any:
    # tff.aggregators.secure_quantized_sum: client values quantized into
    # [lower, upper], summed with a secure sum, dequantized; bounds at the
    # server (float) and unplaced (int).
    stats = tff.federated_map(client_stats, rows)
    lower = tff.federated_value(np.float32(0.0), tff.SERVER)
    upper = tff.federated_value(np.float32(2000.0), tff.SERVER)
    return (
        tff.aggregators.secure_quantized_sum(stats.glucose_sum, lower, upper),
        tff.aggregators.secure_quantized_sum(stats.age_sum, np.int32(0), np.int32(5000)),
    )


@pytest.mark.parametrize("dist", WITH_EMPTY_PARAMS)
def test_secure_quantized_sum(both: Both, dist: Any) -> None:
    actual, expected = both.run(quantized_secure_sums, dist)
    assert_close(actual[0], expected[0])
    exact(actual[1], expected[1])
    ages = [int(r["age"].sum()) for r in both.rows(dist)[1]]
    assert int(expected[1]) == sum(ages)


@tff.federated_computation(ROWS_AT_CLIENTS)
def sampled_counts(rows: Any) -> Any:
    # tff.aggregators.federated_sample: each client's count, sampled (every
    # client is kept below the default sample size; the order is random).
    stats = tff.federated_map(client_stats, rows)
    return tff.aggregators.federated_sample(stats.count)


@pytest.mark.parametrize("dist", DIST_PARAMS)
def test_federated_sample(both: Both, dist: Any) -> None:
    actual, expected = both.run(sampled_counts, dist)
    counts = sorted(len(r["age"]) for r in both.rows(dist)[1])
    assert sorted(np.asarray(actual).tolist()) == sorted(np.asarray(expected).tolist()) == counts


@tff.federated_computation(ROWS_AT_CLIENTS)
def means_and_extremes(rows: Any) -> Any:
    stats = tff.federated_map(client_stats, rows)
    weight = tff.federated_map(
        tff.tensorflow.computation(lambda c: tf.cast(c, tf.float32)), stats.count
    )
    return (
        tff.federated_mean(stats.glucose_sum),
        tff.federated_mean(stats.glucose_sum, weight=weight),
        tff.federated_max(stats.glucose_max),
        tff.federated_min(stats.age_sum),
    )


@pytest.mark.parametrize("dist", DIST_PARAMS)
def test_means_min_max(both: Both, dist: Any) -> None:
    actual, expected = both.run(means_and_extremes, dist)
    assert_close(actual, expected)
    assert actual[3].dtype == np.int32


@tff.tensorflow.computation(tff.SequenceType(ROW))
def client_ages(rows: tf.data.Dataset) -> tf.Tensor:
    return rows.reduce(tf.zeros([0], tf.int32), lambda acc, row: tf.concat([acc, [row["age"]]], 0))


@tff.tensorflow.computation
def empty_ages() -> tf.Tensor:
    return tf.zeros([0], tf.int32)


@tff.tensorflow.computation(tff.TensorType(np.int32, [None]), tff.TensorType(np.int32, [None]))
def concat_ages(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    return tf.concat([a, b], 0)


@tff.tensorflow.computation(tff.TensorType(np.int32, [None]))
def sorted_ages(a: tf.Tensor) -> tf.Tensor:
    return tf.sort(a)


@tff.federated_computation(ROWS_AT_CLIENTS)
def gather_all_ages(rows: Any) -> Any:
    # The accumulator's shape is dynamic ([None]): its shape after merging
    # differs from the zero's. Sorted, so the order clients are folded in
    # (per silo, then merged) does not matter.
    return tff.federated_aggregate(
        tff.federated_map(client_ages, rows), empty_ages(), concat_ages, concat_ages, sorted_ages
    )


@pytest.mark.parametrize("dist", WITH_EMPTY_PARAMS)
def test_aggregate_with_dynamic_accumulator(both: Both, dist: Any) -> None:
    actual, expected = both.run(gather_all_ages, dist)
    exact(actual, expected)
    assert len(expected) == sum(len(r["age"]) for r in both.rows(dist)[1])


@tff.tensorflow.computation(tff.SequenceType(ROW), np.float32)
def shifted_glucose(rows: tf.data.Dataset, shift: tf.Tensor) -> tf.Tensor:
    return rows.reduce(np.float32(0.0), lambda acc, row: acc + row["glucose"] - shift)


@tff.federated_computation(ROWS_AT_CLIENTS, tff.FederatedType(np.float32, tff.SERVER))
def broadcast_then_aggregate(rows: Any, shift: Any) -> Any:
    # The broadcast value is CLIENTS-placed and all-equal; aggregating it
    # directly must count it once per client.
    at_clients = tff.federated_broadcast(shift)
    return (
        tff.federated_sum(
            tff.federated_map(shifted_glucose, tff.federated_zip((rows, at_clients)))
        ),
        tff.federated_sum(at_clients),
        tff.federated_mean(at_clients),
    )


@pytest.mark.parametrize("dist", DIST_PARAMS)
def test_broadcast_and_all_equal_aggregates(both: Both, dist: Any) -> None:
    actual, expected = both.run(lambda arg: broadcast_then_aggregate(arg, np.float32(2.5)), dist)
    assert_close(actual, expected)
    assert float(expected[1]) == pytest.approx(2.5 * len(both.rows(dist)[1]))


@tff.tensorflow.computation(ROW, ROW)
def row_fold(acc: Any, row: Any) -> Any:
    return OrderedDict(
        age=acc["age"] + row["age"], glucose=tf.maximum(acc["glucose"], row["glucose"])
    )


@tff.federated_computation(ROWS_AT_CLIENTS)
def sequence_reduce_per_client(rows: Any) -> Any:
    # tff.sequence_reduce on a CLIENTS-placed sequence: a per-client fold.
    zero = tff.federated_value(OrderedDict(age=np.int32(0), glucose=np.float32(-1e30)), tff.CLIENTS)
    folded = tff.sequence_reduce(rows, zero, row_fold)
    return tff.federated_sum(folded.age), tff.federated_max(folded.glucose)


@pytest.mark.parametrize("dist", DIST_PARAMS)
def test_sequence_reduce(both: Both, dist: Any) -> None:
    actual, expected = both.run(sequence_reduce_per_client, dist)
    conform(actual, expected)


@tff.federated_computation(ROWS_AT_CLIENTS)
def sequence_sum_per_client(rows: Any) -> Any:
    return tff.federated_sum(tff.sequence_sum(rows))


@tff.federated_computation(ROWS_AT_CLIENTS)
def sequence_map_per_client(rows: Any) -> Any:
    doubled = tff.sequence_map(tff.tensorflow.computation(lambda r: r["glucose"] * 2.0, ROW), rows)
    return tff.federated_sum(tff.sequence_sum(doubled))


@pytest.mark.parametrize(
    "comp", [sequence_sum_per_client, sequence_map_per_client], ids=["sequence_sum", "sequence_map"]
)
def test_sequence_intrinsics_native_cannot_run_are_refused(both: Both, comp: Any) -> None:
    # TFF 0.87's native runtime cannot run these outside TensorFlow
    # (sequence_sum: "TensorFlow Executor does not support intrinsic URI";
    # sequence_map: "Cant embed a Seqeuence which is not proto-backed"; with
    # sequence_reduce after it instead, native's worker hangs).
    # Conformance here is an error from tff-amqp too, not a made-up value.
    dist = DISTRIBUTIONS[1]
    with pytest.raises(Exception) as native_error:
        both.run(comp, dist)
    assert re.search("sequence|seqeuence", str(native_error.value), re.I), native_error.value
    amqp_arg, _ = both.datasets(dist)
    with pytest.raises(Exception) as amqp_error:
        _run(both.amqp, comp, amqp_arg)
    assert type(amqp_error.value).__module__.startswith("tff_amqp"), repr(amqp_error.value)
    assert re.search("sequence|seqeuence", str(amqp_error.value), re.I), amqp_error.value


@tff.federated_computation
def sum_of_ones_without_clients() -> Any:
    return tff.federated_sum(tff.federated_value(1, tff.CLIENTS))


@tff.federated_computation(tff.FederatedType(np.int32, tff.CLIENTS))
def sum_ints(values: Any) -> Any:
    return tff.federated_sum(values)


def test_no_client_argument_means_no_clients(both: Both) -> None:
    # With no CLIENTS-placed argument, TFF's native runtime has 0 clients
    # (default_num_clients=0), so the sum is 0, not the silos' client count.
    expected = _run(both.reference, sum_of_ones_without_clients)
    actual = _run(both.amqp, sum_of_ones_without_clients)
    assert int(expected) == 0
    exact(actual, expected)


def test_sum_over_an_empty_client_list(both: Both) -> None:
    expected = _run(both.reference, sum_ints, [])
    actual = _run(both.amqp, sum_ints, [])
    assert int(expected) == 0
    exact(actual, expected)


def _run(context: Any, comp: Any, *args: Any) -> Any:
    with tff.framework.get_context_stack().install(context):
        return comp(*args)
