"""Every decoder, fuzzed: hostile input gets a ProtocolError, never a crash.

Over 10,000 generated cases in total (see FUZZ_EXAMPLES; the counts are per
test and add up): arbitrary bytes, arbitrary msgpack documents, valid
messages of every kind with one field mutated to a wrong type, a wrong or
future protocol version, unknown operations, absurd declared lengths,
truncation and bit flips, and oversize payloads. The contract checked each
time: `decode` returns an Envelope or raises ProtocolError (with a code and a
non-empty message), `peek_ids` never raises, and valid messages round-trip.

The live counterpart (garbage sent to a running silo and coordinator, which
then still serve a real computation) is in tests/test_hostile_input.py.
"""

from __future__ import annotations

import math
import os
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tff_amqp import protocol as p

# Per test; 5 tests x 2,000 + 3 x 1,000 = 13,000 cases (TFF_AMQP_FUZZ_EXAMPLES overrides).
FUZZ_EXAMPLES = int(os.environ.get("TFF_AMQP_FUZZ_EXAMPLES", "2000"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ_SMALL = settings(FUZZ, max_examples=max(1, FUZZ_EXAMPLES // 2))

# ----------------------------------------------------------------- strategies

ids = st.integers(min_value=0, max_value=2**40)
names = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_",
    min_size=1,
    max_size=64,
)
short_text = st.text(max_size=40)
blobs = st.binary(max_size=256)

operations = st.one_of(
    st.builds(
        p.Open,
        clients=st.none() | st.integers(0, 10_000),
        data_key=st.none() | short_text.filter(bool),
    ),
    st.builds(p.CreateValue, target=ids, value=blobs),
    st.builds(p.CreateData, target=ids, key=short_text.filter(bool), type_spec=blobs),
    st.builds(p.CreateCall, target=ids, fn=ids, arg=st.none() | ids),
    st.builds(
        p.CreateStruct,
        target=ids,
        elements=st.lists(st.tuples(st.none() | short_text, ids), max_size=5).map(tuple),
    ),
    st.builds(p.CreateSelection, target=ids, source=ids, index=st.integers(0, 1000)),
    st.builds(p.Compute, source=ids),
    st.builds(p.Dispose, targets=st.lists(ids, max_size=5).map(tuple)),
    st.just(p.Close()),
)

statuses = st.builds(
    p.SiloStatus,
    silo=names,
    clients=st.integers(0, 10_000),
    data_keys=st.lists(short_text, max_size=3).map(tuple),
    active_invocations=st.integers(0, 100),
    allow_raw_client_values=st.booleans(),
    started_at=st.floats(0, 2e9),
)

bodies: dict[p.Kind, st.SearchStrategy[Any]] = {
    p.Kind.BATCH: st.builds(
        p.Batch, operations=st.lists(operations, max_size=6).map(tuple), seq=st.integers(0, 10**6)
    ),
    p.Kind.RESULT: st.builds(p.Result, values=st.dictionaries(ids, blobs, max_size=4)),
    p.Kind.ERROR: st.builds(
        p.ErrorReport, code=st.sampled_from(list(p.ErrorCode)), message=short_text
    ),
    p.Kind.HELLO: statuses,
    p.Kind.HEARTBEAT: statuses,
    p.Kind.GOODBYE: statuses,
}


@st.composite
def envelopes(draw: st.DrawFn) -> p.Envelope:
    kind = draw(st.sampled_from(list(bodies)))
    return p.Envelope(
        kind=kind,
        body=draw(bodies[kind]),
        sender=draw(names),
        invocation_id=draw(st.text(max_size=20)),
        correlation_id=draw(st.text(max_size=20)),
        deadline=draw(st.floats(0, 2e9)),
        message_id=draw(st.text(min_size=1, max_size=32)),
    )


# Anything msgpack can carry, nested.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=20),
)
documents = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.sampled_from(["v", "kind", "body", "op"]),
                      children, max_size=4),
    max_leaves=20,
)  # fmt: skip


def _wire(envelope: p.Envelope) -> dict[str, Any]:
    return msgpack.unpackb(p.encode(envelope), raw=False)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (dict keys / list indices) inside a wire document."""
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


def _set(node: Any, path: tuple[Any, ...], value: Any, delete: bool = False) -> None:
    for step in path[:-1]:
        node = node[step]
    if delete and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = value


def assert_rejected_or_valid(
    payload: bytes, *, max_bytes: int = p.DEFAULT_MAX_MESSAGE_BYTES
) -> None:
    """The decoder contract: an Envelope, or a ProtocolError with a code and a
    message. Any other exception is a bug that would take the receiver down."""
    try:
        envelope = p.decode(payload, max_bytes=max_bytes)
    except p.ProtocolError as e:
        assert isinstance(e.code, p.ErrorCode)
        assert str(e), "a ProtocolError must say what was wrong"
    else:
        assert isinstance(envelope, p.Envelope)
        assert isinstance(envelope.body, p.Batch | p.Result | p.ErrorReport | p.SiloStatus)
    inv, corr = p.peek_ids(payload)  # must never raise either
    assert isinstance(inv, str) and isinstance(corr, str)


# ---------------------------------------------------------------------- tests


@FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_bytes(payload: bytes) -> None:
    assert_rejected_or_valid(payload)


@FUZZ
@given(documents)
def test_arbitrary_msgpack_documents(document: Any) -> None:
    assert_rejected_or_valid(msgpack.packb(document, use_bin_type=True))


@FUZZ
@given(envelopes())
def test_valid_messages_round_trip(envelope: p.Envelope) -> None:
    decoded = p.decode(p.encode(envelope))
    assert decoded.kind is envelope.kind
    assert decoded.body == envelope.body
    assert (decoded.sender, decoded.message_id, decoded.correlation_id) == (
        envelope.sender,
        envelope.message_id,
        envelope.correlation_id,
    )


@FUZZ
@given(envelopes(), st.data())
def test_one_field_mutated_to_anything(envelope: p.Envelope, data: st.DataObject) -> None:
    """Each field of a valid message, at any depth, replaced by any value of
    any type, or deleted."""
    wire = _wire(envelope)
    path = data.draw(st.sampled_from(_paths(wire)))
    delete = data.draw(st.booleans())
    _set(wire, path, data.draw(documents), delete=delete)
    assert_rejected_or_valid(msgpack.packb(wire, use_bin_type=True))


@FUZZ
@given(envelopes(), st.data())
def test_truncated_and_bit_flipped_messages(envelope: p.Envelope, data: st.DataObject) -> None:
    payload = bytearray(p.encode(envelope))
    if data.draw(st.booleans()):
        payload = payload[: data.draw(st.integers(0, len(payload) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(payload) - 1))
            payload[i] ^= 1 << data.draw(st.integers(0, 7))
    assert_rejected_or_valid(bytes(payload))


@FUZZ_SMALL
@given(envelopes(), st.integers())
def test_wrong_and_future_versions_are_named(envelope: p.Envelope, version: int) -> None:
    assume(version != p.PROTOCOL_VERSION and -(2**63) <= version < 2**64)
    wire = _wire(envelope)
    wire["v"] = version
    with pytest.raises(p.ProtocolError) as error:
        p.decode(msgpack.packb(wire, use_bin_type=True))
    assert error.value.code is p.ErrorCode.VERSION
    assert str(version) in str(error.value) and "upgrade" in str(error.value)


@FUZZ_SMALL
@given(
    st.lists(operations, max_size=4),
    st.text(max_size=30).filter(lambda t: t not in p.OPERATIONS) | documents,
    st.data(),
)
def test_unknown_operations_are_named(
    ops: list[p.Operation], tag: Any, data: st.DataObject
) -> None:
    assume(not (isinstance(tag, str) and tag in p.OPERATIONS))
    wire_ops: list[Any] = [op.to_wire() for op in ops]
    wire_ops.insert(data.draw(st.integers(0, len(wire_ops))), {"op": tag, "target": 1})
    envelope = p.batch_envelope(
        sender="coordinator", invocation_id="i", correlation_id="c", deadline=0.0,
        operations=[], seq=0,
    )  # fmt: skip
    wire = _wire(envelope)
    wire["body"]["ops"] = wire_ops
    with pytest.raises(p.ProtocolError) as error:
        p.decode(msgpack.packb(wire, use_bin_type=True))
    if isinstance(tag, str) or tag is None:
        assert error.value.code is p.ErrorCode.UNKNOWN_OPERATION
        assert "unknown operation" in str(error.value)


@FUZZ_SMALL
@given(
    st.sampled_from([0xC6, 0xDB, 0xDD, 0xDF]),  # bin32, str32, array32, map32 headers
    st.integers(min_value=2**20, max_value=2**32 - 1),
    st.binary(max_size=64),
    st.booleans(),
)
def test_absurd_declared_lengths(header: int, length: int, tail: bytes, nested: bool) -> None:
    """A header claiming gigabytes, followed by a few bytes: refused at once,
    without allocating what it claims."""
    item = bytes([header]) + struct.pack(">I", length) + tail
    if nested:  # inside an otherwise plausible message
        prefix = msgpack.packb({"v": 1, "kind": "batch"}, use_bin_type=True)
        item = bytes([prefix[0] + 1]) + prefix[1:] + msgpack.packb("body") + item
    with pytest.raises(p.ProtocolError):
        p.decode(item)


def test_oversize_is_refused_on_both_sides_with_the_limit_and_why() -> None:
    envelope = p.Envelope(
        kind=p.Kind.RESULT, body=p.Result(values={1: b"x" * 5000}), sender="alpha"
    )
    with pytest.raises(p.ProtocolError) as error:
        p.encode(envelope, max_bytes=4096)
    assert error.value.code is p.ErrorCode.TOO_LARGE
    assert "4096" in str(error.value) and "max_message_size" in str(error.value)
    payload = p.encode(envelope)
    with pytest.raises(p.ProtocolError) as error:
        p.decode(payload, max_bytes=4096)
    assert error.value.code is p.ErrorCode.TOO_LARGE and "4096" in str(error.value)


def test_deeply_nested_documents_are_refused() -> None:
    for depth in (1_000, 100_000):
        payload = b"\x91" * depth + b"\xc0"  # [[[...[nil]...]]]
        with pytest.raises(p.ProtocolError):
            p.decode(payload)
        payload = b"\x81\xa1v" * depth + b"\xc0"  # {"v": {"v": ...}}
        with pytest.raises(p.ProtocolError):
            p.decode(payload)


def test_non_finite_and_huge_numbers_in_every_numeric_field() -> None:
    base = _wire(
        p.Envelope(
            kind=p.Kind.HEARTBEAT,
            body=p.SiloStatus(silo="alpha", clients=1, started_at=1.0),
            sender="alpha",
        )
    )
    cases = {
        ("deadline",): (math.nan, math.inf, -math.inf, True, "soon"),
        ("body", "started_at"): (math.nan, math.inf, -math.inf, False, b"0"),
        ("body", "clients"): (2**64 - 1, -(2**63), -1, True, 1.5, "3"),
    }
    for field_path, values in cases.items():
        for value in values:
            wire = msgpack.unpackb(msgpack.packb(base), raw=False)
            _set(wire, field_path, value)
            with pytest.raises(p.ProtocolError, match=field_path[-1]):
                p.decode(msgpack.packb(wire, use_bin_type=True))
