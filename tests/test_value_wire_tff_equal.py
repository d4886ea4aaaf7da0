"""Small values serialized and deserialized by value_wire (without TFF's
tracing) give exactly what TFF's own `serialize_value` / `deserialize_value`
give: the same bytes, the same Python values (types included), the same
errors."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import pytest
import tensorflow_federated as tff
from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.common_libs import structure
from tensorflow_federated.python.core.impl.executors import value_serialization

from tff_amqp.inprocess import value_wire

Point = collections.namedtuple("Point", ["x", "y"])

NUMERIC_DTYPES = [
    np.bool_,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.complex64,
    np.complex128,
]


def _scalar_cases() -> dict[str, tuple[object, Any]]:
    cases: dict[str, tuple[object, Any]] = {}
    for dtype in NUMERIC_DTYPES:
        name = np.dtype(dtype).name
        one = dtype(1)
        cases[f"{name} scalar"] = (one, tff.TensorType(dtype))
        cases[f"{name} 0-d array"] = (np.array(one), tff.TensorType(dtype))
        cases[f"{name} [3]"] = (np.arange(3).astype(dtype), tff.TensorType(dtype, [3]))
        cases[f"{name} [2, 3]"] = (
            np.arange(6).astype(dtype).reshape(2, 3),
            tff.TensorType(dtype, [2, 3]),
        )
        cases[f"{name} [None, 3]"] = (
            np.arange(6).astype(dtype).reshape(2, 3),
            tff.TensorType(dtype, [None, 3]),
        )
        cases[f"{name} [0]"] = (np.zeros([0], dtype), tff.TensorType(dtype, [0]))
    return cases


VALID: dict[str, tuple[object, Any]] = {
    **_scalar_cases(),
    "python float as float32": (1.1, tff.TensorType(np.float32)),
    "python float as float64": (1.1, tff.TensorType(np.float64)),
    "python float as float16": (0.1, tff.TensorType(np.float16)),
    "python int as int32": (-7, tff.TensorType(np.int32)),
    "python int as int64": (2**40, tff.TensorType(np.int64)),
    "python int as uint8": (200, tff.TensorType(np.uint8)),
    "python float rounded to float32": (0.1, tff.TensorType(np.float32)),
    "python float inf as float64": (float("-inf"), tff.TensorType(np.float64)),
    "python int at int32's bounds": (-(2**31), tff.TensorType(np.int32)),
    "python int at int64's bounds": (2**63 - 1, tff.TensorType(np.int64)),
    "python bool": (True, tff.TensorType(np.bool_)),
    "python complex": (1 + 2j, tff.TensorType(np.complex64)),
    "float32 scalar widened to float64": (np.float32(0.1), tff.TensorType(np.float64)),
    "int8 array widened to int32": (np.arange(4, dtype=np.int8), tff.TensorType(np.int32, [4])),
    "float32 as unknown rank": (np.ones([2, 2], np.float32), tff.TensorType(np.float32, None)),
    "non-contiguous array": (
        np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2],
        tff.TensorType(np.float32, [3, 2]),
    ),
    "big-endian array": (np.arange(3, dtype=">f4"), tff.TensorType(np.float32, [3])),
    "nan and inf": (
        np.array([np.nan, np.inf, -0.0], np.float64),
        tff.TensorType(np.float64, [3]),
    ),
    "named struct (OrderedDict)": (
        collections.OrderedDict(a=1.0, b=np.int32(2), c=np.ones([2], np.float32)),
        tff.StructType(
            [("a", np.float32), ("b", np.int32), ("c", tff.TensorType(np.float32, [2]))]
        ),
    ),
    "named struct (dict)": (
        {"b": 2, "a": 1.5},
        tff.StructType([("b", np.int32), ("a", np.float32)]),
    ),
    "unnamed struct (list)": ([1.0, 2], tff.StructType([np.float32, np.int64])),
    "unnamed struct (tuple)": ((True, 3.0), tff.StructType([np.bool_, np.float64])),
    "namedtuple": (Point(1.0, 2.0), tff.StructType([("x", np.float32), ("y", np.float32)])),
    "partly named Struct": (
        structure.Struct([("a", 1.0), (None, np.int32(4))]),
        tff.StructType([("a", np.float32), np.int32]),
    ),
    "nested struct": (
        collections.OrderedDict(
            w=[np.ones([2, 2], np.float32), np.zeros([2], np.float32)],
            s=collections.OrderedDict(n=np.int64(3), e=()),
        ),
        tff.StructType(
            [
                (
                    "w",
                    tff.StructType(
                        [tff.TensorType(np.float32, [2, 2]), tff.TensorType(np.float32, [2])]
                    ),
                ),
                ("s", tff.StructType([("n", np.int64), ("e", tff.StructType([]))])),
            ]
        ),
    ),
    "empty struct": ([], tff.StructType([])),
    "server value (all equal)": (1.5, tff.FederatedType(np.float32, tff.SERVER)),
    "clients, all equal": (np.float32(2.0), tff.FederatedType(np.float32, tff.CLIENTS, True)),
    "clients values": ([float(i) for i in range(9)], tff.FederatedType(np.float32, tff.CLIENTS)),
    "no clients": ([], tff.FederatedType(np.float32, tff.CLIENTS)),
    "clients structs": (
        [collections.OrderedDict(a=float(i), b=[i, i + 1]) for i in range(3)],
        tff.FederatedType(
            tff.StructType([("a", np.float32), ("b", tff.StructType([np.int32, np.int32]))]),
            tff.CLIENTS,
        ),
    ),
    "server empty struct": ((), tff.FederatedType(tff.StructType([]), tff.SERVER)),
    "struct of federated values": (
        [[1.0, 2.0], np.int32(5)],
        tff.StructType(
            [tff.FederatedType(np.float32, tff.CLIENTS), tff.FederatedType(np.int32, tff.SERVER)]
        ),
    ),
    # Left to TFF: strings and Python lists as tensors.
    "string scalar (TFF's path)": ("abc", tff.TensorType(np.str_)),
    "bytes array (TFF's path)": (np.array([b"a", b"bc"], object), tff.TensorType(np.str_, [2])),
    "list as a tensor (TFF's path)": ([1.0, 2.0], tff.TensorType(np.float32, [2])),
    "struct with a string (TFF's path for it)": (
        collections.OrderedDict(s="x", f=1.0),
        tff.StructType([("s", np.str_), ("f", np.float32)]),
    ),
}


@pytest.mark.parametrize("case", VALID, ids=list(VALID))
def test_serialization_equals_tffs(case: str) -> None:
    value, type_spec = VALID[case]
    tff_proto, tff_type = value_serialization.serialize_value(value, type_spec)
    proto, proto_type = value_wire.serialize_value(value, type_spec)
    assert proto == tff_proto
    assert proto.SerializeToString() == tff_proto.SerializeToString()
    assert proto_type == tff_type
    data, data_type = value_wire.serialize(value, type_spec)
    assert data == tff_proto.SerializeToString()
    assert data_type == tff_type


def _assert_same(ours: object, tffs: object) -> None:
    """Equal values of exactly the same Python (and NumPy) types."""
    assert type(ours) is type(tffs), (ours, tffs)
    if isinstance(tffs, structure.Struct):
        assert structure.name_list_with_nones(ours) == structure.name_list_with_nones(tffs)  # type: ignore[arg-type]
        for a, b in zip(structure.flatten(ours), structure.flatten(tffs)):
            _assert_same(a, b)
        assert len(ours) == len(tffs)  # type: ignore[arg-type]
        for a, b in zip(ours, tffs):  # type: ignore[call-overload]
            _assert_same(a, b)
    elif isinstance(tffs, list):
        assert len(ours) == len(tffs)  # type: ignore[arg-type]
        for a, b in zip(ours, tffs):  # type: ignore[call-overload]
            _assert_same(a, b)
    elif isinstance(tffs, np.ndarray | np.generic):
        assert ours.dtype == tffs.dtype  # type: ignore[union-attr]
        assert np.shape(ours) == np.shape(tffs)
        np.testing.assert_array_equal(ours, tffs)  # type: ignore[arg-type]
    else:
        assert ours == tffs


# Hints other than the serialized type that TFF accepts.
OTHER_HINTS: dict[str, tuple[str, Any]] = {
    "less specific shape": ("float32 [2, 3]", tff.TensorType(np.float32, [None, None])),
    "scalar hint on content": ("float32 [3]", tff.TensorType(np.float32)),
    "shaped hint on a scalar": ("float32 scalar", tff.TensorType(np.float32, [1])),
    "fewer struct elements": ("unnamed struct (list)", tff.StructType([np.float32])),
    "more struct elements": (
        "unnamed struct (list)",
        tff.StructType([np.float32, np.int64, np.int64]),
    ),
    "clients read as all equal": (
        "clients values",
        tff.FederatedType(np.float32, tff.CLIENTS, all_equal=True),
    ),
}


def _deserialization_cases() -> dict[str, tuple[executor_pb2.Value, Any]]:
    cases = {}
    for name, (value, type_spec) in VALID.items():
        proto, _ = value_serialization.serialize_value(value, type_spec)
        cases[name] = (proto, type_spec)
    for name, (source, hint) in OTHER_HINTS.items():
        cases[name] = (cases[source][0], hint)
    return cases


DESERIALIZE = _deserialization_cases()


def _outcome(fn: Any, *args: Any) -> tuple[str, object]:
    try:
        return "value", fn(*args)
    except Exception as e:  # whatever TFF raises, ours must be the same
        return "error", (type(e), str(e))


def _assert_deserializes_as_tff(proto: executor_pb2.Value, hint: Any) -> None:
    """Ours returns what TFF returns, or raises what TFF raises."""
    tff_kind, tffs = _outcome(lambda: value_serialization.deserialize_value(proto, hint)[0])
    kind, ours = _outcome(value_wire.deserialize, proto, hint)
    assert kind == tff_kind, (ours, tffs)
    if kind == "error":
        assert ours == tffs
    else:
        _assert_same(ours, tffs)


@pytest.mark.parametrize("case", DESERIALIZE, ids=list(DESERIALIZE))
def test_deserialization_equals_tffs(case: str) -> None:
    _assert_deserializes_as_tff(*DESERIALIZE[case])


def _federated(member_protos: list[executor_pb2.Value], uri: str) -> executor_pb2.Value:
    proto = executor_pb2.Value()
    proto.federated.type.placement.value.uri = uri
    for member in member_protos:
        proto.federated.value.add().CopyFrom(member)
    return proto


def _ser(value: object, type_spec: Any) -> executor_pb2.Value:
    return value_serialization.serialize_value(value, type_spec)[0]


STRUCT_AB = tff.StructType([("a", np.float32), ("b", np.float32)])
MALFORMED: dict[str, tuple[executor_pb2.Value, Any]] = {
    # Members whose names differ: TFF finds their types incompatible.
    "members of different struct names": (
        _federated(
            [
                _ser([1.0, 2.0], STRUCT_AB),
                _ser([1.0, 2.0], tff.StructType([("a", np.float32), ("c", np.float32)])),
            ],
            tff.CLIENTS.uri,
        ),
        tff.FederatedType(STRUCT_AB, tff.CLIENTS),
    ),
    "members of different lengths": (
        _federated(
            [_ser([1.0, 2.0], STRUCT_AB), _ser([1.0], tff.StructType([("a", np.float32)]))],
            tff.CLIENTS.uri,
        ),
        tff.FederatedType(STRUCT_AB, tff.CLIENTS),
    ),
    "unknown placement": (
        _federated([_ser(1.0, tff.TensorType(np.float32))], "nowhere"),
        tff.FederatedType(np.float32, tff.CLIENTS),
    ),
    "federated without members": (
        _federated([], tff.CLIENTS.uri),
        tff.FederatedType(np.float32, tff.CLIENTS),
    ),
    "array with a struct hint": (_ser(1.0, tff.TensorType(np.float32)), STRUCT_AB),
    "struct with a tensor hint": (_ser([1.0, 2.0], STRUCT_AB), tff.TensorType(np.float32)),
    "federated with a tensor hint": (
        _ser(1.0, tff.FederatedType(np.float32, tff.SERVER)),
        tff.TensorType(np.float32),
    ),
    "no hint": (_ser([1.0, 2.0], STRUCT_AB), None),
    "empty Value": (executor_pb2.Value(), tff.TensorType(np.float32)),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_unusual_protos_as_tff(case: str) -> None:
    _assert_deserializes_as_tff(*MALFORMED[case])


REFUSED: dict[str, tuple[object, Any]] = {
    "wrong shape": (np.ones([3], np.float32), tff.TensorType(np.float32, [4])),
    "array for a scalar": (np.ones([1], np.float32), tff.TensorType(np.float32)),
    "narrowing dtype": (np.float64(1.0), tff.TensorType(np.float32)),
    "int as float": (1, tff.TensorType(np.float32)),
    "float as int": (1.5, tff.TensorType(np.int32)),
    "int out of range": (2**40, tff.TensorType(np.int32)),
    "int just past int32": (2**31, tff.TensorType(np.int32)),
    "int out of int64's range": (2**70, tff.TensorType(np.int64)),
    "float out of float32's range": (1e300, tff.TensorType(np.float32)),
    "python bool as int32": (True, tff.TensorType(np.int32)),
    "python bool as float32": (False, tff.TensorType(np.float32)),
    "bool as int": (np.array([True]), tff.TensorType(np.int32, [1])),
    "None as a tensor": (None, tff.TensorType(np.float32)),
    "too few struct elements": ([1.0], STRUCT_AB),
    "too many struct elements": ([1.0, 2.0, 3.0], STRUCT_AB),
    "scalar for a struct": (1.0, STRUCT_AB),
    "tuple for clients values": ((1.0, 2.0), tff.FederatedType(np.float32, tff.CLIENTS)),
    "bad clients member": ([1.0, "x"], tff.FederatedType(np.float32, tff.CLIENTS)),
    "no type": (1.0, None),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_refused_as_tff_refuses(case: str) -> None:
    value, type_spec = REFUSED[case]
    with pytest.raises(Exception) as tffs:
        value_serialization.serialize_value(value, type_spec)
    with pytest.raises(type(tffs.value)) as ours:
        value_wire.serialize_value(value, type_spec)
    assert str(ours.value) == str(tffs.value)


FAST = [
    "float32 scalar",
    "python float as float32",
    "int64 [2, 3]",
    "complex128 [None, 3]",
    "nested struct",
    "empty struct",
    "clients values",
    "clients structs",
    "struct of federated values",
]


@pytest.mark.parametrize("case", FAST)
def test_common_values_avoid_tffs_traced_functions(case: str, monkeypatch) -> None:
    value, type_spec = VALID[case]
    expected = value_serialization.serialize_value(value, type_spec)[0]

    def traced(*args: object, **kwargs: object) -> None:
        raise AssertionError("TFF's traced function was called")

    monkeypatch.setattr(value_serialization, "serialize_value", traced)
    monkeypatch.setattr(value_serialization, "deserialize_value", traced)
    assert value_wire.serialize_value(value, type_spec)[0] == expected
    value_wire.deserialize(expected, type_spec)


@pytest.mark.parametrize(
    "value, type_spec",
    [
        (1.5, tff.TensorType(np.float32)),
        (-3, tff.TensorType(np.int64)),
        (float("nan"), tff.TensorType(np.float32)),  # bytes: NaN is unequal to itself
        ([float(i) for i in range(9)], tff.FederatedType(np.float32, tff.CLIENTS)),
    ],
)
def test_python_scalars_are_written_directly(value, type_spec, monkeypatch) -> None:
    # Arguments such as `[1.0, 2.5]` skip TFF's array conversion (its checks
    # and a NumPy array per scalar) and still give TFF's bytes.
    expected = value_serialization.serialize_value(value, type_spec)[0].SerializeToString()

    def converted(*args: object, **kwargs: object) -> None:
        raise AssertionError("TFF's array conversion was called")

    monkeypatch.setattr(value_wire.array, "to_proto", converted)
    assert value_wire.serialize(value, type_spec)[0] == expected
