"""The tff-amqp wire protocol: every message between coordinator and silos.

One module holds every message shape, so both sides agree by construction and
every decoder validates the same way. A message body is a msgpack map:

    {"v": 1, "kind": ..., "id": ..., "corr": ..., "inv": ..., "deadline": ...,
     "sender": ..., "body": {...}, "inst": ...}

``inst`` (the sending silo-side process's instance id) is optional: added
within version 1, so a peer that does not send it still decodes.

Values and computations travel as serialized TFF ``executor_pb2.Value`` /
``computation_pb2.Type`` protos inside msgpack ``bin`` fields; the silo hands
them to its local worker without interpreting them.

Decoding never trusts input: wrong types, unknown kinds or operations, future
protocol versions and oversize payloads raise :class:`ProtocolError` with a
code and a message that says what was wrong, so the receiver can answer with
an error reply (or dead-letter it) and keep serving.
"""

from __future__ import annotations

import enum
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from tff_amqp.errors import CodedError

PROTOCOL_VERSION = 1
CONTENT_TYPE = "application/x-tff-amqp+msgpack"

# RabbitMQ 3.x accepts up to 128 MiB per message (4.x: 16 MiB by default).
# Anything above our limit is refused before it is published.
DEFAULT_MAX_MESSAGE_BYTES = 128 * 1024 * 1024

# Large values travel as chunks of at most this many bytes on the bulk
# connection (the effective size is derived from max_message_bytes).
MAX_CHUNK_BYTES = 8 * 1024 * 1024
# Largest value one transfer may announce (RabbitMQ is not a file store).
MAX_TRANSFER_BYTES = 16 * 1024 * 1024 * 1024

_STATUS_NAME = re.compile(r"[A-Z_]{1,40}")
_METHOD_NAME = re.compile(r"[A-Za-z]{1,40}")
_MAX_ID_LEN = 128
_MAX_NAME_LEN = 200


class ErrorCode(enum.StrEnum):
    """Machine-readable error categories carried in error replies."""

    MALFORMED = "malformed"
    VERSION = "unsupported_version"
    TOO_LARGE = "too_large"
    UNKNOWN_OPERATION = "unknown_operation"
    BAD_REFERENCE = "bad_reference"
    PRIVACY = "privacy_refused"
    DATA = "data_error"
    EXECUTION = "execution_error"
    EXPIRED = "expired"
    UNKNOWN_INVOCATION = "unknown_invocation"
    # A batch names a function by digest that the silo does not hold.
    MISSING_FUNCTIONS = "missing_functions"
    # A later batch of an invocation whose earlier batch the silo refused for
    # MISSING_FUNCTIONS: refused too until that batch comes again, so the
    # silo never applies an invocation's batches out of order.
    EARLIER_BATCH_REFUSED = "earlier_batch_refused"


class ProtocolError(CodedError, ValueError):
    """A message that cannot be accepted; `code` says which rule it broke."""

    code: ErrorCode


class Kind(enum.StrEnum):
    """What a message is for."""

    BATCH = "batch"  # coordinator -> silo: operations of one invocation
    RESULT = "result"  # silo -> coordinator: values computed for a batch
    ERROR = "error"  # silo -> coordinator: a batch (or message) failed
    HELLO = "hello"  # silo -> coordinator: joined the federation
    HEARTBEAT = "heartbeat"  # silo -> coordinator: still alive, with load
    GOODBYE = "goodbye"  # silo -> coordinator: leaving on purpose
    WORK = "work"  # coordinator -> a silo's stateless worker pool: one work item
    WORK_RESULT = "work_result"  # stateless worker -> coordinator: a shard's accumulator
    CHUNK = "chunk"  # either way, bulk connection: one piece of a large value
    # Either way: several encoded messages for one destination in one AMQP
    # message (sent only to a peer that said it accepts them).
    BUNDLE = "bundle"


# What a silo-side process says about itself (not a reply to a request).
STATUS_KINDS = (Kind.HELLO, Kind.HEARTBEAT, Kind.GOODBYE)


# --------------------------------------------------------------------------
# Operations: a batch carries an ordered list of them. Value ids are chosen by
# the coordinator, so a whole pipeline of operations needs no round trip.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    """Base class of batch operations. `op` is the tag on the wire."""

    op: ClassVar[str] = ""

    def to_wire(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> Operation:
        raise NotImplementedError


@dataclass(frozen=True)
class Open(Operation):
    """Start the invocation's executor. `clients`: CLIENTS cardinality, or take it
    from the silo's data under `data_key`, or (both None) the silo's default."""

    op: ClassVar[str] = "open"
    clients: int | None = None
    data_key: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.op, "clients": self.clients, "data_key": self.data_key}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> Open:
        clients = _opt_int(raw, "clients", minimum=0)
        data_key = _opt_str(raw, "data_key")
        return cls(clients=clients, data_key=data_key)


@dataclass(frozen=True)
class CreateValue(Operation):
    """Embed a serialized `executor_pb2.Value` under id `target`."""

    op: ClassVar[str] = "value"
    target: int
    value: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.op, "target": self.target, "value": self.value}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> CreateValue:
        return cls(target=_id(raw, "target"), value=_bytes(raw, "value"))


FUNCTION_DIGEST_BYTES = 32
# A silo that says it holds functions keeps at least the most recently used
# this many, up to this many bytes; a coordinator names only functions within
# a quarter of both (the margin keeps what it names inside the silo's store).
HELD_FUNCTIONS = 4096
HELD_FUNCTION_BYTES = 256 * 1024 * 1024
# Functions smaller than this are always sent in full (a digest reference
# gains nothing on them); silos keep only functions at least this large.
NAMED_FUNCTION_MIN_BYTES = 256


@dataclass(frozen=True)
class CreateKnownFunction(Operation):
    """Embed under id `target` the computation whose serialized `Value` has
    SHA-256 `digest`, sent in full to this silo process in an earlier batch:
    a coordinator sends a function it knows the silo holds by digest (a FedAvg
    round's functions are ~85 KB per silo, the same every round). Only to a
    silo that says it holds functions (`SiloStatus.holds_functions`); one that
    does not hold the digest refuses the batch with MISSING_FUNCTIONS."""

    op: ClassVar[str] = "known_function"
    target: int
    digest: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.op, "target": self.target, "digest": self.digest}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> CreateKnownFunction:
        digest = _bytes(raw, "digest")
        if len(digest) != FUNCTION_DIGEST_BYTES:
            raise ProtocolError(
                ErrorCode.MALFORMED,
                f"'digest' must be a SHA-256 ({FUNCTION_DIGEST_BYTES} bytes), got {len(digest)}",
            )
        return cls(target=_id(raw, "target"), digest=digest)


@dataclass(frozen=True)
class BlobRef:
    """A large value sent as chunks (Kind.CHUNK) under transfer id `transfer`:
    `size` bytes in total whose SHA-256 is `sha256`."""

    transfer: str
    size: int
    sha256: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"transfer": self.transfer, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> BlobRef:
        return cls(
            transfer=_transfer_id(raw, "transfer"),
            size=_size(raw, "size"),
            sha256=_sha256(raw, "sha256"),
        )


@dataclass(frozen=True)
class CreateBlobValue(Operation):
    """Like CreateValue, but the serialized `executor_pb2.Value` arrives as a
    chunked transfer on the bulk queue (values above the inline limit)."""

    op: ClassVar[str] = "blob"
    target: int
    blob: BlobRef

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.op, "target": self.target, "blob": self.blob.to_wire()}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> CreateBlobValue:
        blob = raw.get("blob")
        if not isinstance(blob, dict):
            raise ProtocolError(ErrorCode.MALFORMED, "field 'blob' must be a map")
        return cls(target=_id(raw, "target"), blob=BlobRef.from_wire(blob))


@dataclass(frozen=True)
class CreateData(Operation):
    """Resolve the silo's local data under `key` as a CLIENTS-placed value of
    the serialized TFF type `type_spec`."""

    op: ClassVar[str] = "data"
    target: int
    key: str
    type_spec: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.op, "target": self.target, "key": self.key, "type": self.type_spec}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> CreateData:
        return cls(target=_id(raw, "target"), key=_str(raw, "key"), type_spec=_bytes(raw, "type"))


@dataclass(frozen=True)
class CreateCall(Operation):
    """Call value `fn` on value `arg` (or no argument)."""

    op: ClassVar[str] = "call"
    target: int
    fn: int
    arg: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.op, "target": self.target, "fn": self.fn, "arg": self.arg}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> CreateCall:
        arg = raw.get("arg")
        return cls(
            target=_id(raw, "target"),
            fn=_id(raw, "fn"),
            arg=None if arg is None else _id(raw, "arg"),
        )


@dataclass(frozen=True)
class CreateStruct(Operation):
    """Build a struct of existing values, optionally named."""

    op: ClassVar[str] = "struct"
    target: int
    elements: tuple[tuple[str | None, int], ...]

    def to_wire(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "target": self.target,
            "elements": [[name, ref] for name, ref in self.elements],
        }

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> CreateStruct:
        elements = raw.get("elements")
        if not isinstance(elements, list) or len(elements) > 100_000:
            raise ProtocolError(ErrorCode.MALFORMED, "struct 'elements' must be a list")
        parsed: list[tuple[str | None, int]] = []
        for element in elements:
            if not isinstance(element, list) or len(element) != 2:
                raise ProtocolError(ErrorCode.MALFORMED, "struct element must be [name, id]")
            name, ref = element
            if name is not None and (not isinstance(name, str) or len(name) > _MAX_NAME_LEN):
                raise ProtocolError(ErrorCode.MALFORMED, "struct element name must be a string")
            parsed.append((name, _id({"id": ref}, "id")))
        return cls(target=_id(raw, "target"), elements=tuple(parsed))


@dataclass(frozen=True)
class CreateSelection(Operation):
    """Select element `index` of struct value `source`."""

    op: ClassVar[str] = "select"
    target: int
    source: int
    index: int

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.op, "target": self.target, "source": self.source, "index": self.index}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> CreateSelection:
        return cls(
            target=_id(raw, "target"),
            source=_id(raw, "source"),
            index=_int(raw, "index", minimum=0),
        )


@dataclass(frozen=True)
class Compute(Operation):
    """Send value `source` back in the batch's reply (subject to the silo's
    privacy policy: only aggregates unless raw release is allowed)."""

    op: ClassVar[str] = "compute"
    source: int

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.op, "source": self.source}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> Compute:
        return cls(source=_id(raw, "source"))


@dataclass(frozen=True)
class Dispose(Operation):
    """Free values that are no longer needed."""

    op: ClassVar[str] = "dispose"
    targets: tuple[int, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.op, "targets": list(self.targets)}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> Dispose:
        targets = raw.get("targets")
        if not isinstance(targets, list) or len(targets) > 1_000_000:
            raise ProtocolError(ErrorCode.MALFORMED, "dispose 'targets' must be a list of ids")
        return cls(targets=tuple(_id({"id": t}, "id") for t in targets))


@dataclass(frozen=True)
class Close(Operation):
    """The invocation is over at this silo: free all of its state."""

    op: ClassVar[str] = "close"

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.op}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> Close:
        return cls()


OPERATIONS: dict[str, type[Operation]] = {
    cls.op: cls
    for cls in (
        Open,
        CreateValue,
        CreateKnownFunction,
        CreateBlobValue,
        CreateData,
        CreateCall,
        CreateStruct,
        CreateSelection,
        Compute,
        Dispose,
        Close,
    )
}

# --------------------------------------------------------------------------
# Message bodies
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """Operations for one silo in one invocation, applied in order."""

    operations: tuple[Operation, ...]
    # Sequence number within the invocation, so the silo applies batches in
    # order and detects duplicates.
    seq: int
    # The coordinator process that sent it (a random id per start, and when
    # it started, seconds since the epoch; optional, "" = unknown). A silo
    # frees the sessions of an instance once a later-started instance of the
    # same coordinator sends its first batch.
    coordinator_instance: str = ""
    coordinator_started: float = 0.0
    # Other invocations of the same coordinator that are over at this silo:
    # their `close` rides this batch instead of a message of its own (freed
    # after their earlier batches, which the silo's queue delivered first).
    # Optional ("cl", omitted when empty): a version 1 peer without it
    # sends every close as a batch of its own.
    closes: tuple[str, ...] = ()
    # The coordinator takes replies in bundles. Optional ("ab", omitted when
    # false): a silo bundles replies only for a coordinator that says so.
    accepts_bundles: bool = False

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"seq": self.seq, "ops": [op.to_wire() for op in self.operations]}
        if self.coordinator_instance:
            wire["ci"] = self.coordinator_instance
            wire["cs"] = float(self.coordinator_started)
        if self.closes:
            wire["cl"] = list(self.closes)
        if self.accepts_bundles:
            wire["ab"] = True
        return wire

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> Batch:
        ops = raw.get("ops")
        if not isinstance(ops, list):
            raise ProtocolError(ErrorCode.MALFORMED, "batch 'ops' must be a list")
        if len(ops) > 1_000_000:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"batch has {len(ops)} operations")
        operations = []
        for raw_op in ops:
            if not isinstance(raw_op, dict):
                raise ProtocolError(ErrorCode.MALFORMED, "each operation must be a map")
            tag = raw_op.get("op")
            op_cls = OPERATIONS.get(tag) if isinstance(tag, str) else None
            if op_cls is None:
                raise ProtocolError(
                    ErrorCode.UNKNOWN_OPERATION,
                    f"unknown operation {tag!r}; this silo speaks {sorted(OPERATIONS)}",
                )
            operations.append(op_cls.from_wire(raw_op))
        instance, started = "", 0.0
        if raw.get("ci") is not None:
            instance = _str(raw, "ci", max_len=_MAX_ID_LEN)
            started = _float(raw, "cs")
        return cls(
            operations=tuple(operations),
            seq=_int(raw, "seq", minimum=0),
            coordinator_instance=instance,
            coordinator_started=started,
            closes=_closes(raw.get("cl", [])),
            accepts_bundles=_flag(raw, "ab"),
        )


_MAX_CLOSES = 100_000


def _closes(raw: object) -> tuple[str, ...]:
    if (
        not isinstance(raw, list)
        or len(raw) > _MAX_CLOSES
        or not all(isinstance(i, str) and 0 < len(i) <= _MAX_ID_LEN for i in raw)
    ):
        raise ProtocolError(
            ErrorCode.MALFORMED,
            f"batch 'cl' must be a list of at most {_MAX_CLOSES} invocation ids "
            f"(non-empty strings of at most {_MAX_ID_LEN} characters)",
        )
    return tuple(raw)


@dataclass(frozen=True)
class Result:
    """Values released by a silo for the `Compute` operations of a batch.
    Values above the inline limit are in `blobs`: sent as chunked transfers
    on the silo's bulk connection."""

    values: dict[int, bytes]
    blobs: dict[int, BlobRef] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"values": [[k, v] for k, v in self.values.items()]}
        if self.blobs:
            wire["blobs"] = [[k, ref.to_wire()] for k, ref in self.blobs.items()]
        return wire

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> Result:
        pairs = raw.get("values")
        if not isinstance(pairs, list):
            raise ProtocolError(ErrorCode.MALFORMED, "result 'values' must be a list")
        values: dict[int, bytes] = {}
        for pair in pairs:
            if not isinstance(pair, list) or len(pair) != 2:
                raise ProtocolError(ErrorCode.MALFORMED, "result value must be [id, bytes]")
            values[_id({"id": pair[0]}, "id")] = _bytes({"b": pair[1]}, "b")
        raw_blobs = raw.get("blobs", [])
        if not isinstance(raw_blobs, list) or len(raw_blobs) > 100_000:
            raise ProtocolError(ErrorCode.MALFORMED, "result 'blobs' must be a list")
        blobs: dict[int, BlobRef] = {}
        for pair in raw_blobs:
            if not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[1], dict):
                raise ProtocolError(ErrorCode.MALFORMED, "result blob must be [id, blob]")
            blobs[_id({"id": pair[0]}, "id")] = BlobRef.from_wire(pair[1])
        return cls(values=values, blobs=blobs)


@dataclass(frozen=True)
class Chunk:
    """Piece `seq` (0-based) of `count` of the transfer `blob`; `data` starts at
    byte `offset` of the value. Every chunk repeats the whole-value metadata, so
    a receiver can preallocate on the first chunk to arrive, in any order."""

    blob: BlobRef
    seq: int
    count: int
    offset: int
    data: bytes

    def to_wire(self) -> dict[str, Any]:
        return {
            "blob": self.blob.to_wire(),
            "seq": self.seq,
            "count": self.count,
            "offset": self.offset,
            "data": self.data,
        }

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> Chunk:
        blob_raw = raw.get("blob")
        if not isinstance(blob_raw, dict):
            raise ProtocolError(ErrorCode.MALFORMED, "chunk 'blob' must be a map")
        blob = BlobRef.from_wire(blob_raw)
        count = _int(raw, "count", minimum=1)
        seq = _int(raw, "seq", minimum=0)
        offset = _int(raw, "offset", minimum=0)
        data = _bytes(raw, "data")
        if seq >= count:
            raise ProtocolError(ErrorCode.MALFORMED, f"chunk seq {seq} is not below count {count}")
        if len(data) > MAX_CHUNK_BYTES:
            raise ProtocolError(
                ErrorCode.TOO_LARGE, f"chunk of {len(data)} bytes exceeds {MAX_CHUNK_BYTES}"
            )
        if offset + len(data) > blob.size:
            raise ProtocolError(
                ErrorCode.MALFORMED,
                f"chunk {seq} of transfer {blob.transfer} ends at {offset + len(data)}, "
                f"past the announced size {blob.size}",
            )
        if count > max(1, blob.size):
            raise ProtocolError(ErrorCode.MALFORMED, "chunk count exceeds the value size")
        return cls(blob=blob, seq=seq, count=count, offset=offset, data=data)


@dataclass(frozen=True)
class ErrorReport:
    """Why a batch or a message was refused or failed."""

    code: ErrorCode
    message: str
    # The gRPC status name of the silo's worker_binary error ("INTERNAL",
    # "INVALID_ARGUMENT", ...) when the worker raised it, else None.
    worker_status: str | None = None

    def to_wire(self) -> dict[str, Any]:
        wire = {"code": str(self.code), "message": self.message}
        if self.worker_status is not None:
            wire["worker_status"] = self.worker_status
        return wire

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> ErrorReport:
        code = _str(raw, "code")
        try:
            parsed = ErrorCode(code)
        except ValueError:
            parsed = ErrorCode.EXECUTION
        # An empty message is still an error report: never drop one for it.
        message = _str(raw, "message", max_len=64 * 1024, allow_empty=True)
        status = _opt_str(raw, "worker_status")
        if status is not None and not _STATUS_NAME.fullmatch(status):
            raise ProtocolError(ErrorCode.MALFORMED, "field 'worker_status' is not a status name")
        return cls(code=parsed, message=message, worker_status=status)


@dataclass(frozen=True)
class SiloStatus:
    """Hello / heartbeat / goodbye content: who the silo is and how busy."""

    silo: str
    clients: int
    data_keys: tuple[str, ...] = ()
    active_invocations: int = 0
    allow_raw_client_values: bool = False
    started_at: float = 0.0
    # Which process this is (shown by `tff-amqp status`, named in the error a
    # second process claiming the silo's name gets). Optional on the wire.
    host: str = ""
    pid: int = 0
    # Per data key, the columns every client has, with their kinds (no values),
    # and the row count only if the silo was started with --advertise-counts.
    # Optional on the wire; the coordinator refuses an invocation whose
    # element type names a column a cohort silo lacks, before any work is sent.
    data_schemas: tuple[DataSchema, ...] = ()

    def schema(self, key: str) -> DataSchema | None:
        return next((s for s in self.data_schemas if s.key == key), None)

    # Calls this process made to its TFF worker since it started, by gRPC
    # method ("CreateCall": n, ...): what invocations cost at the silo, for
    # benchmarks and tests. Optional on the wire.
    worker_calls: tuple[tuple[str, int], ...] = ()
    # The silo takes requests in bundles. Optional ("ab", omitted when false):
    # the coordinator bundles requests only for a silo that says so.
    accepts_bundles: bool = False
    # The silo keeps the functions it was sent, by digest, for the life of its
    # process (bounded; see tff_amqp/silo/stateful/functions.py), so later
    # batches may name them (CreateKnownFunction). Optional ("hf").
    holds_functions: bool = False

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "silo": self.silo,
            "clients": self.clients,
            "data_keys": list(self.data_keys),
            "active": self.active_invocations,
            "raw": self.allow_raw_client_values,
            "started_at": self.started_at,
        }
        if self.host:
            wire["host"] = self.host
        if self.pid:
            wire["pid"] = self.pid
        if self.data_schemas:
            wire["schemas"] = [schema.to_wire() for schema in self.data_schemas]
        if self.worker_calls:
            wire["wc"] = dict(self.worker_calls)
        if self.accepts_bundles:
            wire["ab"] = True
        if self.holds_functions:
            wire["hf"] = True
        return wire

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> SiloStatus:
        keys = raw.get("data_keys", [])
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ProtocolError(ErrorCode.MALFORMED, "'data_keys' must be a list of strings")
        raw_flag = raw.get("raw", False)
        if not isinstance(raw_flag, bool):
            raise ProtocolError(ErrorCode.MALFORMED, "'raw' must be a boolean")
        return cls(
            silo=_name(raw, "silo"),
            clients=_int(raw, "clients", minimum=0),
            data_keys=tuple(keys),
            active_invocations=_int(raw, "active", minimum=0),
            allow_raw_client_values=raw_flag,
            started_at=_float(raw, "started_at"),
            host=_opt_str(raw, "host", max_len=_MAX_NAME_LEN) or "",
            pid=_opt_int(raw, "pid", minimum=0) or 0,
            data_schemas=_schemas(raw.get("schemas", [])),
            worker_calls=_worker_calls(raw.get("wc", {})),
            accepts_bundles=_flag(raw, "ab"),
            holds_functions=_flag(raw, "hf"),
        )


COLUMN_KINDS = frozenset({"int", "float", "bool", "str", "empty", "mixed"})
_MAX_SCHEMA_KEYS = 256
_MAX_COLUMNS = 4096


@dataclass(frozen=True)
class DataSchema:
    """What a silo advertises about one data key: column names and kinds
    (one of COLUMN_KINDS) present in every client, and optionally rows."""

    key: str
    columns: tuple[tuple[str, str], ...]
    rows: int | None = None

    def names(self) -> list[str]:
        return [name for name, _ in self.columns]

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"key": self.key, "columns": [list(c) for c in self.columns]}
        if self.rows is not None:
            wire["rows"] = self.rows
        return wire


def _schemas(raw: object) -> tuple[DataSchema, ...]:
    if not isinstance(raw, list) or len(raw) > _MAX_SCHEMA_KEYS:
        raise ProtocolError(
            ErrorCode.MALFORMED, f"'schemas' must be a list of at most {_MAX_SCHEMA_KEYS}"
        )
    schemas = []
    for item in raw:
        if not isinstance(item, Mapping):
            raise ProtocolError(ErrorCode.MALFORMED, "a data schema must be a map")
        key = _str(item, "key", max_len=128)
        columns = item.get("columns")
        if not isinstance(columns, list) or len(columns) > _MAX_COLUMNS:
            raise ProtocolError(
                ErrorCode.MALFORMED,
                f"schema 'columns' must be a list of at most {_MAX_COLUMNS} [name, kind] pairs",
            )
        pairs = []
        for column in columns:
            if (
                not isinstance(column, list)
                or len(column) != 2
                or not isinstance(column[0], str)
                or not 0 < len(column[0]) <= 256
                or column[1] not in COLUMN_KINDS
            ):
                raise ProtocolError(
                    ErrorCode.MALFORMED,
                    "a schema column must be [name (1-256 chars), kind "
                    f"({', '.join(sorted(COLUMN_KINDS))})]",
                )
            pairs.append((column[0], column[1]))
        schemas.append(DataSchema(key, tuple(pairs), _opt_int(item, "rows", minimum=0)))
    return tuple(schemas)


_MAX_WORKER_METHODS = 32


def _worker_calls(raw: object) -> tuple[tuple[str, int], ...]:
    """A status's worker-call counts: a small map of method name to count."""
    if not isinstance(raw, Mapping) or len(raw) > _MAX_WORKER_METHODS:
        raise ProtocolError(
            ErrorCode.MALFORMED,
            f"'wc' must be a map of at most {_MAX_WORKER_METHODS} method names to counts",
        )
    calls = []
    for method, count in raw.items():
        if not isinstance(method, str) or not _METHOD_NAME.fullmatch(method):
            raise ProtocolError(ErrorCode.MALFORMED, "'wc' keys must be method names")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ProtocolError(ErrorCode.MALFORMED, "'wc' counts must be non-negative integers")
        calls.append((method, count))
    return tuple(sorted(calls))


# --------------------------------------------------------------------------
# Stateless regime (MapReduce work items, `tff_amqp.coordinator.mapreduce`): a work item
# is self-contained, so any worker of the silo can run it and a redelivered
# copy gives the same result. The envelope's `inv` is the round id and `corr`
# the work item id (results are merged once per item id).
# --------------------------------------------------------------------------

_MAX_SHARDS = 1_000_000


@dataclass(frozen=True)
class WorkItem:
    """Run MapReduceForm `work` on one shard of the silo's clients under
    `data_key` and fold the results with `zero` / `accumulate`.

    The shard is the `shard`-th of `shards` contiguous slices of the silo's
    clients (in the data's client order). Computations and the broadcast value
    are serialized `executor_pb2.Value` protos.

    A broadcast above the inline limit is not in the item: `broadcast` is
    empty and `broadcast_blob` names the transfer the coordinator published
    once per round into the silo's broadcast stream, whose chunks were written
    no earlier than `broadcast_since` (epoch seconds: where a worker starts
    reading the stream)."""

    data_key: str
    shard: int
    shards: int
    work: bytes
    zero: bytes
    accumulate: bytes
    broadcast: bytes
    broadcast_blob: BlobRef | None = None
    broadcast_since: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.shard < self.shards <= _MAX_SHARDS:
            raise ProtocolError(
                ErrorCode.MALFORMED,
                f"work item shard {self.shard} of {self.shards}: need 0 <= shard < shards "
                f"<= {_MAX_SHARDS}",
            )
        if self.broadcast_blob is not None and self.broadcast:
            raise ProtocolError(
                ErrorCode.MALFORMED, "work item carries its broadcast both inline and as a blob"
            )

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "key": self.data_key,
            "shard": self.shard,
            "shards": self.shards,
            "work": self.work,
            "zero": self.zero,
            "accumulate": self.accumulate,
            "broadcast": self.broadcast,
        }
        if self.broadcast_blob is not None:
            wire["bblob"] = self.broadcast_blob.to_wire()
            wire["bsince"] = self.broadcast_since
        return wire

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> WorkItem:
        blob_raw = raw.get("bblob")
        if blob_raw is not None and not isinstance(blob_raw, dict):
            raise ProtocolError(ErrorCode.MALFORMED, "field 'bblob' must be a map")
        return cls(
            data_key=_str(raw, "key"),
            shard=_int(raw, "shard", minimum=0),
            shards=_int(raw, "shards", minimum=1),
            work=_bytes(raw, "work"),
            zero=_bytes(raw, "zero"),
            accumulate=_bytes(raw, "accumulate"),
            broadcast=_bytes(raw, "broadcast"),
            broadcast_blob=None if blob_raw is None else BlobRef.from_wire(blob_raw),
            broadcast_since=_float(raw, "bsince"),
        )


@dataclass(frozen=True)
class WorkResult:
    """The accumulator of one work item's shard (a serialized `Value`), over
    `clients` clients; `clients == 0` (an empty shard) carries `zero()`.
    An accumulator above the inline limit is sent first as a chunked transfer
    (on the worker's bulk connection, key ``bulk.<silo>``): `accumulator` is
    then empty and `blob` names the transfer."""

    shard: int
    clients: int
    accumulator: bytes
    blob: BlobRef | None = None

    def __post_init__(self) -> None:
        if self.blob is not None and self.accumulator:
            raise ProtocolError(
                ErrorCode.MALFORMED, "work result carries its accumulator both inline and as a blob"
            )

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "shard": self.shard,
            "clients": self.clients,
            "acc": self.accumulator,
        }
        if self.blob is not None:
            wire["blob"] = self.blob.to_wire()
        return wire

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> WorkResult:
        blob_raw = raw.get("blob")
        if blob_raw is not None and not isinstance(blob_raw, dict):
            raise ProtocolError(ErrorCode.MALFORMED, "field 'blob' must be a map")
        return cls(
            shard=_int(raw, "shard", minimum=0),
            clients=_int(raw, "clients", minimum=0),
            accumulator=_bytes(raw, "acc"),
            blob=None if blob_raw is None else BlobRef.from_wire(blob_raw),
        )


# At most this many messages ride in one bundle.
MAX_BUNDLED = 1024


@dataclass(frozen=True)
class Bundle:
    """Several encoded messages for one destination, in one AMQP message.

    Concurrent invocations each send a batch to a silo (and get a result
    back) at about the same time; carried together they cost the broker, the
    sender and the receiver one message instead of one each. Each member is
    a complete encoded envelope, decoded and validated on its own (`members`),
    so a bundle changes nothing about what a message may say; a bundle never
    holds a bundle."""

    messages: tuple[bytes, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"m": list(self.messages)}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> Bundle:
        messages = raw.get("m")
        if (
            not isinstance(messages, list)
            or not 0 < len(messages) <= MAX_BUNDLED
            or not all(isinstance(m, bytes) for m in messages)
        ):
            raise ProtocolError(
                ErrorCode.MALFORMED,
                f"bundle 'm' must be a list of 1 to {MAX_BUNDLED} encoded messages",
            )
        return cls(messages=tuple(messages))


Body = Batch | Result | ErrorReport | SiloStatus | WorkItem | WorkResult | Chunk | Bundle

_BODY_TYPES: dict[Kind, type] = {
    Kind.BATCH: Batch,
    Kind.RESULT: Result,
    Kind.ERROR: ErrorReport,
    Kind.HELLO: SiloStatus,
    Kind.HEARTBEAT: SiloStatus,
    Kind.GOODBYE: SiloStatus,
    Kind.WORK: WorkItem,
    Kind.WORK_RESULT: WorkResult,
    Kind.CHUNK: Chunk,
    Kind.BUNDLE: Bundle,
}


def new_id() -> str:
    """A fresh message / correlation id: 128 random bits in hex, like
    `uuid.uuid4().hex` (unique and unguessable across processes) at a
    quarter of its CPU (ids are made on every message)."""
    return os.urandom(16).hex()


@dataclass(frozen=True)
class Envelope:
    """A complete message: routing metadata plus a typed body."""

    kind: Kind
    body: Body
    sender: str
    invocation_id: str = ""
    correlation_id: str = ""
    deadline: float = 0.0  # seconds since the epoch; 0 = none
    message_id: str = field(default_factory=new_id)
    version: int = PROTOCOL_VERSION
    # The sending silo-side process's instance id (a uuid per process start),
    # on every hello / heartbeat / reply: the coordinator never mixes two
    # processes' replies for one silo. Optional ("inst", omitted when empty),
    # so version 1 peers that do not send it still decode.
    instance: str = ""

    def expired(self, now: float | None = None) -> bool:
        return bool(self.deadline) and (now if now is not None else time.time()) > self.deadline

    def ttl_seconds(self, now: float | None = None) -> float | None:
        """Seconds left before the deadline (None if there is no deadline)."""
        if not self.deadline:
            return None
        return max(0.0, self.deadline - (now if now is not None else time.time()))


def encode(envelope: Envelope, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> bytes:
    """Serialize an envelope; refuse it if it would exceed `max_bytes`."""
    payload = msgpack.packb(
        {
            "v": envelope.version,
            "kind": str(envelope.kind),
            "id": envelope.message_id,
            "corr": envelope.correlation_id,
            "inv": envelope.invocation_id,
            "deadline": float(envelope.deadline),
            "sender": envelope.sender,
            "body": envelope.body.to_wire(),
            **({"inst": envelope.instance} if envelope.instance else {}),
        },
        use_bin_type=True,
    )
    if len(payload) > max_bytes:
        raise ProtocolError(
            ErrorCode.TOO_LARGE,
            f"message of {len(payload)} bytes exceeds the limit of {max_bytes} bytes "
            "(the broker's max_message_size; RabbitMQ closes the channel on larger "
            "publishes). Reduce the value size or raise max_message_bytes to match the broker.",
        )
    return payload


def decode(payload: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Envelope:
    """Parse and validate a message. Raises ProtocolError on anything wrong."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise ProtocolError(ErrorCode.MALFORMED, "payload must be bytes")
    if len(payload) > max_bytes:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"message of {len(payload)} bytes exceeds {max_bytes} bytes"
        )
    try:
        raw = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
        )
    except Exception as e:  # msgpack raises many types for garbage input
        raise ProtocolError(ErrorCode.MALFORMED, f"not a msgpack message: {e}") from None
    if not isinstance(raw, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "message must be a msgpack map")
    version = raw.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProtocolError(ErrorCode.MALFORMED, "missing protocol version 'v'")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.VERSION,
            f"protocol version {version} is not supported (this side speaks "
            f"{PROTOCOL_VERSION}); upgrade tff-amqp so coordinator and silos match",
        )
    kind_raw = raw.get("kind")
    try:
        kind = Kind(kind_raw)
    except ValueError:
        raise ProtocolError(ErrorCode.MALFORMED, f"unknown message kind {kind_raw!r}") from None
    body_raw = raw.get("body")
    if not isinstance(body_raw, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "'body' must be a map")
    body = _BODY_TYPES[kind].from_wire(body_raw)
    return Envelope(
        kind=kind,
        body=body,
        sender=_str(raw, "sender", max_len=_MAX_NAME_LEN),
        invocation_id=_str(raw, "inv", max_len=_MAX_ID_LEN, allow_empty=True),
        correlation_id=_str(raw, "corr", max_len=_MAX_ID_LEN, allow_empty=True),
        deadline=_float(raw, "deadline"),
        message_id=_str(raw, "id", max_len=_MAX_ID_LEN),
        version=version,
        instance=_opt_str(raw, "inst", max_len=_MAX_ID_LEN) or "",
    )


# Bytes a bundle adds around its members: the envelope, and per member the
# msgpack bin header (at most 5 bytes).
BUNDLE_OVERHEAD = 512
BUNDLE_MEMBER_OVERHEAD = 5


def bundle_envelope(sender: str, members: Sequence[tuple[Envelope, bytes]]) -> Envelope:
    """One envelope carrying `members` (envelopes with their encoding), to
    one destination. Its deadline is the latest of theirs (0 if any has
    none), so the broker expires it only once every member is late; each
    member keeps its own deadline for the receiver to check."""
    deadlines = [envelope.deadline for envelope, _ in members]
    return Envelope(
        kind=Kind.BUNDLE,
        body=Bundle(messages=tuple(payload for _, payload in members)),
        sender=sender,
        deadline=0.0 if not all(deadlines) else max(deadlines),
    )


def members(
    bundle: Envelope, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> list[Envelope | tuple[bytes, ProtocolError]]:
    """The envelopes a bundle carries, in order. A member that does not decode
    is given as (its bytes, the error), so the receiver refuses that one and
    serves the rest; a member from another sender than the bundle's, or a
    bundle inside a bundle, is malformed."""
    if not isinstance(bundle.body, Bundle):
        raise ProtocolError(ErrorCode.MALFORMED, f"not a bundle: {bundle.kind!r}")
    out: list[Envelope | tuple[bytes, ProtocolError]] = []
    for payload in bundle.body.messages:
        try:
            envelope = decode(payload, max_bytes=max_bytes)
            if envelope.kind is Kind.BUNDLE:
                raise ProtocolError(ErrorCode.MALFORMED, "a bundle must not hold a bundle")
            if envelope.sender != bundle.sender:
                raise ProtocolError(
                    ErrorCode.MALFORMED,
                    f"bundle from {bundle.sender!r} holds a message from {envelope.sender!r}",
                )
        except ProtocolError as e:
            out.append((payload, e))
            continue
        out.append(envelope)
    return out


def peek_ids(payload: bytes) -> tuple[str, str]:
    """Best-effort (invocation id, correlation id) of a message that failed to
    decode, so the error reply can still be routed. Never raises."""
    try:
        raw = msgpack.unpackb(payload, raw=False)
        if isinstance(raw, dict):
            inv, corr = raw.get("inv", ""), raw.get("corr", "")
            return (inv if isinstance(inv, str) else "")[:_MAX_ID_LEN], (
                corr if isinstance(corr, str) else ""
            )[:_MAX_ID_LEN]
    except Exception:
        pass
    return "", ""


# --------------------------------------------------------------------------
# Field validators
# --------------------------------------------------------------------------


_MAX_INT = 2**62


def _int(raw: Mapping[str, Any], key: str, *, minimum: int | None = None) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(ErrorCode.MALFORMED, f"field {key!r} must be an integer")
    if minimum is not None and value < minimum:
        raise ProtocolError(ErrorCode.MALFORMED, f"field {key!r} must be >= {minimum}")
    if value > _MAX_INT:
        raise ProtocolError(ErrorCode.MALFORMED, f"field {key!r} is out of range")
    return value


def _opt_int(raw: Mapping[str, Any], key: str, *, minimum: int | None = None) -> int | None:
    return None if raw.get(key) is None else _int(raw, key, minimum=minimum)


def _id(raw: Mapping[str, Any], key: str) -> int:
    value = raw.get(key)
    # Ids are the fields batches carry most: the common case in one test.
    if type(value) is int and 0 <= value <= _MAX_INT:
        return value
    return _int(raw, key, minimum=0)


def _float(raw: Mapping[str, Any], key: str) -> float:
    value = raw.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(ErrorCode.MALFORMED, f"field {key!r} must be a number")
    if value != value or value in (float("inf"), float("-inf")):
        raise ProtocolError(ErrorCode.MALFORMED, f"field {key!r} must be finite")
    return float(value)


def _str(
    raw: Mapping[str, Any], key: str, *, max_len: int = _MAX_NAME_LEN, allow_empty: bool = False
) -> str:
    value = raw.get(key)
    if not isinstance(value, str):
        raise ProtocolError(ErrorCode.MALFORMED, f"field {key!r} must be a string")
    if len(value) > max_len:
        raise ProtocolError(ErrorCode.MALFORMED, f"field {key!r} is longer than {max_len}")
    if not value and not allow_empty:
        raise ProtocolError(ErrorCode.MALFORMED, f"field {key!r} must not be empty")
    return value


def _opt_str(raw: Mapping[str, Any], key: str, **limits: Any) -> str | None:
    return None if raw.get(key) is None else _str(raw, key, **limits)


def _name(raw: Mapping[str, Any], key: str) -> str:
    value = _str(raw, key)
    if not is_valid_name(value):
        raise ProtocolError(ErrorCode.MALFORMED, f"field {key!r} is not a valid silo name")
    return value


def _size(raw: Mapping[str, Any], key: str) -> int:
    value = _int(raw, key, minimum=0)
    if value > MAX_TRANSFER_BYTES:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"field {key!r}: {value} bytes exceeds {MAX_TRANSFER_BYTES}"
        )
    return value


def _sha256(raw: Mapping[str, Any], key: str) -> bytes:
    value = _bytes(raw, key)
    if len(value) != 32:
        raise ProtocolError(ErrorCode.MALFORMED, f"field {key!r} must be a 32-byte SHA-256")
    return value


def _transfer_id(raw: Mapping[str, Any], key: str) -> str:
    value = _str(raw, key, max_len=_MAX_ID_LEN)
    if not value.isascii() or not all(c.isalnum() or c in "-_." for c in value):
        raise ProtocolError(ErrorCode.MALFORMED, f"field {key!r} is not a valid transfer id")
    return value


def _flag(raw: Mapping[str, Any], key: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise ProtocolError(ErrorCode.MALFORMED, f"field {key!r} must be a boolean")
    return value


def _bytes(raw: Mapping[str, Any], key: str) -> bytes:
    value = raw.get(key)
    if not isinstance(value, bytes):
        raise ProtocolError(ErrorCode.MALFORMED, f"field {key!r} must be binary")
    return value


def is_valid_name(name: str) -> bool:
    """Silo and federation names become parts of queue names and routing keys:
    letters, digits, '-' and '_' only (no '.', '*' or '#')."""
    return 0 < len(name) <= 64 and name.isascii() and all(c.isalnum() or c in "-_" for c in name)


def batch_envelope(
    *,
    sender: str,
    invocation_id: str,
    correlation_id: str,
    deadline: float,
    operations: Sequence[Operation],
    seq: int,
    closes: Sequence[str] = (),
) -> Envelope:
    """Convenience constructor used by the coordinator."""
    return Envelope(
        kind=Kind.BATCH,
        body=Batch(operations=tuple(operations), seq=seq, closes=tuple(closes)),
        sender=sender,
        invocation_id=invocation_id,
        correlation_id=correlation_id,
        deadline=deadline,
    )
