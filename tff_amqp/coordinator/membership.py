"""Which silos are alive, from their hello / heartbeat / goodbye messages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from tff_amqp import protocol as p
from tff_amqp.errors import CohortError, MissingColumnError


@dataclass
class SiloRecord:
    """What the coordinator knows about one silo."""

    name: str
    status: p.SiloStatus
    user_id: str | None
    first_seen: float
    last_seen: float
    # The process behind the silo (its instance id; "" if it sends none).
    instance: str = ""


# How long after the coordinator's own outage errors about silos mention it.
OUTAGE_NOTE_SECONDS = 60.0


class Membership:
    """Live silos, with liveness from heartbeats.

    A silo is live while its last message is younger than `liveness_timeout`.
    The coordinator's own connection loss is no evidence against any silo:
    a silo that was live when the connection went down stays live while it
    is down and for one `liveness_timeout` after it is back (time for its
    next heartbeat to arrive); only a silo that stays silent past that is lost.
    """

    def __init__(self, liveness_timeout: float = 5.0) -> None:
        self.liveness_timeout = liveness_timeout
        self._silos: dict[str, SiloRecord] = {}
        self._changed = asyncio.Condition()
        # The coordinator's broker connection: down since (monotonic), or the
        # last outage as (went down, came back).
        self._down_since: float | None = None
        self._last_outage: tuple[float, float] | None = None
        # The last instance heard from per silo (kept past a goodbye, so a
        # process that replaces it is noticed), and who wants to know when
        # it changes: (silo, old instance, new instance).
        self._instances: dict[str, str] = {}
        self.instance_listeners: list[Callable[[str, str, str], None]] = []

    async def observe(
        self, kind: p.Kind, status: p.SiloStatus, user_id: str | None, instance: str = ""
    ) -> None:
        now = time.monotonic()
        record = self._silos.get(status.silo)
        if kind is p.Kind.GOODBYE:
            # Only the process that holds the name may take it away.
            if record is not None and (not instance or record.instance in ("", instance)):
                self._silos.pop(status.silo, None)
        else:
            previous = self._instances.get(status.silo, "")
            if instance:
                self._instances[status.silo] = instance
            if (
                record is None
                or record.status.started_at != status.started_at
                or record.instance != instance
            ):
                record = SiloRecord(status.silo, status, user_id, now, now, instance)
                self._silos[status.silo] = record
            record.status = status
            record.user_id = user_id
            record.last_seen = now
            if instance and previous and previous != instance:
                # A new process serves the silo: what the old one owed is lost.
                for listener in self.instance_listeners:
                    listener(status.silo, previous, instance)
        async with self._changed:
            self._changed.notify_all()

    def instance_of(self, silo: str) -> str:
        """The instance id of the process serving `silo` ("" if unknown)."""
        record = self._silos.get(silo)
        return record.instance if record is not None else ""

    def coordinator_disconnected(self, now: float | None = None) -> None:
        """Our broker connection is down: heartbeats cannot reach us."""
        if self._down_since is None:
            self._down_since = time.monotonic() if now is None else now

    def coordinator_reconnected(self, now: float | None = None) -> None:
        """Our broker connection is back (silos get one liveness timeout of grace)."""
        now = time.monotonic() if now is None else now
        self._last_outage = (self._down_since if self._down_since is not None else now, now)
        self._down_since = None

    def coordinator_outage(self, now: float | None = None) -> float | None:
        """Seconds the coordinator's connection has been down (or was, in an
        outage that ended within the last liveness timeout); None if neither."""
        now = time.monotonic() if now is None else now
        if self._down_since is not None:
            return now - self._down_since
        if self._last_outage is not None and now - self._last_outage[1] <= self.liveness_timeout:
            return self._last_outage[1] - self._last_outage[0]
        return None

    def outage_note(self, now: float | None = None) -> str:
        """For error messages about silos: the coordinator's own recent
        broker outage, which may be the real cause ("" if none in the last
        minute)."""
        now = time.monotonic() if now is None else now
        if self._down_since is not None:
            return (
                f"; note: the coordinator's own broker connection has been down for "
                f"{now - self._down_since:.1f} s"
            )
        if self._last_outage is not None and now - self._last_outage[1] <= OUTAGE_NOTE_SECONDS:
            went_down, came_back = self._last_outage
            return (
                f"; note: the coordinator lost its broker connection for "
                f"{came_back - went_down:.1f} s, {now - came_back:.1f} s ago"
            )
        return ""

    def _excused(self, record: SiloRecord, now: float) -> bool:
        """A silence the coordinator's own outage explains."""
        if self._down_since is not None:
            went_down = self._down_since
        elif self._last_outage is not None and now - self._last_outage[1] <= self.liveness_timeout:
            went_down = self._last_outage[0]
        else:
            return False
        return went_down - record.last_seen <= self.liveness_timeout

    def reply_user_problem(self, silo: str, user_id: str | None) -> str | None:
        """Why a reply from `silo` with `user_id` must not be used, or None.
        Both regimes' coordinators apply this one rule.

        The broker validates `user_id` only when it is set, so a reply must
        carry one, and it must be the user the silo said hello with. That
        binding is trustworthy because only the silo's own user may publish
        with routing key ``reply.<silo>`` (topic permission, docs/security.md);
        in guest-mode development every silo is ``guest`` and this holds
        trivially."""
        if not user_id:
            return "reply has no user_id (the broker validates user_id only when it is set)"
        record = self._silos.get(silo)
        if record is None or not record.user_id:
            return f"silo {silo!r} has not said hello with a validated user_id"
        if record.user_id != user_id:
            return f"user_id {user_id!r} is not silo {silo!r}'s broker user {record.user_id!r}"
        return None

    def record(self, silo: str) -> SiloRecord | None:
        return self._silos.get(silo)

    def check_columns(self, silos: list[str], key: str, columns: list[str]) -> None:
        """Raise MissingColumnError if a silo advertised the columns of data
        `key` and lacks one of `columns` (silos that advertised nothing for
        the key, e.g. with no clients, are not judged)."""
        lacking: dict[str, list[str]] = {}
        has: dict[str, list[str]] = {}
        for silo in silos:
            record = self._silos.get(silo)
            schema = record.status.schema(key) if record is not None else None
            if schema is None:
                continue
            names = schema.names()
            missing = [c for c in columns if c not in names]
            if missing:
                lacking[silo] = missing
                has[silo] = names
        if lacking:
            raise MissingColumnError(key, lacking, has)

    def is_live(self, silo: str, now: float | None = None) -> bool:
        record = self._silos.get(silo)
        now = time.monotonic() if now is None else now
        return record is not None and self._is_live(record, now)

    def _is_live(self, record: SiloRecord, now: float) -> bool:
        return now - record.last_seen <= self.liveness_timeout or self._excused(record, now)

    def live(self) -> list[SiloRecord]:
        now = time.monotonic()
        return sorted(
            (r for r in self._silos.values() if self._is_live(r, now)),
            key=lambda r: r.name,
        )

    async def wait_for_cohort(
        self, min_silos: int, max_silos: int | None, timeout: float
    ) -> list[str]:
        """Wait (at most `timeout` s) until `min_silos` are live; return up to
        `max_silos` of them (sorted by name, so cohorts are reproducible)."""
        deadline = time.monotonic() + timeout
        async with self._changed:
            while True:
                live = self.live()
                if len(live) >= min_silos:
                    chosen = live if max_silos is None else live[:max_silos]
                    return [r.name for r in chosen]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = ", ".join(r.name for r in live) or "none"
                    raise CohortError(
                        f"cohort did not form within {timeout:.1f} s: {len(live)} live silo(s) "
                        f"({names}) but min_silos={min_silos}. Start more silos "
                        "(`tff-amqp silo ...`), check they use the same --federation, or lower "
                        "min_silos." + self.outage_note()
                    )
                # Wake on every change, and at least every second so silos
                # whose heartbeats lapse drop out of the count.
                try:
                    await asyncio.wait_for(self._changed.wait(), min(remaining, 1.0))
                except TimeoutError:
                    pass
