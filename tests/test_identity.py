"""A silo name is held by one process at a time, and the coordinator never
mixes two processes' replies for one silo. Real broker, real silo processes.

- A second `tff-amqp silo` (or a simulation host's agent) claiming a live
  silo's name is refused at start (exclusive consumer on the silo's request
  queue) with an error naming the holder's host and pid, and consumes nothing:
  invocations afterwards see the first silo's data only, equal to native.
- When the holder dies, the name is free at once: a restarted silo serves.
- Every hello / heartbeat / reply carries the process's instance id: a reply
  from another instance than the one the request was sent to is rejected and
  counted; a new instance mid-invocation fails the old one's pending replies
  with SiloRestartedError (code "lost": a K-of-N gather drops the silo).
- `tff-amqp status` shows instance, host and pid per silo.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aio_pika
import pytest

from tests.support.data import write_silo_csvs
from tff_amqp import protocol as p
from tff_amqp.coordinator.mapreduce.link import WorkLink
from tff_amqp.coordinator.mapreduce.membership import PoolMembership
from tff_amqp.coordinator.membership import Membership
from tff_amqp.coordinator.stateful.link import CoordinatorLink
from tff_amqp.errors import SiloRestartedError
from tff_amqp.local import HOST_READY, LocalFederation, ManagedProcess
from tff_amqp.topology import Topology
from tff_amqp.transport.schema import declare_queue, declare_work_queue

# --------------------------------------------------------------- protocol


def test_instance_host_and_pid_travel_and_are_optional() -> None:
    status = p.SiloStatus(silo="north", clients=2, host="h1", pid=4242, started_at=1.0)
    envelope = p.Envelope(kind=p.Kind.HELLO, body=status, sender="north", instance="a" * 32)
    decoded = p.decode(p.encode(envelope))
    assert decoded.instance == "a" * 32
    assert isinstance(decoded.body, p.SiloStatus)
    assert (decoded.body.host, decoded.body.pid) == ("h1", 4242)
    # A peer that sends none of them (same protocol version) still decodes.
    bare = p.Envelope(kind=p.Kind.HELLO, body=p.SiloStatus(silo="north", clients=2), sender="n")
    payload = p.encode(bare)
    assert b"inst" not in payload and b"host" not in payload and b"pid" not in payload
    old = p.decode(payload)
    assert old.instance == "" and old.body.host == "" and old.body.pid == 0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("field", "value"),
    [("inst", 7), ("inst", "x" * 129), ("host", 3), ("pid", -1), ("pid", "12")],
)
def test_malformed_identity_fields_are_refused(field: str, value: object) -> None:
    import msgpack

    status = p.SiloStatus(silo="north", clients=1).to_wire()
    raw = {
        "v": p.PROTOCOL_VERSION,
        "kind": "hello",
        "id": "m1",
        "corr": "",
        "inv": "",
        "deadline": 0.0,
        "sender": "north",
        "body": status,
    }
    if field == "inst":
        raw["inst"] = value
    else:
        status[field] = value
    with pytest.raises(p.ProtocolError) as info:
        p.decode(msgpack.packb(raw, use_bin_type=True))
    assert info.value.code is p.ErrorCode.MALFORMED
    assert repr(field) in str(info.value)


# ------------------------------------------- coordinator intake (real broker)


def _status_envelope(kind: p.Kind, silo: str, instance: str) -> bytes:
    status = p.SiloStatus(silo=silo, clients=1, started_at=time.time())
    return p.encode(p.Envelope(kind=kind, body=status, sender=silo, instance=instance))


def _reply(silo: str, corr: str, value: bytes, instance: str) -> bytes:
    return p.encode(
        p.Envelope(
            kind=p.Kind.RESULT,
            body=p.Result(values={7: value}),
            sender=silo,
            invocation_id="inv-1",
            correlation_id=corr,
            instance=instance,
        )
    )


def _request(corr: str) -> p.Envelope:
    return p.batch_envelope(
        sender="coordinator",
        invocation_id="inv-1",
        correlation_id=corr,
        deadline=time.time() + 60,
        operations=[p.Compute(source=7)],
        seq=0,
    )


async def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_a_reply_from_another_instance_is_rejected_and_a_restart_fails_pending(
    amqp_url: str, federation: str
) -> None:
    t = Topology(federation)
    membership = Membership(liveness_timeout=60.0)
    link = CoordinatorLink(amqp_url, t, membership)
    await link.start()
    silo = await aio_pika.connect(amqp_url, timeout=10)
    first, forger, second = "1" * 32, "2" * 32, "3" * 32
    try:
        # Alpha's request queue exists, as a real silo declares it: requests
        # are published mandatory, so one without a queue would come back.
        await declare_queue(await silo.channel(), t, t.request_queue_spec("alpha"))
        replies = await (await silo.channel()).get_exchange(t.replies_exchange, ensure=False)
        key = t.reply_routing_key("alpha")

        async def send(body: bytes) -> None:
            await replies.publish(aio_pika.Message(body, user_id="guest"), key)

        await send(_status_envelope(p.Kind.HELLO, "alpha", first))
        await _wait_for(lambda: membership.instance_of("alpha") == first)

        future = await link.send("alpha", _request("corr-1"), expect_reply=True)
        assert future is not None
        # Same silo, key and user, another process: rejected and counted.
        await send(_reply("alpha", "corr-1", b"forged", forger))
        await _wait_for(lambda: link.stats["rejected_instance"] == 1)
        # No instance at all is another process too (not the one asked).
        await send(_reply("alpha", "corr-1", b"anonymous", ""))
        await _wait_for(lambda: link.stats["rejected_instance"] == 2)
        assert not future.done()
        # A goodbye of another instance does not remove the live one.
        await send(_status_envelope(p.Kind.GOODBYE, "alpha", forger))
        await send(_reply("alpha", "corr-1", b"genuine", first))
        result = await asyncio.wait_for(future, 10)
        assert result.values[7] == b"genuine"
        assert membership.instance_of("alpha") == first
        assert link.stats["rejected_replies"] == 2

        # The silo's process is replaced mid-invocation: what the old one owed
        # fails at once with a SiloRestartedError naming silo and instances.
        owed = await link.send("alpha", _request("corr-2"), expect_reply=True)
        assert owed is not None
        await send(_status_envelope(p.Kind.HELLO, "alpha", second))
        with pytest.raises(SiloRestartedError) as info:
            await asyncio.wait_for(owed, 10)
        assert info.value.silo == "alpha" and info.value.code == "lost"
        assert (info.value.old_instance, info.value.new_instance) == (first, second)
        assert first[:8] in str(info.value) and second[:8] in str(info.value)
        # The old process's late reply is not used; the new one's requests are.
        await send(_reply("alpha", "corr-2", b"old", first))
        fresh = await link.send("alpha", _request("corr-3"), expect_reply=True)
        assert fresh is not None
        await send(_reply("alpha", "corr-3", b"new", second))
        assert (await asyncio.wait_for(fresh, 10)).values[7] == b"new"
    finally:
        await silo.close()
        await link.close()


async def test_a_pools_workers_are_many_instances_of_one_silo(
    amqp_url: str, federation: str
) -> None:
    # Pool workers share a silo's work queue by design: any may answer.
    t = Topology(federation)
    membership = PoolMembership(liveness_timeout=60.0)
    link = WorkLink(amqp_url, t, membership)
    await link.start()
    silo = await aio_pika.connect(amqp_url, timeout=10)
    try:
        await declare_work_queue(await silo.channel(), t, "alpha")
        replies = await (await silo.channel()).get_exchange(t.replies_exchange, ensure=False)
        key = t.reply_routing_key("alpha")
        for instance in ("1" * 32, "2" * 32):
            body = _status_envelope(p.Kind.HELLO, "alpha", instance)
            await replies.publish(aio_pika.Message(body, user_id="guest"), key)
        await _wait_for(lambda: membership.pool_workers("alpha") == 2)
        request = p.Envelope(
            kind=p.Kind.WORK,
            body=p.WorkItem(
                data_key="k",
                shard=0,
                shards=1,
                work=b"w",
                zero=b"z",
                accumulate=b"a",
                broadcast=b"",
            ),
            sender="coordinator",
            invocation_id="inv-1",
            correlation_id="item-1",
            deadline=time.time() + 60,
        )
        future = await link.publish("alpha", request)
        result = p.Envelope(
            kind=p.Kind.WORK_RESULT,
            body=p.WorkResult(shard=0, clients=1, accumulator=b"acc"),
            sender="alpha",
            invocation_id="inv-1",
            correlation_id="item-1",
            instance="2" * 32,
        )
        await replies.publish(aio_pika.Message(p.encode(result), user_id="guest"), key)
        assert (await asyncio.wait_for(future, 10)).accumulator == b"acc"
        assert link.stats["rejected_instance"] == 0
    finally:
        await silo.close()
        await link.close()


# ------------------------------------------------- real silo processes


def _native_mean(native_context: object, folder: Path) -> float:
    import tensorflow_federated as tff

    from tests.support.computations import ROW, mean_glucose
    from tests.support.federation import run_in
    from tff_amqp.silo.data import DataSource, SiloDataStore

    store = SiloDataStore("alpha", [DataSource("readings", folder)])
    datasets = store.client_datasets("readings", tff.to_type(ROW))
    return float(run_in(native_context, mean_glucose, datasets))


def _wait_exit(process: ManagedProcess, timeout: float) -> int:
    assert process.process is not None
    try:
        return process.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{process.name} still runs after {timeout} s:\n{process.log_tail()}")


def _claim(local: LocalFederation, process_name: str, command: list[str]) -> ManagedProcess:
    args = [
        sys.executable, "-m", "tff_amqp", *command,
        "--broker", local.broker_url, "--federation", local.federation,
    ]  # fmt: skip
    return local.start(process_name, args)


@pytest.mark.slow
def test_a_second_process_with_a_live_silos_name_is_refused_and_never_mixed(
    amqp_url: str, local: LocalFederation, native_context: object, tmp_path: Path
) -> None:
    import numpy as np

    import tff_amqp
    from tests.support.computations import mean_glucose
    from tests.support.federation import run_in

    mine = write_silo_csvs(tmp_path / "mine", 0, 2)
    theirs = write_silo_csvs(tmp_path / "theirs", 1, 3)
    expected_mine = _native_mean(native_context, mine)
    expected_theirs = _native_mean(native_context, theirs)
    assert abs(expected_mine - expected_theirs) > 1e-3  # a mix would show

    holder = local.start_silo("alpha", data={"readings": mine})
    local.wait_ready(timeout=240)
    # The impostors: a silo, and a simulation host with the name among its silos.
    impostor = _claim(
        local, "impostor", ["silo", "--name", "alpha", "--data", f"readings={theirs}"]
    )
    host = _claim(
        local,
        "impostor-host",
        ["silos", "--name", "zulu", "--name", "alpha", "--data", f"readings={theirs}"],
    )
    for process in (impostor, host):
        code = _wait_exit(process, 180)
        log = process.log_text()
        assert code == 1, log
        assert "'alpha'" in log and "already served by another process" in log, log
        # Named from the holder's own hello/heartbeat: its host and pid.
        assert f"host {socket.gethostname()}, pid {holder.pid}" in log, log
        assert "tff-amqp status" in log and "Nothing was consumed" in log, log
        assert "ACCESS_REFUSED" in log, log
    # Neither became ready (the host's other agent, zulu, did, then left).
    assert not impostor.is_ready()
    assert HOST_READY not in host.log_text()
    assert holder.running

    context = tff_amqp.create_sync_amqp_execution_context(
        amqp_url, federation=local.federation, min_silos=1, cohort_timeout=60.0, deadline=120.0
    ).start()
    try:
        membership = context.runtime.membership
        deadline = time.monotonic() + 15
        while not membership.live():
            assert time.monotonic() < deadline, "no silo live"
            time.sleep(0.1)
        # The refused host's other agent (zulu) is gone; alpha is the holder.
        assert [r.name for r in membership.live()] == ["alpha"]
        for _ in range(4):
            result = run_in(context, mean_glucose, tff_amqp.silo_data("readings"))
            np.testing.assert_allclose(result, expected_mine, rtol=1e-6)
        record = membership.record("alpha")
        assert record is not None
        assert (record.status.host, record.status.pid) == (socket.gethostname(), holder.pid)
        instance = record.instance
        assert len(instance) == 32
        assert context.runtime.link.stats["rejected_instance"] == 0

        # `tff-amqp status` shows who holds each name.
        status = subprocess.run(
            [
                sys.executable, "-m", "tff_amqp", "status", "--broker", amqp_url,
                "--federation", local.federation, "--window", "2.5",
            ],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        header = status.stdout.splitlines()[1]
        assert header.split()[-3:] == ["instance", "host", "pid"], status.stdout
        row = next(line for line in status.stdout.splitlines() if line.startswith("alpha "))
        assert row.split()[-3:] == [instance[:8], socket.gethostname(), str(holder.pid)], row

        # The holder dies: its exclusive consumer goes with its connection,
        # so the name is free at once and a new process serves it.
        holder.kill()
        assert holder.process is not None
        holder.process.wait(timeout=10)
        # (Its own log: a restart under the old process name would append to
        # the holder's log, whose "silo.ready" would count as the successor's.)
        successor = _claim(
            local, "successor", ["silo", "--name", "alpha", "--data", f"readings={theirs}"]
        )
        local.wait_ready(timeout=240, processes=[successor])
        deadline = time.monotonic() + 30
        while membership.instance_of("alpha") in ("", instance):
            assert time.monotonic() < deadline, "the new alpha never said hello"
            time.sleep(0.2)
        result = run_in(context, mean_glucose, tff_amqp.silo_data("readings"))
        np.testing.assert_allclose(result, expected_theirs, rtol=1e-6)
    finally:
        context.close()
