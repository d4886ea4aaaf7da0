"""Garbage sent to a live silo and to a live coordinator: both keep serving.

Over the real broker with the session's silo processes: undecodable bytes,
wrong and future protocol versions, absurd declared lengths, wrong types,
unknown operations, wrong message kinds and forged dead letters go to a silo's
request queue and to the coordinator's queue. Each is refused and counted
(silo log `silo.malformed`, coordinator `link.stats`), and afterwards a real
computation through the same coordinator and silos gives the right answer.
"""

from __future__ import annotations

import asyncio
import random
import re
import time

import aio_pika
import msgpack
import numpy as np
import pytest

from tests.support.computations import fed_sum
from tests.support.federation import Federation, run_in
from tff_amqp import protocol as p
from tff_amqp.topology import Topology

# Long real-broker tests: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow


def _pack(document: object) -> bytes:
    return msgpack.packb(document, use_bin_type=True)


def _envelope_wire(kind: str, body: object, **overrides: object) -> dict[str, object]:
    wire: dict[str, object] = {
        "v": p.PROTOCOL_VERSION,
        "kind": kind,
        "id": "garbage",
        "corr": "nobody-waits-for-this",
        "inv": "no-such-invocation",
        "deadline": 0.0,
        "sender": "alpha",
        "body": body,
    }
    wire.update(overrides)
    return wire


def undecodable_messages() -> list[bytes]:
    """Messages no decoder may accept (each must raise ProtocolError)."""
    rng = random.Random(20261123)
    batch = {"seq": 0, "ops": []}
    messages = [
        b"",
        b"\x00",
        b"not msgpack at all",
        bytes(rng.getrandbits(8) for _ in range(4096)),
        b"\xdb\xff\xff\xff\xff" + b"x" * 16,  # str32 claiming 4 GiB
        b"\xdd\xff\xff\xff\xff",  # array32 claiming 4 G elements
        b"\x91" * 50_000 + b"\xc0",  # absurdly deep nesting
        _pack([1, 2, 3]),
        _pack(_envelope_wire("batch", batch, v=2)),  # a future version
        _pack(_envelope_wire("batch", batch, v=0)),
        _pack(_envelope_wire("batch", batch, v="1")),
        _pack(_envelope_wire("launch-missiles", batch)),
        _pack(_envelope_wire("batch", {"seq": 0, "ops": [{"op": "rm -rf", "target": 1}]})),
        _pack(_envelope_wire("batch", {"seq": "first", "ops": []})),
        _pack(_envelope_wire("batch", {"seq": 0, "ops": "all of them"})),
        _pack(_envelope_wire("batch", {"seq": 0, "ops": [{"op": "value", "target": -1}]})),
        _pack(_envelope_wire("batch", "body as a string")),
        _pack(_envelope_wire("result", {"values": [[1, "not bytes"]]})),
        _pack(_envelope_wire("heartbeat", {"silo": "../../etc", "clients": 1})),
        _pack(_envelope_wire("batch", batch, deadline=float("nan"))),
        _pack(_envelope_wire("bundle", {"m": []})),
        _pack(_envelope_wire("bundle", {"m": ["not an encoded message"]})),
    ]
    for message in messages:
        try:
            p.decode(message)
        except p.ProtocolError:
            continue
        raise AssertionError(f"test corpus error: {message[:40]!r} decodes")
    return messages


def decodable_but_wrong() -> list[bytes]:
    """Well-formed messages that are wrong where they arrive."""
    status = p.SiloStatus(silo="alpha", clients=1, started_at=1.0)
    return [
        # A result sent to a silo; a batch for an invocation that never opened.
        p.encode(p.Envelope(kind=p.Kind.RESULT, body=p.Result(values={}), sender="alpha")),
        p.encode(
            p.batch_envelope(
                sender="coordinator",
                invocation_id="never-opened",
                correlation_id="c-1",
                deadline=time.time() + 60,
                operations=[p.Compute(source=99)],
                seq=0,
            )
        ),
        # A hello whose body names another silo than its sender.
        p.encode(p.Envelope(kind=p.Kind.HELLO, body=status, sender="bravo")),
    ]


async def _send_garbage(url: str, topology: Topology, silo: str) -> int:
    """Publish the corpus to `silo`'s request queue and to the coordinator's
    queue; return how many undecodable messages each of them received."""
    bad, wrong = undecodable_messages(), decodable_but_wrong()
    connection = await aio_pika.connect(url, timeout=10)
    try:
        channel = await connection.channel()
        requests = await channel.get_exchange(topology.requests_exchange, ensure=False)
        replies = await channel.get_exchange(topology.replies_exchange, ensure=False)
        dead = await channel.get_exchange(topology.dead_letter_exchange, ensure=False)
        for body in bad + wrong:
            await requests.publish(aio_pika.Message(body), routing_key=silo, mandatory=False)
            await replies.publish(
                aio_pika.Message(body, user_id="guest"),
                routing_key=topology.reply_routing_key(silo),
                mandatory=False,
            )
        # Forged dead letters with nonsense death records.
        for deaths in ("x", [1, 2], [{"reason": None}]):
            await dead.publish(
                aio_pika.Message(b"\x00", headers={"x-death": deaths}, correlation_id="c"),
                routing_key="",
            )
    finally:
        await connection.close()
    return len(bad)


def test_silo_and_coordinator_survive_garbage_and_still_serve(
    amqp_url: str, silo_federation: Federation, amqp_context
) -> None:
    topology = Topology(silo_federation.name)
    link = amqp_context.runtime.link
    silo = sorted(silo_federation.silos)[0]
    log_path = silo_federation.local.silos[silo].log_path
    malformed_line = re.compile(r'"event":\s*"silo\.malformed"')
    silo_before = len(malformed_line.findall(log_path.read_text(errors="replace")))
    stats_before = dict(link.stats)

    to_silo = to_coordinator = asyncio.run(_send_garbage(amqp_url, topology, silo))

    # The silo refuses each undecodable message, logged and answered.
    deadline = time.monotonic() + 60
    while True:
        seen = len(malformed_line.findall(log_path.read_text(errors="replace"))) - silo_before
        if seen >= to_silo or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert seen == to_silo, f"silo logged {seen} of {to_silo} malformed messages"

    def coordinator_done() -> bool:
        return (
            link.stats["malformed"] - stats_before["malformed"] >= to_coordinator
            and link.stats["dead_lettered"] - stats_before["dead_lettered"] >= 3
        )

    deadline = time.monotonic() + 30
    while not coordinator_done():
        assert time.monotonic() < deadline, (stats_before, link.stats)
        time.sleep(0.1)
    assert link.stats["malformed"] - stats_before["malformed"] == to_coordinator
    assert link.stats["dead_lettered"] - stats_before["dead_lettered"] == 3
    assert link.stats["rejected_replies"] > stats_before["rejected_replies"]  # the forged hello

    # Every process is still up, and a real computation gives the right answer.
    assert all(s.running for s in silo_federation.local.silos.values())
    values = [1.5, 2.0, 3.25, 4.0, 0.5, 6.0, 7.75]
    assert run_in(amqp_context, fed_sum, values) == np.float32(sum(values))
