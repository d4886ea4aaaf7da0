"""A silo-side process's bulk connection, shared by both of them: large
results go to the coordinator as chunked transfers.

Separate from the control connection (requests or work items, replies,
heartbeats), so a large transfer never delays a heartbeat. Sending uses only
what a provisioned silo may: write to ``tff.F.replies`` with routing key
``bulk.<silo>``, as the silo's broker user (validated ``user_id``). What the
process receives on this connection is its own business (`_start_receiving`):
the stateful silo consumes its bulk queue, a pool worker reads its silo's
broadcast stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from tff_amqp import protocol as p
from tff_amqp.retry import SILO_PUBLISH, RetryPolicy, connect_within
from tff_amqp.topology import Topology
from tff_amqp.transport.bulk import BulkSender, inline_limit_for
from tff_amqp.transport.connection import connect
from tff_amqp.transport.schema import declare_exchange

if TYPE_CHECKING:
    from tff_amqp.silo.endpoint import EndpointConfig

log = logging.getLogger(__name__)

# Chunks delivered before they are acked: bounds what the broker pushes into
# the process (prefetch x chunk size).
PREFETCH = 8


@dataclass(frozen=True, kw_only=True)
class BulkSettings:
    """Where and as whom a silo-side process's bulk connection connects: one
    value, built once from the endpoint config, so the connection classes of
    both regimes take it whole instead of repeating its fields."""

    broker_url: str
    topology: Topology
    silo: str
    # The silo's broker user: chunks carry it as the validated ``user_id``.
    user_id: str
    # The process's instance id (the endpoint's), stamped on its chunks.
    instance: str
    max_message_bytes: int
    declare_topology: bool
    connect_policy: RetryPolicy
    ssl_context: ssl.SSLContext | None = None

    @classmethod
    def of(
        cls,
        config: EndpointConfig,
        topology: Topology,
        *,
        silo: str,
        user_id: str,
        instance: str,
    ) -> BulkSettings:
        """The settings of `config`'s process for `silo`, connected as
        `user_id` (known once the control connection is up)."""
        return cls(
            broker_url=config.broker_url,
            topology=topology,
            silo=silo,
            user_id=user_id,
            instance=instance,
            max_message_bytes=config.max_message_bytes,
            declare_topology=config.declare_topology,
            connect_policy=connect_within(config.connect_timeout),
            ssl_context=config.tls.context() if config.tls else None,
        )


class SiloBulkConnection:
    """The bulk connection of one silo-side process and its chunk sender."""

    def __init__(self, settings: BulkSettings, *, role: str = "silo") -> None:
        self.topology = settings.topology
        self.silo = settings.silo
        self.role = role
        self.inline_limit = inline_limit_for(settings.max_message_bytes)
        self._url = settings.broker_url
        self._ssl_context = settings.ssl_context
        self._user_id = settings.user_id
        self._instance = settings.instance
        self._max_message_bytes = settings.max_message_bytes
        self._declare = settings.declare_topology
        self._connect_policy = settings.connect_policy
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._sender: BulkSender | None = None

    async def __aenter__(self) -> SiloBulkConnection:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def sent_bytes(self) -> int:
        return self._sender.stats.bytes if self._sender is not None else 0

    async def start(self) -> None:
        """Connect, open the sender and whatever the process receives; on
        failure, close."""
        self._connection = await connect(
            self._url,
            name=f"tff-amqp {self.role} {self.silo} bulk",
            policy=self._connect_policy,
            ssl_context=self._ssl_context,
        )
        try:
            self._channel = await self._connection.channel()
            await self._channel.set_qos(prefetch_count=PREFETCH)
            if self._declare:
                replies = await declare_exchange(
                    self._channel, self.topology, self.topology.replies_exchange
                )
            else:
                replies = await self._channel.get_exchange(
                    self.topology.replies_exchange, ensure=False
                )
            await self._start_receiving(self._connection, self._channel)
            self._sender = BulkSender(
                replies,
                sender=self.silo,
                max_message_bytes=self._max_message_bytes,
                policy=SILO_PUBLISH,
                user_id=self._user_id,
                instance=self._instance,
            )
        except BaseException:
            await self.close()
            raise

    async def _start_receiving(
        self, connection: AbstractRobustConnection, channel: AbstractChannel
    ) -> None:
        """Hook: start consuming what this process receives in chunks."""

    async def close(self) -> None:
        """Close the connection. Idempotent."""
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._connection.close(), 5.0)
            self._connection = None

    async def send(
        self,
        data: bytes | bytearray | memoryview,
        *,
        invocation_id: str,
        correlation_id: str,
        deadline: float,
    ) -> p.BlobRef:
        """Send a large result to the coordinator as a chunked transfer;
        returns once every chunk is confirmed by the broker."""
        if self._sender is None:
            raise RuntimeError(f"{self.role} bulk connection is not started")
        return await self._sender.send(
            data,
            routing_key=self.topology.bulk_reply_routing_key(self.silo),
            invocation_id=invocation_id,
            correlation_id=correlation_id,
            deadline=deadline,
        )
