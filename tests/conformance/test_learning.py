"""Every process builder of tff.learning.algorithms on tff-amqp against TFF's
native runtime: two rounds of a tiny linear model on every client
distribution.

Each process is built once; its `next` (or evaluation computation) is
wrapped in a computation that turns each client's rows into batches at the
client, so explicit client lists and each silo's CSV data go through the
same code. Initial weights are zeros or seeded, optimizers plain SGD: the
whole output is deterministic and must agree (rtol 1e-5).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff
import tree

from tests.conformance.harness import (
    DIST_PARAMS,
    DISTRIBUTIONS,
    ROW,
    Both,
    conform,
)

pytestmark = pytest.mark.slow

ROWS_AT_CLIENTS = tff.FederatedType(tff.SequenceType(ROW), tff.CLIENTS)
ROUNDS = 2
BATCH = 3


def _example(row: Any) -> Any:
    # Silo CSVs hold glucose around 1000 * (silo + 1) + 5.5; explicit rows
    # around 5.5: the remainder mod 1000 keeps both in one range.
    x = tf.stack([tf.math.floormod(row["glucose"], 1000.0) / 10.0, 1.0])
    y = tf.reshape(tf.cast(row["age"], tf.float32) / 100.0, [1])
    return OrderedDict(x=x, y=y)


@functools.cache
def batches() -> Any:
    return tff.tensorflow.computation(
        lambda rows: rows.map(_example).batch(BATCH), tff.SequenceType(ROW)
    )


@functools.cache
def points() -> Any:
    return tff.tensorflow.computation(
        lambda rows: rows.map(lambda r: _example(r)["x"]), tff.SequenceType(ROW)
    )


@functools.cache
def train_and_test() -> Any:
    # Personalization eval (unbatched, as it asks): the first rows to
    # fine-tune on, all rows to test.
    return tff.tensorflow.computation(
        lambda rows: OrderedDict(
            train_data=rows.map(_example).take(BATCH),
            test_data=rows.map(_example),
        ),
        tff.SequenceType(ROW),
    )


INPUT_SPEC = OrderedDict(
    x=tf.TensorSpec([None, 2], tf.float32), y=tf.TensorSpec([None, 1], tf.float32)
)


def keras_model() -> tf.keras.Model:
    return tf.keras.Sequential(
        [tf.keras.layers.Dense(1, kernel_initializer="zeros", input_shape=(2,))]
    )


def model_fn() -> Any:
    return tff.learning.models.from_keras_model(
        keras_model(),
        input_spec=INPUT_SPEC,
        loss=tf.keras.losses.MeanSquaredError(),
        metrics=[tf.keras.metrics.MeanAbsoluteError()],
    )


def recon_model_fn() -> Any:
    # A global kernel and a per-client (reconstructed) bias.
    inputs = tf.keras.Input(shape=(2,))
    global_layer = tf.keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")
    local_layer = tf.keras.layers.Dense(1, kernel_initializer="zeros")
    outputs = tf.keras.layers.Add()([global_layer(inputs), local_layer(inputs)])
    return tff.learning.models.ReconstructionModel.from_keras_model_and_layers(
        tf.keras.Model(inputs, outputs),
        global_layers=[global_layer],
        local_layers=[local_layer],
        input_spec=INPUT_SPEC,
    )


def functional_model() -> Any:
    return tff.learning.models.functional_model_from_keras(
        keras_model(),
        loss_fn=tf.keras.losses.MeanSquaredError(),
        input_spec=INPUT_SPEC,
        metrics_constructor=OrderedDict(mae=tf.keras.metrics.MeanAbsoluteError),
    )


def sgd(lr: float) -> Any:
    return tff.learning.optimizers.build_sgdm(learning_rate=lr)


def _mse() -> Any:
    return tf.keras.losses.MeanSquaredError()


def _mae() -> list[Any]:
    return [tf.keras.metrics.MeanAbsoluteError()]


ALG = tff.learning.algorithms
# name -> builder of a tff.learning.templates.LearningProcess
PROCESSES: dict[str, Callable[[], Any]] = {
    "fed_avg": lambda: ALG.build_weighted_fed_avg(model_fn, sgd(0.1), sgd(1.0)),
    "fed_avg_unweighted": lambda: ALG.build_unweighted_fed_avg(model_fn, sgd(0.1), sgd(1.0)),
    "fed_avg_functional": lambda: ALG.build_weighted_fed_avg(
        functional_model(), sgd(0.1), sgd(1.0)
    ),
    "fed_avg_schedule": lambda: ALG.build_weighted_fed_avg_with_optimizer_schedule(
        model_fn, lambda round_num: 0.1 / (1 + tf.cast(round_num, tf.float32)), sgd, sgd(1.0)
    ),
    "fed_prox": lambda: ALG.build_weighted_fed_prox(model_fn, 0.1, sgd(0.1), sgd(1.0)),
    "fed_prox_unweighted": lambda: ALG.build_unweighted_fed_prox(model_fn, 0.1, sgd(0.1), sgd(1.0)),
    "fed_sgd": lambda: ALG.build_fed_sgd(model_fn, sgd(0.5)),
    "mime_lite": lambda: ALG.build_weighted_mime_lite(
        model_fn, tff.learning.optimizers.build_sgdm(0.1, momentum=0.9), sgd(1.0)
    ),
    "mime_lite_unweighted": lambda: ALG.build_unweighted_mime_lite(
        model_fn, tff.learning.optimizers.build_sgdm(0.1, momentum=0.9), sgd(1.0)
    ),
    "mime_lite_schedule": lambda: ALG.build_mime_lite_with_optimizer_schedule(
        model_fn,
        lambda round_num: 0.1 / (1 + tf.cast(round_num, tf.float32)),
        tff.learning.optimizers.build_sgdm(0.1, momentum=0.9),
        sgd(1.0),
    ),
    "fed_recon": lambda: ALG.build_fed_recon(
        recon_model_fn,
        loss_fn=_mse,
        metrics_fn=_mae,
        server_optimizer_fn=sgd(1.0),
        client_optimizer_fn=sgd(0.1),
        reconstruction_optimizer_fn=sgd(0.1),
    ),
    "fed_recon_eval": lambda: ALG.build_fed_recon_eval(
        recon_model_fn, loss_fn=_mse, metrics_fn=_mae
    ),
    "fed_eval": lambda: ALG.build_fed_eval(model_fn),
    "fed_eval_functional": lambda: ALG.build_fed_eval(functional_model()),
    # A fixed seed: the initial centroids are the same in both runtimes.
    "kmeans": lambda: ALG.build_fed_kmeans(2, (2,), random_seed=(5, 7)),
}


# FedAvg's round (with the clients' batching) taken through TFF's MapReduceForm
# and DistributeAggregateForm and back: the learning-sized round trip.
FORM_ROUND_TRIPS = {
    "fed_avg_map_reduce": lambda mr, comp: mr.get_computation_for_map_reduce_form(
        mr.get_map_reduce_form_for_computation(comp)
    ),
    "fed_avg_distribute_aggregate": lambda mr, comp: (
        mr.get_computation_for_distribute_aggregate_form(
            mr.get_distribute_aggregate_form_for_computation(comp)
        )
    ),
}


@functools.cache
def built(name: str) -> tuple[Any, Any]:
    """(initialize, step) where step(state, rows@CLIENTS) -> (state, metrics)."""
    if name in FORM_ROUND_TRIPS:
        initialize, step = built("fed_avg")
        return initialize, FORM_ROUND_TRIPS[name](tff.backends.mapreduce, step)
    process = PROCESSES[name]()
    prepare = points() if name == "kmeans" else batches()
    state_type = process.initialize.type_signature.result

    @tff.federated_computation(state_type, ROWS_AT_CLIENTS)
    def step(state: Any, rows: Any) -> Any:
        out = process.next(state, tff.federated_map(prepare, rows))
        return out.state, out.metrics

    return process.initialize, step


def _rounds(initialize: Any, step: Any, arg: Any) -> list[Any]:
    state = initialize()
    outputs = []
    for _ in range(ROUNDS):
        state, metrics = step(state, arg)
        outputs.append((state, metrics))
    return outputs


def _without_timings(value: Any) -> Any:
    """Drop wall-time measurements (they differ between any two runs)."""
    if isinstance(value, dict):
        return OrderedDict(
            (k, _without_timings(v)) for k, v in value.items() if not str(k).endswith("_time")
        )
    if isinstance(value, list | tuple) and not hasattr(value, "_fields"):
        return [_without_timings(v) for v in value]
    return value


# Wall time: every process on three distributions (fewer clients than silos,
# uneven lists, uneven silo data); FedAvg, the reference algorithm, on all.
LEARNING_DISTS = [d for d in DISTRIBUTIONS if d.name in ("list2", "list7", "silo_data")]


def _learning_params() -> list[Any]:
    return [
        pytest.param(name, dist, id=f"{name}-{dist.name}")
        for name in [*PROCESSES, *FORM_ROUND_TRIPS]
        for dist in (DISTRIBUTIONS if name == "fed_avg" else LEARNING_DISTS)
    ]


@pytest.mark.parametrize(("name", "dist"), _learning_params())
def test_learning_process(both: Both, name: str, dist: Any) -> None:
    initialize, step = built(name)
    actual, expected = both.run(lambda arg: _rounds(initialize, step, arg), dist)
    conform(_without_timings(actual), _without_timings(expected))


def _evaluate(model: Any, data: tf.data.Dataset) -> Any:
    def add(acc: Any, batch: Any) -> Any:
        out = model.forward_pass(batch, training=False)
        n = tf.cast(out.num_examples, tf.float32)
        return acc[0] + out.loss * n, acc[1] + n

    total, n = data.batch(BATCH).reduce((0.0, 0.0), add)
    return OrderedDict(loss=total / tf.maximum(n, 1.0))


def _finetune_fn() -> Any:
    @tf.function
    def finetune(model: Any, train_data: Any, test_data: Any, context: Any = None) -> Any:
        def step(_: Any, batch: Any) -> Any:
            with tf.GradientTape() as tape:
                loss = model.forward_pass(batch).loss
            grads = tape.gradient(loss, model.trainable_variables)
            for var, grad in zip(model.trainable_variables, grads, strict=True):
                var.assign_sub(0.1 * grad)
            return 0

        train_data.batch(BATCH).reduce(0, step)
        return _evaluate(model, test_data)

    return finetune


@functools.cache
def personalization() -> Any:
    comp = ALG.build_personalization_eval_computation(
        model_fn, OrderedDict(sgd=_finetune_fn), _evaluate, max_num_clients=100
    )
    weights_type = comp.type_signature.parameter[0]

    @tff.federated_computation(weights_type, ROWS_AT_CLIENTS)
    def evaluate(weights: Any, rows: Any) -> Any:
        return comp(weights, tff.federated_map(train_and_test(), rows))

    return evaluate


@pytest.mark.parametrize("dist", DIST_PARAMS)
def test_personalization_eval(both: Both, dist: Any) -> None:
    evaluate = personalization()
    weights = tff.learning.models.ModelWeights(
        trainable=[np.array([[0.5], [0.1]], np.float32), np.array([0.2], np.float32)],
        non_trainable=[],
    )
    actual, expected = both.run(lambda arg: evaluate(weights, arg), dist)
    # Per-client metrics are collected with federated_sample, whose order is
    # random (all clients fit max_num_clients): compare each metric sorted.
    n = len(both.rows(dist)[1])
    a_leaves, e_leaves = tree.flatten(actual), tree.flatten(expected)
    assert len(a_leaves) == len(e_leaves) > 0
    for a, e in zip(a_leaves, e_leaves, strict=True):
        assert np.asarray(e).shape == (n,)
        conform(np.sort(np.asarray(a)), np.sort(np.asarray(e)))
