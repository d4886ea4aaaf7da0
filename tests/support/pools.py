"""Stateless worker pools for tests: `tff-amqp worker --stateless` processes,
and the FedAvg computation the stateless tests and benchmark share."""

from __future__ import annotations

import collections
import csv
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from tests.support.processes import ManagedProcess, ProcessGroup

WORKER_READY = re.compile(r'"event":\s*"worker\.ready"')
ROW = collections.OrderedDict(x=np.float32, y=np.float32)


def write_xy_clients(root: Path, silo_index: int, clients: int, rows: int = 6) -> Path:
    """A folder of `clients` CSV files with columns x, y (y ~ 3x + 1 + noise)."""
    folder = root / f"xy{silo_index}"
    folder.mkdir(parents=True, exist_ok=True)
    for c in range(clients):
        rng = np.random.default_rng(100 * silo_index + c)
        with open(folder / f"client_{c:02d}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["x", "y"])
            writer.writeheader()
            for _ in range(rows + c % 3):
                x = float(rng.uniform(-1, 1))
                writer.writerow({"x": round(x, 4), "y": round(3 * x + 1 + rng.normal(0, 0.1), 4)})
    return folder


def start_worker(
    group: ProcessGroup,
    amqp_url: str,
    federation: str,
    silo: str,
    index: int,
    data: dict[str, Path],
    extra_args: Iterable[str] = (),
) -> ManagedProcess:
    args = [
        sys.executable,
        "-m",
        "tff_amqp",
        "worker",
        "--stateless",
        "--broker",
        amqp_url,
        "--federation",
        federation,
        "--silo",
        silo,
    ]
    for key, path in data.items():
        args += ["--data", f"{key}={path}"]
    return group.start(f"worker-{silo}-{index}", [*args, *extra_args])


def wait_workers_ready(workers: Iterable[ManagedProcess], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    for worker in workers:
        worker.wait_for_log(WORKER_READY, max(1.0, deadline - time.monotonic()))


def fedavg_round():
    """(initialize, round): TFF's weighted FedAvg on a 1-feature linear Keras
    model; the round batches each client's CSV rows itself, so its client data
    is `silo_data(KEY)` of {<x=float32,y=float32>*}@CLIENTS."""
    import tensorflow as tf
    import tensorflow_federated as tff

    def model_fn():
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

    @tff.tensorflow.computation(tff.SequenceType(ROW))
    def to_batches(rows):
        return rows.batch(3).map(
            lambda r: (tf.reshape(r["x"], [-1, 1]), tf.reshape(r["y"], [-1, 1]))
        )

    @tff.federated_computation(
        process.next.type_signature.parameter[0],
        tff.FederatedType(tff.SequenceType(ROW), tff.CLIENTS),
    )
    def fedavg(state, rows):
        return process.next(state, tff.federated_map(to_batches, rows))

    return process.initialize, fedavg
