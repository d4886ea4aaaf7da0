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
