"""Pipelined throughput: many invocations in flight through one coordinator,
against TFF native and against the broker's own ceiling, in the same run.

    .venv/bin/python benchmarks/throughput.py [--concurrency 1 8 32] [--silos 2] [--quick]

A small federated sum over `--silos` silos (one simulation host, see
docs/simulation.md), C invocations in flight at a time (asyncio, the async
execution context). Reported per C:

- invocations/s, and executor operations/s: the create_value, create_call,
  create_struct and create_selection calls TFF's runtime makes on the
  coordinator's executor (counted by wrapping them in this process);
- broker round trips/s of the coordinator (reply messages received per
  second; a bundle of several replies is one) and
  the mean request and reply sizes;
- TFF native's invocations/s at the same C (its async context), measured in
  alternating blocks with tff-amqp (`--blocks`, both contexts live), so that
  drift of a shared machine falls on both; the ratio's range over the blocks;
- per invocation: worker calls of native, of the coordinator and of each
  silo (silos report theirs in their status), and control messages;
- the broker's ceiling: raw aio-pika request/reply round trips with
  publisher confirms, at the coordinator's mean request and reply sizes and
  C x silos in flight (the coordinator keeps about one request per silo in
  flight per invocation), between two connections through this broker.

Writes benchmarks/results/throughput.json and throughput.png.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks._common import (
    CPU_ROLES,
    RESULTS,
    CpuMeter,
    amqp_roles,
    broker_pids,
    delete_federation_async,
    machine,
    native_roles,
    native_worker_calls,
    print_table,
    progress,
    stop_on_sigterm,
    write_result,
)
from tff_amqp.processes import reaping_children

EXECUTOR_OPERATIONS = ("create_value", "create_call", "create_struct", "create_selection")


class OperationCounter:
    """Counts the coordinator executor's operations (benchmark instrumentation:
    wraps AmqpExecutor's methods in this process while installed)."""

    def __init__(self) -> None:
        self.count = 0
        self._originals: dict[str, Any] = {}

    def __enter__(self) -> OperationCounter:
        from tff_amqp.coordinator.stateful.executor import AmqpExecutor

        for name in EXECUTOR_OPERATIONS:
            original = getattr(AmqpExecutor, name)
            self._originals[name] = original
            setattr(AmqpExecutor, name, self._wrap(original))
        return self

    def __exit__(self, *exc: object) -> None:
        from tff_amqp.coordinator.stateful.executor import AmqpExecutor

        for name, original in self._originals.items():
            setattr(AmqpExecutor, name, original)

    def _wrap(self, method: Any) -> Any:
        async def counted(executor: Any, *args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return await method(executor, *args, **kwargs)

        return counted


async def _pipelined(
    call: Callable[[], Awaitable[Any]], concurrency: int, total: int
) -> tuple[float, list[Any]]:
    """Run `total` calls with at most `concurrency` in flight; (seconds, results)."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> Any:
        async with gate:
            return await call()

    started = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(total)))
    return time.perf_counter() - started, results


def _computation() -> Any:
    import tensorflow_federated as tff

    @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
    def total(x):
        return tff.federated_sum(x)

    return total


async def _native_block(comp: Any, values: list[float], c: int, total: int, calls: Any) -> Any:
    """One block of TFF native (its async context installed) at C = c."""
    calls_before = sum(calls.values())
    with CpuMeter(native_roles()) as cpu:
        seconds, results = await _pipelined(lambda: comp(values), c, total)
    assert all(abs(float(r) - sum(values)) < 1e-4 for r in results)
    return {
        "invocations": len(results),
        "seconds": seconds,
        "cpu": cpu.per_invocation(len(results)),
        "worker_calls_per_invocation": (sum(calls.values()) - calls_before) / len(results),
    }


async def _amqp_block(
    context: Any, silos: list[str], comp: Any, values: list[float], c: int, total: int,
    ops: OperationCounter, roles: Callable[[], dict[str, list[int]]],
) -> dict[str, Any]:  # fmt: skip
    """One block of tff-amqp (its async context installed) at C = c."""
    from tff_amqp.coordinator.stateful.counts import snapshot

    link = context.runtime.link
    counts_before = await snapshot(context.runtime, silos, timeout=60.0)
    before = dict(link.stats)
    ops_before = ops.count
    with CpuMeter(roles()) as cpu:
        seconds, results = await _pipelined(lambda: comp(values), c, total)
    assert all(abs(float(r) - sum(values)) < 1e-4 for r in results)
    delta = {k: link.stats[k] - before.get(k, 0) for k in link.stats}
    # Clean-up included: counted once every invocation has ended.
    counts = (await snapshot(context.runtime, silos, timeout=60.0)).minus(counts_before)
    n = len(results)
    return {
        "invocations": n,
        "seconds": seconds,
        "cpu": cpu.per_invocation(n),
        "executor_ops": ops.count - ops_before,
        # Broker messages (a bundle of several requests or replies is one).
        "reply_messages": delta["reply_messages"],
        "request_messages": delta["request_messages"],
        "published_bytes": delta["published_bytes"],
        "received_bytes": delta["received_bytes"],
        "messages": counts.messages,
        "coordinator_worker_calls": counts.coordinator_total,
        "silo_worker_calls": {s: counts.silo_total(s) for s in silos},
    }


def _merge_cpu(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-invocation CPU of several blocks, weighted by their invocations."""
    n = sum(b["invocations"] for b in blocks)
    roles = {role for b in blocks for role in b["cpu"]["ms"]}
    ms = {
        role: round(sum(b["cpu"]["ms"].get(role, 0.0) * b["invocations"] for b in blocks) / n, 3)
        for role in roles
    }
    total = sum(ms.values())
    return {
        "invocations": n,
        "ms": ms,
        "total_ms": round(total, 3),
        "floor_ms": round(total / (os.cpu_count() or 1), 3),
        "wall_ms": round(sum(b["seconds"] for b in blocks) * 1e3 / n, 3),
        "unmeasured": sorted({u for b in blocks for u in b["cpu"]["unmeasured"]}),
    }


def _native_level(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    n = sum(b["invocations"] for b in blocks)
    return {
        "invocations_per_s": n / sum(b["seconds"] for b in blocks),
        "cpu": _merge_cpu(blocks),
        "worker_calls_per_invocation": sum(
            b["worker_calls_per_invocation"] * b["invocations"] for b in blocks
        )
        / n,
    }


def _amqp_level(blocks: list[dict[str, Any]], silos: list[str]) -> dict[str, Any]:
    n = sum(b["invocations"] for b in blocks)
    seconds = sum(b["seconds"] for b in blocks)

    def total(key: str) -> float:
        return sum(b[key] for b in blocks)

    replies = max(total("reply_messages"), 1)
    return {
        "invocations_per_s": n / seconds,
        "cpu": _merge_cpu(blocks),
        "executor_ops_per_s": total("executor_ops") / seconds,
        "executor_ops_per_invocation": total("executor_ops") / n,
        "broker_round_trips_per_s": total("reply_messages") / seconds,
        "messages_per_invocation": total("messages") / n,
        "coordinator_worker_calls_per_invocation": total("coordinator_worker_calls") / n,
        "silo_worker_calls_per_invocation": {
            s: sum(b["silo_worker_calls"][s] for b in blocks) / n for s in silos
        },
        "request_bytes": total("published_bytes") / max(total("request_messages"), 1),
        "reply_bytes": total("received_bytes") / replies,
        "seconds": seconds,
    }


async def _measure(
    broker: str, federation: str, silos: list[str], comp: Any, values: list[float],
    levels: list[int], total: int, blocks: int, roles: Callable[[], dict[str, list[int]]],
) -> tuple[dict[int, Any], dict[int, Any], dict[int, list[float]]]:  # fmt: skip
    """TFF native and tff-amqp at each C, in alternating blocks of `total` x C
    invocations (native first, then tff-amqp first, ...) with both contexts
    live, so that drift of a shared machine falls on both. Returns native's
    and tff-amqp's levels and, per C, each block's ratio (tff-amqp / native)."""
    import tensorflow_federated as tff

    import tff_amqp

    stack = tff.framework.get_context_stack()
    native_blocks: dict[int, list[dict[str, Any]]] = {c: [] for c in levels}
    amqp_blocks: dict[int, list[dict[str, Any]]] = {c: [] for c in levels}
    ratios: dict[int, list[float]] = {c: [] for c in levels}
    # TFF's launcher leaves its worker_binary running: ours to stop.
    with reaping_children("worker_binary"), native_worker_calls() as calls:
        native = tff.backends.native.create_async_local_cpp_execution_context()
        amqp = tff_amqp.create_async_amqp_execution_context(
            broker, federation=federation, min_silos=len(silos), cohort_timeout=300.0,
            deadline=600.0, heartbeat_timeout=30.0,
        )  # fmt: skip
        try:
            with OperationCounter() as ops:

                async def native_block(c: int) -> dict[str, Any]:
                    with stack.install(native):
                        return await _native_block(comp, values, c, total * c, calls)

                async def amqp_block(c: int) -> dict[str, Any]:
                    with stack.install(amqp):
                        return await _amqp_block(
                            amqp, silos, comp, values, c, total * c, ops, roles
                        )

                with stack.install(native):
                    await comp(values)  # warm-up
                with stack.install(amqp):
                    await comp(values)
                for c in levels:
                    for block in range(blocks):
                        if block % 2 == 0:
                            theirs = await native_block(c)
                            ours = await amqp_block(c)
                        else:
                            ours = await amqp_block(c)
                            theirs = await native_block(c)
                        native_blocks[c].append(theirs)
                        amqp_blocks[c].append(ours)
                        ratios[c].append(
                            (ours["invocations"] / ours["seconds"])
                            / (theirs["invocations"] / theirs["seconds"])
                        )
                        progress(
                            f"  C={c:3d} block {block + 1}/{blocks}: native "
                            f"{theirs['invocations'] / theirs['seconds']:.0f}, tff-amqp "
                            f"{ours['invocations'] / ours['seconds']:.0f} invocations/s"
                        )
        finally:
            await amqp.close()
    return (
        {c: _native_level(b) for c, b in native_blocks.items()},
        {c: _amqp_level(b, silos) for c, b in amqp_blocks.items()},
        ratios,
    )


async def broker_ceiling(
    broker: str, request_bytes: int, reply_bytes: int, in_flight: int, seconds: float
) -> float:
    """Raw aio-pika request/reply round trips per second, with publisher
    confirms on both sides, `in_flight` at a time, for about `seconds`."""
    import aio_pika

    tag = f"bench-ceiling-{uuid.uuid4().hex[:8]}"
    request_body, reply_body = b"q" * request_bytes, b"r" * reply_bytes
    async with (
        await aio_pika.connect(broker, client_properties={"connection_name": tag}) as requester,
        await aio_pika.connect(broker, client_properties={"connection_name": tag}) as responder,
    ):
        out_channel = await requester.channel(publisher_confirms=True)
        in_channel = await responder.channel(publisher_confirms=True)
        await in_channel.set_qos(prefetch_count=max(32, in_flight))
        # Exclusive queues: deleted with their connections.
        requests = await in_channel.declare_queue(f"{tag}.requests", exclusive=True)
        replies = await out_channel.declare_queue(f"{tag}.replies", exclusive=True)
        waiting: dict[str, asyncio.Future[None]] = {}

        async def respond(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()
            await in_channel.default_exchange.publish(
                aio_pika.Message(reply_body, correlation_id=message.correlation_id),
                routing_key=replies.name,
            )

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()
            future = waiting.pop(message.correlation_id or "", None)
            if future is not None and not future.done():
                future.set_result(None)

        await requests.consume(respond)
        await replies.consume(on_reply)
        done = 0
        stop_at = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                correlation = uuid.uuid4().hex
                future = asyncio.get_running_loop().create_future()
                waiting[correlation] = future
                await out_channel.default_exchange.publish(
                    aio_pika.Message(request_body, correlation_id=correlation),
                    routing_key=requests.name,
                )
                await asyncio.wait_for(future, 30.0)
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(in_flight)))
        return done / (time.perf_counter() - started)


def _cpu_ceiling(cpu: dict[str, Any]) -> float:
    """Invocations/s that all cores, doing only this work, could sustain."""
    return 1e3 / cpu["floor_ms"] if cpu["floor_ms"] else float("inf")


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    from tff_amqp.local import LocalFederation
    from tff_amqp.silo.stateful.host_cli import numbered_silo_names

    comp = _computation()
    values = [float(i + 1) for i in range(args.silos * 2)]
    levels = args.concurrency
    progress(
        f"throughput benchmark: {args.silos} silos, C in {levels}, {args.blocks} blocks of "
        f"{args.per_level} x C per system"
    )
    federation = f"bench-{uuid.uuid4().hex[:6]}"
    names = numbered_silo_names("s", args.silos)
    try:
        with LocalFederation(args.broker, federation) as local:
            local.start_silo_host("h0", names)
            progress(f"  starting {args.silos} silos in one host ...")
            await asyncio.to_thread(local.wait_ready, 600)
            native, amqp, block_ratios = await _measure(
                args.broker, federation, names, comp, values, levels, args.per_level,
                args.blocks, lambda: amqp_roles(local, broker_pids(args.broker)),
            )  # fmt: skip
    finally:
        await asyncio.wait_for(delete_federation_async(args.broker, federation, names), 30)
    rows = []
    for c in levels:
        ceiling = await broker_ceiling(
            args.broker,
            int(amqp[c]["request_bytes"]),
            int(amqp[c]["reply_bytes"]),
            c * args.silos,
            args.ceiling_seconds,
        )
        progress(f"  broker ceiling C={c:3d} x {args.silos}: {ceiling:.0f} round trips/s")
        rows.append(
            {
                "concurrency": c,
                "native_invocations_per_s": native[c]["invocations_per_s"],
                "native_worker_calls_per_invocation": native[c]["worker_calls_per_invocation"],
                "native_cpu": native[c]["cpu"],
                **amqp[c],
                # What the CPU time per invocation allows at most on this machine.
                "native_cpu_ceiling_per_s": _cpu_ceiling(native[c]["cpu"]),
                "cpu_ceiling_per_s": _cpu_ceiling(amqp[c]["cpu"]),
                "broker_ceiling_round_trips_per_s": ceiling,
                "ratio_to_native": amqp[c]["invocations_per_s"] / native[c]["invocations_per_s"],
                # The same ratio within each block (native and tff-amqp alternating).
                "block_ratios": block_ratios[c],
                "fraction_of_broker_ceiling": amqp[c]["broker_round_trips_per_s"] / ceiling,
            }
        )
    return {
        "benchmark": "throughput",
        "machine": machine(),
        "quick": args.quick,
        "silos": args.silos,
        "clients": len(values),
        "invocations_per_level": (
            f"{args.per_level} x C per block and system, {args.blocks} alternating blocks"
        ),
        "note": (
            "one invocation = a federated_sum over the silos; ratio_to_native compares "
            "invocations/s; fraction_of_broker_ceiling compares the coordinator's broker round "
            "trips/s (reply messages; a bundle of several replies is one) with raw aio-pika "
            "request/reply (confirms) at the same message sizes and C x silos in flight"
        ),
        "levels": rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--broker", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument("--silos", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=None)
    parser.add_argument(
        "--per-level", type=int, default=20, help="invocations per block and system: N x C"
    )
    parser.add_argument(
        "--blocks", type=int, default=4, help="alternating blocks per level (native, tff-amqp)"
    )
    parser.add_argument("--ceiling-seconds", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true", help="C in 1 8, 5 x C, 2 s ceilings")
    args = parser.parse_args()
    if args.quick:
        args.per_level = min(args.per_level, 5)
        args.blocks = min(args.blocks, 2)
        args.ceiling_seconds = min(args.ceiling_seconds, 2.0)
    args.concurrency = args.concurrency or ([1, 8] if args.quick else [1, 8, 32])
    stop_on_sigterm()
    result = asyncio.run(_run(args))
    print()
    print_table(
        ["C", "native inv/s", "tff-amqp inv/s", "x native", "x native by block", "exec ops/s",
         "broker rt/s", "ceiling rt/s", "of ceiling"],
        [
            [r["concurrency"], r["native_invocations_per_s"], r["invocations_per_s"],
             r["ratio_to_native"],
             f"{min(r['block_ratios']):.2f}-{max(r['block_ratios']):.2f}",
             r["executor_ops_per_s"], r["broker_round_trips_per_s"],
             r["broker_ceiling_round_trips_per_s"], r["fraction_of_broker_ceiling"]]
            for r in result["levels"]
        ],
    )  # fmt: skip
    path = write_result("throughput", result)
    _plot(result["levels"])
    print()
    print_table(
        ["C", "native worker calls/inv", "coordinator worker calls/inv",
         "max silo worker calls/inv", "broker messages/inv"],
        [
            [r["concurrency"], r["native_worker_calls_per_invocation"],
             r["coordinator_worker_calls_per_invocation"],
             max(r["silo_worker_calls_per_invocation"].values()),
             r["messages_per_invocation"]]
            for r in result["levels"]
        ],
    )  # fmt: skip
    print()
    print_table(*cpu_table(result["levels"]))
    print(f"\nwrote {path} and {RESULTS / 'throughput.png'}")
    return 0


def cpu_table(levels: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """CPU ms per invocation by process role at each C, and the invocations/s
    that CPU time allows at most on this machine (all cores doing only this)."""
    headers = ["C", "native CPU ms/inv", *(f"tff-amqp {r}" for r in CPU_ROLES),
               "tff-amqp total", "native CPU ceiling inv/s",
               "tff-amqp CPU ceiling inv/s"]  # fmt: skip
    rows = [
        [r["concurrency"], r["native_cpu"]["total_ms"],
         *(r["cpu"]["ms"].get(role, "-") for role in CPU_ROLES), r["cpu"]["total_ms"],
         r["native_cpu_ceiling_per_s"], r["cpu_ceiling_per_s"]]
        for r in levels
        if "cpu" in r
    ]  # fmt: skip
    return headers, rows


def _plot(levels: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = [r["concurrency"] for r in levels]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(cs, [r["native_invocations_per_s"] for r in levels], "k--o", label="native")
    axes[0].plot(cs, [r["invocations_per_s"] for r in levels], "-o", label="tff-amqp")
    axes[0].set_ylabel("invocations/s")
    axes[1].plot(cs, [r["broker_ceiling_round_trips_per_s"] for r in levels], "k--o",
                 label="raw aio-pika (ceiling)")  # fmt: skip
    axes[1].plot(cs, [r["broker_round_trips_per_s"] for r in levels], "-o", label="coordinator")
    axes[1].set_ylabel("broker round trips/s")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("invocations in flight (C)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "throughput.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
