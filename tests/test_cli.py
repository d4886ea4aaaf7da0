"""The command line: help, clear errors for bad input and unreachable brokers,
and the demo (the README's main command) end to end on the real broker."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from tff_amqp.local import die_with_parent


def _run(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tff_amqp", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
        preexec_fn=die_with_parent,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )


def test_help_lists_commands_and_silo_flags():
    top = _run("--help")
    assert top.returncode == 0
    assert "silo" in top.stdout and "demo" in top.stdout
    silo = _run("silo", "--help")
    for flag in ("--broker", "--federation", "--name", "--data", "--allow-raw-client-values"):
        assert flag in silo.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("silo", "--name", "a", "--data", "novalue"), "KEY=PATH"),
        (("silo", "--name", "a", "--data", "k=/no/such/path"), "/no/such/path"),
        (("silo", "--name", "bad.name"), "invalid silo name"),
        (("silo", "--name", "a", "--federation", "x*y"), "invalid federation name"),
    ],
)
def test_bad_silo_arguments_fail_with_a_specific_message(args, words):
    result = _run(*args)
    assert result.returncode == 2
    assert words in result.stderr


def test_unreachable_broker_is_a_clear_bounded_error():
    started = time.monotonic()
    result = _run(
        "silo",
        "--name",
        "lonely",
        "--broker",
        "amqp://guest:guest@127.0.0.1:1/",
        "--connect-timeout",
        "2",
    )
    assert time.monotonic() - started < 60
    assert result.returncode == 1
    assert "cannot reach the RabbitMQ broker at amqp://guest:***@127.0.0.1:1/" in result.stderr
    assert "rabbitmq-server -detached" in result.stderr


def test_demo_runs_a_local_federation_end_to_end(amqp_url):
    result = _run(
        "demo", "--broker", amqp_url, "--rounds", "2", "--log-level", "warning", timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    federated = re.search(r"federated result\s+([\d.]+)", out)
    direct = re.search(r"direct from files\s+([\d.]+)", out)
    assert federated and direct, out
    assert float(federated.group(1)) == pytest.approx(float(direct.group(1)), abs=1e-4)
    rounds = re.findall(r"^\s+(\d)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+ s$", out, flags=re.M)
    assert [r[0] for r in rounds] == ["1", "2"]
    assert "Stopped 3 silos" in out


def test_status_lists_live_silos_with_heartbeat_and_load(amqp_url, silo_federation):
    result = _run(
        "status", "--broker", amqp_url, "--federation", silo_federation.name, "--window", "2.5"
    )
    assert result.returncode == 0, result.stderr
    assert f"federation {silo_federation.name!r}: {len(silo_federation.silos)} live silo(s)" in (
        result.stdout
    )
    for name in silo_federation.silos:
        line = next(row for row in result.stdout.splitlines() if row.startswith(name))
        assert "live" in line and "s ago" in line and "readings" in line


def test_status_of_an_empty_federation_says_how_to_start_a_silo(amqp_url):
    result = _run("status", "--broker", amqp_url, "--federation", "nobody-here", "--window", "1")
    assert result.returncode == 0
    assert "no silo of federation 'nobody-here'" in result.stdout
    assert "tff-amqp silo --federation nobody-here" in result.stdout
