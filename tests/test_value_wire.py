"""Large arguments serialized straight into a `Value`'s bytes parse to exactly
what TFF's own serializer builds, and what TFF refuses is still refused."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow_federated as tff
from tensorflow_federated.python.core.impl.executors import value_serialization

from tff_amqp.coordinator.stateful import value_wire

BIG = np.linspace(-1.0, 1.0, 300_000, dtype=np.float32).reshape(1000, 300)
BIG_T = tff.TensorType(np.float32, [1000, 300])

CASES = {
    "tensor": (BIG, BIG_T),
    "tensor, unknown dimension": (BIG, tff.TensorType(np.float32, [None, 300])),
    "server model": (BIG, tff.FederatedType(BIG_T, tff.SERVER)),
    "nested struct, small leaves among large": (
        collections.OrderedDict(a=BIG, b=np.float32(2.0), c=[np.int32(3), BIG.astype(np.float64)]),
        tff.StructType(
            [
                ("a", BIG_T),
                ("b", np.float32),
                ("c", tff.StructType([np.int32, tff.TensorType(np.float64, [1000, 300])])),
            ]
        ),
    ),
    "client list": ([BIG, BIG * 2], tff.FederatedType(BIG_T, tff.CLIENTS)),
    "big-endian array (TFF converts it)": (BIG.astype(">f4"), BIG_T),
    "small value (TFF's path)": (np.float32(1.5), tff.TensorType(np.float32)),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bytes_equal_tffs_serialization(case):
    value, type_spec = CASES[case]
    data, serialized_type = value_wire.serialize(value, type_spec)
    proto, tff_type = value_serialization.serialize_value(value, type_spec)
    assert data == proto.SerializeToString()
    assert serialized_type == tff_type


def test_large_tensor_is_written_directly():
    # The direct path is taken (not TFF's), so the coordinator copies it once.
    assert value_wire._encode(BIG, BIG_T) is not None
    assert value_wire._encode(BIG.astype(">f4"), BIG_T) is None


@pytest.mark.parametrize(
    "value, type_spec",
    [
        (BIG, tff.TensorType(np.float32, [300, 1000])),  # wrong shape
        (BIG, tff.TensorType(np.int32, [1000, 300])),  # a dtype it cannot take
        (BIG, tff.TensorType(np.float64, [1000, 300])),  # one TFF widens to
        ([BIG], tff.StructType([BIG_T, BIG_T])),  # too few elements
    ],
)
def test_what_tff_refuses_is_refused_and_the_rest_equal(value, type_spec):
    try:
        proto, _ = value_serialization.serialize_value(value, type_spec)
    except Exception as e:  # whatever TFF raises, ours must be the same
        with pytest.raises(type(e)) as ours:
            value_wire.serialize(value, type_spec)
        assert str(ours.value) == str(e)
    else:
        assert value_wire.serialize(value, type_spec)[0] == proto.SerializeToString()
