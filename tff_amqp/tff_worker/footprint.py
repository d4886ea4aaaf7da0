"""How many bytes a worker value will take when computed, known before it runs.

A silo releases members of a phase plan's result. Selecting each member and
computing it costs a worker call per member on top of the `Compute`; when the
whole result is small, computing all of it in one call and cutting the
released members out of the answer is cheaper, and the kept members never
leave the silo process (they are dropped at once). Whether a result is small
is decided from TFF types (a function's result type, the number of clients)
and the sizes of the values the coordinator sent, never by running anything.

A footprint is an `int` (bytes of a value whose members are not selected
separately), a tuple (a struct's members' footprints) or None: unknown or
unbounded (sequences, strings, unknown dimensions, functions, client data).
"""

from __future__ import annotations

import math
from typing import Any

Footprint = int | tuple["Footprint", ...] | None

# Bytes per element by TFF `DataType` name; strings have no fixed size.
_ELEMENT_BYTES = {
    "DT_BOOL": 1,
    "DT_INT8": 1,
    "DT_UINT8": 1,
    "DT_INT16": 2,
    "DT_UINT16": 2,
    "DT_HALF": 2,
    "DT_BFLOAT16": 2,
    "DT_INT32": 4,
    "DT_UINT32": 4,
    "DT_FLOAT": 4,
    "DT_INT64": 8,
    "DT_UINT64": 8,
    "DT_DOUBLE": 8,
    "DT_COMPLEX64": 8,
    "DT_COMPLEX128": 16,
}
# Framing of one serialized tensor (dtype, shape, field headers), roughly.
_TENSOR_OVERHEAD = 16
_CLIENTS_URI = "clients"


def of_type(type_: Any, clients: int) -> Footprint:
    """The footprint of a value of TFF type `type_` (a `computation_pb2.Type`)
    at a silo holding `clients` clients."""
    kind = type_.WhichOneof("type")
    if kind == "tensor":
        return _tensor_bytes(type_.tensor)
    if kind == "struct":
        return tuple(of_type(element.value, clients) for element in type_.struct.element)
    if kind == "federated":
        member = total(of_type(type_.federated.member, clients))
        if member is None:
            return None
        placement = type_.federated.placement.value.uri
        if placement == _CLIENTS_URI and not type_.federated.all_equal:
            return member * clients
        return member
    return None  # function, sequence, abstract, placement


def of_value(value: Any) -> Footprint:
    """The footprint of a value the silo was sent (an `executor_pb2.Value`):
    its serialized size, member by member for a struct."""
    if value.WhichOneof("value") == "struct":
        return tuple(of_value(element.value) for element in value.struct.element)
    return value.ByteSize()


def member(footprint: Footprint, index: int) -> Footprint:
    """The footprint of member `index` of a struct's footprint."""
    if isinstance(footprint, tuple) and 0 <= index < len(footprint):
        return footprint[index]
    return None


def total(footprint: Footprint) -> int | None:
    """Bytes of the whole value, or None if unknown."""
    if footprint is None or isinstance(footprint, int):
        return footprint
    sizes = [total(element) for element in footprint]
    if any(size is None for size in sizes):
        return None
    return sum(sizes)  # type: ignore[arg-type]


def _tensor_bytes(tensor: Any) -> int | None:
    from tensorflow_federated.proto.v0 import data_type_pb2

    if tensor.unknown_rank or any(dim < 0 for dim in tensor.dims):
        return None
    element = _ELEMENT_BYTES.get(data_type_pb2.DataType.Name(tensor.dtype))
    if element is None:
        return None
    return element * math.prod(tensor.dims) + _TENSOR_OVERHEAD
