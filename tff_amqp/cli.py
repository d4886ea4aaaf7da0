"""The `tff-amqp` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tff_amqp import config
from tff_amqp.logs import configure_logging

if TYPE_CHECKING:
    from tff_amqp.transport.tls import TlsFiles

log = logging.getLogger("tff_amqp.cli")

DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672/"


def _broker_default() -> str:
    return os.environ.get("TFF_AMQP_BROKER") or os.environ.get("AMQP_URL") or DEFAULT_BROKER


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tff-amqp",
        description="Run TensorFlow Federated across silos that only open outbound AMQP "
        "connections to a RabbitMQ broker.",
        epilog=config.describe(),
    )
    common = argparse.ArgumentParser(add_help=False)
    config.add_config_option(common)
    common.add_argument(
        "--log-level",
        default=os.environ.get("TFF_AMQP_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="log verbosity of JSON log lines on stderr (env TFF_AMQP_LOG_LEVEL; default info)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    silo = sub.add_parser(
        "silo",
        parents=[common],
        help="run a silo agent: connect out to the broker and serve executor requests",
        description="Run a silo agent. It opens only an outbound connection to the broker, "
        "owns a local TFF worker_binary and keeps its clients' data local: only outputs of "
        "federated aggregations leave it.",
    )
    silo.add_argument(
        "--broker",
        default=_broker_default(),
        help="broker URL, amqp[s]://user:pass@host:port/vhost "
        "(env TFF_AMQP_BROKER or AMQP_URL; default %(default)s)",
    )
    silo.add_argument(
        "--federation",
        default=os.environ.get("TFF_AMQP_FEDERATION", "default"),
        help="federation name; namespaces queues and exchanges (default %(default)s)",
    )
    silo.add_argument("--name", required=True, help="this silo's name (letters, digits, - and _)")
    silo.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="KEY=PATH",
        help="local data: a CSV file (one client) or a folder of CSV files (one "
        "client per file); repeatable",
    )
    silo.add_argument(
        "--allow-raw-client-values",
        action="store_true",
        help="let the coordinator fetch raw client-placed values (simulation and "
        "testing only: it breaks the privacy boundary)",
    )
    silo.add_argument(
        "--min-clients-per-aggregate",
        type=int,
        default=1,
        metavar="N",
        help="refuse aggregations over fewer than N local clients (default 1; an aggregate "
        "over 0 clients is always allowed: it is the zero and holds no client data)",
    )
    silo.add_argument(
        "--default-clients",
        type=int,
        default=0,
        metavar="N",
        help="clients of an invocation that gives this silo no client data (no silo_data "
        "argument, no client list), e.g. federated_value(x, CLIENTS) alone (default 0, as "
        "TFF's native runtime)",
    )
    silo.add_argument(
        "--heartbeat-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between heartbeats (default %(default)s)",
    )
    silo.add_argument(
        "--connect-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="give up connecting to the broker after this long (default %(default)s)",
    )
    silo.add_argument(
        "--max-message-bytes",
        type=int,
        default=None,
        metavar="BYTES",
        help="the broker's max_message_size (RabbitMQ 3.x: 134217728, 4.x: 16777216); "
        "values above 1 MiB travel as chunks sized to fit it (default 134217728)",
    )
    silo.add_argument(
        "--no-declare",
        action="store_true",
        help="do not declare exchanges/queues (for provisioned silos without configure permission)",
    )
    silo.add_argument("--tls-ca", type=Path, help="CA certificate that signed the broker's (amqps)")
    silo.add_argument("--tls-cert", type=Path, help="client certificate (EXTERNAL auth, amqps)")
    silo.add_argument("--tls-key", type=Path, help="private key of --tls-cert")
    silo.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on http://0.0.0.0:PORT/metrics (default: off)",
    )

    status = sub.add_parser(
        "status",
        parents=[common],
        help="list the live silos of a federation with their last heartbeat and load",
    )
    status.add_argument("--broker", default=_broker_default(), help="broker URL")
    status.add_argument(
        "--federation",
        default=os.environ.get("TFF_AMQP_FEDERATION", "default"),
        help="federation name (default %(default)s)",
    )
    status.add_argument(
        "--window",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="how long to listen for heartbeats (default %(default)s)",
    )

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="run a local federation demo: 3 silos, a federated mean and FedAvg",
        description="Start 3 silo processes with sample CSV data on this machine, run a "
        "federated mean and a few FedAvg rounds through the broker, print the results and "
        "stop everything it started.",
    )
    demo.add_argument(
        "--broker",
        default=_broker_default(),
        help="broker URL (env TFF_AMQP_BROKER or AMQP_URL; default %(default)s)",
    )
    demo.add_argument("--rounds", type=int, default=5, help="FedAvg rounds (default 5)")
    demo.add_argument(
        "--keep-data",
        type=Path,
        default=None,
        metavar="DIR",
        help="write the sample data and logs to DIR and keep them",
    )
    demo.add_argument(
        "--federation",
        default=None,
        help="federation name (default: a fresh demo-<hex> for local silos)",
    )
    demo.add_argument(
        "--silos",
        default=None,
        metavar="NAMES",
        help="comma-separated names of silos already running in --federation (e.g. the "
        "docker compose ones): use them instead of starting local silo processes",
    )
    demo.add_argument(
        "--write-data",
        type=Path,
        default=None,
        metavar="DIR",
        help="only write the sample spreadsheets (DIR/<clinic>/ward_N.csv) and exit",
    )
    demo.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve the coordinator's Prometheus metrics on PORT (default: off)",
    )
    demo.add_argument(
        "--progress",
        choices=["auto", "on", "off"],
        default="auto",
        help="per-invocation progress on stderr (default auto: only at a terminal)",
    )
    from tff_amqp.provision import add_provision_parser

    add_provision_parser(sub, common)
    from tff_amqp.worker_pool.cli import add_worker_parser

    add_worker_parser(sub, common, _broker_default())
    from tff_amqp.silo.host_cli import add_silos_parser

    add_silos_parser(sub, common, _broker_default())
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = config.parse_args(parser, sys.argv[1:] if argv is None else argv)
    # TensorFlow's C++ start-up chatter is not ours to show by default.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    configure_logging(args.log_level)
    if args.command == "silo":
        return _run_silo(args)
    if args.command == "silos":
        from tff_amqp.silo.host_cli import run_silos

        return run_silos(args)
    if args.command == "status":
        return _run_status(args)
    if args.command == "worker":
        from tff_amqp.worker_pool.cli import run_worker

        return run_worker(args)
    if args.command == "demo":
        from tff_amqp.demo import run_demo

        return run_demo(args)
    if args.command == "provision":
        from tff_amqp.provision import run_provision

        return run_provision(args)
    parser.error(f"unknown command {args.command}")
    return 2


def _run_silo(args: argparse.Namespace) -> int:
    from tff_amqp.errors import TffAmqpError
    from tff_amqp.topology import Topology, check_silo_name

    # Fail on typos at once, before TensorFlow takes seconds to import.
    try:
        check_silo_name(args.name)
        Topology(args.federation)
        tls = _tls_files(args)
    except ValueError as e:
        print(f"tff-amqp silo: {e}", file=sys.stderr)
        return 2
    # Likewise an unreachable broker or refused credentials: say so within
    # --connect-timeout, not after TensorFlow has loaded.
    try:
        asyncio.run(_probe_broker(args.broker, args.connect_timeout, tls))
    except TffAmqpError as e:
        print(f"tff-amqp silo: {e}", file=sys.stderr)
        return 1
    from tff_amqp.silo.data import DataError, DataSource

    try:
        sources = tuple(DataSource.parse(flag) for flag in args.data)
    except DataError as e:
        print(f"tff-amqp silo: {e}", file=sys.stderr)
        return 2

    from tff_amqp.silo.agent import SiloAgent, SiloConfig
    from tff_amqp.silo.session import PrivacyPolicy

    try:
        config = SiloConfig(
            broker_url=args.broker,
            federation=args.federation,
            name=args.name,
            data=sources,
            policy=PrivacyPolicy(
                allow_raw_client_values=args.allow_raw_client_values,
                min_clients_per_aggregate=args.min_clients_per_aggregate,
            ),
            default_clients=args.default_clients,
            heartbeat_interval=args.heartbeat_interval,
            declare_topology=not args.no_declare,
            connect_timeout=args.connect_timeout,
            tls=tls,
            **(
                {"max_message_bytes": args.max_message_bytes}
                if args.max_message_bytes is not None
                else {}
            ),
        )
    except ValueError as e:
        print(f"tff-amqp silo: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(SiloAgent(config), metrics_port=args.metrics_port))
    except (TffAmqpError, DataError) as e:
        print(f"tff-amqp silo: {e}", file=sys.stderr)
        return 1
    return 0


async def _probe_broker(url: str, timeout: float, tls: TlsFiles | None) -> None:
    """Open and close one connection (bounded by `timeout`)."""
    from tff_amqp.retry import RetryPolicy
    from tff_amqp.transport.connection import connect

    connection = await connect(
        url,
        name="tff-amqp silo (probe)",
        policy=RetryPolicy(total_timeout=timeout),
        ssl_context=tls.context() if tls else None,
    )
    await connection.close()


def _tls_files(args: argparse.Namespace) -> TlsFiles | None:
    from tff_amqp.transport.tls import TlsFiles

    if args.tls_ca is None and args.tls_cert is None and args.tls_key is None:
        return None
    return TlsFiles(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)


def _run_status(args: argparse.Namespace) -> int:
    from tff_amqp.errors import TffAmqpError
    from tff_amqp.status import format_table, observe
    from tff_amqp.topology import Topology

    try:
        Topology(args.federation)
        seen = asyncio.run(observe(args.broker, args.federation, args.window))
    except (TffAmqpError, ValueError) as e:
        print(f"tff-amqp status: {e}", file=sys.stderr)
        return 1
    print(format_table(seen, args.federation, args.window))
    return 0


async def _serve(agent: object, *, metrics_port: int | None = None) -> None:
    from tff_amqp.observe.metrics import MetricsServer, SiloMetrics
    from tff_amqp.silo.agent import SiloAgent

    assert isinstance(agent, SiloAgent)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    with MetricsServer.optional(SiloMetrics(agent).registry, metrics_port):
        async with agent:
            await stop.wait()
