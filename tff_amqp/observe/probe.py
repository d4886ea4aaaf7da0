"""A health probe for silo-side processes, for Kubernetes exec probes:

    python -m tff_amqp.observe.probe --port 9100 [--within 5] [--role silo|worker]

Succeeds (exit 0) when the process's own metrics endpoint (`--metrics-port`)
shows its `published_bytes` counter growing within `--within` seconds. A
silo and a pool worker publish a heartbeat every `--heartbeat-interval`
(default 1 s) and count its bytes only after the broker took it, so growth
means: the process is up, its event loop runs, and its heartbeats reach the
broker, which is what the coordinator judges liveness by. Otherwise exit 1
with one line saying why. Only loopback HTTP is used: the pod opens no port.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

from prometheus_client.parser import text_string_to_metric_families

# The metric prefix of each silo-side role (tff_amqp.observe.metrics).
PREFIXES = {"silo": "tff_amqp_silo", "worker": "tff_amqp_worker"}


class ProbeError(Exception):
    """The probe failed; the message says why."""


def published_bytes(url: str, metric: str, timeout: float) -> float:
    """The value of `metric` (summed over its labels) at the endpoint `url`."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError) as e:
        raise ProbeError(f"no metrics at {url} ({e})") from e
    samples = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == metric
    ]
    if not samples:
        raise ProbeError(f"{url} has no {metric} (is this the right --role?)")
    return sum(samples)


def heartbeats_flow(
    url: str,
    metric: str,
    within: float,
    poll: float = 0.25,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Return once `metric` grew; ProbeError if it did not within `within` s."""
    deadline = clock() + within
    first = published_bytes(url, metric, timeout=max(0.1, within))
    while clock() < deadline:
        time.sleep(poll)
        if published_bytes(url, metric, timeout=max(0.1, deadline - clock())) > first:
            return
    raise ProbeError(
        f"{metric} did not grow in {within:g} s: no heartbeat reached the broker "
        "(broker unreachable, or the process is stuck)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tff_amqp.observe.probe", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--port", type=int, required=True, help="the process's --metrics-port")
    parser.add_argument(
        "--within",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for a heartbeat (default %(default)s; keep it above the "
        "heartbeat interval and below the probe's timeoutSeconds)",
    )
    parser.add_argument("--role", choices=sorted(PREFIXES), default="silo")
    args = parser.parse_args(argv)
    if args.within <= 0:
        parser.error("--within must be positive")
    url = f"http://127.0.0.1:{args.port}/metrics"
    try:
        heartbeats_flow(url, f"{PREFIXES[args.role]}_published_bytes_total", args.within)
    except ProbeError as e:
        print(f"tff-amqp probe: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
