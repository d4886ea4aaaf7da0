"""Stateless regime: does adding workers to a silo's pool shorten the round?

    .venv/bin/python benchmarks/stateless_scaling.py [--broker URL] [--repeats N]
        [--workers 1,2,4] [--clients 8]

One silo with CLIENTS clients (one work item per client), a pool grown from 1
to 4 `tff-amqp worker --stateless` processes while the coordinator keeps
running (elasticity, not restarts). Two client workloads:

- `wait`: each client waits 0.5 s inside TensorFlow (a tf.data sleep) — work
  bound by something other than this machine's CPU (remote reads, an
  accelerator, a slow disk). Ideal scaling: round ~ clients / workers * 0.5 s.
- `cpu`:  each client multiplies matrices for ~0.3 s of one core — CPU-bound.
  On this 2-core machine it cannot scale past ~2 workers (the broker, the
  coordinator and every worker share the same cores).

Prints a table and writes benchmarks/results/stateless_scaling.json.
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks._common import machine, print_table, summary, timed, write_result

ROW = collections.OrderedDict(x=np.float32)


def write_clients(folder: Path, clients: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for c in range(clients):
        with open(folder / f"client_{c:02d}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["x"])
            for r in range(8):
                writer.writerow([float(c + r)])
    return folder


def build():
    import tensorflow as tf
    import tensorflow_federated as tff
    from tensorflow.python.data.experimental.ops import testing as tf_data_testing

    @tff.tensorflow.computation(tff.SequenceType(ROW), np.float32)
    def wait_work(rows, scale):
        pause = tf.data.Dataset.range(1).apply(tf_data_testing.sleep(500_000))
        waited = tf.cast(pause.reduce(np.int64(0), lambda acc, x: acc + x), tf.float32)
        return rows.reduce(np.float32(0), lambda s, r: s + r["x"]) * scale + waited

    @tff.tensorflow.computation(tff.SequenceType(ROW), np.float32)
    def cpu_work(rows, scale):
        m = tf.random.stateless_uniform([256, 256], seed=[1, 2])

        def body(i, acc):
            return i + 1, tf.linalg.normalize(tf.matmul(acc, m))[0]

        _, out = tf.while_loop(lambda i, _: i < 400, body, (0, m))
        total = rows.reduce(np.float32(0), lambda s, r: s + r["x"])
        return total * scale + 0.0 * tf.reduce_sum(out)

    @tff.tensorflow.computation(np.float32, np.float32)
    def add(a, b):
        return a + b

    def round_of(work):
        @tff.federated_computation(
            tff.FederatedType(np.float32, tff.SERVER),
            tff.FederatedType(tff.SequenceType(ROW), tff.CLIENTS),
        )
        def one_round(state, rows):
            scale = tff.federated_broadcast(state)
            total = tff.federated_sum(tff.federated_map(work, (rows, scale)))
            return tff.federated_map(add, (state, total)), total

        return one_round

    return {"wait": round_of(wait_work), "cpu": round_of(cpu_work)}


def delete_broker_objects(broker: str, federation: str) -> None:
    """Remove what this run declared on the broker (its federation is unique):
    queues (the pool's broadcast stream included) and exchanges."""
    from benchmarks._common import delete_federation

    delete_federation(broker, federation, ["pool"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--broker", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", default="1,2,4", help="pool sizes, ascending")
    args = parser.parse_args()
    pool_sizes = [int(n) for n in args.workers.split(",")]

    import tensorflow_federated as tff

    import tff_amqp
    from tff_amqp.local import LocalFederation

    rounds = build()
    expected = float(sum(sum(c + r for r in range(8)) for c in range(args.clients)))
    federation = f"bench-{uuid.uuid4().hex[:6]}"
    data = write_clients(Path(tempfile.mkdtemp(prefix="tff-amqp-bench-")) / "pool", args.clients)
    print(
        f"stateless scaling: 1 silo, {args.clients} clients = {args.clients} work items per "
        f"round, pools of {pool_sizes} workers, repeats={args.repeats}, {os.cpu_count()} CPUs",
        flush=True,
    )
    results: dict[str, dict[int, dict[str, float]]] = {name: {} for name in rounds}
    with LocalFederation(args.broker, federation) as local:
        with tff_amqp.create_sync_amqp_mapreduce_context(
            args.broker,
            federation=federation,
            shards_per_silo=args.clients,
            cohort_timeout=300,
            deadline=600,
        ) as ctx:
            ctx.start()
            running = 0
            for size in pool_sizes:
                while running < size:
                    local.start_pool_worker("pool", data={"rows": data})
                    running += 1
                local.wait_ready(timeout=300)
                deadline = time.monotonic() + 60
                while ctx.membership.pool_workers("pool") < size:
                    assert time.monotonic() < deadline, "workers did not announce themselves"
                    time.sleep(0.2)
                for name, comp in rounds.items():
                    with tff.framework.get_context_stack().install(ctx):

                        def one_round(comp=comp) -> None:
                            _, total = comp(np.float32(1.0), tff_amqp.silo_data("rows"))
                            assert abs(float(total) - expected) < 1e-3, (total, expected)

                        samples = timed(one_round, repeats=args.repeats, warmup=1)
                    results[name][size] = summary(samples)
                    print(
                        f"  {name:5s} workers={size}: median {summary(samples)['median_s']:.2f} s",
                        flush=True,
                    )
    delete_broker_objects(args.broker, federation)
    rows = []
    for name, by_size in results.items():
        base = by_size[pool_sizes[0]]["median_s"]
        for size, stats in by_size.items():
            rows.append([name, size, stats["median_s"], base / stats["median_s"]])
    print()
    print_table(["workload", "workers", "round s (median)", "speed-up"], rows)
    path = write_result(
        "stateless_scaling",
        {
            "machine": machine(),
            "silos": 1,
            "clients": args.clients,
            "work_items_per_round": args.clients,
            "pool_sizes": pool_sizes,
            "rounds": {name: {str(k): v for k, v in by.items()} for name, by in results.items()},
            "speedup": {
                name: {str(k): by[pool_sizes[0]]["median_s"] / v["median_s"] for k, v in by.items()}
                for name, by in results.items()
            },
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
