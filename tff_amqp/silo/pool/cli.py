"""run a stateless worker of a silo's pool (MapReduce work items)

Run one stateless worker of silo SILO. Start as many per silo as you like,
and stop them any time: workers keep no state between work items, take items
from the silo's shared work queue, and ack an item only after its result is
published, so an item of a worker that dies is redone by another.
"""

# (This docstring is `tff-amqp worker --help`: the one-line help, then the
# description.)

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING, Any

from tff_amqp.silo.options import (
    add_endpoint_options,
    add_silo_command,
    run_silo_side,
    stop_on_signals,
)

if TYPE_CHECKING:
    from tff_amqp.silo.pool.agent import PoolWorkerConfig
    from tff_amqp.silo.sources import DataSource


def add_worker_parser(sub: Any, common: argparse.ArgumentParser, broker_default: str) -> None:
    # Help and description: this module's docstring.
    worker = add_silo_command(sub, common, "worker", broker_default, __doc__ or "")
    worker.add_argument(
        "--stateless",
        action="store_true",
        help="the stateless regime, the only worker kind (accepted for compatibility; "
        "for the stateful regime run `tff-amqp silo`)",
    )
    add_endpoint_options(worker)
    worker.add_argument("--silo", required=True, help="the silo this worker serves")
    worker.add_argument(
        "--min-clients-per-item",
        type=int,
        default=1,
        metavar="N",
        help="refuse work items whose shard has fewer than N clients (default 1)",
    )


def run_worker(args: argparse.Namespace) -> int:
    def build(sources: tuple[DataSource, ...], endpoint: dict[str, Any]) -> PoolWorkerConfig:
        from tff_amqp.silo.pool.agent import PoolWorkerConfig

        return PoolWorkerConfig(
            silo=args.silo, data=sources, min_clients_per_item=args.min_clients_per_item, **endpoint
        )

    async def serve(config: PoolWorkerConfig) -> int:
        from tff_amqp.silo.pool.agent import PoolWorker

        if not await _serve(PoolWorker(config), metrics_port=args.metrics_port):
            return 0
        print(
            "tff-amqp worker: the local worker_binary died; its item went back to the pool. "
            "Exiting so a supervisor can restart this worker.",
            file=sys.stderr,
        )
        return 1

    return run_silo_side("worker", args, silo=args.silo, build=build, serve=serve)


async def _serve(worker: Any, *, metrics_port: int | None = None) -> bool:
    """Serve until SIGINT/SIGTERM or until the worker fails; True if it failed."""
    from tff_amqp.observe.metrics import MetricsServer, PoolWorkerMetrics

    with MetricsServer.optional(PoolWorkerMetrics(worker).registry, metrics_port):
        return await _serve_until_stopped(worker)


async def _serve_until_stopped(worker: Any) -> bool:
    stop = stop_on_signals()
    async with worker:
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(worker.failed.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return bool(worker.failed.is_set())
