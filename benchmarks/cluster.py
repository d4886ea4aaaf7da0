"""One RabbitMQ node against a 3-node cluster with quorum queues, in the same run.

    .venv/bin/python benchmarks/cluster.py [--repeats N] [--recoveries N] [--quick]

Starts a private single node (classic queues, the default) and then a private
3-node cluster (quorum queues, every process given all three addresses), each
with 3 local silo processes; runs the federated mean and one FedAvg round of
`benchmarks/overhead.py` on both and prints medians and ratios. On the
cluster it then kills (`kill -9`) the node leading most of the federation's
queues, measures the time until the next successful invocation (the mean,
retried at once when one fails), restarts the node and waits for it to rejoin;
`--recoveries` times. Writes benchmarks/results/cluster.json. Aim (issue
[cluster]): the cluster costs at most 1.3x on the mean, 1.05x on a FedAvg round.

The nodes are private (their own ports and data directories, always stopped);
the machine's default RabbitMQ node is never touched, so `--broker` is not
taken. They are started with the test suite's helpers
(`tests/support/private_broker.py`, `tests/support/private_cluster.py`): the
package has no node launcher of its own, and nothing else starts RabbitMQ nodes.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    CPU_ROLES,
    amqp_roles,
    cpu_by_role,
    machine,
    print_table,
    process_tree,
    progress,
    stop_on_sigterm,
    summary,
    timed,
    write_result,
)
from benchmarks.overhead import build

SILOS = ["s1", "s2", "s3"]
# Aims of issue [cluster]: cluster time / single-node time.
TARGETS = {"federated_mean": 1.3, "fedavg_round": 1.05}


@contextmanager
def federation_on(
    broker_url: str, queue_type: str, nodes: list[Any]
) -> Iterator[tuple[Any, Callable[[], dict[str, list[int]]]]]:
    """3 silo processes and a started context of a fresh federation on
    `nodes` (private brokers), with its processes by role."""
    import tff_amqp
    from tff_amqp.local import LocalFederation, SiloOptions

    options = SiloOptions(extra_args=("--queue-type", queue_type))
    with LocalFederation(broker_url, f"bench-{uuid.uuid4().hex[:6]}") as local:
        for name in SILOS:
            local.start_silo(name, options=options)
        progress(f"  starting {len(SILOS)} silos ({queue_type} queues) ...")
        local.wait_ready(timeout=240)
        with tff_amqp.create_sync_amqp_execution_context(
            broker_url,
            federation=local.federation,
            queue_type=queue_type,
            min_silos=len(SILOS),
            cohort_timeout=120,
            deadline=120,
        ) as context:

            def roles() -> dict[str, list[int]]:
                brokers = [pid for node in nodes for pid in process_tree(node.process.pid)]
                return amqp_roles(local, brokers)

            yield context, roles


def measure(
    context: Any,
    roles: Callable[[], dict[str, list[int]]],
    built: tuple[Any, ...],
    repeats: int,
) -> dict[str, Any]:
    """Timings of the mean and a FedAvg round, their CPU time by process role
    (measured back to back after the timings) and the mean's value."""
    import tensorflow_federated as tff

    mean, values, process, datasets = built
    with tff.framework.get_context_stack().install(context):
        state = process.initialize()
        mean_samples = timed(lambda: mean(values), repeats=repeats * 4, warmup=2)
        round_samples = timed(lambda: process.next(state, datasets), repeats=repeats, warmup=1)
        cpu = {
            "federated_mean": cpu_by_role(roles(), lambda: mean(values), repeats * 8),
            "fedavg_round": cpu_by_role(roles(), lambda: process.next(state, datasets), repeats),
        }
        value = float(mean(values))
    return {
        "federated_mean": summary(mean_samples),
        "fedavg_round": summary(round_samples),
        "cpu": cpu,
        "mean_value": value,
    }


def cpu_table(single: dict[str, Any], cluster: dict[str, Any]) -> tuple[list[str], list[list]]:
    """CPU ms per invocation by process role, one node against the cluster
    (the cluster's broker role is its three nodes together)."""
    headers = ["CPU ms per invocation", "setup", *CPU_ROLES, "total", "floor ms"]
    rows = [
        [name, setup, *(cpu[name]["ms"].get(role, "-") for role in CPU_ROLES),
         cpu[name]["total_ms"], cpu[name]["floor_ms"]]
        for name in TARGETS
        for setup, cpu in (("1 node", single), ("3 nodes", cluster))
    ]  # fmt: skip
    return headers, rows


def recover_once(context: Any, cluster: Any, prefix: str, invoke: Callable[[], Any]) -> dict:
    """kill -9 of the node leading most queues named `prefix`..., then the
    time until an invocation succeeds (failed attempts retried at once);
    the node is restarted and rejoins afterwards."""
    leaders = cluster.leaders(prefix)
    victim = cluster.node_named(max(leaders, key=lambda n: leaders[n]))
    failures: list[str] = []
    killed = time.perf_counter()
    victim.kill()
    try:
        while True:
            try:
                invoke()
                break
            except Exception as e:  # counted and reported: a failure is a result here
                failures.append(f"{type(e).__name__}: {e}"[:200])
                if time.perf_counter() - killed > 120:
                    raise RuntimeError(
                        f"no successful invocation within 120 s: {failures[-3:]}"
                    ) from e
        recovered = time.perf_counter() - killed
    finally:
        victim.start()
        cluster.await_members(len(cluster.nodes))
    return {
        "victim_led_queues": leaders[victim.node],
        "queues": sum(leaders.values()),
        "recovery_s": recovered,
        "failed_invocations": len(failures),
        "failures": failures[:3],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--recoveries", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="--repeats 2 --recoveries 1")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.recoveries = 2, 1

    from tests.support.private_broker import PrivateBroker, rabbitmq_available
    from tests.support.private_cluster import PrivateCluster

    if not rabbitmq_available():
        print("cluster benchmark: needs a local RabbitMQ install to start private nodes")
        return 1
    stop_on_sigterm()
    # A node loss makes aio-pika and aiormq log every failed reconnect with a
    # traceback: expected here, and it buries the table.
    for name in ("aio_pika", "aiormq"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    started_at = machine()
    progress(f"cluster benchmark: 3 silos, repeats={args.repeats}, recoveries={args.recoveries}")
    built = build()
    root = Path(tempfile.mkdtemp(prefix="tff-amqp-cluster-bench-"))
    try:
        progress("one private node, classic queues ...")
        with PrivateBroker(root / "single") as node:
            with federation_on(node.url, "classic", [node]) as (ctx, roles):
                single = measure(ctx, roles, built, args.repeats)
        progress("a private 3-node cluster, quorum queues ...")
        with PrivateCluster(root / "cluster") as cluster:
            with federation_on(cluster.broker_url, "quorum", cluster.nodes) as (ctx, roles):
                clustered = measure(ctx, roles, built, args.repeats)
                mean, values = built[0], built[1]

                def invoke() -> Any:
                    import tensorflow_federated as tff

                    with tff.framework.get_context_stack().install(ctx):
                        return mean(values)

                prefix = f"tff.{ctx.runtime.options.federation}."
                recoveries = []
                for i in range(args.recoveries):
                    progress(f"  node loss {i + 1}/{args.recoveries} ...")
                    recoveries.append(recover_once(ctx, cluster, prefix, invoke))
                    invoke()  # the federation works with the node back, before the next kill
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert abs(single["mean_value"] - clustered["mean_value"]) < 1e-5, (single, clustered)

    rows = [
        [
            name,
            single[name]["median_s"] * 1e3,
            clustered[name]["median_s"] * 1e3,
            clustered[name]["median_s"] / single[name]["median_s"],
            TARGETS[name],
        ]
        for name in TARGETS
    ]
    print()
    print_table(["computation", "1 node ms", "3-node quorum ms", "ratio", "aim"], rows)
    print()
    print_table(
        ["node loss", "victim led", "recovery s", "failed invocations"],
        [
            [i + 1, f"{r['victim_led_queues']}/{r['queues']}", r["recovery_s"],
             r["failed_invocations"]]
            for i, r in enumerate(recoveries)
        ],
    )  # fmt: skip
    print()
    print_table(*cpu_table(single["cpu"], clustered["cpu"]))
    path = write_result(
        "cluster",
        {
            "machine": started_at,
            "machine_at_end": machine(),
            "quick": args.quick,
            "silos": len(SILOS),
            "clients": len(built[1]),
            "single_node_classic": {k: single[k] for k in TARGETS},
            "cluster_3_nodes_quorum": {k: clustered[k] for k in TARGETS},
            "ratios": {r[0]: r[3] for r in rows},
            "targets": TARGETS,
            # CPU ms per invocation by process role, each measured back to back.
            "cpu": {
                "single_node_classic": single["cpu"],
                "cluster_3_nodes_quorum": clustered["cpu"],
            },
            "recoveries": recoveries,
            "recovery_median_s": statistics.median(r["recovery_s"] for r in recoveries),
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
