"""The lifecycle of a coordinator's long-lived resources, either regime's.

A runtime owns the broker link (a `ReplyIntake`), the membership it feeds, the
bulk connection (both regimes move large values as chunks, on a connection of
their own), the coordinator's own TFF worker and the telemetry (metrics
endpoint, progress display) that observes them. It starts lazily on the event loop that first
uses it (grpc.aio and aio-pika objects are bound to that loop) and `close()`
frees everything, in reverse order. A regime says only how its link (and
whatever else rides on the broker) is made, in `_connect` and `_disconnect`.
"""

from __future__ import annotations

import asyncio
from typing import Any, Generic, TypeVar

from tff_amqp.coordinator.bulk import CoordinatorBulk
from tff_amqp.coordinator.intake import ReplyIntake
from tff_amqp.coordinator.membership import Membership
from tff_amqp.coordinator.options import CoordinatorOptions
from tff_amqp.observe.events import InvocationEvents
from tff_amqp.observe.telemetry import CoordinatorTelemetry
from tff_amqp.tff_worker import WorkerBinary
from tff_amqp.topology import Topology

L = TypeVar("L", bound=ReplyIntake[Any])
M = TypeVar("M", bound=Membership)


class SharedRuntime(Generic[L, M]):
    """Starts on first use, bound to that event loop; `close()` frees the
    telemetry, the broker connection(s) and the TFF worker."""

    # What a second event loop is told (the regime's context names itself).
    loop_error = "an AMQP execution context is bound to the event loop it first ran on"

    def __init__(self, coordinator: CoordinatorOptions, membership: M) -> None:
        self.topology = Topology(coordinator.federation, coordinator.queue_type)
        self.membership = membership
        # What invocations (stateful) and rounds (stateless) report: the
        # progress display and the metrics observe it.
        self.events = InvocationEvents()
        self.telemetry: CoordinatorTelemetry | None = None
        self._coordinator = coordinator
        self._link: L | None = None
        self._bulk: CoordinatorBulk | None = None
        self._worker: WorkerBinary | None = None
        self._lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def started(self) -> bool:
        return self._link is not None

    @property
    def link(self) -> L:
        if self._link is None:
            raise RuntimeError("coordinator runtime is not started")
        return self._link

    @property
    def bulk(self) -> CoordinatorBulk:
        if self._bulk is None:
            raise RuntimeError("coordinator runtime is not started")
        return self._bulk

    @property
    def worker(self) -> WorkerBinary:
        if self._worker is None:
            raise RuntimeError("coordinator runtime is not started")
        return self._worker

    async def ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            raise RuntimeError(self.loop_error)
        self._loop = loop
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._link is not None:
                return
            worker = WorkerBinary()
            await worker.start()
            try:
                link = await self._connect()
                # Large values travel on a connection of their own.
                bulk = CoordinatorBulk(
                    self._coordinator.broker_url,
                    self.topology,
                    sender=self._coordinator.coordinator_name,
                    max_message_bytes=self._coordinator.max_message_bytes,
                )
                try:
                    await bulk.start()
                except BaseException:
                    await link.close()
                    raise
            except BaseException:
                await worker.stop()
                raise
            self._worker, self._link, self._bulk = worker, link, bulk
            self.telemetry = CoordinatorTelemetry(
                self._coordinator,
                self.events,
                self.membership,
                lambda: self._link.stats if self._link is not None else None,
            )
            self._on_started()

    async def _connect(self) -> L:
        """The regime's started link (on failure, nothing of it left open)."""
        raise NotImplementedError

    def _on_started(self) -> None:
        """Called once everything is started."""

    async def close(self) -> None:
        if self.telemetry is not None:
            self.telemetry.close()
            self.telemetry = None
        if self._bulk is not None:
            await self._bulk.close()
            self._bulk = None
        if self._link is not None:
            await self._link.close()
            self._link = None
        if self._worker is not None:
            await self._worker.stop()
            self._worker = None
