"""The front door: what a new user meets first.

- the setup and test scripts finish at a terminal (a pseudo-terminal here)
  and as a non-root user, and probe the broker as a client does;
- known failures of every command are one to three lines on stderr, fast;
- `status` is read-only; `federation list/remove` clean a broker up; the demo
  removes its federation (tests/test_cli.py runs the demo itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest
import yarl

from tests.support.broker import federation_entities, new_federation_name
from tests.support.processes import marked_processes
from tests.support.provisioning import ProvisionedFederation, admin_url_for
from tff_amqp.processes import die_with_parent
from tff_amqp.topology import Topology

ROOT = Path(__file__).resolve().parent.parent
PROBE = ROOT / "scripts" / "broker_probe.py"
MARKER = "TFF_AMQP_FRONTDOOR_TEST"


def _run(*args: str, timeout: float = 120.0, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tff_amqp", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=die_with_parent,
        # The session marker stays: a leaked silo would be caught.
        env={k: v for k, v in {**os.environ, **env}.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
    )


def _with_password(url: str, password: str) -> str:
    return str(yarl.URL(url).with_password(password))


def _with_port(url: str, port: int) -> str:
    return str(yarl.URL(url).with_port(port))


def _in_pty(command: str, *, timeout: float, user: str | None = None, **env: str):
    """Run `command` (bash) under a pseudo-terminal, as `user` if given."""
    argv = ["script", "-q", "-e", "-c", command, "/dev/null"]
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    return subprocess.run(
        argv,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=die_with_parent,
        env=_user_env(**env),
    )


def _user_env(**extra: str) -> dict[str, str]:
    """Our environment as a user's shell would have it: without the test
    session's marker (a pytest inside would kill every process carrying it,
    `script` and bash included, at its end) and TensorFlow's log level."""
    env = {k: v for k, v in os.environ.items() if k not in ("TFF_AMQP_TEST_SESSION",)}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return {**env, **extra}


# ------------------------------------------------------------------ the probe


def test_broker_probe_answers_for_a_broker_and_explains_otherwise(amqp_url):
    up = subprocess.run([sys.executable, str(PROBE), amqp_url], capture_output=True, timeout=30)
    assert up.returncode == 0, up.stderr
    started = time.monotonic()
    down = subprocess.run(
        [sys.executable, str(PROBE), _with_port(amqp_url, 1)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert time.monotonic() - started < 5
    assert down.returncode == 1
    assert down.stderr.strip().splitlines() == ["cannot connect to 127.0.0.1:1: Connection refused"]
    bad = subprocess.run(
        [sys.executable, str(PROBE), "http://x/"], capture_output=True, text=True, timeout=30
    )
    assert bad.returncode == 2


# ------------------------------------------------ the scripts at a terminal


@pytest.mark.skipif(shutil.which("script") is None, reason="util-linux `script` not installed")
def test_test_script_finishes_under_a_terminal():
    """`timeout` without --foreground left a background job on the terminal:
    stopped (state T) forever. Under a pty, the script must finish."""
    done = _in_pty("bash scripts/test.sh --collect-only -q tests/test_frontdoor.py", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the broker at" in done.stdout and "answers" in done.stdout
    assert re.search(r"\d+ tests? collected", done.stdout), done.stdout


@pytest.fixture
def other_user() -> Iterator[str]:
    """A throwaway OS user (root only), deleted afterwards."""
    if os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("runuser") is None:
        pytest.skip("needs root, useradd and runuser to create a throwaway user")
    name = f"tffdoor{uuid.uuid4().hex[:6]}"
    subprocess.run(["useradd", "-M", "-s", "/bin/bash", name], check=True, timeout=30)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], timeout=30, check=False)


@pytest.mark.skipif(shutil.which("script") is None, reason="util-linux `script` not installed")
def test_scripts_finish_for_a_non_root_user(other_user, amqp_url):
    """As another user, `rabbitmq-diagnostics` refuses to run; the client-style
    probe works. This checkout's .venv points into root's home, so that user
    cannot run it: setup says so in one line and fails at once (documented in
    the README); the broker check still runs and passes."""
    for command in ("bash scripts/setup.sh", "bash scripts/test.sh --collect-only -q"):
        started = time.monotonic()
        done = _in_pty(command, timeout=120, user=other_user, AMQP_URL=amqp_url)
        assert time.monotonic() - started < 60, command
        out = done.stdout
        assert "answers" in out, (command, out)
        usable = subprocess.run(
            ["runuser", "-u", other_user, "--", str(ROOT / ".venv/bin/python"), "-c", ""],
            capture_output=True,
            timeout=60,
        )
        if usable.returncode != 0:
            assert done.returncode == 1, (command, out)
            assert "its Python is not usable by" in out, out
        else:
            assert done.returncode == 0, (command, out)


# ----------------------------------------------- known failures: a sentence


def _assert_short_failure(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit 1 or 2, no traceback, 1-3 lines on stderr. Structured info-level
    log events (JSON, the commands' default --log-level info, e.g.
    "silo.stopped") are for log collectors, not counted; warnings and errors
    are."""
    lines = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and not (line.startswith('{"ts"') and '"level": "info"' in line)
    ]
    assert result.returncode in (1, 2), result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert 1 <= len(lines) <= 3, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


@pytest.mark.parametrize(
    ("command", "fault", "words"),
    [
        ("status", "port", ("cannot reach the RabbitMQ broker", "within 5 s")),
        ("status", "password", ("refused user 'guest'", "wrong user name or password")),
        ("status", "url", ("broker URL must look like amqp://",)),
        ("silo", "port", ("cannot reach the RabbitMQ broker",)),
        ("silo", "password", ("refused user 'guest'",)),
        ("silos", "password", ("refused user 'guest'",)),
        ("worker", "password", ("refused user 'guest'",)),
        ("demo", "password", ("refused user 'guest'",)),
        ("demo", "port", ("cannot reach the RabbitMQ broker",)),  # (the guide is on stdout)
        ("federation", "url", ("management",)),
    ],
)
def test_known_failures_are_one_to_three_lines_within_seconds(amqp_url, command, fault, words):
    broker = {
        "port": _with_port(amqp_url, 1),
        "password": _with_password(amqp_url, "not-the-password"),
        "url": "http://127.0.0.1:5672/",
    }[fault]
    args = {
        "status": ["status", "--window", "1"],
        "silo": ["silo", "--name", "a"],
        "silos": ["silos", "--name", "a"],
        "worker": ["worker", "--silo", "a"],
        "demo": ["demo", "--rounds", "1"],
        "federation": ["federation", "list"],
    }[command]
    flag = "--management" if command == "federation" else "--broker"
    started = time.monotonic()
    result = _run(*args, flag, broker, timeout=120)
    assert time.monotonic() - started < 30  # TensorFlow is never imported first
    _assert_short_failure(result, *words)


def test_missing_data_file_is_one_line(amqp_url):
    result = _run("silo", "--name", "a", "--broker", amqp_url, "--data", "k=/no/such/file.csv")
    _assert_short_failure(result, "/no/such/file.csv")
    assert result.returncode == 2


def test_debug_log_level_shows_the_traceback(amqp_url):
    result = _run("status", "--broker", _with_password(amqp_url, "wrong"), "--log-level", "debug")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "BrokerAuthError" in result.stderr


def test_unreachable_broker_is_reported_within_five_seconds():
    started = time.monotonic()
    result = _run("status", "--broker", "amqp://guest:guest@127.0.0.1:1/")
    elapsed = time.monotonic() - started
    _assert_short_failure(result, "within 5 s")
    # 5 s of retries plus the interpreter's start (aio-pika, not TensorFlow),
    # which takes seconds on a loaded machine.
    assert elapsed < 12, elapsed


def test_connect_gives_up_within_its_budget_backoff_included():
    from tff_amqp.errors import BrokerUnreachableError
    from tff_amqp.transport.connection import connect

    started = time.monotonic()
    with pytest.raises(BrokerUnreachableError, match="Connect call failed"):
        asyncio.run(connect("amqp://guest:guest@127.0.0.1:1/", name="frontdoor test"))
    assert 4.5 < time.monotonic() - started < 5.8


def test_an_attempt_cut_short_by_the_budget_reports_the_last_real_error(monkeypatch):
    # On a loaded machine the budget can end while an attempt is still
    # connecting: the message names the error before it, not the cancellation.
    from tff_amqp.errors import BrokerUnreachableError
    from tff_amqp.retry import RetryPolicy
    from tff_amqp.transport import connection as transport_connection

    attempts = []

    async def refused_then_hanging(self, timeout=None):
        attempts.append(timeout)
        if len(attempts) == 1:
            raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 1)")
        await asyncio.sleep(60)

    monkeypatch.setattr(transport_connection.FailoverConnection, "connect", refused_then_hanging)
    # No jitter: the second attempt starts 0.05 s after the first, surely
    # within the budget (the default jitter alone may wait past 1 s).
    policy = RetryPolicy(initial_delay=0.05, jitter=0.0, total_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(BrokerUnreachableError, match="Connect call failed") as caught:
        asyncio.run(
            transport_connection.connect(
                "amqp://guest:guest@127.0.0.1:1/", name="frontdoor test", policy=policy
            )
        )
    assert len(attempts) == 2
    assert "CancelledError" not in str(caught.value)
    assert time.monotonic() - started < 3


def test_wrong_password_is_a_broker_auth_error_in_python(amqp_url):
    from tff_amqp.errors import BrokerAuthError, BrokerUnreachableError
    from tff_amqp.transport.connection import connect

    with pytest.raises(BrokerAuthError) as caught:
        asyncio.run(connect(_with_password(amqp_url, "wrong"), name="frontdoor test"))
    assert "ACCESS_REFUSED" not in str(caught.value)
    assert isinstance(caught.value, BrokerUnreachableError)  # compatible with older code
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


# ---------------------------------------------------- status is read-only


def test_status_of_an_unknown_federation_creates_nothing(amqp_url, federation):
    before = federation_entities(amqp_url, federation)
    result = _run("status", "--broker", amqp_url, "--federation", federation, "--window", "1")
    assert result.returncode == 1
    assert result.stdout.strip().splitlines() == [
        f"no federation {federation!r} on this broker (its exchange tff.{federation}.replies "
        "does not exist); `tff-amqp federation list` shows the ones that do"
    ]
    after = federation_entities(amqp_url, federation)
    if before is None:
        pytest.skip("rabbitmqctl cannot list this broker's objects")
    assert before == after == ([], [])


# ------------------------------------- provisioned users: hints, clean-up


@pytest.fixture
def provisioned(amqp_url) -> Iterator[ProvisionedFederation]:
    with ProvisionedFederation(amqp_url, admin_url_for(amqp_url), ["alpha"]) as fed:
        yield fed


def test_silo_credentials_in_status_or_declaring_silo_get_a_hint(provisioned):
    url = provisioned.silo_urls["alpha"]
    status = _run("status", "--broker", url, "--federation", provisioned.name, "--window", "1")
    _assert_short_failure(status, "the broker refused", "coordinator's broker URL")
    silo = _run("silo", "--broker", url, "--federation", provisioned.name, "--name", "alpha")
    _assert_short_failure(silo, "the broker refused", "--no-declare")
    assert "logfile" not in silo.stderr


def _users(admin_url: str) -> set[str]:
    url = yarl.URL(admin_url)
    request = urllib.request.Request(f"http://{url.host}:{url.port}/api/users?columns=name")
    token = f"{url.user}:{url.password}".encode()
    import base64

    request.add_header("Authorization", "Basic " + base64.b64encode(token).decode())
    with urllib.request.urlopen(request, timeout=15) as response:
        return {u["name"] for u in json.loads(response.read())}


def test_federation_list_and_remove_with_users(provisioned, amqp_url):
    name = provisioned.name
    listing = _run("federation", "list", "--users", "--broker", amqp_url)
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith(name + " "))
    assert row.split()[-1] == "2"  # the silo's and the coordinator's users
    # Without a terminal and without --yes: list, refuse, delete nothing.
    refused = _run("federation", "remove", name, "--users", "--broker", amqp_url)
    assert refused.returncode == 1
    assert "pass --yes" in refused.stderr
    assert f"queue tff.{name}.req.alpha" in refused.stdout
    assert f"exchange tff.{name}.replies" in refused.stdout
    assert f"user silo.{name}.alpha" in refused.stdout
    removed = _run("federation", "remove", name, "--users", "--yes", "--broker", amqp_url)
    assert removed.returncode == 0, removed.stderr
    assert "removed" in removed.stdout
    entities = federation_entities(amqp_url, name)
    if entities is not None:
        assert entities == ([], [])
    users = _users(admin_url_for(amqp_url))
    assert f"silo.{name}.alpha" not in users and f"coordinator.{name}" not in users
    again = _run("federation", "remove", name, "--yes", "--broker", amqp_url)
    assert again.returncode == 0 and "nothing to remove" in again.stdout


def test_removing_a_federation_over_amqp_deletes_what_the_demo_leaves(amqp_url):
    from tff_amqp.federation_cli import remove_after_demo

    name = new_federation_name()

    async def declare() -> None:
        connection = await aio_pika.connect(amqp_url, timeout=10)
        try:
            channel = await connection.channel()
            for exchange in ("requests", "replies", "bulk"):
                await channel.declare_exchange(f"tff.{name}.{exchange}", durable=True)
            await channel.declare_queue(f"tff.{name}.req.north", durable=True)
            await channel.declare_queue(f"tff.{name}.bulk.north", durable=True)
            # A stateless round with a large broadcast leaves a stream too.
            stream = Topology(name).broadcast_queue_spec("north")
            await channel.declare_queue(stream.name, durable=True, arguments=stream.arguments)
        finally:
            await connection.close()

    asyncio.run(declare())
    try:
        removed = remove_after_demo(amqp_url, name, ["north"])
        assert f"queue tff.{name}.req.north" in removed
        assert f"queue tff.{name}.broadcast.north" in removed
        entities = federation_entities(amqp_url, name)
        if entities is not None:
            assert entities == ([], [])
    finally:
        with contextlib.suppress(Exception):
            remove_after_demo(amqp_url, name, ["north"])


# ---------------------------------------------- the demo script at a terminal


def _broker_names(kind: str) -> set[str] | None:
    if shutil.which("rabbitmqctl") is None:
        return None
    columns = [] if kind == "users" else ["name"]  # list_users takes no columns
    done = subprocess.run(
        ["rabbitmqctl", f"list_{kind}", "-q", "--no-table-headers", *columns],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        return None
    return {line.split()[0] for line in done.stdout.splitlines() if line.strip()}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("script") is None, reason="util-linux `script` not installed")
def test_demo_script_finishes_under_a_terminal_and_leaves_nothing_behind(amqp_url):
    before = {kind: _broker_names(kind) for kind in ("queues", "exchanges", "users")}
    marker = uuid.uuid4().hex
    done = _in_pty(
        "bash scripts/demo.sh --rounds 1",
        timeout=600,
        AMQP_URL=amqp_url,
        TFF_AMQP_BROKER=amqp_url,
        **{MARKER: marker},
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    federation = re.search(r"federation '(demo-[0-9a-f]+)'", out)
    assert federation, out
    name = federation.group(1)
    for silo in ("clinic_north", "clinic_south", "clinic_east"):
        assert re.search(rf"silo {silo} is up \(\d+ s; \d/3\)", out), out
    assert f"Removed federation {name!r} from the broker" in out
    assert marked_processes(MARKER, marker) == []
    after = {kind: _broker_names(kind) for kind in ("queues", "exchanges", "users")}
    if None in before.values() or None in after.values():
        pytest.skip("rabbitmqctl cannot list this broker's objects")
    for kind in ("queues", "exchanges", "users"):
        assert not [n for n in after[kind] if name in n], (kind, after[kind])
    # Nothing new the demo made (others' tests may add their own t-* objects).
    others = {n for n in after["users"] if ".t-" in n}
    assert after["users"] <= before["users"] | others


# ------------------------------------------------------- cohort wait feedback


def test_cohort_wait_says_whom_it_waits_for_and_stops_with_the_cohort():
    import io
    from types import SimpleNamespace

    from tff_amqp.observe.cohort_wait import CohortWaitDisplay
    from tff_amqp.observe.events import InvocationEvents
    from tff_amqp.observe.telemetry import CoordinatorTelemetry

    live = ["north", "south"]
    options = SimpleNamespace(
        min_silos=3, cohort_timeout=120.0, metrics_port=None, progress=True, federation="f"
    )
    membership = SimpleNamespace(live=lambda: [SimpleNamespace(name=n) for n in live])
    # Shown with the progress display of either regime's coordinator.
    telemetry = CoordinatorTelemetry(options, InvocationEvents(), membership, lambda: None)
    assert isinstance(telemetry.cohort_wait, CohortWaitDisplay)
    telemetry.close()
    stream = io.StringIO()
    display = CohortWaitDisplay(options, membership, stream=stream, delay=0.1, interval=0.1)
    display.invocation_started("abcdef0123")
    time.sleep(0.5)
    display.cohort_chosen("abcdef0123", ["east", "north", "south"], 0.5)
    time.sleep(0.3)
    lines = stream.getvalue().splitlines()
    assert lines, "nothing shown during the wait"
    assert re.fullmatch(
        r"\[abcdef01\] waiting for 3 silos: north, south live; \d+ s of 120", lines[0]
    ), lines
    count = len(lines)
    time.sleep(0.3)
    assert len(stream.getvalue().splitlines()) == count  # stopped with the cohort
    # Enough silos live (e.g. server-only work): nothing to say.
    live.append("east")
    assert display.line("x", 1.0) is None
    display.close()


def test_the_demo_reports_a_silo_that_came_up_after_the_watchers_last_look():
    """The demo's "silo X is up" lines: a silo ready just before the watcher
    stops (after its last poll) is reported too, exactly once."""
    import threading
    import time
    from types import SimpleNamespace

    from tff_amqp.demo import _SiloWatcher

    class Silo:
        running = True

        def __init__(self) -> None:
            self.ready = False

        def is_ready(self) -> bool:
            return self.ready

    silos = {"north": Silo(), "south": Silo()}
    lines: list[str] = []
    first = threading.Event()

    def say(line: str) -> None:
        lines.append(line)
        first.set()

    with _SiloWatcher(SimpleNamespace(silos=silos), say, time.monotonic()):
        silos["north"].ready = True
        assert first.wait(5), "the watcher never reported north"
        silos["south"].ready = True  # and stop at once: no poll of the thread saw it
    assert [line.split(" is up")[0].strip() for line in lines] == ["silo north", "silo south"]
    assert lines[-1].endswith("2/2)")
