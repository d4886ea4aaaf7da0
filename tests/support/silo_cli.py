"""Running the `tff-amqp silo` / `tff-amqp silos` command lines in a test."""

from __future__ import annotations

import os
import subprocess
import sys


def assert_silo_refuses(amqp_url: str, variable: str, value: str, command: str = "silo") -> None:
    """`tff-amqp silo` (or `command`: `silos`, a simulation host) with
    `variable=value` in its environment stops at start, before the broker
    and TensorFlow: exit status 2 and one line naming the variable and the
    value, no traceback."""
    env = {**os.environ, variable: value}
    done = subprocess.run(
        [sys.executable, "-m", "tff_amqp", command, "--broker", amqp_url,
         "--federation", "t-refusal", "--name", "a"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"{variable}={value!r}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
