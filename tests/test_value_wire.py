"""Large arguments serialized straight into a `Value`'s bytes parse to exactly
what TFF's own serializer builds, and what TFF refuses is still refused."""

from __future__ import annotations

import collections
import gc
import threading

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.core.impl.executors import value_serialization

from tff_amqp.inprocess import value_wire

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


# ------------------------------------------------------------- datasets


def _dataset(seed: int, rows: int = 7) -> tf.data.Dataset:
    x = np.random.default_rng(seed).normal(size=(rows, 3)).astype(np.float32)
    return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x)).batch(2)


def _elements(serialized: bytes, type_spec) -> list:
    """What a worker would iterate: the datasets TFF deserializes, as arrays."""
    proto = executor_pb2.Value.FromString(serialized)
    value, _ = value_serialization.deserialize_value(proto, type_spec)
    members = value if isinstance(value, list) else [value]
    return [[batch["x"].numpy().tolist() for batch in member] for member in members]


DATASETS_T = tff.FederatedType(
    tff.SequenceType(collections.OrderedDict(x=tff.TensorType(np.float32, [None, 3]))), tff.CLIENTS
)


def test_a_dataset_is_serialized_once_while_it_lives():
    datasets = [_dataset(1), _dataset(2), _dataset(3)]
    cache = value_wire.DATASETS
    hits = cache.hits
    first, first_type = value_wire.serialize(datasets, DATASETS_T)
    assert cache.hits == hits  # new datasets: serialized by TFF, remembered
    again, again_type = value_wire.serialize(datasets, DATASETS_T)
    assert cache.hits == hits + 3
    proto, tff_type = value_serialization.serialize_value(datasets, DATASETS_T)
    # Each serialization names its graph's nodes anew, so compare what the
    # worker would read: the same batches, and the type TFF reports.
    expected = _elements(proto.SerializeToString(), DATASETS_T)
    assert _elements(first, DATASETS_T) == expected == _elements(again, DATASETS_T)
    assert first_type == again_type == tff_type
    # A dataset not seen before is serialized by TFF, alongside remembered ones.
    swapped = [datasets[0], _dataset(4), datasets[2]]
    hits = cache.hits
    data, _ = value_wire.serialize(swapped, DATASETS_T)
    assert cache.hits == hits + 2
    assert (
        _elements(data, DATASETS_T)[1]
        == _elements(
            value_serialization.serialize_value([swapped[1]], DATASETS_T)[0].SerializeToString(),
            DATASETS_T,
        )[0]
    )


def test_a_remembered_dataset_goes_with_its_dataset():
    cache = value_wire.SerializedDatasets()
    dataset = _dataset(5)
    element_type = DATASETS_T.member
    cache.serialize(dataset, element_type)
    assert len(cache) == 1
    # Another type is another entry (TFF checks the elements against it).
    cache.serialize(
        dataset,
        tff.SequenceType(collections.OrderedDict(x=tff.TensorType(np.float32, [None, None]))),
    )
    assert len(cache) == 2
    del dataset
    gc.collect()
    assert len(cache) == 0 and cache._bytes == 0


def test_remembered_datasets_are_bounded_in_bytes():
    cache = value_wire.SerializedDatasets()
    datasets = [_dataset(i, rows=2000) for i in range(4)]
    one = len(cache.serialize(datasets[0], DATASETS_T.member)[0].SerializeToString())
    cache.MAX_BYTES = int(2.5 * one)
    for dataset in datasets[1:]:
        cache.serialize(dataset, DATASETS_T.member)
    assert len(cache) == 2 and cache._bytes <= cache.MAX_BYTES
    # The least recently used went first: the last two are hits, the first is not.
    hits = cache.hits
    cache.serialize(datasets[3], DATASETS_T.member)
    cache.serialize(datasets[2], DATASETS_T.member)
    assert cache.hits == hits + 2
    cache.serialize(datasets[0], DATASETS_T.member)
    assert cache.hits == hits + 2
    # Too large for an entry: serialized every time, never kept.
    small = value_wire.SerializedDatasets()
    small.MAX_ENTRY_BYTES = one - 1
    small.serialize(datasets[0], DATASETS_T.member)
    assert len(small) == 0


def test_a_dataset_of_the_wrong_type_is_refused_as_tff_refuses_it():
    wrong = tff.FederatedType(
        tff.SequenceType(collections.OrderedDict(x=tff.TensorType(np.int32, [None, 3]))),
        tff.CLIENTS,
    )
    datasets = [_dataset(6)]
    with pytest.raises(Exception) as tffs:
        value_serialization.serialize_value(datasets, wrong)
    with pytest.raises(type(tffs.value)) as ours:
        value_wire.serialize(datasets, wrong)
    assert str(ours.value) == str(tffs.value)


def test_a_dataset_dying_while_the_cache_is_locked_does_not_block():
    # A collection can run inside the cache's locked region (any allocation
    # may trigger one); the weak reference's callback must not wait for the lock.
    cache = value_wire.SerializedDatasets()
    held = [_dataset(7)]
    cache.serialize(held[0], DATASETS_T.member)
    finished = threading.Event()

    def die_while_locked() -> None:
        with cache._lock:
            held.clear()
            gc.collect()
        finished.set()

    thread = threading.Thread(target=die_while_locked, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert finished.is_set(), "the weakref callback blocked on the cache's lock"
    assert len(cache) == 0 and cache._bytes == 0
