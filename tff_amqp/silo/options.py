"""The command line of the silo-side processes, written once for
`tff-amqp silo`, `tff-amqp worker` and the simulation host `tff-amqp silos`:
where the broker is, which federation, the silo's data, how to stay present
and connect (heartbeat, timeouts, TLS, message size), what to expose
(metrics), and the front door that checks them, probes the broker and turns
failures into one line and an exit code."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tff_amqp import event_loop
from tff_amqp.processes import worker_thread_env
from tff_amqp.topology import add_queue_type_option

if TYPE_CHECKING:
    from tff_amqp.silo.sources import DataSource
    from tff_amqp.transport.tls import TlsFiles


def add_silo_command(
    sub: Any, common: argparse.ArgumentParser, name: str, broker_default: str, doc: str
) -> argparse.ArgumentParser:
    """The parser of a silo-side command (`silo`, `worker`, `silos`): the
    options every command takes, and which broker and federation it joins.
    `doc` documents the command: its first paragraph is the one-line help,
    the rest the description (the command's module docstring says both)."""
    summary, _, description = inspect.cleandoc(doc).partition("\n\n")
    parser: argparse.ArgumentParser = sub.add_parser(
        name, parents=[common], help=" ".join(summary.split()), description=description
    )
    add_broker_options(parser, broker_default)
    return parser


class _BrokerAddresses(argparse.Action):
    """--broker given several times: the nodes of one cluster, kept as one
    comma-separated value (what `connect` takes); the first replaces the
    default."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[no-untyped-def]
        seen = getattr(namespace, "_broker_given", False)
        current = getattr(namespace, self.dest) if seen else ""
        setattr(namespace, self.dest, f"{current},{values}" if current else values)
        namespace._broker_given = True


def add_broker_options(parser: argparse.ArgumentParser, broker_default: str) -> None:
    """--broker and --federation: which broker, which federation on it."""
    parser.add_argument(
        "--broker",
        default=broker_default,
        action=_BrokerAddresses,
        help="broker URL, amqp[s]://user:pass@host:port/vhost; the nodes of a cluster: repeat "
        "--broker or separate URLs with commas (connects to any, fails over) "
        "(env TFF_AMQP_BROKER or AMQP_URL; default %(default)s)",
    )
    parser.add_argument(
        "--federation",
        default=os.environ.get("TFF_AMQP_FEDERATION", "default"),
        help="federation name; namespaces queues and exchanges (default %(default)s)",
    )
    add_queue_type_option(parser)


def add_connect_timeout_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="give up connecting to the broker after this long (default %(default)s)",
    )


def add_presence_options(parser: argparse.ArgumentParser) -> None:
    """How a silo-side process keeps its presence on the broker: heartbeat
    and connect timeout."""
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between heartbeats (default %(default)s)",
    )
    add_connect_timeout_option(parser)


def add_no_declare_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-declare",
        action="store_true",
        help="do not declare exchanges/queues (for provisioned silos without configure permission)",
    )


DATA_HELP = (
    "local data: a file (one client) or a folder (one client per file, in name order; "
    "an empty folder is a silo with no clients) of CSV, TSV, Excel (.xlsx, .xls), "
    "OpenDocument (.ods), Parquet or TFRecord files; options after '#': "
    "format=FORMAT, sheet=NAME|INDEX|*, missing=error|drop-row|fill:VALUE, joined by '&' "
    "(docs/data.md); repeatable"
)


def add_endpoint_options(parser: argparse.ArgumentParser) -> None:
    """Every further option a silo-side process with its own broker
    connection takes (`tff-amqp silo`, `tff-amqp worker`)."""
    parser.add_argument("--data", action="append", default=[], metavar="KEY=PATH", help=DATA_HELP)
    parser.add_argument(
        "--advertise-counts",
        action="store_true",
        help="also advertise each data key's row count in the hello (column names and kinds "
        "are always advertised, values never)",
    )
    add_presence_options(parser)
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=None,
        metavar="BYTES",
        help="the broker's max_message_size (RabbitMQ 3.x: 134217728, 4.x: 16777216); "
        "larger values are refused or travel as chunks sized to fit it (default 134217728)",
    )
    add_no_declare_option(parser)
    parser.add_argument(
        "--tls-ca", type=Path, help="CA certificate that signed the broker's (amqps)"
    )
    parser.add_argument("--tls-cert", type=Path, help="client certificate (EXTERNAL auth, amqps)")
    parser.add_argument("--tls-key", type=Path, help="private key of --tls-cert")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on http://0.0.0.0:PORT/metrics (default: off)",
    )


def endpoint_fields(args: argparse.Namespace, tls: TlsFiles | None) -> dict[str, Any]:
    """The `EndpointConfig` fields that `add_endpoint_options` set (the
    process's config adds its own)."""
    return dict(
        broker_url=args.broker,
        federation=args.federation,
        queue_type=args.queue_type,
        heartbeat_interval=args.heartbeat_interval,
        declare_topology=not args.no_declare,
        connect_timeout=args.connect_timeout,
        tls=tls,
        advertise_counts=args.advertise_counts,
        **message_size(args),
    )


def tls_files(args: argparse.Namespace) -> TlsFiles | None:
    """The --tls-* files, or None for a plain connection."""
    from tff_amqp.transport.tls import TlsFiles

    if args.tls_ca is None and args.tls_cert is None and args.tls_key is None:
        return None
    return TlsFiles(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)


def message_size(args: argparse.Namespace) -> dict[str, Any]:
    """`max_message_bytes=` for a config, if --max-message-bytes was given."""
    if args.max_message_bytes is None:
        return {}
    return {"max_message_bytes": args.max_message_bytes}


def checked_tls(args: argparse.Namespace, silo: str) -> TlsFiles | None:
    """Check the silo name, the federation and the --tls-* files (ValueError)
    before TensorFlow takes seconds to import; the TLS files, if any."""
    from tff_amqp.topology import Topology, check_silo_name

    check_silo_name(silo)
    Topology(args.federation, args.queue_type)
    return tls_files(args)


async def probe_broker(
    url: str, timeout: float, tls: TlsFiles | None, *, declare: tuple[str, str] | None = None
) -> None:
    """Open and close one connection (bounded by `timeout`). With `declare`
    (federation, silo), also declare the federation's request exchange, as
    the agent is about to (same arguments, so idempotent): a user without
    configure permission is told so now, not after TensorFlow has loaded."""
    from aio_pika import ExchangeType

    from tff_amqp.retry import connect_within
    from tff_amqp.topology import Topology
    from tff_amqp.transport.connection import connect

    connection = await connect(
        url,
        name="tff-amqp silo (probe)",
        policy=connect_within(timeout),
        ssl_context=tls.context() if tls else None,
    )
    try:
        if declare is not None:
            channel = await connection.channel()
            await channel.declare_exchange(
                Topology(declare[0]).requests_exchange, ExchangeType.DIRECT, durable=True
            )
    finally:
        await connection.close()


def check_process_settings() -> None:
    """The environment settings every silo-side process (a silo, a pool
    worker, a simulation host) reads, checked at start: ValueError naming
    the first bad one ($TFF_AMQP_WORKER_THREADS, $TFF_AMQP_EVENT_LOOP)."""
    worker_thread_env()
    event_loop.loop_kind()


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (where the loop can handle them)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    return stop


C = TypeVar("C")


def run_silo_side(
    command: str,
    args: argparse.Namespace,
    *,
    silo: str,
    build: Callable[[tuple[DataSource, ...], dict[str, Any]], C],
    serve: Callable[[C], Coroutine[Any, Any, int]],
    probe_declare: bool = False,
) -> int:
    """The front door of a silo-side process (`tff-amqp silo`, `tff-amqp
    worker`): check the options, probe the broker, read the --data flags,
    `build` the config from the sources and the `EndpointConfig` fields, and
    `serve` it; the exit code. Bad input exits 2 and a failure while serving
    exits 1, each with one line on stderr; connection failures propagate to
    `tff_amqp.cli.main`, which explains them (--log-level debug adds the
    traceback)."""

    def refuse(problem: object, status: int = 2) -> int:
        print(f"tff-amqp {command}: {problem}", file=sys.stderr)
        return status

    # Fail on typos at once, before TensorFlow takes seconds to import.
    try:
        tls = checked_tls(args, silo)
        check_process_settings()
    except ValueError as e:
        return refuse(e)
    # Every --data source too (exists, readable, header and sheet present):
    # one line per problem, before the broker probe and TensorFlow.
    from tff_amqp.silo.sources import check_flags

    problems = check_flags(args.data)
    if problems:
        for problem in problems:
            refuse(problem)
        return 2
    # Likewise an unreachable broker or refused credentials: say so within
    # --connect-timeout, not after TensorFlow has loaded. With `probe_declare`
    # it also declares what the process will (a user who may not is told now).
    declare = (args.federation, silo) if probe_declare and not args.no_declare else None
    asyncio.run(probe_broker(args.broker, args.connect_timeout, tls, declare=declare))
    from tff_amqp.errors import TffAmqpError
    from tff_amqp.silo.sources import DataError, DataSource

    try:
        # Checked above; the sources themselves are re-read at each invocation.
        sources = tuple(DataSource.parse_spec(flag) for flag in args.data)
    except DataError as e:
        return refuse(e)
    try:
        config = build(sources, endpoint_fields(args, tls))
    except ValueError as e:
        return refuse(e)
    try:
        return event_loop.run(serve(config))
    except (TffAmqpError, DataError) as e:
        return refuse(e, 1)
