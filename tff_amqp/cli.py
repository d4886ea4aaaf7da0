"""The `tff-amqp` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tff_amqp import config
from tff_amqp.logs import configure_logging
from tff_amqp.silo.options import (
    add_broker_options,
    add_connect_timeout_option,
    add_endpoint_options,
    add_silo_command,
    run_silo_side,
    stop_on_signals,
)

if TYPE_CHECKING:
    from tff_amqp.silo.sources import DataSource
    from tff_amqp.silo.stateful.agent import SiloConfig

log = logging.getLogger("tff_amqp.cli")

DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672/"


# `tff-amqp silo`: its one-line help, then its description.
_SILO_COMMAND = """run a silo agent: connect out to the broker and serve executor requests

Run a silo agent. It opens only an outbound connection to the broker, owns a
local TFF worker_binary and keeps its clients' data local: only outputs of
federated aggregations leave it.
"""


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

    silo = add_silo_command(sub, common, "silo", _broker_default(), _SILO_COMMAND)
    add_endpoint_options(silo)
    silo.add_argument("--name", required=True, help="this silo's name (letters, digits, - and _)")
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

    status = sub.add_parser(
        "status",
        parents=[common],
        help="list the live silos of a federation with their last heartbeat and load",
        description="Listen to a federation's heartbeats for --window seconds and list the "
        "silos heard from. Read-only: it creates nothing but a temporary exclusive queue, and "
        "an unknown federation is reported, not created. Its user needs configure and write "
        "on tff.<federation>.status.* (the coordinator's user has them).",
    )
    add_broker_options(status, _broker_default())
    status.add_argument(
        "--window",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="how long to listen for heartbeats (default %(default)s)",
    )
    add_connect_timeout_option(status)

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
        "--format",
        choices=["csv", "xlsx"],
        default="csv",
        help="the clinics' spreadsheets: csv (a folder of one CSV per ward) or xlsx (one "
        "Excel workbook per clinic, one sheet per ward) (default %(default)s)",
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
    demo.add_argument(
        "--keep",
        action="store_true",
        help="keep the federation's queues and exchanges on the broker afterwards (by "
        "default a demo that started its own silos removes them)",
    )
    demo.add_argument(
        "--connect-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="give up connecting to the broker after this long (default %(default)s)",
    )
    from tff_amqp.federation_cli import add_federation_parser

    add_federation_parser(sub, common, _broker_default())
    from tff_amqp.provision import add_provision_parser

    add_provision_parser(sub, common)
    from tff_amqp.silo.pool.cli import add_worker_parser

    add_worker_parser(sub, common, _broker_default())
    from tff_amqp.silo.stateful.host_cli import add_silos_parser

    add_silos_parser(sub, common, _broker_default())
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = config.parse_args(parser, sys.argv[1:] if argv is None else argv)
    # TensorFlow's C++ start-up chatter (cuDNN/cuFFT factory "errors" at
    # import) is not ours to show by default; --log-level debug shows it.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if args.log_level == "debug" else "3")
    configure_logging(args.log_level)
    try:
        return _dispatch(parser, args)
    except KeyboardInterrupt:
        print(f"tff-amqp {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        explained = explain_failure(e, args)
        if explained is None or args.log_level == "debug":
            raise
        message, code = explained
        print(f"tff-amqp {args.command}: {message}", file=sys.stderr)
        return code


def explain_failure(error: BaseException, args: argparse.Namespace) -> tuple[str, int] | None:
    """A known failure as (one or two lines saying what happened and what to
    do, exit code), or None for an unexpected one (shown with its traceback).
    Exit code 2: the command line or a file named on it is wrong; 1: the
    broker or the federation is. `--log-level debug` shows the traceback of
    known failures too."""
    import aiormq

    from tff_amqp.errors import TffAmqpError
    from tff_amqp.transport.connection import access_refused_message

    command = args.command
    if isinstance(error, TffAmqpError):
        return str(error), 1
    if isinstance(error, aiormq.exceptions.ChannelAccessRefused):
        message = access_refused_message(error, "let this user do that")
        if command in ("silo", "silos", "worker") and not getattr(args, "no_declare", True):
            hint = (
                "A provisioned silo's user may not declare anything: "
                "run it with --no-declare (see docs/security.md)."
            )
        elif command == "status":
            hint = (
                "status needs configure and write on tff.<federation>.status.* (a temporary "
                "queue): run it with the coordinator's broker URL, not a silo's."
            )
        else:
            hint = "Check the broker user's permissions (see docs/security.md)."
        return f"{message}.\n{hint}", 1
    if isinstance(error, aiormq.exceptions.ChannelNotFoundEntity):
        detail = " ".join(str(error).split())[:200]
        return (
            f"the broker has no such object ({detail}).\n"
            "Provision it first (`tff-amqp provision add-silo ...`) or run without --no-declare.",
            1,
        )
    if isinstance(error, FileNotFoundError | IsADirectoryError | PermissionError):
        return f"{error.strerror}: {error.filename}", 2
    if isinstance(error, ValueError):
        return str(error), 2
    return None


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "federation":
        from tff_amqp.federation_cli import run_federation

        return run_federation(args)
    if args.command == "silo":
        return _run_silo(args)
    if args.command == "silos":
        from tff_amqp.silo.stateful.host_cli import run_silos

        return run_silos(args)
    if args.command == "status":
        return _run_status(args)
    if args.command == "worker":
        from tff_amqp.silo.pool.cli import run_worker

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
    # (Called once the broker answered: these import TensorFlow.)
    def build(sources: tuple[DataSource, ...], endpoint: dict[str, Any]) -> SiloConfig:
        from tff_amqp.silo.stateful.agent import SiloConfig
        from tff_amqp.silo.stateful.session import PrivacyPolicy

        policy = PrivacyPolicy(
            allow_raw_client_values=args.allow_raw_client_values,
            min_clients_per_aggregate=args.min_clients_per_aggregate,
        )
        return SiloConfig(
            name=args.name,
            data=sources,
            policy=policy,
            default_clients=args.default_clients,
            **endpoint,
        )

    async def serve(config: SiloConfig) -> int:
        from tff_amqp.silo.stateful.agent import SiloAgent

        await _serve(SiloAgent(config), metrics_port=args.metrics_port)
        return 0

    # A --data flag that cannot work is reported before TensorFlow loads, and
    # a user who may not declare is told so by the probe.
    return run_silo_side(
        "silo",
        args,
        silo=args.name,
        build=build,
        serve=serve,
        probe_declare=True,
    )


def _run_status(args: argparse.Namespace) -> int:
    from tff_amqp.errors import FederationNotFoundError
    from tff_amqp.status import format_table, observe
    from tff_amqp.topology import Topology

    try:
        Topology(args.federation)
    except ValueError as e:
        print(f"tff-amqp status: {e}", file=sys.stderr)
        return 2
    try:
        seen = asyncio.run(
            observe(args.broker, args.federation, args.window, connect_timeout=args.connect_timeout)
        )
    except FederationNotFoundError as e:
        print(e)
        return 1
    print(format_table(seen, args.federation, args.window))
    return 0


async def _serve(agent: object, *, metrics_port: int | None = None) -> None:
    from tff_amqp.observe.metrics import MetricsServer, SiloMetrics
    from tff_amqp.silo.stateful.agent import SiloAgent

    assert isinstance(agent, SiloAgent)
    stop = stop_on_signals()
    with MetricsServer.optional(SiloMetrics(agent).registry, metrics_port):
        async with agent:
            await stop.wait()
