"""`federated_select` and the sequence intrinsics (see docs/intrinsics.md).

What TFF 0.87's native compiler leaves of them, checked on this machine:

- `federated_select(<keys@CLIENTS, max_key@SERVER, server_val@SERVER, fn>)`
  reaches the executor unchanged; `fn` is a lambda around the compiled
  `select_fn`. worker_binary runs it: for each client, a sequence of
  `select_fn(server_val, key)` in key order.
- `federated_secure_select` reaches the executor too, but worker_binary cannot
  run it ("Cannot embed a federated value").
- `sequence_reduce` and `sequence_map` reach the executor (usually inside a
  lambda shipped with a map or apply) and worker_binary runs them;
  `sequence_sum` it never runs ("TensorFlow Executor does not support
  intrinsic URI: sequence_sum").

tff-amqp runs a select at the silos: the server value and `max_key` are
shipped to every cohort silo once (a large value is one publish the broker
fans out), and each silo's worker runs `federated_select` over its clients.
Client keys never leave the silo. With the option `select_slices`, only the
requested slices are shipped instead, and each silo reveals its requested key
set to the coordinator (`select_by_slices`; docs/privacy.md).
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING, Any

import numpy as np
from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.core.impl.compiler import building_blocks, intrinsic_defs
from tensorflow_federated.python.core.impl.executors import value_serialization
from tensorflow_federated.python.core.impl.types import computation_types, placements

from tff_amqp.coordinator.stateful.scope import EMPTY_SCOPE
from tff_amqp.coordinator.stateful.values import (
    ClientsValue,
    CoordinatorValue,
    FunctionValue,
    HostValue,
    LocalValue,
    SerializedValue,
    StructValue,
)
from tff_amqp.errors import UnsupportedIntrinsicError

if TYPE_CHECKING:
    from tff_amqp.coordinator.stateful.executor import AmqpExecutor
    from tff_amqp.coordinator.stateful.invocation import Invocation

# Sequence intrinsics TFF's native runtime cannot run, and what to use instead.
NOT_RUN_BY_NATIVE_TFF = {
    "sequence_sum": (
        "TFF's native runtime cannot run it either (worker_binary: 'TensorFlow Executor does "
        "not support intrinsic URI: sequence_sum'). Use tff.sequence_reduce with a TensorFlow "
        "add, or reduce the dataset inside a tff.tensorflow.computation (ds.reduce(...))"
    ),
}


def unsupported_sequence_intrinsic(uri: str) -> UnsupportedIntrinsicError:
    return UnsupportedIntrinsicError(
        f"intrinsic {uri!r} is not supported: {NOT_RUN_BY_NATIVE_TFF[uri]}"
    )


def check_runnable(bb: building_blocks.ComputationBuildingBlock) -> None:
    """Refuse a function that calls an intrinsic no worker_binary runs, before
    it is shipped anywhere: a clear error instead of a worker's failure that
    a silo would report later, wrapped in its own context."""
    stack = [bb]
    while stack:
        node = stack.pop()
        if isinstance(node, building_blocks.Intrinsic) and node.uri in NOT_RUN_BY_NATIVE_TFF:
            raise unsupported_sequence_intrinsic(node.uri)
        if not isinstance(node, building_blocks.CompiledComputation):
            stack.extend(node.children())


def check_select(intrinsic: building_blocks.Intrinsic) -> None:
    """Refuse zero keys per client (`int32[0]`) before anything is shipped:
    worker_binary, native TFF's included, cannot build an empty sequence
    ("args_into_sequence cannot be used to create zero-length datasets")."""
    keys_type = intrinsic.type_signature.parameter[0]  # type: ignore[attr-defined,index]
    if keys_type.member.shape == (0,):
        raise UnsupportedIntrinsicError(
            f"{intrinsic.uri} with zero keys per client ({keys_type}) is not supported: TFF's "
            "native runtime cannot run it either (its worker cannot create zero-length "
            "sequences). Skip the select when there are no keys"
        )


def as_plain_select(intrinsic: building_blocks.Intrinsic) -> building_blocks.Intrinsic:
    """A `federated_secure_select` as the `federated_select` silos run.

    Secure select promises that the server does not learn which keys clients
    asked for. Selecting at the silo from the whole server value keeps that
    promise (the keys never leave the silo), so the silo's worker may run the
    plain intrinsic. (Secure select's `max_key` is exclusive, plain select's
    inclusive; worker_binary checks neither, so results are the same.)
    """
    return building_blocks.Intrinsic(intrinsic_defs.FEDERATED_SELECT.uri, intrinsic.type_signature)


# ------------------------------------------------------------ slice shipping

# Above this max_key, the per-silo key sets (a bit per key: 2 MB here) grow
# too large: the whole value is shipped instead.
MAX_SLICED_KEYS = 1 << 24


async def select_by_slices(
    executor: AmqpExecutor, intrinsic: building_blocks.Intrinsic, arg: CoordinatorValue | None
) -> ClientsValue | None:
    """`federated_select` shipping only the requested slices (option
    `select_slices`); None if max_key is too large for it.

    1. Each silo aggregates a bit set of the keys its clients ask for (an
       aggregation, so silos release it under their default policy).
    2. The coordinator computes `select_fn(server_val, key)` once per distinct
       key on its worker, and ships each slice once to the silos that asked
       for it (a large one is one transfer for all of them).
    3. Each silo runs `federated_select` over its clients from a packed value
       <keys, slices> with a select_fn that picks a slice by its key.
    """
    if arg is None:
        raise TypeError("federated_select needs an argument")
    invocation = executor.invocation
    keys, max_key, server_val, select_fn = [await executor.select(arg, i) for i in range(4)]
    server_values = LocalValue | HostValue | SerializedValue
    if not isinstance(server_val, server_values) or not isinstance(max_key, server_values):
        return None
    keys_type = keys.type_signature
    slice_type = select_fn.type_signature.result  # type: ignore[attr-defined]
    top = int(np.asarray(await max_key.compute()))
    if not 0 <= top < MAX_SLICED_KEYS:
        return None

    wanted = await _requested_keys(executor, keys, keys_type, top)
    distinct = sorted({k for ks in wanted.values() for k in ks})

    member_type = server_val.type_signature.member  # type: ignore[attr-defined]
    unplaced, _ = await asyncio.to_thread(
        value_serialization.serialize_value, await server_val.compute(), member_type
    )
    table = await invocation.create_local(unplaced, member_type)

    async def slice_for(key: int) -> LocalValue:
        key_value = await invocation.create_local(
            _int32(key), computation_types.TensorType(np.int32)
        )
        picked = await executor.call(
            select_fn, StructValue(invocation, [(None, table), (None, key_value)])
        )
        if not isinstance(picked, LocalValue):
            raise TypeError(f"select_fn returned {type(picked).__name__}, not a server value")
        return picked

    # Once per distinct key, concurrently on the coordinator's worker.
    slices = dict(zip(distinct, await asyncio.gather(*(slice_for(k) for k in distinct))))

    # Each slice goes once to the silos that asked for it.
    placed: dict[int, dict[str, int]] = {}
    for key, value in slices.items():
        silos = [s for s, ks in wanted.items() if key in ks]
        placed[key] = await invocation.ship_to(value, silos)

    ids: dict[str, int] = {}
    for silo, silo_keys in wanted.items():
        ids[silo] = await _select_at_silo(
            invocation, silo, silo_keys, placed, keys, max_key, keys_type, slice_type
        )
    return ClientsValue(invocation, ids, intrinsic.type_signature.result)  # type: ignore[attr-defined]


async def _requested_keys(
    executor: AmqpExecutor, keys: CoordinatorValue, keys_type: computation_types.Type, top: int
) -> dict[str, list[int]]:
    """Per silo, the sorted distinct keys its clients ask for."""
    invocation = executor.invocation
    per_client = keys_type.member  # type: ignore[attr-defined]
    zero_fn, accumulate, merge, mask_type = _mask_functions(per_client.shape[0], top)
    identity = building_blocks.Lambda(
        "mask", mask_type, building_blocks.Reference("mask", mask_type)
    )
    aggregate = building_blocks.Intrinsic(
        intrinsic_defs.FEDERATED_AGGREGATE.uri,
        computation_types.FunctionType(
            [
                keys_type,
                mask_type,
                accumulate.type_signature,
                merge.type_signature,
                identity.type_signature,
            ],
            computation_types.FederatedType(mask_type, placements.SERVER),
        ),
    )
    # Each silo makes the zero bit set itself (a few hundred bytes of graph
    # instead of max_key / 8 bytes per silo).
    zero = await invocation.call_at_silos(
        FunctionValue(invocation, zero_fn, EMPTY_SCOPE), None, mask_type
    )
    masks = await invocation.call_at_silos(
        FunctionValue(invocation, aggregate, EMPTY_SCOPE),
        StructValue(
            invocation,
            [
                (None, keys),
                (None, zero),
                (None, FunctionValue(invocation, accumulate, EMPTY_SCOPE)),
                (None, FunctionValue(invocation, merge, EMPTY_SCOPE)),
                (None, FunctionValue(invocation, identity, EMPTY_SCOPE)),
            ],
        ),
        aggregate.type_signature.result,
    )
    released = await invocation.gather_from_silos(masks)
    wanted: dict[str, list[int]] = {}
    for silo in masks.ids:
        if silo not in released:  # dropped
            continue
        mask, _ = value_serialization.deserialize_value(
            released[silo].federated.value[0], mask_type
        )
        mask = np.asarray(mask)
        if mask[-1]:
            raise ValueError(
                f"federated_select: a client key at silo {silo!r} is outside [0, max_key={top}]"
            )
        wanted[silo] = _keys_of(mask[:-1])
    return wanted


async def _select_at_silo(
    invocation: Invocation,
    silo: str,
    silo_keys: list[int],
    placed: dict[int, dict[str, int]],
    keys: CoordinatorValue,
    max_key: CoordinatorValue,
    keys_type: computation_types.Type,
    slice_type: computation_types.Type,
) -> int:
    packed_type = _packed_type(len(silo_keys), slice_type)
    key_table = await invocation.create_local(
        value_serialization.serialize_value(
            np.array(silo_keys, np.int32),
            packed_type.keys,  # type: ignore[attr-defined]
        )[0],
        packed_type.keys,  # type: ignore[attr-defined]
    )
    slices_here = [ClientsValue(invocation, {silo: placed[k][silo]}, slice_type) for k in silo_keys]
    packed = StructValue(
        invocation,
        [
            ("keys", key_table),
            ("slices", StructValue(invocation, [(None, s) for s in slices_here])),
        ],
    )
    packed_at_server_type = computation_types.FederatedType(packed_type, placements.SERVER)
    at_server = building_blocks.Intrinsic(
        intrinsic_defs.FEDERATED_VALUE_AT_SERVER.uri,
        computation_types.FunctionType(packed_type, packed_at_server_type),
    )
    outbox = await invocation.outbox(silo)
    packed_at_server = outbox.create_call(
        await invocation.to_silo(FunctionValue(invocation, at_server, EMPTY_SCOPE), silo),
        await invocation.to_silo(packed, silo),
    )
    pick = _pick_function(len(silo_keys), slice_type)
    select = building_blocks.Intrinsic(
        intrinsic_defs.FEDERATED_SELECT.uri,
        computation_types.FunctionType(
            [
                keys_type,
                max_key.type_signature,
                packed_at_server_type,
                pick.type_signature,
            ],
            computation_types.FederatedType(
                computation_types.SequenceType(slice_type), placements.CLIENTS
            ),
        ),
    )
    packed_here = ClientsValue(invocation, {silo: packed_at_server}, packed_at_server_type)
    select_arg = StructValue(
        invocation,
        [
            (None, keys),
            (None, max_key),
            (None, packed_here),
            (None, FunctionValue(invocation, pick, EMPTY_SCOPE)),
        ],
    )
    return outbox.create_call(
        await invocation.to_silo(FunctionValue(invocation, select, EMPTY_SCOPE), silo),
        await invocation.to_silo(select_arg, silo),
    )


def _packed_type(count: int, slice_type: computation_types.Type) -> computation_types.StructType:
    return computation_types.StructType(
        [
            ("keys", computation_types.TensorType(np.int32, [count])),
            ("slices", computation_types.StructType([slice_type] * count)),
        ]
    )


def _int32(value: int) -> executor_pb2.Value:
    return value_serialization.serialize_value(
        np.int32(value), computation_types.TensorType(np.int32)
    )[0]


def _compiled(comp: object) -> building_blocks.CompiledComputation:
    from tensorflow_federated.python.core.impl.computation import computation_impl

    proto = computation_impl.ConcreteComputation.get_proto(comp)  # type: ignore[arg-type]
    bb = building_blocks.ComputationBuildingBlock.from_proto(proto)
    assert isinstance(bb, building_blocks.CompiledComputation)
    return bb


@functools.lru_cache(maxsize=64)
def _mask_functions(
    keys_per_client: int, top: int
) -> tuple[
    building_blocks.CompiledComputation,
    building_blocks.CompiledComputation,
    building_blocks.CompiledComputation,
    Any,
]:
    """A bit set of the requested keys 0..top in int32 words (key k: bit k % 32
    of word k // 32), plus a last word flagging keys out of range:
    zero, accumulate marking a client's keys, merge (bitwise or)."""
    import tensorflow as tf
    import tensorflow_federated as tff

    words = top // 32 + 2
    mask_type = computation_types.TensorType(np.int32, [words])
    keys_type = computation_types.TensorType(np.int32, [keys_per_client])

    @tff.tensorflow.computation
    def zero() -> Any:
        return tf.zeros([words], tf.int32)

    # Unnamed parameters: federated_aggregate's type is <U,T> -> U.
    @tff.tensorflow.computation(computation_types.StructType([mask_type, keys_type]))
    def accumulate(mask_and_keys: Any) -> Any:
        mask, keys = mask_and_keys[0], mask_and_keys[1]
        in_range = tf.logical_and(keys >= 0, keys <= top)
        safe = tf.where(in_range, keys, 0)
        bits = tf.where(in_range, tf.bitwise.left_shift(tf.ones_like(safe), safe % 32), 0)

        def mark(acc: Any, word_and_bit: Any) -> Any:
            word, bit = word_and_bit
            return tf.tensor_scatter_nd_update(
                acc, [[word]], [tf.bitwise.bitwise_or(acc[word], bit)]
            )

        mask = tf.foldl(mark, (safe // 32, bits), initializer=mask)
        outside = tf.cast(tf.reduce_any(tf.logical_not(in_range)), tf.int32)
        return tf.tensor_scatter_nd_update(
            mask, [[words - 1]], [tf.bitwise.bitwise_or(mask[words - 1], outside)]
        )

    @tff.tensorflow.computation(computation_types.StructType([mask_type, mask_type]))
    def merge(pair: Any) -> Any:
        return tf.bitwise.bitwise_or(pair[0], pair[1])

    return _compiled(zero), _compiled(accumulate), _compiled(merge), mask_type


def _keys_of(mask: np.ndarray) -> list[int]:
    words = mask.astype(np.uint32)[:, None]
    bits = (words >> np.arange(32, dtype=np.uint32)) & 1
    return np.flatnonzero(bits.reshape(-1)).tolist()


@functools.lru_cache(maxsize=256)
def _pick_function(
    count: int, slice_type: computation_types.Type
) -> building_blocks.CompiledComputation:
    """(<keys, slices>, key) -> the slice stored under `key`, for `count`
    slices (cached: tracing it costs ~0.1 s on the event loop)."""
    import tensorflow as tf
    import tensorflow_federated as tff
    from tensorflow_federated.python.common_libs import structure

    packed_type = _packed_type(count, slice_type)

    @tff.tensorflow.computation(
        computation_types.StructType([packed_type, computation_types.TensorType(np.int32)])
    )
    def pick(packed_and_key: Any) -> Any:
        packed = structure.from_container(packed_and_key[0], recursive=True)
        key = packed_and_key[1]
        position = tf.argmax(tf.cast(tf.equal(packed.keys, key), tf.int32))
        slices = [s for _, s in structure.iter_elements(packed.slices)]
        if not isinstance(slice_type, computation_types.StructType):
            return tf.gather(tf.stack(slices), position)
        columns = zip(*(structure.flatten(s) for s in slices))
        picked = [tf.gather(tf.stack(column), position) for column in columns]
        return structure.pack_sequence_as(slices[0], picked)

    return _compiled(pick)
