"""`tff-amqp worker`: run one (stateless) worker of a silo's pool."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from typing import Any

from tff_amqp.silo.options import add_endpoint_options, message_size, tls_files


def add_worker_parser(sub: Any, common: argparse.ArgumentParser, broker_default: str) -> None:
    worker = sub.add_parser(
        "worker",
        parents=[common],
        help="run a stateless worker of a silo's pool (MapReduce work items)",
        description="Run one stateless worker of silo SILO. Start as many per silo as you "
        "like, and stop them any time: workers keep no state between work items, take items "
        "from the silo's shared work queue, and ack an item only after its result is "
        "published, so an item of a worker that dies is redone by another.",
    )
    worker.add_argument(
        "--stateless",
        action="store_true",
        help="the stateless regime, the only worker kind (accepted for compatibility; "
        "for the stateful regime run `tff-amqp silo`)",
    )
    add_endpoint_options(worker, broker_default)
    worker.add_argument("--silo", required=True, help="the silo this worker serves")
    worker.add_argument(
        "--min-clients-per-item",
        type=int,
        default=1,
        metavar="N",
        help="refuse work items whose shard has fewer than N clients (default 1)",
    )


def run_worker(args: argparse.Namespace) -> int:
    from tff_amqp.topology import Topology, check_silo_name

    try:
        check_silo_name(args.silo)
        Topology(args.federation)
        tls = tls_files(args)
    except ValueError as e:
        print(f"tff-amqp worker: {e}", file=sys.stderr)
        return 2
    # An unreachable broker or refused credentials: say so before TensorFlow
    # loads (failures are explained by tff_amqp.cli.main).
    from tff_amqp.cli import _probe_broker

    asyncio.run(_probe_broker(args.broker, args.connect_timeout, tls))
    from tff_amqp.silo.data import DataError, DataSource

    try:
        sources = tuple(DataSource.parse(flag) for flag in args.data)
    except DataError as e:
        print(f"tff-amqp worker: {e}", file=sys.stderr)
        return 2
    from tff_amqp.errors import TffAmqpError
    from tff_amqp.silo.pool.agent import StatelessWorker, WorkerConfig

    try:
        config = WorkerConfig(
            broker_url=args.broker,
            federation=args.federation,
            silo=args.silo,
            data=sources,
            min_clients_per_item=args.min_clients_per_item,
            heartbeat_interval=args.heartbeat_interval,
            declare_topology=not args.no_declare,
            connect_timeout=args.connect_timeout,
            tls=tls,
            **message_size(args),
        )
    except ValueError as e:
        print(f"tff-amqp worker: {e}", file=sys.stderr)
        return 2
    try:
        failed = asyncio.run(_serve(StatelessWorker(config), metrics_port=args.metrics_port))
    except (TffAmqpError, DataError) as e:
        print(f"tff-amqp worker: {e}", file=sys.stderr)
        return 1
    if failed:
        print(
            "tff-amqp worker: the local worker_binary died; its item went back to the pool. "
            "Exiting so a supervisor can restart this worker.",
            file=sys.stderr,
        )
        return 1
    return 0


async def _serve(worker: Any, *, metrics_port: int | None = None) -> bool:
    """Serve until SIGINT/SIGTERM or until the worker fails; True if it failed."""
    from tff_amqp.observe.metrics import MetricsServer, WorkerMetrics

    with MetricsServer.optional(WorkerMetrics(worker).registry, metrics_port):
        return await _serve_until_stopped(worker)


async def _serve_until_stopped(worker: Any) -> bool:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with worker:
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(worker.failed.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return bool(worker.failed.is_set())
