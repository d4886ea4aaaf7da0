"""The coordinator's optional watchers, per the context options
``metrics_port`` and ``progress``: started with the runtime, closed with it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from tff_amqp.observe.cohort_wait import CohortWaitDisplay
from tff_amqp.observe.events import InvocationEvents
from tff_amqp.observe.metrics import CoordinatorMetrics, MetricsServer
from tff_amqp.observe.progress import ProgressDisplay, progress_enabled


class CoordinatorTelemetry:
    """Metrics endpoint and progress display of one coordinator runtime,
    either regime's: `options` are its CoordinatorOptions, `events` what its
    invocations (or rounds) report, `link_stats` its broker link's counters."""

    def __init__(
        self,
        options: Any,
        events: InvocationEvents,
        membership: Any,
        link_stats: Callable[[], Mapping[str, int] | None],
    ) -> None:
        self._events = events
        self.metrics: CoordinatorMetrics | None = None
        self.server: MetricsServer | None = None
        self.progress: ProgressDisplay | None = None
        if options.metrics_port is not None:
            self.metrics = CoordinatorMetrics(options.federation, membership, link_stats)
            self.server = MetricsServer(self.metrics.registry, options.metrics_port)
            self._events.add(self.metrics)
        self.cohort_wait: CohortWaitDisplay | None = None
        if progress_enabled(options.progress):
            self.progress = ProgressDisplay()
            self._events.add(self.progress)
            # Say what a cohort wait waits for, instead of minutes of silence.
            self.cohort_wait = CohortWaitDisplay(options, membership)
            self._events.add(self.cohort_wait)

    @property
    def metrics_port(self) -> int | None:
        return self.server.port if self.server is not None else None

    def close(self) -> None:
        if self.cohort_wait is not None:
            self.cohort_wait.close()
        for observer in (self.metrics, self.progress, self.cohort_wait):
            if observer is not None:
                self._events.remove(observer)
        if self.server is not None:
            self.server.close()
            self.server = None
