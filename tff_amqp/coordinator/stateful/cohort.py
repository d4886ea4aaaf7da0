"""The silos of one invocation: chosen once, each with its outbox, and those
dropped from it (stragglers, lost silos) for the rest of the invocation."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tff_amqp.coordinator.quorum import cohort_floor, quorum_of
from tff_amqp.coordinator.stateful.outbox import OutboxChannel, SiloOutbox

if TYPE_CHECKING:
    from tff_amqp.coordinator.stateful.runtime import CoordinatorRuntime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InvocationClock:
    """An invocation's start and deadline (monotonic for waits, epoch seconds
    for the wire)."""

    started: float
    seconds: float
    deadline_epoch: float

    @classmethod
    def start(cls, seconds: float) -> InvocationClock:
        return cls(time.monotonic(), seconds, time.time() + seconds)

    def remaining(self) -> float:
        return self.started + self.seconds - time.monotonic()


@dataclass(frozen=True)
class ClientAssignment:
    """How an invocation's clients map to silos: explicit client lists are
    split into contiguous chunks; `None` means silos use their own data."""

    chunks: dict[str, tuple[int, int]] | None

    def size(self, silo: str) -> int | None:
        if self.chunks is None:
            return None
        start, stop = self.chunks[silo]
        return stop - start


class Cohort:
    """Chooses the invocation's silos at first use (bounded wait), opens one
    outbox per silo, and keeps track of the silos dropped since."""

    def __init__(
        self,
        runtime: CoordinatorRuntime,
        invocation_id: str,
        clock: InvocationClock,
        clients: int | None,
        channel: OutboxChannel,
    ) -> None:
        self._runtime = runtime
        self._invocation_id = invocation_id
        self._clock = clock
        self._clients = clients
        self._channel = channel
        # Value ids are assigned by the coordinator, one sequence for all silos.
        self._ids = itertools.count(1)
        self._silos: list[str] | None = None
        self._lock = asyncio.Lock()
        self.assignment = ClientAssignment(None)
        # Answers an aggregation phase needs (set with the cohort).
        self.quorum = cohort_floor(runtime.options.min_silos)
        self.outboxes: dict[str, SiloOutbox] = {}
        self.dropped: set[str] = set()
        # Why each dropped silo was dropped, in drop order (the invocation's
        # report and its PartialResultWarning name them).
        self.drop_reasons: dict[str, str] = {}

    @property
    def formed(self) -> bool:
        return self._silos is not None

    @property
    def size(self) -> int:
        return len(self._silos or [])

    async def silos(self) -> list[str]:
        """The silos of this invocation, chosen once (bounded wait)."""
        async with self._lock:
            if self._silos is None:
                options = self._runtime.options
                timeout = min(options.cohort_timeout, max(self._clock.remaining(), 0.0))
                waiting_since = time.monotonic()
                if self._clients == 0:
                    # No client takes part: aggregations return their zero, as in
                    # TFF's native runtime, and no silo is asked anything.
                    silos = []
                else:
                    silos = await self._runtime.membership.wait_for_cohort(
                        cohort_floor(options.min_silos), options.max_silos, timeout
                    )
                if self._clients is not None:
                    # Explicit client lists: no silo gets an empty share.
                    silos = silos[: min(len(silos), self._clients)]
                    self.assignment = _split(self._clients, silos)
                self._silos = silos
                self.quorum = quorum_of(options.min_silos, len(silos))
                for silo in silos:
                    self.outboxes[silo] = SiloOutbox(self._channel, silo, lambda: next(self._ids))
                log.info(
                    "invocation.cohort",
                    extra={"invocation": self._invocation_id[:8], "silos": silos},
                )
                self._runtime.events.cohort_chosen(
                    self._invocation_id, silos, time.monotonic() - waiting_since
                )
            return self._silos

    def outbox_now(self, silo: str) -> SiloOutbox | None:
        """`outbox(silo)` when the cohort is already chosen (None: wait for it)."""
        outbox = self.outboxes.get(silo) if self._silos is not None else None
        if outbox is not None and not outbox.opened:
            outbox.open(clients=self.assignment.size(silo), data_key=None)
        return outbox

    async def outbox(self, silo: str, *, data_key: str | None = None) -> SiloOutbox:
        await self.silos()
        outbox = self.outboxes[silo]
        if not outbox.opened:
            outbox.open(clients=self.assignment.size(silo), data_key=data_key)
        return outbox

    def check_columns(self, key: str, columns: list[str]) -> None:
        """MissingColumnError if a chosen silo advertised data `key` without one of `columns`."""
        if columns:
            self._runtime.membership.check_columns(self.active(), key, columns)

    def chosen(self) -> list[str]:
        """The silos chosen for the invocation (empty before the cohort)."""
        return list(self._silos or [])

    def active(self) -> list[str]:
        return [s for s in (self._silos or []) if s not in self.dropped]

    def drop(self, silos: Sequence[str], *, reason: str) -> None:
        """Exclude silos from the rest of this invocation and tell them to free
        its state; their late replies are discarded (and counted)."""
        silos = [s for s in silos if s not in self.dropped]
        if not silos:
            return
        self._runtime.events.silos_dropped(self._invocation_id, silos, reason)
        for silo in silos:
            self.dropped.add(silo)
            self.drop_reasons[silo] = reason
            self._runtime.link.forget_silo(self._invocation_id, silo)
            outbox = self.outboxes.get(silo)
            if outbox is not None:
                self._runtime.in_background(outbox.close())
        log.warning(
            "invocation.dropped_silos",
            extra={
                "invocation": self._invocation_id[:8],
                "silos": list(silos),
                "reason": reason,
                "remaining": self.active(),
            },
        )

    async def close(self, timeout: float = 5.0) -> None:
        """Tell every silo to free the invocation (each bounded, never raises)."""

        async def close_outbox(outbox: SiloOutbox) -> None:
            try:
                await asyncio.wait_for(outbox.close(), timeout)
            except Exception:
                log.debug("closing silo outbox failed", exc_info=True)

        await asyncio.gather(*(close_outbox(o) for o in self.outboxes.values()))


def _split(clients: int, silos: Sequence[str]) -> ClientAssignment:
    if not silos:
        return ClientAssignment({})
    base, extra = divmod(clients, len(silos))
    chunks, start = {}, 0
    for i, silo in enumerate(silos):
        stop = start + base + (1 if i < extra else 0)
        chunks[silo] = (start, stop)
        start = stop
    return ClientAssignment(chunks)


@dataclass(frozen=True)
class InvocationScope:
    """What the parts of one invocation that talk to its silos (shipping,
    gather) share: one value, so each takes it whole."""

    runtime: CoordinatorRuntime
    invocation_id: str
    clock: InvocationClock
    cohort: Cohort
