"""`tff-amqp status`: which silos of a federation are alive, and how busy.

Listens on the federation's reply exchange for one observation window (a
temporary exclusive queue, so the coordinator's own queue is untouched) and
reports every silo heard from, with its last heartbeat and load.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection, ExchangeType

from tff_amqp import protocol as p
from tff_amqp.errors import FederationNotFoundError
from tff_amqp.retry import connect_within
from tff_amqp.topology import Topology
from tff_amqp.transport.connection import connect


@dataclass
class SiloSeen:
    status: p.SiloStatus
    kind: p.Kind
    last_seen: float
    heartbeats: int = 0
    # The processes heard for this silo: instance id -> (host, pid). One for
    # a stateful silo; one per worker of a pool.
    processes: dict[str, tuple[str, int]] = field(default_factory=dict)


async def federation_exists(connection: AbstractRobustConnection, topology: Topology) -> bool:
    """Whether the federation's reply exchange exists (a passive declare,
    which creates nothing; its channel is closed by a NOT_FOUND answer)."""
    channel = await connection.channel()
    try:
        await channel.declare_exchange(
            topology.replies_exchange, ExchangeType.TOPIC, durable=True, passive=True
        )
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    await channel.close()
    return True


async def observe(
    broker_url: str, federation: str, window: float = 3.0, *, connect_timeout: float = 5.0
) -> dict[str, SiloSeen]:
    """Silos heard from during `window` seconds. Read-only: the only thing it
    declares is its own temporary exclusive queue; a federation without a
    reply exchange raises FederationNotFoundError (nothing is created)."""
    topology = Topology(federation)
    connection = await connect(
        broker_url, name="tff-amqp status", policy=connect_within(connect_timeout)
    )
    seen: dict[str, SiloSeen] = {}
    try:
        if not await federation_exists(connection, topology):
            raise FederationNotFoundError(
                f"no federation {federation!r} on this broker (its exchange "
                f"{topology.replies_exchange} does not exist); `tff-amqp federation list` "
                "shows the ones that do"
            )
        channel = await connection.channel()
        replies = await channel.get_exchange(topology.replies_exchange, ensure=False)
        queue = await channel.declare_queue(
            f"{topology.prefix}.status.{uuid.uuid4().hex[:8]}", exclusive=True, auto_delete=True
        )
        await queue.bind(replies, routing_key=topology.reply_binding_key())

        async def on_message(message: AbstractIncomingMessage) -> None:
            try:
                envelope = p.decode(message.body)
            except p.ProtocolError:
                return
            if isinstance(envelope.body, p.SiloStatus):
                entry = seen.get(envelope.body.silo)
                if entry is None:
                    entry = seen[envelope.body.silo] = SiloSeen(envelope.body, envelope.kind, 0.0)
                entry.status, entry.kind, entry.last_seen = (
                    envelope.body,
                    envelope.kind,
                    time.time(),
                )
                entry.heartbeats += 1
                if envelope.kind is p.Kind.GOODBYE:
                    entry.processes.pop(envelope.instance, None)
                else:
                    entry.processes[envelope.instance] = (envelope.body.host, envelope.body.pid)

        await queue.consume(on_message, no_ack=True)
        await asyncio.sleep(window)
    finally:
        await connection.close()
    return seen


def _processes(entry: SiloSeen) -> list[str]:
    """Instance (short), host and pid columns: of each process heard for the
    silo (a pool's workers are several, comma-separated), "-" if unknown."""
    processes = sorted(entry.processes.items())
    if not processes:
        return ["-", "-", "-"]
    return [
        ",".join(instance[:8] or "-" for instance, _ in processes),
        ",".join(sorted({host or "-" for _, (host, _) in processes})),
        ",".join(str(pid or "-") for _, (_, pid) in processes),
    ]


def format_table(seen: dict[str, SiloSeen], federation: str, window: float) -> str:
    if not seen:
        return (
            f"no silo of federation {federation!r} was heard from in {window:.0f} s. Start one "
            f"with `tff-amqp silo --federation {federation} --name NAME ...`."
        )
    now = time.time()
    rows = [
        [
            "silo",
            "state",
            "last heartbeat",
            "clients",
            "active invocations",
            "data keys",
            "raw",
            "instance",
            "host",
            "pid",
        ]
    ]
    for name in sorted(seen):
        entry = seen[name]
        state = "leaving" if entry.kind is p.Kind.GOODBYE else "live"
        rows.append(
            [
                name,
                state,
                f"{now - entry.last_seen:.1f} s ago",
                str(entry.status.clients),
                str(entry.status.active_invocations),
                ",".join(entry.status.data_keys) or "-",
                "yes" if entry.status.allow_raw_client_values else "no",
                *_processes(entry),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    live = sum(1 for e in seen.values() if e.kind is not p.Kind.GOODBYE)
    return f"federation {federation!r}: {live} live silo(s)\n" + "\n".join(
        lines + _schema_lines(seen)
    )


def _schema_lines(seen: dict[str, SiloSeen]) -> list[str]:
    """Per silo and data key, the columns it advertised (names and kinds;
    row counts only from silos started with --advertise-counts)."""
    lines = []
    for name in sorted(seen):
        for schema in seen[name].status.data_schemas:
            columns = ", ".join(f"{column} {kind}" for column, kind in schema.columns) or "-"
            rows = f" ({schema.rows} rows)" if schema.rows is not None else ""
            lines.append(f"  {name} {schema.key}: {columns}{rows}")
    return ["", "columns:", *lines] if lines else []
