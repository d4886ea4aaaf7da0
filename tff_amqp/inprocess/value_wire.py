"""TFF `Value` protos built and read without TFF's per-call tracing, and
arguments with large tensors serialized straight into a `Value`'s bytes.

TFF's `serialize_value` / `deserialize_value` and each of their recursive
helpers are wrapped in `tracing.trace`, which costs two
`asyncio.current_task()` calls and a generator per node: on the event loop it
was ~8-10 % of its busy time in a small federated mean. `serialize_value` and
`deserialize` here walk tensors (of numeric or bool dtypes), structs and
federated values themselves, with the same untraced building blocks TFF
uses (`array.to_proto`, `array.from_proto`, ...); any other node (strings,
sequences, computations, a value TFF would refuse) is handed to TFF's own
function, so results and errors are TFF's. Tests compare both, byte for byte.

TFF's `serialize_value` also copies a tensor's content four times on the way
(its `tobytes`, the `Array` proto, the `Value` wrapping it, the
serialization), so a 256 MiB model briefly cost the coordinator ~1.25 GiB.
Here a dense NumPy leaf of at least `DIRECT_BYTES` is written once, from the
array's own buffer, in protobuf's encoding of the same messages; the small
parts (dtype, shape, a federated type, small leaves) are serialized by
protobuf itself. The result parses to the proto TFF would build (tested).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict, deque
from typing import Any

import numpy as np
from tensorflow_federated.proto.v0 import array_pb2, computation_pb2, executor_pb2
from tensorflow_federated.python.common_libs import structure
from tensorflow_federated.python.core.impl.compiler import array
from tensorflow_federated.python.core.impl.computation import computation_impl
from tensorflow_federated.python.core.impl.executors import value_serialization
from tensorflow_federated.python.core.impl.types import (
    array_shape,
    computation_types,
    dtype_utils,
    placements,
    type_serialization,
)

from tff_amqp.inprocess.structs import struct_of

# Smaller tensors are not worth a second code path: TFF's copies of them are cheap.
DIRECT_BYTES = 1 << 20

Pieces = list[bytes | memoryview]


class SerializedDatasets:
    """TFF's serialization of `tf.data.Dataset` values, remembered per dataset
    object and type while the dataset lives.

    A dataset is an immutable description (a transformation returns a new
    object; `from_tensor_slices` copies its arrays into the graph), so the
    same object serializes to the same graph every time; TFF rebuilds that
    graph on every call (a FedAvg round's 9 small client datasets: ~4-6 ms).
    Entries go with their dataset (weak references) or least recently used
    first beyond `MAX_BYTES`; a graph above `MAX_ENTRY_BYTES` is not kept.
    Thread-safe: large arguments are serialized in threads."""

    MAX_BYTES = 256 * 1024 * 1024
    MAX_ENTRY_BYTES = 64 * 1024 * 1024

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (id of the dataset, type) -> (weak reference, serialized Value, TFF's type).
        self._entries: OrderedDict[tuple[int, Any], tuple[weakref.ref, bytes, Any]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        # Keys of datasets that died, purged under the lock at the next use:
        # a weakref callback may run inside the locked region (a collection
        # triggered there), so it must not take the lock itself.
        self._dead: deque[tuple[int, Any]] = deque()

    def serialize(self, dataset: object, type_spec: Any) -> tuple[executor_pb2.Value, Any]:
        """What `value_serialization.serialize_value(dataset, type_spec)` returns."""
        key = (id(dataset), type_spec)
        with self._lock:
            self._purge()
            entry = self._entries.get(key)
            if entry is not None and entry[0]() is dataset:
                self._entries.move_to_end(key)
                self.hits += 1
                return executor_pb2.Value.FromString(entry[1]), entry[2]
        proto, tff_type = value_serialization.serialize_value(dataset, type_spec)
        serialized = proto.SerializeToString()
        if len(serialized) <= self.MAX_ENTRY_BYTES:
            self._put(key, dataset, serialized, tff_type)
        return proto, tff_type

    def _put(self, key: tuple[int, Any], dataset: object, serialized: bytes, tff_type: Any) -> None:
        try:
            ref = weakref.ref(dataset, lambda _, key=key: self._dead.append(key))
        except TypeError:
            return  # not weakly referenceable: not kept
        with self._lock:
            self._purge()
            self._drop(key)
            self._entries[key] = (ref, serialized, tff_type)
            self._bytes += len(serialized)
            while self._bytes > self.MAX_BYTES:
                self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[int, Any]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry[1])

    def _purge(self) -> None:
        while self._dead:
            key = self._dead.popleft()
            entry = self._entries.get(key)
            if entry is not None and entry[0]() is None:  # not a newer dataset at that id
                self._drop(key)

    def __len__(self) -> int:
        with self._lock:
            self._purge()
            return len(self._entries)


DATASETS = SerializedDatasets()


def _tff_serialize(value: object, type_spec: Any) -> tuple[executor_pb2.Value, Any]:
    """TFF's `serialize_value`, with datasets' graphs remembered."""
    if isinstance(type_spec, computation_types.SequenceType) and _is_dataset(value):
        return DATASETS.serialize(value, type_spec)
    return value_serialization.serialize_value(value, type_spec)


def _is_dataset(value: object) -> bool:
    import tensorflow as tf

    return isinstance(value, tf.data.Dataset)


def _number(message: Any, field: str) -> int:
    return message.DESCRIPTOR.fields_by_name[field].number


_VALUE_ARRAY = _number(executor_pb2.Value, "array")
_VALUE_STRUCT = _number(executor_pb2.Value, "struct")
_VALUE_FEDERATED = _number(executor_pb2.Value, "federated")
_STRUCT_ELEMENT = _number(executor_pb2.Value.Struct, "element")
_ELEMENT_NAME = _number(executor_pb2.Value.Struct.Element, "name")
_ELEMENT_VALUE = _number(executor_pb2.Value.Struct.Element, "value")
_FEDERATED_TYPE = _number(executor_pb2.Value.Federated, "type")
_FEDERATED_VALUE = _number(executor_pb2.Value.Federated, "value")
_ARRAY_CONTENT = _number(array_pb2.Array, "content")


def serialize(value: object, type_spec: computation_types.Type) -> tuple[bytes, Any]:
    """`value` as the bytes of TFF's `Value` proto, and the type it was
    serialized as (what `value_serialization.serialize_value` returns)."""
    pieces = _encode(value, type_spec)
    if pieces is None:
        proto, serialized_type = serialize_value(value, type_spec)
        return proto.SerializeToString(), serialized_type
    return b"".join(pieces), type_spec


# Leaves written here: NumPy values of these kinds (bool, integers, floats,
# complex) and Python scalars; strings, bfloat16, objects go to TFF.
_NUMERIC_KINDS = frozenset("biufc")
_PYTHON_SCALARS = frozenset([bool, int, float, complex])
# TFF serializes these as computations whatever the type says.
_COMPUTATIONS = (computation_pb2.Computation, computation_impl.ConcreteComputation)


def serialize_value(
    value: object, type_spec: computation_types.Type | None
) -> tuple[executor_pb2.Value, Any]:
    """What `value_serialization.serialize_value(value, type_spec)` returns,
    without its tracing for tensors, structs and federated values."""
    proto = executor_pb2.Value()
    if _write_node(proto, value, type_spec):
        return proto, type_spec
    return _tff_serialize(value, type_spec)


def _write(proto: executor_pb2.Value, value: object, type_spec: Any) -> None:
    """Fills the empty `proto` with `value` as TFF's `serialize_value` would
    (a node not written here is TFF's, with its errors)."""
    if not _write_node(proto, value, type_spec):
        tff_proto, _ = _tff_serialize(value, type_spec)
        proto.CopyFrom(tff_proto)


def _write_node(proto: executor_pb2.Value, value: object, type_spec: Any) -> bool:
    """Writes `value` into `proto` and returns True, or returns False, having
    left `proto` untouched, when TFF must serialize this node."""
    if isinstance(type_spec, computation_types.TensorType):
        return _write_tensor(proto, value, type_spec)
    if isinstance(value, _COMPUTATIONS):
        return False
    if isinstance(type_spec, computation_types.StructType):
        try:
            elements = structure.to_elements(structure.from_container(value))
        except TypeError:
            return False
        if len(elements) != len(type_spec):
            return False
        struct = proto.struct
        struct.SetInParent()  # an empty struct is still a struct
        for (name, element_type), (_, element) in zip(structure.iter_elements(type_spec), elements):
            entry = struct.element.add()
            if name:
                entry.name = name
            _write(entry.value, element, element_type)
        return True
    if isinstance(type_spec, computation_types.FederatedType):
        members = [value] if type_spec.all_equal else value
        if not isinstance(members, list):
            return False
        member_type = type_spec.member
        federated = proto.federated
        for member in members:
            entry = federated.value.add()
            if not _write_node(entry, member, member_type):
                tff_proto, tff_type = _tff_serialize(member, member_type)
                member_type.check_assignable_from(tff_type)  # as TFF checks its members
                entry.CopyFrom(tff_proto)
        federated.type.CopyFrom(type_serialization.serialize_type(type_spec).federated)
        return True
    return False


# Scalars of these dtypes (the common aggregates) are written straight into
# their repeated field, as `array.to_proto` writes them, without its checks.
_SCALAR_FIELDS = {
    np.dtype(np.float32): "float32_list",
    np.dtype(np.float64): "float64_list",
    np.dtype(np.int32): "int32_list",
    np.dtype(np.int64): "int64_list",
}
_SCALAR_DTYPES = {dtype: dtype_utils.to_proto(dtype.type) for dtype in _SCALAR_FIELDS}
# Python scalars TFF takes for a dtype of the same kind (`bool` is not an
# int here: TFF refuses it for integer dtypes).
_PYTHON_SCALAR_KINDS = {float: "f", int: "i"}
_SCALAR_READS = {
    _SCALAR_DTYPES[dtype]: (dtype.type, field) for dtype, field in _SCALAR_FIELDS.items()
}


def read_scalar(array_pb: Any) -> np.generic | None:
    """`array.from_proto(array_pb)` for a scalar of a dtype above, without
    its dispatch; None for anything else (TFF reads it, or refuses it)."""
    read = _SCALAR_READS.get(array_pb.dtype)
    if read is None or array_pb.shape.dim or array_pb.shape.unknown_rank:
        return None
    items = getattr(array_pb, read[1]).value
    if len(items) != 1:
        return None
    return read[0](items[0])


def _write_scalar(proto: executor_pb2.Value, dtype: np.dtype, item: object) -> None:
    """A scalar of one of `_SCALAR_FIELDS`' dtypes, as `array.to_proto` writes it."""
    written = proto.array
    written.dtype = _SCALAR_DTYPES[dtype]
    written.shape.SetInParent()
    getattr(written, _SCALAR_FIELDS[dtype]).value.append(item)


def _write_tensor(
    proto: executor_pb2.Value, value: object, type_spec: computation_types.TensorType
) -> bool:
    if (
        isinstance(value, np.generic)
        and value.dtype == type_spec.dtype
        and value.dtype in _SCALAR_FIELDS
        and type_spec.shape == ()
    ):
        _write_scalar(proto, value.dtype, value.item())
        return True
    if (
        _PYTHON_SCALAR_KINDS.get(type(value)) == type_spec.dtype.kind
        and type_spec.dtype in _SCALAR_FIELDS
        and type_spec.shape == ()
    ):
        # A Python float or int (arguments such as `[1.0, 2.5]`): TFF's
        # value-based range check, then the value as the dtype rounds it.
        if not dtype_utils.can_cast(value, type_spec.dtype.type):  # type: ignore[arg-type]
            return False  # TFF refuses it, with its message
        _write_scalar(proto, type_spec.dtype, type_spec.dtype.type(value).item())
        return True
    if isinstance(value, np.ndarray | np.generic):
        if value.dtype.kind not in _NUMERIC_KINDS:
            return False
    elif type(value) not in _PYTHON_SCALARS:
        # Lists and tuples (TFF converts them), strings, anything else.
        return False
    dtype = type_spec.dtype
    if dtype.kind not in _NUMERIC_KINDS:
        return False
    # What TFF would refuse, TFF refuses (with its message).
    if not array.is_compatible_shape(value, type_spec.shape):  # type: ignore[arg-type]
        return False
    if not array.is_compatible_dtype(value, dtype.type):  # type: ignore[arg-type]
        return False
    # TFF's two encodings: repeated fields for scalars, raw content otherwise.
    if array_shape.is_shape_scalar(type_spec.shape):
        array_pb = array.to_proto(value, dtype_hint=dtype.type)  # type: ignore[arg-type]
    else:
        array_pb = array.to_proto_content(value, dtype_hint=dtype.type)  # type: ignore[arg-type]
    proto.array.CopyFrom(array_pb)
    return True


def deserialize(proto: executor_pb2.Value, type_hint: computation_types.Type | None) -> object:
    """The value `value_serialization.deserialize_value(proto, type_hint)`
    returns (not its type), without its tracing for tensors, structs and
    federated values."""
    return _read(proto, type_hint)[0]


def _read(proto: executor_pb2.Value, type_hint: Any) -> tuple[object, object]:
    """The value TFF deserializes, and a key equal for two nodes whenever the
    types TFF would deduce for them are equal (TFF checks that a federated
    value's members have compatible types)."""
    read = _read_node(proto, type_hint) if isinstance(proto, executor_pb2.Value) else None
    if read is None:
        value, value_type = value_serialization.deserialize_value(proto, type_hint)
        return value, value_type
    return read


def _read_node(proto: executor_pb2.Value, type_hint: Any) -> tuple[object, object] | None:
    """None when TFF must deserialize this node (whatever it holds or raises)."""
    which = proto.WhichOneof("value")
    if which == "array" and isinstance(type_hint, computation_types.TensorType):
        if type_hint.dtype.kind not in _NUMERIC_KINDS:
            return None
        # The hint, not the proto, picks the encoding (as in TFF).
        if array_shape.is_shape_scalar(type_hint.shape):
            scalar = read_scalar(proto.array)
            return (array.from_proto(proto.array) if scalar is None else scalar), type_hint
        return array.from_proto_content(proto.array), type_hint
    if which == "struct" and isinstance(type_hint, computation_types.StructType):
        values: list[tuple[str | None, object]] = []
        keys: list[tuple[str | None, object]] = []
        # zip: TFF reads as many elements as both the proto and the hint have.
        for element, element_type in zip(proto.struct.element, type_hint):
            name = element.name or None
            value, key = _read(element.value, element_type)
            values.append((name, value))
            keys.append((name, key))
        return struct_of(values), tuple(keys)
    if which == "federated" and isinstance(type_hint, computation_types.FederatedType):
        members = proto.federated.value
        if not members:
            return None  # TFF refuses it
        all_equal = type_hint.all_equal
        # All equal: TFF reads the first member only.
        read = [_read(m, type_hint.member) for m in (members[:1] if all_equal else members)]
        if any(key != read[0][1] for _, key in read[1:]):
            return None  # members of different types: TFF decides (it may refuse)
        uri = proto.federated.type.placement.value.uri
        placements.uri_to_placement_literal(uri)  # raises as TFF does on an unknown one
        values_read = [value for value, _ in read]
        key = ("federated", read[0][1], uri, all_equal)
        return (values_read[0] if all_equal else values_read), key
    return None


def _encode(value: object, type_spec: computation_types.Type) -> Pieces | None:
    """The `Value`'s wire pieces, or None when no large dense leaf is inside
    (`serialize_value` builds the whole proto then)."""
    if isinstance(type_spec, computation_types.TensorType):
        return _tensor(value, type_spec)
    if isinstance(type_spec, computation_types.StructType):
        return _struct(value, type_spec)
    if isinstance(type_spec, computation_types.FederatedType):
        return _federated(value, type_spec)
    return None


def _tensor(value: object, type_spec: computation_types.TensorType) -> Pieces | None:
    if not isinstance(value, np.ndarray) or value.nbytes < DIRECT_BYTES:
        return None
    # Exactly TFF's content: native byte order, the declared dtype, C order.
    if value.dtype != np.dtype(type_spec.dtype.type) or value.dtype.kind not in "biufc":
        return None
    if array_shape.is_shape_scalar(type_spec.shape):
        return None
    if not type_spec.is_assignable_from(computation_types.TensorType(value.dtype, value.shape)):
        return None
    header = array_pb2.Array(
        dtype=dtype_utils.to_proto(value.dtype.type), shape=array_shape.to_proto(value.shape)
    ).SerializeToString()
    content = memoryview(np.ascontiguousarray(value)).cast("B")
    return _field(_VALUE_ARRAY, [header, *_field(_ARRAY_CONTENT, [content])])


def _struct(value: object, type_spec: computation_types.StructType) -> Pieces | None:
    try:
        elements = structure.iter_elements(structure.from_container(value))
    except TypeError:
        return None
    values = [v for _, v in elements]
    if len(values) != len(type_spec):
        return None
    encoded = [_encode(v, t) for v, (_, t) in zip(values, structure.iter_elements(type_spec))]
    if all(e is None for e in encoded):
        return None
    body: Pieces = []
    for (name, element_type), element, pieces in zip(
        structure.iter_elements(type_spec), values, encoded
    ):
        if pieces is None:
            pieces = [_tff_bytes(element, element_type)]
        element_body = _field(_ELEMENT_NAME, [name.encode()]) if name else []
        body += _field(_STRUCT_ELEMENT, [*element_body, *_field(_ELEMENT_VALUE, pieces)])
    return _field(_VALUE_STRUCT, body)


def _federated(value: object, type_spec: computation_types.FederatedType) -> Pieces | None:
    members = [value] if type_spec.all_equal else value
    if not isinstance(members, list):
        return None
    encoded = [_encode(m, type_spec.member) for m in members]
    if all(e is None for e in encoded):
        return None
    federated_type = type_serialization.serialize_type(type_spec).federated
    body = _field(_FEDERATED_TYPE, [federated_type.SerializeToString()])
    for member, pieces in zip(members, encoded):
        if pieces is None:
            proto, member_type = serialize_value(member, type_spec.member)
            type_spec.member.check_assignable_from(member_type)  # as TFF checks its members
            pieces = [proto.SerializeToString()]
        body += _field(_FEDERATED_VALUE, pieces)
    return _field(_VALUE_FEDERATED, body)


def _tff_bytes(value: object, type_spec: computation_types.Type) -> bytes:
    proto, _ = serialize_value(value, type_spec)
    return proto.SerializeToString()


def _field(number: int, pieces: Pieces) -> Pieces:
    """A length-delimited protobuf field holding `pieces` back to back."""
    size = sum(len(p) for p in pieces)
    return [_varint(number << 3 | 2) + _varint(size), *pieces]


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
