"""The one list of benchmarks `benchmarks/run_all` runs and RESULTS.md reports.

A benchmark is a script `benchmarks/<name>.py` that writes
`benchmarks/results/<name>.json` (and optionally `<name>*.png`). Entries whose
script does not exist (yet) are skipped with a note, so branches that add one
only need to be merged. `quick_args=None` means: pass `--quick` if the
script's `--help` mentions it, else run it with its defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    measures: str
    full_args: tuple[str, ...] = ()
    quick_args: tuple[str, ...] | None = None

    @property
    def script(self) -> Path:
        return HERE / f"{self.name}.py"

    @property
    def exists(self) -> bool:
        return self.script.is_file()


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "overhead",
        "Overhead against TFF native",
        "a federated mean, two aggregation phases with a broadcast between (the mean, then the "
        "variance around it) and one FedAvg round (small Keras model), 9 clients over 3 silo "
        "processes, against TFF's native runtime in the same process",
        quick_args=("--repeats", "2"),
    ),
    Benchmark(
        "cpu_profile",
        "Where the CPU goes",
        "a CPU-time profile (cProfile) of the coordinator's event loop and of the 3 silo "
        "processes over the same federated means, by part of the stack (asyncio, the AMQP "
        "client, gRPC, tff-amqp's own code), next to TFF native's time in the same run",
        quick_args=("--quick",),
    ),
    Benchmark(
        "critical_path",
        "Where an invocation's time goes",
        "the critical path of the same federated means, one at a time: every AMQP message "
        "time-stamped where it is published and delivered (coordinator and 3 silo processes, "
        "one clock), each invocation cut into steps (coordinator before the first request, "
        "broker hops, silo work, coordinator after the last reply) with each process's CPU "
        "time in them, next to TFF native's time in the same run",
        quick_args=("--quick",),
    ),
    Benchmark(
        "stragglers",
        "Straggler timeout (K of N)",
        "round time of a federated mean over 8 silos / 16 clients when one client is slowed by "
        "D seconds: TFF native, tff-amqp waiting for all, tff-amqp with straggler_timeout",
        quick_args=("--delays", "0", "5", "--repeats", "1"),
    ),
    Benchmark(
        "scale",
        "Scale to many silos",
        "a federated mean and one FedAvg round with 1..64 silos (one client each, simulation "
        "hosts), TFF native with as many clients; coordinator CPU and memory; RSS per silo",
        quick_args=("--quick",),
    ),
    Benchmark(
        "throughput",
        "Pipelined throughput",
        "invocations and executor operations per second with C invocations in flight, against "
        "TFF native and the broker's raw request/reply ceiling at the same sizes",
        quick_args=("--quick",),
    ),
    Benchmark(
        "payloads",
        "Large payloads",
        "broadcast of large models through the broker (from the payload work)",
    ),
    Benchmark(
        "stateless_scaling",
        "Stateless work scaling",
        "stateless work queues spread over many workers (from the stateless-scaling work)",
    ),
    Benchmark(
        "data",
        "Reading silo data",
        "rows/s from a 1 million-row CSV and XLSX file into a client's typed columns: the "
        "pyarrow CSV path and python-calamine against the previous Python csv path",
        quick_args=("--quick",),
    ),
    Benchmark(
        "stateless_bulk",
        "Stateless large broadcasts",
        "a 16 MB model broadcast to 2 silo pools of 4 work items each: once per round into the "
        "silos' streams, against inline in every work item; round time and bytes published",
        quick_args=("--repeats", "1"),
    ),
    Benchmark(
        "cluster",
        "One node vs a 3-node cluster",
        "a federated mean and one FedAvg round (as overhead) on one private RabbitMQ node with "
        "classic queues vs a private 3-node cluster with quorum queues, same run; the time from "
        "kill -9 of the node leading most queues to the next successful invocation",
        quick_args=("--quick",),
    ),
)


def by_name(name: str) -> Benchmark:
    for benchmark in BENCHMARKS:
        if benchmark.name == name:
            return benchmark
    known = ", ".join(b.name for b in BENCHMARKS)
    raise KeyError(f"no benchmark named {name!r}; known: {known}")
