"""Simulation mode: many silo agents hosted in one `tff-amqp silos` process.

Over the real broker with real host processes: 6 silos in 2 hosts (one
sharing a worker_binary between its silos, one with a worker per silo) give
the same results as TFF native and as the CSV files themselves; each silo
keeps its own data; a host whose shared worker dies exits with an error, and
a SIGKILLed host takes its workers with it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

import tff_amqp
from tests.support.computations import fed_mean, glucose_totals
from tests.support.data import read_column, write_silo_csvs
from tests.support.federation import assert_close, run_in
from tff_amqp.local import LocalFederation, wait_ready
from tff_amqp.processes import child_pids_named
from tff_amqp.silo.stateful.host_cli import numbered_silo_names

# Long real-broker tests: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    """The pids still alive (not zombies) after at most `timeout` s."""
    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = {pid for pid in alive if _alive(pid)}
    return alive


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_numbered_silo_names_sort_in_numeric_order_across_hosts() -> None:
    first = numbered_silo_names("s", 3)
    second = numbered_silo_names("s", 12, first=3)
    names = first + second
    assert names[:4] == ["s000", "s001", "s002", "s003"]
    assert sorted(names) == names
    with pytest.raises(ValueError, match="at least 1"):
        numbered_silo_names("s", 0)


def test_silos_command_rejects_a_bad_silo_name_before_starting(local: LocalFederation) -> None:
    bad = local.start_silo_host("bad", ["ok", "not ok"], worker_mode="shared")
    assert bad.process is not None
    assert bad.process.wait(60) == 2
    assert "not ok" in bad.log_text()


def test_six_silos_in_two_hosts_match_native_and_keep_their_own_data(
    local: LocalFederation,
    amqp_url: str,
    federation: str,
    native_context: object,
    tmp_path: Path,
) -> None:
    names = numbered_silo_names("s", 6)
    for i, name in enumerate(names):
        write_silo_csvs(tmp_path, i, clients=1 + i % 3)
        (tmp_path / f"silo{i}").rename(tmp_path / name)
    data = {"readings": f"{tmp_path}/{{silo}}"}
    hosts = [
        local.start_silo_host("host-a", names[:3], worker_mode="shared", data=data),
        local.start_silo_host("host-b", names[3:], worker_mode="per-silo", data=data),
    ]
    wait_ready(hosts, timeout=240)
    # One shared worker in host-a, one per silo in host-b.
    assert len(child_pids_named("worker_binary", parent=hosts[0].pid)) == 1
    assert len(child_pids_named("worker_binary", parent=hosts[1].pid)) == 3

    values = [float(v) for v in (1.5, -2.0, 3.25, 8.0, 0.5, 4.0, 11.0, -7.5, 2.0, 6.0, 1.0, 9.0)]
    expected = run_in(native_context, fed_mean, values)
    with tff_amqp.create_sync_amqp_execution_context(
        amqp_url, federation=federation, min_silos=6, cohort_timeout=120.0, deadline=300.0
    ) as context:
        assert_close(run_in(context, fed_mean, values), expected)
        total, count = run_in(context, glucose_totals, tff_amqp.silo_data("readings"))
    column = [v for name in names for v in read_column(tmp_path / name, "glucose")]
    # Each silo read its own folder: the distinctive per-silo values add up.
    assert count == len(column)
    np.testing.assert_allclose(total, sum(np.float32(v) for v in column), rtol=1e-6)


def test_host_failures_take_their_silos_and_workers_down(local: LocalFederation) -> None:
    shared = local.start_silo_host("shared", ["a0", "a1"], worker_mode="shared")
    per_silo = local.start_silo_host("per-silo", ["b0", "b1"], worker_mode="per-silo")
    wait_ready([shared, per_silo], timeout=240)

    # The shared worker dies: every silo of the host is gone with it, so the
    # host stops them (goodbye) and exits with an error for a supervisor.
    (worker,) = child_pids_named("worker_binary", parent=shared.pid)
    os.kill(worker, signal.SIGKILL)
    assert shared.process is not None
    assert shared.process.wait(60) == 1
    assert "shared worker_binary died" in shared.log_text()

    # SIGKILL of the host alone (not its process group): the kernel kills
    # its worker_binaries (PR_SET_PDEATHSIG), nothing is left behind.
    workers = child_pids_named("worker_binary", parent=per_silo.pid)
    assert len(workers) == 2
    os.kill(per_silo.pid, signal.SIGKILL)
    assert wait_gone(workers, timeout=30) == set()
