"""One worker call for the same phase plan of concurrent invocations.

With several invocations in flight, a silo receives the same phase (the same
plan, by digest) for each of them at about the same time, each with its own
argument values. Applied one by one, each costs four worker calls (its
arguments, the plan call, a selection of what it releases, the compute).
`PlanFuser` runs the first at once and holds the ones that arrive while it
runs; those then run together: their arguments as one struct (one
`CreateValue`), a computation that applies the plan to each (one
`CreateCall`), and one `Compute` of everything they release (after one
`CreateSelection`). Each invocation gets its released values, and lazy
handles to its arguments and its plan's result (members are selected only if
a later batch uses them); the worker values the group shares are freed when
the last of its sessions lets go of them.

A group that fails at the worker runs again member by member, so each
invocation gets its own result or its own error.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tff_amqp.tff_worker import WorkerError, WorkerExecutor
from tff_amqp.tff_worker.plan import PlannedBatch, parse_value

log = logging.getLogger(__name__)

# At most this many invocations share one worker call, with at most this
# many bytes of argument values together (one gRPC message to the worker; a
# group whose released values turn out too large fails and runs one by one).
MAX_GROUP = 32
MAX_GROUP_BYTES = 32 * 1024 * 1024
_PARAMETER = "fused_arguments"


class SharedValues:
    """Worker values of one fused call, freed with the last session using them."""

    def __init__(self, refs: list[object], users: int) -> None:
        self._refs = refs
        self._users = users

    def release(self) -> list[object]:
        """One user is done; the values to dispose of if it was the last."""
        self._users -= 1
        return self._refs if self._users == 0 else []


@dataclass(frozen=True)
class FusedOutcome:
    """One invocation's part of a fused call."""

    # Released values by member index of the plan's result (serialized Values).
    released: dict[int, bytes]
    # Worker handles, made on demand: its arguments struct, its plan's result.
    arguments: Callable[[], Awaitable[object]]
    result: Callable[[], Awaitable[object]]
    shared: SharedValues


@dataclass
class _Request:
    arguments: Any  # executor_pb2.Value: a struct of the batch's argument values
    done: asyncio.Future[FusedOutcome]
    size: int


@dataclass
class _Group:
    """One plan (releasing the same members) on one executor."""

    key: tuple[object, ...]
    executor: WorkerExecutor
    plan: PlannedBatch
    release: tuple[int, ...]
    busy: bool = False
    waiting: list[_Request] = field(default_factory=list)


class PlanFuser:
    """Groups the same plan of concurrent invocations on one executor."""

    MAX_COMPUTATIONS = 256

    def __init__(self) -> None:
        self._groups: dict[tuple[object, ...], _Group] = {}
        self._computations: OrderedDict[tuple[bytes, tuple[int, ...], int], bytes] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats = {"calls": 0, "fused": 0}

    async def run(
        self,
        executor: WorkerExecutor,
        plan: PlannedBatch,
        arguments: Any,
        release: tuple[int, ...],
        alone: Callable[[], Awaitable[None]],
    ) -> FusedOutcome | None:
        """Run `plan` on `arguments`, releasing the result members `release`.
        If nothing of its kind is running, `alone()` runs it the ordinary way
        and this returns None; otherwise it waits and runs with the others
        that waited, and returns its part."""
        key = (id(executor), plan.digest, release)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(key, executor, plan, release)
        if not group.busy:
            group.busy = True
            try:
                await alone()
                return None
            finally:
                self._next(group)
        done: asyncio.Future[FusedOutcome] = asyncio.get_running_loop().create_future()
        group.waiting.append(_Request(arguments, done, arguments.ByteSize()))
        return await done

    def _next(self, group: _Group) -> None:
        """After a call of `group`: run what waited, or free the group."""
        waiting = [r for r in group.waiting if not r.done.done()]
        if not waiting:
            group.busy = False
            if self._groups.get(group.key) is group:
                del self._groups[group.key]
            return
        size, count = 0, 0
        for request in waiting[:MAX_GROUP]:
            size += request.size
            if count and size > MAX_GROUP_BYTES:
                break
            count += 1
        batch, group.waiting = waiting[:count], waiting[count:]
        task = asyncio.get_running_loop().create_task(self._run_group(group, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_group(self, group: _Group, requests: list[_Request]) -> None:
        executor, plan, release = group.executor, group.plan, group.release
        try:
            try:
                outcomes: list[FusedOutcome | BaseException] = list(
                    await self._call(executor, plan, release, [r.arguments for r in requests])
                )
            except WorkerError as error:
                if len(requests) == 1:
                    outcomes = [error]
                else:
                    log.info(
                        "silo.fused_plan_failed",
                        extra={"invocations": len(requests), "error": str(error)[:200]},
                    )
                    outcomes = []
                    for request in requests:
                        try:
                            (outcome,) = await self._call(
                                executor, plan, release, [request.arguments]
                            )
                            outcomes.append(outcome)
                        except WorkerError as e:
                            outcomes.append(e)
        except BaseException as e:
            for request in requests:
                if not request.done.done():
                    request.done.set_exception(e)
                    request.done.exception()
            if not isinstance(e, Exception):
                raise
            return
        finally:
            self._next(group)
        for request, outcome in zip(requests, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not request.done.done():
                    request.done.set_exception(outcome)
                    request.done.exception()
            elif request.done.done():
                # Its session is gone (stopped meanwhile): its share is ours to free.
                refs = outcome.shared.release()
                if refs:
                    await _dispose_quietly(executor, refs)
            else:
                request.done.set_result(outcome)

    async def _call(
        self,
        executor: WorkerExecutor,
        plan: PlannedBatch,
        release: tuple[int, ...],
        arguments: list[Any],
    ) -> list[FusedOutcome]:
        from tensorflow_federated.proto.v0 import executor_pb2

        k = len(arguments)
        self.stats["calls"] += 1
        self.stats["fused"] += k
        serialized = self._computation(plan, release, k)
        owned: list[object] = []
        try:
            fn, cached = await executor.create_computation(
                serialized, lambda: parse_value(serialized), digest=None
            )
            if not cached:
                owned.append(fn)
            value = executor_pb2.Value()
            for argument in arguments:
                value.struct.element.add().value.CopyFrom(argument)
            args = await executor.create_value(value)
            owned.append(args)
            fused = await executor.create_call(fn, args)
            owned.append(fused)
            releasing = await executor.create_selection(fused, 0)
            owned.append(releasing)
            released = executor_pb2.Value.FromString(
                await executor.compute_serialized(releasing)  # type: ignore[arg-type]
            )
        except BaseException:
            await _dispose_quietly(executor, owned)
            raise
        shared = SharedValues(owned, k)
        results = executor.create_selection

        def member(base: object, *path: int) -> Callable[[], Awaitable[object]]:
            async def select() -> object:
                ref = base
                for index in path:
                    ref = await results(ref, index)  # type: ignore[arg-type]
                return ref

            return select

        outcomes = []
        for i in range(k):
            mine = released.struct.element[i].value.struct.element
            outcomes.append(
                FusedOutcome(
                    released={
                        index: mine[j].value.SerializeToString() for j, index in enumerate(release)
                    },
                    arguments=member(args, i),
                    result=member(fused, 1, i),
                    shared=shared,
                )
            )
        return outcomes

    def _computation(self, plan: PlannedBatch, release: tuple[int, ...], k: int) -> bytes:
        """λx. <<plan(x[i])[r] for r in release> for i>, <plan(x[i]) for i>>."""
        key = (plan.digest, release, k)
        known = self._computations.get(key)
        if known is not None:
            self._computations.move_to_end(key)
            return known
        from tensorflow_federated.proto.v0 import computation_pb2 as pb
        from tensorflow_federated.proto.v0 import executor_pb2

        def ref(name: str) -> Any:
            return pb.Computation(reference=pb.Reference(name=name))

        def select(source: Any, index: int) -> Any:
            return pb.Computation(selection=pb.Selection(source=source, index=index))

        def struct(values: list[Any]) -> Any:
            return pb.Computation(
                struct=pb.Struct(element=[pb.Struct.Element(value=v) for v in values])
            )

        function = parse_value(plan.serialized).computation
        takes_argument = bool(getattr(function, "lambda").parameter_name)
        locals_ = [pb.Block.Local(name="plan", value=function)]
        for i in range(k):
            call = pb.Call(function=ref("plan"))
            if takes_argument:
                call.argument.CopyFrom(select(ref(_PARAMETER), i))
            locals_.append(pb.Block.Local(name=f"r{i}", value=pb.Computation(call=call)))
        released = struct([struct([select(ref(f"r{i}"), m) for m in release]) for i in range(k)])
        every = struct([ref(f"r{i}") for i in range(k)])
        body = pb.Computation(block=pb.Block(local=locals_, result=struct([released, every])))
        computation = pb.Computation(
            **{"lambda": pb.Lambda(parameter_name=_PARAMETER, result=body)}
        )
        serialized = executor_pb2.Value(computation=computation).SerializeToString()
        self._computations[key] = serialized
        while len(self._computations) > self.MAX_COMPUTATIONS:
            self._computations.popitem(last=False)
        return serialized


async def _dispose_quietly(executor: WorkerExecutor, refs: list[object]) -> None:
    try:
        await executor.dispose(refs)  # type: ignore[arg-type]
    except Exception:
        log.debug("silo.dispose_failed", exc_info=True)
