"""Command-line options both silo-side processes share (`tff-amqp silo` and
`tff-amqp worker`): where the broker is, which federation, the silo's data,
how to connect (TLS, timeouts, message size) and what to expose (metrics)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tff_amqp.transport.tls import TlsFiles


def add_endpoint_options(parser: argparse.ArgumentParser, broker_default: str) -> None:
    parser.add_argument(
        "--broker",
        default=broker_default,
        help="broker URL, amqp[s]://user:pass@host:port/vhost "
        "(env TFF_AMQP_BROKER or AMQP_URL; default %(default)s)",
    )
    parser.add_argument(
        "--federation",
        default=os.environ.get("TFF_AMQP_FEDERATION", "default"),
        help="federation name; namespaces queues and exchanges (default %(default)s)",
    )
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="KEY=PATH",
        help="local data: a CSV file (one client) or a folder of CSV files (one client per "
        "file; an empty folder is a silo with no clients); repeatable",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between heartbeats (default %(default)s)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="give up connecting to the broker after this long (default %(default)s)",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=None,
        metavar="BYTES",
        help="the broker's max_message_size (RabbitMQ 3.x: 134217728, 4.x: 16777216); "
        "larger values are refused or travel as chunks sized to fit it (default 134217728)",
    )
    parser.add_argument(
        "--no-declare",
        action="store_true",
        help="do not declare exchanges/queues (for provisioned silos without configure permission)",
    )
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
