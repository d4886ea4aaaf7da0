"""Thread pools of the TFF workers tff-amqp starts: $TFF_AMQP_WORKER_THREADS
sizes them (TensorFlow's inter-op and intra-op pools), and a local
federation, whose silos share one machine, gives each silo's worker a share of
the cores instead of TensorFlow's one thread per core each."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from tests.support.silo_cli import assert_silo_refuses
from tff_amqp.local import LocalFederation, SiloOptions, local_worker_threads
from tff_amqp.processes import WORKER_THREADS_ENV, worker_thread_env
from tff_amqp.tff_worker import WorkerError
from tff_amqp.tff_worker.process import WorkerBinary

POOLS = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _children(pid: int, command: str) -> list[int]:
    """Processes whose parent is `pid` and whose command name is `command`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        if parent == pid and name == command[:15]:
            found.append(int(entry.name))
    return found


def test_the_setting_is_read_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WORKER_THREADS_ENV, raising=False)
    assert worker_thread_env() is None
    monkeypatch.setenv(WORKER_THREADS_ENV, "0")
    assert worker_thread_env() is None
    monkeypatch.setenv(WORKER_THREADS_ENV, " 2 ")
    assert worker_thread_env() == dict.fromkeys(POOLS, "2")
    for bad in ("two", "-1", "1.5"):
        monkeypatch.setenv(WORKER_THREADS_ENV, bad)
        with pytest.raises(ValueError, match=f"{WORKER_THREADS_ENV}='{bad}'"):
            worker_thread_env()


def test_a_bad_setting_starts_no_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WORKER_THREADS_ENV, "many")

    async def start() -> WorkerBinary:
        worker = WorkerBinary()
        try:
            await worker.start()
        finally:
            await worker.stop()
        return worker

    with pytest.raises(WorkerError, match="whole number of threads"):
        asyncio.run(start())


@pytest.mark.parametrize("setting", ["3", "0"])
def test_a_worker_process_gets_its_pool_sizes(
    monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    monkeypatch.setenv(WORKER_THREADS_ENV, setting)
    for pool in POOLS:
        monkeypatch.delenv(pool, raising=False)

    async def environ_of_worker() -> dict[str, str]:
        async with WorkerBinary() as worker:
            assert worker.pid is not None
            return _environ(worker.pid)

    environ = asyncio.run(environ_of_worker())
    if setting == "0":
        assert not any(pool in environ for pool in POOLS), environ
    else:
        assert {pool: environ.get(pool) for pool in POOLS} == dict.fromkeys(POOLS, setting)


def test_local_silos_share_the_machine_unless_told_otherwise(
    local: LocalFederation, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over the real broker: a silo started by the local launcher runs its
    worker with `local_worker_threads()` threads per pool; a silo whose
    options set the variable gets what they say."""
    monkeypatch.delenv(WORKER_THREADS_ENV, raising=False)
    shared = local.start_silo("shares")
    told = local.start_silo("told", options=SiloOptions(env={WORKER_THREADS_ENV: "3"}))
    local.wait_ready(timeout=180)
    expected = {"shares": str(local_worker_threads()), "told": "3"}
    for name, process in (("shares", shared), ("told", told)):
        assert process.process is not None
        deadline = time.monotonic() + 30
        workers: list[int] = []
        while not workers and time.monotonic() < deadline:
            workers = _children(process.process.pid, "worker_binary")
            time.sleep(0.1)
        assert len(workers) == 1, f"silo {name!r}: worker processes {workers}"
        environ = _environ(workers[0])
        assert {pool: environ.get(pool) for pool in POOLS} == dict.fromkeys(
            POOLS, expected[name]
        ), name


def test_local_worker_threads_is_a_share_of_the_cores() -> None:
    cores = os.cpu_count() or 1
    assert local_worker_threads() == max(1, cores // 4)
    assert 1 <= local_worker_threads() <= cores


@pytest.mark.parametrize("command", ["silo", "silos"])
def test_a_silo_with_a_bad_setting_stops_at_once(amqp_url: str, command: str) -> None:
    """Checked with the other flags, before the broker and TensorFlow:
    exit status 2 and one line naming the variable."""
    assert_silo_refuses(amqp_url, WORKER_THREADS_ENV, "many", command)
