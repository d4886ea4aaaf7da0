"""Results over real RabbitMQ and real silo processes equal TFF's native runtime.

Three silo agents (separate processes, each with its own worker_binary) serve
one federation; every computation runs once through tff-amqp and once through
TFF's native C++ runtime in the same process, and the results must agree.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tests.support.computations import F32_CLIENTS, fed_mean, fed_sum
from tests.support.federation import assert_close, run_in

# Long real-broker tests: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

CLIENT_VALUES = [1.0, 2.5, -3.0, 4.0, 10.0, 0.5, 7.25]
WEIGHTS = [1.0, 2.0, 0.5, 3.0, 1.0, 4.0, 2.0]


@tff.federated_computation(F32_CLIENTS, F32_CLIENTS)
def fed_weighted_mean(x, w):
    return tff.federated_mean(x, weight=w)


@tff.federated_computation(F32_CLIENTS)
def fed_min(x):
    return tff.federated_min(x)


@tff.federated_computation(F32_CLIENTS)
def fed_max(x):
    return tff.federated_max(x)


NESTED = collections.OrderedDict(
    a=np.float32, b=collections.OrderedDict(c=np.int32, d=(np.float32, [2]))
)
NESTED_CLIENTS = tff.FederatedType(tff.to_type(NESTED), tff.CLIENTS)
NESTED_VALUES = [
    collections.OrderedDict(
        a=np.float32(i * 1.5),
        b=collections.OrderedDict(c=np.int32(i), d=np.array([i, -i / 2], np.float32)),
    )
    for i in range(5)
]


@tff.federated_computation(NESTED_CLIENTS)
def nested_sum_and_mean(x):
    return tff.federated_sum(x), tff.federated_mean(x.a), tff.federated_max(x.b.c)


@tff.tensorflow.computation(np.float32, np.float32)
def scale(x, factor):
    return x * factor


@tff.federated_computation(tff.FederatedType(np.float32, tff.SERVER), F32_CLIENTS)
def broadcast_map_aggregate(factor, x):
    factor_at_clients = tff.federated_broadcast(factor)
    scaled = tff.federated_map(scale, tff.federated_zip((x, factor_at_clients)))
    return tff.federated_sum(scaled)


@tff.tensorflow.computation(np.float32, np.float32)
def multiply(x, w):
    return x * w


@tff.federated_computation(F32_CLIENTS, F32_CLIENTS)
def zip_then_sum(x, w):
    return tff.federated_sum(tff.federated_map(multiply, tff.federated_zip((x, w))))


@tff.tensorflow.computation(np.float32, np.float32)
def squared_deviation(x, mean):
    return (x - mean) ** 2


@tff.federated_computation(F32_CLIENTS)
def two_phase_variance(x):
    # Phase 1: the mean; broadcast it; phase 2: the mean squared deviation.
    mean = tff.federated_mean(x)
    deviations = tff.federated_map(
        squared_deviation, tff.federated_zip((x, tff.federated_broadcast(mean)))
    )
    return mean, tff.federated_mean(deviations)


@tff.federated_computation(F32_CLIENTS)
def server_struct_of_aggregates(x):
    return tff.federated_zip(
        collections.OrderedDict(
            total=tff.federated_sum(x),
            mean=tff.federated_mean(x),
            low=tff.federated_min(x),
            high=tff.federated_max(x),
        )
    )


to_int = tff.tensorflow.computation(lambda v: tf.cast(v, tf.int32), np.float32)


@tff.federated_computation(F32_CLIENTS)
def secure_sum_of_ints(x):
    return tff.federated_secure_sum_bitwidth(tff.federated_map(to_int, x), 16)


@tff.federated_computation(F32_CLIENTS)
def plain_sum_of_ints(x):
    return tff.federated_sum(tff.federated_map(to_int, x))


CASES = {
    "sum": (fed_sum, (CLIENT_VALUES,)),
    "mean": (fed_mean, (CLIENT_VALUES,)),
    "weighted_mean": (fed_weighted_mean, (CLIENT_VALUES, WEIGHTS)),
    "min": (fed_min, (CLIENT_VALUES,)),
    "max": (fed_max, (CLIENT_VALUES,)),
    "nested_struct": (nested_sum_and_mean, (NESTED_VALUES,)),
    "broadcast_map_aggregate": (broadcast_map_aggregate, (np.float32(3.0), CLIENT_VALUES)),
    "zip": (zip_then_sum, (CLIENT_VALUES, WEIGHTS)),
    "two_phases": (two_phase_variance, (CLIENT_VALUES,)),
    "server_struct": (server_struct_of_aggregates, (CLIENT_VALUES,)),
}


def test_secure_sum_has_plain_sum_semantics(amqp_context, native_context):
    # TFF's native worker has no secure intrinsics; the documented semantics
    # are those of a plain federated_sum, which native does run.
    expected = run_in(native_context, plain_sum_of_ints, CLIENT_VALUES)
    actual = run_in(amqp_context, secure_sum_of_ints, CLIENT_VALUES)
    assert actual == expected
    assert actual.dtype == np.int32


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_native(case, amqp_context, native_context):
    comp, args = CASES[case]
    expected = run_in(native_context, comp, *args)
    actual = run_in(amqp_context, comp, *args)
    assert_close(actual, expected)


def test_server_only_computation_needs_no_silo_round_trip(amqp_context, native_context):
    @tff.federated_computation(tff.FederatedType(np.float32, tff.SERVER))
    def double_on_server(x):
        return tff.federated_map(tff.tensorflow.computation(lambda v: v * 2.0, np.float32), x)

    link = amqp_context.runtime.link
    # Earlier invocations' `close` messages go out in the background; let them.
    amqp_context.run(amqp_context.runtime.settle())
    published_before = link.stats["published"]
    assert run_in(amqp_context, double_on_server, np.float32(21.0)) == pytest.approx(42.0)
    assert run_in(native_context, double_on_server, np.float32(21.0)) == pytest.approx(42.0)
    assert link.stats["published"] == published_before


def _keras_model() -> tf.keras.Model:
    return tf.keras.Sequential(
        [
            tf.keras.layers.InputLayer(input_shape=(4,)),
            tf.keras.layers.Dense(
                3, kernel_initializer=tf.keras.initializers.GlorotUniform(seed=7)
            ),
            tf.keras.layers.Softmax(),
        ]
    )


def _client_datasets(n: int) -> list[tf.data.Dataset]:
    rng = np.random.default_rng(42)
    datasets = []
    for i in range(n):
        x = rng.normal(size=(12 + 3 * i, 4)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1).astype(np.int32)
        datasets.append(
            tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y)).batch(5)
        )
    return datasets


def test_fedavg_three_rounds_matches_native(amqp_context, native_context):
    datasets = _client_datasets(5)
    input_spec = datasets[0].element_spec

    def model_fn():
        return tff.learning.models.from_keras_model(
            _keras_model(),
            input_spec=input_spec,
            loss=tf.keras.losses.SparseCategoricalCrossentropy(),
            metrics=[tf.keras.metrics.SparseCategoricalAccuracy()],
        )

    process = tff.learning.algorithms.build_weighted_fed_avg(
        model_fn,
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=0.1),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=1.0),
    )

    def three_rounds(context):
        with tff.framework.get_context_stack().install(context):
            state = process.initialize()
            metrics = []
            for _ in range(3):
                output = process.next(state, datasets)
                state = output.state
                metrics.append(output.metrics)
            return process.get_model_weights(state), metrics

    native_weights, native_metrics = three_rounds(native_context)
    amqp_weights, amqp_metrics = three_rounds(amqp_context)
    assert_close(amqp_weights.trainable, native_weights.trainable)
    assert_close(
        amqp_metrics[-1]["client_work"]["train"],
        native_metrics[-1]["client_work"]["train"],
    )
