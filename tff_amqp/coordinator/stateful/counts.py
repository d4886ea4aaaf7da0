"""What invocations cost in round trips: calls to the TFF workers (the
coordinator's and each silo's, by gRPC method) and control messages on the
broker. For benchmarks and tests: take a snapshot, run invocations, take
another, subtract."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tff_amqp.coordinator.stateful.runtime import CoordinatorRuntime


def _minus(later: dict[str, int], earlier: dict[str, int]) -> dict[str, int]:
    return {k: later[k] - earlier.get(k, 0) for k in later if later[k] - earlier.get(k, 0)}


@dataclass(frozen=True)
class WorkCounts:
    """Cumulative counts at one moment (or, subtracted, over an interval)."""

    # Calls to the coordinator's TFF worker, by gRPC method.
    coordinator: dict[str, int]
    # Calls each silo made to its TFF worker, by gRPC method (from its status).
    silos: dict[str, dict[str, int]]
    # Broker messages: requests published plus replies received (a bundle of
    # several counts once).
    messages: int

    def minus(self, earlier: WorkCounts) -> WorkCounts:
        return WorkCounts(
            coordinator=_minus(self.coordinator, earlier.coordinator),
            silos={s: _minus(c, earlier.silos.get(s, {})) for s, c in self.silos.items()},
            messages=self.messages - earlier.messages,
        )

    @property
    def coordinator_total(self) -> int:
        return sum(self.coordinator.values())

    def silo_total(self, silo: str) -> int:
        return sum(self.silos.get(silo, {}).values())


async def snapshot(
    runtime: CoordinatorRuntime, silos: list[str], timeout: float = 10.0
) -> WorkCounts:
    """Counts once earlier invocations have fully ended: the coordinator's
    background clean-up done, and from each silo in `silos` a status sent
    after now that is idle (no active invocation) or, if the silo still holds
    sessions someone else left open, whose counts stayed the same over two
    statuses. Silos report counts in their heartbeats, so this waits one or
    two heartbeat intervals."""
    await runtime.settle(timeout)
    since = time.monotonic()
    deadline = since + timeout
    statuses: dict[str, dict[str, int]] = {}
    # The last fresh status seen per silo: (its time, its counts).
    seen: dict[str, tuple[float, dict[str, int]]] = {}
    while True:
        for silo in silos:
            record = runtime.membership.record(silo)
            if silo in statuses or record is None or record.last_seen <= since:
                continue
            calls = dict(record.status.worker_calls)
            previous = seen.get(silo)
            if record.status.active_invocations == 0 or (
                previous is not None and previous[0] < record.last_seen and previous[1] == calls
            ):
                statuses[silo] = calls
            elif previous is None or previous[0] < record.last_seen:
                seen[silo] = (record.last_seen, calls)
        missing = [s for s in silos if s not in statuses]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no settled status from silo(s) {', '.join(missing)} within {timeout:.0f} s"
            )
        await asyncio.sleep(0.05)
    stats = runtime.link.stats
    return WorkCounts(
        coordinator=dict(runtime.worker.client.calls),
        silos=statuses,
        messages=stats["request_messages"] + stats["reply_messages"],
    )
