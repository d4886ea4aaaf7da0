"""One message in flight per destination; what arrives meanwhile rides together.

Concurrent invocations each publish a small message to the same silo (and
each silo a result back to the coordinator) at about the same time. A
`BundlingPublisher` publishes the first after one turn of the event loop
(with whatever else was published to the same routing key in that turn);
messages that come while it waits for the broker's confirm wait too, and
then go as one bundle (`protocol.Bundle`): one broker message, one confirm,
one delivery instead of one per invocation. A lone invocation pays one loop
turn for it (Nagle's rule, with the confirm as the acknowledgement).

Order per routing key is kept: a bundle holds its members in the order they
were published, and leaves after everything published before them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aio_pika

from tff_amqp import protocol as p

log = logging.getLogger(__name__)

# Publish one message to a routing key; True if routed (see publish_with_retry).
Send = Callable[[str, aio_pika.Message], Awaitable[bool]]
# The AMQP message of an encoded envelope (a single one or a bundle).
MessageOf = Callable[[p.Envelope, bytes], aio_pika.Message]


@dataclass
class _Waiting:
    envelope: p.Envelope
    payload: bytes
    routed: asyncio.Future[bool]


@dataclass
class _Destination:
    busy: bool = False
    waiting: list[_Waiting] = field(default_factory=list)


class BundlingPublisher:
    """Publishes envelopes of one sender, bundling those that queue up behind
    an unconfirmed publish to the same routing key."""

    def __init__(
        self, sender: str, send: Send, message_of: MessageOf, *, max_message_bytes: int
    ) -> None:
        self._sender = sender
        self._send = send
        self._message_of = message_of
        self._max_bytes = max_message_bytes
        self._destinations: dict[str, _Destination] = {}
        self._flushes: set[asyncio.Task[None]] = set()
        self.stats = {"messages": 0, "bundles": 0, "bundled": 0}

    async def publish(
        self, routing_key: str, envelope: p.Envelope, payload: bytes, *, bundle: bool = True
    ) -> bool:
        """Publish `envelope` (encoded as `payload`); True if the broker routed
        it. With `bundle` false (a receiver that does not take bundles) it goes
        alone, at once."""
        if not bundle:
            return await self._publish_one(routing_key, envelope, payload)
        destination = self._destinations.setdefault(routing_key, _Destination())
        routed = asyncio.get_running_loop().create_future()
        mine = _Waiting(envelope, payload, routed)
        destination.waiting.append(mine)
        if destination.busy:
            return await routed
        destination.busy = True
        try:
            # One turn of the event loop first: what other invocations publish
            # to this key in the same turn rides along (with 8 in flight a
            # third of the messages; one loop turn for a lone publish).
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                destination.waiting.remove(mine)  # not sent; the others go on
                raise
            await self._publish_group(routing_key, self._take(destination))
        finally:
            self._next(routing_key, destination)
        return await routed

    async def close(self, timeout: float = 5.0) -> None:
        """Wait (bounded) for bundles still being published."""
        if self._flushes:
            await asyncio.wait(set(self._flushes), timeout=timeout)
        for task in self._flushes:
            task.cancel()

    async def _publish_one(self, routing_key: str, envelope: p.Envelope, payload: bytes) -> bool:
        self.stats["messages"] += 1
        return await self._send(routing_key, self._message_of(envelope, payload))

    def _next(self, routing_key: str, destination: _Destination) -> None:
        """After a publish: bundle what waited, or free the destination."""
        if not destination.waiting:
            destination.busy = False
            if routing_key in self._destinations and destination is self._destinations[routing_key]:
                del self._destinations[routing_key]
            return
        task = asyncio.get_running_loop().create_task(self._flush(routing_key, destination))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self, routing_key: str, destination: _Destination) -> None:
        try:
            await self._publish_group(routing_key, self._take(destination))
        finally:
            self._next(routing_key, destination)

    async def _publish_group(self, routing_key: str, group: list[_Waiting]) -> None:
        """Publish `group` (one message alone, several as a bundle) and settle
        each member's future with the outcome."""
        try:
            if len(group) == 1:
                routed = await self._publish_one(routing_key, group[0].envelope, group[0].payload)
            else:
                routed = await self._publish_bundle(routing_key, group)
        except asyncio.CancelledError:
            for item in group:
                item.routed.cancel()
            raise
        except Exception as e:
            for item in group:
                if not item.routed.done():
                    item.routed.set_exception(e)
                    item.routed.exception()  # retrieved: its caller may be gone
            return
        for item in group:
            if not item.routed.done():
                item.routed.set_result(routed)

    def _take(self, destination: _Destination) -> list[_Waiting]:
        """The longest prefix of the waiting messages that fits one message."""
        size = p.BUNDLE_OVERHEAD
        group: list[_Waiting] = []
        for item in destination.waiting:
            size += len(item.payload) + p.BUNDLE_MEMBER_OVERHEAD
            if group and (size > self._max_bytes or len(group) >= p.MAX_BUNDLED):
                break
            group.append(item)
        del destination.waiting[: len(group)]
        return group

    async def _publish_bundle(self, routing_key: str, group: list[_Waiting]) -> bool:
        envelope = p.bundle_envelope(self._sender, [(i.envelope, i.payload) for i in group])
        payload = p.encode(envelope, max_bytes=self._max_bytes)
        self.stats["bundles"] += 1
        self.stats["bundled"] += len(group)
        log.debug("bundle.publish", extra={"routing_key": routing_key, "messages": len(group)})
        return await self._publish_one(routing_key, envelope, payload)
