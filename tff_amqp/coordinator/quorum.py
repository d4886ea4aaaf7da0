"""The K-of-N rule, one for both regimes: when an aggregation phase (or a
MapReduce round) stops waiting for the silos that have not answered."""

from __future__ import annotations

from tff_amqp.errors import SiloError, SiloRestartedError, SiloUnreachableError


def cohort_floor(min_silos: int | None) -> int:
    """How many live silos the cohort barrier waits for."""
    return 1 if min_silos is None else min_silos


def quorum_of(min_silos: int | None, cohort_size: int) -> int:
    """How many of a cohort of `cohort_size` silos must answer each phase.

    `min_silos` unset (the default) requires every silo of the cohort: a
    silo that dies or straggles fails the invocation naming it, and nothing
    is ever dropped. Setting `min_silos=K` opts in to K of N: the others may
    be dropped (with a PartialResultWarning). With fewer silos than K in the
    cohort (fewer clients than silos), every one of them is needed."""
    return cohort_size if min_silos is None else min(min_silos, cohort_size)


def describe_min_silos(min_silos: int | None) -> str:
    """`min_silos` as error messages show it."""
    if min_silos is None:
        return "min_silos unset: every cohort silo is required; set min_silos=K for K of N"
    return f"min_silos={min_silos}"


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


def drop_reason(error: BaseException | None) -> str | None:
    """Why a silo may be dropped (K of N) after `error` from it, or None when
    the error fails the whole invocation instead.

    A silo that died, restarted, or has no queue any more (the broker returned
    the request) is a failed silo, like a straggler: the others go on while
    they make the quorum. A silo that refused or failed an operation is not:
    it would fail the same way at every silo, so it fails the invocation.
    None for `error` means the silo did not answer in time."""
    if error is None:
        return "straggler"
    if isinstance(error, SiloUnreachableError):
        return "unreachable"
    if isinstance(error, SiloRestartedError):
        return "restarted"
    if isinstance(error, SiloError) and error.code in ("lost", "dropped"):
        return "lost"
    return None
