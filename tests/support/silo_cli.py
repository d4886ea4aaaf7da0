"""Running the `tff-amqp silo` command line in a test."""

from __future__ import annotations

import os
import subprocess
import sys


def assert_silo_refuses(amqp_url: str, variable: str, value: str) -> None:
    """`tff-amqp silo` with `variable=value` in its environment stops at
    start, before the broker and TensorFlow: exit status 2 and one line
    naming the variable and the value, no traceback."""
    env = {**os.environ, variable: value}
    done = subprocess.run(
        [sys.executable, "-m", "tff_amqp", "silo", "--broker", amqp_url,
         "--federation", "t-refusal", "--name", "a"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"{variable}={value!r}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
