"""Footprints (tff_amqp/tff_worker/footprint.py): the bytes a worker value
takes, from TFF types and sent values, before anything runs."""

from __future__ import annotations

import numpy as np
import tensorflow_federated as tff
from tensorflow_federated.python.core.impl.executors import value_serialization
from tensorflow_federated.python.core.impl.types import type_serialization

from tff_amqp.tff_worker import footprint


def _type(spec: object):
    return type_serialization.serialize_type(tff.types.to_type(spec))


def test_tensors_structs_and_federated_values_have_their_sizes() -> None:
    overhead = footprint._TENSOR_OVERHEAD
    assert footprint.of_type(_type(tff.TensorType(np.float32, [3, 4])), 5) == 48 + overhead
    assert footprint.of_type(_type(tff.TensorType(np.int64)), 5) == 8 + overhead
    pair = footprint.of_type(_type([np.float32, tff.TensorType(np.float64, [2])]), 1)
    assert pair == (4 + overhead, 16 + overhead)
    assert footprint.total(pair) == 20 + 2 * overhead
    assert footprint.member(pair, 1) == 16 + overhead
    assert footprint.member(pair, 2) is None
    # Per client at CLIENTS, once if all equal or at SERVER.
    at_clients = _type(tff.FederatedType(np.float32, tff.CLIENTS))
    assert footprint.of_type(at_clients, 7) == 7 * (4 + overhead)
    assert footprint.of_type(at_clients, 0) == 0
    once = _type(tff.FederatedType(np.float32, tff.CLIENTS, all_equal=True))
    assert footprint.of_type(once, 7) == 4 + overhead
    assert footprint.of_type(_type(tff.FederatedType(np.float32, tff.SERVER)), 7) == 4 + overhead


def test_what_has_no_known_size_is_unknown() -> None:
    for unknown in (
        tff.TensorType(np.float32, [None, 3]),
        tff.TensorType(np.str_),
        tff.SequenceType(np.float32),
        tff.FunctionType(np.float32, np.float32),
        tff.FederatedType(tff.SequenceType(np.float32), tff.CLIENTS),
    ):
        assert footprint.of_type(_type(unknown), 3) is None, unknown
    # One unknown member makes the whole unknown, not the other members.
    mixed = footprint.of_type(_type([np.float32, tff.SequenceType(np.float32)]), 3)
    assert footprint.total(mixed) is None
    assert footprint.member(mixed, 0) == 4 + footprint._TENSOR_OVERHEAD
    assert footprint.total(None) is None


def test_a_sent_value_is_its_serialized_size_member_by_member() -> None:
    values = [np.arange(10, dtype=np.float32), np.float64(2.0)]
    value, _ = value_serialization.serialize_value(
        values, tff.types.to_type([tff.TensorType(np.float32, [10]), np.float64])
    )
    members = footprint.of_value(value)
    assert members == tuple(e.value.ByteSize() for e in value.struct.element)
    clients, _ = value_serialization.serialize_value(
        [1.0, 2.0], tff.FederatedType(np.float32, tff.CLIENTS)
    )
    assert footprint.of_value(clients) == clients.ByteSize()
