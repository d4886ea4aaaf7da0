"""Arguments with large tensors serialized straight into a TFF `Value`'s bytes.

TFF's `serialize_value` copies a tensor's content four times on the way (its
`tobytes`, the `Array` proto, the `Value` wrapping it, the serialization), so
a 256 MiB model briefly cost the coordinator ~1.25 GiB. Here a dense NumPy
leaf of at least `DIRECT_BYTES` is written once, from the array's own buffer,
in protobuf's encoding of the same messages; the small parts (dtype, shape, a
federated type) are serialized by protobuf itself, and a value without such a
leaf, or of any other kind (sequences, computations), goes through TFF's
serializer unchanged. The result parses to the proto TFF would build (tested).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tensorflow_federated.proto.v0 import array_pb2, executor_pb2
from tensorflow_federated.python.common_libs import structure
from tensorflow_federated.python.core.impl.executors import value_serialization
from tensorflow_federated.python.core.impl.types import (
    array_shape,
    computation_types,
    dtype_utils,
    type_serialization,
)

# Smaller tensors are not worth a second code path: TFF's copies of them are cheap.
DIRECT_BYTES = 1 << 20

Pieces = list[bytes | memoryview]


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
        proto, serialized_type = value_serialization.serialize_value(value, type_spec)
        return proto.SerializeToString(), serialized_type
    return b"".join(pieces), type_spec


def _encode(value: object, type_spec: computation_types.Type) -> Pieces | None:
    """The `Value`'s wire pieces, or None when no large dense leaf is inside
    (TFF serializes the whole value then, with its own checks and errors)."""
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
        body += _field(_FEDERATED_VALUE, pieces or [_tff_bytes(member, type_spec.member)])
    return _field(_VALUE_FEDERATED, body)


def _tff_bytes(value: object, type_spec: computation_types.Type) -> bytes:
    proto, _ = value_serialization.serialize_value(value, type_spec)
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
