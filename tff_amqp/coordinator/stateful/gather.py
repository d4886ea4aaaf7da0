"""Waiting for the silos of one invocation: a single reply (bounded by the
deadline, failing at once when the silo's heartbeats lapse) and an
aggregation phase's gather under the shared K-of-N rule (`coordinator/quorum`)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.core.impl.types import computation_types

from tff_amqp import protocol as p
from tff_amqp.coordinator.quorum import describe_min_silos, drop_reason, phase_cutoff
from tff_amqp.errors import (
    InvocationTimeoutError,
    QuorumError,
    SiloError,
    SiloUnreachableError,
)
from tff_amqp.inprocess import value_wire

if TYPE_CHECKING:
    from tff_amqp.coordinator.stateful.cohort import InvocationScope


class SiloGather:
    """Replies from the cohort: who is being waited for, each wait's bounds,
    and the straggler cut-off and quorum of a gather."""

    def __init__(self, scope: InvocationScope) -> None:
        self._scope = scope
        # Silos whose replies are being awaited right now (for deadline errors).
        self._awaiting: dict[str, int] = {}
        self._interrupted: set[str] = set()

    def waiting_on(self) -> list[str]:
        """Silos whose replies this invocation is waiting for (or was, when
        its wait was cancelled)."""
        waiting = {silo for silo, count in self._awaiting.items() if count > 0}
        return sorted(waiting | self._interrupted)

    def describe_wait(self) -> str:
        """Where the invocation stands, for an error raised at its deadline."""
        name = self._scope.invocation_id[:8]
        silos = self.waiting_on()
        if silos:
            names = ", ".join(repr(s) for s in silos)
            return (
                f"invocation {name} was waiting for silo(s) {names} "
                "(a request left unread in a silo's queue expires at the deadline and is "
                "dead-lettered back, never run late)"
            )
        if not self._scope.cohort.formed:
            return f"invocation {name} had not formed its cohort yet"
        return f"invocation {name} was working at the coordinator (no silo reply pending)"

    async def wait_for_silo(self, silo: str, future: asyncio.Future[p.Result]) -> p.Result:
        """Wait for a silo's reply, bounded by the deadline, failing at once if
        the silo's heartbeats lapse."""
        self._awaiting[silo] = self._awaiting.get(silo, 0) + 1
        try:
            return await self._wait_for_silo(silo, future)
        except asyncio.CancelledError:
            # Cancelled at the deadline: remember whom we were waiting for.
            self._interrupted.add(silo)
            raise
        finally:
            self._awaiting[silo] -= 1

    async def _wait_for_silo(self, silo: str, future: asyncio.Future[p.Result]) -> p.Result:
        membership = self._scope.runtime.membership
        while True:
            remaining = self._scope.clock.remaining()
            if remaining <= 0:
                raise InvocationTimeoutError(
                    f"invocation {self._scope.invocation_id[:8]} passed its deadline of "
                    f"{self._scope.clock.seconds:.1f} s waiting for silo {silo!r}"
                )
            done, _ = await asyncio.wait({future}, timeout=min(remaining, 0.5))
            if done:
                if future.cancelled() and silo in self._scope.cohort.dropped:
                    raise SiloError(
                        silo,
                        "dropped",
                        f"silo {silo!r} was dropped from invocation "
                        f"{self._scope.invocation_id[:8]}",
                    )
                return future.result()
            if not membership.is_live(silo):
                record = membership.record(silo)
                ago = time.monotonic() - record.last_seen if record else float("nan")
                raise SiloError(
                    silo,
                    "lost",
                    f"silo {silo!r} stopped sending heartbeats (last seen {ago:.1f} s ago) while "
                    f"invocation {self._scope.invocation_id[:8]} waited for it"
                    + membership.outage_note(),
                )

    async def gather(self, ids: dict[str, int]) -> dict[str, executor_pb2.Value]:
        """Ask every active silo to release its part of a CLIENTS value (ids:
        its id at each silo; aggregates, normally). K of N: once the phase's
        cut-off has passed (see `phase_cutoff`) and at least `min_silos`
        answered, proceed without the others; a silo whose heartbeats lapse is
        dropped at once if the quorum still holds. Dropped silos take no
        further part in this invocation."""
        options = self._scope.runtime.options
        events = self._scope.runtime.events
        cohort = self._scope.cohort
        silos = [s for s in ids if s not in cohort.dropped]
        tasks = {asyncio.ensure_future(self._release(s, ids[s])): s for s in silos}
        results: dict[str, executor_pb2.Value] = {}
        lost: dict[str, SiloError] = {}
        started = time.monotonic()
        quorum_at: float | None = None
        pending = set(tasks)
        events.gather_started(self._scope.invocation_id, silos)
        try:
            while pending:
                if quorum_at is None and len(results) >= cohort.quorum:
                    quorum_at = time.monotonic()
                cutoff = phase_cutoff(
                    started, quorum_at, options.straggler_timeout, options.quorum_grace
                )
                budget: float | None = None
                if cutoff is not None:
                    left = cutoff - time.monotonic()
                    if left <= 0 and len(results) >= cohort.quorum:
                        break
                    budget = left if left > 0 else None
                done, pending = await asyncio.wait(
                    pending, timeout=budget, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    silo, error = tasks[task], task.exception()
                    if error is None:
                        results[silo] = task.result()
                        events.silo_replied(self._scope.invocation_id, silo)
                    elif drop_reason(error) is not None:
                        lost[silo] = error  # type: ignore[assignment]
                    else:
                        raise error
                if len(results) + len(pending) < cohort.quorum:
                    # A queue that is gone is the specific, actionable cause.
                    for error in lost.values():
                        if isinstance(error, SiloUnreachableError):
                            raise error
                    raise QuorumError(
                        f"invocation {self._scope.invocation_id[:8]} lost its quorum: "
                        f"{len(results)} silo(s) answered, {len(pending)} still pending, "
                        f"{cohort.quorum} needed "
                        f"({describe_min_silos(options.min_silos)}; cohort of {cohort.size}); "
                        + "; ".join(str(e) for e in lost.values())
                    )
        finally:
            for task in pending:
                task.cancel()
        events.gather_finished(self._scope.invocation_id, list(results), time.monotonic() - started)
        stragglers = [s for s in silos if s not in results]
        # One drop per reason, so the invocation's report says why each went.
        by_reason: dict[str, list[str]] = {}
        for silo in stragglers:
            by_reason.setdefault(drop_reason(lost.get(silo)) or "lost", []).append(silo)
        for reason, group in by_reason.items():
            cohort.drop(group, reason=reason)
        return results

    async def _release(self, silo: str, value_id: int) -> executor_pb2.Value:
        outbox = await self._scope.cohort.outbox(silo)
        value = executor_pb2.Value()
        # memoryview: a large reassembled buffer is parsed without a copy.
        value.ParseFromString(memoryview(await outbox.compute(value_id)))
        return value

    async def release(
        self, ids: dict[str, int], type_spec: computation_types.FederatedType
    ) -> object:
        """Compute a CLIENTS value at the coordinator: each silo must agree to
        release it (by default, silos refuse raw client values)."""
        parts = await self.gather(ids)
        members: list[object] = []
        for silo in ids:
            if silo not in parts:
                continue
            result = value_wire.deserialize(parts[silo], type_spec)
            if type_spec.all_equal:
                return result
            members.extend(result)  # type: ignore[arg-type]
        return members
