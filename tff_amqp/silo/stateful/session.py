"""State of one invocation at a silo, and the silo's privacy boundary.

The coordinator names every value with an integer id; the session maps those
ids to references inside the silo's local ``worker_binary`` and applies batch
operations in order. It also decides what may leave the silo: only values
produced by federated aggregation intrinsics (and values the coordinator sent
itself), unless the silo was started with ``--allow-raw-client-values``.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tff_amqp import protocol as p
from tff_amqp.silo.endpoint import ServingError
from tff_amqp.silo.stateful.fusion import PlanFuser, SharedValues
from tff_amqp.tff_worker import WorkerClient, WorkerError, WorkerExecutor
from tff_amqp.tff_worker.client import serialized_is_computation, struct_members, struct_value
from tff_amqp.tff_worker.plan import (
    PLANNED_OPERATIONS,
    PlanCache,
    PlannedBatch,
    call_plan,
    parse_value,
    resolver,
)
from tff_amqp.transport.bulk import TransferError

log = logging.getLogger(__name__)

# Intrinsics whose SERVER-placed output is an aggregate over the silo's
# clients: the only client-derived values a silo releases by default.
AGGREGATION_URIS = frozenset(
    {
        "federated_aggregate",
        "federated_sum",
        "federated_mean",
        "federated_weighted_mean",
        "federated_min",
        "federated_max",
        "federated_secure_sum",
        "federated_secure_sum_bitwidth",
    }
)


# Released values up to this size are copied into plain bytes.
_INLINE_COPY = 1024 * 1024

# Batches run as phase plans (one worker call for the whole batch) unless
# this is "0": then op by op, as a dependency graph (for comparison and
# debugging; both give the same results).
PHASE_PLANS_ENV = "TFF_AMQP_PHASE_PLANS"

# Plans are shared by every session of the process (they depend only on the
# shape of a batch); the worker embeds each once per pinned executor.
_PLANS = PlanCache(in_process=True)
# The same plan of concurrent invocations runs in one worker call.
_FUSER = PlanFuser()


# Phase plans of element-wise arithmetic over the silo's clients are
# evaluated in the silo's own process, without the worker
# (inprocess/plans.py), unless this is "0".
IN_PROCESS_PLANS_ENV = "TFF_AMQP_IN_PROCESS_PLANS"
# ...when the batch's argument values are at most this many bytes in all.
IN_PROCESS_MAX_BYTES = 1024 * 1024


def phase_plans_enabled() -> bool:
    return os.environ.get(PHASE_PLANS_ENV, "1") != "0"


def in_process_plans_enabled() -> bool:
    return os.environ.get(IN_PROCESS_PLANS_ENV, "1") != "0"


@dataclass
class _PlanCall:
    """A worker value whose members are values of the session: a plan's
    result (every value its batch created) or a batch's argument values
    sent as one struct. Holds the handle, the worker values it owns, and the
    value ids still living in it."""

    key: int
    live: set[int]
    owned: list[object] = field(default_factory=list)
    result: asyncio.Future[object] | None = None
    # Makes `result` when it is first needed (its worker call not started
    # yet, or a member of a fused call's result, selected on demand).
    lazy: Callable[[], Awaitable[object]] | None = None
    # Its members as host values, when they were read or computed in this
    # process (a plan evaluated without the worker, its argument values).
    host: list[Any] | None = None

    def handle(self) -> asyncio.Future[object]:
        if self.result is None:
            if self.lazy is None:
                raise AssertionError("a plan call was used before it ran")
            self.result = asyncio.ensure_future(self.lazy())
            self.result.add_done_callback(_retrieve)
        return self.result


_PLAN_KEYS = itertools.count()


class SessionError(ServingError):
    """An operation failed; carries the protocol error code for the reply
    and the gRPC status of the worker_binary error behind it, if any."""

    @classmethod
    def from_worker(cls, error: WorkerError, message: str) -> SessionError:
        return cls(p.ErrorCode.EXECUTION, message, worker_status=error.status)


@dataclass(frozen=True)
class PrivacyPolicy:
    """What the silo lets leave it."""

    allow_raw_client_values: bool = False
    min_clients_per_aggregate: int = 1


# Resolves (data key, serialized CLIENTS type) to (client count, serialized Value).
DataResolver = Callable[[str, bytes], tuple[int, bytes]]
# Client count of the silo's data under a key (for Open(data_key=...)).
ClientCounter = Callable[[str | None], int]
# Waits (bounded by the invocation's deadline) for a chunked value to arrive.
BlobFetcher = Callable[[p.BlobRef], Awaitable[bytearray]]


class InvocationSession:
    """Per-invocation handles and provenance at one silo.

    A batch runs as a phase plan (see plan.py): its value-creating operations
    become one computation, called with one worker call; each value it
    created is a member of that call's result, selected only when needed (to
    release it, or by an operation that is not part of a plan). A batch a plan
    cannot express (one that disposes of values midway, or has nothing to
    fuse) is applied as a dataflow graph instead: every operation starts as
    soon as the values it uses exist, so it costs its dependency depth in
    worker round trips. Provenance (what may be released) is decided from the
    operations themselves, before anything runs, either way.
    """

    def __init__(
        self,
        *,
        silo: str,
        invocation_id: str,
        worker: WorkerClient,
        policy: PrivacyPolicy,
        resolve_data: DataResolver,
        count_clients: ClientCounter,
        deadline: float,
        fetch_blob: BlobFetcher | None = None,
        phase_plans: bool | None = None,
        in_process_plans: bool | None = None,
    ) -> None:
        self.silo = silo
        self.invocation_id = invocation_id
        self.deadline = deadline
        self._worker = worker
        self._policy = policy
        self._resolve_data = resolve_data
        self._count_clients = count_clients
        self._fetch_blob = fetch_blob
        self._phase_plans = phase_plans_enabled() if phase_plans is None else phase_plans
        self._in_process = (
            in_process_plans_enabled() if in_process_plans is None else in_process_plans
        )
        self._executor: WorkerExecutor | None = None
        self._clients: int | None = None
        self._refs: dict[int, asyncio.Future[object]] = {}
        # functions (CreateValue of a computation) by id: (digest, serialized);
        # embedded at the worker only when an operation outside a plan uses one
        self._functions: dict[int, tuple[bytes, bytes]] = {}
        # values created by a plan: id -> (its plan call, index in the result)
        self._members: dict[int, tuple[_PlanCall, int]] = {}
        self._plan_calls: dict[int, _PlanCall] = {}
        # worker values this session shares with others (fused plan calls)
        self._shares: list[SharedValues] = []
        # refs shared with other invocations (cached computations): never disposed here
        self._shared: set[int] = set()
        # ids of values that may leave the silo under the default policy
        self._releasable: set[int] = set()
        # ids of values that are aggregation intrinsics (their calls are releasable)
        self._aggregators: set[int] = set()
        self._last_seq = -1
        self.failed: SessionError | None = None
        self.closed = False

    @property
    def clients(self) -> int | None:
        return self._clients

    def is_duplicate(self, seq: int) -> bool:
        return seq <= self._last_seq

    async def apply(self, batch: p.Batch) -> dict[int, bytes]:
        """Apply a batch; return the values its Compute ops release.

        A batch carrying `close` always frees the session, even when the
        invocation failed earlier or this batch fails: its other operations
        fail as usual (the first error is raised), then every value of the
        invocation is disposed of, so a failed invocation holds nothing at
        the silo once its close arrives."""
        try:
            return await self._apply(batch)
        finally:
            if any(isinstance(op, p.Close) for op in batch.operations):
                await self.close()

    async def _apply(self, batch: p.Batch) -> dict[int, bytes]:
        if self.failed is not None:
            raise self.failed
        self._last_seq = batch.seq
        released: dict[int, bytes] = {}
        running: list[asyncio.Task[None]] = []
        planned = self._plannable(batch.operations)
        try:
            if planned:
                await self._apply_planned(batch.operations, planned, running, released)
            else:
                await self._apply_graph(batch.operations, running, released)
            await _settle(running)
        except SessionError as e:
            self.failed = e
            raise
        except WorkerError as e:
            self.failed = SessionError.from_worker(e, f"silo {self.silo!r}: {e}")
            raise self.failed from e
        finally:
            for task in running:
                task.cancel()
        return released

    def _plannable(self, operations: tuple[p.Operation, ...]) -> list[p.Operation]:
        """The operations a plan runs, or [] to apply the batch op by op."""
        if not self._phase_plans:
            return []
        planned: list[p.Operation] = []
        fused = 0
        for op in operations:
            if isinstance(op, p.Dispose):
                log.debug("silo.plan_skipped", extra={"reason": "the batch disposes of values"})
                return []
            if isinstance(op, PLANNED_OPERATIONS):
                fused += 1
                planned.append(op)
            elif isinstance(op, p.CreateValue) and serialized_is_computation(op.value):
                planned.append(op)
        if fused < 2:
            # One call or none: a plan would add a worker call, not save one.
            return []
        return planned

    async def _apply_graph(
        self,
        operations: tuple[p.Operation, ...],
        running: list[asyncio.Task[None]],
        released: dict[int, bytes],
    ) -> None:
        for op in operations:
            match op:
                case p.Open():
                    await self._open(op)
                case p.Dispose():
                    await _settle(running)
                    await self._dispose(op.targets)
                case p.Close():
                    await _settle(running)
                    await self.close()
                case p.Compute():
                    self._check_release(op.source)
                    running.append(asyncio.create_task(self._compute(op, released)))
                case _:
                    running.append(self._schedule(op))

    async def _apply_planned(
        self,
        operations: tuple[p.Operation, ...],
        planned: list[p.Operation],
        running: list[asyncio.Task[None]],
        released: dict[int, bytes],
    ) -> None:
        # In batch order: every check, and the worker calls of argument
        # values and client data (the plan's inputs), before the plan runs.
        from tensorflow_federated.proto.v0 import executor_pb2

        computes: list[p.Compute] = []
        fused: set[int] = set()
        # The functions among the batch's values (told apart once, in _plannable).
        functions = {id(op) for op in planned if isinstance(op, p.CreateValue)}
        # The batch's argument values, sent to the worker as one struct (in
        # the order the plan takes them, known once the plan is).
        arguments = executor_pb2.Value()
        argument_ids: list[int] = []
        argument_values: list[bytes | memoryview] = []
        for op in operations:
            match op:
                case p.Open():
                    await self._open(op)
                case p.Close():
                    pass  # `apply` closes once everything has run
                case p.Compute():
                    self._check_release(op.source, fused)
                    computes.append(op)
                case p.CreateValue() if id(op) in functions:
                    self._claim(op.target, fused)
                    self._note_function(op)
                case p.CreateValue():
                    self._claim(op.target, fused)
                    argument_values.append(op.value)
                    self._releasable.add(op.target)  # the coordinator sent it
                    argument_ids.append(op.target)
                    fused.add(op.target)
                case p.CreateData():
                    # The silo's client data rides with the arguments (one
                    # worker call for all); it never becomes releasable.
                    self._require_executor()
                    self._claim(op.target, fused)
                    argument_values.append(await self._load_data(op))
                    argument_ids.append(op.target)
                    fused.add(op.target)
                case p.CreateCall() | p.CreateStruct() | p.CreateSelection():
                    self._claim(op.target, fused)
                    self._note(op, fused)
                    fused.add(op.target)
                case _:
                    running.append(self._schedule(op, fused))
        holder = self._create_arguments(arguments, argument_ids) if argument_ids else None
        plan = _PLANS.plan(
            planned,
            resolver(self._functions, self._members, self._ref),
            self._function_computation,
            released={op.source for op in computes},
            arguments=None if holder is None else ("plan", holder.key),
        )
        if holder is not None:
            self._fill_arguments(arguments, argument_ids, argument_values, holder, plan)
        call = self._call_plan(plan, len(planned))
        in_bytes = sum(len(value) for value in argument_values)
        if self._evaluated_here(
            plan, arguments, in_bytes, holder, call, computes, running, released
        ):
            return
        release = self._fusable(plan, holder, computes, running)
        if holder is None or release is None:
            if holder is not None:
                running.append(holder.handle())  # type: ignore[arg-type]
            running.append(call.handle())  # type: ignore[arg-type]
            if self._gathered(plan, computes):
                running.append(
                    asyncio.create_task(self._compute_released(call, plan, computes, released))
                )
                return
            for op in computes:
                running.append(asyncio.create_task(self._compute(op, released)))
            return
        running.append(
            asyncio.ensure_future(
                self._run_fusable(plan, arguments, holder, call, computes, release, released)
            )
        )

    def _evaluated_here(
        self,
        plan: PlannedBatch,
        arguments: Any,
        in_bytes: int,
        holder: _PlanCall | None,
        call: _PlanCall,
        computes: list[p.Compute],
        running: list[asyncio.Task[None]],
        released: dict[int, bytes],
    ) -> bool:
        """Evaluate the plan in this process if it can be (see
        inprocess/plans.py): its functions are ones run here, its inputs are
        host values (this batch's arguments, results of earlier plans
        evaluated here) and it alone makes what the batch releases, and its
        arguments are small (NumPy work on the event loop must stay short:
        large tensors are the worker's, on its own threads). Its worker calls
        stay lazy: they run only if a later batch needs one of its values on
        the worker. False (nothing done) otherwise."""
        if (
            not self._in_process
            or plan.host is None
            or in_bytes > IN_PROCESS_MAX_BYTES
            or running
            or not computes
            or not self._gathered(plan, computes)
        ):
            return False
        from tff_amqp.inprocess.plans import Unsupported, read_value

        earlier: list[_PlanCall] = []
        for source in plan.inputs:
            call_of = self._plan_calls.get(source[1]) if isinstance(source, tuple) else None
            if call_of is None or (call_of.host is None and call_of is not holder):
                return False  # an input lives only on the worker: nothing read in vain
            earlier.append(call_of)
        clients = self._clients or 0
        try:
            if holder is not None and holder.host is None:
                holder.host = [read_value(e.value, clients) for e in arguments.struct.element]
            outputs, values = plan.host.evaluate([c.host for c in earlier], clients)
        except Unsupported as e:
            log.debug("silo.plan_on_worker", extra={"reason": str(e)})
            return False
        except Exception:
            # A bug here must not fail the invocation: the worker runs it.
            log.warning("silo.in_process_plan_failed", exc_info=True)
            return False
        call.host = outputs
        for op in computes:
            released[op.source] = values[plan.released[op.source]]
        return True

    @staticmethod
    def _gathered(plan: PlannedBatch, computes: list[p.Compute]) -> bool:
        """Whether the plan's result gathers every value the batch releases."""
        return plan.released_at is not None and all(op.source in plan.released for op in computes)

    async def _compute_released(
        self,
        call: _PlanCall,
        plan: PlannedBatch,
        computes: list[p.Compute],
        released: dict[int, bytes],
    ) -> None:
        """Release what a batch computes with one `CreateSelection` of the
        plan result's member that gathers it and one `Compute`, whatever the
        number of values (a FedAvg round releases three)."""
        executor = self._require_executor()
        result = await call.handle()
        try:
            gathered = await executor.create_selection(result, plan.released_at)  # type: ignore[arg-type]
            call.owned.append(gathered)
            value = await executor.compute_serialized(gathered)
        except WorkerError as e:
            raise SessionError.from_worker(
                e, f"silo {self.silo!r}, values released by a phase plan: {e}"
            ) from e
        members = _members_of(value)
        for op in computes:
            member = members[plan.released[op.source]]
            # Large values stay views of the answer (sent in chunks, no copy).
            released[op.source] = bytes(member) if len(member) <= _INLINE_COPY else member  # type: ignore[assignment]

    @staticmethod
    def _fusable(
        plan: PlannedBatch,
        holder: _PlanCall | None,
        computes: list[p.Compute],
        running: list[asyncio.Task[None]],
    ) -> tuple[int, ...] | None:
        """The plan members a batch releases, if its plan may run together with
        the same plan of other invocations: its only input is its own argument
        values, it releases only members of the plan's result, and nothing else
        of the batch runs beside it."""
        if holder is None or running or not computes or plan.inputs != (("plan", holder.key),):
            return None
        if any(op.source not in plan.outputs for op in computes):
            return None
        return tuple(sorted({plan.outputs[op.source] for op in computes}))

    async def _run_fusable(
        self,
        plan: PlannedBatch,
        arguments: Any,
        holder: _PlanCall,
        call: _PlanCall,
        computes: list[p.Compute],
        release: tuple[int, ...],
        released: dict[int, bytes],
    ) -> None:
        async def alone() -> None:
            tasks = [holder.handle(), call.handle()]
            if self._gathered(plan, computes):
                tasks.append(
                    asyncio.create_task(self._compute_released(call, plan, computes, released))
                )
            else:
                tasks += [asyncio.create_task(self._compute(op, released)) for op in computes]
            try:
                await _settle(tasks)  # type: ignore[arg-type]
            finally:
                for task in tasks:
                    task.cancel()

        executor = self._require_executor()
        try:
            outcome = await _FUSER.run(executor, plan, arguments, release, alone)
        except WorkerError as e:
            raise SessionError.from_worker(e, f"silo {self.silo!r}, phase plan: {e}") from e
        if outcome is None:
            return  # it ran alone
        self._shares.append(outcome.shared)
        holder.lazy = self._wrapped(outcome.arguments, "argument values")
        call.lazy = self._wrapped(outcome.result, "phase plan result")
        for op in computes:
            released[op.source] = outcome.released[plan.outputs[op.source]]

    def _wrapped(
        self, work: Callable[[], Awaitable[object]], what: str
    ) -> Callable[[], Awaitable[object]]:
        async def run() -> object:
            try:
                return await work()
            except WorkerError as e:
                raise SessionError.from_worker(e, f"silo {self.silo!r}, {what}: {e}") from e

        return run

    # ------------------------------------------------------------- plans

    def _function_computation(self, digest: bytes) -> Any:
        for known, serialized in self._functions.values():
            if known == digest:
                return parse_value(serialized).computation
        raise AssertionError("a plan names a function its session does not hold")

    def _fill_arguments(
        self,
        arguments: Any,
        ids: list[int],
        values: list[bytes | memoryview],
        holder: _PlanCall,
        plan: PlannedBatch,
    ) -> None:
        """Put the batch's argument values in the order its plan takes them
        (one parse of them all, as one struct) and renumber their members."""
        from tensorflow_federated.proto.v0 import executor_pb2

        listed = set(plan.arguments_order)
        order = [*plan.arguments_order, *(i for i in range(len(ids)) if i not in listed)]
        for index, old in enumerate(order):
            self._members[ids[old]] = (holder, index)
        try:
            arguments.ParseFromString(struct_value([values[old] for old in order]))
        except Exception:
            for value_id, value in zip(ids, values, strict=True):
                try:
                    executor_pb2.Value.FromString(bytes(value))
                except Exception as e:
                    raise SessionError(
                        p.ErrorCode.MALFORMED, f"value {value_id}: not a TFF Value: {e}"
                    ) from e
            raise

    def _create_arguments(self, arguments: Any, ids: list[int]) -> _PlanCall:
        """One CreateValue for all of a batch's argument values; each is a
        member of it, as a plan's values are of the plan's result."""
        executor = self._require_executor()
        return self._hold(
            dict(zip(ids, range(len(ids)))),
            lambda _: executor.create_value(arguments),
            f"argument values {ids}",
        )

    def _hold(
        self,
        members: dict[int, int],
        work: Callable[[_PlanCall], Awaitable[object]],
        what: str,
    ) -> _PlanCall:
        """Make `members` (value id -> index) members of the result of `work`,
        the one worker call that makes them, started when first needed."""
        holder = _PlanCall(key=next(_PLAN_KEYS), live=set(members))
        # Started when first needed (a fused batch never starts it).
        holder.lazy = self._wrapped(lambda: work(holder), what)
        self._plan_calls[holder.key] = holder
        for target, index in members.items():
            self._members[target] = (holder, index)
        return holder

    def _call_plan(self, plan: PlannedBatch, operations: int) -> _PlanCall:
        executor = self._require_executor()

        def inputs() -> list[asyncio.Future[object]]:
            # Taken when the call starts: a fused batch never starts its
            # inputs' own worker calls.
            return [
                self._plan_calls[source[1]].handle()
                if isinstance(source, tuple)
                else self._ref(source)  # type: ignore[arg-type]
                for source in plan.inputs
            ]

        call = self._hold(
            plan.outputs,
            lambda holder: call_plan(executor, plan, inputs(), holder.owned),
            f"phase plan of {operations} operations",
        )
        log.debug(
            "silo.plan",
            extra={
                "invocation": self.invocation_id,
                "operations": operations,
                "plans": _PLANS.built,
            },
        )
        return call

    # ----------------------------------------------------------- scheduling

    def _claim(self, target: int, fused: set[int] | None = None) -> None:
        if self._defined(target) or (fused is not None and target in fused):
            raise SessionError(p.ErrorCode.BAD_REFERENCE, f"value id {target} is already in use")

    def _defined(self, value_id: int) -> bool:
        return value_id in self._refs or value_id in self._members or value_id in self._functions

    def _check_defined(self, value_id: int, fused: set[int]) -> None:
        if value_id not in fused and not self._defined(value_id):
            self._ref(value_id)  # raises BAD_REFERENCE

    def _note(self, op: p.Operation, fused: set[int]) -> None:
        """Provenance of a value-creating operation that runs in a plan."""
        match op:
            case p.CreateCall():
                self._check_defined(op.fn, fused)
                if op.arg is not None:
                    self._check_defined(op.arg, fused)
                self._note_call(op)
            case p.CreateStruct():
                for _, ref in op.elements:
                    self._check_defined(ref, fused)
                if all(ref in self._releasable for _, ref in op.elements):
                    self._releasable.add(op.target)
            case p.CreateSelection():
                self._check_defined(op.source, fused)
                if op.source in self._releasable:
                    self._releasable.add(op.target)

    def _note_function(self, op: p.CreateValue) -> bytes:
        """Record a function's provenance (is it an aggregation?); return its digest."""
        # The same computations arrive in every batch: what the privacy gate
        # needs of one is kept by its SHA-256, so a known one is neither
        # parsed nor hashed twice.
        digest = hashlib.sha256(op.value).digest()
        aggregator = _AGGREGATORS.get(digest)
        if aggregator is None:
            comp = _parse_value(op).computation
            aggregator = (
                comp.WhichOneof("computation") == "intrinsic"
                and comp.intrinsic.uri in AGGREGATION_URIS
            )
            _AGGREGATORS.put(digest, aggregator)
        self._releasable.add(op.target)
        if aggregator:
            self._aggregators.add(op.target)
        self._functions[op.target] = (digest, op.value)
        return digest

    def _note_call(self, op: p.CreateCall) -> None:
        if op.fn in self._aggregators:
            # An aggregate over no client at all is the zero: no client data.
            if 0 < (self._clients or 0) < self._policy.min_clients_per_aggregate:
                raise SessionError(
                    p.ErrorCode.PRIVACY,
                    f"silo {self.silo!r} refuses to aggregate over {self._clients} client(s): "
                    f"its policy requires at least {self._policy.min_clients_per_aggregate}",
                )
            self._releasable.add(op.target)

    def _schedule(self, op: p.Operation, fused: set[int] | None = None) -> asyncio.Task[None]:
        """Bind the op's target to a future and start it. Provenance and
        reference checks happen here, synchronously, in batch order."""
        executor = self._require_executor()
        target: int = op.target  # type: ignore[attr-defined]
        self._claim(target, fused)
        run: Callable[[], Awaitable[object]]
        match op:
            case p.CreateValue():
                run = self._prepare_value(op, executor)
            case p.CreateBlobValue():
                # Values the coordinator sent may leave again, like CreateValue.
                self._releasable.add(target)
                run = lambda: self._create_blob_value(op, executor)  # noqa: E731
            case p.CreateData():
                run = lambda: self._create_data(op, executor)  # noqa: E731
            case p.CreateCall():
                run = self._prepare_call(op, executor)
            case p.CreateStruct():
                deps = [(name, self._ref(ref)) for name, ref in op.elements]
                if all(ref in self._releasable for _, ref in op.elements):
                    self._releasable.add(target)

                async def run() -> object:
                    elements = [(name, await dep) for name, dep in deps]
                    return await executor.create_struct(elements)

            case p.CreateSelection():
                source = self._ref(op.source)
                if op.source in self._releasable:
                    self._releasable.add(target)

                async def run() -> object:
                    return await executor.create_selection(await source, op.index)

            case _:
                raise SessionError(p.ErrorCode.UNKNOWN_OPERATION, f"unsupported operation {op!r}")
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._refs[target] = future
        return asyncio.create_task(self._resolve(op, future, run))

    async def _resolve(
        self, op: p.Operation, future: asyncio.Future[object], run: Callable[[], Awaitable[object]]
    ) -> None:
        try:
            future.set_result(await run())
        except WorkerError as e:
            error = SessionError.from_worker(
                e, f"silo {self.silo!r}, operation {_describe(op)}: {e}"
            )
            future.set_exception(error)
            raise error from e
        except BaseException as e:
            future.set_exception(e)
            raise
        finally:
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: dependents report it

    def _prepare_value(
        self, op: p.CreateValue, executor: WorkerExecutor
    ) -> Callable[[], Awaitable[object]]:
        if serialized_is_computation(op.value):
            # Op by op, the function is embedded now (not lazily); a later
            # plan still inlines it rather than taking it as an input.
            digest = self._note_function(op)

            async def run() -> object:
                ref, shared = await executor.create_computation(
                    op.value, lambda: _parse_value(op), digest=digest
                )
                if shared:
                    self._shared.add(op.target)
                return ref

            return run
        value = _parse_value(op)
        self._releasable.add(op.target)
        return lambda: executor.create_value(value)

    async def _create_blob_value(self, op: p.CreateBlobValue, executor: WorkerExecutor) -> object:
        from tensorflow_federated.proto.v0 import executor_pb2

        if self._fetch_blob is None:
            raise SessionError(p.ErrorCode.UNKNOWN_OPERATION, "this silo has no bulk connection")
        try:
            buffer = await self._fetch_blob(op.blob)
        except TransferError as e:
            raise SessionError(e.code, f"silo {self.silo!r}, value {op.target}: {e}") from e
        try:
            if not serialized_is_computation(buffer):
                # Passed to the worker unparsed: the worker validates it, and
                # a 200 MB parse would hold the GIL (and heartbeats) ~0.5 s.
                return await executor.create_value_serialized(buffer)
            value = executor_pb2.Value()
            # memoryview: parsed in place, no copy of a large buffer.
            value.ParseFromString(memoryview(buffer))
        except WorkerError:
            raise
        except Exception as e:
            raise SessionError(
                p.ErrorCode.MALFORMED, f"value {op.target}: not a TFF Value: {e}"
            ) from e
        ref, shared = await executor.create_computation(value.SerializeToString(), value)
        if shared:
            self._shared.add(op.target)
        return ref

    def _prepare_call(
        self, op: p.CreateCall, executor: WorkerExecutor
    ) -> Callable[[], Awaitable[object]]:
        fn = self._ref(op.fn)
        arg = self._ref(op.arg) if op.arg is not None else None
        self._note_call(op)

        async def run() -> object:
            return await executor.create_call(await fn, await arg if arg is not None else None)

        return run

    # ------------------------------------------------------------ operations

    async def _open(self, op: p.Open) -> None:
        if self._executor is not None:
            raise SessionError(p.ErrorCode.MALFORMED, "invocation already opened")
        if op.clients is not None:
            clients = op.clients
        else:
            try:
                clients = self._count_clients(op.data_key)
            except Exception as e:
                raise SessionError(p.ErrorCode.DATA, str(e)) from e
        self._clients = clients
        self._executor = await self._worker.shared_executor(clients)
        log.debug("silo.opened", extra={"invocation": self.invocation_id, "clients": clients})

    async def _create_data(self, op: p.CreateData, executor: WorkerExecutor) -> object:
        from tensorflow_federated.proto.v0 import executor_pb2

        return await executor.create_value(executor_pb2.Value.FromString(await self._load_data(op)))

    async def _load_data(self, op: p.CreateData) -> bytes:
        """The serialized federated value of the silo's data `op` names, for
        as many clients as the invocation was opened for."""
        try:
            count, serialized = await asyncio.to_thread(self._resolve_data, op.key, op.type_spec)
        except SessionError:
            raise
        except Exception as e:
            raise SessionError(p.ErrorCode.DATA, str(e)) from e
        if count != self._clients:
            raise SessionError(
                p.ErrorCode.DATA,
                f"silo {self.silo!r}: data {op.key!r} has {count} clients but this invocation "
                f"was opened for {self._clients}; every silo_data argument of one invocation "
                "must have the same number of clients at a silo",
            )
        # Client data never becomes releasable by itself.
        return serialized

    def _check_release(self, source: int, fused: set[int] | None = None) -> None:
        self._check_defined(source, fused or set())
        if source not in self._releasable and not self._policy.allow_raw_client_values:
            raise SessionError(
                p.ErrorCode.PRIVACY,
                f"silo {self.silo!r} refuses to release value {source}: it is not the output "
                "of a federated aggregation over its clients. Only aggregates leave a silo; "
                "start the silo with --allow-raw-client-values to permit this (simulation and "
                "testing only)",
            )

    async def _compute(self, op: p.Compute, released: dict[int, bytes]) -> None:
        executor = self._require_executor()
        ref = await self._ref(op.source)
        try:
            value = await executor.compute_serialized(ref)  # type: ignore[arg-type]
        except WorkerError as e:
            raise SessionError.from_worker(
                e, f"silo {self.silo!r}, operation {_describe(op)}: {e}"
            ) from e
        # Small values are copied out of the response; large ones stay a view
        # (sent as chunks without another copy of the whole value).
        released[op.source] = bytes(value) if len(value) <= _INLINE_COPY else value  # type: ignore[assignment]

    async def _dispose(self, targets: tuple[int, ...], *, every_plan_call: bool = False) -> None:
        refs: list[object] = []
        for target in targets:
            future = self._refs.pop(target, None)
            self._releasable.discard(target)
            self._aggregators.discard(target)
            self._functions.pop(target, None)
            shared = target in self._shared
            self._shared.discard(target)
            if future is not None and not shared:
                refs.extend(_settled(future))
            member = self._members.pop(target, None)
            if member is not None:
                call = member[0]
                call.live.discard(target)
                if not call.live:
                    # Nothing of the plan's result is used any more.
                    refs.extend(self._release_plan_call(call))
        if every_plan_call:
            for call in list(self._plan_calls.values()):
                refs.extend(self._release_plan_call(call))
            for shared in self._shares:
                refs.extend(shared.release())
            self._shares.clear()
        if refs and self._executor is not None:
            await self._executor.dispose(refs)  # type: ignore[arg-type]

    def _release_plan_call(self, call: _PlanCall) -> list[object]:
        self._plan_calls.pop(call.key, None)
        return [*(_settled(call.result) if call.result is not None else []), *call.owned]

    async def close(self) -> None:
        """Free every value of this invocation; idempotent, never raises."""
        if self.closed:
            return
        self.closed = True
        try:
            # One Dispose call for everything (values, and plan results left).
            await self._dispose(tuple(self._refs), every_plan_call=True)
        except Exception:  # the worker may already be gone
            log.debug("silo.dispose_failed", exc_info=True)
        self._refs.clear()
        self._members.clear()
        self._functions.clear()
        self._executor = None

    def _require_executor(self) -> WorkerExecutor:
        if self._executor is None:
            raise SessionError(
                p.ErrorCode.MALFORMED,
                "the first operation of an invocation must be 'open'"
                + (" (it is closed)" if self.closed else ""),
            )
        return self._executor

    def _ref(self, value_id: int) -> asyncio.Future[object]:
        """The worker value of an id; a plan's member or a function is made a
        worker value of its own only here, when something needs it as one."""
        future = self._refs.get(value_id)
        if future is not None:
            return future
        executor = self._require_executor()
        member = self._members.get(value_id)
        function = self._functions.get(value_id)
        if member is not None:
            call, index = member

            async def select() -> object:
                return await executor.create_selection(await call.handle(), index)  # type: ignore[arg-type]

            future = asyncio.ensure_future(select())
        elif function is not None:
            digest, serialized = function

            async def embed() -> object:
                ref, shared = await executor.create_computation(
                    serialized, lambda: parse_value(serialized), digest=digest
                )
                if shared:
                    self._shared.add(value_id)
                return ref

            future = asyncio.ensure_future(embed())
        else:
            raise SessionError(
                p.ErrorCode.BAD_REFERENCE,
                f"silo {self.silo!r} has no value {value_id} in invocation {self.invocation_id}",
            )
        future.add_done_callback(_retrieve)
        self._refs[value_id] = future
        return future


def _members_of(value: bytes | memoryview) -> list[bytes] | list[memoryview]:
    """The members of a computed struct `Value`, each serialized."""
    try:
        return struct_members(value)
    except ValueError:
        from tensorflow_federated.proto.v0 import executor_pb2

        parsed = executor_pb2.Value.FromString(bytes(value))
        return [element.value.SerializeToString() for element in parsed.struct.element]


def _settled(future: asyncio.Future[object]) -> list[object]:
    """The worker value a future holds, if it holds one."""
    if future.done() and not future.cancelled() and future.exception() is None:
        return [future.result()]
    return []


def _retrieve(future: asyncio.Future[object]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: whoever awaits it reports it


class _DigestFlags:
    """Bounded map of computation digest -> whether it is an aggregation."""

    MAX = 4096

    def __init__(self) -> None:
        self._flags: OrderedDict[bytes, bool] = OrderedDict()

    def get(self, digest: bytes) -> bool | None:
        return self._flags.get(digest)

    def put(self, digest: bytes, flag: bool) -> None:
        self._flags[digest] = flag
        while len(self._flags) > self.MAX:
            self._flags.popitem(last=False)


_AGGREGATORS = _DigestFlags()


def _parse_value(op: p.CreateValue) -> Any:
    from tensorflow_federated.proto.v0 import executor_pb2

    value = executor_pb2.Value()
    try:
        value.ParseFromString(op.value)
    except Exception as e:
        raise SessionError(p.ErrorCode.MALFORMED, f"value {op.target}: not a TFF Value: {e}") from e
    return value


async def _settle(tasks: list[asyncio.Task[None]]) -> None:
    """Wait for all tasks; raise the first error (in batch order)."""
    if not tasks:
        return
    results = await asyncio.gather(*tasks, return_exceptions=True)
    tasks.clear()
    for result in results:
        if isinstance(result, BaseException):
            raise result


def _describe(op: p.Operation | None) -> str:
    if op is None:
        return "?"
    target = getattr(op, "target", None)
    return f"{op.op}" + (f" -> #{target}" if target is not None else "")
