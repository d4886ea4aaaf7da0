"""Where an invocation's time goes: the critical path of a federated mean.

A federated mean over 9 clients / 3 silo processes (or the mean and the
variance around it) is run N times, one at a time, with every AMQP message
time-stamped where it is published and where it is delivered, in the
coordinator and in each silo (`benchmarks/_timeline.py`; the processes share
the machine's monotonic clock). Each invocation is cut into the steps of its
critical path: the coordinator's work before the first request, the broker
hop to the silos, the silos' work (each one's delivery to its reply), the hop
back and the coordinator's work after the last reply, with the CPU time the
coordinator's event loop and each silo spent in them. TFF native's time for
the same invocations is measured in the same run.

The CPU profile (`cpu_profile.py`) says what the processes spend their CPU
on; this says which of it an invocation waits for.

    .venv/bin/python benchmarks/critical_path.py [--computation mean|mean_variance]
                                                [--invocations N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _timeline
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

HOOK = Path(__file__).resolve().parent / "timeline_hook"
SILOS = ["s1", "s2", "s3"]
WARMUP = 30

# The steps of an invocation, in order, and what each one spans.
STEPS: tuple[tuple[str, str], ...] = (
    ("coordinator, before the first request", "invocation starts -> first request published"),
    ("requests published", "first -> last request published"),
    ("broker to the first silo", "first request published -> delivered at a silo"),
    ("requests delivered", "first request published -> delivered at the last silo"),
    ("silo work, each", "a silo's delivery -> its reply published (median of the silos)"),
    ("silos done", "first delivery at a silo -> last reply published"),
    ("broker back to the coordinator", "last reply published -> delivered at the coordinator"),
    ("coordinator, after the last reply", "last reply delivered -> invocation returns"),
    ("whole invocation", "invocation starts -> returns"),
)


def _record_amqp(broker: str, which: str, invocations: int, out: Path) -> dict[str, Any]:
    comp, values = statistic(which)
    _timeline.install()  # before the coordinator consumes its queue
    with hooked_federation(broker, SILOS, HOOK, "TFF_AMQP_TIMELINE_DIR", out) as (_, pids):
        unrecorded = summary(timed(lambda: comp(values), invocations, warmup=WARMUP))
        progress(f"  tff-amqp: {unrecorded['median_s'] * 1e3:.2f} ms; recording ...")
        signal_all(pids, signal.SIGUSR1)
        time.sleep(0.5)  # every silo is recording before the first request
        _timeline.start()
        for i in range(invocations):
            _timeline.mark(f"start {i}")
            comp(values)
            _timeline.mark(f"end {i}")
        coordinator = _timeline.stop()
        signal_all(pids, signal.SIGUSR2)
        timelines = read_when_written(
            [out / f"{pid}.json" for pid in pids], lambda path: json.loads(path.read_text())
        )
    return {
        "unrecorded": unrecorded,
        "coordinator": coordinator,
        "silos": dict(zip(SILOS, timelines, strict=True)),
    }


def critical_paths(
    coordinator: list[Any], silos: dict[str, list[Any]]
) -> tuple[dict[str, list[float]], dict[str, list[float]], int]:
    """Per step, its duration (ms) in each invocation whose messages were all
    seen; per process, its CPU time (ms) in the invocation's silo phase; and
    how many invocations were left out (a message not seen)."""
    # Silo side: first delivery and first publish of each correlation id.
    at_silo: dict[str, dict[str, tuple[int, int]]] = {}
    for events in silos.values():
        for t, kind, correlation, cpu in events:
            if kind in ("recv", "pub") and correlation:
                at_silo.setdefault(kind, {}).setdefault(correlation, (t, cpu))
    steps: dict[str, list[float]] = {name: [] for name, _ in STEPS}
    cpu: dict[str, list[float]] = {"coordinator (event loop), silo phase": [], "silo, each": []}
    skipped = 0
    window: list[Any] = []
    for event in coordinator:
        if event[1] == "mark" and event[2].startswith("start"):
            window = [event]
            continue
        window.append(event)
        if not (event[1] == "mark" and event[2].startswith("end")):
            continue
        start, end = window[0], window[-1]
        published = [e for e in window if e[1] == "pub" and e[2]]
        requests = [e for e in published if e[2] in at_silo.get("recv", {})]
        delivered = {e[2]: e for e in window if e[1] == "recv" and e[2]}
        replies = [delivered.get(e[2]) for e in requests]
        silo_in = [at_silo["recv"][e[2]] for e in requests]
        silo_out = [at_silo.get("pub", {}).get(e[2]) for e in requests]
        if len(requests) < len(silos) or None in replies or None in silo_out:
            skipped += 1
            continue
        ms = 1e-6
        first_pub = min(e[0] for e in requests)
        last_reply_pub = max(t for t, _ in silo_out)  # type: ignore[misc]
        last_reply = max(r[0] for r in replies)  # type: ignore[index]
        durations = {
            "coordinator, before the first request": first_pub - start[0],
            "requests published": max(e[0] for e in requests) - first_pub,
            "broker to the first silo": min(t for t, _ in silo_in) - first_pub,
            "requests delivered": max(t for t, _ in silo_in) - first_pub,
            "silo work, each": statistics.median(
                o[0] - i[0]
                for i, o in zip(silo_in, silo_out, strict=True)  # type: ignore[index]
            ),
            "silos done": last_reply_pub - min(t for t, _ in silo_in),
            "broker back to the coordinator": last_reply - last_reply_pub,
            "coordinator, after the last reply": end[0] - last_reply,
            "whole invocation": end[0] - start[0],
        }
        for name, value in durations.items():
            steps[name].append(value * ms)
        first = min(requests)
        last = max(replies)  # type: ignore[type-var]
        cpu["coordinator (event loop), silo phase"].append((last[3] - first[3]) * ms)  # type: ignore[index]
        for i, o in zip(silo_in, silo_out, strict=True):
            cpu["silo, each"].append((o[1] - i[1]) * ms)  # type: ignore[index]
    return steps, cpu, skipped


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
    progress(f"critical path: {args.computation}, {invocations} invocations, 3 silos")
    native = time_native(*statistic(args.computation), invocations, WARMUP)
    progress(f"  TFF native: {native['median_s'] * 1e3:.2f} ms")
    with tempfile.TemporaryDirectory(prefix="tff-amqp-timeline-") as out:
        amqp = _record_amqp(args.broker, args.computation, invocations, Path(out))
    steps, cpu, skipped = critical_paths(amqp["coordinator"], amqp["silos"])
    if not steps["whole invocation"]:
        raise SystemExit("no invocation had all its messages recorded")

    rows = [{"step": name, "spans": spans, **summary(steps[name], "ms")} for name, spans in STEPS]
    cpu_rows = [{"process": name, **summary(samples, "ms")} for name, samples in cpu.items()]
    native_ms = native["median_s"] * 1e3
    print()
    print_table(
        ["step", "median ms", "p10", "p90", "spans"],
        [[r["step"], r["median_ms"], r["p10_ms"], r["p90_ms"], r["spans"]] for r in rows],
    )
    print()
    print_table(
        ["CPU time in an invocation", "median ms", "p10", "p90"],
        [[r["process"], r["median_ms"], r["p10_ms"], r["p90_ms"]] for r in cpu_rows],
    )
    whole = statistics.median(steps["whole invocation"])
    print(
        f"\nTFF native {native_ms:.2f} ms; tff-amqp {whole:.2f} ms recorded "
        f"({whole / native_ms:.2f}x), {amqp['unrecorded']['median_s'] * 1e3:.2f} ms unrecorded; "
        f"{len(steps['whole invocation'])} invocations cut into steps, {skipped} left out"
    )
    write_result(
        "critical_path",
        {
            "machine": machine(),
            "computation": args.computation,
            "invocations": invocations,
            "clients": 9,
            "silos": len(SILOS),
            "native": native,
            "tff_amqp_unrecorded": amqp["unrecorded"],
            "ratio_recorded": whole / native_ms,
            "invocations_cut": len(steps["whole invocation"]),
            "invocations_left_out": skipped,
            "steps": rows,
            "cpu": cpu_rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
