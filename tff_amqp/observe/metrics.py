"""Prometheus metrics of a coordinator and of a silo.

Each component has its own `CollectorRegistry` (several coordinators and
silos can live in one process, e.g. in tests). Transport counters are read
from the existing ``link.stats`` / ``agent.stats`` dicts at scrape time, so
the hot paths only bump plain integers; invocation events and latencies come
from the invocation observer interface (`tff_amqp.observe.events`).

Coordinator: context option ``metrics_port`` (None: off). Silo:
``tff-amqp silo --metrics-port PORT``. Both serve ``/metrics`` over HTTP.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tff_amqp.errors import TffAmqpError
from tff_amqp.observe.events import InvocationObserver

log = logging.getLogger(__name__)

# Seconds: from a fast local mean (~10 ms) to long local training.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)

# stats key -> (metric name without prefix, help)
COORDINATOR_STATS: dict[str, tuple[str, str]] = {
    "published": ("published_messages", "request messages published to silos"),
    "published_bytes": ("published_bytes", "bytes of request messages published"),
    "received_bytes": ("received_bytes", "bytes of replies, heartbeats and dead letters received"),
    "replies": ("replies", "replies matched to a pending request"),
    "late_replies": ("late_replies", "replies of dropped silos discarded as late"),
    "rejected_replies": ("rejected_replies", "replies refused (wrong sender or no user id)"),
    "unknown_replies": ("unknown_replies", "replies matching no pending request"),
    "malformed": ("malformed_messages", "messages that failed protocol decoding"),
    "dead_lettered": ("dead_lettered", "requests dead-lettered back (expired or rejected)"),
    "unroutable": ("unroutable", "requests returned by the broker: no queue for the silo"),
    "reconnects": ("reconnects", "reconnections of the broker connection"),
    "rejected_user_id": ("rejected_user_id", "replies refused for a user id not the silo's"),
    "results": ("work_results", "work-item results merged (stateless regime)"),
    "duplicate_results": ("duplicate_work_results", "work-item results already merged"),
    "late_results": ("late_work_results", "work-item results of dropped silos"),
}
POOL_WORKER_STATS: dict[str, tuple[str, str]] = {
    "items": ("items", "work items completed"),
    "errors": ("errors", "work items answered with an error"),
    "redelivered": ("redelivered", "work items received again (another worker died with them)"),
    "expired": ("expired", "work items received after their round's deadline"),
    "malformed": ("malformed_messages", "messages that failed protocol decoding"),
    "published_bytes": ("published_bytes", "bytes of results and heartbeats published"),
    "reconnects": ("reconnects", "reconnections of the broker connection"),
    "broadcast_fetches": ("broadcast_fetches", "large broadcasts read from the silo's stream"),
    "broadcast_cache_hits": (
        "broadcast_cache_hits",
        "work items that used a broadcast this worker had already read",
    ),
    "broadcast_read_bytes": (
        "broadcast_read_bytes",
        "bytes of chunk messages read from the silo's broadcast stream",
    ),
}
SILO_STATS: dict[str, tuple[str, str]] = {
    "invocations": ("invocations", "invocations this silo took part in"),
    "batches": ("batches", "request batches applied"),
    "errors": ("errors", "batches that failed with an error reply"),
    "duplicates": ("duplicates", "duplicate messages ignored"),
    "expired": ("expired", "requests received after their deadline"),
    "malformed": ("malformed_messages", "messages that failed protocol decoding"),
    "received_bytes": ("received_bytes", "bytes of request messages received"),
    "published_bytes": ("published_bytes", "bytes of replies and heartbeats published"),
    "reconnects": ("reconnects", "reconnections of the broker connection"),
}


class StatsCollector(Collector):
    """Exposes a live ``stats`` dict as counters named ``<prefix>_<name>_total``."""

    def __init__(
        self,
        prefix: str,
        stats: Callable[[], Mapping[str, int] | None],
        names: Mapping[str, tuple[str, str]],
        labels: Mapping[str, str],
    ) -> None:
        self._prefix = prefix
        self._stats = stats
        self._names = names
        self._labels = dict(labels)

    def collect(self) -> Iterator[Metric]:
        stats = self._stats() or {}
        for key, (name, help_text) in self._names.items():
            family = CounterMetricFamily(
                f"{self._prefix}_{name}", help_text, labels=list(self._labels)
            )
            family.add_metric(list(self._labels.values()), float(stats.get(key, 0)))
            yield family


class CoordinatorMetrics(InvocationObserver):
    """Coordinator metrics; register it as an observer of the runtime's events."""

    def __init__(
        self,
        federation: str,
        membership: Any,
        link_stats: Callable[[], Mapping[str, int] | None],
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"federation": federation}
        self.invocations = Counter(
            "tff_amqp_coordinator_invocations",
            "invocations finished, by outcome",
            ["federation", "outcome"],
            registry=self.registry,
        )
        self.phase_seconds = Histogram(
            "tff_amqp_coordinator_phase_seconds",
            "latency of invocation phases: cohort (waiting for silos), gather "
            "(waiting for released values), invocation (end to end)",
            ["federation", "phase"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.dropped = Counter(
            "tff_amqp_coordinator_silos_dropped",
            "silos dropped from an invocation, by reason (straggler, lost)",
            ["federation", "reason"],
            registry=self.registry,
        )
        self.silo_replies = Counter(
            "tff_amqp_coordinator_gather_replies",
            "released values received in gathers, by silo",
            ["federation", "silo"],
            registry=self.registry,
        )
        self._federation = federation
        self.registry.register(
            StatsCollector("tff_amqp_coordinator", link_stats, COORDINATOR_STATS, labels)
        )
        self.registry.register(_LiveSilos(membership, labels))

    def cohort_chosen(self, invocation: str, silos: Sequence[str], waited: float) -> None:
        self.phase_seconds.labels(self._federation, "cohort").observe(waited)

    def silo_replied(self, invocation: str, silo: str) -> None:
        self.silo_replies.labels(self._federation, silo).inc()

    def gather_finished(self, invocation: str, replied: Sequence[str], seconds: float) -> None:
        self.phase_seconds.labels(self._federation, "gather").observe(seconds)

    def silos_dropped(self, invocation: str, silos: Sequence[str], reason: str) -> None:
        self.dropped.labels(self._federation, reason).inc(len(silos))

    def invocation_finished(self, invocation: str, ok: bool, seconds: float) -> None:
        self.invocations.labels(self._federation, "ok" if ok else "error").inc()
        self.phase_seconds.labels(self._federation, "invocation").observe(seconds)


class _LiveSilos(Collector):
    def __init__(self, membership: Any, labels: Mapping[str, str]) -> None:
        self._membership = membership
        self._labels = dict(labels)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "tff_amqp_coordinator_live_silos",
            "silos whose heartbeats are current",
            labels=list(self._labels),
        )
        family.add_metric(list(self._labels.values()), float(len(self._membership.live())))
        yield family


class _SiloSideMetrics:
    """Counters of a silo-side process's `stats` and a latency histogram of
    its units of work, in a registry of its own."""

    def __init__(
        self,
        prefix: str,
        labels: Mapping[str, str],
        stats: Callable[[], Mapping[str, int] | None],
        names: Mapping[str, tuple[str, str]],
        observers: list[Callable[[float, bool], None]],
        timing: tuple[str, str],
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(StatsCollector(prefix, stats, names, labels))
        self.seconds = Histogram(
            f"{prefix}_{timing[0]}",
            timing[1],
            [*labels, "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._labels = list(labels.values())
        observers.append(self._observe)

    def _observe(self, seconds: float, ok: bool) -> None:
        self.seconds.labels(*self._labels, "ok" if ok else "error").observe(seconds)


class SiloMetrics(_SiloSideMetrics):
    """A silo agent's metrics: its counters and a batch latency histogram."""

    def __init__(self, agent: Any) -> None:
        super().__init__(
            "tff_amqp_silo",
            {"federation": agent.config.federation, "silo": agent.config.name},
            lambda: agent.stats,
            SILO_STATS,
            agent.batch_observers,
            ("batch_seconds", "time to apply one request batch on the local worker, by outcome"),
        )


class PoolWorkerMetrics(_SiloSideMetrics):
    """A pool worker's metrics: its counters and a work-item latency histogram."""

    def __init__(self, worker: Any) -> None:
        super().__init__(
            "tff_amqp_worker",
            {"federation": worker.config.federation, "silo": worker.config.silo},
            lambda: worker.stats,
            POOL_WORKER_STATS,
            worker.item_observers,
            ("item_seconds", "time to run one work item on the local worker, by outcome"),
        )


class MetricsServer:
    """``/metrics`` of one registry over HTTP, on a daemon thread; a context
    manager that always shuts the server down. Port 0 picks a free port."""

    def __init__(self, registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> None:
        try:
            self._server, self._thread = start_http_server(port, addr=addr, registry=registry)
        except OSError as e:
            raise TffAmqpError(
                f"cannot serve Prometheus metrics on {addr}:{port} ({e}); choose another "
                "metrics port (0 picks a free one)"
            ) from e
        self.port: int = self._server.server_port
        log.info("metrics.listening", extra={"port": self.port, "addr": addr})

    @classmethod
    def optional(cls, registry: CollectorRegistry, port: int | None) -> _Optional:
        return _Optional(registry, port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Optional:
    """`with MetricsServer.optional(registry, port)`: a server only if port is not None."""

    def __init__(self, registry: CollectorRegistry, port: int | None) -> None:
        self._registry, self._port = registry, port
        self.server: MetricsServer | None = None

    def __enter__(self) -> MetricsServer | None:
        if self._port is not None:
            self.server = MetricsServer(self._registry, self._port)
        return self.server

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.server is not None:
            self.server.close()
