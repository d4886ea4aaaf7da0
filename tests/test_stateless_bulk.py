"""The stateless regime with values above the inline limit: a round's
broadcast is published once into the silos' broadcast streams (not once per
work item), pool workers read and cache it, and large shard accumulators come
back as chunked transfers. A private broker refuses messages over 1 MiB, so a
few-MB model cannot travel inline at all; results are compared with TFF's
native runtime.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import tff_amqp
from tests.support.broker import delete_federation_entities, new_federation_name
from tests.support.computations import XY_ROW as ROW
from tests.support.data import write_xy_clients
from tests.support.federation import assert_close, run_in
from tests.support.private_broker import free_port, private_rabbitmq
from tests.test_observe import scrape, value
from tff_amqp import protocol as p
from tff_amqp.coordinator.bulk import CoordinatorBulk
from tff_amqp.local import LocalFederation, ManagedProcess, SiloOptions, wait_ready
from tff_amqp.retry import connect_within
from tff_amqp.silo.bulk import BulkSettings
from tff_amqp.silo.data import DataSource, SiloDataStore
from tff_amqp.silo.pool.broadcast import PoolBulk
from tff_amqp.topology import Topology
from tff_amqp.transport.bulk import TransferError, chunk_bytes_for, inline_limit_for

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
LIMIT = 1 * MiB  # the private broker's max_message_size, and ours
SILOS = ("north", "south")
CLIENTS_PER_SILO = 4
SHARDS_PER_SILO = 2
# 4 MB of float32: several chunks, far above the inline limit (480 KiB here).
SIZE = 1_000_000
MODEL = tff.TensorType(np.float32, [SIZE])

FETCHED = re.compile(r'"event":\s*"pool_worker\.broadcast_fetched"')
DONE = re.compile(r'"event":\s*"pool_worker\.item_done"')


@tff.tensorflow.computation(MODEL, tff.SequenceType(ROW))
def client_update(weights: Any, rows: Any) -> Any:
    total = rows.reduce(np.float32(0.0), lambda s, r: s + r["x"])
    return weights * 0.5 + total


@tff.tensorflow.computation(tff.SequenceType(ROW))
def count_rows(rows: Any) -> Any:
    return rows.reduce(np.int32(0), lambda n, _: n + 1)


@tff.federated_computation(
    tff.FederatedType(MODEL, tff.SERVER), tff.FederatedType(tff.SequenceType(ROW), tff.CLIENTS)
)
def big_round(weights: Any, rows: Any) -> Any:
    # The broadcast (the weights) and each shard's accumulator (a model-sized
    # sum and a count) are both above the inline limit.
    updates = tff.federated_map(client_update, (tff.federated_broadcast(weights), rows))
    return tff.federated_mean(updates), tff.federated_sum(tff.federated_map(count_rows, rows))


@tff.tensorflow.computation(np.float32, tff.SequenceType(ROW))
def small_update(scale: Any, rows: Any) -> Any:
    return rows.reduce(np.float32(0.0), lambda s, r: s + scale * r["y"])


@tff.federated_computation(
    tff.FederatedType(np.float32, tff.SERVER),
    tff.FederatedType(tff.SequenceType(ROW), tff.CLIENTS),
)
def small_round(scale: Any, rows: Any) -> Any:
    updates = tff.federated_map(small_update, (tff.federated_broadcast(scale), rows))
    return tff.federated_sum(updates), tff.federated_sum(tff.federated_map(count_rows, rows))


class Federation:
    def __init__(self, local: LocalFederation, folders: dict[str, Path]) -> None:
        self.url = local.broker_url
        self.name = local.federation
        self.local = local
        self.folders = folders
        self.workers: dict[str, list[ManagedProcess]] = {s: [] for s in SILOS}

    def add_worker(self, silo: str, metrics_port: int | None = None) -> ManagedProcess:
        worker = self.local.start_pool_worker(
            silo,
            data={"xy": self.folders[silo]},
            options=SiloOptions(max_message_bytes=LIMIT, metrics_port=metrics_port),
        )
        self.workers[silo].append(worker)
        return worker

    def datasets(self) -> list[tf.data.Dataset]:
        """Every client's data in the order the workers shard it."""
        out = []
        for silo in SILOS:
            store = SiloDataStore(silo, [DataSource("xy", self.folders[silo])])
            out += store.client_datasets("xy", tff.to_type(ROW))
        return out

    def context(self, **options: Any) -> tff_amqp.AmqpSyncMapReduceContext:
        options.setdefault("min_silos", len(SILOS))
        options.setdefault("cohort_timeout", 60.0)
        options.setdefault("deadline", 300.0)
        return tff_amqp.create_sync_amqp_mapreduce_context(
            self.url,
            federation=self.name,
            shards_per_silo=SHARDS_PER_SILO,
            max_message_bytes=LIMIT,
            **options,
        ).start()


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    # The whole broker goes at the end: its streams and queues with it.
    root = tmp_path_factory.mktemp("bulkpool")
    folders = {s: write_xy_clients(root, i, CLIENTS_PER_SILO) for i, s in enumerate(SILOS)}
    with private_rabbitmq(config=f"max_message_size = {LIMIT}") as url:
        with LocalFederation(url, "bulkpool", log_dir=root / "logs") as local:
            fed = Federation(local, folders)
            for silo in SILOS:
                fed.add_worker(silo)
            local.wait_ready(timeout=180)
            yield fed


def _run_in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as e:  # reported by the test
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def _wait_workers(context: Any, count: dict[str, int], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(context.membership.pool_workers(s) >= n for s, n in count.items()):
        assert time.monotonic() < deadline, {s: context.membership.pool_workers(s) for s in count}
        time.sleep(0.2)


def test_the_limit_leaves_room_for_chunks() -> None:
    # The sizes this file relies on: 1 MiB is a usable limit, and the model
    # cannot ride inline under it.
    assert chunk_bytes_for(LIMIT) == LIMIT - 64 * 1024
    assert 4 * SIZE > 8 * inline_limit_for(LIMIT)


async def test_workers_read_a_broadcast_from_the_stream_once_and_late_ones_find_it(
    amqp_url: str,
) -> None:
    """The pieces on the shared broker, without TFF: the coordinator publishes
    into a silo's stream; a worker reads the wanted transfer once (skipping an
    earlier one), serves it again from its cache, drops it when the round's
    deadline passes; a worker started afterwards still reads it; a blob whose
    checksum does not match is refused, not cached."""
    federation = new_federation_name()
    topology = Topology(federation)

    def worker() -> PoolBulk:
        return PoolBulk(
            BulkSettings(
                broker_url=amqp_url,
                topology=topology,
                silo="north",
                user_id="guest",
                instance="test-worker",
                max_message_bytes=2 * MiB,
                declare_topology=True,
                connect_policy=connect_within(10),
            )
        )

    coordinator = CoordinatorBulk(amqp_url, topology, sender="coord", max_message_bytes=2 * MiB)
    first, late = worker(), worker()
    try:
        await coordinator.start()
        await first.start()  # guest mode: declares the stream
        since = time.time() - 5
        deadline = time.time() + 6
        earlier = os.urandom(3 * MiB)
        data = os.urandom(5 * MiB + 7)
        await coordinator.send(
            earlier, ["north"], invocation_id="r0", deadline=deadline, streams=True
        )
        blob = await coordinator.send(
            data, ["north"], invocation_id="r1", deadline=deadline, streams=True
        )
        assert coordinator.stats["stream_transfers"] == 2
        for _ in range(2):
            got = await first.broadcast(blob, since=since, round_id="r1", deadline=deadline)
            assert got == data
        assert first.stats["broadcast_fetches"] == 1
        assert first.stats["broadcast_cache_hits"] == 1
        # Both transfers were read from the stream; only the wanted one kept.
        assert first.stats["broadcast_read_bytes"] > len(earlier) + len(data)
        await late.start()
        assert await late.broadcast(blob, since=since, round_id="r1", deadline=deadline) == data
        forged = p.BlobRef(blob.transfer, blob.size, b"\0" * 32)
        with pytest.raises(TransferError, match="incomplete"):
            await late.broadcast(forged, since=since, round_id="r1", deadline=time.time() + 2)
        assert late.stats["broadcast_fetches"] == 2
        await asyncio.sleep(max(0.0, deadline - time.time()) + 1.5)
        # The round is over: the cache let go of the value without a new item.
        assert first.cached == 0
    finally:
        await late.close()
        await first.close()
        await coordinator.close()
        delete_federation_entities(amqp_url, federation)


async def test_a_worker_starts_even_if_its_stream_cannot_be_declared(amqp_url: str) -> None:
    # A broker without streams, or a stream declared otherwise, must not stop
    # a worker whose rounds may never need one; its broadcast-free work goes on.
    federation = new_federation_name()
    topology = Topology(federation)
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(topology.broadcast_queue("north"), durable=True)  # classic
        worker = PoolBulk(
            BulkSettings(
                broker_url=amqp_url,
                topology=topology,
                silo="north",
                user_id="guest",
                instance="test-worker",
                max_message_bytes=2 * MiB,
                declare_topology=True,
                connect_policy=connect_within(10),
            )
        )
        await worker.start()
        try:
            # Its sending side works: a result transfer is confirmed by the broker.
            ref = await worker.send(
                os.urandom(3 * MiB),
                invocation_id="r",
                correlation_id="c",
                deadline=time.time() + 30,
            )
            assert ref.size == 3 * MiB and worker.sent_bytes > 3 * MiB
        finally:
            await worker.close()
    finally:
        await connection.close()
        delete_federation_entities(amqp_url, federation)


def test_a_large_model_round_equals_native_with_one_broadcast_per_round(
    federation: Federation, native_context: Any
) -> None:
    weights = np.linspace(-1.0, 1.0, SIZE, dtype=np.float32)
    datasets = federation.datasets()
    workers = [w for ws in federation.workers.values() for w in ws]
    marks = {w.name: len(w.log_text()) for w in workers}
    rounds = 2
    with federation.context() as context:
        _wait_workers(context, {s: 1 for s in SILOS})
        for _ in range(rounds):
            ours = run_in(context, big_round, weights, tff_amqp.silo_data("xy"))
            native = run_in(native_context, big_round, weights, datasets)
            assert_close(ours, native)
            report = context.last_round
            assert report is not None
            # 2 silos x 2 shards: 4 items, all merged.
            assert report.items == len(SILOS) * SHARDS_PER_SILO
            assert report.merged_items == report.items
            # The broadcast was published once for the round: one transfer,
            # one value's worth of chunk bytes (the broker copies it into each
            # silo's stream), not one per item or per silo.
            assert report.broadcast_transfers == 1
            assert report.broadcast_bytes > 4 * SIZE
            assert report.broadcast_bytes <= report.broadcast_chunk_bytes
            assert report.broadcast_chunk_bytes < 1.1 * report.broadcast_bytes
            # Every shard's model-sized accumulator came back chunked.
            assert report.chunked_results == report.items
            weights = np.asarray(ours[0])
        assert context.bulk.stats["stream_transfers"] == rounds
        assert context.bulk.stats["rejected_chunks"] == 0
        # Chunks received: about one accumulator per item.
        assert context.bulk.stats["received_bytes"] > rounds * report.items * 4 * SIZE
        assert context.link.stats["rejected_replies"] == 0
    # Each worker ran 2 items a round but read each round's broadcast from
    # the stream once (the second shard used its cache).
    for worker in workers:
        text = worker.log_text()[marks[worker.name] :]
        assert len(DONE.findall(text)) == rounds * SHARDS_PER_SILO, worker.name
        assert len(FETCHED.findall(text)) == rounds, worker.name


def test_a_small_broadcast_still_rides_inline(federation: Federation, native_context: Any) -> None:
    datasets = federation.datasets()
    with federation.context() as context:
        _wait_workers(context, {s: 1 for s in SILOS})
        ours = run_in(context, small_round, np.float32(2.0), tff_amqp.silo_data("xy"))
        assert_close(ours, run_in(native_context, small_round, np.float32(2.0), datasets))
        report = context.last_round
        assert report is not None and report.items == len(SILOS) * SHARDS_PER_SILO
        assert report.broadcast_transfers == 0 and report.broadcast_chunk_bytes == 0
        assert report.chunked_results == 0
        assert context.bulk.stats["stream_transfers"] == 0


def test_a_worker_that_starts_after_the_broadcast_still_reads_it(
    federation: Federation, native_context: Any
) -> None:
    """South's only worker is frozen when the round starts (it still counts
    as live for the cohort); a new south worker starts only after the round's
    broadcast went out, and must find it in the stream."""
    weights = np.linspace(0.0, 2.0, SIZE, dtype=np.float32)
    (frozen,) = federation.workers["south"]
    with federation.context(heartbeat_timeout=120.0) as context:
        _wait_workers(context, {s: 1 for s in SILOS})
        published = context.bulk.stats["stream_transfers"]
        frozen.process.send_signal(signal.SIGSTOP)
        try:
            thread, outcome = _run_in_thread(
                lambda: run_in(context, big_round, weights, tff_amqp.silo_data("xy"))
            )
            deadline = time.monotonic() + 120
            while context.bulk.stats["stream_transfers"] == published:
                assert time.monotonic() < deadline and thread.is_alive(), outcome
                time.sleep(0.1)
            metrics_port = free_port()
            late = federation.add_worker("south", metrics_port)
            wait_ready(late, 180)
        finally:
            # The frozen worker's unacked item (prefetch 1) goes back to the
            # queue when it dies; the late worker runs it.
            frozen.process.send_signal(signal.SIGKILL)
            frozen.process.wait(timeout=30)
            federation.workers["south"].remove(frozen)
        thread.join(timeout=240)
        assert not thread.is_alive()
        assert "error" not in outcome, outcome.get("error")
        native = run_in(native_context, big_round, weights, federation.datasets())
        assert_close(outcome["value"], native)
        report = context.last_round
        assert report is not None and report.dropped_silos == []
        assert report.merged_items == report.items == len(SILOS) * SHARDS_PER_SILO
        samples = scrape(metrics_port)
    text = late.log_text()
    assert len(FETCHED.findall(text)) == 1
    assert len(DONE.findall(text)) == SHARDS_PER_SILO
    # The same in the worker's metrics: one read of the stream, the other
    # shard served from the cache.
    assert value(samples, "tff_amqp_worker_broadcast_fetches_total", silo="south") == 1
    hits = value(samples, "tff_amqp_worker_broadcast_cache_hits_total", silo="south")
    assert hits == SHARDS_PER_SILO - 1
    assert value(samples, "tff_amqp_worker_broadcast_read_bytes_total", silo="south") > 4 * SIZE
