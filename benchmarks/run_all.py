"""Run every benchmark, then regenerate benchmarks/RESULTS.md.

    benchmarks/run_all [--quick] [--only NAME ...] [--note TEXT] [--report-only]

(`benchmarks/run_all` sets up the environment first, like scripts/test.sh,
then runs this module with the project's venv.) Each benchmark of
benchmarks/registry.py runs as its own process, with its output streamed
here; a benchmark that fails or times out is recorded and the others still
run. Every benchmark process runs in its own process group and is stopped
(SIGTERM, then SIGKILL) if we are interrupted or it overruns `--timeout`.
The run itself is recorded in results/run_all.json, which RESULTS.md uses
for its header.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import RESULTS, machine, progress, stop_on_sigterm
from benchmarks.registry import BENCHMARKS, Benchmark, by_name
from tff_amqp.processes import stop_process_group

ROOT = Path(__file__).resolve().parent.parent


def _supports_quick(benchmark: Benchmark) -> bool:
    try:
        help_text = subprocess.run(
            [sys.executable, str(benchmark.script), "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        ).stdout
    except subprocess.TimeoutExpired:
        return False
    return "--quick" in help_text


def _arguments(benchmark: Benchmark, quick: bool) -> list[str]:
    if not quick:
        args = list(benchmark.full_args)
    elif benchmark.quick_args is not None:
        args = list(benchmark.quick_args)
    else:
        args = ["--quick"] if _supports_quick(benchmark) else []
    return args


def _stop(process: subprocess.Popen[bytes], grace: float = 60.0) -> None:
    """SIGTERM the benchmark's process group (it cleans up its silos), then
    SIGKILL whatever is left after `grace` seconds."""
    stop_process_group(process, grace)


def run_one(
    benchmark: Benchmark, args: list[str], timeout: float, broker: str
) -> dict[str, object]:
    command = [sys.executable, str(benchmark.script), *args]
    progress(f"=== {benchmark.name}: {' '.join(command[1:])}")
    started = time.monotonic()
    # The broker goes by AMQP_URL, which every benchmark reads by default.
    process = subprocess.Popen(
        command, cwd=ROOT, start_new_session=True, env={**os.environ, "AMQP_URL": broker}
    )
    status = "ok"
    try:
        code = process.wait(timeout)
        if code != 0:
            status = f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        status = f"timed out after {timeout:.0f} s"
        _stop(process)
    except BaseException:
        _stop(process)
        raise
    seconds = time.monotonic() - started
    progress(f"=== {benchmark.name}: {status} in {seconds:.0f} s")
    return {"status": status, "seconds": round(seconds, 1), "args": args}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--broker", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument("--quick", action="store_true", help="small settings: a smoke pass")
    parser.add_argument(
        "--only", action="append", metavar="NAME", help="run only this benchmark; repeatable"
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument(
        "--report-only", action="store_true", help="only regenerate RESULTS.md from results/"
    )
    parser.add_argument("--note", default="", help="a line for the top of RESULTS.md")
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds per benchmark (default 1800 quick, "
        "10800 full)",
    )  # fmt: skip
    args = parser.parse_args()
    from benchmarks.report import write_report

    if args.list:
        for b in BENCHMARKS:
            print(f"{b.name:20s} {'' if b.exists else '(not present) '}{b.measures}")
        return 0
    if args.report_only:
        print(f"wrote {write_report()}")
        return 0
    try:
        selected = [by_name(n) for n in args.only] if args.only else list(BENCHMARKS)
    except KeyError as e:
        parser.error(str(e.args[0]))
    timeout = args.timeout or (1800.0 if args.quick else 10800.0)
    stop_on_sigterm()
    record: dict[str, object] = {
        "quick": args.quick,
        "note": args.note,
        "machine_at_start": machine(),
        "benchmarks": {},
    }
    runs: dict[str, object] = {}
    for benchmark in selected:
        if not benchmark.exists:
            progress(f"=== {benchmark.name}: skipped ({benchmark.script.name} not present)")
            runs[benchmark.name] = {"status": "not present"}
            continue
        runs[benchmark.name] = {
            **run_one(benchmark, _arguments(benchmark, args.quick), timeout, args.broker),
            "quick": args.quick,
        }
    record["benchmarks"] = runs
    record["machine_at_end"] = machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    previous = RESULTS / "run_all.json"
    if args.only and previous.exists():
        # Keep the record of benchmarks this run did not touch.
        old = json.loads(previous.read_text()).get("benchmarks", {})
        record["benchmarks"] = {**old, **runs}
    previous.write_text(json.dumps(record, indent=2))
    report = write_report()
    progress(f"wrote {report}")
    failed = [n for n, r in runs.items() if r["status"] not in ("ok", "not present")]
    if failed:
        progress(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
