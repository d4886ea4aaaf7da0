"""TFF computations several test files run, written once.

Imports TensorFlow Federated: import this module inside a test (or in a test
file that imports TFF anyway), not at collection time of a fast test file.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

# Client data of `write_silo_csvs` (tests/support/data.py): the CSV columns
# read, cast to these dtypes.
ROW = collections.OrderedDict(age=np.int32, glucose=np.float32)
ROWS_AT_CLIENTS = tff.FederatedType(tff.SequenceType(ROW), tff.CLIENTS)
# Client data of `write_xy_clients`.
XY_ROW = collections.OrderedDict(x=np.float32, y=np.float32)
F32_CLIENTS = tff.FederatedType(np.float32, tff.CLIENTS)


@tff.federated_computation(F32_CLIENTS)
def fed_sum(x: Any) -> Any:
    return tff.federated_sum(x)


@tff.federated_computation(F32_CLIENTS)
def fed_mean(x: Any) -> Any:
    return tff.federated_mean(x)


@tff.tensorflow.computation(np.float32)
def _fails_for_negative(v: Any) -> Any:
    check = tf.debugging.assert_non_negative(v, message="negative client value")
    with tf.control_dependencies([check]):
        return tf.identity(v)


@tff.federated_computation(F32_CLIENTS)
def checked_sum(x: Any) -> Any:
    """The sum of client values; a negative one fails in TensorFlow (a
    worker error, with the gRPC status native raises)."""
    return tff.federated_sum(tff.federated_map(_fails_for_negative, x))


@tff.tensorflow.computation(tff.SequenceType(ROW))
def glucose_sum_and_count(rows: Any) -> Any:
    """One client's (sum of glucose, number of rows), in float64."""
    return rows.reduce(
        (np.float64(0.0), np.float64(0.0)),
        lambda acc, row: (acc[0] + tf.cast(row["glucose"], tf.float64), acc[1] + 1.0),
    )


@tff.federated_computation(ROWS_AT_CLIENTS)
def glucose_totals(rows: Any) -> Any:
    """(sum of glucose, number of rows) over every client of every silo."""
    return tff.federated_sum(tff.federated_map(glucose_sum_and_count, rows))


@tff.tensorflow.computation(np.float64, np.float64)
def _divide(total: Any, count: Any) -> Any:
    return total / count


@tff.federated_computation(ROWS_AT_CLIENTS)
def mean_glucose(rows: Any) -> Any:
    """The mean glucose of every row of every client, at the server."""
    sums = tff.federated_sum(tff.federated_map(glucose_sum_and_count, rows))
    return tff.federated_map(_divide, sums)


# Each client's work in `slow_mean` sleeps this long inside TensorFlow (in
# the silo's worker): a round of about 2 s, for faults injected mid-round.
ROUND_SLEEP_US = 1_800_000


@tff.tensorflow.computation(tff.SequenceType(ROW))
def _slow_sum_and_count(rows: Any) -> Any:
    from tensorflow.python.data.experimental.ops import testing as tf_data_testing

    pause = tf.data.Dataset.range(1).apply(tf_data_testing.sleep(ROUND_SLEEP_US))
    waited = pause.reduce(np.int64(0), lambda acc, x: acc + x)  # 0: only the time counts
    return rows.reduce(
        (tf.cast(waited, tf.float64), np.float64(0.0)),
        lambda acc, row: (acc[0] + tf.cast(row["glucose"], tf.float64), acc[1] + 1.0),
    )


@tff.federated_computation(ROWS_AT_CLIENTS)
def slow_mean(rows: Any) -> Any:
    """`mean_glucose`, with every client's work taking ~1.8 s."""
    sums = tff.federated_sum(tff.federated_map(_slow_sum_and_count, rows))
    return tff.federated_map(_divide, sums)


def fedavg_round() -> tuple[Any, Any]:
    """(initialize, round): TFF's weighted FedAvg on a 1-feature linear Keras
    model; the round batches each client's CSV rows itself, so its client data
    is `silo_data(KEY)` of {<x=float32,y=float32>*}@CLIENTS (`write_xy_clients`)."""

    def model_fn() -> Any:
        keras_model = tf.keras.Sequential(
            [
                tf.keras.layers.InputLayer(input_shape=(1,)),
                tf.keras.layers.Dense(1, kernel_initializer="zeros"),
            ]
        )
        return tff.learning.models.from_keras_model(
            keras_model,
            input_spec=(
                tf.TensorSpec([None, 1], tf.float32),
                tf.TensorSpec([None, 1], tf.float32),
            ),
            loss=tf.keras.losses.MeanSquaredError(),
        )

    process = tff.learning.algorithms.build_weighted_fed_avg(
        model_fn, client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=0.1)
    )

    @tff.tensorflow.computation(tff.SequenceType(XY_ROW))
    def to_batches(rows: Any) -> Any:
        return rows.batch(3).map(
            lambda r: (tf.reshape(r["x"], [-1, 1]), tf.reshape(r["y"], [-1, 1]))
        )

    @tff.federated_computation(
        process.next.type_signature.parameter[0],
        tff.FederatedType(tff.SequenceType(XY_ROW), tff.CLIENTS),
    )
    def fedavg(state: Any, rows: Any) -> Any:
        return process.next(state, tff.federated_map(to_batches, rows))

    return process.initialize, fedavg
