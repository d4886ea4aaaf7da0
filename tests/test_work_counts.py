"""What an invocation costs in worker round trips and broker messages, counted
at the coordinator and at each silo (silos report their TFF worker calls in
their status), for a federated mean over three real silo processes."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tests.support.computations import fed_mean
from tests.support.federation import SILO_NAMES, assert_close, run_in
from tff_amqp import protocol as p
from tff_amqp.coordinator.stateful.counts import WorkCounts, snapshot
from tff_amqp.inprocess import value_wire

VALUES = [1.0, 2.5, -3.0, 4.0, 10.0, 0.5, 7.25]


def _counted(context, comp, *args) -> tuple[object, WorkCounts]:
    silos = list(SILO_NAMES)
    before = context.run(snapshot(context.runtime, silos))
    result = run_in(context, comp, *args)
    after = context.run(snapshot(context.runtime, silos))
    return result, after.minus(before)


def test_federated_mean_worker_calls_at_each_silo(amqp_context, native_context):
    run_in(amqp_context, fed_mean, VALUES)  # warm: computations cached at the silos
    result, counts = _counted(amqp_context, fed_mean, VALUES)
    assert_close(result, run_in(native_context, fed_mean, VALUES))
    print(f"\nper federated mean: {counts}")
    for silo in SILO_NAMES:
        calls = counts.silos[silo]
        # The whole phase is element-wise arithmetic over the silo's clients:
        # its plan is evaluated in the silo's own process, its worker is not
        # called at all (tests/test_phase_plans.py counts the worker's plans).
        assert counts.silo_total(silo) == 0, calls
    # One request and one reply per silo, plus the close (alone here: no
    # invocation follows within the close's linger).
    assert counts.messages <= MESSAGES_AT_MOST, counts
    assert counts.coordinator_total <= COORDINATOR_CALLS_AT_MOST, counts.coordinator
    # The same invocation costs the same again (nothing left over, nothing cached late).
    _, again = _counted(amqp_context, fed_mean, VALUES)
    assert again == counts


def test_federated_mean_runs_without_a_task_per_value_and_silo(amqp_context):
    """Values at hand (functions, references, constants, small arguments)
    are created at the silos and struct elements evaluated without a task
    each: 151 asyncio tasks per mean over three silos before, 33 now."""
    import asyncio

    run_in(amqp_context, fed_mean, VALUES)
    created = []

    async def install() -> None:
        loop = asyncio.get_running_loop()
        previous = loop.get_task_factory()

        def factory(loop, coro, **kwargs):
            created.append(getattr(coro, "__qualname__", "?"))
            if previous is not None:
                return previous(loop, coro, **kwargs)
            return asyncio.Task(coro, loop=loop, **kwargs)

        loop.set_task_factory(factory)
        return previous

    async def restore(previous) -> None:
        asyncio.get_running_loop().set_task_factory(previous)

    previous = amqp_context.run(install())
    try:
        means = 5
        for _ in range(means):
            run_in(amqp_context, fed_mean, VALUES)
    finally:
        amqp_context.run(restore(previous))
    per_mean = len(created) / means
    print(f"\ntasks per mean: {per_mean}")
    assert per_mean <= TASKS_PER_MEAN_AT_MOST, collections.Counter(created).most_common(8)


def test_back_to_back_invocations_carry_each_others_closes(amqp_context, native_context):
    """In a stream of invocations each one's close rides the next one's
    batch to the silo: a request and a reply per silo per mean, and one
    close per silo for the whole stream (the last, sent alone once nothing
    follows). Every session is freed: the silos end idle."""
    run_in(amqp_context, fed_mean, VALUES)  # warm
    silos = list(SILO_NAMES)
    expected = run_in(native_context, fed_mean, VALUES)
    before = amqp_context.run(snapshot(amqp_context.runtime, silos))
    means = 5
    for _ in range(means):
        assert_close(run_in(amqp_context, fed_mean, VALUES), expected)
    counts = amqp_context.run(snapshot(amqp_context.runtime, silos)).minus(before)
    assert counts.messages == means * 2 * len(silos) + len(silos), counts
    for silo in silos:
        # Each session freed, none left active (the snapshot waits for idle
        # silos); evaluated in the silo's process, a mean leaves nothing on
        # its worker to dispose of.
        assert counts.silos[silo].get("Dispose", 0) == 0, counts.silos[silo]


# Bounds of what the mean costs today (see benchmarks/RESULTS.md): a
# regression past them fails here, not only in a benchmark. The coordinator
# folds the partials and divides in NumPy and computes the constant weight
# itself: its worker is not called at all; nor are the silos' (the plan is
# evaluated in their process; 5 calls each on the worker, 16 op by op).
MESSAGES_AT_MOST = 3 * 3
COORDINATOR_CALLS_AT_MOST = 0
# asyncio tasks the coordinator creates per mean over three silos (151 before
# values at hand were shipped and evaluated without a task each).
TASKS_PER_MEAN_AT_MOST = 60


def test_status_carries_worker_calls_and_refuses_malformed_counts():
    status = p.SiloStatus(silo="alpha", clients=1, worker_calls=(("Compute", 2), ("CreateCall", 5)))
    assert p.SiloStatus.from_wire(status.to_wire()) == status
    assert "wc" not in p.SiloStatus(silo="alpha", clients=1).to_wire()
    for bad in ({"Compute": -1}, {"no spaces": 1}, ["Compute"], {"Compute": True}):
        wire = {**p.SiloStatus(silo="alpha", clients=1).to_wire(), "wc": bad}
        with pytest.raises(p.ProtocolError, match="'wc'"):
            p.SiloStatus.from_wire(wire)


def _fedavg_process():
    def model_fn():
        keras_model = tf.keras.Sequential(
            [
                tf.keras.layers.InputLayer(input_shape=(2,)),
                tf.keras.layers.Dense(1, kernel_initializer="zeros"),
            ]
        )
        return tff.learning.models.from_keras_model(
            keras_model,
            input_spec=FEDAVG_DATA[0].element_spec,
            loss=tf.keras.losses.MeanSquaredError(),
        )

    return tff.learning.algorithms.build_weighted_fed_avg(
        model_fn, client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=0.1)
    )


def _xy_datasets(n: int) -> list[tf.data.Dataset]:
    rng = np.random.default_rng(3)
    datasets = []
    for i in range(n):
        x = rng.normal(size=(4 + i, 2)).astype(np.float32)
        y = (x @ np.array([[1.5], [-2.0]], np.float32)).astype(np.float32)
        datasets.append(tf.data.Dataset.from_tensor_slices((x, y)).batch(3))
    return datasets


# Five clients over three silos: two silos hold two, one holds one.
FEDAVG_DATA = _xy_datasets(5)


def test_fedavg_round_is_one_message_per_silo(amqp_context, native_context):
    process = _fedavg_process()
    with tff.framework.get_context_stack().install(native_context):
        state = process.initialize()
        expected = process.next(state, FEDAVG_DATA)
    run_in(amqp_context, process.next, state, FEDAVG_DATA)  # warm: compiled, cached at silos
    hits = value_wire.DATASETS.hits
    output, counts = _counted(amqp_context, process.next, state, FEDAVG_DATA)
    print(f"\nper FedAvg round: {counts}")
    # The clients' datasets were serialized in the first round only.
    assert value_wire.DATASETS.hits == hits + len(FEDAVG_DATA)
    assert_close(
        output.state.global_model_weights.trainable,
        expected.state.global_model_weights.trainable,
    )
    assert_close(output.metrics["client_work"], expected.metrics["client_work"])
    # One phase (broadcast, local training, three aggregations): per silo one
    # request with the three computes, its reply, and the close (21 messages
    # before the outbox held batches until the invocation went quiet).
    assert counts.messages == 3 * len(SILO_NAMES), counts
    for silo in SILO_NAMES:
        calls = counts.silos[silo]
        # One plan call; the three aggregates are gathered in one member of
        # its result, so one selection and one Compute release them; the
        # arguments, the close. The round's argument values arrive in
        # another order now and then (the coordinator ships them
        # concurrently): the same plan still takes them (a second plan,
        # built and embedded, would be one CreateValue more).
        assert calls.get("CreateCall") == 1, calls
        assert calls.get("Compute") == 1, calls
        assert calls.get("CreateSelection") == 1, calls
        assert calls.get("CreateValue") == 1, calls
        assert counts.silo_total(silo) <= 5, calls


def test_fedavg_round_server_part_runs_as_coordinator_plans(amqp_context, native_context):
    process = _fedavg_process()
    with tff.framework.get_context_stack().install(native_context):
        state = process.initialize()
        expected = process.next(state, FEDAVG_DATA)
    run_in(amqp_context, process.next, state, FEDAVG_DATA)  # warm: plans built and embedded
    output, counts = _counted(amqp_context, process.next, state, FEDAVG_DATA)
    print(f"\ncoordinator worker calls per FedAvg round: {counts.coordinator}")
    assert_close(output.state, expected.state)
    assert_close(output.metrics, expected.metrics)
    assert counts.coordinator_total <= FEDAVG_COORDINATOR_CALLS_AT_MOST, counts.coordinator
    # Each phase plan is one CreateCall; op by op the round made 16
    # federated_apply and 7 zips' calls alone.
    assert counts.coordinator.get("CreateCall", 0) <= FEDAVG_COORDINATOR_PLAN_CALLS_AT_MOST, (
        counts.coordinator
    )


# Measured (2026-12-05): 15 calls per round, of which 2 CreateCall (the
# SERVER part runs as two phase plans, of 20 and 32 operations); op by op it was 60 (each
# federated_apply, zip and value_at_server a CreateStruct + CreateCall of
# its own).
FEDAVG_COORDINATOR_CALLS_AT_MOST = 15
FEDAVG_COORDINATOR_PLAN_CALLS_AT_MOST = 2
