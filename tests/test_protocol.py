"""The wire protocol: round trips, and a clear error for every kind of bad input."""

from __future__ import annotations

import dataclasses
import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tff_amqp import protocol as p


def _batch(**overrides) -> p.Envelope:
    ops = [
        p.Open(clients=3),
        p.CreateValue(target=1, value=b"\x01\x02"),
        p.CreateData(target=2, key="readings", type_spec=b"\x03"),
        p.CreateCall(target=3, fn=1, arg=2),
        p.CreateCall(target=4, fn=1),
        p.CreateStruct(target=5, elements=((None, 3), ("named", 4))),
        p.CreateSelection(target=6, source=5, index=1),
        p.Compute(source=6),
        p.Dispose(targets=(1, 2)),
        p.Close(),
    ]
    fields = dict(
        sender="coordinator",
        invocation_id="inv",
        correlation_id="corr",
        deadline=time.time() + 60,
        operations=ops,
        seq=0,
    )
    fields.update(overrides)
    return p.batch_envelope(**fields)


def test_every_message_kind_round_trips():
    envelopes = [
        _batch(),
        p.Envelope(kind=p.Kind.RESULT, body=p.Result(values={6: b"abc"}), sender="alpha"),
        p.Envelope(
            kind=p.Kind.ERROR,
            body=p.ErrorReport(code=p.ErrorCode.PRIVACY, message="no"),
            sender="alpha",
        ),
        p.Envelope(
            kind=p.Kind.HEARTBEAT,
            body=p.SiloStatus(silo="alpha", clients=2, data_keys=("a",), active_invocations=1),
            sender="alpha",
        ),
    ]
    for envelope in envelopes:
        assert p.decode(p.encode(envelope)) == envelope


def _raw(**overrides) -> bytes:
    message = {
        "v": p.PROTOCOL_VERSION,
        "kind": "batch",
        "id": "m1",
        "corr": "c1",
        "inv": "i1",
        "deadline": 0.0,
        "sender": "coordinator",
        "body": {"seq": 0, "ops": [{"op": "close"}]},
    }
    message.update(overrides)
    return msgpack.packb(message, use_bin_type=True)


@pytest.mark.parametrize(
    ("payload", "code", "words"),
    [
        (b"\xc1garbage", p.ErrorCode.MALFORMED, "msgpack"),
        (msgpack.packb([1, 2, 3]), p.ErrorCode.MALFORMED, "map"),
        (_raw(v=2), p.ErrorCode.VERSION, "version 2"),
        (_raw(v="1"), p.ErrorCode.MALFORMED, "version"),
        (_raw(kind="launch"), p.ErrorCode.MALFORMED, "kind"),
        (_raw(body={"seq": 0, "ops": [{"op": "rm -rf"}]}), p.ErrorCode.UNKNOWN_OPERATION, "rm -rf"),
        (
            _raw(body={"seq": 0, "ops": [{"op": "call", "target": -1, "fn": 1}]}),
            p.ErrorCode.MALFORMED,
            "target",
        ),
        (
            _raw(body={"seq": 0, "ops": [{"op": "value", "target": 1, "value": "text"}]}),
            p.ErrorCode.MALFORMED,
            "binary",
        ),
        (_raw(body={"seq": "0", "ops": []}), p.ErrorCode.MALFORMED, "seq"),
        (_raw(body={"seq": 0, "ops": [], "ci": 7, "cs": 1.0}), p.ErrorCode.MALFORMED, "'ci'"),
        (_raw(body={"seq": 0, "ops": [], "ci": "x" * 200}), p.ErrorCode.MALFORMED, "'ci'"),
        (_raw(body={"seq": 0, "ops": [], "ci": "i", "cs": "soon"}), p.ErrorCode.MALFORMED, "'cs'"),
        (_raw(deadline=float("nan")), p.ErrorCode.MALFORMED, "finite"),
        (_raw(sender=""), p.ErrorCode.MALFORMED, "sender"),
        (
            _raw(kind="hello", body={"silo": "a.b", "clients": 1}),
            p.ErrorCode.MALFORMED,
            "silo name",
        ),
    ],
)
def test_bad_messages_get_specific_errors(payload, code, words):
    with pytest.raises(p.ProtocolError) as error:
        p.decode(payload)
    assert error.value.code == code
    assert words in str(error.value)


def test_oversize_is_refused_before_publishing_with_the_limit_in_the_message():
    envelope = _batch(operations=[p.CreateValue(target=1, value=b"x" * 2048)])
    with pytest.raises(p.ProtocolError) as error:
        p.encode(envelope, max_bytes=1024)
    assert error.value.code == p.ErrorCode.TOO_LARGE
    assert "1024" in str(error.value) and "max_message_size" in str(error.value)
    with pytest.raises(p.ProtocolError):
        p.decode(p.encode(envelope), max_bytes=1024)


def test_peek_ids_recovers_routing_of_undecodable_messages():
    assert p.peek_ids(_raw(v=99)) == ("i1", "c1")
    assert p.peek_ids(b"\x00\xff") == ("", "")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_decode_never_crashes_on_arbitrary_bytes(data):
    try:
        p.decode(data)
    except p.ProtocolError:
        pass


_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
_values = st.recursive(
    _leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from([k.value for k in p.Kind] + ["other"]),
    body=st.dictionaries(
        st.sampled_from(["ops", "seq", "values", "code", "message", "silo", "clients", "raw"]),
        _values,
    ),
)
def test_decode_never_crashes_on_structured_garbage(kind, body):
    try:
        p.decode(_raw(kind=kind, body=body))
    except p.ProtocolError:
        pass


def test_work_messages_name_large_values_as_blobs() -> None:
    blob = p.BlobRef(transfer="t" * 32, size=5_000_000, sha256=b"\x01" * 32)
    item = p.WorkItem(
        "xy", 0, 2, b"w", b"z", b"a", b"", broadcast_blob=blob, broadcast_since=1234.5
    )
    envelope = p.Envelope(kind=p.Kind.WORK, body=item, sender="c", correlation_id="i1")
    assert p.decode(p.encode(envelope)).body == item
    result = p.WorkResult(0, 3, b"", blob=blob)
    reply = p.Envelope(kind=p.Kind.WORK_RESULT, body=result, sender="north")
    assert p.decode(p.encode(reply)).body == result
    # Small values stay inline: no blob fields on the wire.
    inline = p.WorkItem("xy", 0, 2, b"w", b"z", b"a", b"b")
    assert "bblob" not in inline.to_wire() and "blob" not in p.WorkResult(0, 1, b"x").to_wire()
    # A value is inline or a blob, never both.
    with pytest.raises(p.ProtocolError, match="both inline and as a blob"):
        p.WorkItem("xy", 0, 2, b"w", b"z", b"a", b"b", broadcast_blob=blob)
    with pytest.raises(p.ProtocolError, match="both inline and as a blob"):
        p.WorkResult(0, 1, b"acc", blob=blob)
    wire = inline.to_wire() | {"bblob": "not a map"}
    with pytest.raises(p.ProtocolError, match="'bblob' must be a map"):
        p.WorkItem.from_wire(wire)


def test_batch_names_its_coordinator_instance_optionally():
    """A batch may carry the coordinator's instance id and start time (the
    silo frees an earlier instance's sessions); without them it decodes as
    before, with an empty instance."""
    envelope = _batch()
    assert isinstance(envelope.body, p.Batch)
    assert p.decode(p.encode(envelope)).body == envelope.body
    assert envelope.body.coordinator_instance == ""

    stamped = dataclasses.replace(
        envelope.body, coordinator_instance="c0ffee", coordinator_started=1234.5
    )
    decoded = p.decode(p.encode(dataclasses.replace(envelope, body=stamped))).body
    assert isinstance(decoded, p.Batch)
    assert (decoded.coordinator_instance, decoded.coordinator_started) == ("c0ffee", 1234.5)


def test_batch_carries_other_invocations_closes_optionally():
    """Closes of finished invocations ride a batch ("cl"); absent when there
    are none, so a batch without them encodes as before."""
    envelope = _batch()
    assert isinstance(envelope.body, p.Batch)
    assert "cl" not in envelope.body.to_wire()
    carrying = dataclasses.replace(envelope.body, closes=("inv-a", "inv-b"))
    decoded = p.decode(p.encode(dataclasses.replace(envelope, body=carrying))).body
    assert isinstance(decoded, p.Batch)
    assert decoded.closes == ("inv-a", "inv-b")
    for bad in ("inv-a", ["inv-a", 3], [""], ["x" * 200]):
        wire = {**envelope.body.to_wire(), "cl": bad}
        with pytest.raises(p.ProtocolError, match="'cl'") as error:
            p.Batch.from_wire(wire)
        assert error.value.code is p.ErrorCode.MALFORMED


def test_silo_status_carries_data_schemas_and_refuses_malformed_ones():
    schema = p.DataSchema("readings", (("age", "int"), ("glucose", "float")), rows=12)
    status = p.SiloStatus(silo="alpha", clients=2, data_keys=("readings",), data_schemas=(schema,))
    decoded = p.SiloStatus.from_wire(msgpack.unpackb(msgpack.packb(status.to_wire())))
    assert decoded == status
    assert decoded.schema("readings").names() == ["age", "glucose"]
    assert decoded.schema("other") is None
    # Optional: a status without schemas (an older silo) still decodes.
    assert p.SiloStatus.from_wire(p.SiloStatus(silo="a", clients=0).to_wire()).data_schemas == ()
    for bad in (
        {"key": "k", "columns": [["age", "complex"]]},
        {"key": "k", "columns": [["", "int"]]},
        {"key": "k", "columns": "age"},
        {"key": "k", "columns": [["age", "int"]], "rows": -1},
        {"columns": []},
    ):
        wire = {**status.to_wire(), "schemas": [bad]}
        with pytest.raises(p.ProtocolError):
            p.SiloStatus.from_wire(wire)
