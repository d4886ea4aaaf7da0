"""benchmarks/run_all and the RESULTS.md report: fast checks without a broker.

The benchmarks themselves run against the real broker via `benchmarks/run_all`;
here: the report renders any result file (including ones from benchmarks
merged later), labels quick and loaded runs, and the runner records failures
and stops an overrunning benchmark with everything it started.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from benchmarks import registry, report, run_all


def _write(path: Path, data: object) -> None:
    path.write_text(json.dumps(data))


def _machine(load: float) -> dict[str, object]:
    return {
        "cpus": 2,
        "cpu_model": "test cpu",
        "memory_gib": 24,
        "python": "3.11",
        "platform": "Linux",
        "load_average": [load, load, load],
        "when": "2026-01-01T00:00:00Z",
    }


def test_report_labels_a_quick_run_on_a_loaded_machine_and_renders_unknown_results(
    tmp_path: Path,
) -> None:
    _write(
        tmp_path / "run_all.json",
        {
            "quick": True,
            "note": "lead's note",
            "machine_at_start": _machine(6.0),
            "machine_at_end": _machine(5.0),
            "benchmarks": {
                "payloads": {"status": "ok", "seconds": 12.5, "args": ["--quick"], "quick": True}
            },
        },
    )
    # A result from a benchmark this report has no section for.
    _write(
        tmp_path / "payloads.json",
        {
            "machine": _machine(1.0),
            "model_mb": 64,
            "runs": [
                {"size_mb": 1, "tff_amqp": {"median_s": 0.5}, "native": {"median_s": 0.25}},
                {"size_mb": 64, "tff_amqp": {"median_s": 3.0}, "native": {"median_s": 1.5}},
            ],
            "by_mode": {"chunked": {"median_s": 1.25}, "inline": {"median_s": 2.5}},
        },
    )
    (tmp_path / "payloads.png").write_bytes(b"png")
    text = report.render(tmp_path)
    assert "**Caution:** These numbers were taken with the `--quick` settings" in text
    assert "loaded machine" in text and "6.0 at start" in text
    assert "lead's note" in text
    assert "## Large payloads (`payloads`)" in text
    assert "| size_mb | tff_amqp.median_s | native.median_s |" in text
    assert "| 64 | 3 | 1.5 |" in text
    assert "| chunked | 1.25 |" in text
    assert "- model_mb: 64" in text
    assert "![payloads](results/payloads.png)" in text


def test_report_names_the_quick_benchmarks_of_a_mixed_run(tmp_path: Path) -> None:
    _write(
        tmp_path / "run_all.json",
        {
            "quick": False,
            "machine_at_start": _machine(0.2),
            "machine_at_end": _machine(0.2),
            "benchmarks": {
                "scale": {"status": "ok", "quick": False},
                "throughput": {"status": "ok", "quick": True},
            },
        },
    )
    text = report.render(tmp_path)
    assert "The numbers of throughput were taken with the `--quick` settings" in text
    assert "loaded machine" not in text


def test_report_falls_back_to_the_generic_table_for_an_unexpected_shape(tmp_path: Path) -> None:
    _write(tmp_path / "overhead.json", {"machine": _machine(0.1), "rows": [{"a": 1.5}]})
    text = report.render(tmp_path)
    assert "tailored table unavailable: KeyError" in text
    assert "| a |" in text and "| 1.5 |" in text
    assert "loaded machine" not in text  # no run record: no label invented


def test_registry_lists_every_benchmark_once_and_finds_existing_scripts() -> None:
    names = [b.name for b in registry.BENCHMARKS]
    assert len(names) == len(set(names))
    assert {"overhead", "stragglers", "scale", "throughput", "payloads"} <= set(names)
    assert all(registry.by_name(n).exists for n in ("overhead", "stragglers", "scale"))
    with pytest.raises(KeyError, match="known: overhead"):
        registry.by_name("nope")


def test_run_all_stops_an_overrunning_benchmark_and_its_children(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    child_pid_file = tmp_path / "child.pid"
    (tmp_path / "slow.py").write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen(['sleep', '300'])\n"
        f"open({str(child_pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(300)\n"
    )
    (tmp_path / "broken.py").write_text("raise SystemExit(3)\n")
    monkeypatch.setattr(registry, "HERE", tmp_path)
    slow = registry.Benchmark("slow", "Slow", "nothing")
    started = time.monotonic()
    result = run_all.run_one(slow, [], timeout=3.0, broker="amqp://x")
    assert result["status"] == "timed out after 3 s"
    assert time.monotonic() - started < 90
    child = int(child_pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)
    broken = registry.Benchmark("broken", "Broken", "nothing")
    assert run_all.run_one(broken, [], timeout=60, broker="amqp://x")["status"] == (
        "failed (exit 3)"
    )


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and os.path.exists(f"/proc/{pid}")


# ------------------------------------------------------------ CPU by process

# Spins for SECONDS of CPU, says so, then waits (alive) until its stdin closes.
_SPIN = (
    "import sys, time\n"
    "end = time.process_time() + float(sys.argv[1])\n"
    "while time.process_time() < end: pass\n"
    "print('spun', flush=True)\n"
    "sys.stdin.read()\n"
)


def _python(*args: str, **kwargs: object):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, *args], **kwargs)


def test_process_tree_holds_a_process_and_its_descendants() -> None:
    from benchmarks._common import process_tree

    parent = _python("-c", "import subprocess, sys; subprocess.run([sys.executable, '-c', "
                     "'import time; time.sleep(60)'])")  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while len(process_tree(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        tree = process_tree(parent.pid)
        assert tree[0] == parent.pid and len(tree) == 2, tree
    finally:
        import signal

        for pid in reversed(process_tree(parent.pid)):
            os.kill(pid, signal.SIGKILL)
        parent.wait()
    assert process_tree(parent.pid) == []


def test_cpu_meter_charges_each_role_its_own_processes_cpu() -> None:
    import subprocess

    from benchmarks._common import CpuMeter

    spinner = _python("-c", _SPIN, "0.5", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    idle = _python("-c", "import sys; sys.stdin.read()", stdin=subprocess.PIPE)
    try:
        with CpuMeter({"spinner": [spinner.pid], "idle": [idle.pid], "absent": []}) as meter:
            assert spinner.stdout is not None
            assert spinner.stdout.readline().strip() == b"spun"
    finally:
        for process in (spinner, idle):
            process.kill()
            process.wait()
    cpu = meter.per_invocation(5)
    assert cpu["invocations"] == 5
    assert cpu["unmeasured"] == ["absent"]
    # 0.5 s of CPU over 5 invocations, in /proc's 10 ms ticks (plus start-up).
    assert 90 <= cpu["ms"]["spinner"] <= 200, cpu
    assert cpu["ms"]["idle"] <= 10, cpu
    assert cpu["total_ms"] == pytest.approx(cpu["ms"]["spinner"] + cpu["ms"]["idle"], abs=0.01)
    assert cpu["floor_ms"] == pytest.approx(cpu["total_ms"] / (os.cpu_count() or 1), abs=0.01)


def test_broker_pids_finds_the_process_listening_on_the_urls_port() -> None:
    import socket

    from benchmarks._common import broker_pids

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert broker_pids(f"amqp://u:p@127.0.0.1:{port}/,amqp://u:p@other:5672/") == [os.getpid()]
    assert broker_pids(f"amqp://u:p@127.0.0.1:{port}/") == []


def _cpu(total: float, **roles: float) -> dict[str, object]:
    return {"invocations": 10, "ms": roles, "total_ms": total, "floor_ms": total / 2,
            "wall_ms": total, "unmeasured": []}  # fmt: skip


def test_report_shows_cpu_by_role_and_the_floor_it_sets(tmp_path: Path) -> None:
    stats = {"median_s": 0.01, "p10_s": 0.009, "p90_s": 0.012, "n": 20}
    amqp = _cpu(40.0, coordinator=10.0, silos=16.0, **{"silo workers": 10.0}, broker=4.0)
    _write(
        tmp_path / "overhead.json",
        {
            "machine": _machine(0.1),
            "clients": 9,
            "silos": 3,
            "native": {"federated_mean": stats},
            "tff_amqp": {"federated_mean": {**stats, "median_s": 0.025}},
            "ratios": {"federated_mean": 2.5},
            "targets": {"federated_mean": 1.3},
            "cpu": {
                "native": {"federated_mean": _cpu(8.0, coordinator=3.0)},
                "tff_amqp": {"federated_mean": amqp},
            },
        },
    )
    text = report.render(tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("| federated_mean | 8 |"))
    # native 8; coordinator 10, its worker unmeasured (-), silos 16, their
    # workers 10, broker 4; total 40, floor 20 ms = 2x native's 10 ms.
    assert row == "| federated_mean | 8 | 10 | - | 16 | 10 | 4 | 40 | 20 | 2 |", row


def test_cpu_profile_charges_each_function_to_its_part_of_the_stack() -> None:
    from benchmarks import cpu_profile

    site = "/x/.venv/lib/python3.11/site-packages"
    assert cpu_profile.part_of("/usr/lib/python3.11/asyncio/base_events.py", "_run_once") == (
        "asyncio event loop"
    )
    assert cpu_profile.part_of("~", "<method 'run' of '_contextvars.Context' objects>") == (
        "asyncio event loop"
    )
    assert cpu_profile.part_of(f"{site}/aiormq/channel.py", "basic_publish").startswith("AMQP")
    assert cpu_profile.part_of(f"{site}/grpc/aio/_call.py", "_invoke").startswith("gRPC")
    assert cpu_profile.part_of("/w/tff_amqp/silo/stateful/session.py", "apply") == "tff-amqp: silo"
    assert cpu_profile.part_of("/w/tff_amqp/protocol.py", "decode") == "tff-amqp: wire protocol"
    assert cpu_profile.part_of("~", "<built-in method builtins.len>").startswith("Python built-ins")
    assert cpu_profile.part_of("/usr/lib/python3.11/typing.py", "f") == cpu_profile.OTHER


def test_cpu_profile_breakdown_sums_a_real_profile_by_part() -> None:
    import cProfile
    import pstats

    from benchmarks import cpu_profile

    profile = cProfile.Profile(timer=time.thread_time)
    profile.enable()
    total = sum(len(str(i)) for i in range(200_000))
    profile.disable()
    assert total > 0
    seconds, by_part, top = cpu_profile.breakdown(pstats.Stats(profile))
    assert seconds > 0
    assert abs(sum(by_part.values()) - seconds) < 1e-9
    assert by_part["Python built-ins (isinstance, len, dict...)"] > 0  # len and str
    assert 0 < len(top) <= cpu_profile.TOP
    assert top == sorted(top, key=lambda item: -item[1])


def test_overhead_alternates_blocks_and_reports_each_blocks_ratio(monkeypatch) -> None:
    """Native and tff-amqp take turns block by block (the first system of one
    block is the last of the next), and each block's ratio is that of its own
    medians: a machine that slows down between blocks moves both systems."""
    from benchmarks import overhead

    order: list[str] = []
    speed = {"value": 1.0}

    def fake_timed(fn, count, warmup=1):
        system, _computation = fn()
        order.append(system)
        base = 0.01 if system == "native" else 0.03
        return [base * speed["value"]] * count

    def system(name: str):
        return {c: (lambda c=c: (name, c)) for c in overhead.BLOCK_SAMPLES}

    def slow_down(_message: str) -> None:
        speed["value"] *= 2  # the machine drifts between blocks

    monkeypatch.setattr(overhead, "timed", fake_timed)
    monkeypatch.setattr(overhead, "progress", slow_down)
    samples, ratios = overhead.interleaved(
        {"native": system("native"), "tff_amqp": system("tff_amqp")}, blocks=3
    )
    computations = len(overhead.BLOCK_SAMPLES)
    assert order[: 2 * computations : 2] == ["native"] * computations
    assert order[2 * computations : 4 * computations : 2] == ["tff_amqp"] * computations
    for computation, count in overhead.BLOCK_SAMPLES.items():
        assert ratios[computation] == pytest.approx([3.0, 3.0, 3.0])
        assert len(samples["native"][computation]) == 3 * count
        # Drift shows in the samples, not in the ratios.
        assert max(samples["native"][computation]) == pytest.approx(0.04)


def test_overhead_splits_wall_time_by_gather() -> None:
    """The phase split reads the coordinator's gather events: time before the
    first gather, time in gathers, and the rest, per invocation (medians)."""
    import time

    from benchmarks import overhead

    class Events:
        def __init__(self) -> None:
            self.observers: list[object] = []

        def add(self, observer: object) -> None:
            self.observers.append(observer)

        def remove(self, observer: object) -> None:
            self.observers.remove(observer)

    events = Events()

    def invocation(before: float, gathers: list[float], after: float):
        def call() -> None:
            time.sleep(before)
            for seconds in gathers:
                for observer in events.observers:
                    observer.gather_started("inv", ["a"])  # type: ignore[attr-defined]
                time.sleep(seconds)
                for observer in events.observers:
                    observer.gather_finished("inv", ["a"], seconds)  # type: ignore[attr-defined]
            time.sleep(after)

        return call

    def overlapping() -> None:
        # Two gathers open together (a FedAvg round's aggregations): once.
        for observer in events.observers:
            observer.gather_started("inv", ["a"])  # type: ignore[attr-defined]
            observer.gather_started("inv", ["b"])  # type: ignore[attr-defined]
        time.sleep(0.03)
        for observer in events.observers:
            observer.gather_finished("inv", ["a"], 0.03)  # type: ignore[attr-defined]
        time.sleep(0.02)
        for observer in events.observers:
            observer.gather_finished("inv", ["b"], 0.05)  # type: ignore[attr-defined]

    split = overhead.phases(
        {
            "one": invocation(0.02, [0.05], 0.01),
            "two": invocation(0.0, [0.03, 0.04], 0.03),
            "overlapping": overlapping,
        },
        events,
        count=3,
    )
    assert events.observers == []  # removed again
    one, two = split["one"], split["two"]
    assert one["before_gather_ms"] == pytest.approx(20, abs=8)
    assert one["gathers_ms"] == pytest.approx(50, abs=8)
    assert one["after_ms"] == pytest.approx(one["total_ms"] - 20 - 50, abs=8)
    assert two["before_gather_ms"] == pytest.approx(0, abs=5)
    assert two["gathers_ms"] == pytest.approx(70, abs=10)
    assert two["total_ms"] >= 100
    both = split["overlapping"]
    assert both["gathers_ms"] == pytest.approx(50, abs=8)
    assert both["gathers_ms"] <= both["total_ms"]


def test_critical_path_cuts_each_invocation_into_its_steps() -> None:
    """Two invocations over two silos from hand-made timelines (ms on one
    clock, CPU ms beside them): each step is the span it names; an
    invocation with a reply never seen is left out, not half counted."""
    from benchmarks import critical_path

    ms = 1_000_000

    def event(t: float, kind: str, label: str, cpu: float = 0.0) -> list[object]:
        return [int(t * ms), kind, label, int(cpu * ms)]

    coordinator = [
        event(0, "mark", "start 0", 10),
        event(1, "pub", "a0", 11),  # requests at 1.0 and 1.2
        event(1.2, "pub", "b0", 11.2),
        event(1.5, "recv", "", 11.3),  # a heartbeat: no correlation id
        event(4.0, "recv", "a0", 11.5),
        event(5.0, "recv", "b0", 12.0),  # the last reply, 0.5 after it left silo b
        event(5.75, "mark", "end 0", 12.5),
        event(10, "mark", "start 1", 13),
        event(11, "pub", "a1", 14),
        event(11.1, "pub", "b1", 14),
        event(14, "recv", "a1", 14.5),  # b1's reply never arrives
        event(20, "mark", "end 1", 15),
    ]
    silos = {
        "a": [event(1.5, "recv", "a0", 100), event(3.5, "pub", "a0", 101.0)],
        "b": [event(2.0, "recv", "b0", 200), event(4.5, "pub", "b0", 200.5)],
    }
    silos["a"] += [event(11.5, "recv", "a1"), event(13, "pub", "a1")]
    silos["b"] += [event(11.6, "recv", "b1")]
    steps, cpu, skipped = critical_path.critical_paths(coordinator, silos)
    assert skipped == 1

    def one(name: str) -> float:
        (value,) = steps[name]
        return round(value, 6)

    assert one("coordinator, before the first request") == 1.0
    assert one("requests published") == 0.2
    assert one("broker to the first silo") == 0.5
    assert one("requests delivered") == 1.0
    assert one("silo work, each") == 2.25  # median of 2.0 and 2.5
    assert one("silos done") == 3.0  # 1.5 -> 4.5
    assert one("broker back to the coordinator") == 0.5
    assert one("coordinator, after the last reply") == 0.75
    assert one("whole invocation") == 5.75
    assert [round(v, 6) for v in cpu["coordinator (event loop), silo phase"]] == [1.0]
    assert sorted(round(v, 6) for v in cpu["silo, each"]) == [0.5, 1.0]
    assert [name for name, _ in critical_path.STEPS] == list(steps)
