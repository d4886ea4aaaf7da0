"""Execution contexts of the stateless regime.

`invoke` compiles a computation of shape
`(state@SERVER, data@CLIENTS) -> (state@SERVER, output@SERVER)` to TFF's
MapReduceForm (`tff.backends.mapreduce.get_map_reduce_form_for_computation`,
cached per computation) and runs it as one round of work items over the silos'
worker pools. The CLIENTS argument must be `tff_amqp.silo_data(KEY)`: workers
read their silo's data themselves. Computations without CLIENTS placement
(e.g. a learning process's `initialize`) run on the coordinator's own
worker_binary. Anything else is refused with an error that points to the
stateful context.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.common_libs import structure
from tensorflow_federated.python.core.backends.mapreduce import form_utils, forms
from tensorflow_federated.python.core.backends.native import compiler
from tensorflow_federated.python.core.environments.tensorflow_frontend import (
    tensorflow_computation,
)
from tensorflow_federated.python.core.impl.computation import computation_impl
from tensorflow_federated.python.core.impl.context_stack import context_base
from tensorflow_federated.python.core.impl.executors import value_serialization
from tensorflow_federated.python.core.impl.types import (
    computation_types,
    placements,
    type_analysis,
    type_conversions,
)

from tff_amqp.coordinator.bulk import CoordinatorBulk
from tff_amqp.coordinator.context import RuntimeContext, installing
from tff_amqp.coordinator.mapreduce.link import WorkLink
from tff_amqp.coordinator.mapreduce.membership import PoolMembership
from tff_amqp.coordinator.mapreduce.round import (
    FormWire,
    MapReduceRound,
    RoundReport,
    RoundSettings,
)
from tff_amqp.coordinator.options import CoordinatorOptions
from tff_amqp.coordinator.partial import InvocationReport, check_partial
from tff_amqp.coordinator.runtime import SharedRuntime
from tff_amqp.coordinator.sync import SyncOverSharedLoop
from tff_amqp.data_reference import SiloDataReference
from tff_amqp.errors import InvocationTimeoutError, TffAmqpError
from tff_amqp.observe.events import InvocationEvents
from tff_amqp.observe.telemetry import CoordinatorTelemetry

log = logging.getLogger(__name__)

_STATEFUL_HINT = (
    "Run it with the stateful context instead: "
    "tff_amqp.create_sync_amqp_execution_context(broker_url, federation=...) with "
    "`tff-amqp silo` processes, which runs any federated computation."
)


class NotMapReduceFormError(TffAmqpError, TypeError):
    """The computation cannot run in the stateless (MapReduce) regime."""


@dataclass(frozen=True)
class MapReduceOptions:
    """Options of a MapReduce context: the stateful context's cohort,
    deadline and straggler options, plus how finely silos are sharded."""

    coordinator: CoordinatorOptions
    # Work items per silo and round: the silo's clients are split into this
    # many contiguous shards (an item with fewer clients than its shard count
    # allows carries zero()). More shards spread a round over more workers;
    # each shard's accumulator leaves the silo (see docs/stateless.md).
    shards_per_silo: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.shards_per_silo <= 100_000:
            raise ValueError("shards_per_silo must be between 1 and 100000")


class _Runtime(SharedRuntime[WorkLink, PoolMembership]):
    """The work-item link, pool membership and the coordinator's TFF worker."""

    loop_error = "a MapReduce context is bound to the event loop it first ran on"

    def __init__(self, options: MapReduceOptions) -> None:
        coordinator = options.coordinator
        super().__init__(
            coordinator, PoolMembership(liveness_timeout=coordinator.heartbeat_timeout)
        )
        self.options = options

    async def _connect(self) -> WorkLink:
        coordinator = self.options.coordinator
        link = WorkLink(
            coordinator.broker_url,
            self.topology,
            self.membership,
            max_message_bytes=coordinator.max_message_bytes,
            sender=coordinator.coordinator_name,
        )
        await link.start()
        return link


def _wire(comp: computation_impl.ConcreteComputation) -> tuple[bytes, executor_pb2.Value]:
    value = executor_pb2.Value(computation=computation_impl.ConcreteComputation.get_proto(comp))
    return value.SerializeToString(), value


def _data_columns(form: forms.MapReduceForm) -> list[str]:
    """The column names the round's client data element type reads (none
    for a plain scalar element)."""
    data_type = form.work.type_signature.parameter[0]
    if not isinstance(data_type, computation_types.SequenceType):
        return []
    element = data_type.element
    if not isinstance(element, computation_types.StructType):
        return []
    return [name for name, _ in structure.iter_elements(element) if name]


def _names(type_spec: computation_types.Type) -> tuple[str | None, ...]:
    assert isinstance(type_spec, computation_types.StructType)
    return tuple(structure.name_list_with_nones(type_spec))


def compile_form(
    comp: computation_impl.ConcreteComputation,
) -> tuple[forms.MapReduceForm, FormWire]:
    """MapReduceForm of `comp` and its wire form, or NotMapReduceFormError."""
    try:
        form = form_utils.get_map_reduce_form_for_computation(comp)
    except Exception as e:
        raise NotMapReduceFormError(
            f"computation of type {comp.type_signature} does not fit MapReduce form, so the "
            f"stateless regime cannot run it (TFF says: {type(e).__name__}: {e}). It needs the "
            "shape (state@SERVER, data@CLIENTS) -> (state@SERVER, output@SERVER) with one "
            f"broadcast -> client work -> aggregation round. {_STATEFUL_HINT}"
        ) from e
    if form.securely_aggregates_tensors:
        raise NotMapReduceFormError(
            "this computation uses secure sums (federated_secure_sum*), which the stateless "
            "regime does not implement: a shard's plain partial sum would release more than a "
            f"secure sum promises. {_STATEFUL_HINT}"
        )
    update_parameter = form.update.type_signature.parameter
    return form, FormWire(
        prepare=_wire(form.prepare),
        work=_wire(form.work),
        zero=_wire(form.zero),
        accumulate=_wire(form.accumulate),
        merge=_wire(form.merge),
        report=_wire(form.report),
        update=_wire(form.update),
        merge_names=_names(form.merge.type_signature.parameter),
        update_names=_names(update_parameter),
        update_result_names=_names(update_parameter[1]),  # type: ignore[index]
    )


def _split_argument(arg: Any) -> tuple[Any, Any]:
    """(server state, client data) of a 2-argument call."""
    if isinstance(arg, structure.Struct):
        elements = [value for _, value in structure.to_elements(arg)]
    elif isinstance(arg, Mapping):
        elements = list(arg.values())
    elif isinstance(arg, list | tuple):
        elements = list(arg)
    else:
        elements = []
    if len(elements) != 2:
        raise NotMapReduceFormError(
            f"expected two arguments (server state, client data), got {type(arg).__name__}"
        )
    return elements[0], elements[1]


def _to_python(obj: Any) -> Any:
    return structure.to_odict_or_tuple(obj) if isinstance(obj, structure.Struct) else None


class AmqpAsyncMapReduceContext(RuntimeContext, context_base.AsyncContext):
    """Asynchronous MapReduce context: `await comp(state, silo_data(KEY))`."""

    def __init__(self, options: MapReduceOptions) -> None:
        self._options = options
        self.runtime = _Runtime(options)
        self._forms: dict[int, tuple[object, forms.MapReduceForm, FormWire]] = {}
        self.last_round: RoundReport | None = None
        # Who took part in the last round, as the stateful context reports it.
        self.last_invocation: InvocationReport | None = None

    @property
    def options(self) -> MapReduceOptions:
        return self._options

    @property
    def events(self) -> InvocationEvents:
        """What rounds report (observers: progress display, metrics)."""
        return self.runtime.events

    @property
    def telemetry(self) -> CoordinatorTelemetry | None:
        """The metrics endpoint and progress display, once started."""
        return self.runtime.telemetry

    @property
    def membership(self) -> PoolMembership:
        return self.runtime.membership

    @property
    def bulk(self) -> CoordinatorBulk:
        """Chunked transfers: broadcasts into the pools' streams (counted in
        `bulk.stats`), large accumulators back."""
        if not self.runtime.started:
            raise RuntimeError("the MapReduce context has not started yet")
        return self.runtime.bulk

    @property
    def link(self) -> WorkLink:
        if not self.runtime.started:
            raise RuntimeError("the MapReduce context is not started")
        return self.runtime.link

    @property
    def strict(self) -> bool:
        return self._options.coordinator.strict

    async def invoke(self, comp: Any, arg: Any) -> Any:
        result, report = await self.invoke_reported(comp, arg)
        check_partial(report, strict=self.strict)
        return result

    async def invoke_reported(self, comp: Any, arg: Any) -> tuple[Any, InvocationReport | None]:
        """The result and, for a round, who took part (the sync context warns
        about a partial result in its caller's thread)."""
        # This call's own report (rounds may run concurrently on one context).
        reports: list[InvocationReport] = []
        result = await self._invoke(comp, arg, reports)
        return result, (reports[0] if reports else None)

    async def _invoke(self, comp: Any, arg: Any, reports: list[InvocationReport]) -> Any:
        if asyncio.iscoroutine(arg):
            arg = await arg
        if not isinstance(comp, computation_impl.ConcreteComputation):
            raise NotMapReduceFormError(
                f"expected a TFF computation, got {type(comp).__name__}. {_STATEFUL_HINT}"
            )
        deadline = self._options.coordinator.deadline
        try:
            async with asyncio.timeout(deadline):
                if type_analysis.contains(
                    comp.type_signature,
                    lambda t: (
                        isinstance(t, computation_types.FederatedType)
                        and t.placement is placements.CLIENTS
                    ),
                ):
                    return await self._run_round(comp, arg, time.time() + deadline, reports)
                return await self._run_locally(comp, arg)
        except TimeoutError as e:
            if isinstance(e, InvocationTimeoutError):
                raise
            raise InvocationTimeoutError(
                f"invocation did not finish within its deadline of {deadline:.1f} s "
                "(raise `deadline=` if a round legitimately takes longer)"
            ) from e

    async def _form(
        self, comp: computation_impl.ConcreteComputation
    ) -> tuple[forms.MapReduceForm, FormWire]:
        entry = self._forms.get(id(comp))
        if entry is None or entry[0] is not comp:
            # Compiling takes seconds: off the loop, so heartbeats keep flowing.
            form, wire = await asyncio.to_thread(compile_form, comp)
            entry = (comp, form, wire)
            self._forms[id(comp)] = entry
        return entry[1], entry[2]

    async def _run_round(
        self,
        comp: computation_impl.ConcreteComputation,
        arg: Any,
        deadline: float,
        reports: list[InvocationReport],
    ) -> Any:
        form, wire = await self._form(comp)
        state, data = _split_argument(arg)
        if not isinstance(data, SiloDataReference):
            raise NotMapReduceFormError(
                "the client data argument of a MapReduce round must be tff_amqp.silo_data(KEY): "
                f"stateless workers read their silo's own data (got {type(data).__name__}). To "
                f"pass client values from the coordinator, use the stateful context. "
                f"{_STATEFUL_HINT}"
            )
        await self.runtime.ensure_started()
        link, worker = self.runtime.link, self.runtime.worker
        state_type = form.prepare.type_signature.parameter
        state = tensorflow_computation.transform_args(_tree_to_python(state))
        state_value, _ = value_serialization.serialize_value(state, state_type)
        coordinator = self._options.coordinator
        round_ = MapReduceRound(
            link=link,
            bulk=self.runtime.bulk,
            membership=self.runtime.membership,
            executor=await worker.client.shared_executor(0),
            form=wire,
            events=self.runtime.events,
            settings=RoundSettings(
                min_silos=coordinator.min_silos,
                max_silos=coordinator.max_silos,
                cohort_timeout=coordinator.cohort_timeout,
                straggler_timeout=coordinator.straggler_timeout,
                quorum_grace=coordinator.quorum_grace,
                shards_per_silo=self._options.shards_per_silo,
                sender=coordinator.coordinator_name,
            ),
            deadline=deadline,
        )
        try:
            result = await round_.run(state_value, data.key, _data_columns(form))
        finally:
            report = round_.report
            self.last_round = report
            self.last_invocation = invocation_report = InvocationReport(
                invocation_id=report.round_id,
                cohort=list(report.cohort),
                took_part=[s for s in report.cohort if s not in report.drop_reasons],
                dropped=dict(report.drop_reasons),
                seconds=report.seconds,
            )
            reports.append(invocation_report)
        return self._python_result(result, comp.type_signature.result)

    async def _run_locally(self, comp: computation_impl.ConcreteComputation, arg: Any) -> Any:
        """A computation without CLIENTS placement (e.g. `initialize`) on the
        coordinator's own worker_binary."""
        await self.runtime.ensure_started()
        worker = self.runtime.worker
        compiled = await asyncio.to_thread(compiler.desugar_and_transform_to_native, comp)
        executor = await worker.client.shared_executor(0)
        serialized, function = _wire(compiled)
        created = []
        try:
            fn, cached = await executor.create_computation(serialized, function)
            if not cached:
                created.append(fn)
            arg_ref = None
            if comp.type_signature.parameter is not None:
                value = tensorflow_computation.transform_args(_tree_to_python(arg))
                proto, _ = value_serialization.serialize_value(value, comp.type_signature.parameter)
                arg_ref = await executor.create_value(proto)
                created.append(arg_ref)
            call = await executor.create_call(fn, arg_ref)
            created.append(call)
            result = await executor.compute(call)
        finally:
            await executor.dispose(created)
        return self._python_result(result, comp.type_signature.result)

    @staticmethod
    def _python_result(value: executor_pb2.Value, result_type: computation_types.Type) -> Any:
        hint = result_type if value.WhichOneof("value") == "federated" else _unplaced(result_type)
        python, _ = value_serialization.deserialize_value(value, hint)
        python = type_conversions.type_to_py_container(python, result_type)
        return tensorflow_computation.transform_result(python)


def _unplaced(type_spec: computation_types.Type) -> computation_types.Type:
    """`type_spec` without placements (the local worker returns SERVER values
    of a round, and of an `update`, as plain values)."""
    if isinstance(type_spec, computation_types.FederatedType):
        return type_spec.member
    if isinstance(type_spec, computation_types.StructType):
        return computation_types.StructType(
            [(name, _unplaced(element)) for name, element in structure.iter_elements(type_spec)]
        )
    return type_spec


def _tree_to_python(value: Any) -> Any:
    import tree

    return tree.traverse(_to_python, value)


class AmqpSyncMapReduceContext(SyncOverSharedLoop[AmqpAsyncMapReduceContext, MapReduceOptions]):
    """Synchronous MapReduce context on the process's shared event-loop thread."""

    _name = "MapReduce context"

    def __init__(self, options: MapReduceOptions) -> None:
        super().__init__(AmqpAsyncMapReduceContext(options))

    @property
    def events(self) -> InvocationEvents:
        return self._async_context.events

    @property
    def telemetry(self) -> CoordinatorTelemetry | None:
        return self._async_context.telemetry

    @property
    def membership(self) -> PoolMembership:
        return self._async_context.membership

    @property
    def link(self) -> WorkLink:
        return self._async_context.link

    @property
    def bulk(self) -> CoordinatorBulk:
        return self._async_context.bulk

    @property
    def last_round(self) -> RoundReport | None:
        return self._async_context.last_round

    @property
    def last_invocation(self) -> InvocationReport | None:
        """Who took part in the last round (cohort, silos dropped and why)."""
        return self._async_context.last_invocation


def create_sync_amqp_mapreduce_context(
    broker_url: str, *, shards_per_silo: int = 4, **kwargs: Any
) -> AmqpSyncMapReduceContext:
    """A sync context that runs MapReduce-form computations as work items on
    the silos' stateless worker pools (`tff-amqp worker --stateless`).

    Args:
      broker_url: `amqp://user:password@host:5672/vhost` (or `amqps://`).
      shards_per_silo: work items per silo per round (contiguous client shards).
      **kwargs: the coordinator options of `create_sync_amqp_execution_context`
        (`tff_amqp.coordinator.options.CoordinatorOptions`, with its defaults):
        federation (workers use the same), min_silos, max_silos, cohort_timeout,
        deadline, heartbeat_timeout, straggler_timeout, quorum_grace (the same
        K-of-N rule, `tff_amqp.coordinator.quorum`; a silo is live while any
        of its workers is, and a dropped silo's shards are left out of the
        round as a whole; a round that dropped silos warns with
        `PartialResultWarning`, or with strict=True raises `PartialResultError`;
        `last_invocation` reports who took part), max_message_bytes,
        metrics_port, progress.
    """
    return AmqpSyncMapReduceContext(_options(broker_url, shards_per_silo, kwargs))


def create_async_amqp_mapreduce_context(
    broker_url: str, *, shards_per_silo: int = 4, **kwargs: Any
) -> AmqpAsyncMapReduceContext:
    """The async variant of `create_sync_amqp_mapreduce_context` (same options)."""
    return AmqpAsyncMapReduceContext(_options(broker_url, shards_per_silo, kwargs))


def _options(broker_url: str, shards_per_silo: int, kwargs: dict[str, Any]) -> MapReduceOptions:
    return MapReduceOptions(
        CoordinatorOptions(broker_url=broker_url, **kwargs), shards_per_silo=shards_per_silo
    )


set_sync_amqp_mapreduce_context = installing(
    create_sync_amqp_mapreduce_context, "sync MapReduce context"
)
set_async_amqp_mapreduce_context = installing(
    create_async_amqp_mapreduce_context, "async MapReduce context"
)
