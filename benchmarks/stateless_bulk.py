"""Stateless regime with a large model: broadcast once per round (streams)
against the broadcast inline in every work item.

    .venv/bin/python benchmarks/stateless_bulk.py [--broker URL] [--size N]
        [--shards 4] [--repeats 3]

Two silos with one `tff-amqp worker --stateless` each, 4 clients per silo,
`--shards` work items per silo, a float32 model of `--size` values (16 MB by
default) broadcast and summed back (a federated mean of model-sized updates).
Modes, on the same coordinator and workers:

- `stream`: what the coordinator does now: the broadcast is one chunked
  transfer into the silos' broadcast streams, each worker reads it once.
- `inline`: the broadcast rides in every work item, as before streams (the
  coordinator's inline limit raised for the run; only possible while a model
  fits in one message, under RabbitMQ 3.x's 128 MiB limit).

Shard accumulators above 1 MiB come back as chunked transfers in both modes.
Prints a table and writes benchmarks/results/stateless_bulk.json.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks._common import delete_federation, machine, print_table, summary, write_result

SILOS = ("north", "south")
CLIENTS = 4


def write_clients(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for c in range(CLIENTS):
        with open(folder / f"client_{c:02d}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["x"])
            for r in range(4):
                writer.writerow([float(seed + c + r) / 10])
    return folder


def build(size: int):
    import collections

    import tensorflow_federated as tff

    row = collections.OrderedDict(x=np.float32)
    model = tff.TensorType(np.float32, [size])

    @tff.tensorflow.computation(model, tff.SequenceType(row))
    def client_update(weights, rows):
        return weights * 0.5 + rows.reduce(np.float32(0), lambda s, r: s + r["x"])

    @tff.tensorflow.computation(tff.SequenceType(row))
    def count(rows):
        return rows.reduce(np.int32(0), lambda n, _: n + 1)

    @tff.federated_computation(
        tff.FederatedType(model, tff.SERVER), tff.FederatedType(tff.SequenceType(row), tff.CLIENTS)
    )
    def one_round(weights, rows):
        updates = tff.federated_map(client_update, (tff.federated_broadcast(weights), rows))
        return tff.federated_mean(updates), tff.federated_sum(tff.federated_map(count, rows))

    return one_round


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--broker", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument("--size", type=int, default=4_000_000, help="float32 values in the model")
    parser.add_argument("--shards", type=int, default=4, help="work items per silo")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import tensorflow_federated as tff

    import tff_amqp
    from tff_amqp.local import LocalFederation

    one_round = build(args.size)
    weights = np.linspace(-1.0, 1.0, args.size, dtype=np.float32)
    federation = f"bench-{uuid.uuid4().hex[:6]}"
    root = Path(tempfile.mkdtemp(prefix="tff-amqp-bench-"))
    folders = {s: write_clients(root / s, 10 * i) for i, s in enumerate(SILOS)}
    print(
        f"stateless bulk: {len(SILOS)} silos x 1 worker, {args.shards} items per silo, model "
        f"{4 * args.size / 1e6:.0f} MB, repeats={args.repeats}, {os.cpu_count()} CPUs",
        flush=True,
    )
    results: dict[str, dict[str, object]] = {}
    outputs: dict[str, object] = {}
    try:
        with LocalFederation(args.broker, federation) as local:
            for silo in SILOS:
                local.start_pool_worker(silo, data={"xy": folders[silo]})
            local.wait_ready(timeout=300)
            with tff_amqp.create_sync_amqp_mapreduce_context(
                args.broker,
                federation=federation,
                shards_per_silo=args.shards,
                min_silos=len(SILOS),
                cohort_timeout=300,
                deadline=600,
                heartbeat_timeout=30,
            ) as ctx:
                ctx.start()
                with tff.framework.get_context_stack().install(ctx):
                    one_round(weights, tff_amqp.silo_data("xy"))  # warm-up: compile, caches
                for mode in ("stream", "inline"):
                    if mode == "inline":
                        # Before streams: every item carried the broadcast.
                        ctx.bulk.inline_limit = 1 << 40
                    samples, published = [], []
                    for _ in range(args.repeats):
                        before = ctx.link.stats["published_bytes"] + ctx.bulk.sent_bytes
                        started = time.perf_counter()
                        with tff.framework.get_context_stack().install(ctx):
                            out = one_round(weights, tff_amqp.silo_data("xy"))
                        samples.append(time.perf_counter() - started)
                        published.append(
                            ctx.link.stats["published_bytes"] + ctx.bulk.sent_bytes - before
                        )
                    report = ctx.last_round
                    assert report is not None
                    outputs[mode] = out
                    results[mode] = {
                        **summary(samples),
                        "coordinator_published_mb": float(np.median(published)) / 1e6,
                        "broadcast_transfers": report.broadcast_transfers,
                        "chunked_results": report.chunked_results,
                        "items": report.items,
                    }
                    print(
                        f"  {mode:6s}: median {results[mode]['median_s']:.2f} s, coordinator "
                        f"published {results[mode]['coordinator_published_mb']:.1f} MB per round",
                        flush=True,
                    )
    finally:
        delete_federation(args.broker, federation, list(SILOS))
    np.testing.assert_allclose(
        np.asarray(outputs["stream"][0]), np.asarray(outputs["inline"][0]), rtol=1e-6
    )
    print()
    print_table(
        ["mode", "round s (median)", "coordinator published MB / round", "items"],
        [[m, r["median_s"], r["coordinator_published_mb"], r["items"]] for m, r in results.items()],
    )
    write_result(
        "stateless_bulk",
        {
            "machine": machine(),
            "silos": len(SILOS),
            "workers_per_silo": 1,
            "items_per_silo": args.shards,
            "model_bytes": 4 * args.size,
            "modes": results,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
