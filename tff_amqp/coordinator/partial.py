"""Partial results, one rule for both regimes: a result computed after silos
were dropped (K of N) is never silent. It comes with a `PartialResultWarning`
naming the dropped silos and why, or, with `strict=True`, is refused with a
`PartialResultError`. The report of the last invocation stays on the context
(`last_invocation`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from tff_amqp.errors import PartialResultError, PartialResultWarning


@dataclass(frozen=True)
class InvocationReport:
    """Who took part in one invocation (stateful) or round (MapReduce)."""

    invocation_id: str
    # The silos chosen for it, in cohort order.
    cohort: list[str]
    # The cohort's silos that were not dropped: the result covers these.
    took_part: list[str]
    # Each dropped silo and why: "straggler", "lost", "restarted", "unreachable".
    dropped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def partial(self) -> bool:
        return bool(self.dropped)


def check_partial(report: InvocationReport | None, *, strict: bool, stacklevel: int = 2) -> None:
    """Raise (strict) or warn about a partial result; nothing when complete.
    Called in the caller's thread so `warnings` filters and `pytest.warns`
    see it."""
    if report is None or not report.dropped:
        return
    if strict:
        raise PartialResultError(report.invocation_id, report.dropped, report.took_part)
    warnings.warn(
        PartialResultWarning(report.invocation_id, report.dropped, report.took_part),
        stacklevel=stacklevel + 1,
    )
