"""Phase plans evaluated in this process, without the TFF worker.

A silo's phase plan (tff_worker/plan.py) is a graph of calls to the
coordinator's functions: federated intrinsics over the silo's clients and
TensorFlow computations. When every function of a plan is one this module
runs (the intrinsics below, element-wise TensorFlow computations and
constants from `numpy_ops`, identity lambdas), the plan is evaluated here
over NumPy values: a CLIENTS value is the list of its clients' values, in
client order, as the worker holds them; an aggregation folds its clients'
values in that order, exactly as the worker does (`accumulate` from `zero`,
then `report`). A federated mean then costs a silo no worker call at all.

Only what the plan releases is serialized (the aggregates the coordinator
receives); every other value it made stays available as the plan's result
on the worker, computed there only if a later batch needs it there.
Anything outside this (a sequence, a string, an op `numpy_ops` does not run,
another intrinsic) makes `compile_plan` return None, or `evaluate` raise
`Unsupported`, and the plan runs on the worker as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tensorflow_federated.python.common_libs import structure
from tensorflow_federated.python.core.impl.compiler import array, building_blocks, intrinsic_defs
from tensorflow_federated.python.core.impl.types import (
    array_shape,
    computation_types,
    dtype_utils,
    placements,
)

from tff_amqp.inprocess import numpy_ops, value_wire
from tff_amqp.inprocess.structs import struct_of, unnamed

log = logging.getLogger(__name__)


class Unsupported(Exception):
    """The plan (or one of its values) is not one this module evaluates."""


@dataclass(frozen=True)
class Clients:
    """A CLIENTS-placed value: one member per client of the silo, in order."""

    members: tuple[Any, ...]


@dataclass(frozen=True)
class Server:
    """A SERVER-placed value (at a silo: an aggregate over its clients)."""

    value: Any


# A function of the plan: (argument, number of clients) -> result.
_Function = Callable[[Any, int], Any]


def _clients(value: Any) -> Clients:
    if not isinstance(value, Clients):
        raise Unsupported("expected a CLIENTS value")
    return value


def _server(value: Any) -> Server:
    if not isinstance(value, Server):
        raise Unsupported("expected a SERVER value")
    return value


def _call(fn: Any, arg: Any, clients: int) -> Any:
    if not callable(fn):
        raise Unsupported("called a value that is not a function")
    return fn(arg, clients)


def _elements(arg: Any, count: int) -> list[Any]:
    if not isinstance(arg, structure.Struct) or len(arg) != count:
        raise Unsupported(f"expected a struct of {count}")
    return [arg[i] for i in range(count)]


def _federated_map(arg: Any, clients: int) -> Clients:
    fn, value = _elements(arg, 2)
    return Clients(tuple(_call(fn, member, clients) for member in _clients(value).members))


def _federated_apply(arg: Any, clients: int) -> Server:
    fn, value = _elements(arg, 2)
    return Server(_call(fn, _server(value).value, clients))


def _federated_value_at_clients(arg: Any, clients: int) -> Clients:
    return Clients((arg,) * clients)


def _federated_value_at_server(arg: Any, clients: int) -> Server:
    return Server(arg)


def _federated_broadcast(arg: Any, clients: int) -> Clients:
    return Clients((_server(arg).value,) * clients)


def _zip(arg: Any) -> tuple[list[str | None], list[Any]]:
    if not isinstance(arg, structure.Struct):
        raise Unsupported("zip of a value that is not a struct")
    elements = structure.to_elements(arg)
    return [name for name, _ in elements], [value for _, value in elements]


def _federated_zip_at_clients(arg: Any, clients: int) -> Clients:
    names, values = _zip(arg)
    columns = [_clients(v).members for v in values]
    if any(len(column) != clients for column in columns):
        raise Unsupported("CLIENTS values of different sizes")
    return Clients(
        tuple(
            struct_of([(name, column[i]) for name, column in zip(names, columns)])
            for i in range(clients)
        )
    )


def _federated_zip_at_server(arg: Any, clients: int) -> Server:
    names, values = _zip(arg)
    return Server(struct_of([(n, _server(v).value) for n, v in zip(names, values)]))


def _federated_aggregate(arg: Any, clients: int) -> Server:
    # The worker's order: accumulate each client's value into `zero`, in
    # client order, then `report` (merge is the coordinator's, across silos).
    value, zero, accumulate, _merge, report = _elements(arg, 5)
    total = zero
    for member in _clients(value).members:
        total = _call(accumulate, unnamed(total, member), clients)
    return Server(_call(report, total, clients))


_INTRINSICS: dict[str, _Function] = {
    intrinsic_defs.FEDERATED_MAP.uri: _federated_map,
    intrinsic_defs.FEDERATED_MAP_ALL_EQUAL.uri: _federated_map,
    intrinsic_defs.FEDERATED_APPLY.uri: _federated_apply,
    intrinsic_defs.FEDERATED_VALUE_AT_CLIENTS.uri: _federated_value_at_clients,
    intrinsic_defs.FEDERATED_VALUE_AT_SERVER.uri: _federated_value_at_server,
    intrinsic_defs.FEDERATED_BROADCAST.uri: _federated_broadcast,
    intrinsic_defs.FEDERATED_ZIP_AT_CLIENTS.uri: _federated_zip_at_clients,
    intrinsic_defs.FEDERATED_ZIP_AT_SERVER.uri: _federated_zip_at_server,
    intrinsic_defs.FEDERATED_AGGREGATE.uri: _federated_aggregate,
}


def _function(computation: Any) -> tuple[_Function, computation_types.Type] | None:
    """A plan's function (a `Computation` proto) as a host function and its
    type, or None if this module does not run it."""
    try:
        bb = building_blocks.ComputationBuildingBlock.from_proto(computation)
    except Exception as e:  # untyped or unknown: not ours to run
        log.debug("inprocess.plan_function_unread", extra={"reason": str(e)})
        return None
    fn_type = bb.type_signature
    if not isinstance(fn_type, computation_types.FunctionType):
        return None
    if isinstance(bb, building_blocks.Intrinsic):
        intrinsic = _INTRINSICS.get(bb.uri)
        return None if intrinsic is None else (intrinsic, fn_type)
    if fn_type.parameter is None:
        known, constant = numpy_ops.constant_value(bb)
        if not known:
            return None
        return (lambda _arg, _clients: constant), fn_type
    host = numpy_ops.host_function(bb)
    if host is None:
        return None
    return (lambda arg, _clients: _tensors(host, arg)), fn_type


def _tensors(host: numpy_ops.HostFn, arg: Any) -> Any:
    # A TensorFlow computation takes unplaced tensors (and structs of them).
    if isinstance(arg, Clients | Server):
        raise Unsupported("a TensorFlow computation called on a federated value")
    try:
        return host(arg)
    except (ValueError, TypeError) as e:
        raise Unsupported(f"arguments a TensorFlow computation does not take: {e}") from e


@dataclass(frozen=True)
class HostPlan:
    """A plan's graph over host functions. `evaluate` returns the values of
    the plan's result members and the serialized values it releases."""

    steps: tuple[tuple[Any, ...], ...]
    result: tuple[int, ...]
    released: tuple[int, ...]
    released_types: tuple[computation_types.Type, ...]

    def evaluate(self, inputs: Sequence[Any], clients: int) -> tuple[list[Any], list[bytes]]:
        values: list[Any] = []
        with np.errstate(all="ignore"):  # TF's results (inf, nan), no warnings
            for step in self.steps:
                match step:
                    case ("fn", fn):
                        values.append(fn)
                    case ("in", position, member):
                        value = inputs[position]
                        values.append(value if member is None else _member(value, member))
                    case ("call", fn, arg):
                        argument = None if arg is None else values[arg]
                        values.append(_call(values[fn], argument, clients))
                    case ("struct", elements):
                        members = [(name or None, values[c]) for name, c in elements]
                        values.append(struct_of(members))
                    case ("select", source, index):
                        values.append(_member(values[source], index))
        released = [
            _serialize(values[position], type_spec)
            for position, type_spec in zip(self.released, self.released_types, strict=True)
        ]
        return [values[position] for position in self.result], released


def _member(value: Any, index: int) -> Any:
    if isinstance(value, structure.Struct | list | tuple):
        return value[index]
    raise Unsupported("selection from a value that is not a struct")


def _serialize(value: Any, type_spec: computation_types.Type) -> bytes:
    """A released value as the worker's `Compute` would give it: a SERVER
    value (an aggregate) or an unplaced one, never a client's own value."""
    if isinstance(type_spec, computation_types.FederatedType):
        if type_spec.placement is not placements.SERVER or not type_spec.all_equal:
            raise Unsupported("releases a value that is not at the silo's SERVER")
        value = _server(value).value
    elif isinstance(value, Clients | Server):
        raise Unsupported("a placed value where an unplaced one was expected")
    serialized, _ = value_wire.serialize(value, type_spec)
    return serialized


def compile_plan(nodes: Sequence[tuple[Any, ...]], computation_of: Any) -> HostPlan | None:
    """The plan `nodes` (tff_worker/plan.py's canonical nodes, the last one
    ("result", members, released)) as a `HostPlan`, or None if one of its
    functions is not run here or a released value's type is not known."""
    steps: list[tuple[Any, ...]] = []
    types: dict[int, computation_types.Type] = {}  # node -> its function's type
    for position, node in enumerate(nodes[:-1]):
        match node:
            case ("fn", digest):
                function = _function(computation_of(digest))
                if function is None:
                    return None
                steps.append(("fn", function[0]))
                types[position] = function[1]
            case ("in", _, _) | ("struct", _) | ("select", _, _):
                steps.append(node)
            case ("call", fn, _):
                steps.append(node)
                fn_type = types.get(fn)
                if isinstance(fn_type, computation_types.FunctionType):
                    types[position] = fn_type.result
            case _:
                return None
    _, result, released = nodes[-1]
    released_types = []
    for position in released:
        type_spec = types.get(position)
        if type_spec is None or isinstance(type_spec, computation_types.FunctionType):
            return None  # released values are aggregates: results of calls
        released_types.append(type_spec)
    return HostPlan(tuple(steps), tuple(result), tuple(released), tuple(released_types))


def read_value(value: Any, clients: int) -> Any:
    """A parsed TFF `Value` proto as a host value (CLIENTS values as
    `Clients`, SERVER values as `Server`), read as TFF's `deserialize_value`
    reads it (the same building blocks, without its per-node tracing), or
    raise `Unsupported`."""
    if not _plain(value):
        raise Unsupported("not tensors (nor structs or federated values of them)")
    try:
        host, _ = _read(value)
    except Unsupported:
        raise
    except Exception as e:
        raise Unsupported(f"not a value read here: {e}") from e
    if isinstance(host, _Federated):
        if host.placement == placements.CLIENTS.uri:
            members = host.members * clients if host.all_equal else host.members
            if len(members) != clients:
                raise Unsupported("a CLIENTS value of another size than the cohort")
            return Clients(members)
        if host.placement == placements.SERVER.uri and len(host.members) == 1:
            return Server(host.members[0])
        raise Unsupported(f"a value placed at {host.placement}")
    return host


@dataclass(frozen=True)
class _Federated:
    placement: str
    all_equal: bool
    members: tuple[Any, ...]


def _read(value: Any) -> tuple[Any, Any]:
    """(host value, a key equal for values of equal types)."""
    which = value.WhichOneof("value")
    if which == "array":
        scalar = value_wire.read_scalar(value.array)
        if scalar is not None:
            return scalar, (scalar.dtype, ())
        dtype = np.dtype(dtype_utils.from_proto(value.array.dtype))
        if dtype.kind not in "iuf":
            raise Unsupported(f"a tensor of {dtype}")
        shape = array_shape.from_proto(value.array.shape)
        # TFF's two encodings: repeated fields for scalars, raw content else.
        if array_shape.is_shape_scalar(shape):
            return array.from_proto(value.array), (dtype, shape)
        return array.from_proto_content(value.array), (dtype, shape)
    if which == "struct":
        elements = []
        keys = []
        for element in value.struct.element:
            member, key = _read(element.value)
            if isinstance(member, _Federated):
                raise Unsupported("a federated value inside a struct")
            elements.append((element.name or None, member))
            keys.append((element.name, key))
        return struct_of(elements), tuple(keys)
    if which == "federated":
        federated = value.federated
        all_equal = federated.type.all_equal
        items = federated.value[:1] if all_equal else federated.value
        if all_equal and not items:
            raise Unsupported("an all-equal value without its member")
        read = [_read(item) for item in items]
        if any(key != read[0][1] for _, key in read[1:]):
            raise Unsupported("members of different types")
        uri = federated.type.placement.value.uri
        key = ("federated", uri, all_equal, read[0][1] if read else None)
        return _Federated(uri, all_equal, tuple(member for member, _ in read)), key
    raise Unsupported(f"a {which} value")


def _plain(value: Any) -> bool:
    """Whether a `Value` proto holds only tensors (looked at before reading
    it: a dataset is not worth deserializing to find that out)."""
    which = value.WhichOneof("value")
    if which == "array":
        return True
    if which == "struct":
        return all(_plain(element.value) for element in value.struct.element)
    if which == "federated":
        return all(_plain(member) for member in value.federated.value)
    return False
