"""Liveness across the coordinator's own connection loss (no broker needed):
a silo that was live when our connection dropped is not blamed for the
silence, neither while the connection is down nor for one liveness timeout
after it is back; a silo that was already silent before is not revived."""

from __future__ import annotations

import asyncio
import time

from tff_amqp import protocol as p
from tff_amqp.coordinator.membership import Membership

TIMEOUT = 5.0


def _heard(membership: Membership, silo: str, at: float) -> None:
    status = p.SiloStatus(silo=silo, clients=1, started_at=1.0)
    asyncio.run(membership.observe(p.Kind.HEARTBEAT, status, "guest"))
    record = membership.record(silo)
    assert record is not None
    record.last_seen = at


def test_silos_live_at_the_outage_stay_live_through_it_and_one_timeout_after() -> None:
    m = Membership(liveness_timeout=TIMEOUT)
    t0 = time.monotonic()
    _heard(m, "north", t0)  # live when the connection drops
    _heard(m, "south", t0 - 3 * TIMEOUT)  # already silent before it
    m.coordinator_disconnected(now=t0 + 1)
    # A long outage: north's heartbeats cannot reach us, it stays live.
    assert m.is_live("north", now=t0 + 60)
    assert not m.is_live("south", now=t0 + 60)
    assert m.coordinator_outage(now=t0 + 60) == 59
    assert "has been down for 59.0 s" in m.outage_note(now=t0 + 60)
    m.coordinator_reconnected(now=t0 + 60)
    # Errors about silos name the coordinator's own outage for a minute.
    assert "lost its broker connection for 59.0 s, 10.0 s ago" in m.outage_note(now=t0 + 70)
    assert m.outage_note(now=t0 + 121) == ""
    # One liveness timeout of grace for the next heartbeat to arrive ...
    assert m.is_live("north", now=t0 + 60 + TIMEOUT - 0.1)
    assert m.coordinator_outage(now=t0 + 62) == 59
    # ... then only heartbeats count again.
    assert not m.is_live("north", now=t0 + 60 + TIMEOUT + 0.1)
    assert m.coordinator_outage(now=t0 + 60 + TIMEOUT + 0.1) is None
    _heard(m, "north", t0 + 61)
    assert m.is_live("north", now=t0 + 61 + TIMEOUT - 0.1)


def test_without_an_outage_liveness_is_the_heartbeat_age() -> None:
    m = Membership(liveness_timeout=TIMEOUT)
    t0 = time.monotonic()
    _heard(m, "north", t0)
    assert m.is_live("north", now=t0 + TIMEOUT - 0.1)
    assert not m.is_live("north", now=t0 + TIMEOUT + 0.1)
    assert m.coordinator_outage(now=t0) is None
    assert m.outage_note(now=t0) == ""
