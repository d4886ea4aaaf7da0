"""Simulation mode: many silo agents in one process.

A real silo is one `tff-amqp silo` process of ~650 MB (it imports TensorFlow
and TFF: TFF sequence values are TensorFlow GraphDefs, and the CSV data path
builds tf.data graphs). To run tens of silos on one machine, a `SiloHost`
runs many `SiloAgent`s on one event loop and shares that import. Each agent
keeps everything a silo has: its own AMQP connection, name, request queue,
invocation sessions, privacy policy and data, and its own worker client
(pinned executors, computation cache). The worker_binary is either shared by
the host's silos (default: one process, the cheapest) or one per silo.

What it does not model: silos on separate machines. The host's silos share
CPU, memory and one failure domain (the host process and, in shared mode,
its worker_binary). See docs/simulation.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Sequence

from tff_amqp.event_loop import running_kind
from tff_amqp.silo.serve import Service
from tff_amqp.silo.stateful.agent import SiloAgent, SiloConfig
from tff_amqp.tff_worker import WorkerBinary

log = logging.getLogger(__name__)


class WorkerMode(enum.StrEnum):
    SHARED = "shared"  # one worker_binary for all silos of the host
    PER_SILO = "per-silo"  # each silo starts its own, like `tff-amqp silo`


class SiloHost(Service):
    """Starts, serves and stops the agents of `configs` in this process.

    async with SiloHost(configs) as host:
        await host.wait_for_failure()   # returns if a shared worker dies
    """

    # Agents connect this many at a time (each opens an AMQP connection,
    # declares its queue and says hello).
    START_CONCURRENCY = 8

    def __init__(
        self, configs: Sequence[SiloConfig], *, worker_mode: WorkerMode = WorkerMode.SHARED
    ) -> None:
        if not configs:
            raise ValueError("a silo host needs at least one silo")
        names = [c.name for c in configs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"silo names must be unique in a host; repeated: {duplicates}")
        self.configs = tuple(configs)
        self.worker_mode = worker_mode
        self.agents: list[SiloAgent] = []
        self._worker: WorkerBinary | None = None

    @property
    def worker_pid(self) -> int | None:
        return self._worker.pid if self._worker is not None else None

    async def _start(self) -> None:
        """Start the shared worker (if any), then every agent (`start()`
        stops everything already started if this fails)."""
        if self.worker_mode is WorkerMode.SHARED:
            self._worker = WorkerBinary()
            await self._worker.start()
        for config in self.configs:
            client = self._worker.new_client() if self._worker is not None else None
            self.agents.append(SiloAgent(config, worker=client))
        gate = asyncio.Semaphore(self.START_CONCURRENCY)

        async def start_one(agent: SiloAgent) -> None:
            async with gate:
                await agent.start()

        await asyncio.gather(*(start_one(agent) for agent in self.agents))
        log.info(
            "silo_host.ready",
            extra={
                "silos": [c.name for c in self.configs],
                "worker_mode": str(self.worker_mode),
                "shared_worker_pid": self.worker_pid,
                "event_loop": running_kind(),
            },
        )

    async def wait_for_failure(self, poll_interval: float = 1.0) -> None:
        """Return when the shared worker_binary has died: every silo of the
        host depends on it, so the host should exit (and be restarted)."""
        while True:
            if self._worker is not None and not self._worker.is_running:
                log.error("silo_host.worker_died", extra={"pid": self._worker.pid})
                return
            await asyncio.sleep(poll_interval)

    async def stop(self) -> None:
        """Stop every agent (goodbye, connection), then the shared worker.
        Bounded (each agent's stop is) and idempotent."""
        results = await asyncio.gather(
            *(agent.stop() for agent in self.agents), return_exceptions=True
        )
        for agent, result in zip(self.agents, results, strict=True):
            if isinstance(result, BaseException):
                log.warning(
                    "silo_host.stop_failed", extra={"silo": agent.config.name, "error": str(result)}
                )
        self.agents.clear()
        if self._worker is not None:
            with contextlib.suppress(Exception):
                await self._worker.stop()
            self._worker = None
