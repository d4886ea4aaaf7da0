"""Declaring the broker schema that `Topology` describes, over AMQP.

Every role declares through these, from the same specs `tff-amqp provision`
uses over the management API, so no two declarations can disagree.
"""

from __future__ import annotations

import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, ExchangeType

from tff_amqp.errors import QueueTypeMismatchError
from tff_amqp.topology import QueueSpec, Topology


async def declare_exchange(
    channel: AbstractChannel, topology: Topology, name: str
) -> AbstractExchange:
    """One exchange of the federation, with its type from the schema."""
    kind = topology.exchanges()[name]
    return await channel.declare_exchange(name, ExchangeType(kind), durable=True)


async def declare_queue(
    channel: AbstractChannel, topology: Topology, spec: QueueSpec
) -> AbstractQueue:
    """A queue of the schema, its exchange, and its binding."""
    exchange = await declare_exchange(channel, topology, spec.exchange)
    try:
        queue = await channel.declare_queue(
            spec.name,
            durable=spec.durable,
            auto_delete=False,
            arguments=dict(spec.arguments) or None,
        )
    except aiormq.exceptions.ChannelPreconditionFailed as e:
        if "x-queue-type" in str(e):
            raise QueueTypeMismatchError(spec.name, topology, str(e)) from None
        raise
    await queue.bind(exchange, routing_key=spec.routing_key)
    return queue


async def declare_work_queue(channel: AbstractChannel, topology: Topology, silo: str) -> None:
    """The silo's durable work queue; the coordinator and the silo's workers
    both declare it, so items published before any worker started are kept."""
    await declare_queue(channel, topology, topology.work_queue_spec(silo))


async def declare_broadcast_stream(
    channel: AbstractChannel, topology: Topology, silo: str
) -> AbstractQueue:
    """The silo's broadcast stream (stateless regime): declared by the
    coordinator before it publishes a round's broadcast, and by workers that
    may configure (guest mode), so a late worker still reads it."""
    return await declare_queue(channel, topology, topology.broadcast_queue_spec(silo))


async def hold_lock(channel: AbstractChannel, topology: Topology, holder: str) -> AbstractQueue:
    """Declare `holder`'s lock queue (exclusive to this connection, deleted
    with it). Raises aiormq's ChannelLockedResource when another connection
    holds it; the caller says who."""
    return await channel.declare_queue(
        topology.lock_queue(holder), exclusive=True, auto_delete=True, durable=False
    )
