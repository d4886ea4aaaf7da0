"""Isolation between silos with provisioned credentials, over the real broker.

Silos belong to different organisations: with the users and permissions
`tff-amqp provision` creates, silo A cannot read B's queue, declare anything,
publish to the default exchange, inject requests into B's queue, reply with
B's routing key or claim B's user id; and the coordinator uses a reply only if
its broker-validated user id is the one the silo said hello with. Every
refusal test has a positive control (the same action, allowed), so it cannot
pass because of a broken set-up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aio_pika
import aiormq
import numpy as np
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from tests.support.data import read_column, write_silo_csvs
from tests.support.provisioning import ProvisionedFederation, admin_url_for
from tff_amqp import protocol as p
from tff_amqp.coordinator.mapreduce.link import WorkLink
from tff_amqp.coordinator.mapreduce.membership import PoolMembership
from tff_amqp.coordinator.membership import Membership
from tff_amqp.coordinator.stateful.link import CoordinatorLink
from tff_amqp.topology import Topology

Action = Callable[[AbstractChannel], Awaitable[object]]


@pytest.fixture(scope="module")
def provisioned(amqp_url: str) -> Iterator[ProvisionedFederation]:
    with ProvisionedFederation(amqp_url, admin_url_for(amqp_url), ["alpha", "bravo"]) as fed:
        yield fed


async def _outcome(url: str, action: Action) -> BaseException | None:
    """Run `action` on a fresh channel (publisher confirms on); the error the
    broker answered with, or None if it was allowed."""
    connection = await aio_pika.connect(url, timeout=10)
    try:
        channel = await connection.channel()
        try:
            await asyncio.wait_for(action(channel), 10)
        except (aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPException) as e:
            return e
        return None
    finally:
        await connection.close()


def outcome(url: str, action: Action) -> BaseException | None:
    return asyncio.run(_outcome(url, action))


def _message(body: bytes = b"forged", **kwargs: object) -> aio_pika.Message:
    return aio_pika.Message(body, content_type=p.CONTENT_TYPE, **kwargs)  # type: ignore[arg-type]


def _consume(queue_name: str) -> Action:
    async def ack(message: AbstractIncomingMessage) -> None:
        await message.ack()

    async def action(channel: AbstractChannel) -> object:
        queue = await channel.get_queue(queue_name, ensure=False)
        return await queue.consume(ack, no_ack=False)

    return action


def _publish(exchange: str, key: str, **kwargs: object) -> Action:
    async def action(channel: AbstractChannel) -> object:
        target = (
            channel.default_exchange
            if exchange == ""
            else await channel.get_exchange(exchange, ensure=False)
        )
        return await target.publish(_message(**kwargs), routing_key=key, mandatory=False)

    return action


def test_provision_prints_the_url_last_and_grants_exactly_the_model(
    provisioned: ProvisionedFederation,
) -> None:
    url = provisioned.silo_urls["alpha"]
    assert url.startswith("amqp://silo.") and "@" in url
    assert provisioned.user("alpha") == f"silo.{provisioned.name}.alpha"
    assert provisioned.coordinator_url.startswith(f"amqp://coordinator.{provisioned.name}:")


def test_a_silo_reads_only_its_own_queues(provisioned: ProvisionedFederation) -> None:
    t = Topology(provisioned.name)
    alpha = provisioned.silo_urls["alpha"]
    for own in (t.request_queue("alpha"), t.bulk_queue("alpha"), t.work_queue("alpha")):
        assert outcome(alpha, _consume(own)) is None, own
    for other in (t.request_queue("bravo"), t.bulk_queue("bravo"), t.work_queue("bravo")):
        error = outcome(alpha, _consume(other))
        assert isinstance(error, aiormq.exceptions.ChannelAccessRefused), (other, error)
    error = outcome(alpha, _consume(t.coordinator_queue))
    assert isinstance(error, aiormq.exceptions.ChannelAccessRefused)


def _read_stream(queue_name: str) -> Action:
    # A stream consumer needs a prefetch and manual acks.
    async def ack(message: AbstractIncomingMessage) -> None:
        await message.ack()

    async def action(channel: AbstractChannel) -> object:
        await channel.set_qos(prefetch_count=8)
        queue = await channel.get_queue(queue_name, ensure=False)
        return await queue.consume(ack, no_ack=False, arguments={"x-stream-offset": "first"})

    return action


def test_a_pool_worker_reads_only_its_own_broadcast_stream(
    provisioned: ProvisionedFederation,
) -> None:
    t = Topology(provisioned.name)
    alpha = provisioned.silo_urls["alpha"]
    assert outcome(alpha, _read_stream(t.broadcast_queue("alpha"))) is None
    error = outcome(alpha, _read_stream(t.broadcast_queue("bravo")))
    assert isinstance(error, aiormq.exceptions.ChannelAccessRefused), error
    # Only the coordinator may publish into the streams (via tff.F.bulk).
    error = outcome(alpha, _publish(t.bulk_exchange, t.broadcast_routing_key("alpha")))
    assert isinstance(error, aiormq.exceptions.ChannelAccessRefused), error


def test_a_silo_cannot_declare_queues_or_exchanges(provisioned: ProvisionedFederation) -> None:
    t = Topology(provisioned.name)
    alpha = provisioned.silo_urls["alpha"]

    async def declare_queue(channel: AbstractChannel) -> object:
        return await channel.declare_queue(t.request_queue("alpha") + "-extra", durable=True)

    async def declare_own_queue_again(channel: AbstractChannel) -> object:
        return await channel.declare_queue(
            t.request_queue("alpha"),
            durable=True,
            arguments={"x-dead-letter-exchange": t.dead_letter_exchange},
        )

    async def declare_exchange(channel: AbstractChannel) -> object:
        return await channel.declare_exchange(f"{t.prefix}.mine", aio_pika.ExchangeType.FANOUT)

    async def bind_to_requests(channel: AbstractChannel) -> object:
        queue = await channel.get_queue(t.request_queue("alpha"), ensure=False)
        return await queue.bind(t.requests_exchange, routing_key="bravo")

    for action in (declare_queue, declare_own_queue_again, declare_exchange, bind_to_requests):
        error = outcome(alpha, action)
        assert isinstance(error, aiormq.exceptions.ChannelAccessRefused), (action, error)
    # Control: the coordinator may declare.
    assert outcome(provisioned.coordinator_url, declare_own_queue_again) is None


def test_a_silo_cannot_publish_to_the_default_exchange_or_inject_requests(
    amqp_url: str, provisioned: ProvisionedFederation
) -> None:
    t = Topology(provisioned.name)
    alpha = provisioned.silo_urls["alpha"]
    attempts = [
        _publish("", t.request_queue("bravo")),  # default exchange, into B's queue
        _publish("", t.coordinator_queue),  # default exchange, into the coordinator's
        _publish(t.requests_exchange, "bravo"),  # the request exchange, B's key
        _publish(t.bulk_exchange, "bravo"),
        _publish(t.work_exchange, "bravo"),
        _publish(t.dead_letter_exchange, ""),
    ]
    for attempt in attempts:
        error = outcome(alpha, attempt)
        assert isinstance(error, aiormq.exceptions.ChannelAccessRefused), error

    # Nothing reached B's queues (read with the broker admin's connection).
    bravo_queues = [t.request_queue("bravo"), t.bulk_queue("bravo"), t.work_queue("bravo")]
    assert asyncio.run(_take_all(amqp_url, bravo_queues)) == 0
    # Control: the coordinator may publish requests to B, and they arrive.
    assert outcome(provisioned.coordinator_url, _publish(t.requests_exchange, "bravo")) is None
    assert asyncio.run(_take_all(amqp_url, bravo_queues)) == 1


async def _take_all(url: str, queues: list[str]) -> int:
    """Remove and count the messages waiting in `queues`."""
    connection = await aio_pika.connect(url, timeout=10)
    taken = 0
    try:
        channel = await connection.channel()
        for name in queues:
            queue = await channel.get_queue(name, ensure=False)
            while await queue.get(no_ack=True, fail=False) is not None:
                taken += 1
    finally:
        await connection.close()
    return taken


def test_a_silo_replies_only_with_its_own_key_and_user_id(
    provisioned: ProvisionedFederation,
) -> None:
    t = Topology(provisioned.name)
    alpha = provisioned.silo_urls["alpha"]
    alpha_user, bravo_user = provisioned.user("alpha"), provisioned.user("bravo")
    own = t.reply_routing_key("alpha")
    assert outcome(alpha, _publish(t.replies_exchange, own, user_id=alpha_user)) is None
    assert outcome(alpha, _publish(t.replies_exchange, "bulk.alpha", user_id=alpha_user)) is None
    for key in (t.reply_routing_key("bravo"), "bulk.bravo", "reply.*", "reply.#", "other"):
        error = outcome(alpha, _publish(t.replies_exchange, key, user_id=alpha_user))
        assert isinstance(error, aiormq.exceptions.ChannelAccessRefused), (key, error)
    error = outcome(alpha, _publish(t.replies_exchange, own, user_id=bravo_user))
    assert isinstance(error, aiormq.exceptions.ChannelPreconditionFailed), error
    assert "user_id" in str(error)


def _reply(silo: str, corr: str, value: bytes) -> bytes:
    return p.encode(
        p.Envelope(
            kind=p.Kind.RESULT,
            body=p.Result(values={7: value}),
            sender=silo,
            invocation_id="inv-1",
            correlation_id=corr,
        )
    )


def _hello(silo: str) -> bytes:
    status = p.SiloStatus(silo=silo, clients=1, started_at=time.time())
    return p.encode(p.Envelope(kind=p.Kind.HELLO, body=status, sender=silo))


async def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def _work_result(silo: str, item: str, accumulator: bytes) -> bytes:
    return p.encode(
        p.Envelope(
            kind=p.Kind.WORK_RESULT,
            body=p.WorkResult(shard=0, clients=1, accumulator=accumulator),
            sender=silo,
            invocation_id="inv-1",
            correlation_id=item,
        )
    )


async def _stateful_request(link: CoordinatorLink, request: p.Envelope) -> asyncio.Future:
    future = await link.send("alpha", request, expect_reply=True)
    assert future is not None
    return future


async def _stateless_request(link: WorkLink, request: p.Envelope) -> asyncio.Future:
    return await link.publish("alpha", request)


# regime -> (link class, membership class, send a request, a reply body, its value)
REGIMES = {
    "stateful": (
        CoordinatorLink,
        Membership,
        _stateful_request,
        _reply,
        lambda result: result.values[7],
    ),
    "stateless": (
        WorkLink,
        PoolMembership,
        _stateless_request,
        _work_result,
        lambda result: result.accumulator,
    ),
}


@pytest.mark.parametrize("regime", sorted(REGIMES))
async def test_coordinator_uses_a_reply_only_from_the_silos_hello_user(
    amqp_url: str, provisioned: ProvisionedFederation, regime: str
) -> None:
    # Both regimes' coordinators apply one rule (Membership.reply_user_problem).
    link_class, membership_class, send, reply, payload = REGIMES[regime]
    t = Topology(provisioned.name)
    alpha_user = provisioned.user("alpha")
    membership = membership_class(liveness_timeout=60.0)
    link = link_class(provisioned.coordinator_url, t, membership)
    await link.start()
    alpha = await aio_pika.connect(provisioned.silo_urls["alpha"], timeout=10)
    admin = await aio_pika.connect(amqp_url, timeout=10)
    try:
        alpha_replies = await (await alpha.channel()).get_exchange(t.replies_exchange, ensure=False)
        admin_replies = await (await admin.channel()).get_exchange(t.replies_exchange, ensure=False)
        key = t.reply_routing_key("alpha")
        await alpha_replies.publish(
            _message(_hello("alpha"), user_id=alpha_user), key, mandatory=False
        )
        await _wait_for(lambda: membership.record("alpha") is not None)
        record = membership.record("alpha")
        assert record is not None and record.user_id == alpha_user

        request = p.batch_envelope(
            sender="coordinator",
            invocation_id="inv-1",
            correlation_id="corr-1",
            deadline=time.time() + 60,
            operations=[p.Compute(source=7)],
            seq=0,
        )
        future = await send(link, request)

        # 1. The right key and sender, but no user_id: the broker validated nothing.
        await alpha_replies.publish(_message(reply("alpha", "corr-1", b"no-user")), key)
        await _wait_for(lambda: link.stats["rejected_user_id"] == 1)
        # 2. A user allowed to use alpha's key (the broker admin), with its
        #    own valid user_id: not alpha's user, so not alpha's reply.
        await admin_replies.publish(
            _message(reply("alpha", "corr-1", b"admin"), user_id="guest"), key
        )
        await _wait_for(lambda: link.stats["rejected_user_id"] == 2)
        assert not future.done()
        # 3. Alpha itself: accepted.
        await alpha_replies.publish(
            _message(reply("alpha", "corr-1", b"genuine"), user_id=alpha_user), key
        )
        result = await asyncio.wait_for(future, 10)
        assert payload(result) == b"genuine"
        assert link.stats["rejected_replies"] == 2
    finally:
        await alpha.close()
        await admin.close()
        await link.close()


@pytest.mark.slow
def test_federation_end_to_end_with_provisioned_credentials(amqp_url: str, tmp_path: Path) -> None:
    import tff_amqp
    from tests.support.computations import glucose_totals
    from tests.support.federation import run_in
    from tff_amqp.local import LocalFederation, SiloOptions

    silos = ("north", "south")
    with ProvisionedFederation(amqp_url, admin_url_for(amqp_url), silos) as fed:
        folders = {name: write_silo_csvs(tmp_path, i, 2 + i) for i, name in enumerate(silos)}
        # Stopped when the block ends, before the provisioned users are deleted.
        with LocalFederation(amqp_url, fed.name, log_dir=tmp_path / "logs") as local:
            for name in silos:
                local.start_silo(
                    name,
                    data={"readings": folders[name]},
                    # Each silo as its own provisioned user.
                    options=SiloOptions(broker_url=fed.silo_urls[name], no_declare=True),
                )
            local.wait_ready(timeout=240)
            with tff_amqp.create_sync_amqp_execution_context(
                fed.coordinator_url, federation=fed.name, min_silos=2, cohort_timeout=120.0
            ) as context:
                total, count = run_in(context, glucose_totals, tff_amqp.silo_data("readings"))
                stats = dict(context.runtime.link.stats)
    values = [v for folder in folders.values() for v in read_column(folder, "glucose")]
    assert count == len(values)
    np.testing.assert_allclose(total, np.asarray(values, np.float32).astype(np.float64).sum())
    assert stats["rejected_replies"] == 0 and stats["replies"] >= 2


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    # The parser and the command, without main()'s logging set-up (which would
    # keep a handler on pytest's captured stderr after this test).
    from tff_amqp.cli import build_parser
    from tff_amqp.provision import run_provision

    code = run_provision(build_parser().parse_args(["provision", *args]))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_provision_errors_are_clear(amqp_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    admin = admin_url_for(amqp_url)
    from tests.support.private_broker import free_port

    cases = [
        (["add-silo", "a", "--federation", "f", "--broker", amqp_url], "management API URL"),
        (
            ["add-silo", "a", "--federation", "f", "--broker", f"http://127.0.0.1:{free_port()}/"],
            "administrator's credentials",
        ),
        (
            [
                "add-silo",
                "a",
                "--federation",
                "f",
                "--broker",
                f"http://guest:guest@127.0.0.1:{free_port()}/",
            ],
            "rabbitmq_management plugin",
        ),
        (
            ["add-silo", "a", "--federation", "f", "--broker", admin.replace(":guest@", ":wrong@")],
            "HTTP 401",
        ),
        (["add-silo", "a.b", "--federation", "f", "--broker", admin], "invalid silo name"),
        (["add-coordinator", "--federation", "f*", "--broker", admin], "invalid federation name"),
    ]
    for args, words in cases:
        code, out, err = _cli(capsys, *args)
        assert code == 1 and words in err, (args, err)
        assert out == ""


def test_remove_silo_undoes_add_silo(amqp_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.support.broker import delete_federation_entities, new_federation_name

    federation = new_federation_name()
    common = ["--federation", federation, "--broker", admin_url_for(amqp_url)]
    try:
        code, out, _ = _cli(capsys, "add-silo", "solo", *common)
        assert code == 0
        url = out.strip().splitlines()[-1]
        assert asyncio.run(_take_all(url, [Topology(federation).request_queue("solo")])) == 0
        code, out, _ = _cli(capsys, "remove-silo", "solo", *common)
        assert code == 0 and f"user silo.{federation}.solo" in out
        assert f"queue tff.{federation}.req.solo" in out
        assert f"queue tff.{federation}.broadcast.solo" in out
        # The user is gone: the URL no longer logs in.
        with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
            asyncio.run(_take_all(url, []))
        code, out, _ = _cli(capsys, "remove-silo", "solo", *common)
        assert code == 0 and "already gone" in out
    finally:
        _cli(capsys, "remove-silo", "solo", *common)
        delete_federation_entities(amqp_url, federation)
