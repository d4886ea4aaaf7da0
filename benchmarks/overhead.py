"""Overhead of tff-amqp against TFF's native runtime, measured in the same run.

    .venv/bin/python benchmarks/overhead.py [--broker URL] [--repeats N]

Runs a federated mean and one FedAvg round (a small Keras model) through
tff-amqp with 3 local silo processes, and the same computations through TFF's
native C++ runtime; prints medians and ratios, and per invocation the worker
calls (native's; the coordinator's and each silo's) and broker messages;
writes benchmarks/results/overhead.json. Targets (issue "core"): mean <= 3x native,
FedAvg round <= 1.5x native.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks._common import (
    count_amqp,
    count_native,
    delete_federation,
    machine,
    native_context,
    native_worker_calls,
    print_table,
    progress,
    stop_on_sigterm,
    summary,
    timed,
    write_result,
)

CLIENTS = 9


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


def measure(context, mean, values, process, datasets, repeats, count):
    """Timings of the mean and a round, then one of each counted with
    `count(fn) -> counts` (worker calls, messages), and the mean's value."""
    import tensorflow_federated as tff

    with tff.framework.get_context_stack().install(context):
        state = process.initialize()
        mean_samples = timed(lambda: mean(values), repeats=repeats * 4, warmup=2)
        round_samples = timed(lambda: process.next(state, datasets), repeats=repeats, warmup=1)
        counts = {
            "federated_mean": count(lambda: mean(values)),
            "fedavg_round": count(lambda: process.next(state, datasets)),
        }
        result = float(mean(values))
    return summary(mean_samples), summary(round_samples), result, counts


def _run_amqp(
    broker: str, federation: str, silos: list[str], repeats: int, built: tuple[Any, ...]
) -> tuple[dict[str, float], dict[str, float], float, dict[str, Any]]:
    import tff_amqp
    from tff_amqp.local import LocalFederation

    with LocalFederation(broker, federation) as local:
        for name in silos:
            local.start_silo(name)
        progress("  starting 3 silos ...")
        local.wait_ready(timeout=180)
        progress("  tff-amqp ...")
        with tff_amqp.create_sync_amqp_execution_context(
            broker, federation=federation, min_silos=len(silos), cohort_timeout=120
        ) as ctx:
            return measure(ctx, *built, repeats, lambda fn: count_amqp(ctx, silos, fn))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--broker", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    stop_on_sigterm()
    progress(f"overhead benchmark: {CLIENTS} clients, 3 silos, repeats={args.repeats}")
    mean, values, process, datasets = build()
    progress("  TFF native ...")
    with native_context() as native, native_worker_calls() as calls:
        native_mean, native_round, native_value, native_counts = measure(
            native, mean, values, process, datasets, args.repeats,
            lambda fn: count_native(calls, fn),
        )  # fmt: skip
    federation = f"bench-{uuid.uuid4().hex[:6]}"
    silos = ["s1", "s2", "s3"]
    try:
        amqp_mean, amqp_round, amqp_value, amqp_counts = _run_amqp(
            args.broker, federation, silos, args.repeats, (mean, values, process, datasets)
        )
    finally:
        delete_federation(args.broker, federation, silos)
    assert abs(amqp_value - native_value) < 1e-5, (amqp_value, native_value)

    rows = [
        [
            "federated_mean",
            native_mean["median_s"] * 1e3,
            amqp_mean["median_s"] * 1e3,
            amqp_mean["median_s"] / native_mean["median_s"],
            3.0,
        ],
        [
            "fedavg_round",
            native_round["median_s"] * 1e3,
            amqp_round["median_s"] * 1e3,
            amqp_round["median_s"] / native_round["median_s"],
            1.5,
        ],
    ]
    print()
    print_table(["computation", "native ms", "tff-amqp ms", "ratio", "target"], rows)
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
    path = write_result(
        "overhead",
        {
            "machine": machine(),
            "clients": CLIENTS,
            "silos": 3,
            "native": {"federated_mean": native_mean, "fedavg_round": native_round},
            "tff_amqp": {"federated_mean": amqp_mean, "fedavg_round": amqp_round},
            "ratios": {r[0]: r[3] for r in rows},
            # One invocation of each, counted after the timed runs (clean-up included).
            "counts": {"native": native_counts, "tff_amqp": amqp_counts},
            "targets": {r[0]: r[4] for r in rows},
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
