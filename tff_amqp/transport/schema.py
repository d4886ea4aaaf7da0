"""Declarations of broker objects that more than one role declares, written
once so their arguments cannot disagree (RabbitMQ refuses a redeclaration
with other arguments)."""

from __future__ import annotations

from aio_pika.abc import AbstractChannel, ExchangeType

from tff_amqp.topology import Topology


async def declare_work_queue(channel: AbstractChannel, topology: Topology, silo: str) -> None:
    """The silo's durable work queue, bound to the work exchange; shared by
    the coordinator and workers (both declare it, so items published before
    any worker started are kept). Arguments must match on both sides."""
    exchange = await channel.declare_exchange(
        topology.work_exchange, ExchangeType.DIRECT, durable=True
    )
    queue = await channel.declare_queue(
        topology.work_queue(silo),
        durable=True,
        arguments={"x-dead-letter-exchange": topology.dead_letter_exchange},
    )
    await queue.bind(exchange, routing_key=topology.request_routing_key(silo))
