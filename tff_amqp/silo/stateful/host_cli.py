"""simulation: run many silo agents in one process (shared TensorFlow import)

Simulation and testing mode: run several silo agents in one process. Each
has its own broker connection, request queue, sessions and privacy policy;
they share this process's CPU, memory and failure domain, and by default one
worker_binary. Not for production silos (see docs/simulation.md).
"""

# (This docstring is `tff-amqp silos --help`: the one-line help, then the
# description. The host itself: silo/stateful/host.py.)

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import Any

from tff_amqp import event_loop
from tff_amqp.silo.options import (
    add_no_declare_option,
    add_presence_options,
    add_silo_command,
    check_process_settings,
    probe_broker,
    stop_on_signals,
)


def numbered_silo_names(prefix: str, count: int, first: int = 0) -> list[str]:
    """`prefix000`, `prefix001`, ...: zero-padded so that name order (which
    splits explicit client lists across silos) is numeric order, also across
    hosts started with different `first`."""
    if count < 1:
        raise ValueError(f"silo count must be at least 1, got {count}")
    if first < 0:
        raise ValueError(f"first silo index must be >= 0, got {first}")
    return [f"{prefix}{i:03d}" for i in range(first, first + count)]


def add_silos_parser(sub: Any, common: argparse.ArgumentParser, broker_default: str) -> None:
    # Help and description: this module's docstring.
    silos = add_silo_command(sub, common, "silos", broker_default, __doc__ or "")
    names = silos.add_mutually_exclusive_group(required=True)
    names.add_argument(
        "--name", action="append", dest="names", metavar="NAME", help="a silo name; repeatable"
    )
    names.add_argument(
        "--count", type=int, metavar="N", help="host N silos named PREFIX000, PREFIX001, ..."
    )
    silos.add_argument("--prefix", default="s", help="name prefix with --count (default s)")
    silos.add_argument(
        "--first",
        type=int,
        default=0,
        metavar="I",
        help="index of the first silo with --count, to split silos across hosts (default 0)",
    )
    silos.add_argument(
        "--worker",
        choices=["shared", "per-silo"],
        default="shared",
        help="one worker_binary for all silos of this process, or one each (default shared)",
    )
    silos.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="KEY=PATH",
        help="local data of every silo; '{silo}' in PATH is replaced by the silo's name",
    )
    silos.add_argument(
        "--allow-raw-client-values",
        action="store_true",
        help="let the coordinator fetch raw client-placed values (simulation and testing only)",
    )
    silos.add_argument(
        "--min-clients-per-aggregate",
        type=int,
        default=1,
        metavar="N",
        help="each silo refuses aggregations over fewer than N local clients (default 1; an "
        "aggregate over 0 clients is the zero and always allowed)",
    )
    silos.add_argument(
        "--default-clients",
        type=int,
        default=0,
        metavar="N",
        help="clients of each silo in an invocation that gives it no client data "
        "(default 0, as TFF's native runtime)",
    )
    # The same presence on the broker as `tff-amqp silo` (each silo has it).
    add_presence_options(silos)
    add_no_declare_option(silos)


def run_silos(args: argparse.Namespace) -> int:
    from tff_amqp.topology import Topology, check_silo_name

    try:
        if args.count is not None:
            names = numbered_silo_names(args.prefix, args.count, args.first)
        else:
            names = list(args.names)
        for name in names:
            check_silo_name(name)
        Topology(args.federation, args.queue_type)
        check_process_settings()
    except ValueError as e:
        print(f"tff-amqp silos: {e}", file=sys.stderr)
        return 2
    from tff_amqp.silo.sources import check_flags

    problems = [
        problem
        for name in names
        for problem in check_flags([flag.replace("{silo}", name) for flag in args.data])
    ]
    for problem in problems:
        print(f"tff-amqp silos: {problem}", file=sys.stderr)
    if problems:
        return 2
    # An unreachable broker or refused credentials: say so before TensorFlow
    # loads (failures are explained by tff_amqp.cli.main).
    asyncio.run(probe_broker(args.broker, args.connect_timeout, None))

    from tff_amqp.errors import TffAmqpError
    from tff_amqp.silo.sources import DataError, DataSource
    from tff_amqp.silo.stateful.agent import SiloConfig
    from tff_amqp.silo.stateful.host import SiloHost, WorkerMode
    from tff_amqp.silo.stateful.session import PrivacyPolicy

    policy = PrivacyPolicy(
        allow_raw_client_values=args.allow_raw_client_values,
        min_clients_per_aggregate=args.min_clients_per_aggregate,
    )
    try:
        configs = [
            SiloConfig(
                broker_url=args.broker,
                federation=args.federation,
                queue_type=args.queue_type,
                name=name,
                data=tuple(
                    DataSource.parse_spec(flag.replace("{silo}", name)) for flag in args.data
                ),
                policy=policy,
                default_clients=args.default_clients,
                heartbeat_interval=args.heartbeat_interval,
                declare_topology=not args.no_declare,
                connect_timeout=args.connect_timeout,
            )
            for name in names
        ]
        host = SiloHost(configs, worker_mode=WorkerMode(args.worker))
    except (ValueError, DataError) as e:
        print(f"tff-amqp silos: {e}", file=sys.stderr)
        return 2
    try:
        return event_loop.run(_serve(host))
    except (TffAmqpError, DataError) as e:
        print(f"tff-amqp silos: {e}", file=sys.stderr)
        return 1


async def _serve(host: Any) -> int:
    """Serve until SIGTERM/SIGINT (exit 0) or until the shared worker dies
    (exit 1, so a supervisor restarts the host)."""
    stop = stop_on_signals()
    async with host:
        stopped = asyncio.create_task(stop.wait())
        failed = asyncio.create_task(host.wait_for_failure())
        done, pending = await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if failed in done:
        print("tff-amqp silos: the shared worker_binary died; stopping all silos", file=sys.stderr)
        return 1
    return 0
