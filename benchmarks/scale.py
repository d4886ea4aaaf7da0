"""Scale: a federated mean and one FedAvg round with 1 to 64 silos on one
machine, against TFF native with the same number of clients, in the same run.

    .venv/bin/python benchmarks/scale.py [--silos 1 2 4 ... 64] [--repeats N] [--quick]

One client per silo. The silos run in simulation mode (`tff-amqp silos`: up
to `--silos-per-host` silo agents per process sharing the TensorFlow import
and, with `--worker shared`, one worker_binary; see docs/simulation.md). For
reference, the 1-silo step (if run) also runs one ordinary `tff-amqp silo`
process.

Per step: round latency (median, p10, p90), the coordinator's CPU per round
(this process plus its worker_binary) and its memory, and the silos' memory
(host processes plus their workers) per silo. Writes
benchmarks/results/scale.json and scale.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    RESULTS,
    available_memory_mb,
    cpu_seconds,
    delete_federation,
    machine,
    native_context,
    print_table,
    progress,
    rss_mb,
    stop_on_sigterm,
    summary,
    timed,
    write_result,
)
from benchmarks.overhead import build
from tff_amqp.processes import child_pids_named

FULL_SILOS = [1, 2, 4, 8, 16, 32, 64]
QUICK_SILOS = [1, 2, 4, 8]
# Budget per silo host (TF import + agents + shared worker after FedAvg; 16
# silos measured ~700 MB), to refuse a step that would not fit rather than
# push the machine into swap.
HOST_BUDGET_MB = 1000


class NotEnoughMemory(RuntimeError):
    """A step would not fit in the machine's available memory: skipped."""


def _coordinator_pids() -> list[int]:
    return [os.getpid(), *child_pids_named("worker_binary")]


def _measure(context: Any, n: int, built: tuple[Any, ...], repeats: int) -> dict[str, Any]:
    """Mean and FedAvg latencies for n clients, with the coordinator's CPU per
    round and memory (this process and its worker_binary)."""
    import tensorflow_federated as tff

    mean, values, process, datasets = built
    with tff.framework.get_context_stack().install(context):
        state = process.initialize()
        mean(values[:n])  # warm-up: compiles, starts the worker, caches
        pids = _coordinator_pids()
        cpu_before = sum(cpu_seconds(pid) for pid in pids)
        mean_samples = timed(lambda: mean(values[:n]), repeats=repeats * 3, warmup=1)
        cpu_mean = sum(cpu_seconds(pid) for pid in pids) - cpu_before
        cpu_before = sum(cpu_seconds(pid) for pid in pids)
        round_samples = timed(lambda: process.next(state, datasets[:n]), repeats=repeats, warmup=1)
        cpu_round = sum(cpu_seconds(pid) for pid in _coordinator_pids()) - cpu_before
        value = float(mean(values[:n]))
    pids = _coordinator_pids()
    return {
        "federated_mean": summary(mean_samples),
        "fedavg_round": summary(round_samples),
        "coordinator_cpu_s_per_mean": cpu_mean / (len(mean_samples) + 1),
        "coordinator_cpu_s_per_round": cpu_round / (len(round_samples) + 1),
        "coordinator_rss_mb": rss_mb(pids[0]),
        "coordinator_worker_rss_mb": sum(rss_mb(pid) for pid in pids[1:]),
        "mean_value": value,
    }


def _silo_memory(local: Any) -> dict[str, float]:
    processes = [silo.pid for silo in local.silos.values()]
    agent_mb = sum(rss_mb(pid) for pid in processes)
    worker_mb = sum(rss_mb(w) for pid in processes for w in child_pids_named("worker_binary", pid))
    return {
        "silo_processes": len(processes),
        "agents_rss_mb": agent_mb,
        "workers_rss_mb": worker_mb,
    }


def _run_step(
    args: argparse.Namespace, n: int, mode: str, built: tuple[Any, ...]
) -> dict[str, Any]:
    import tff_amqp
    from tff_amqp.local import LocalFederation
    from tff_amqp.silo.stateful.host_cli import numbered_silo_names

    hosts = 1 if mode == "process" else -(-n // args.silos_per_host)
    need = hosts * HOST_BUDGET_MB
    if available_memory_mb() < need + 2048:
        raise NotEnoughMemory(
            f"{n} silos in {hosts} processes need about {need} MB; only "
            f"{available_memory_mb():.0f} MB available. Lower --silos or raise --silos-per-host."
        )
    names = numbered_silo_names("s", n)
    federation = f"bench-{uuid.uuid4().hex[:6]}"
    try:
        with LocalFederation(args.broker, federation) as local:
            if mode == "process":
                local.start_silo(names[0])
            else:
                for h in range(hosts):
                    chunk = names[h * args.silos_per_host : (h + 1) * args.silos_per_host]
                    local.start_silo_host(f"h{h}", chunk, worker_mode=args.worker)
            progress(f"  {n} silo(s) ({mode}, {hosts} process(es)): starting")
            local.wait_ready(timeout=600)
            with tff_amqp.create_sync_amqp_execution_context(
                args.broker,
                federation=federation,
                min_silos=n,
                max_silos=n,
                cohort_timeout=300.0,
                deadline=900.0,
                heartbeat_timeout=30.0,
            ) as context:
                measured = _measure(context, n, built, args.repeats)
            memory = _silo_memory(local)
    finally:
        delete_federation(args.broker, federation, names)
    silo_mb = memory["agents_rss_mb"] + memory["workers_rss_mb"]
    return {
        "silos": n,
        "mode": mode,
        **measured,
        **memory,
        "rss_mb_per_silo": silo_mb / n,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--broker", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument("--silos", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--silos-per-host", type=int, default=16)
    parser.add_argument("--worker", choices=["shared", "per-silo"], default="shared")
    parser.add_argument(
        "--quick", action="store_true", help=f"silos {QUICK_SILOS}, 2 repeats (a smoke pass)"
    )
    args = parser.parse_args()
    if args.quick:
        args.repeats = min(args.repeats, 2)
    sizes = args.silos or (QUICK_SILOS if args.quick else FULL_SILOS)
    stop_on_sigterm()

    progress(
        f"scale benchmark: silos {sizes}, {args.silos_per_host} per host, "
        f"worker {args.worker}, repeats {args.repeats}"
    )
    built = build(clients=max(sizes))
    native: dict[int, dict[str, Any]] = {}
    for n in sizes:
        with native_context() as context:
            native[n] = _measure(context, n, built, args.repeats)
        mean_ms = native[n]["federated_mean"]["median_s"] * 1e3
        round_ms = native[n]["fedavg_round"]["median_s"] * 1e3
        progress(f"  native {n:3d} clients: mean {mean_ms:.1f} ms, round {round_ms:.0f} ms")

    # The reference ordinary silo process runs with the 1-silo step.
    steps = [(1, "process")] if 1 in sizes else []
    steps += [(n, "simulated") for n in sizes]
    records, skipped = [], []
    for n, mode in steps:
        try:
            step = _run_step(args, n, mode, built)
        except NotEnoughMemory as e:
            progress(f"  {n:3d} silos ({mode}): skipped: {e}")
            skipped.append({"silos": n, "mode": mode, "reason": str(e)})
            continue
        for key in ("federated_mean", "fedavg_round"):
            step[f"{key}_ratio_to_native"] = step[key]["median_s"] / native[n][key]["median_s"]
        if abs(step["mean_value"] - native[n]["mean_value"]) > 1e-4:
            raise AssertionError(
                f"{n} silos: tff-amqp mean {step['mean_value']} != native {native[n]['mean_value']}"
            )
        records.append(step)
        progress(
            f"  {n:3d} silos ({mode}): mean {step['federated_mean']['median_s'] * 1e3:.1f} ms "
            f"({step['federated_mean_ratio_to_native']:.2f}x), round "
            f"{step['fedavg_round']['median_s'] * 1e3:.0f} ms "
            f"({step['fedavg_round_ratio_to_native']:.2f}x), "
            f"{step['rss_mb_per_silo']:.0f} MB/silo"
        )

    print()
    print_table(
        ["silos", "mode", "mean ms", "x native", "round ms", "x native", "coord CPU ms/round",
         "coord MB", "MB/silo"],
        [
            [r["silos"], r["mode"], r["federated_mean"]["median_s"] * 1e3,
             r["federated_mean_ratio_to_native"], r["fedavg_round"]["median_s"] * 1e3,
             r["fedavg_round_ratio_to_native"], r["coordinator_cpu_s_per_round"] * 1e3,
             r["coordinator_rss_mb"] + r["coordinator_worker_rss_mb"], r["rss_mb_per_silo"]]
            for r in records
        ],
    )  # fmt: skip
    path = write_result(
        "scale",
        {
            "benchmark": "scale",
            "machine": machine(),
            "quick": args.quick,
            "repeats": args.repeats,
            "clients_per_silo": 1,
            "silos_per_host": args.silos_per_host,
            "worker_mode": args.worker,
            "note": (
                "'simulated': silo agents hosted by `tff-amqp silos` processes; 'process': one "
                "ordinary `tff-amqp silo` process with its own worker_binary. Coordinator CPU is "
                "this process plus its worker_binary per FedAvg round; MB/silo includes workers."
            ),
            "native": [{"clients": n, **native[n]} for n in sizes],
            "steps": records,
            "skipped": skipped,
        },
    )
    _plot(records, native)
    print(f"\nwrote {path} and {RESULTS / 'scale.png'}")
    return 0


def _plot(records: list[dict[str, Any]], native: dict[int, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    simulated = [r for r in records if r["mode"] == "simulated"]
    sizes = [r["silos"] for r in simulated]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in (
        (axes[0], "federated_mean", "federated mean"),
        (axes[1], "fedavg_round", "one FedAvg round"),
    ):
        ax.plot(sizes, [native[n][key]["median_s"] * 1e3 for n in sizes], "k--o", label="native")
        ax.plot(sizes, [r[key]["median_s"] * 1e3 for r in simulated], "-o", label="tff-amqp")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("silos (one client each)")
        ax.set_ylabel("latency, median (ms)")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "scale.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
