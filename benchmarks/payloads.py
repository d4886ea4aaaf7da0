"""Large payloads: broadcast of a 64 MiB and a 256 MiB model to 4 silos.

    .venv/bin/python benchmarks/payloads.py [--broker URL] [--sizes-mib 64 256]

For each size, one invocation broadcasts a float32 tensor of that size from
the coordinator to 4 local silo processes (each client reduces it to a scalar,
so only the broadcast is large). Measured in the same run:

- bytes the coordinator publishes to the broker (chunks + control), against
  the model size (aim: at most 1.1x; the broker fans the broadcast out);
- wall time of the invocation, next to TFF native's gRPC transfer of the same
  tensor: `CreateValue` into 4 `worker_binary` processes at once, which is what
  a native remote-executor deployment sends (one copy per worker);
- coordinator peak RSS above its level just before the invocation
  (aim: at most 2x the model), from the kernel's high-water mark;
- p50 latency of a small request (a one-value batch with a compute, over the
  control connection to one silo and back) while the transfer runs (aim:
  under 20 ms), next to the same probe on an idle federation.

Prints a table and writes benchmarks/results/payloads.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks._common import delete_federation, machine, print_table, write_result

MiB = 1024 * 1024
SILOS = ("s1", "s2", "s3", "s4")


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    # Linux: writing 5 resets the peak RSS (VmHWM) to the current RSS.
    Path("/proc/self/clear_refs").write_text("5")


def build(size: int) -> Any:
    import tensorflow as tf
    import tensorflow_federated as tff

    @tff.tensorflow.computation(tff.TensorType(np.float32, [size]), np.float32)
    def use_model(weights: Any, x: Any) -> Any:
        return tf.reduce_sum(weights) * 0.0 + x

    @tff.federated_computation(
        tff.FederatedType(tff.TensorType(np.float32, [size]), tff.SERVER),
        tff.FederatedType(np.float32, tff.CLIENTS),
    )
    def broadcast_round(weights: Any, data: Any) -> Any:
        return tff.federated_sum(
            tff.federated_map(use_model, (tff.federated_broadcast(weights), data))
        )

    return broadcast_round


async def native_transfer(weights: np.ndarray, workers: int) -> float:
    """Seconds to create the tensor in `workers` worker_binary processes at
    once over gRPC (TFF's own transport), serialization included."""
    from tensorflow_federated.python.core.impl.executors import value_serialization
    from tensorflow_federated.python.core.impl.types import computation_types

    from tff_amqp.tff_worker import WorkerBinary

    binaries = [WorkerBinary() for _ in range(workers)]
    try:
        await asyncio.gather(*(b.start() for b in binaries))
        executors = [await b.client.get_executor(1) for b in binaries]
        type_spec = computation_types.TensorType(np.float32, weights.shape)
        started = time.perf_counter()
        proto, _ = value_serialization.serialize_value(weights, type_spec)
        refs = await asyncio.gather(*(e.create_value(proto) for e in executors))
        elapsed = time.perf_counter() - started
        await asyncio.gather(*(e.dispose([r]) for e, r in zip(executors, refs, strict=True)))
        return elapsed
    finally:
        await asyncio.gather(*(b.stop() for b in binaries))


async def probe_once(runtime: Any, silo: str) -> float:
    """A small request over the control path: one batch (open, a 4-byte
    value, compute) to `silo`, and its reply."""
    from tff_amqp.coordinator.stateful.invocation import Invocation

    started = time.perf_counter()
    invocation = Invocation(runtime, clients=None)
    try:
        outbox = await invocation.outbox(silo)
        value_id = outbox.create_value(_SMALL_VALUE)
        await outbox.compute(value_id)
        return time.perf_counter() - started
    finally:
        runtime.in_background(invocation.close())


_SMALL_VALUE = b""


async def probe_loop(runtime: Any, stop: asyncio.Event, interval: float) -> list[float]:
    samples = []
    while not stop.is_set():
        samples.append(await probe_once(runtime, SILOS[-1]))
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass
    return samples


async def measure_amqp(broker: str, federation: str, sizes: list[int]) -> list[dict[str, Any]]:
    import tensorflow_federated as tff
    from tensorflow_federated.python.core.impl.executors import value_serialization

    import tff_amqp

    global _SMALL_VALUE
    proto, _ = value_serialization.serialize_value(np.float32(1.0), tff.TensorType(np.float32))
    _SMALL_VALUE = proto.SerializeToString()

    # Models of hundreds of MB: heartbeats get the 30 s that docs/operations.md
    # advises (four silos and their workers taking 256 MiB each on 2 cores can
    # keep a silo's event loop from a heartbeat for over the default 5 s).
    context = tff_amqp.create_async_amqp_execution_context(
        broker,
        federation=federation,
        min_silos=len(SILOS),
        cohort_timeout=180,
        deadline=900,
        heartbeat_timeout=30,
    )
    await context.start()
    runtime = context.runtime
    rows = []
    data = [1.0, 2.0, 3.0, 4.0]
    try:
        with tff.framework.get_context_stack().install(context):
            for _ in range(10):  # warm the probe path
                await probe_once(runtime, SILOS[-1])
            idle = [await probe_once(runtime, SILOS[-1]) for _ in range(30)]
            for size_mib in sizes:
                size = size_mib * MiB // 4
                comp = build(size)
                weights = np.full(size, 0.5, dtype=np.float32)
                # Warm-up call (compiles the computation for this size).
                await comp(weights, data)
                await asyncio.sleep(1.0)
                sent_before = runtime.bulk.sent_bytes + runtime.link.stats["published_bytes"]
                baseline = _rss_mib("VmRSS")
                _reset_peak_rss()
                stop = asyncio.Event()
                probes = asyncio.create_task(probe_loop(runtime, stop, 0.02))
                started = time.perf_counter()
                result = await comp(weights, data)
                elapsed = time.perf_counter() - started
                stop.set()
                busy = await probes
                peak = _rss_mib("VmHWM")
                sent = runtime.bulk.sent_bytes + runtime.link.stats["published_bytes"] - sent_before
                assert abs(float(result) - sum(data)) < 1e-3, result
                rows.append(
                    {
                        "size_mib": size_mib,
                        "amqp_wall_s": elapsed,
                        "sent_bytes": sent,
                        "sent_ratio": sent / (size * 4),
                        "rss_baseline_mib": baseline,
                        "rss_peak_mib": peak,
                        "rss_over_baseline_ratio": (peak - baseline) / size_mib,
                        "probe_p50_ms_during": statistics.median(busy) * 1e3,
                        "probe_n_during": len(busy),
                        "probe_p50_ms_idle": statistics.median(idle) * 1e3,
                    }
                )
                del weights
    finally:
        await context.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--broker", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[64, 256])
    args = parser.parse_args()

    from tff_amqp.local import LocalFederation

    print(
        f"payloads benchmark: broadcast of {args.sizes_mib} MiB to {len(SILOS)} silos", flush=True
    )
    native = {}
    for size_mib in args.sizes_mib:
        weights = np.full(size_mib * MiB // 4, 0.5, dtype=np.float32)
        native[size_mib] = asyncio.run(native_transfer(weights, len(SILOS)))
        del weights
    federation = f"bench-{uuid.uuid4().hex[:6]}"
    try:
        with LocalFederation(args.broker, federation) as local:
            for name in SILOS:
                local.start_silo(name)
            local.wait_ready(timeout=240)
            rows = asyncio.run(measure_amqp(args.broker, federation, args.sizes_mib))
    finally:
        # Its queues and exchanges go, whether the run finished or failed.
        delete_federation(args.broker, federation, list(SILOS))
    for row in rows:
        row["native_grpc_s"] = native[row["size_mib"]]

    table = [
        [
            f"{r['size_mib']} MiB",
            r["native_grpc_s"],
            r["amqp_wall_s"],
            r["sent_ratio"],
            r["rss_peak_mib"] - r["rss_baseline_mib"],
            r["rss_over_baseline_ratio"],
            r["probe_p50_ms_idle"],
            r["probe_p50_ms_during"],
        ]
        for r in rows
    ]
    print()
    print_table(
        [
            "broadcast",
            "native gRPC s",
            "tff-amqp s",
            "sent/model (aim<=1.1)",
            "RSS +MiB",
            "RSS/model (aim<=2)",
            "probe p50 ms idle",
            "probe p50 ms busy (aim<20)",
        ],
        table,
    )
    path = write_result(
        "payloads",
        {
            "machine": machine(),
            "silos": len(SILOS),
            "results": rows,
            "aims": {"sent_ratio": 1.1, "rss_over_baseline_ratio": 2.0, "probe_p50_ms": 20.0},
            "notes": "native_grpc_s: CreateValue of the tensor into 4 worker_binary processes "
            "at once (serialization included); tff-amqp s: the whole broadcast invocation "
            "(one publish fanned out by the broker, reassembly and CreateValue at each silo, "
            "a scalar sum back).",
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
