"""Overhead of tff-amqp against TFF's native runtime, measured in the same run.

    .venv/bin/python benchmarks/overhead.py [--broker URL] [--repeats N]

Runs a federated mean and one FedAvg round (a small Keras model) through
tff-amqp with 3 local silo processes, and the same computations through TFF's
native C++ runtime; prints medians and ratios, and per invocation the worker
calls (native's; the coordinator's and each silo's) and broker messages;
writes benchmarks/results/overhead.json. Both run side by side in alternating
blocks (see `interleaved`); the ratio is that of the medians over all
blocks, with its range over the blocks. Targets (issue "fuse"): mean <= 1.3x
native, two aggregation phases with a broadcast between (mean, then the
variance around it) <= 1.5x, FedAvg round <= 1.15x.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks._common import (
    CPU_ROLES,
    amqp_roles,
    broker_pids,
    count_amqp,
    count_native,
    cpu_by_role,
    delete_federation,
    machine,
    native_context,
    native_roles,
    native_worker_calls,
    print_table,
    progress,
    stop_on_sigterm,
    summary,
    timed,
    write_result,
)

CLIENTS = 9
# x native, per computation (issue "fuse").
TARGETS = {"federated_mean": 1.3, "mean_variance": 1.5, "fedavg_round": 1.15}


def build(clients: int = CLIENTS):
    import tensorflow as tf
    import tensorflow_federated as tff

    @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
    def mean(x):
        return tff.federated_mean(x)

    rng = np.random.default_rng(0)
    datasets = []
    for _ in range(clients):
        x = rng.normal(size=(64, 20)).astype(np.float32)
        y = rng.integers(0, 5, size=64).astype(np.int32)
        datasets.append(
            tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y)).batch(16)
        )
    spec = datasets[0].element_spec

    def model_fn():
        model = tf.keras.Sequential(
            [
                tf.keras.layers.InputLayer(input_shape=(20,)),
                tf.keras.layers.Dense(32, activation="relu"),
                tf.keras.layers.Dense(5),
            ]
        )
        return tff.learning.models.from_keras_model(
            model,
            input_spec=spec,
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )

    process = tff.learning.algorithms.build_weighted_fed_avg(
        model_fn,
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(0.1),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0),
    )
    values = [float(i) for i in range(clients)]
    return mean, values, process, datasets


def statistic(which: str) -> tuple[Any, Any]:
    """The federated mean (`which` = "mean") or the mean and the variance
    around it ("mean_variance"), and its argument: 9 clients' values."""
    mean, values, _, _ = build()
    if which == "mean":
        return mean, values
    return build_mean_variance(), values


def build_mean_variance():
    """Two aggregation phases with a broadcast between: the mean, then the
    variance around it (the mean goes back to the clients first)."""
    import tensorflow_federated as tff

    @tff.tensorflow.computation(np.float32, np.float32)
    def squared_deviation(x, center):
        return (x - center) * (x - center)

    @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
    def mean_variance(x):
        center = tff.federated_mean(x)
        deviations = tff.federated_map(squared_deviation, (x, tff.federated_broadcast(center)))
        return center, tff.federated_mean(deviations)

    return mean_variance


# Invocations back to back whose CPU time is measured, per computation.
CPU_INVOCATIONS = {"federated_mean": 60, "mean_variance": 40, "fedavg_round": 6}
# Timed invocations per block and system, per computation (x --repeats blocks).
# A block's ratio is of two medians: with 2 FedAvg rounds a block it was the
# mean of two and swung 1.02-1.51x within one run, hence 6 (~2 s a block).
BLOCK_SAMPLES = {"federated_mean": 20, "mean_variance": 20, "fedavg_round": 6}


def invocations(context, mean, values, process, datasets, mean_variance, state):
    """Each computation as a call in `context` (installed around each call)."""
    import tensorflow_federated as tff

    def within(fn):
        def call():
            with tff.framework.get_context_stack().install(context):
                return fn()

        return call

    return {
        "federated_mean": within(lambda: mean(values)),
        "mean_variance": within(lambda: mean_variance(values)),
        "fedavg_round": within(lambda: process.next(state, datasets)),
    }


def interleaved(
    systems: dict[str, dict[str, Any]], blocks: int
) -> tuple[dict[str, dict[str, list[float]]], dict[str, list[float]]]:
    """Latency samples of each system, taken in alternating blocks (native,
    tff-amqp, then tff-amqp, native, ...) so that both see the same machine:
    on a shared VM the speed drifts by tens of percent within minutes, and
    measuring one system after the other would put that drift into the
    ratio. Returns the samples and, per computation, the ratio of the two
    systems' medians in each block (tff-amqp / native)."""
    names = list(systems)
    samples: dict[str, dict[str, list[float]]] = {n: collections.defaultdict(list) for n in names}
    ratios: dict[str, list[float]] = collections.defaultdict(list)
    for calls in systems.values():  # warm: compile caches, plans, worker caches
        for call in calls.values():
            call()
            call()
    for block in range(blocks):
        order = names if block % 2 == 0 else names[::-1]
        for computation, count in BLOCK_SAMPLES.items():
            medians = {}
            for name in order:
                taken = timed(systems[name][computation], count, warmup=0)
                samples[name][computation] += taken
                medians[name] = statistics.median(taken)
            ratios[computation].append(medians["tff_amqp"] / medians["native"])
        progress(f"  block {block + 1}/{blocks}")
    return samples, ratios


def costs(calls, count, roles):
    """Per computation: worker calls and messages (`count(fn)`), and CPU time
    by process (`roles()`: role -> pids, read once everything has started)."""
    counts = {name: count(call) for name, call in calls.items()}
    cpu = {name: cpu_by_role(roles(), call, CPU_INVOCATIONS[name]) for name, call in calls.items()}
    return counts, cpu


# Invocations whose wall time is split by phase, per computation.
PHASE_INVOCATIONS = {"federated_mean": 60, "mean_variance": 40, "fedavg_round": 6}


class GatherClock:
    """An observer of the coordinator's invocation events (`runtime.events`):
    when its first gather began and how long gathers were open, each from the
    evaluation reaching an aggregation's wait (its requests leave within a
    few loop turns) to the last silo's reply; overlapping gathers count
    once. Called on the coordinator's loop, read between invocations."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.first_started: float | None = None
        self.gathering = 0.0  # time with at least one gather open
        self._open = 0
        self._since = 0.0

    def gather_started(self, invocation: str, silos: object) -> None:
        now = time.perf_counter()
        if self.first_started is None:
            self.first_started = now
        if self._open == 0:
            self._since = now
        self._open += 1

    def gather_finished(self, invocation: str, replied: object, seconds: float) -> None:
        # Concurrent gathers (a FedAvg round's three aggregations) count once.
        self._open -= 1
        if self._open == 0:
            self.gathering += time.perf_counter() - self._since


def phases(calls, events, count: int | dict[str, int] = PHASE_INVOCATIONS) -> dict[str, Any]:
    """Per computation, medians (ms) of where an invocation's wall time goes:
    the coordinator before its first gather (TFF's context, evaluating the
    computation up to the first aggregation), the gathers (requests out,
    the silos' work, the replies in), and the coordinator's own work besides
    (between gathers and after the last: merging, reporting, TFF's result)."""
    clock = GatherClock()
    events.add(clock)
    try:
        split: dict[str, Any] = {}
        for name, call in calls.items():
            rows = []
            for _ in range(count[name] if isinstance(count, dict) else count):
                clock.reset()
                started = time.perf_counter()
                call()
                total = time.perf_counter() - started
                before = (clock.first_started or started) - started
                rows.append((total, before, clock.gathering, total - before - clock.gathering))
            medians = [statistics.median(column) * 1e3 for column in zip(*rows)]
            split[name] = dict(
                zip(("total_ms", "before_gather_ms", "gathers_ms", "after_ms"), medians)
            )
        return split
    finally:
        events.remove(clock)


def phases_table(split: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The table of `phases` (headers, rows)."""
    headers = ["computation", "total", "before the first gather", "gathers", "the rest"]
    rows = [
        [name, ph["total_ms"], ph["before_gather_ms"], ph["gathers_ms"], ph["after_ms"]]
        for name, ph in split.items()
    ]
    return headers, rows


def results_of(calls) -> list[float]:
    """The values compared with native: the mean, then mean and variance."""
    mean = calls["federated_mean"]()
    return [float(mean), *(float(v) for v in calls["mean_variance"]())]


def cpu_table(
    native: dict[str, Any], amqp: dict[str, Any], native_times: dict[str, Any]
) -> tuple[list[str], list[list[Any]]]:
    """CPU ms per invocation by role, and the floor it puts under tff-amqp's
    latency on this machine (all CPU time over the cores), as x native."""
    headers = ["CPU ms per invocation", "native", *(f"tff-amqp {r}" for r in CPU_ROLES),
               "tff-amqp total", "floor ms", "floor x native"]  # fmt: skip
    rows = []
    for name, cpu in amqp.items():
        rows.append(
            [name, native[name]["total_ms"], *(cpu["ms"].get(r, "-") for r in CPU_ROLES),
             cpu["total_ms"], cpu["floor_ms"],
             cpu["floor_ms"] / (native_times[name]["median_s"] * 1e3)]
        )  # fmt: skip
    return headers, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--broker", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import tff_amqp
    from tff_amqp.local import LocalFederation

    stop_on_sigterm()
    progress(f"overhead benchmark: {CLIENTS} clients, 3 silos, {args.repeats} blocks")
    mean, values, process, datasets = build()
    mean_variance = build_mean_variance()
    federation = f"bench-{uuid.uuid4().hex[:6]}"
    silos = ["s1", "s2", "s3"]
    try:
        with (
            native_context() as native,
            native_worker_calls() as native_calls,
            LocalFederation(args.broker, federation) as local,
        ):
            import tensorflow_federated as tff

            with tff.framework.get_context_stack().install(native):
                state = process.initialize()
            built = (values, process, datasets, mean_variance, state)
            for name in silos:
                local.start_silo(name)
            progress("  starting 3 silos ...")
            local.wait_ready(timeout=180)
            with tff_amqp.create_sync_amqp_execution_context(
                args.broker, federation=federation, min_silos=len(silos), cohort_timeout=120
            ) as amqp:
                systems = {
                    "native": invocations(native, mean, *built),
                    "tff_amqp": invocations(amqp, mean, *built),
                }
                progress("  TFF native and tff-amqp, in alternating blocks ...")
                samples, block_ratios = interleaved(systems, args.repeats)
                native_values = results_of(systems["native"])
                amqp_values = results_of(systems["tff_amqp"])
                progress("  counting calls and CPU time ...")
                native_counts, native_cpu = costs(
                    systems["native"], lambda fn: count_native(native_calls, fn), native_roles
                )
                progress("  splitting tff-amqp's wall time by phase ...")
                amqp_phases = phases(systems["tff_amqp"], amqp.runtime.events)
                amqp_counts, amqp_cpu = costs(
                    systems["tff_amqp"],
                    lambda fn: count_amqp(amqp, silos, fn),
                    lambda: amqp_roles(local, broker_pids(args.broker)),
                )
    finally:
        delete_federation(args.broker, federation, silos)
    assert np.allclose(amqp_values, native_values, rtol=1e-5), (amqp_values, native_values)
    native_times = {name: summary(taken) for name, taken in samples["native"].items()}
    amqp_times = {name: summary(taken) for name, taken in samples["tff_amqp"].items()}

    rows = [
        [
            name,
            native_times[name]["median_s"] * 1e3,
            amqp_times[name]["median_s"] * 1e3,
            amqp_times[name]["median_s"] / native_times[name]["median_s"],
            target,
            f"{min(block_ratios[name]):.2f}-{max(block_ratios[name]):.2f}",
        ]
        for name, target in TARGETS.items()
    ]
    print()
    print_table(
        ["computation", "native ms", "tff-amqp ms", "ratio", "target", "ratio by block"], rows
    )
    print()
    print_table(
        ["per invocation", "native worker calls", "coordinator worker calls",
         "max silo worker calls", "broker messages"],
        [
            [name, native_counts[name]["worker_calls"], c["coordinator_worker_calls"],
             max(c["silo_worker_calls"].values()), c["broker_messages"]]
            for name, c in amqp_counts.items()
        ],
    )  # fmt: skip
    print()
    print("tff-amqp's wall time by phase (ms, medians):")
    print_table(*phases_table(amqp_phases))
    print()
    print_table(*cpu_table(native_cpu, amqp_cpu, native_times))
    path = write_result(
        "overhead",
        {
            "machine": machine(),
            "clients": CLIENTS,
            "silos": 3,
            "native": native_times,
            "tff_amqp": amqp_times,
            "ratios": {r[0]: r[3] for r in rows},
            # The same ratio within each block (native and tff-amqp alternating).
            "block_ratios": dict(block_ratios),
            # Per invocation of each, counted after the timed runs (clean-up included).
            "counts": {"native": native_counts, "tff_amqp": amqp_counts},
            "targets": {r[0]: r[4] for r in rows},
            # CPU ms per invocation by process role, each measured back to back.
            "cpu": {"native": native_cpu, "tff_amqp": amqp_cpu},
            # tff-amqp's wall time per invocation by phase (medians, ms).
            "phases": amqp_phases,
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
