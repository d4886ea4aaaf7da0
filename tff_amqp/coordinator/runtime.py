"""Long-lived coordinator resources shared by invocations: the broker link,
silo membership and the coordinator's local worker_binary."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass, field

from tff_amqp import protocol as p
from tff_amqp.coordinator.link import CoordinatorLink
from tff_amqp.coordinator.membership import Membership
from tff_amqp.topology import Topology
from tff_amqp.worker import WorkerBinary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoordinatorOptions:
    """Options of an AMQP execution context (see the README for each)."""

    broker_url: str
    federation: str = "default"
    min_silos: int = 1
    max_silos: int | None = None
    cohort_timeout: float = 60.0
    deadline: float = 600.0
    heartbeat_timeout: float = 5.0
    max_message_bytes: int = p.DEFAULT_MAX_MESSAGE_BYTES
    coordinator_name: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}"[:64]
    )

    def __post_init__(self) -> None:
        if self.min_silos < 1:
            raise ValueError("min_silos must be at least 1")
        if self.max_silos is not None and self.max_silos < self.min_silos:
            raise ValueError("max_silos must be >= min_silos")
        for name in ("cohort_timeout", "deadline", "heartbeat_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds")
        Topology(self.federation)  # validates the name


class CoordinatorRuntime:
    """Starts lazily on the event loop that first uses it; `close()` frees
    the broker connection and stops the local worker."""

    def __init__(self, options: CoordinatorOptions) -> None:
        self.options = options
        self.topology = Topology(options.federation)
        self.membership = Membership(liveness_timeout=options.heartbeat_timeout)
        self._link: CoordinatorLink | None = None
        self._worker: WorkerBinary | None = None
        self._lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def link(self) -> CoordinatorLink:
        if self._link is None:
            raise RuntimeError("coordinator runtime is not started")
        return self._link

    @property
    def worker(self) -> WorkerBinary:
        if self._worker is None:
            raise RuntimeError("coordinator runtime is not started")
        return self._worker

    async def ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            raise RuntimeError(
                "an AMQP execution context is bound to the event loop it first ran on; "
                "create one context per event loop"
            )
        self._loop = loop
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._link is not None:
                return
            worker = WorkerBinary()
            await worker.start()
            link = CoordinatorLink(
                self.options.broker_url,
                self.topology,
                self.membership,
                max_message_bytes=self.options.max_message_bytes,
                sender=self.options.coordinator_name,
            )
            try:
                await link.start()
            except BaseException:
                await worker.stop()
                raise
            self._worker, self._link = worker, link
            log.info("coordinator.started", extra={"federation": self.options.federation})

    async def close(self) -> None:
        if self._link is not None:
            await self._link.close()
            self._link = None
        if self._worker is not None:
            await self._worker.stop()
            self._worker = None
