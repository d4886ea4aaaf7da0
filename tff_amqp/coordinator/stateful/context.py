"""Execution contexts that run TFF computations over RabbitMQ.

Shaped like `tff.backends.native`: `create_*` returns a context, `set_*`
installs it as TFF's default. The native compiler prepares computations; our
executor factory creates one `AmqpExecutor` per invocation, and the context
closes the invocation (freeing silo state) when the call ends, however it ends.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Mapping
from typing import Any

from tensorflow_federated.python.core.backends.native import compiler
from tensorflow_federated.python.core.environments.tensorflow_frontend import (
    tensorflow_computation,
)
from tensorflow_federated.python.core.impl.execution_contexts import async_execution_context
from tensorflow_federated.python.core.impl.executors import executor_factory
from tensorflow_federated.python.core.impl.types import placements

from tff_amqp.coordinator.context import RuntimeContext, installing
from tff_amqp.coordinator.options import CoordinatorOptions
from tff_amqp.coordinator.partial import InvocationReport, check_partial
from tff_amqp.coordinator.stateful.executor import AmqpExecutor
from tff_amqp.coordinator.stateful.identity_cache import IdentityCache
from tff_amqp.coordinator.stateful.invocation import Invocation
from tff_amqp.coordinator.stateful.runtime import CoordinatorRuntime
from tff_amqp.coordinator.sync import SyncOverSharedLoop
from tff_amqp.errors import InvocationTimeoutError

log = logging.getLogger(__name__)

# The invocations created during the current `invoke` call (per task).
_current_invocations: contextvars.ContextVar[list[Invocation] | None] = contextvars.ContextVar(
    "tff_amqp_invocations", default=None
)


class AmqpExecutorFactory(executor_factory.ExecutorFactory):
    """Creates one executor per invocation, bound to the shared runtime."""

    def __init__(self, runtime: CoordinatorRuntime) -> None:
        self._runtime = runtime

    def create_executor(self, cardinalities: Mapping[Any, int]) -> AmqpExecutor:
        invocation = Invocation(self._runtime, cardinalities.get(placements.CLIENTS))
        registry = _current_invocations.get()
        if registry is not None:
            registry.append(invocation)
        return AmqpExecutor(invocation)

    def clean_up_executor(self, cardinalities: Mapping[Any, int]) -> None:
        pass


class _IdentityCompileCache:
    """TFF's compiler pipeline, its results found by the computation's
    identity first (TFF's own cache hashes the whole serialized computation
    on every lookup)."""

    def __init__(self, pipeline: Any) -> None:
        self._pipeline = pipeline
        self._compiled: IdentityCache[object] = IdentityCache()

    def has(self, comp: Any) -> bool:
        return self._compiled.get(comp) is not None

    def compile(self, comp: Any) -> object:
        compiled = self._compiled.get(comp)
        if compiled is None:
            compiled = self._pipeline.compile(comp)
            self._compiled.put(comp, compiled)
        return compiled


class AmqpAsyncExecutionContext(RuntimeContext, async_execution_context.AsyncExecutionContext):
    """Asynchronous context: `await comp(args)` runs over the federation."""

    def __init__(self, options: CoordinatorOptions) -> None:
        self.runtime = CoordinatorRuntime(options)
        # Who took part in the last invocation (cohort, silos dropped and why).
        self.last_invocation: InvocationReport | None = None
        super().__init__(
            executor_fn=AmqpExecutorFactory(self.runtime),
            compiler_fn=compiler.desugar_and_transform_to_native,
            transform_args=tensorflow_computation.transform_args,
            transform_result=tensorflow_computation.transform_result,
        )
        self._compiler_pipeline = _IdentityCompileCache(self._compiler_pipeline)

    @property
    def options(self) -> CoordinatorOptions:
        return self.runtime.options

    @property
    def strict(self) -> bool:
        return self.runtime.options.strict

    async def invoke(self, comp: Any, arg: Any) -> Any:
        result, report = await self.invoke_reported(comp, arg)
        check_partial(report, strict=self.strict)
        return result

    async def invoke_reported(self, comp: Any, arg: Any) -> tuple[Any, InvocationReport | None]:
        """The result and who took part (None: no invocation ran); the sync
        context warns about a partial result in its caller's thread."""
        await self.runtime.ensure_started()
        if not self._compiler_pipeline.has(comp):
            # Compile off the event loop (the pipeline caches the result), so
            # heartbeats and broker traffic keep flowing during a long compile;
            # a cache hit needs no thread.
            await asyncio.to_thread(self._compiler_pipeline.compile, comp)
        invocations: list[Invocation] = []
        token = _current_invocations.set(invocations)
        deadline = self.options.deadline
        ok = False
        try:
            try:
                async with asyncio.timeout(deadline):
                    result = await super().invoke(comp, arg)
                    ok = True
                    return result, report_of(invocations)
            except TimeoutError as e:
                if isinstance(e, InvocationTimeoutError):
                    raise
                where = "; ".join(i.describe_wait() for i in invocations) or (
                    "it was still compiling or ingesting arguments"
                )
                raise InvocationTimeoutError(
                    f"invocation did not finish within its deadline of {deadline:.1f} s: "
                    f"{where}. Raise `deadline=` if the computation legitimately takes "
                    "longer, or check those silos (`tff-amqp status`)"
                ) from e
        finally:
            _current_invocations.reset(token)
            if invocations:
                self.last_invocation = report_of(invocations)
            for invocation in invocations:
                invocation.events.invocation_finished(
                    invocation.id, ok, time.monotonic() - invocation.started
                )
                # Freeing silo and local state is off the caller's critical
                # path; the runtime waits for it before it shuts down.
                self.runtime.in_background(invocation.close())


class AmqpSyncExecutionContext(SyncOverSharedLoop[AmqpAsyncExecutionContext, CoordinatorOptions]):
    """Synchronous context: runs the async one on the shared event-loop thread."""

    def __init__(self, options: CoordinatorOptions) -> None:
        super().__init__(AmqpAsyncExecutionContext(options))

    @property
    def runtime(self) -> CoordinatorRuntime:
        return self._async_context.runtime

    @property
    def last_invocation(self) -> InvocationReport | None:
        """Who took part in the last invocation (cohort, silos dropped and why)."""
        return self._async_context.last_invocation


def report_of(invocations: list[Invocation]) -> InvocationReport:
    """One report for the invocations of one call (normally one; a call that
    created several reports the first's id and every silo of any of them)."""
    cohort: list[str] = []
    dropped: dict[str, str] = {}
    for invocation in invocations:
        cohort.extend(s for s in invocation.cohort.chosen() if s not in cohort)
        for silo, reason in invocation.cohort.drop_reasons.items():
            dropped.setdefault(silo, reason)
    first = invocations[0]
    return InvocationReport(
        invocation_id=first.id,
        cohort=cohort,
        took_part=[s for s in cohort if s not in dropped],
        dropped=dropped,
        seconds=time.monotonic() - first.started,
    )


def create_async_amqp_execution_context(
    broker_url: str, **kwargs: Any
) -> AmqpAsyncExecutionContext:
    """The async variant of `create_sync_amqp_execution_context` (same options)."""
    return AmqpAsyncExecutionContext(CoordinatorOptions(broker_url=broker_url, **kwargs))


def create_sync_amqp_execution_context(
    broker_url: str,
    *,
    federation: str = "default",
    min_silos: int | None = None,
    max_silos: int | None = None,
    cohort_timeout: float = 60.0,
    deadline: float = 600.0,
    heartbeat_timeout: float = 5.0,
    straggler_timeout: float | None = None,
    **kwargs: Any,
) -> AmqpSyncExecutionContext:
    """A sync context that runs computations on the silos of `federation`.

    Args:
      broker_url: `amqp://user:password@host:5672/vhost` (or `amqps://`).
      federation: namespace of queues and exchanges; silos must use the same.
      min_silos: an invocation waits (at most `cohort_timeout`) for this many
        live silos and fails with `CohortError` otherwise; K of N may drop
        silos down to this many. None (default): one live silo starts the
        cohort, and every cohort silo must answer (nothing is ever dropped).
      max_silos: at most this many silos take part (None: all live ones).
      cohort_timeout: seconds to wait for the cohort.
      deadline: hard limit in seconds for one invocation; requests expire with it.
      heartbeat_timeout: a silo silent this long is considered gone.
      straggler_timeout: K of N. After this many seconds of an aggregation
        phase, proceed with the partials of at least `min_silos` silos and drop
        the others for the rest of the invocation (None: wait for all).
      quorum_grace: once `min_silos` silos answered an aggregation phase, wait
        at most this many more seconds for the others, then drop them as
        stragglers (None: only `straggler_timeout` limits the wait).
      strict: (keyword, default False) a result over fewer silos than the
        cohort (silos dropped by K of N or lost) raises `PartialResultError`
        instead of being returned with a `PartialResultWarning`; either way
        `context.last_invocation` says which silos took part.
      **kwargs: further `CoordinatorOptions`, e.g. `select_slices` (federated_select
        ships only requested slices; see docs/intrinsics.md), `max_message_bytes`,
        `metrics_port` (serve Prometheus metrics; 0: any free port; None: off)
        and `progress` (progress on stderr: True, False, None = only at a
        terminal).
    """
    return AmqpSyncExecutionContext(
        CoordinatorOptions(
            broker_url=broker_url,
            federation=federation,
            min_silos=min_silos,
            max_silos=max_silos,
            cohort_timeout=cohort_timeout,
            deadline=deadline,
            heartbeat_timeout=heartbeat_timeout,
            straggler_timeout=straggler_timeout,
            **kwargs,
        )
    )


set_sync_amqp_execution_context = installing(
    create_sync_amqp_execution_context, "sync AMQP context"
)
set_async_amqp_execution_context = installing(
    create_async_amqp_execution_context, "async AMQP context"
)
