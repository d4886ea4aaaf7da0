"""One MapReduce round over silo worker pools.

    prepare (coordinator) -> one work item per client shard of each cohort silo
    -> workers: work + accumulate over the shard's clients
    -> coordinator: merge (silo-name, shard order) -> report -> update

This mirrors TFF's `get_computation_for_map_reduce_form`: `federated_aggregate`
with `zero`/`accumulate` over clients and `merge` across partial
accumulators, `report` once, then `update(state, <report, <>, <>, <>>)`
(forms with secure sums are refused before a round starts).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from tensorflow_federated.proto.v0 import executor_pb2

from tff_amqp import protocol as p
from tff_amqp.coordinator.bulk import CoordinatorBulk
from tff_amqp.coordinator.mapreduce.link import WorkLink
from tff_amqp.coordinator.mapreduce.membership import PoolMembership
from tff_amqp.coordinator.quorum import cohort_floor, drop_reason, phase_cutoff, quorum_of
from tff_amqp.errors import CohortError, InvocationTimeoutError
from tff_amqp.observe.events import InvocationEvents
from tff_amqp.tff_worker import WorkerExecutor

log = logging.getLogger(__name__)

# A work item tells workers to read the broadcast stream from this many
# seconds before the coordinator started publishing: stream offsets by time
# use the broker's clock, which may lag ours a little. Reading earlier only
# costs skipping older chunks.
BROADCAST_LOOKBACK = 5.0


@dataclass(frozen=True)
class FormWire:
    """The MapReduceForm's computations as (serialized Value bytes, Value),
    built once per form, and the parameter names calls must carry."""

    prepare: tuple[bytes, executor_pb2.Value]
    work: tuple[bytes, executor_pb2.Value]
    zero: tuple[bytes, executor_pb2.Value]
    accumulate: tuple[bytes, executor_pb2.Value]
    merge: tuple[bytes, executor_pb2.Value]
    report: tuple[bytes, executor_pb2.Value]
    update: tuple[bytes, executor_pb2.Value]
    merge_names: tuple[str | None, ...]
    update_names: tuple[str | None, ...]
    update_result_names: tuple[str | None, ...]


@dataclass
class RoundReport:
    """What happened in a round (kept on the context as `last_round`)."""

    round_id: str
    cohort: list[str]
    items: int = 0
    merged_items: int = 0
    dropped_silos: list[str] = field(default_factory=list)
    # Why each dropped silo was dropped ("straggler", "lost", "unreachable").
    drop_reasons: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    # A broadcast above the inline limit is published once per round into the
    # cohort's streams: transfers (0 or 1), the value's bytes, and the chunk
    # message bytes published (once, whatever the silos and shards).
    broadcast_transfers: int = 0
    broadcast_bytes: int = 0
    broadcast_chunk_bytes: int = 0
    # Shard accumulators that came back as chunked transfers.
    chunked_results: int = 0


@dataclass(frozen=True)
class RoundSettings:
    min_silos: int | None
    max_silos: int | None
    cohort_timeout: float
    straggler_timeout: float | None
    quorum_grace: float | None
    shards_per_silo: int
    sender: str


class MapReduceRound:
    """Drives one round; `run()` returns the serialized `update` result."""

    def __init__(
        self,
        *,
        link: WorkLink,
        bulk: CoordinatorBulk,
        membership: PoolMembership,
        executor: WorkerExecutor,
        form: FormWire,
        settings: RoundSettings,
        deadline: float,
        events: InvocationEvents | None = None,
    ) -> None:
        self._link = link
        self._bulk = bulk
        self._membership = membership
        self._executor = executor
        self._form = form
        self._settings = settings
        self._deadline = deadline  # epoch seconds
        self._created: list[executor_pb2.ValueRef] = []
        self.report = RoundReport(round_id=uuid.uuid4().hex, cohort=[])
        # A round reports as an invocation does (progress display, metrics).
        self._events = events if events is not None else InvocationEvents()

    async def run(
        self, state: executor_pb2.Value, data_key: str, columns: Sequence[str] = ()
    ) -> executor_pb2.Value:
        started = time.monotonic()
        settings = self._settings
        round_id = self.report.round_id
        self._events.invocation_started(round_id)
        ok = False
        try:
            try:
                cohort = await self._membership.wait_for_cohort(
                    cohort_floor(settings.min_silos), settings.max_silos, settings.cohort_timeout
                )
            except CohortError as e:
                raise CohortError(
                    f"{e} In the stateless regime a silo is live while one of its workers is: "
                    "start them with `tff-amqp worker --stateless --silo NAME ...`."
                ) from e
            self.report.cohort = cohort
            self._events.cohort_chosen(round_id, cohort, time.monotonic() - started)
            # Before any work item: a column a pool's silo lacks is refused here.
            if columns:
                self._membership.check_columns(cohort, data_key, list(columns))
            state_ref = await self._value(state)
            broadcast_ref = await self._call(self._form.prepare, state_ref)
            broadcast = await self._executor.compute(broadcast_ref)
            items = await self._publish(cohort, data_key, broadcast.SerializeToString())
            results = await self._collect(cohort, items)
            aggregate = await self._merge_and_report(results)
            empty = await self._track(self._executor.create_struct([]))
            names = self._form.update_result_names
            update_arg = await self._track(
                self._executor.create_struct(
                    [
                        (self._form.update_names[0], state_ref),
                        (
                            self._form.update_names[1],
                            await self._track(
                                self._executor.create_struct(
                                    [(names[0], aggregate)] + [(n, empty) for n in names[1:]]
                                )
                            ),
                        ),
                    ]
                )
            )
            result = await self._call(self._form.update, update_arg)
            computed = await self._executor.compute(result)
            ok = True
            return computed
        finally:
            self.report.seconds = time.monotonic() - started
            # Chunks of results never taken (dropped silos, duplicates) go.
            self._bulk.forget_invocation(round_id)
            self._events.invocation_finished(round_id, ok, self.report.seconds)
            refs, self._created = self._created, []
            try:
                await self._executor.dispose(refs)
            except Exception:
                log.debug("mapreduce.dispose_failed", exc_info=True)

    # ------------------------------------------------------------ work items

    async def _publish(
        self, cohort: list[str], data_key: str, broadcast: bytes
    ) -> dict[str, dict[int, tuple[str, asyncio.Future[p.WorkResult]]]]:
        """Publish every shard of every cohort silo; silo -> shard -> (item id, future).
        A broadcast above the inline limit goes once into the cohort's streams
        and the items only name it; a small one rides inline in each item."""
        form, shards = self._form, self._settings.shards_per_silo
        blob, since = await self._publish_broadcast(cohort, broadcast)
        if blob is not None:
            broadcast = b""
        items: dict[str, dict[int, tuple[str, asyncio.Future[p.WorkResult]]]] = {}
        for silo in cohort:
            await self._link.ensure_work_queue(silo)
            items[silo] = {}
            for shard in range(shards):
                item_id = uuid.uuid4().hex
                envelope = p.Envelope(
                    kind=p.Kind.WORK,
                    body=p.WorkItem(
                        data_key=data_key,
                        shard=shard,
                        shards=shards,
                        work=form.work[0],
                        zero=form.zero[0],
                        accumulate=form.accumulate[0],
                        broadcast=broadcast,
                        broadcast_blob=blob,
                        broadcast_since=since,
                    ),
                    sender=self._settings.sender,
                    invocation_id=self.report.round_id,
                    correlation_id=item_id,
                    deadline=self._deadline,
                )
                # A large accumulator's chunks may come for this item, from
                # this silo only (registered before the item can run).
                self._bulk.expect(item_id, silo, self.report.round_id)
                items[silo][shard] = (item_id, await self._link.publish(silo, envelope))
                self.report.items += 1
        return items

    async def _publish_broadcast(
        self, cohort: list[str], broadcast: bytes
    ) -> tuple[p.BlobRef | None, float]:
        """(blob, read-from time) of a broadcast published into the streams,
        or (None, 0) for one small enough to ride inline."""
        if len(broadcast) <= self._bulk.inline_limit:
            return None, 0.0
        for silo in cohort:
            await self._link.ensure_broadcast_stream(silo)
        since = time.time() - BROADCAST_LOOKBACK
        sent_before = self._bulk.sent_bytes
        blob = await self._bulk.send(
            broadcast,
            cohort,
            invocation_id=self.report.round_id,
            deadline=self._deadline,
            streams=True,
        )
        self.report.broadcast_transfers += 1
        self.report.broadcast_bytes += blob.size
        self.report.broadcast_chunk_bytes += self._bulk.sent_bytes - sent_before
        return blob, since

    async def _collect(
        self,
        cohort: list[str],
        items: dict[str, dict[int, tuple[str, asyncio.Future[p.WorkResult]]]],
    ) -> list[p.WorkResult]:
        """Wait for the shards of each silo. A silo whose workers all went
        silent, or that is still working at the phase's cut-off (the K-of-N
        rule both regimes share: straggler_timeout, or quorum_grace after
        min_silos completed), or whose queue is gone (unreachable), is
        dropped for the round as a whole when the others still make
        min_silos; any other item error fails the round (it would fail on
        every worker)."""
        settings = self._settings
        quorum = quorum_of(settings.min_silos, len(cohort))
        started = time.monotonic()
        quorum_at: float | None = None
        active = list(cohort)
        round_id = self.report.round_id
        self._events.gather_started(round_id, cohort)
        reported: set[str] = set()
        try:
            while True:
                failed = self._failed_silos(active, items)
                if failed:
                    if len(active) - len(failed) < quorum:
                        raise next(iter(failed.values()))
                    for silo, error in failed.items():
                        self._drop([silo], items, drop_reason(error) or "lost")
                    active = [s for s in active if s not in failed]
                    continue
                complete = [s for s in active if all(f.done() for _, f in items[s].values())]
                for silo in complete:
                    if silo not in reported:
                        reported.add(silo)
                        self._events.silo_replied(round_id, silo)
                if len(complete) == len(active):
                    break
                now = time.monotonic()
                if quorum_at is None and len(complete) >= quorum:
                    quorum_at = now
                incomplete = [s for s in active if s not in complete]
                silent = [s for s in incomplete if not self._membership.is_live(s)]
                cutoff = phase_cutoff(
                    started, quorum_at, settings.straggler_timeout, settings.quorum_grace
                )
                straggling = cutoff is not None and now >= cutoff
                drop = incomplete if straggling else silent
                if drop and len(active) - len(drop) >= quorum:
                    self._drop(drop, items, "straggler" if straggling else "lost")
                    active = [s for s in active if s not in drop]
                    continue
                if time.time() > self._deadline:
                    raise InvocationTimeoutError(
                        f"round did not finish before its deadline: silo(s) "
                        f"{', '.join(incomplete)} still had work items pending (live workers: "
                        + ", ".join(f"{s}={self._membership.pool_workers(s)}" for s in incomplete)
                        + "). Start workers (`tff-amqp worker --stateless`), raise `deadline=`, "
                        "or set straggler_timeout to drop slow silos"
                    )
                pending = [f for s in incomplete for _, f in items[s].values() if not f.done()]
                await asyncio.wait(pending, timeout=0.25, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for silo_items in items.values():
                for item_id, future in silo_items.values():
                    if not future.done():
                        self._link.finish(item_id)
                    elif not future.cancelled():
                        future.exception()  # retrieved: reported above if it mattered
        self._events.gather_finished(round_id, list(active), time.monotonic() - started)
        results = []
        for silo in active:
            for shard in sorted(items[silo]):
                results.append(await self._inline(silo, items[silo][shard][1].result()))
        self.report.merged_items = sum(1 for r in results if r.clients)
        return results

    async def _inline(self, silo: str, result: p.WorkResult) -> p.WorkResult:
        """The result with its accumulator inline: a chunked one is taken from
        the bulk connection (its chunks went before the reply)."""
        if result.blob is None:
            return result
        data = await self._bulk.receive(
            silo,
            result.blob,
            invocation_id=self.report.round_id,
            timeout=self._deadline - time.time(),
        )
        self.report.chunked_results += 1
        return p.WorkResult(result.shard, result.clients, bytes(data))

    @staticmethod
    def _failed_silos(
        active: list[str], items: dict[str, dict[int, tuple[str, asyncio.Future[p.WorkResult]]]]
    ) -> dict[str, BaseException]:
        """Silos with a failed item that K of N may drop (unreachable: the
        broker returned the item); any other item error fails the round (it
        would fail on every worker)."""
        failed: dict[str, BaseException] = {}
        for silo in active:
            for _, future in items[silo].values():
                if future.done() and not future.cancelled() and future.exception() is not None:
                    error = future.exception()
                    if drop_reason(error) is None:
                        raise error  # type: ignore[misc]
                    failed.setdefault(silo, error)  # type: ignore[arg-type]
        return failed

    def _drop(self, silos: list[str], items: dict, reason: str) -> None:
        """Drop `silos` from the round; `reason` as the report gives it
        ("straggler", "lost", "unreachable")."""
        self._events.silos_dropped(self.report.round_id, silos, reason)
        for silo in silos:
            self.report.dropped_silos.append(silo)
            self.report.drop_reasons[silo] = reason
            log.warning("mapreduce.silo_dropped", extra={"silo": silo, "reason": reason})
            for item_id, _ in items[silo].values():
                self._link.finish(item_id, dropped=True)

    async def _merge_and_report(self, results: list[p.WorkResult]) -> executor_pb2.ValueRef:
        """Fold the shard accumulators with `merge` (cohort order, shard
        order), then apply `report`. Empty shards carry zero() and are
        skipped; if every shard is empty, zero() is reported."""
        accumulators = [r for r in results if r.clients] or results[:1]
        if not accumulators:
            raise CohortError("no silo answered the round")
        merged = await self._value(executor_pb2.Value.FromString(accumulators[0].accumulator))
        for result in accumulators[1:]:
            other = await self._value(executor_pb2.Value.FromString(result.accumulator))
            names = self._form.merge_names
            pair = await self._track(
                self._executor.create_struct([(names[0], merged), (names[1], other)])
            )
            merged = await self._call(self._form.merge, pair)
        return await self._call(self._form.report, merged)

    # --------------------------------------------------------------- helpers

    async def _track(self, awaitable: object) -> executor_pb2.ValueRef:
        ref = await awaitable  # type: ignore[misc]
        self._created.append(ref)
        return ref

    async def _value(self, value: executor_pb2.Value) -> executor_pb2.ValueRef:
        return await self._track(self._executor.create_value(value))

    async def _call(
        self, function: tuple[bytes, executor_pb2.Value], arg: executor_pb2.ValueRef
    ) -> executor_pb2.ValueRef:
        ref, cached = await self._executor.create_computation(*function)
        if not cached:
            self._created.append(ref)
        return await self._track(self._executor.create_call(ref, arg))
