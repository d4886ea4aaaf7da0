"""Silo liveness from a pool of workers: a silo is live while any of its
workers is (each worker sends the silo's hello / heartbeat / goodbye with its
own `started_at`, which tells workers of one silo apart)."""

from __future__ import annotations

import time

from tff_amqp import protocol as p
from tff_amqp.coordinator.membership import Membership, SiloRecord


class PoolMembership(Membership):
    """`Membership` whose silos are pools: one worker's goodbye only removes
    that worker, and the silo's last_seen is its freshest worker's."""

    def __init__(self, liveness_timeout: float = 5.0) -> None:
        super().__init__(liveness_timeout)
        # silo -> worker (its started_at) -> last time heard from
        self._workers: dict[str, dict[float, float]] = {}

    async def observe(
        self, kind: p.Kind, status: p.SiloStatus, user_id: str | None, instance: str = ""
    ) -> None:
        # A pool's workers are many processes (instances) of one silo by
        # design, and any may answer a work item: instances are not pinned.
        now = time.monotonic()
        workers = self._workers.setdefault(status.silo, {})
        if kind is p.Kind.GOODBYE:
            workers.pop(status.started_at, None)
        else:
            workers[status.started_at] = now
        # Forget workers silent for long (crashed without a goodbye).
        for started_at, seen in list(workers.items()):
            if now - seen > 10 * self.liveness_timeout:
                del workers[started_at]
        if not workers:
            self._workers.pop(status.silo, None)
            self._silos.pop(status.silo, None)
        else:
            record = self._silos.get(status.silo)
            if record is None:
                record = SiloRecord(status.silo, status, user_id, now, now)
                self._silos[status.silo] = record
            record.status = status
            record.user_id = user_id
            record.last_seen = max(workers.values())
        async with self._changed:
            self._changed.notify_all()

    def pool_workers(self, silo: str) -> int:
        """Workers of `silo` heard from within the liveness timeout."""
        now = time.monotonic()
        return sum(
            1
            for seen in self._workers.get(silo, {}).values()
            if now - seen <= self.liveness_timeout
        )
