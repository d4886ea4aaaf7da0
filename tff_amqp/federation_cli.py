"""`tff-amqp federation list | remove NAME`: see and clean up federations.

Every broker object of a federation is named ``tff.<federation>.*`` (see
topology.py), so the federations on a broker are read off the names of its
exchanges and queues. Listing needs to enumerate them, which AMQP cannot do:
these commands use RabbitMQ's management HTTP API (plugin
``rabbitmq_management``), by default on port 15672 of the broker's host with
the broker URL's credentials (``--management`` to say otherwise).

Removal deletes the federation's queues (with any messages in them) and
exchanges; with ``--users`` also the users `tff-amqp provision` created for it
(``silo.<federation>.*`` and ``coordinator.<federation>``; users named after a
certificate's CN are not recognisable by name and stay).

`remove_federation_objects` does the same over AMQP when the silo names are
known (the demo uses it: it needs no management API).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import yarl

from tff_amqp.topology import Topology
from tff_amqp.transport.connection import broker_urls


@dataclass
class FederationObjects:
    """The broker objects of one federation."""

    name: str
    queues: list[str] = field(default_factory=list)
    exchanges: list[str] = field(default_factory=list)
    users: list[str] = field(default_factory=list)
    messages: int = 0
    consumers: int = 0

    def describe(self) -> list[str]:
        return (
            [f"queue {q}" for q in self.queues]
            + [f"exchange {e}" for e in self.exchanges]
            + [f"user {u}" for u in self.users]
        )


def federation_of(name: str) -> str | None:
    """``tff.<federation>.<rest>`` -> federation (names have no dots)."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[0] == "tff" and parts[1]:
        return parts[1]
    return None


def user_federation(user: str) -> str | None:
    """The federation of a user `tff-amqp provision` created."""
    parts = user.split(".")
    if len(parts) == 3 and parts[0] == "silo":
        return parts[1]
    if len(parts) == 2 and parts[0] == "coordinator":
        return parts[1]
    return None


def management_url_for(broker_url: str) -> str:
    """http://user:password@host:15672/ from amqp[s]://user:password@host:port/vhost."""
    parsed = yarl.URL(broker_urls(broker_url)[0])
    scheme = "https" if parsed.scheme == "amqps" else "http"
    url = yarl.URL.build(
        scheme=scheme,
        user=parsed.user or "guest",
        password=parsed.password if parsed.user else "guest",
        host=parsed.host or "127.0.0.1",
        port=15672,
        path="/",
    )
    return str(url)


def vhost_of(broker_url: str) -> str:
    path = yarl.URL(broker_urls(broker_url)[0]).path
    return path[1:] if len(path) > 1 else "/"


def _q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def collect(api: Any, vhost: str, *, users: bool) -> dict[str, FederationObjects]:
    """Every federation with objects in `vhost` (and, if `users`, provisioned users)."""
    found: dict[str, FederationObjects] = {}

    def entry(name: str) -> FederationObjects:
        return found.setdefault(name, FederationObjects(name))

    for queue in api.call("GET", f"queues/{_q(vhost)}?columns=name,messages,consumers") or []:
        fed = federation_of(queue["name"])
        if fed is not None:
            e = entry(fed)
            e.queues.append(queue["name"])
            e.messages += int(queue.get("messages") or 0)
            e.consumers += int(queue.get("consumers") or 0)
    for exchange in api.call("GET", f"exchanges/{_q(vhost)}?columns=name") or []:
        fed = federation_of(exchange["name"])
        if fed is not None:
            entry(fed).exchanges.append(exchange["name"])
    if users:
        for user in api.call("GET", "users?columns=name") or []:
            fed = user_federation(user["name"])
            if fed is not None:
                entry(fed).users.append(user["name"])
    for e in found.values():
        e.queues.sort()
        e.exchanges.sort()
        e.users.sort()
    return found


def remove(api: Any, vhost: str, objects: FederationObjects) -> list[str]:
    """Delete queues, then exchanges, then users; what was deleted."""
    removed = []
    for queue in objects.queues:
        if api.delete(f"queues/{_q(vhost)}/{_q(queue)}"):
            removed.append(f"queue {queue}")
    for exchange in objects.exchanges:
        if api.delete(f"exchanges/{_q(vhost)}/{_q(exchange)}"):
            removed.append(f"exchange {exchange}")
    for user in objects.users:
        if api.delete(f"users/{_q(user)}"):
            removed.append(f"user {user}")
    return removed


async def remove_federation_objects(
    broker_url: str, federation: str, silos: list[str], *, connect_timeout: float = 5.0
) -> list[str]:
    """Delete, over AMQP, every queue and exchange a federation of these
    silos uses (deleting a missing one is not an error). What it deleted."""
    from tff_amqp.retry import connect_within
    from tff_amqp.transport.connection import connect

    t = Topology(federation)
    queues = [t.coordinator_queue, t.coordinator_bulk_queue]
    for silo in silos:
        # The schema's list: request, bulk and work queues, broadcast stream.
        queues += [spec.name for spec in t.silo_queue_specs(silo)]
    exchanges = list(t.exchanges())
    connection = await connect(
        broker_url,
        name="tff-amqp federation remove",
        policy=connect_within(connect_timeout),
    )
    removed = []
    try:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)
            removed.append(f"queue {queue}")
        for exchange in exchanges:
            await channel.exchange_delete(exchange)
            removed.append(f"exchange {exchange}")
    finally:
        await connection.close()
    return removed


# ----------------------------------------------------------------- command line


def add_federation_parser(sub: Any, common: argparse.ArgumentParser, broker_default: str) -> None:
    parser = sub.add_parser(
        "federation",
        parents=[common],
        help="list the federations on a broker, or remove one (queues, exchanges, users)",
        description="List or remove federations (every broker object named "
        "tff.<federation>.*). Uses the RabbitMQ management HTTP API (plugin "
        "rabbitmq_management): by default http://<broker user>:<password>@<broker "
        "host>:15672/.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument(
        "--broker",
        default=broker_default,
        help="broker URL; its host, credentials and vhost are used "
        "(env TFF_AMQP_BROKER or AMQP_URL; default %(default)s)",
    )
    shared.add_argument(
        "--management",
        default=os.environ.get("TFF_AMQP_MANAGEMENT_URL"),
        metavar="URL",
        help="management API URL, http(s)://admin:password@host:15672/ (env "
        "TFF_AMQP_MANAGEMENT_URL; default: from --broker, port 15672)",
    )
    listing = actions.add_parser(
        "list",
        parents=[shared],
        help="list federations: queues, exchanges, messages waiting, consumers",
    )
    listing.add_argument(
        "--users", action="store_true", help="also count users created by `tff-amqp provision`"
    )
    removing = actions.add_parser(
        "remove",
        parents=[shared],
        help="delete a federation's queues (with their messages) and exchanges",
        description="Delete every queue (with any messages in it) and exchange named "
        "tff.NAME.*, after listing them. Running silos and coordinators of NAME lose their "
        "queues: stop them first.",
    )
    removing.add_argument("name", metavar="NAME", help="the federation")
    removing.add_argument(
        "--users",
        action="store_true",
        help="also delete the users `tff-amqp provision` created for it "
        "(silo.NAME.* and coordinator.NAME)",
    )
    removing.add_argument(
        "--yes", action="store_true", help="do not ask for confirmation (required without a tty)"
    )


def run_federation(args: argparse.Namespace) -> int:
    from tff_amqp.provision import ManagementApi

    if args.action == "remove":
        Topology(args.name)  # a bad name is a ValueError: exit 2
    api = ManagementApi(args.management or management_url_for(args.broker))
    vhost = vhost_of(args.broker)
    found = collect(api, vhost, users=args.users)
    if args.action == "list":
        if not found:
            print(f"no federation on vhost {vhost!r} of {api.display_url}")
            return 0
        rows = [["federation", "queues", "exchanges", "messages", "consumers"]]
        if args.users:
            rows[0].append("users")
        for name in sorted(found):
            e = found[name]
            row = [name, len(e.queues), len(e.exchanges), e.messages, e.consumers]
            if args.users:
                row.append(len(e.users))
            rows.append([str(c) for c in row])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        return 0
    objects = found.get(args.name)
    if objects is None:
        print(f"nothing to remove: no federation {args.name!r} on vhost {vhost!r}")
        return 0
    what = objects.describe()
    print(f"federation {args.name!r} on vhost {vhost!r}: {len(what)} object(s)")
    for line in what:
        print(f"  {line}")
    if objects.consumers:
        print(f"  ({objects.consumers} consumer(s) are attached: silos or a coordinator run)")
    if not args.yes:
        if not sys.stdin.isatty():
            print("tff-amqp federation: not removed; pass --yes to remove", file=sys.stderr)
            return 1
        answer = input("remove all of them? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            print("not removed")
            return 1
    removed = remove(api, vhost, objects)
    print(f"removed {len(removed)} object(s)")
    return 0


def remove_after_demo(broker_url: str, federation: str, silos: list[str]) -> list[str]:
    """Synchronous `remove_federation_objects` for the demo."""
    return asyncio.run(remove_federation_objects(broker_url, federation, silos))
