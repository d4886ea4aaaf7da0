"""The test infrastructure itself: child processes, the broker fixture,
per-test federations and the end-of-session leak check. No tff_amqp needed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import aio_pika
import pytest

from tests.support.broker import (
    delete_federation_entities,
    federation_entities,
    new_federation_name,
    redact,
    run_async,
)
from tests.support.processes import marked_processes
from tff_amqp.local import LocalFederation, ManagedProcess, ProcessGroup, SiloOptions, wait_ready
from tff_amqp.processes import child_pids_named, kill_pid

ROOT = Path(__file__).resolve().parent.parent
MARKER = "TFF_AMQP_TEST_SESSION"
SLEEPER = "import sys, time; print('ready', file=sys.stderr, flush=True); time.sleep(60)"
IGNORES_TERM = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ignoring', flush=True); time.sleep(60)"
)


def _gone(pid: int) -> bool:
    """No such process, or only its zombie."""
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return True
    return state == "Z"


def test_process_starts_logs_and_stops(process_group: ProcessGroup) -> None:
    sleeper = process_group.start("sleeper", [sys.executable, "-c", SLEEPER])
    match = sleeper.wait_for_log(r"^ready$|ready", timeout=30)
    assert match.group(0) == "ready"
    assert sleeper.running
    assert os.getpgid(sleeper.pid) == sleeper.pid  # its own process group
    assert sleeper.log_path.parent == process_group.log_dir
    pid = sleeper.pid
    assert sleeper.stop() == -signal.SIGTERM
    assert _gone(pid)
    assert sleeper.stop() == -signal.SIGTERM  # idempotent


def test_child_inherits_the_session_marker(process_group: ProcessGroup) -> None:
    sleeper = process_group.start("sleeper", [sys.executable, "-c", SLEEPER])
    sleeper.wait_for_log("ready", timeout=30)
    environ = Path(f"/proc/{sleeper.pid}/environ").read_bytes().split(b"\0")
    assert f"{MARKER}={os.environ[MARKER]}".encode() in environ
    assert sleeper.pid in {pid for pid, _ in marked_processes(MARKER, os.environ[MARKER])}
    sleeper.stop()
    assert sleeper.pid not in {pid for pid, _ in marked_processes(MARKER, os.environ[MARKER])}


def test_process_ignoring_sigterm_is_killed_after_the_bound(tmp_path: Path) -> None:
    stubborn = ManagedProcess("stubborn", [sys.executable, "-c", IGNORES_TERM], tmp_path / "s.log")
    stubborn.start().wait_for_log("ignoring", timeout=30)
    started = time.monotonic()
    assert stubborn.stop(timeout=1.0) == -signal.SIGKILL
    assert time.monotonic() - started < 8
    assert _gone(stubborn.pid)


def test_group_exit_stops_everything_including_grandchildren(tmp_path: Path) -> None:
    spawn_grandchild = textwrap.dedent(
        f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", {IGNORES_TERM!r}])
        print("grandchild", child.pid, flush=True)
        time.sleep(60)
        """
    )
    with ProcessGroup(tmp_path / "logs") as group:
        parent = group.start("parent", [sys.executable, "-c", spawn_grandchild])
        grandchild = int(parent.wait_for_log(r"grandchild (\d+)", timeout=30).group(1))
        stubborn = group.start("stubborn", [sys.executable, "-c", IGNORES_TERM])
        stubborn.wait_for_log("ignoring", timeout=30)
        started = time.monotonic()
    # One shared 10 s bound for the group, then SIGKILL to each process group.
    assert time.monotonic() - started < 20
    for pid in (parent.pid, grandchild, stubborn.pid):
        deadline = time.monotonic() + 5
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(pid), pid


def test_wait_for_log_reports_early_exit_with_the_log_tail(process_group: ProcessGroup) -> None:
    code = (
        "import sys; print('loading config', flush=True); "
        "print('fatal: no such file', file=sys.stderr); sys.exit(3)"
    )
    crasher = process_group.start("crasher", [sys.executable, "-c", code])
    started = time.monotonic()
    with pytest.raises(RuntimeError) as raised:
        crasher.wait_for_log("never printed", timeout=60)
    assert time.monotonic() - started < 30  # noticed the exit, did not wait 60 s
    message = str(raised.value)
    assert "exited with code 3" in message
    assert "fatal: no such file" in message and "loading config" in message


def test_wait_for_log_times_out_with_the_log_tail(process_group: ProcessGroup) -> None:
    sleeper = process_group.start("sleeper", [sys.executable, "-c", SLEEPER])
    sleeper.wait_for_log("ready", timeout=30)
    with pytest.raises(TimeoutError) as raised:
        sleeper.wait_for_log("never printed", timeout=0.5)
    assert "within 0.5 s" in str(raised.value)
    assert "ready" in str(raised.value)
    assert sleeper.running


def test_log_tail_returns_the_last_lines(process_group: ProcessGroup) -> None:
    counter = process_group.start(
        "counter", [sys.executable, "-c", "for i in range(100): print('line', i)"]
    )
    counter.wait_for_log("line 99", timeout=30)
    assert counter.log_tail(3).splitlines() == ["line 97", "line 98", "line 99"]


def test_wait_ready_waits_for_every_silo_and_reports_a_dead_one(
    process_group: ProcessGroup,
) -> None:
    ready = (
        'import sys, time; print(\'{"event": "silo.ready"}\', file=sys.stderr, flush=True); '
        "time.sleep(60)"
    )
    a = process_group.start("silo-a", [sys.executable, "-c", ready])
    b = process_group.start("silo-b", [sys.executable, "-c", ready])
    wait_ready([a, b], timeout=30)
    dead = process_group.start("silo-dead", [sys.executable, "-c", "raise SystemExit('no broker')"])
    with pytest.raises(RuntimeError, match="no broker"):
        wait_ready([a, dead], timeout=60)


def test_start_silo_builds_the_documented_command_line(tmp_path: Path) -> None:
    with LocalFederation("amqp://u:p@h:5672/", "t-0000abcd", log_dir=tmp_path) as local:
        silo = local.start_silo(
            "alpha",
            data={"readings": tmp_path / "a", "labels": tmp_path / "b"},
            options=SiloOptions(extra_args=("--log-level", "info")),
        )
    assert not silo.running
    assert silo.args == [
        sys.executable, "-m", "tff_amqp", "silo",
        "--broker", "amqp://u:p@h:5672/", "--federation", "t-0000abcd", "--name", "alpha",
        "--data", f"readings={tmp_path / 'a'}", "--data", f"labels={tmp_path / 'b'}",
        "--log-level", "info",
    ]  # fmt: skip
    assert local["silo-alpha"] is silo and local.silos["alpha"] is silo
    assert silo.log_path == tmp_path / "silo-alpha.log"


def test_the_launcher_builds_worker_and_host_command_lines_with_options(tmp_path: Path) -> None:
    options = SiloOptions(
        tls_ca=tmp_path / "ca.pem", tls_cert=tmp_path / "c.pem", tls_key=tmp_path / "k.pem",
        max_message_bytes=1 << 20, metrics_port=9100, no_declare=True,
    )  # fmt: skip
    tls_args = [
        "--tls-ca", str(tmp_path / "ca.pem"), "--tls-cert", str(tmp_path / "c.pem"),
        "--tls-key", str(tmp_path / "k.pem"), "--max-message-bytes", "1048576",
        "--metrics-port", "9100", "--no-declare",
    ]  # fmt: skip
    assert options.args() == tls_args
    host_options = SiloOptions(
        default_clients=4, min_clients_per_aggregate=2, allow_raw_client_values=True
    )
    with LocalFederation("amqp://u:p@h:5672/", "t-0000abcd", log_dir=tmp_path) as local:
        first = local.start_pool_worker("north", data={"xy": tmp_path / "a"}, options=options)
        second = local.start_pool_worker(
            "north", options=SiloOptions(broker_url="amqp://north:pw@h:5672/")
        )
        host = local.start_silo_host(
            "h0", ["s000", "s001"], worker_mode="per-silo", options=host_options
        )
    assert first.args == [
        sys.executable, "-m", "tff_amqp", "worker",
        "--broker", "amqp://u:p@h:5672/", "--federation", "t-0000abcd",
        "--stateless", "--silo", "north", "--data", f"xy={tmp_path / 'a'}", *tls_args,
    ]  # fmt: skip
    assert second.args[4:6] == ["--broker", "amqp://north:pw@h:5672/"]
    assert local.silos == {"north#1": first, "north#2": second, "h0": host}
    assert (first.ready_event, host.ready_event) == ("pool_worker.ready", "silo_host.ready")
    assert second.log_path == tmp_path / "worker-north-2.log"
    assert host.args[4:] == [
        "--broker", "amqp://u:p@h:5672/", "--federation", "t-0000abcd",
        "--worker", "per-silo", "--name", "s000", "--name", "s001",
        "--default-clients", "4", "--min-clients-per-aggregate", "2",
        "--allow-raw-client-values",
    ]  # fmt: skip


def test_a_name_is_reused_only_once_its_process_has_exited(process_group: ProcessGroup) -> None:
    first = process_group.start("sleeper", [sys.executable, "-c", SLEEPER])
    with pytest.raises(ValueError, match="already in this group"):
        process_group.start("sleeper", [sys.executable, "-c", SLEEPER])
    first.stop()
    second = process_group.start("sleeper", [sys.executable, "-c", SLEEPER])
    assert second is not first and second.running and process_group["sleeper"] is second
    assert second.log_path == first.log_path  # a restart appends to the same log


def test_a_restarted_name_is_ready_only_when_the_new_process_says_so(
    process_group: ProcessGroup,
) -> None:
    # The log is shared by both processes; the first one's ready line must not
    # make the second look ready before it has said so itself.
    announce = "import json, sys, time; print(json.dumps({'event': 'silo.ready'}), flush=True)"
    first = process_group.start("announcer", [sys.executable, "-c", announce])
    wait_ready([first], timeout=30)
    first.stop()
    silent = process_group.start("announcer", [sys.executable, "-c", SLEEPER])
    assert first.is_ready() and "silo.ready" in first.log_text()
    assert not silent.is_ready() and "silo.ready" not in silent.log_text()


@pytest.mark.parametrize("with_psutil", [True, False], ids=["psutil", "proc"])
def test_child_pids_named_finds_live_children_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_psutil: bool
) -> None:
    if not with_psutil:
        monkeypatch.setitem(sys.modules, "psutil", None)  # import fails: /proc walk
    fake = tmp_path / "worker_binary"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", fake)
    before = child_pids_named("worker_binary")
    process = subprocess.Popen([str(fake), "60"])
    try:
        assert child_pids_named("worker_binary") - before == {process.pid}
        kill_pid(process.pid)
        deadline = time.monotonic() + 5
        while process.pid in child_pids_named("worker_binary") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.pid not in child_pids_named("worker_binary")  # a zombie doesn't count
    finally:
        process.kill()
        process.wait()


def test_leaked_process_fails_the_session(tmp_path: Path) -> None:
    pid_file = tmp_path / "leaked.pid"
    (tmp_path / "test_leaky.py").write_text(
        textwrap.dedent(
            f"""
            import subprocess
            from pathlib import Path

            def test_leaks():
                child = subprocess.Popen(["sleep", "120"], start_new_session=True)
                Path({str(pid_file)!r}).write_text(str(child.pid))
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != MARKER}  # a session of its own
    env["TFF_AMQP_LEAK_GRACE_SECONDS"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"), "-q",
         str(tmp_path / "test_leaky.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, output
    assert "1 passed" in output, output
    leaked = int(pid_file.read_text())
    assert "LEAKED PROCESSES" in output and f"pid {leaked}" in output and "sleep 120" in output
    deadline = time.monotonic() + 5
    while not _gone(leaked) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(leaked)


def test_federation_names_are_unique_and_valid(federation: str) -> None:
    names = {new_federation_name() for _ in range(1000)} | {federation}
    assert len(names) == 1001
    assert all(len(n) == 10 and n.startswith("t-") for n in names)
    assert redact("amqp://guest:secret@host:5672/") == "amqp://guest:***@host:5672/"


async def test_amqp_url_accepts_a_connection(amqp_url: str, federation: str) -> None:
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"tff.{federation}.probe", auto_delete=True)
        assert queue.name == f"tff.{federation}.probe"
        await queue.delete(if_unused=False, if_empty=False)


def test_federation_cleanup_deletes_only_its_own_queues_and_exchanges(
    amqp_url: str, federation: str
) -> None:
    other = f"{federation}-other"  # shares the name as a prefix, not the "tff.<fed>." one

    async def declare() -> None:
        async with await aio_pika.connect(amqp_url, timeout=10) as connection:
            channel = await connection.channel()
            for fed in (federation, other):
                exchange = await channel.declare_exchange(
                    f"tff.{fed}.requests", aio_pika.ExchangeType.DIRECT, durable=True
                )
                queue = await channel.declare_queue(f"tff.{fed}.req.alpha", durable=True)
                await queue.bind(exchange, routing_key="alpha")

    run_async(declare, timeout=30)
    try:
        if federation_entities(amqp_url, federation) is None:
            pytest.skip("clean-up needs a local broker and a working rabbitmqctl")
        deleted = delete_federation_entities(amqp_url, federation)
        assert sorted(deleted) == [f"tff.{federation}.req.alpha", f"tff.{federation}.requests"]
        assert federation_entities(amqp_url, federation) == ([], [])
        assert federation_entities(amqp_url, other) == (
            [f"tff.{other}.req.alpha"],
            [f"tff.{other}.requests"],
        )
    finally:
        delete_federation_entities(amqp_url, other)
