"""Regenerate benchmarks/RESULTS.md from whatever is in benchmarks/results/.

    .venv/bin/python -m benchmarks.report      (also run by benchmarks/run_all)

Benchmarks with a section renderer here get a tailored table; any other
`results/<name>.json` (a benchmark merged later) is rendered generically:
its scalar fields as a list, every list of records and every mapping of
records as a table. PNG plots `results/<name>*.png` are linked under their
benchmark. Nothing here needs TensorFlow or a broker.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS
from benchmarks.registry import BENCHMARKS

REPORT = RESULTS.parent / "RESULTS.md"


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:
            return "-"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ms(stats: dict[str, Any]) -> str:
    """median (p10-p90) in ms, with the number of samples."""

    def ms(seconds: float) -> str:
        value = seconds * 1e3
        return f"{value:.0f}" if value >= 100 else f"{value:.3g}"

    return f"{ms(stats['median_s'])} ({ms(stats['p10_s'])}-{ms(stats['p90_s'])}, n={stats['n']})"


# ------------------------------------------------------------------ sections


def _overhead(data: dict[str, Any]) -> str:
    rows = []
    blocks = data.get("block_ratios") or {}
    for key in data["ratios"]:
        by_block = blocks.get(key)
        rows.append(
            [key, _ms(data["native"][key]), _ms(data["tff_amqp"][key]), data["ratios"][key],
             f"{min(by_block):.2f}-{max(by_block):.2f}" if by_block else "-",
             data["targets"][key]]
        )  # fmt: skip
    return (
        f"{data['clients']} clients over {data['silos']} silo processes, measured in "
        "alternating blocks (native, tff-amqp, tff-amqp, native, ...). Latency in ms: median "
        "(p10-p90, samples); x native by block: the range of the ratio within each block.\n\n"
        + table(
            ["computation", "TFF native", "tff-amqp", "x native", "x native by block", "target"],
            rows,
        )
        + _overhead_counts(data.get("counts"))
        + _overhead_phases(data.get("phases"))
        + _overhead_cpu(data)
    )


def _overhead_phases(phases: dict[str, Any] | None) -> str:
    """tff-amqp's wall time by phase (results written before it was
    measured have none)."""
    if not phases:
        return ""
    from benchmarks.overhead import phases_table

    return (
        "\n\nWhere tff-amqp's wall time goes (ms, medians over invocations run back to back), "
        "from the coordinator's own invocation events: before its first gather (TFF's "
        "context, evaluating the computation up to the first aggregation), with a gather open "
        "(requests out, the silos' work, replies in; overlapping gathers count once), and the "
        "rest (merging, reporting, work between gathers, TFF's result):\n\n"
        + table(*phases_table(phases))
    )


def _overhead_cpu(data: dict[str, Any]) -> str:
    """CPU time by process role and the latency floor it sets (results
    written before it was measured have none)."""
    cpu = data.get("cpu")
    if not cpu:
        return ""
    from benchmarks.overhead import cpu_table

    headers, rows = cpu_table(cpu["native"], cpu["tff_amqp"], data["native"])
    cores = data.get("machine", {}).get("cpus", "the")
    return (
        "\n\nCPU time per invocation (user + system, every thread) by process, measured back "
        "to back; the floor is all of tff-amqp's CPU time over the machine's "
        f"{cores} cores: no invocation can be faster when the cores do only this work, so "
        "`floor x native` is the least ratio this machine allows without cutting CPU time:\n\n"
        + table(headers, rows)
    )


def _overhead_counts(counts: dict[str, Any] | None) -> str:
    """Round trips of one invocation of each (results written before the
    counts existed have none)."""
    if not counts:
        return ""
    rows = [
        [name, counts["native"][name]["worker_calls"], c["coordinator_worker_calls"],
         max(c["silo_worker_calls"].values()), c["broker_messages"]]
        for name, c in counts["tff_amqp"].items()
    ]  # fmt: skip
    runs = next(iter(counts["tff_amqp"].values())).get("invocations", 1)
    caption = (
        f"Per invocation, averaged over {runs} back to back (clean-up included)"
        if runs > 1
        else "Per invocation (clean-up included)"
    )
    return f"\n\n{caption}:\n\n" + table(
        ["computation", "native worker calls", "coordinator worker calls",
         "worker calls per silo (max)", "broker messages"],
        rows,
    )  # fmt: skip


def _stragglers(data: dict[str, Any]) -> str:
    rows = [
        [r["mode"], r["delay_s"], r["median_s"], r["p10_s"], r["p90_s"], r["n"],
         r["ratio_to_native"], r["within_target"]]
        for r in data["rounds"]
    ]  # fmt: skip
    return (
        f"{data['silos']} silos, {data['clients']} clients, straggler_timeout "
        f"{data['straggler_timeout_s']} s. Target: {data['target']}. {data['note']}.\n\n"
        + table(
            ["mode", "D (s)", "median (s)", "p10 (s)", "p90 (s)", "rounds", "x native",
             "within target"],
            rows,
        )
    )  # fmt: skip


def _scale(data: dict[str, Any]) -> str:
    rows = [
        [r["silos"], r["mode"], r["silo_processes"], _ms(r["federated_mean"]),
         r["federated_mean_ratio_to_native"], _ms(r["fedavg_round"]),
         r["fedavg_round_ratio_to_native"], r["coordinator_cpu_s_per_round"] * 1e3,
         r["coordinator_rss_mb"], r["coordinator_worker_rss_mb"], r["rss_mb_per_silo"]]
        for r in data["steps"]
    ]  # fmt: skip
    native = [
        [r["clients"], _ms(r["federated_mean"]), _ms(r["fedavg_round"])] for r in data["native"]
    ]
    return (
        f"One client per silo; {data['silos_per_host']} silos per host process, worker mode "
        f"`{data['worker_mode']}`. {data['note']}\n\n"
        + table(
            ["silos", "mode", "silo processes", "mean ms", "x native", "FedAvg round ms",
             "x native", "coordinator CPU ms/round", "coordinator MB", "coordinator worker MB",
             "MB per silo"],
            rows,
        )
        + "".join(
            f"\n\nSkipped: {r['silos']} silos ({r['mode']}): {r['reason']}"
            for r in data.get("skipped", [])
        )
        + "\n\nTFF native, same run (one process, as many clients):\n\n"
        + table(["clients", "mean ms", "FedAvg round ms"], native)
    )  # fmt: skip


def _throughput(data: dict[str, Any]) -> str:
    rows = [
        [r["concurrency"], r["native_invocations_per_s"], r["invocations_per_s"],
         r["ratio_to_native"],
         f"{min(r['block_ratios']):.2f}-{max(r['block_ratios']):.2f}"
         if r.get("block_ratios") else "-",
         r["executor_ops_per_s"], r["broker_round_trips_per_s"],
         r["broker_ceiling_round_trips_per_s"], r["fraction_of_broker_ceiling"],
         r["request_bytes"], r["reply_bytes"]]
        for r in data["levels"]
    ]  # fmt: skip
    return (
        f"{data['silos']} silos, {data['clients']} clients; invocations per level: "
        f"{data['invocations_per_level']}. {data['note']}.\n\n"
        + table(
            ["in flight (C)", "native inv/s", "tff-amqp inv/s", "x native", "x native by block",
             "executor ops/s",
             "broker round trips/s", "broker ceiling round trips/s", "of ceiling",
             "request bytes", "reply bytes"],
            rows,
        )
        + _throughput_counts(data["levels"])
        + _throughput_cpu(data["levels"])
    )  # fmt: skip


def _throughput_cpu(levels: list[dict[str, Any]]) -> str:
    """CPU time by process role (results written before it was measured have none)."""
    if not levels or "cpu" not in levels[0]:
        return ""
    from benchmarks.throughput import cpu_table

    headers, rows = cpu_table(levels)
    return (
        "\n\nCPU time per invocation (user + system, every thread) by process over each "
        "level, and the invocations/s it allows at most (all cores doing only this work; "
        "/proc counts in 10 ms ticks per process, so short levels are coarse):\n\n"
        + table(headers, rows)
    )


def _throughput_counts(levels: list[dict[str, Any]]) -> str:
    if not levels or "native_worker_calls_per_invocation" not in levels[0]:
        return ""
    rows = [
        [r["concurrency"], r["native_worker_calls_per_invocation"],
         r["coordinator_worker_calls_per_invocation"],
         max(r["silo_worker_calls_per_invocation"].values()), r["messages_per_invocation"]]
        for r in levels
    ]  # fmt: skip
    return "\n\nPer invocation (clean-up included):\n\n" + table(
        ["in flight (C)", "native worker calls", "coordinator worker calls",
         "worker calls per silo (max)", "broker messages"],
        rows,
    )  # fmt: skip


def _cluster(data: dict[str, Any]) -> str:
    single, cluster = data["single_node_classic"], data["cluster_3_nodes_quorum"]
    rows = [
        [key, _ms(single[key]), _ms(cluster[key]), data["ratios"][key], data["targets"][key]]
        for key in ("federated_mean", "fedavg_round")
    ]
    losses = [
        [i + 1, f"{r['victim_led_queues']} of {r['queues']}", r["recovery_s"],
         r["failed_invocations"]]
        for i, r in enumerate(data["recoveries"])
    ]  # fmt: skip
    return (
        f"{data['clients']} clients over {data['silos']} silo processes, both on private nodes "
        "in the same run. Latency in ms: median (p10-p90, samples).\n\n"
        + table(["computation", "1 node, classic", "3 nodes, quorum", "ratio", "aim"], rows)
        + "\n\nNode loss: `kill -9` of the node leading most of the federation's queues; "
        "recovery = from the kill to the end of the next successful federated mean (failed "
        "attempts retried at once).\n\n"
        + table(["loss", "queues the node led", "recovery (s)", "failed invocations"], losses)
        + _cluster_cpu(data)
    )


def _cluster_cpu(data: dict[str, Any]) -> str:
    """CPU time by process role (results written before it was measured have none)."""
    cpu = data.get("cpu")
    if not cpu:
        return ""
    from benchmarks.cluster import cpu_table

    headers, rows = cpu_table(cpu["single_node_classic"], cpu["cluster_3_nodes_quorum"])
    return (
        "\n\nCPU time per invocation (user + system, every thread) by process, measured back "
        "to back; broker: the one node, or the three nodes together; floor: the total over "
        "the machine's cores:\n\n" + table(headers, rows)
    )


SECTIONS: dict[str, Callable[[dict[str, Any]], str]] = {
    "overhead": _overhead,
    "stragglers": _stragglers,
    "scale": _scale,
    "throughput": _throughput,
    "cluster": _cluster,
}


# ------------------------------------------------------------------- generic


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            continue  # nested tables are not squeezed into a cell
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _records_table(records: list[dict[str, Any]]) -> str:
    flat = [_flatten(r) for r in records]
    headers = list(dict.fromkeys(k for r in flat for k in r))
    return table(headers, [[r.get(h) for h in headers] for r in flat])


def generic(data: dict[str, Any]) -> str:
    parts = []
    scalars = {
        k: v for k, v in data.items() if k != "machine" and not isinstance(v, dict | list)
    } | {k: v for k, v in data.items() if isinstance(v, list) and not _is_records(v)}
    if scalars:
        parts.append("\n".join(f"- {k}: {_fmt(v)}" for k, v in scalars.items()))
    for key, value in data.items():
        if key == "machine":
            continue
        if _is_records(value):
            parts.append(f"**{key}**\n\n{_records_table(value)}")
        elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            parts.append(f"**{key}**\n\n{_records_table([{'': k, **v} for k, v in value.items()])}")
        elif isinstance(value, dict) and value:
            parts.append(
                f"**{key}**\n\n" + "\n".join(f"- {k}: {_fmt(v)}" for k, v in value.items())
            )
    return "\n\n".join(parts) or "(no fields)"


def _is_records(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


# -------------------------------------------------------------------- report


def _machine_line(m: dict[str, Any]) -> str:
    load = m.get("load_average")
    return (
        f"{m.get('cpus')} CPUs ({m.get('cpu_model', '?')}), {m.get('memory_gib', '?')} GiB, "
        f"Python {m.get('python')}, {m.get('platform')}"
        + (f"; load average {_fmt(load)} (1/5/15 min)" if load else "")
    )


def _header(run: dict[str, Any] | None, measured: list[str] | None = None) -> str:
    lines = [
        "# Benchmark results",
        "",
        "Generated by `benchmarks/run_all` (regenerate the text alone with "
        "`benchmarks/run_all --report-only`); how to run and what each benchmark measures: "
        "[README.md](README.md). Every comparison with TFF native was measured in the same run "
        "on the same machine.",
        "",
    ]
    if run is None:
        lines.append("No `results/run_all.json`: the results below come from separate runs.")
        return "\n".join(lines)
    start, end = run.get("machine_at_start", {}), run.get("machine_at_end", {})
    cpus = start.get("cpus") or 1
    loads = [start.get("load_average", [0])[0], end.get("load_average", [0])[0]]
    warnings = []
    ran = {n: r for n, r in run.get("benchmarks", {}).items() if "quick" in r}
    quick = sorted(n for n, r in ran.items() if r["quick"])
    quick_settings = (
        "with the `--quick` settings (few repeats, small configurations): a smoke pass, not a "
        "measurement to quote"
    )
    if quick and len(quick) == len(ran):
        warnings.append(f"These numbers were taken {quick_settings}.")
    elif quick:
        warnings.append(f"The numbers of {', '.join(quick)} were taken {quick_settings}.")
    if max(loads) > 0.5 * cpus:
        warnings.append(
            f"The last run was on a loaded machine (1-minute load average {loads[0]:.1f} at "
            f"start, {loads[1]:.1f} at end, on {cpus} cores): other work shared the CPUs, so "
            "absolute times are inflated and noisy. Each section gives the load when it was "
            "measured."
        )
    if warnings:
        lines.append("> **Caution:** " + " ".join(warnings))
        lines.append("")
    if run.get("note"):
        lines += [f"> {run['note']}", ""]
    lines += [
        f"The last `run_all` started {start.get('when', '?')} and ended {end.get('when', '?')}"
        + (
            f"; the sections below were measured between {min(measured)} and {max(measured)}"
            " (benchmarks rerun on their own keep their own time, given in each section)."
            if measured
            else "."
        ),
        f"Machine: {_machine_line(start)}.",
        "",
        table(
            ["benchmark", "status", "quick", "seconds", "arguments"],
            [
                [
                    name,
                    r.get("status"),
                    r.get("quick"),
                    r.get("seconds"),
                    " ".join(r.get("args", [])) or "-",
                ]
                for name, r in run.get("benchmarks", {}).items()
            ],
        ),
    ]
    return "\n".join(lines)


def render(results: Path = RESULTS) -> str:
    run_path = results / "run_all.json"
    run = json.loads(run_path.read_text()) if run_path.exists() else None
    parts = [_header(run, _measured_times(results))]
    known = {b.name: b for b in BENCHMARKS}
    names = [b.name for b in BENCHMARKS] + sorted(
        p.stem for p in results.glob("*.json") if p.stem not in known and p.stem != "run_all"
    )
    for name in names:
        path = results / f"{name}.json"
        benchmark = known.get(name)
        title = benchmark.title if benchmark else name
        if not path.exists():
            if benchmark and benchmark.exists:
                parts.append(f"## {title} (`{name}`)\n\nNo results yet.")
            continue
        parts.append(_section(name, title, benchmark.measures if benchmark else None, path))
    return "\n\n".join(parts) + "\n"


def _measured_times(results: Path) -> list[str]:
    """When each benchmark's results were measured (ISO times, as recorded)."""
    times = []
    for path in results.glob("*.json"):
        if path.stem == "run_all":
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        machine = data.get("machine") if isinstance(data, dict) else None
        if isinstance(machine, dict) and isinstance(machine.get("when"), str):
            times.append(machine["when"])
    return times


def _section(name: str, title: str, measures: str | None, path: Path) -> str:
    lines = [f"## {title} (`{name}`)", ""]
    if measures:
        lines += [f"Measures: {measures}.", ""]
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return "\n".join([*lines, f"Could not read {path.name}: {e}"])
    m = data.get("machine") if isinstance(data, dict) else None
    if isinstance(m, dict):
        lines += [f"Measured {m.get('when', '?')}; {_machine_line(m)}.", ""]
    if isinstance(data, dict) and data.get("quick"):
        lines += ["Quick settings (`--quick`).", ""]
    renderer = SECTIONS.get(name, generic)
    try:
        body = renderer(data) if isinstance(data, dict) else _fmt(data)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        # A result file in a newer or older shape: show it generically.
        body = f"(tailored table unavailable: {type(e).__name__}: {e})\n\n" + generic(data)
    lines.append(body)
    for plot in sorted(path.parent.glob(f"{name}*.png")):
        lines += ["", f"![{plot.stem}](results/{plot.name})"]
    return "\n".join(lines)


def write_report(results: Path = RESULTS, report: Path = REPORT) -> Path:
    report.write_text(render(results))
    return report


if __name__ == "__main__":
    print(f"wrote {write_report()}")
