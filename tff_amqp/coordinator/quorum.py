"""The K-of-N rule, one for both regimes: when an aggregation phase (or a
MapReduce round) stops waiting for the silos that have not answered."""

from __future__ import annotations


def phase_cutoff(
    started: float,
    quorum_at: float | None,
    straggler_timeout: float | None,
    quorum_grace: float | None,
) -> float | None:
    """When an aggregation phase that began at `started` stops waiting for the
    silos that have not answered, provided it has its quorum (monotonic time;
    None: wait for every silo, bounded by the deadline). The earlier of the
    straggler timeout and, once the quorum answered at `quorum_at`, the grace."""
    candidates = []
    if straggler_timeout is not None:
        candidates.append(started + straggler_timeout)
    if quorum_grace is not None and quorum_at is not None:
        candidates.append(quorum_at + quorum_grace)
    return min(candidates) if candidates else None
