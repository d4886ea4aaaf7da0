"""Phase plans at real silo processes: each batch of a silo's worker
operations runs as one computation (tff_amqp/tff_worker/plan.py), and
results equal TFF's native runtime, the op-by-op path
(TFF_AMQP_PHASE_PLANS=0 in the silos) and each other.

The computations keep state at the silos between phases: the CLIENTS values
of one phase (a plan's members) feed the plans of the later phases, after
an aggregation the coordinator had to wait for. Covered: the session's
federation (values, silo data, cohorts of other sizes, no client at all);
a federation of this module with a silo that holds no data (concurrent
invocations, then one silo restarted with an empty plan cache); silos with
TFF_AMQP_PHASE_PLANS=0 (bit-identical results, more worker calls, the same
worker errors); silos sharing one process and worker. The session's silos
evaluate plans of element-wise arithmetic in their own process
(inprocess/plans.py; no worker call), this module's own silos run every
plan on their workers (TFF_AMQP_IN_PROCESS_PLANS=0); a computation mixes
both. Unit tests of the plans themselves are in test_plan_unit.py and
test_inprocess_plans.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import tff_amqp
from tests.support.computations import F32_CLIENTS, ROW, ROWS_AT_CLIENTS, fed_mean, mean_glucose
from tests.support.data import write_silo_csvs
from tests.support.federation import (
    SILO_NAMES,
    Federation,
    assert_close,
    local_federation,
    native_over,
    run_in,
    start_federation,
    started_context,
    wait_live,
)
from tff_amqp.coordinator.stateful.counts import WorkCounts, snapshot
from tff_amqp.errors import SiloWorkerError
from tff_amqp.local import LocalFederation, SiloOptions
from tff_amqp.silo.stateful.session import IN_PROCESS_PLANS_ENV, PHASE_PLANS_ENV

VALUES = [1.0, 2.5, -3.0, 4.0, 10.0, 0.5, 7.25]
PHASES = 3


@tff.tensorflow.computation(np.float32, np.float32)
def squared_deviation(x: Any, mean: Any) -> Any:
    return tf.square(x - mean)


@tff.tensorflow.computation(np.float32, np.float32, np.float32, np.float32)
def standardized(x: Any, mean: Any, deviation: Any, variance: Any) -> Any:
    # Uses the client's value, its deviation from phase 2 and both earlier
    # aggregates: positive terms only, so sums are exact enough for 1e-5.
    return deviation / (variance + 1.0) + tf.abs(x - mean)


def _three_phases(x: Any) -> Any:
    """mean; then the variance around it; then statistics of each client's
    value, deviation and both aggregates (three aggregation phases)."""
    mean = tff.federated_mean(x)
    mean_at_clients = tff.federated_broadcast(mean)
    deviation = tff.federated_map(squared_deviation, tff.federated_zip((x, mean_at_clients)))
    variance = tff.federated_mean(deviation)
    variance_at_clients = tff.federated_broadcast(variance)
    z = tff.federated_map(
        standardized, tff.federated_zip((x, mean_at_clients, deviation, variance_at_clients))
    )
    return mean, variance, tff.federated_sum(z), tff.federated_max(z)


@tff.federated_computation(F32_CLIENTS)
def three_phases(x: Any) -> Any:
    return _three_phases(x)


@tff.tensorflow.computation(tff.SequenceType(ROW))
def client_mean_glucose(rows: Any) -> Any:
    total, count = rows.reduce(
        (np.float32(0.0), np.float32(0.0)),
        lambda acc, row: (acc[0] + row["glucose"], acc[1] + 1.0),
    )
    return total / count


@tff.federated_computation(ROWS_AT_CLIENTS)
def three_phases_over_data(rows: Any) -> Any:
    """The same over each client's mean glucose, computed from the silo's
    own data in phase 1 and kept there."""
    return _three_phases(tff.federated_map(client_mean_glucose, rows))


@tff.tensorflow.computation(np.float32, np.float32)
def root_of_spread(deviation: Any, variance: Any) -> Any:
    return tf.sqrt(deviation + variance)  # Sqrt: not run in a silo's process


@tff.federated_computation(F32_CLIENTS)
def two_phases_then_the_worker(x: Any) -> Any:
    """Two phases of element-wise arithmetic (evaluated in the silos'
    processes), then one the worker must run, on the second's client values."""
    mean = tff.federated_mean(x)
    deviation = tff.federated_map(
        squared_deviation, tff.federated_zip((x, tff.federated_broadcast(mean)))
    )
    variance = tff.federated_mean(deviation)
    spread = tff.federated_map(
        root_of_spread, tff.federated_zip((deviation, tff.federated_broadcast(variance)))
    )
    return mean, variance, tff.federated_sum(spread)


# ------------------------------------------------- the session's federation


@pytest.mark.slow
def test_three_phases_with_client_state_equal_native(amqp_context, native_context):
    expected = run_in(native_context, three_phases, VALUES)
    assert_close(run_in(amqp_context, three_phases, VALUES), expected)
    # Again: every phase's plan now comes from the silos' caches.
    assert_close(run_in(amqp_context, three_phases, VALUES), expected)


@pytest.mark.slow
def test_three_phases_over_silo_data_equal_native(amqp_context, native_context, silo_federation):
    actual = run_in(amqp_context, three_phases_over_data, tff_amqp.silo_data("readings"))
    expected = native_over(native_context, three_phases_over_data, silo_federation, SILO_NAMES)
    assert_close(actual, expected)


@pytest.mark.slow
def test_a_worker_phase_after_phases_evaluated_in_process_equals_native(
    amqp_context, native_context
):
    """The third phase needs the second's client values on the worker: the
    silo runs the earlier plans there only then, and everything equals
    native, over cohorts with a silo without clients and none at all."""
    for values in (VALUES, [1.0, -4.0], [2.5], []):
        expected = run_in(native_context, two_phases_then_the_worker, values)
        result, counts = _counted(amqp_context, SILO_NAMES, two_phases_then_the_worker, values)
        assert_close(result, expected)
        if len(values) >= len(SILO_NAMES):
            for silo in SILO_NAMES:
                assert counts.silos[silo].get("CreateCall", 0) >= 1, counts.silos[silo]


# Cohorts of other sizes and client distributions over the three silos, in
# one test so they run one after another against the same warm silos (the
# plans of one shape must not be reused for another).
DISTRIBUTIONS = [
    VALUES,
    [2.5],  # fewer clients than silos
    [1.0, -4.0],  # a silo without clients
    [1.0, 2.0, 3.0, 4.0],  # one silo with two, the others one
    [float(i) / 3 for i in range(11)],
    [],  # no client at all
    VALUES[::-1],  # the first cohort again, other values
]


@pytest.mark.slow
def test_three_phases_over_other_cohorts_equal_native(amqp_context, native_context):
    for values in DISTRIBUTIONS:
        expected = run_in(native_context, three_phases, values)
        actual = run_in(amqp_context, three_phases, values)
        assert_close(actual, expected)


# ------------------------- a federation of this module: concurrency, restart

OWN = ("alpha", "bravo", "charlie")
OWN_ENV = {IN_PROCESS_PLANS_ENV: "0"}


@pytest.fixture(scope="module")
def own_silos(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """Three silos of this module alone (the restart test stops one); charlie
    holds no client data, so with silo data it takes part with none. Their
    plans run on their workers (TFF_AMQP_IN_PROCESS_PLANS=0): these tests are
    about the worker's plans; the session's silos evaluate the plans of
    element-wise arithmetic in their own process."""
    root = tmp_path_factory.mktemp("own")
    with local_federation(amqp_url, root / "logs") as local:
        yield start_federation(
            local,
            root,
            names=OWN,
            clients_per_silo=(2, 3, 0),
            env=OWN_ENV,
        )


@pytest.mark.slow
def test_concurrent_invocations_of_several_shapes_equal_native(amqp_url, own_silos, native_context):
    """Sessions of one silo run side by side and share its plan cache: the
    same shapes, and others, at once."""
    cohorts = [VALUES, VALUES[::-1], [1.0, 2.0, 3.0, 4.0], [2.5], [i / 3 for i in range(9)]]
    expected = [run_in(native_context, three_phases, values) for values in cohorts]
    expected.append(native_over(native_context, three_phases_over_data, own_silos, OWN))
    expected.append(run_in(native_context, fed_mean, VALUES))

    async def run() -> list[Any]:
        context = tff_amqp.create_async_amqp_execution_context(
            amqp_url,
            federation=own_silos.name,
            min_silos=len(OWN),
            cohort_timeout=120.0,
            deadline=300.0,
            progress=False,
        )
        await context.start()
        try:
            with tff.framework.get_context_stack().install(context):
                calls = [three_phases(values) for values in cohorts]
                calls.append(three_phases_over_data(tff_amqp.silo_data("readings")))
                calls.append(fed_mean(VALUES))
                return list(await asyncio.gather(*calls))
        finally:
            await context.close()

    results = asyncio.run(run())
    assert len(results) == len(expected)
    for actual, wanted in zip(results, expected, strict=True):
        assert_close(actual, wanted)


@pytest.mark.slow
def test_a_restarted_silo_builds_its_plans_again(amqp_url, own_silos, native_context):
    """Runs after the other tests of `own_silos`: it restarts bravo."""
    local = own_silos.local
    expected_over_data = native_over(native_context, three_phases_over_data, own_silos, OWN)
    with started_context(amqp_url, own_silos.name, len(OWN)) as context:
        expected = run_in(native_context, three_phases, VALUES)
        assert_close(run_in(context, three_phases, VALUES), expected)
        data_result = run_in(context, three_phases_over_data, tff_amqp.silo_data("readings"))
        assert_close(data_result, expected_over_data)
        old = local.silos["bravo"]
        old.stop()
        assert not old.running
        restarted = local.start_silo(
            "bravo",
            data={"readings": own_silos.silos["bravo"]},
            options=SiloOptions(env=OWN_ENV),
        )
        local.wait_ready(timeout=240, processes=[restarted])
        wait_live(context, OWN, timeout=60)
        # The restarted silo's plan cache is empty: it builds and embeds the
        # plans again; the other silos use their cached ones.
        result, counts = _counted(context, OWN, three_phases, VALUES)
        assert_close(result, expected)
        print(f"\nafter bravo restarted: {counts}")
        for silo in OWN:
            assert counts.silos[silo].get("CreateCall") == PHASES, counts.silos[silo]
        # ...so it embeds each of the three plans once more (their functions
        # are inlined, nothing else is new to it).
        embedded = {s: counts.silos[s].get("CreateValue", 0) for s in OWN}
        assert embedded["bravo"] - embedded["alpha"] == PHASES, embedded
        assert embedded["charlie"] == embedded["alpha"], embedded
        data_result = run_in(context, three_phases_over_data, tff_amqp.silo_data("readings"))
        assert_close(data_result, expected_over_data)


# ------------------------------------------------------ plans off against on


@pytest.fixture(scope="module")
def plans_off(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """Three silos like the session's (the same client data), applying every
    batch op by op."""
    root = tmp_path_factory.mktemp("plans_off")
    with local_federation(amqp_url, root / "logs") as local:
        yield start_federation(local, root, env={PHASE_PLANS_ENV: "0"})


@pytest.fixture(scope="module")
def plans_off_context(amqp_url: str, plans_off: Federation) -> Iterator[Any]:
    with started_context(amqp_url, plans_off.name, len(plans_off.silos)) as context:
        yield context


@pytest.mark.slow
def test_plans_off_and_on_give_identical_results(
    amqp_context, plans_off_context, plans_off, silo_federation, native_context
):
    cases: list[tuple[Any, list[Any], Any]] = [
        (three_phases, [VALUES], run_in(native_context, three_phases, VALUES)),
        (three_phases, [[1.0, -4.0]], run_in(native_context, three_phases, [1.0, -4.0])),
        (fed_mean, [VALUES], run_in(native_context, fed_mean, VALUES)),
        (
            three_phases_over_data,
            [tff_amqp.silo_data("readings")],
            native_over(native_context, three_phases_over_data, silo_federation, SILO_NAMES),
        ),
        (
            mean_glucose,
            [tff_amqp.silo_data("readings")],
            native_over(native_context, mean_glucose, plans_off, SILO_NAMES),
        ),
    ]
    for comp, args, expected in cases:
        on = run_in(amqp_context, comp, *args)
        off = run_in(plans_off_context, comp, *args)
        assert_close(on, expected)
        assert_close(off, expected)
        # The same worker operations either way: bit for bit the same.
        assert_close(on, off, rtol=0.0, atol=0.0)


# ------------------------------------------------------------ worker calls


def _counted(context: Any, silos: Any, comp: Any, *args: Any) -> tuple[Any, WorkCounts]:
    before = context.run(snapshot(context.runtime, list(silos)))
    result = run_in(context, comp, *args)
    after = context.run(snapshot(context.runtime, list(silos)))
    return result, after.minus(before)


@pytest.mark.slow
def test_one_worker_call_and_one_compute_per_silo_per_phase(
    amqp_url, amqp_context, own_silos, plans_off_context, native_context
):
    """Per silo and phase: no worker call at all where the plan is evaluated
    in the silo's process (the session's silos: every phase here is
    element-wise arithmetic); one plan call and one Compute where the worker
    runs it (`own_silos`; the third phase of `three_phases` releases two
    aggregates, sum and max, in one Compute); op by op, one Compute per
    aggregate and more calls."""
    for name, comp, phases, aggregates in (
        ("mean", fed_mean, 1, 1),
        ("three phases", three_phases, PHASES, PHASES + 1),
    ):
        expected = run_in(native_context, comp, VALUES)
        counts: dict[str, WorkCounts] = {}
        with started_context(amqp_url, own_silos.name, len(OWN)) as worker_plans_context:
            runs = (
                ("in process", amqp_context, SILO_NAMES),
                ("worker plans", worker_plans_context, OWN),
                ("op by op", plans_off_context, SILO_NAMES),
            )
            for label, context, silos in runs:
                run_in(context, comp, VALUES)  # warm: computations and plans cached
                result, counts[label] = _counted(context, silos, comp, VALUES)
                assert_close(result, expected)
                print(f"\n{name}, {label}:")
                for silo in silos:
                    print(f"  {silo}: {dict(sorted(counts[label].silos[silo].items()))}")
        for silo in SILO_NAMES:
            assert counts["in process"].silo_total(silo) == 0, counts["in process"].silos[silo]
        for silo in OWN:
            planned = counts["worker plans"].silos[silo]
            assert planned.get("CreateCall") == phases, planned
            assert planned.get("Compute") == phases, planned
        for silo in SILO_NAMES:
            op_by_op = counts["op by op"].silos[silo]
            assert op_by_op.get("Compute") == aggregates, op_by_op
            assert op_by_op.get("CreateCall", 0) > phases, op_by_op


# ------------------------------------------------ a worker error in a plan


@tff.tensorflow.computation(np.float32, np.float32)
def checked_deviation(x: Any, mean: Any) -> Any:
    check = tf.debugging.assert_less(
        tf.abs(x - mean), np.float32(100.0), message="client far from the mean"
    )
    with tf.control_dependencies([check]):
        return tf.square(x - mean)


@tff.federated_computation(F32_CLIENTS)
def checked_two_phases(x: Any) -> Any:
    """Fails in the second phase's plan, on state the first one left."""
    mean = tff.federated_mean(x)
    deviation = tff.federated_map(
        checked_deviation, tff.federated_zip((x, tff.federated_broadcast(mean)))
    )
    return mean, tff.federated_mean(deviation)


@pytest.mark.slow
def test_a_failing_plan_fails_like_op_by_op_and_native_and_the_next_invocation_succeeds(
    amqp_context, plans_off_context, native_context
):
    failing = [1.0, 2.0, 1000.0, 3.0, 4.0, 5.0]
    with pytest.raises(grpc.RpcError) as native_error:
        run_in(native_context, checked_two_phases, failing)
    for context in (amqp_context, plans_off_context):
        with pytest.raises(SiloWorkerError) as ours:
            run_in(context, checked_two_phases, failing)
        assert ours.value.worker_status == native_error.value.code()
        assert "client far from the mean" in str(ours.value)
    # The failed plans leave nothing behind: the same computation, same
    # cohort, then with values that pass.
    expected = run_in(native_context, checked_two_phases, VALUES)
    for context in (amqp_context, plans_off_context):
        assert_close(run_in(context, checked_two_phases, VALUES), expected)


# ------------------------------------------ silos sharing a process and worker


@pytest.mark.slow
def test_silos_of_one_host_sharing_a_worker_share_plans_and_equal_native(
    local: LocalFederation, amqp_url: str, native_context: Any, tmp_path: Path
) -> None:
    """Simulation mode, one worker_binary for three silos: one process-wide
    plan cache, and silos with as many clients share an executor (values of
    two silos' plans side by side in it)."""
    names = ("h0", "h1", "h2")
    folders = {}
    for i, name in enumerate(names):
        folders[name] = write_silo_csvs(tmp_path, i, clients=2).rename(tmp_path / name)
    host = local.start_silo_host(
        "host", names, worker_mode="shared", data={"readings": f"{tmp_path}/{{silo}}"}
    )
    local.wait_ready(timeout=240, processes=[host])
    federation = Federation(local, folders)
    # 7 values over 3 silos: 3, 2, 2 clients; 6 values: 2 each.
    cohorts = [VALUES, VALUES[:6], [2.5], []]
    with started_context(amqp_url, local.federation, len(names)) as context:
        for values in cohorts:
            assert_close(
                run_in(context, three_phases, values), run_in(native_context, three_phases, values)
            )
        assert_close(
            run_in(context, three_phases_over_data, tff_amqp.silo_data("readings")),
            native_over(native_context, three_phases_over_data, federation, names),
        )
