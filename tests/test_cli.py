"""The command line: help, clear errors for bad input and unreachable brokers,
and the demo (the README's main command) end to end on the real broker."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.support.processes import marked_processes
from tff_amqp.processes import die_with_parent

DEMO_MARKER = "TFF_AMQP_DEMO_TEST"
DEMO = (sys.executable, "-m", "tff_amqp", "demo")


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


# Options every silo-side command takes from the one set in silo/options.py,
# and those of the commands that own their broker connection.
_SILO_SIDE_FLAGS = (
    "--broker",
    "--federation",
    "--data",
    "--heartbeat-interval",
    "--connect-timeout",
    "--no-declare",
)
_ENDPOINT_FLAGS = ("--max-message-bytes", "--tls-ca", "--tls-cert", "--tls-key", "--metrics-port")


def test_silo_side_commands_share_their_options_and_say_what_they_do():
    top = " ".join(_run("--help").stdout.split())
    # The one-line help of each command (worker's and silos' from their modules' docstrings).
    for line in (
        "run a silo agent: connect out to the broker and serve executor requests",
        "run a stateless worker of a silo's pool (MapReduce work items)",
        "simulation: run many silo agents in one process (shared TensorFlow import)",
    ):
        assert line in top
    for command, description, own_connection in (
        ("silo", "Run a silo agent. It opens only an outbound connection", True),
        ("worker", "Run one stateless worker of silo SILO.", True),
        ("silos", "Simulation and testing mode: run several silo agents", False),
    ):
        result = _run(command, "--help")
        assert result.returncode == 0, result.stderr
        text = " ".join(result.stdout.split())
        assert description in text
        for flag in _SILO_SIDE_FLAGS:
            assert flag in text, (command, flag)
        for flag in _ENDPOINT_FLAGS:
            assert (flag in text) is own_connection, (command, flag)


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


@pytest.mark.slow
def test_demo_runs_a_local_federation_end_to_end_and_leaves_no_process(amqp_url):
    marker = uuid.uuid4().hex
    result = subprocess.run(
        [
            *DEMO,
            "--broker",
            amqp_url,
            "--rounds",
            "2",
            "--log-level",
            "warning",
            "--progress",
            "on",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,
        preexec_fn=die_with_parent,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", DEMO_MARKER: marker},
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
    # The demo named its federation and removed it from the broker.
    name = re.search(r"federation '(demo-[0-9a-f]+)'", out)
    assert name, out
    assert f"Removed federation {name.group(1)!r} from the broker" in out
    # Progress (forced on) went to stderr: the selected silos and each invocation's end.
    assert re.search(
        r"selected 3 silo\(s\): clinic_east, clinic_north, clinic_south", result.stderr
    )
    assert len(re.findall(r"\] done in [\d.]+ s: 3/3 silo\(s\) took part", result.stderr)) >= 3
    # Every silo and worker_binary the demo started is gone (the demo
    # stopped them itself: nothing was left for the session's leak check).
    assert marked_processes(DEMO_MARKER, marker) == []


@pytest.mark.slow
def test_interrupted_demo_stops_every_process_it_started(amqp_url):
    """Ctrl-C while the silos run: the demo stops them all and exits 130."""
    marker = uuid.uuid4().hex
    demo = subprocess.Popen(
        [*DEMO, "--broker", amqp_url, "--rounds", "50"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=die_with_parent,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", DEMO_MARKER: marker},
    )
    try:
        lines = []
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.append(line)
            if "started silo clinic_east" in line:
                break
        # The silos exist now (and carry the marker).
        deadline = time.monotonic() + 30
        while len(marked_processes(DEMO_MARKER, marker)) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(marked_processes(DEMO_MARKER, marker)) >= 4, "".join(lines)
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(10)
    assert demo.returncode == 130, "".join(lines) + rest
    assert "every process the demo started has been stopped" in rest
    assert marked_processes(DEMO_MARKER, marker) == []


def test_demo_without_a_broker_says_how_to_get_one():
    result = _run("demo", "--broker", "amqp://guest:guest@127.0.0.1:1/", timeout=60)
    assert result.returncode == 1
    assert "cannot reach the RabbitMQ broker at amqp://guest:***@127.0.0.1:1/" in result.stderr
    for advice in (
        "rabbitmq-server -detached",
        "apt-get install rabbitmq-server",
        "docker compose up -d rabbitmq",
        "--broker amqp://USER:PASSWORD@HOST:5672/",
    ):
        assert advice in result.stdout  # the guide; stderr has the failure, in one line
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "error when creating transport" not in result.stderr  # no library noise


def test_demo_writes_sample_data_for_containers(tmp_path):
    result = _run("demo", "--write-data", str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr
    for clinic in ("clinic_north", "clinic_south", "clinic_east"):
        wards = sorted((tmp_path / "data" / clinic).glob("ward_*.csv"))
        assert wards, clinic
        assert wards[0].read_text().startswith("patient_id,age,systolic_bp,glucose,diabetic")


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


def test_status_of_an_unknown_federation_is_one_line_and_creates_nothing(amqp_url):
    name = f"nobody-{uuid.uuid4().hex[:8]}"
    result = _run("status", "--broker", amqp_url, "--federation", name, "--window", "1")
    assert result.returncode == 1
    assert result.stdout.startswith(f"no federation {name!r} on this broker")
    assert len(result.stdout.strip().splitlines()) == 1


def test_broker_may_be_repeated_for_the_nodes_of_a_cluster():
    import argparse

    from tff_amqp.silo.options import add_broker_options

    parser = argparse.ArgumentParser()
    add_broker_options(parser, "amqp://default:5672/")
    assert parser.parse_args([]).broker == "amqp://default:5672/"
    assert parser.parse_args(["--broker", "amqp://a:1/"]).broker == "amqp://a:1/"
    repeated = parser.parse_args(["--broker", "amqp://a:1/", "--broker", "amqp://b:2/"])
    assert repeated.broker == "amqp://a:1/,amqp://b:2/"
