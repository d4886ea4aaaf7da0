"""Round time with one slow silo, with and without a straggler timeout.

    .venv/bin/python benchmarks/stragglers.py [--broker URL] [--delays 0 5 30]

8 local silo processes; in each round one silo is frozen (SIGSTOP) for D
seconds, then resumed, as a stalled datacenter would be. tff-amqp runs the
federated mean with `straggler_timeout=None` (wait for all, like TFF native)
and with `straggler_timeout=1` (proceed with >= min_silos=7). TFF native has
no silos and no timeout: its round is measured without a straggler and, since
it waits for every client, a straggler of D seconds adds D to it (that column
is native's measured time + D, marked as modeled). Writes
benchmarks/results/stragglers.json and stragglers.png.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks._common import RESULTS, machine, native_context, print_table, timed, write_result

SILOS = [f"s{i}" for i in range(8)]
CLIENTS = 16


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--broker", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument("--delays", type=float, nargs="+", default=[0.0, 5.0, 30.0])
    parser.add_argument("--straggler-timeout", type=float, default=1.0)
    args = parser.parse_args()

    import tensorflow_federated as tff

    import tff_amqp
    from tff_amqp.local import LocalFederation

    @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
    def mean(x):
        return tff.federated_mean(x)

    values = [float(i) for i in range(CLIENTS)]
    print(f"stragglers benchmark: {len(SILOS)} silos, delays {args.delays} s", flush=True)
    with native_context() as native, tff.framework.get_context_stack().install(native):
        native_s = float(np.median(timed(lambda: mean(values), repeats=10, warmup=2)))

    rows, records = [], []
    federation = f"bench-{uuid.uuid4().hex[:6]}"
    with LocalFederation(args.broker, federation) as local:
        for name in SILOS:
            local.start_silo(name)
        print("  starting 8 silos ...", flush=True)
        local.wait_ready(timeout=300)
        slow = local.silos[SILOS[-1]].process
        for timeout in (None, args.straggler_timeout):
            with (
                tff_amqp.create_sync_amqp_execution_context(
                    args.broker,
                    federation=federation,
                    min_silos=len(SILOS) - 1,
                    straggler_timeout=timeout,
                    heartbeat_timeout=120.0,  # a stalled silo is slow, not dead
                    deadline=120.0,
                    cohort_timeout=120.0,
                ) as context,
                tff.framework.get_context_stack().install(context),
            ):
                mean(values)  # warm up
                for delay in args.delays:
                    if delay:
                        os.kill(slow.pid, signal.SIGSTOP)
                        timer = threading.Timer(delay, os.kill, (slow.pid, signal.SIGCONT))
                        timer.start()
                    started = time.perf_counter()
                    mean(values)
                    round_s = time.perf_counter() - started
                    if delay:
                        timer.join()
                        time.sleep(1.0)  # let the silo catch up before the next round
                    label = "wait for all" if timeout is None else f"straggler_timeout={timeout:g}"
                    modeled_native = native_s + delay
                    rows.append([label, delay, round_s, modeled_native])
                    records.append(
                        {
                            "mode": label,
                            "delay_s": delay,
                            "round_s": round_s,
                            "native_measured_s": native_s,
                            "native_with_straggler_modeled_s": modeled_native,
                            "within_target": timeout is None or round_s <= timeout + 0.25,
                        }
                    )
                    print(f"  {label:28s} D={delay:5.1f} s  round {round_s:7.3f} s", flush=True)

    print()
    print_table(["mode", "delay s", "tff-amqp round s", "native s (measured + D)"], rows)
    path = write_result(
        "stragglers",
        {
            "machine": machine(),
            "silos": len(SILOS),
            "clients": CLIENTS,
            "native_round_s": native_s,
            "target": "round <= straggler_timeout + 0.25 s for any D",
            "rounds": records,
        },
    )
    _plot(records, native_s)
    print(f"\nwrote {path} and {RESULTS / 'stragglers.png'}")
    return 0


def _plot(records: list[dict], native_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in sorted({r["mode"] for r in records}):
        points = [(r["delay_s"], r["round_s"]) for r in records if r["mode"] == mode]
        ax.plot(*zip(*points, strict=True), marker="o", label=f"tff-amqp, {mode}")
    delays = sorted({r["delay_s"] for r in records})
    ax.plot(delays, [native_s + d for d in delays], "k--", label="TFF native (measured + D)")
    ax.set_xlabel("straggler delay D (s)")
    ax.set_ylabel("round time (s)")
    ax.set_title("Federated mean, 8 silos, one straggler")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "stragglers.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
