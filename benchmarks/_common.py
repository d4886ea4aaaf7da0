"""Shared helpers of the benchmarks: timing, TFF's native context with owned
clean-up, machine description and result files."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import platform
import signal
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tff_amqp.processes import child_pids_named, reaping_children

# TFF_AMQP_BENCH_RESULTS: write elsewhere (e.g. a one-off run that must not
# replace the suite's results).
RESULTS = Path(os.environ.get("TFF_AMQP_BENCH_RESULTS") or Path(__file__).parent / "results")

# Keep TensorFlow's and gRPC's C++ logging (theirs and native's worker_binary)
# out of the benchmark output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")  # see tff_amqp/__init__.py
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def summary(samples: list[float], unit: str = "s") -> dict[str, float]:
    """Median, p10 and p90 of `samples` (keys named by their `unit`) and n."""
    ordered = sorted(samples)
    return {
        f"median_{unit}": statistics.median(ordered),
        f"p10_{unit}": ordered[int(0.1 * (len(ordered) - 1))],
        f"p90_{unit}": ordered[int(0.9 * (len(ordered) - 1))],
        "n": len(ordered),
    }


def time_native(comp: Any, arg: Any, invocations: int, warmup: int) -> dict[str, float]:
    """`summary` of `comp(arg)` run `invocations` times in TFF's native runtime."""
    import tensorflow_federated as tff

    with native_context() as context, tff.framework.get_context_stack().install(context):
        return summary(timed(lambda: comp(arg), invocations, warmup=warmup))


@contextlib.contextmanager
def hooked_federation(
    broker: str, silos: list[str], hook: Path, variable: str, out: Path
) -> Iterator[tuple[Any, list[int]]]:
    """A local federation of `silos` processes that import
    `hook/sitecustomize.py` at start-up (this repository importable; `out`,
    named by the environment `variable`, is where they write), and a started
    synchronous context over all of them, installed as TFF's default:
    (context, the silos' pids). Processes stopped and the federation deleted
    from the broker afterwards."""
    import tensorflow_federated as tff

    import tff_amqp
    from tff_amqp.local import LocalFederation, SiloOptions

    repo = Path(__file__).resolve().parent.parent
    path = os.pathsep.join(p for p in (str(hook), str(repo), os.environ.get("PYTHONPATH")) if p)
    options = SiloOptions(env={"PYTHONPATH": path, variable: str(out)})
    federation = f"bench-{uuid.uuid4().hex[:6]}"
    try:
        with LocalFederation(broker, federation) as local:
            for name in silos:
                local.start_silo(name, options=options)
            progress(f"  starting {len(silos)} silos ...")
            local.wait_ready(timeout=180)
            pids = [local.silos[name].process.pid for name in silos]  # type: ignore[union-attr]
            with (
                tff_amqp.create_sync_amqp_execution_context(
                    broker, federation=federation, min_silos=len(silos), cohort_timeout=120
                ) as context,
                tff.framework.get_context_stack().install(context),
            ):
                yield context, pids
    finally:
        delete_federation(broker, federation, silos)


def signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        os.kill(pid, signum)


def read_when_written(
    paths: list[Path], read: Callable[[Path], Any], timeout: float = 30
) -> list[Any]:
    """`read(path)` of every path, once each has been written completely (a
    read that raises ValueError or OSError means: not yet); RuntimeError
    naming those still missing after `timeout` seconds."""
    done: dict[Path, Any] = {}
    deadline = time.monotonic() + timeout
    while len(done) < len(paths) and time.monotonic() < deadline:
        for path in paths:
            if path not in done and path.exists():
                try:
                    done[path] = read(path)
                except (ValueError, OSError):
                    pass  # still being written
        if len(done) < len(paths):
            time.sleep(0.1)
    missing = [path.name for path in paths if path not in done]
    if missing:
        raise RuntimeError(f"not written within {timeout:.0f} s: {missing}")
    return [done[path] for path in paths]


@contextlib.contextmanager
def native_context() -> Iterator[Any]:
    """TFF's own native runtime; its worker_binary is killed on exit (TFF's
    launcher would leave it running)."""
    import tensorflow_federated as tff

    with reaping_children("worker_binary"):
        yield tff.backends.native.create_sync_local_cpp_execution_context()


_NATIVE_STUB_METHODS = {
    "get_executor": "GetExecutor",
    "create_value": "CreateValue",
    "create_struct": "CreateStruct",
    "create_call": "CreateCall",
    "create_selection": "CreateSelection",
    "compute": "Compute",
    "dispose": "Dispose",
}


@contextlib.contextmanager
def native_worker_calls() -> Iterator[collections.Counter[str]]:
    """Counts the gRPC calls TFF's native runtime makes to its worker_binary
    (benchmark instrumentation: wraps TFF's stub methods in this process
    while open), by the same method names the silos report."""
    from tensorflow_federated.python.core.impl.executors.remote_executor_grpc_stub import (
        RemoteExecutorGrpcStub,
    )

    calls: collections.Counter[str] = collections.Counter()
    originals = {name: getattr(RemoteExecutorGrpcStub, name) for name in _NATIVE_STUB_METHODS}

    def counted(name: str) -> Callable[..., Any]:
        def call(stub: Any, *args: Any, **kwargs: Any) -> Any:
            calls[_NATIVE_STUB_METHODS[name]] += 1
            return originals[name](stub, *args, **kwargs)

        return call

    for name in originals:
        setattr(RemoteExecutorGrpcStub, name, counted(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(RemoteExecutorGrpcStub, name, original)


def count_native(calls: collections.Counter[str], fn: Callable[[], Any]) -> dict[str, Any]:
    """Worker calls of one native invocation of `fn`."""
    before = dict(calls)
    fn()
    delta = {k: v - before.get(k, 0) for k, v in calls.items() if v - before.get(k, 0)}
    return {"worker_calls": sum(delta.values()), "by_method": delta}


def count_amqp(
    context: Any, silos: list[str], fn: Callable[[], Any], invocations: int = 5
) -> dict[str, Any]:
    """Worker calls (coordinator, each silo) and control messages per tff-amqp
    invocation of `fn` (sync context), its clean-up included: averaged over
    `invocations` back to back, so an invocation's close riding the next
    one's batches counts as it does in a steady stream (the last one's close
    goes alone: at most one message per silo over the whole run)."""
    from tff_amqp.coordinator.stateful.counts import snapshot

    before = context.run(snapshot(context.runtime, silos))
    for _ in range(invocations):
        fn()
    counts = context.run(snapshot(context.runtime, silos)).minus(before)

    def per(n: float) -> float:
        return round(n / invocations, 2)

    return {
        "invocations": invocations,
        "coordinator_worker_calls": per(counts.coordinator_total),
        "coordinator_by_method": {k: per(v) for k, v in counts.coordinator.items()},
        "silo_worker_calls": {s: per(counts.silo_total(s)) for s in silos},
        "silo_by_method": {
            s: {k: per(v) for k, v in calls.items()} for s, calls in counts.silos.items()
        },
        "broker_messages": per(counts.messages),
    }


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(_meminfo_mb("MemTotal:") / 1024, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo_mb(field: str) -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=float))
    return path


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [headers] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


# ---------------------------------------------------------------- processes
# Linux /proc readers (the benchmarks run on Linux, like the silos).

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident memory of one process in MiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def process_tree(pid: int) -> list[int]:
    """A process and every process below it (empty if it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.Error:
        return []


def broker_pids(url: str) -> list[int]:
    """The RabbitMQ node serving `url` on this machine: the process listening
    on its port (empty when the broker is elsewhere or not visible to us)."""
    from urllib.parse import urlsplit

    import psutil

    port = urlsplit(url.split(",")[0]).port or 5672
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.Error:
        return []
    return sorted(
        {c.pid for c in connections if c.pid and c.status == "LISTEN" and c.laddr.port == port}
    )


class CpuMeter:
    """CPU time (user + system, every thread) that named groups of processes
    ("roles") spend over a stretch of work, per invocation:

        with CpuMeter({"silos": pids, ...}) as meter:
            for _ in range(n):
                invoke()
        meter.per_invocation(n)

    "total_ms" sums the roles; "floor_ms" is the total over the machine's
    cores: no invocation can take less wall time when every core does only
    this work. A role with no process found is left out and named in
    "unmeasured"."""

    def __init__(self, roles: dict[str, list[int]]) -> None:
        self.unmeasured = [role for role, pids in roles.items() if not pids]
        self._roles = {role: pids for role, pids in roles.items() if pids}
        self._before: dict[str, float] = {}
        self._spent: dict[str, float] = {}
        self._started = 0.0
        self._wall = 0.0

    def _read(self) -> dict[str, float]:
        return {role: sum(cpu_seconds(pid) for pid in pids) for role, pids in self._roles.items()}

    def __enter__(self) -> CpuMeter:
        self._before = self._read()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._wall = time.perf_counter() - self._started
        after = self._read()
        self._spent = {role: after[role] - self._before[role] for role in self._roles}

    def per_invocation(self, invocations: int) -> dict[str, Any]:
        per = {role: seconds * 1e3 / invocations for role, seconds in self._spent.items()}
        total = sum(per.values())
        return {
            "invocations": invocations,
            "ms": {role: round(ms, 3) for role, ms in per.items()},
            "total_ms": round(total, 3),
            "floor_ms": round(total / (os.cpu_count() or 1), 3),
            "wall_ms": round(self._wall * 1e3 / invocations, 3),
            "unmeasured": self.unmeasured,
        }


def cpu_by_role(
    roles: dict[str, list[int]], fn: Callable[[], Any], invocations: int
) -> dict[str, Any]:
    """`CpuMeter` over `invocations` calls of `fn` back to back."""
    with CpuMeter(roles) as meter:
        for _ in range(invocations):
            fn()
    return meter.per_invocation(invocations)


def native_roles() -> dict[str, list[int]]:
    """TFF native: this process and the worker_binary it started."""
    return {
        "coordinator": [os.getpid()],
        "coordinator worker": sorted(child_pids_named("worker_binary")),
    }


# The roles `amqp_roles` names, in the order the tables show them.
CPU_ROLES = ("coordinator", "coordinator worker", "silos", "silo workers", "broker")


def amqp_roles(local: Any, broker: list[int]) -> dict[str, list[int]]:
    """tff-amqp: this process (the coordinator) and its worker_binary, the
    silo-side processes of `local` (a `LocalFederation`: silos or simulation
    hosts), their worker_binaries and the broker's processes (`broker_pids`
    for a node serving a URL here)."""
    silos = [process.pid for process in local.silos.values() if process.running]
    return {
        "coordinator": [os.getpid()],
        "coordinator worker": sorted(child_pids_named("worker_binary")),
        "silos": silos,
        "silo workers": sorted(
            worker for pid in silos for worker in child_pids_named("worker_binary", pid)
        ),
        "broker": broker,
    }


def available_memory_mb() -> float:
    available = _meminfo_mb("MemAvailable:")
    return float("inf") if available != available else available  # NaN: unknown


def stop_on_sigterm() -> None:
    """SIGTERM raises SystemExit, so `with` blocks stop every process we
    started (Ctrl-C does the same through KeyboardInterrupt)."""

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------ broker
# The silos' request queues and the federation's exchanges are durable: a
# benchmark deletes its own federation's when it is done, so the shared broker
# does not collect them. (The coordinator's queue is auto-delete.)


async def delete_federation_async(broker: str, federation: str, silos: list[str]) -> None:
    import aio_pika

    from tff_amqp.topology import Topology

    topology = Topology(federation)
    # The schema's lists: every silo queue (broadcast streams included), every exchange.
    queues = [spec.name for s in silos for spec in topology.silo_queue_specs(s)]
    queues += [topology.coordinator_queue, topology.coordinator_bulk_queue]
    exchanges = list(topology.exchanges())
    connection = await aio_pika.connect(broker, timeout=10)
    try:
        channel = await connection.channel()
        for queue in queues:
            # Deleting a queue or exchange that does not exist is not an error.
            await channel.queue_delete(queue)
        for exchange in exchanges:
            await channel.exchange_delete(exchange)
    finally:
        await connection.close()


def delete_federation(broker: str, federation: str, silos: list[str]) -> None:
    """Best effort, bounded: a failure here is reported, not raised."""
    import asyncio

    try:
        asyncio.run(asyncio.wait_for(delete_federation_async(broker, federation, silos), 30))
    except Exception as e:
        print(f"note: could not delete federation {federation!r} from the broker: {e}")
