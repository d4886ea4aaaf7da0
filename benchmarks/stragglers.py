"""Round time with one slow silo, with and without a straggler timeout, side
by side with TFF's native runtime running the same computation.

    .venv/bin/python benchmarks/stragglers.py [--broker URL] [--delays 0 5 30] [--repeats 3]

8 local silo processes, 16 clients (2 per silo). The round is a federated mean
whose client work sleeps for a per-client delay inside TensorFlow; one client,
held by the last silo, sleeps D seconds (a slow datacenter). The same
computation with the same delays runs on:

- TFF native (one worker_binary holding all 16 clients): waits for every client;
- tff-amqp, `straggler_timeout=None`: waits for every silo, like native;
- tff-amqp, `straggler_timeout=1`, `min_silos=7`: proceeds after 1 s with the
  7 silos that answered; the slow silo is dropped for that round.

Everything is measured in the same run: medians and spreads over `--repeats`
rounds. Between rounds the benchmark waits until the slow silo has finished
its late work, so each round starts from idle silos. Writes
benchmarks/results/stragglers.json and stragglers.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks._common import (
    RESULTS,
    delete_federation,
    machine,
    native_context,
    print_table,
    stop_on_sigterm,
    summary,
    write_result,
)

SILOS = [f"s{i}" for i in range(8)]
CLIENTS = 16
TARGET_MARGIN_S = 0.25


def _computation() -> Any:
    import tensorflow as tf
    import tensorflow_federated as tff
    from tensorflow.python.data.experimental.ops import testing as tf_data_testing

    @tff.tensorflow.computation(np.float32, np.int64)
    def slow_client(x, delay_us):
        # The sleep runs inside TensorFlow, in whichever runtime holds the client.
        pause = tf.data.Dataset.range(1).apply(tf_data_testing.sleep(delay_us))
        waited = pause.reduce(np.int64(0), lambda acc, _: acc)
        return x + tf.cast(waited, tf.float32)

    @tff.federated_computation(
        tff.FederatedType(np.float32, tff.CLIENTS), tff.FederatedType(np.int64, tff.CLIENTS)
    )
    def mean_with_delays(x, delays):
        return tff.federated_mean(tff.federated_map(slow_client, tff.federated_zip((x, delays))))

    return mean_with_delays


def _delays_us(delay_s: float) -> list[int]:
    # Explicit client lists are split across silos in name order, so the last
    # client lives on the last silo. TF's sleep dataset sleeps before each
    # element and again before reporting the end: two sleeps of D/2 make D.
    return [0] * (CLIENTS - 1) + [int(delay_s * 1e6 / 2)]


def _round(comp: Any, values: list[float], delay_s: float) -> tuple[float, float]:
    started = time.perf_counter()
    result = comp(values, _delays_us(delay_s))
    return time.perf_counter() - started, float(result)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--broker", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument("--delays", type=float, nargs="+", default=[0.0, 5.0, 30.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--straggler-timeout", type=float, default=1.0)
    args = parser.parse_args()
    stop_on_sigterm()

    import tensorflow_federated as tff

    import tff_amqp
    from tff_amqp.local import LocalFederation

    comp = _computation()
    values = [float(i) for i in range(CLIENTS)]
    print(
        f"stragglers benchmark: {len(SILOS)} silos, {CLIENTS} clients, delays {args.delays} s, "
        f"{args.repeats} rounds each",
        flush=True,
    )

    samples: dict[tuple[str, float], list[float]] = {}
    results: dict[tuple[str, float], list[float]] = {}

    def record(mode: str, delay: float, round_s: float, value: float) -> None:
        samples.setdefault((mode, delay), []).append(round_s)
        results.setdefault((mode, delay), []).append(value)
        print(
            f"  {mode:28s} D={delay:5.1f} s  round {round_s:7.3f} s  mean {value:.4f}", flush=True
        )

    with native_context() as native, tff.framework.get_context_stack().install(native):
        comp(values, _delays_us(0.0))  # warm up
        for delay in args.delays:
            for _ in range(args.repeats):
                record("TFF native", delay, *_round(comp, values, delay))

    federation = f"bench-{uuid.uuid4().hex[:6]}"
    try:
        with LocalFederation(args.broker, federation) as local:
            for name in SILOS:
                local.start_silo(name)
            print(f"  starting {len(SILOS)} silos ...", flush=True)
            local.wait_ready(timeout=300)
            for timeout in (None, args.straggler_timeout):
                mode = (
                    "tff-amqp, wait for all"
                    if timeout is None
                    else f"tff-amqp, K of N ({timeout:g} s)"
                )
                with (
                    tff_amqp.create_sync_amqp_execution_context(
                        args.broker,
                        federation=federation,
                        min_silos=len(SILOS) - 1,
                        straggler_timeout=timeout,
                        heartbeat_timeout=30.0,
                        deadline=max(args.delays) + 60.0,
                        cohort_timeout=120.0,
                    ) as context,
                    tff.framework.get_context_stack().install(context),
                ):
                    comp(values, _delays_us(0.0))  # warm up (cold silos take seconds)
                    link = context.runtime.link
                    for delay in args.delays:
                        for _ in range(args.repeats):
                            late_before = link.stats["late_replies"]
                            round_s, value = _round(comp, values, delay)
                            record(mode, delay, round_s, value)
                            if timeout is not None and round_s < delay:
                                # Let the dropped silo finish its late work (its
                                # reply is discarded) before the next round.
                                until = time.monotonic() + delay + 30
                                while (
                                    link.stats["late_replies"] == late_before
                                    and time.monotonic() < until
                                ):
                                    time.sleep(0.1)
    finally:
        delete_federation(args.broker, federation, SILOS)

    modes = [
        "TFF native",
        "tff-amqp, wait for all",
        f"tff-amqp, K of N ({args.straggler_timeout:g} s)",
    ]
    native_by_delay = {d: summary(samples[("TFF native", d)])["median_s"] for d in args.delays}
    rows, records = [], []
    for mode in modes:
        for delay in args.delays:
            stats = summary(samples[(mode, delay)])
            k_of_n = mode.startswith("tff-amqp, K of N")
            within = stats["p90_s"] <= args.straggler_timeout + TARGET_MARGIN_S if k_of_n else None
            ratio = stats["median_s"] / native_by_delay[delay]
            rows.append(
                [mode, delay, stats["median_s"], stats["p10_s"], stats["p90_s"], ratio, within]
            )
            records.append(
                {
                    "mode": mode,
                    "delay_s": delay,
                    **stats,
                    "ratio_to_native": ratio,
                    "mean_results": results[(mode, delay)],
                    "within_target": within,
                }
            )
    print()
    print_table(
        ["mode", "D s", "median s", "p10 s", "p90 s", "x native", "within target"],
        [[*r[:6], "-" if r[6] is None else ("yes" if r[6] else "NO")] for r in rows],
    )
    path = write_result(
        "stragglers",
        {
            "benchmark": "stragglers",
            "machine": machine(),
            "silos": len(SILOS),
            "clients": CLIENTS,
            "repeats": args.repeats,
            "straggler_timeout_s": args.straggler_timeout,
            "target": f"K-of-N round p90 <= straggler_timeout + {TARGET_MARGIN_S} s for any D",
            "note": (
                "K of N drops the slow silo's 2 clients, so its mean is over 14 clients; "
                "native and wait-for-all average all 16"
            ),
            "rounds": records,
        },
    )
    _plot(records)
    print(f"\nwrote {path} and {RESULTS / 'stragglers.png'}")
    return 0


def _plot(records: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for mode in dict.fromkeys(r["mode"] for r in records):
        points = [(r["delay_s"], r["median_s"]) for r in records if r["mode"] == mode]
        style = "k--" if mode == "TFF native" else "-"
        ax.plot(*zip(*points, strict=True), style, marker="o", label=mode)
    ax.set_xlabel("delay D of one client's work (s)")
    ax.set_ylabel("round time, median (s)")
    ax.set_title("Federated mean, 8 silos / 16 clients, one slow client")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "stragglers.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
