"""Where the CPU goes: a CPU-time profile of the coordinator and of every silo, by part.

A federated mean over 9 clients / 3 silo processes (or the mean and the
variance around it) is run N times with cProfile on the coordinator's
event-loop thread and on each silo's main thread (the silo's event loop),
timed by each thread's own CPU time, after warm-up invocations. The own time
of every function is summed by the part of the stack it belongs to (asyncio's
scheduling, the AMQP client, gRPC, TFF, tff-amqp's own code by role), so the
table says what the remaining overhead is made of. TFF native's time for the
same invocations is measured in the same run, unprofiled, as is tff-amqp's.
cProfile itself slows Python code down, so shares are what to read, not the
profiled milliseconds.

    .venv/bin/python benchmarks/cpu_profile.py [--computation mean|mean_variance]
                                           [--invocations N] [--quick]
"""

from __future__ import annotations

import argparse
import collections
import os
import pstats
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    hooked_federation,
    machine,
    print_table,
    progress,
    read_when_written,
    signal_all,
    stop_on_sigterm,
    summary,
    time_native,
    timed,
    write_result,
)
from benchmarks.overhead import statistic

HOOK = Path(__file__).resolve().parent / "profile_hook"
SILOS = ["s1", "s2", "s3"]
WARMUP = 30
TOP = 12

# The part of the stack a function's own time is charged to: the first rule
# whose pattern is in its file name (or, for built-ins, its name).
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("asyncio event loop", ("asyncio/", "selectors.py", "'run' of '_contextvars", "epoll")),
    ("AMQP client (aio-pika, aiormq, pamqp)", ("aio_pika/", "aiormq/", "pamqp/")),
    ("gRPC client (grpc.aio)", ("grpc/",)),
    ("socket I/O", ("_socket.socket",)),
    ("TFF and TensorFlow (Python)", ("tensorflow_federated/", "tensorflow/")),
    ("NumPy", ("numpy/",)),
    ("tff-amqp: wire protocol", ("tff_amqp/protocol.py", "msgpack")),
    ("tff-amqp: transport", ("tff_amqp/transport/",)),
    ("tff-amqp: coordinator", ("tff_amqp/coordinator/",)),
    ("tff-amqp: silo", ("tff_amqp/silo/",)),
    ("tff-amqp: phase plans, worker client", ("tff_amqp/tff_worker/",)),
    ("tff-amqp: in-process values and plans", ("tff_amqp/inprocess/",)),
    ("tff-amqp: other", ("tff_amqp/",)),
    ("Python built-ins (isinstance, len, dict...)", ("<built-in", "<method")),
)
OTHER = "other Python (standard library, abc, typing...)"


def part_of(file: str, function: str) -> str:
    where = f"{file} {function}"
    for part, patterns in PARTS:
        if any(pattern in where for pattern in patterns):
            return part
    return OTHER


def breakdown(stats: pstats.Stats) -> tuple[float, dict[str, float], list[tuple[str, float]]]:
    """(total CPU seconds, seconds by part, the TOP functions by own time)."""
    by_part: collections.Counter[str] = collections.Counter()
    functions: list[tuple[str, float]] = []
    for (file, line, function), (_, _, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        by_part[part_of(file, function)] += own
        short = "/".join(Path(file).parts[-2:]) if file != "~" else ""
        functions.append((f"{function} ({short}:{line})" if short else function, own))
    functions.sort(key=lambda item: -item[1])
    return sum(by_part.values()), dict(by_part), functions[:TOP]


def _profile_amqp(broker: str, which: str, invocations: int, out: Path) -> dict[str, Any]:
    import cProfile

    comp, values = statistic(which)
    with hooked_federation(broker, SILOS, HOOK, "TFF_AMQP_PROFILE_DIR", out) as (ctx, pids):
        unprofiled = summary(timed(lambda: comp(values), invocations, warmup=WARMUP))
        progress(f"  tff-amqp: {unprofiled['median_s'] * 1e3:.2f} ms; profiling ...")
        profile = cProfile.Profile(timer=time.thread_time)

        async def start() -> None:  # on the context's event-loop thread
            profile.enable()

        async def stop() -> None:
            profile.disable()

        signal_all(pids, signal.SIGUSR1)
        ctx.run(start())
        started = time.perf_counter()
        for _ in range(invocations):
            comp(values)
        profiled_s = (time.perf_counter() - started) / invocations
        ctx.run(stop())
        signal_all(pids, signal.SIGUSR2)
        files = [out / f"{pid}.prof" for pid in pids]
        read_when_written(files, lambda path: path.stat())
        time.sleep(0.5)  # the last file is complete once its writer is done
        silo_stats = pstats.Stats(*(str(f) for f in files))
    return {
        "unprofiled": unprofiled,
        "profiled_ms": profiled_s * 1e3,
        "coordinator": breakdown(pstats.Stats(profile)),
        "silos": breakdown(silo_stats),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--broker", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument("--computation", choices=["mean", "mean_variance"], default="mean")
    parser.add_argument("--invocations", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="40 invocations")
    args = parser.parse_args()
    invocations = 40 if args.quick else args.invocations

    stop_on_sigterm()
    progress(f"profile: {args.computation}, {invocations} invocations, 3 silos")
    native = time_native(*statistic(args.computation), invocations, WARMUP)
    progress(f"  TFF native: {native['median_s'] * 1e3:.2f} ms")
    with tempfile.TemporaryDirectory(prefix="tff-amqp-profile-") as out:
        amqp = _profile_amqp(args.broker, args.computation, invocations, Path(out))

    coordinator_total, coordinator_parts, coordinator_top = amqp["coordinator"]
    silos_total, silo_parts, silo_top = amqp["silos"]
    per_invocation = {
        "coordinator": coordinator_total / invocations * 1e3,
        "silos": silos_total / invocations * 1e3,
    }
    parts = sorted(
        set(coordinator_parts) | set(silo_parts),
        key=lambda p: -(coordinator_parts.get(p, 0.0) + silo_parts.get(p, 0.0)),
    )
    print()
    print_table(
        ["per invocation", "TFF native ms", "tff-amqp ms", "ratio",
         "profiled: coordinator CPU ms", "profiled: silos CPU ms"],
        [[args.computation, native["median_s"] * 1e3, amqp["unprofiled"]["median_s"] * 1e3,
          amqp["unprofiled"]["median_s"] / native["median_s"],
          per_invocation["coordinator"], per_invocation["silos"]]],
    )  # fmt: skip
    print()
    share = {
        part: {
            "coordinator": 100 * coordinator_parts.get(part, 0.0) / coordinator_total,
            "silos": 100 * silo_parts.get(part, 0.0) / silos_total,
        }
        for part in parts
    }
    print_table(
        ["part of the CPU time", "coordinator %", "silos %"],
        [[part, s["coordinator"], s["silos"]] for part, s in share.items()],
    )
    for role, top, total in (
        ("coordinator", coordinator_top, coordinator_total),
        ("silos", silo_top, silos_total),
    ):
        print()
        print_table(
            [f"{role}: functions by own CPU time", "%"],
            [[name, 100 * own / total] for name, own in top],
        )
    path = write_result(
        "cpu_profile",
        {
            "machine": machine(),
            "quick": args.quick,
            "computation": args.computation,
            "invocations": invocations,
            "clients": 9,
            "silos": len(SILOS),
            "native": native,
            "tff_amqp": amqp["unprofiled"],
            "ratio": amqp["unprofiled"]["median_s"] / native["median_s"],
            # CPU ms per invocation under cProfile (slower than unprofiled).
            "profiled_cpu_ms": per_invocation,
            "share_percent": share,
            # Each role's functions with the most own CPU time, % of the role's.
            "top_coordinator": [
                {"function": n, "percent": 100 * s / coordinator_total} for n, s in coordinator_top
            ],
            "top_silos": [{"function": n, "percent": 100 * s / silos_total} for n, s in silo_top],
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
