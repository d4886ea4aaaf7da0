"""The stateless regime: MapReduce rounds as work items on elastic worker
pools (`tff-amqp worker --stateless`). Real broker, real worker processes;
results compared with TFF's native runtime.

Tests run in file order on one federation of 2 silos x 3 workers; the later
ones kill workers on purpose.
"""

from __future__ import annotations

import collections
import itertools
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow.python.data.experimental.ops import testing as tf_data_testing

import tff_amqp
from tests.support.computations import XY_ROW, fedavg_round
from tests.support.data import read_column, write_xy_clients
from tests.support.federation import assert_close, local_federation, run_in
from tests.test_observe import scrape
from tff_amqp import protocol as p
from tff_amqp.errors import PartialResultError, PartialResultWarning
from tff_amqp.local import LocalFederation, ManagedProcess, SiloOptions, wait_ready
from tff_amqp.silo.data import DataSource, SiloDataStore
from tff_amqp.silo.pool.shard import shard_bounds

# Long real-broker tests: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

SILOS = ("north", "south")
CLIENTS_PER_SILO = 5
WORKERS_PER_SILO = 3


class Pools:
    def __init__(self, local: LocalFederation, folders: dict[str, Path]) -> None:
        self.name = local.federation
        self.local = local
        self.folders = folders
        self.workers: dict[str, list[ManagedProcess]] = {s: [] for s in SILOS}

    def add_worker(self, silo: str) -> ManagedProcess:
        worker = self.local.start_pool_worker(silo, data={"xy": self.folders[silo]})
        self.workers[silo].append(worker)
        return worker

    def datasets(self, silos=SILOS) -> list[tf.data.Dataset]:
        """Every client's data in the order the workers shard it."""
        element_type = tff.to_type(XY_ROW)
        out = []
        for silo in silos:
            store = SiloDataStore(silo, [DataSource("xy", self.folders[silo])])
            out += store.client_datasets("xy", element_type)
        return out

    def rows(self, silos=SILOS) -> int:
        return sum(len(read_column(self.folders[s], "x")) for s in silos)


@pytest.fixture(scope="module")
def pools(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pools]:
    root = tmp_path_factory.mktemp("pools")
    folders = {s: write_xy_clients(root, i, CLIENTS_PER_SILO) for i, s in enumerate(SILOS)}
    with local_federation(amqp_url, root / "logs") as local:
        pools = Pools(local, folders)
        for silo in SILOS:
            for _ in range(WORKERS_PER_SILO):
                pools.add_worker(silo)
        local.wait_ready(timeout=180)
        yield pools


def _context(amqp_url: str, pools: Pools, **options) -> tff_amqp.AmqpSyncMapReduceContext:
    options.setdefault("min_silos", len(SILOS))
    options.setdefault("cohort_timeout", 60.0)
    options.setdefault("deadline", 240.0)
    options.setdefault("shards_per_silo", CLIENTS_PER_SILO)
    return tff_amqp.create_sync_amqp_mapreduce_context(
        amqp_url, federation=pools.name, **options
    ).start()


def _wait_workers(context, silos, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(context.membership.pool_workers(s) >= count for s in silos):
        assert time.monotonic() < deadline, {s: context.membership.pool_workers(s) for s in silos}
        time.sleep(0.2)


# ------------------------------------------------------------- FedAvg parity


def test_fedavg_over_worker_pools_equals_native_tff(amqp_url, pools, native_context):
    initialize, fedavg = fedavg_round()
    native_state = run_in(native_context, initialize)
    datasets = pools.datasets()
    with _context(amqp_url, pools) as context:
        _wait_workers(context, SILOS, WORKERS_PER_SILO)
        # initialize has no CLIENTS placement: it runs on the coordinator.
        state = run_in(context, initialize)
        assert_close(state, native_state)
        for _ in range(2):
            ours = run_in(context, fedavg, state, tff_amqp.silo_data("xy"))
            native = run_in(native_context, fedavg, native_state, datasets)
            assert_close(ours.state, native.state)
            assert_close(ours.metrics, native.metrics)
            state, native_state = ours.state, native.state
        report = context.last_round
        assert report is not None
        # 10 work items (one per client shard), all merged, nobody dropped.
        assert report.items == len(SILOS) * CLIENTS_PER_SILO
        assert report.merged_items == report.items
        assert report.dropped_silos == []
        assert context.link.stats["rejected_replies"] == 0
    # The model learned something (same as native, but not a no-op round).
    weights = state.global_model_weights.trainable
    assert np.abs(np.asarray(weights[0])).sum() > 0
    examples = int(ours.metrics["client_work"]["train"]["num_examples"])
    assert examples == pools.rows()


# ---------------------------------------------------- crash mid-item: retry


@tff.tensorflow.computation(tff.SequenceType(XY_ROW), np.int64)
def slow_count(rows, offset):
    # Seconds of work inside the worker's TensorFlow, so a test can catch a
    # worker in the middle of an item.
    pause = tf.data.Dataset.range(1).apply(tf_data_testing.sleep(3_000_000))
    waited = pause.reduce(np.int64(0), lambda acc, x: acc + x)
    return rows.reduce(np.int64(0), lambda n, _: n + 1) + waited + offset


@tff.tensorflow.computation(np.int64, np.int64)
def add(a, b):
    return a + b


@tff.federated_computation(
    tff.FederatedType(np.int64, tff.SERVER),
    tff.FederatedType(tff.SequenceType(XY_ROW), tff.CLIENTS),
)
def slow_round(state, rows):
    offset = tff.federated_broadcast(state)
    counts = tff.federated_map(slow_count, (rows, offset))
    total = tff.federated_sum(counts)
    return tff.federated_map(add, (state, total)), total


def _run_in_thread(fn) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as e:  # reported by the test
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


STARTED = re.compile(r'"event":\s*"pool_worker\.item_started"')
DONE = re.compile(r'"event":\s*"pool_worker\.item_done"')
REDELIVERED = re.compile(r'"event":\s*"pool_worker\.item_started".*"redelivered":\s*true')


class LogMarks:
    """Where each worker's log stood, so a test only reads what came after."""

    def __init__(self, pools: Pools) -> None:
        self._marks = {w.name: len(w.log_text()) for ws in pools.workers.values() for w in ws}

    def new_text(self, worker: ManagedProcess) -> str:
        return worker.log_text()[self._marks.get(worker.name, 0) :]

    def busy_worker(self, pools: Pools, silos, timeout: float = 60.0) -> ManagedProcess:
        """A worker that started an item and has not finished it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for silo in silos:
                for worker in pools.workers[silo]:
                    text = self.new_text(worker)
                    if worker.running and len(STARTED.findall(text)) > len(DONE.findall(text)):
                        return worker
            time.sleep(0.05)
        raise AssertionError("no worker started an item")


def test_a_worker_killed_mid_item_costs_only_a_retry(amqp_url, pools):
    rows = pools.rows()
    with _context(amqp_url, pools) as context:
        _wait_workers(context, SILOS, WORKERS_PER_SILO)
        marks = LogMarks(pools)
        thread, outcome = _run_in_thread(
            lambda: run_in(context, slow_round, np.int64(0), tff_amqp.silo_data("xy"))
        )
        victim = marks.busy_worker(pools, SILOS)
        victim.process.send_signal(signal.SIGKILL)  # no goodbye, no ack
        victim.kill()  # and its worker_binary
        thread.join(120.0)
        assert not thread.is_alive(), "round did not finish"
        assert "error" not in outcome, outcome.get("error")
        new_state, total = outcome["value"]
        report = context.last_round
    # Each client counted exactly once (offset 0): redelivered, merged once.
    assert total == rows and new_state == rows
    assert report.merged_items == len(SILOS) * CLIENTS_PER_SILO
    redone = [
        w
        for ws in pools.workers.values()
        for w in ws
        if w.running and REDELIVERED.search(marks.new_text(w))
    ]
    assert redone, "no worker logged the redelivered item"
    # Replace the victim for the next tests.
    silo = next(s for s, ws in pools.workers.items() if victim in ws)
    pools.workers[silo].remove(victim)
    wait_ready(pools.add_worker(silo), timeout=180)


def test_worker_whose_worker_binary_dies_gives_its_item_back_and_exits(amqp_url, pools):
    rows = pools.rows()
    with _context(amqp_url, pools) as context:
        _wait_workers(context, SILOS, WORKERS_PER_SILO)
        marks = LogMarks(pools)
        thread, outcome = _run_in_thread(
            lambda: run_in(context, slow_round, np.int64(0), tff_amqp.silo_data("xy"))
        )
        victim = marks.busy_worker(pools, SILOS)
        binary_pid = int(re.search(r'"worker_pid":\s*(\d+)', victim.log_text()).group(1))
        os.kill(binary_pid, signal.SIGKILL)
        thread.join(120.0)
        assert not thread.is_alive(), "round did not finish"
        assert "error" not in outcome, outcome.get("error")
        _, total = outcome["value"]
    assert total == rows
    assert victim.process.wait(30) == 1
    assert "worker_binary died" in victim.log_text()
    silo = next(s for s, ws in pools.workers.items() if victim in ws)
    pools.workers[silo].remove(victim)
    wait_ready(pools.add_worker(silo), timeout=180)


@pytest.mark.parametrize(
    "cutoff", [{"straggler_timeout": 4.0}, {"quorum_grace": 1.0}], ids=["timeout", "grace"]
)
def test_straggling_silo_is_dropped_at_the_phase_cutoff(amqp_url, pools, cutoff):
    # south keeps one worker for its 5 slow items; north has three. The same
    # K-of-N rule as the stateful regime: a straggler timeout, or a grace
    # period once min_silos silos completed.
    for worker in pools.workers["south"][1:]:
        worker.stop()
    pools.workers["south"] = pools.workers["south"][:1]
    dropped: list[tuple[str, ...]] = []

    class Recorder:
        def silos_dropped(self, invocation, silos, reason):
            dropped.append((reason, *silos))

    with _context(
        amqp_url, pools, min_silos=1, metrics_port=0, progress=False, **cutoff
    ) as context:
        context.events.add(Recorder())
        _wait_workers(context, ["north"], WORKERS_PER_SILO)
        # A round over fewer silos is never silent.
        with pytest.warns(PartialResultWarning, match=r"south \(straggler\)"):
            new_state, total = run_in(context, slow_round, np.int64(0), tff_amqp.silo_data("xy"))
        report = context.last_round
        invocation = context.last_invocation
        assert context.membership.is_live("south")  # slow, not dead
        # Rounds report like invocations: the drop reaches observers and metrics.
        metrics = scrape(context.telemetry.metrics_port)
    assert dropped == [("straggler", "south")]
    labels = (("federation", pools.name), ("reason", "straggler"))
    assert metrics[("tff_amqp_coordinator_silos_dropped_total", labels)] == 1
    ok = (("federation", pools.name), ("outcome", "ok"))
    assert metrics[("tff_amqp_coordinator_invocations_total", ok)] == 1
    assert report.dropped_silos == ["south"]
    assert invocation.invocation_id == report.round_id
    assert invocation.dropped == {"south": "straggler"}
    assert invocation.took_part == ["north"] and sorted(invocation.cohort) == sorted(SILOS)
    assert total == pools.rows(["north"]) and new_state == total
    assert report.merged_items == CLIENTS_PER_SILO


def test_strict_round_refuses_a_partial_result(amqp_url, pools):
    # south still has one worker for its 5 slow items (the test before).
    with _context(
        amqp_url, pools, min_silos=1, straggler_timeout=4.0, strict=True, progress=False
    ) as context:
        _wait_workers(context, SILOS, 1)
        with pytest.raises(PartialResultError, match=r"south \(straggler\)") as info:
            run_in(context, slow_round, np.int64(0), tff_amqp.silo_data("xy"))
        invocation = context.last_invocation
    assert info.value.dropped == {"south": "straggler"}
    assert invocation.dropped == {"south": "straggler"}
    assert context.last_round.dropped_silos == ["south"]


def test_round_without_a_drop_reports_every_silo(amqp_url, pools):
    with _context(amqp_url, pools, strict=True, progress=False) as context:
        _wait_workers(context, SILOS, 1)
        _, total = run_in(context, slow_round, np.int64(0), tff_amqp.silo_data("xy"))
        invocation = context.last_invocation
    assert total == pools.rows()
    assert invocation.dropped == {} and sorted(invocation.took_part) == sorted(SILOS)


def test_silo_whose_workers_all_die_is_dropped_when_quorum_holds(amqp_url, pools):
    with _context(amqp_url, pools, min_silos=1, heartbeat_timeout=2.0) as context:
        _wait_workers(context, SILOS, 1)
        thread, outcome = _run_in_thread(
            lambda: run_in(context, slow_round, np.int64(0), tff_amqp.silo_data("xy"))
        )
        # Once every item is out (both silos are in the cohort), south's pool dies.
        deadline = time.monotonic() + 60
        while context.link.stats["published"] < len(SILOS) * CLIENTS_PER_SILO:
            assert time.monotonic() < deadline, (context.link.stats, context.membership.live())
            time.sleep(0.05)
        for worker in pools.workers["south"]:
            worker.kill()
        thread.join(120.0)
        assert not thread.is_alive(), "round did not finish"
        assert "error" not in outcome, outcome.get("error")
        _, total = outcome["value"]
        report = context.last_round
    assert report.dropped_silos == ["south"]
    assert total == pools.rows(["north"])


# ------------------------------------------------------------ clear errors


def test_computation_outside_mapreduce_form_points_to_the_stateful_context(amqp_url, pools):
    @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
    def two_rounds(values):
        mean = tff.federated_mean(values)
        return tff.federated_mean(tff.federated_map(add_f, (values, tff.federated_broadcast(mean))))

    with _context(amqp_url, pools) as context:
        with pytest.raises(tff_amqp.NotMapReduceFormError) as error:
            run_in(context, two_rounds, [1.0, 2.0])
    assert "create_sync_amqp_execution_context" in str(error.value)


@tff.tensorflow.computation(tff.SequenceType(XY_ROW), np.int64)
def count_below_limit(rows, limit):
    n = rows.reduce(np.int64(0), lambda n, _: n + 1)
    check = tf.debugging.assert_less(n, limit, message="too many rows for the limit")
    with tf.control_dependencies([check]):
        return tf.identity(n)


@tff.federated_computation(
    tff.FederatedType(np.int64, tff.SERVER),
    tff.FederatedType(tff.SequenceType(XY_ROW), tff.CLIENTS),
)
def checked_round(limit, rows):
    counts = tff.federated_map(count_below_limit, (rows, tff.federated_broadcast(limit)))
    total = tff.federated_sum(counts)
    return limit, total


def test_a_failing_work_item_reports_the_workers_grpc_status_like_native(
    amqp_url, pools, native_context
):
    # A TensorFlow assertion fails inside the workers' TFF worker: the round
    # fails with a SiloWorkerError chained to the gRPC error native raises.
    import grpc

    with pytest.raises(grpc.RpcError) as native:
        run_in(native_context, checked_round, np.int64(1), pools.datasets())
    with _context(amqp_url, pools, min_silos=1) as context:
        with pytest.raises(tff_amqp.SiloWorkerError) as ours:
            run_in(context, checked_round, np.int64(1), tff_amqp.silo_data("xy"))
    assert ours.value.worker_status == native.value.code()
    assert isinstance(ours.value.__cause__, grpc.RpcError)
    assert "too many rows for the limit" in str(ours.value)


@tff.tensorflow.computation(np.float32, np.float32)
def add_f(a, b):
    return a + b


def test_client_values_instead_of_silo_data_are_refused_clearly(amqp_url, pools):
    with _context(amqp_url, pools) as context:
        with pytest.raises(tff_amqp.NotMapReduceFormError, match=r"silo_data\(KEY\)"):
            run_in(
                context,
                slow_round,
                np.int64(0),
                [tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=[1.0], y=[2.0]))],
            )


# ---------------------------------------------------------------- unit bits


def test_shards_partition_the_clients_contiguously():
    for clients in range(0, 12):
        for shards in range(1, 8):
            bounds = [shard_bounds(clients, s, shards) for s in range(shards)]
            assert bounds[0][0] == 0 and bounds[-1][1] == clients
            for (a, b), (c, _) in itertools.pairwise(bounds):
                assert b == c and b >= a
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_work_messages_round_trip_and_reject_bad_shards():
    item = p.WorkItem("xy", 2, 5, b"w", b"z", b"a", b"b")
    envelope = p.Envelope(kind=p.Kind.WORK, body=item, sender="c", correlation_id="i1")
    assert p.decode(p.encode(envelope)).body == item
    result = p.Envelope(kind=p.Kind.WORK_RESULT, body=p.WorkResult(2, 1, b"acc"), sender="north")
    assert p.decode(p.encode(result)).body == p.WorkResult(2, 1, b"acc")
    bad = p.encode(envelope).replace(b"\xa5shard\x02", b"\xa5shard\x07")
    with pytest.raises(p.ProtocolError, match="shard 7 of 5"):
        p.decode(bad)


def test_worker_refuses_shards_below_its_client_floor(amqp_url, tmp_path, local):
    # The `local` fixture stops the worker first (its robust connection would
    # re-declare what is deleted), then deletes the federation's broker objects.
    name = local.federation
    folder = write_xy_clients(tmp_path, 0, 3)
    worker = local.start_pool_worker(
        "tiny", data={"xy": folder}, options=SiloOptions(extra_args=("--min-clients-per-item", "2"))
    )
    wait_ready(worker, timeout=180)
    options = dict(cohort_timeout=60.0, deadline=120.0)
    with tff_amqp.create_sync_amqp_mapreduce_context(
        amqp_url, federation=name, shards_per_silo=3, **options
    ) as context:
        # 3 clients in 3 shards: 1 client per item, below the floor of 2.
        with pytest.raises(tff_amqp.SiloError, match="at least 2 per work item") as error:
            run_in(context, slow_round, np.int64(0), tff_amqp.silo_data("xy"))
        assert error.value.silo == "tiny" and error.value.code == "privacy_refused"
    with tff_amqp.create_sync_amqp_mapreduce_context(
        amqp_url, federation=name, shards_per_silo=1, **options
    ) as context:
        _, total = run_in(context, slow_round, np.int64(0), tff_amqp.silo_data("xy"))
    assert total == len(read_column(folder, "x"))


def test_a_column_a_pool_lacks_is_refused_before_any_work_item(amqp_url, tmp_path, local):
    from tests.support.data import write_table
    from tff_amqp.errors import MissingColumnError

    folder = tmp_path / "xz"
    write_table(folder / "c0.csv", "csv", ["x", "z"], [[0.5, 1.0], [0.25, 2.0]])
    worker = local.start_pool_worker("lacking", data={"xy": folder})
    wait_ready(worker, timeout=180)
    with tff_amqp.create_sync_amqp_mapreduce_context(
        amqp_url, federation=local.federation, cohort_timeout=60.0, deadline=120.0
    ) as context:
        context.start()
        published = context.link.stats["published"]
        with pytest.raises(MissingColumnError, match="silo 'lacking' has no column 'y'"):
            run_in(context, slow_round, np.int64(0), tff_amqp.silo_data("xy"))
        assert context.link.stats["published"] == published


def test_no_live_worker_is_a_clear_cohort_error_within_the_timeout(amqp_url, federation):
    with tff_amqp.create_sync_amqp_mapreduce_context(
        amqp_url, federation=federation, cohort_timeout=1.5
    ) as context:
        started = time.monotonic()
        with pytest.raises(tff_amqp.CohortError, match="tff-amqp worker --stateless"):
            run_in(context, slow_round, np.int64(0), tff_amqp.silo_data("xy"))
        assert time.monotonic() - started < 1.5 + 15.0  # compile + bounded wait
