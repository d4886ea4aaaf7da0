"""Where each intrinsic runs: one method per intrinsic, named after it.

- CLIENTS work (map, zip, value/eval at clients, broadcast) is sent to every
  cohort silo and stays there as handles.
- SERVER work (apply, zip/value/eval at server, generic operators) runs on the
  coordinator's local worker.
- Aggregations run at each silo over its clients with an identity report;
  only the partial accumulators come back; the coordinator folds them with
  `merge` (in silo-name order, so results are reproducible) and applies
  `report`.
- Secure sums have plain-sum semantics: there is no secure aggregation
  protocol here (documented in docs/intrinsics.md).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.common_libs import structure
from tensorflow_federated.python.core.impl.compiler import building_blocks, intrinsic_defs
from tensorflow_federated.python.core.impl.types import computation_types, placements

from tff_amqp.coordinator.stateful import select as _select
from tff_amqp.coordinator.stateful.local import INLINE_SERIALIZE_BYTES
from tff_amqp.coordinator.stateful.scope import EMPTY_SCOPE as _EMPTY
from tff_amqp.coordinator.stateful.values import (
    ClientsValue,
    CoordinatorValue,
    FunctionValue,
    HostValue,
    LocalValue,
    StructValue,
)
from tff_amqp.errors import UnsupportedIntrinsicError
from tff_amqp.inprocess import numpy_ops, value_wire

if TYPE_CHECKING:
    from tff_amqp.coordinator.stateful.executor import AmqpExecutor

Intrinsic = building_blocks.Intrinsic
Arg = CoordinatorValue | None
_Method = Callable[
    [building_blocks.Intrinsic, CoordinatorValue | None], Awaitable[CoordinatorValue]
]


class FederatingStrategy:
    """Dispatches intrinsic calls of one invocation."""

    def __init__(self, executor: AmqpExecutor) -> None:
        self._executor = executor
        self._invocation = executor.invocation

    async def call(
        self, intrinsic: building_blocks.Intrinsic, arg: CoordinatorValue | None
    ) -> CoordinatorValue:
        method: _Method | None = getattr(self, intrinsic.uri, None)
        self._invocation.runtime.intrinsic_calls[intrinsic.uri] += 1
        if method is None:
            raise UnsupportedIntrinsicError(
                f"intrinsic {intrinsic.uri!r} is not supported by tff-amqp; supported: "
                f"{', '.join(supported_intrinsics())}"
            )
        return await method(intrinsic, arg)

    # ------------------------------------------------------ at the clients

    async def _at_silos(
        self, intrinsic: building_blocks.Intrinsic, arg: CoordinatorValue | None
    ) -> ClientsValue:
        return await self._invocation.call_at_silos(
            FunctionValue(self._invocation, intrinsic, _EMPTY), arg, intrinsic.type_signature.result
        )

    async def federated_map(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        return await self._at_silos(intrinsic, arg)

    async def federated_map_all_equal(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        return await self._at_silos(intrinsic, arg)

    async def federated_zip_at_clients(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        return await self._at_silos(intrinsic, arg)

    async def federated_value_at_clients(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        return await self._at_silos(intrinsic, arg)

    async def federated_eval_at_clients(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        return await self._at_silos(intrinsic, arg)

    async def federated_broadcast(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        # The server value is computed once on the coordinator and shipped to
        # each silo, which broadcasts it to its own clients.
        return await self._at_silos(intrinsic, arg)

    async def federated_select(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        # Server value and max_key go to each silo once; each silo selects for
        # its clients, so client keys stay at the silos (see select.py).
        _select.check_select(intrinsic)
        if self._invocation.runtime.options.select_slices:
            # Opt-in: only requested slices are shipped; silos reveal their key sets.
            selected = await _select.select_by_slices(self._executor, intrinsic, arg)
            if selected is not None:
                return selected
        return await self._at_silos(intrinsic, arg)

    async def federated_secure_select(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        # Selecting at the silo keeps the keys secret: see select.as_plain_select.
        _select.check_select(intrinsic)
        return await self._at_silos(_select.as_plain_select(intrinsic), arg)

    # ------------------------------------------------------- at the server

    async def _at_server(
        self, intrinsic: building_blocks.Intrinsic, arg: CoordinatorValue | None
    ) -> LocalValue | HostValue:
        fn = FunctionValue(self._invocation, intrinsic, _EMPTY)
        return await self._executor.call_locally(fn, arg, intrinsic.type_signature.result)

    async def federated_apply(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        # A mean's division of an aggregate folded in this process: in NumPy.
        if isinstance(arg, StructValue) and isinstance(arg.elements[1][1], HostValue):
            fn, value = arg.elements[0][1], arg.elements[1][1]
            host_fn = self._invocation.runtime.host_function(fn)
            if host_fn is not None:
                return HostValue(
                    self._invocation,
                    host_fn(value.value),
                    intrinsic.type_signature.result,  # type: ignore[attr-defined]
                )
        return await self._at_server(intrinsic, arg)

    async def federated_zip_at_server(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        # Values held in this process zip here: a struct of their members.
        if isinstance(arg, StructValue) and all(isinstance(v, HostValue) for _, v in arg.elements):
            zipped = structure.Struct([(name, v.value) for name, v in arg.elements])  # type: ignore[attr-defined]
            return HostValue(self._invocation, zipped, intrinsic.type_signature.result)  # type: ignore[attr-defined]
        return await self._at_server(intrinsic, arg)

    async def federated_value_at_server(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        return await self._at_server(intrinsic, arg)

    async def federated_eval_at_server(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        return await self._at_server(intrinsic, arg)

    # Generic operators: TFF 0.87's compiler does not emit them, and TFF's
    # worker cannot run them; built here as TensorFlow, leaf by leaf.

    async def generic_plus(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        return await self._generic(intrinsic, arg, tf_add)

    async def generic_multiply(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        return await self._generic(intrinsic, arg, tf_multiply)

    async def generic_divide(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        return await self._generic(intrinsic, arg, tf_divide)

    async def _generic(
        self, intrinsic: Intrinsic, arg: Arg, op: Callable[[object, object], object]
    ) -> CoordinatorValue:
        first, second = intrinsic.type_signature.parameter  # type: ignore[misc,union-attr]
        if _is_placed(first) or _is_placed(second):
            raise UnsupportedIntrinsicError(
                f"{intrinsic.uri} of federated values is not supported by tff-amqp (only of "
                "unplaced tensors and structs); TFF's compiler does not produce it"
            )
        proto, fn_type = _tf_binary_operator(
            lambda a, b: _map_leaves(op, a, _broadcast_to(b, a)), first, second
        )
        fn = FunctionValue(
            self._invocation,
            building_blocks.CompiledComputation(proto, type_signature=fn_type),
            _EMPTY,
        )
        assert arg is not None
        return await self._executor.call(fn, arg)

    async def sequence_reduce(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        # Unplaced sequences live on the coordinator's worker (inside maps
        # they run at the silos, shipped with the mapped function).
        return await self._at_server(intrinsic, arg)

    async def sequence_map(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        return await self._at_server(intrinsic, arg)

    async def sequence_sum(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        raise _select.unsupported_sequence_intrinsic(intrinsic.uri)

    # -------------------------------------------------------- aggregations

    async def federated_aggregate(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        value, zero, accumulate, merge, report = [
            await self._executor.select(arg, i) for i in range(5)
        ]
        accumulator_type, identity, silo_intrinsic = _silo_aggregate(intrinsic.type_signature)
        invocation = self._invocation
        silo_zero: CoordinatorValue = zero
        if isinstance(zero, LocalValue) and zero.producer is not None:
            # Zeros of model-sized accumulators are the output of a no-argument
            # TF computation: each silo runs it instead of receiving the
            # tensor (a few KB of graph instead of a model's worth of bytes).
            silo_zero = await invocation.call_at_silos(zero.producer, None, zero.type_signature)
        silo_arg = StructValue(
            invocation,
            [
                (None, value),
                (None, silo_zero),
                (None, accumulate),
                (None, merge),
                (None, FunctionValue(invocation, identity, _EMPTY)),
            ],
        )
        protos = await self._partial_protos(silo_intrinsic, silo_arg)
        runtime = invocation.runtime
        merge_fn, report_fn = runtime.host_function(merge), runtime.host_function(report)
        if protos and merge_fn is not None and report_fn is not None:
            # Sums, means' parts, min / max: folded here in NumPy, in silo-name
            # order, with no round trip to the coordinator's worker.
            def folded() -> object:
                # value_wire: TFF's values without its per-node tracing.
                partial_values = [value_wire.deserialize(m, accumulator_type) for m in protos]
                return numpy_ops.fold(merge_fn, report_fn, partial_values)

            # Small partials inline: a thread hop costs more than the work.
            small = sum(m.ByteSize() for m in protos) <= INLINE_SERIALIZE_BYTES
            value = folded() if small else await asyncio.to_thread(folded)
            reported_type = intrinsic.type_signature.result  # type: ignore[attr-defined]
            return HostValue(invocation, value, reported_type)
        partials = list(
            await asyncio.gather(*(invocation.create_local(m, accumulator_type) for m in protos))
        )
        # No silo took part (no clients): the aggregate of nothing is the zero.
        total: CoordinatorValue = partials[0] if partials else zero
        for partial in partials[1:]:
            total = await self._executor.call(
                merge, StructValue(invocation, [(None, total), (None, partial)])
            )
        reported = await self._executor.call(report, total)
        return await self._place_at_server(reported)

    async def federated_sum(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        assert arg is not None
        return await self._summed(arg)

    async def federated_secure_sum_bitwidth(
        self, intrinsic: Intrinsic, arg: Arg
    ) -> CoordinatorValue:
        # Plain-sum semantics (not secure): see the module docstring.
        return await self._summed(await self._executor.select(arg, 0))

    async def federated_secure_sum(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        # Plain-sum semantics (not secure): see the module docstring.
        return await self._summed(await self._executor.select(arg, 0))

    async def federated_secure_modular_sum(
        self, intrinsic: Intrinsic, arg: Arg
    ) -> CoordinatorValue:
        """The sum of the client values modulo `modulus` (a tensor, or a structure
        matching the value's), as TFF's own test runtime defines it: summed at
        the silos and folded on the coordinator, reduced once at the end.
        Not secure, like the other secure sums (see the module docstring)."""
        summed = await self._summed(await self._executor.select(arg, 0))
        modulus = await self._executor.select(arg, 1)
        member_type = summed.type_signature.member  # type: ignore[attr-defined]
        proto, fn_type = _tf_binary_operator(
            lambda total, mod: _map_leaves(tf_mod, total, _broadcast_to(mod, total)),
            member_type,
            modulus.type_signature,
        )
        fn = FunctionValue(
            self._invocation,
            building_blocks.CompiledComputation(proto, type_signature=fn_type),
            _EMPTY,
        )
        modulus_at_server = await self._place_at_server(modulus)
        pair_type = computation_types.StructType([member_type, modulus.type_signature])
        zip_at_server = building_blocks.Intrinsic(
            intrinsic_defs.FEDERATED_ZIP_AT_SERVER.uri,
            computation_types.FunctionType(
                [
                    computation_types.FederatedType(member_type, placements.SERVER),
                    computation_types.FederatedType(modulus.type_signature, placements.SERVER),
                ],
                computation_types.FederatedType(pair_type, placements.SERVER),
            ),
        )
        pair = await self._at_server(
            zip_at_server,
            StructValue(self._invocation, [(None, summed), (None, modulus_at_server)]),
        )
        apply = building_blocks.Intrinsic(
            intrinsic_defs.FEDERATED_APPLY.uri,
            computation_types.FunctionType(
                [fn_type, computation_types.FederatedType(pair_type, placements.SERVER)],
                computation_types.FederatedType(fn_type.result, placements.SERVER),
            ),
        )
        return await self._at_server(
            apply, StructValue(self._invocation, [(None, fn), (None, pair)])
        )

    async def _summed(self, value: CoordinatorValue) -> CoordinatorValue:
        """A sum as an aggregation with a TensorFlow zero and add: one code path
        for every aggregation (worker_binary's own federated_sum cannot take a
        CLIENTS value that was computed in place, and native TFF never sends it)."""
        from tensorflow_federated.python.core.environments.tensorflow_backend import (
            tensorflow_computation_factory as factory,
        )

        member_type = value.type_signature.member  # type: ignore[attr-defined]
        invocation = self._invocation
        zero_proto, zero_type = factory.create_constant(0, member_type)
        add_proto, add_type = _tf_binary_operator(
            lambda a, b: _map_leaves(tf_add, a, b), member_type, member_type
        )
        zero_fn = building_blocks.CompiledComputation(zero_proto, type_signature=zero_type)
        add = FunctionValue(
            invocation,
            building_blocks.CompiledComputation(add_proto, type_signature=add_type),
            _EMPTY,
        )
        zero = await self._executor.call(FunctionValue(invocation, zero_fn, _EMPTY), None)
        identity = _identity(member_type)
        aggregate = building_blocks.Intrinsic(
            intrinsic_defs.FEDERATED_AGGREGATE.uri,
            computation_types.FunctionType(
                [
                    computation_types.FederatedType(member_type, placements.CLIENTS),
                    member_type,
                    add_type,
                    add_type,
                    identity.type_signature,
                ],
                computation_types.FederatedType(member_type, placements.SERVER),
            ),
        )
        return await self.federated_aggregate(
            aggregate,
            StructValue(
                invocation,
                [
                    (None, value),
                    (None, zero),
                    (None, add),
                    (None, add),
                    (None, FunctionValue(invocation, identity, _EMPTY)),
                ],
            ),
        )

    # -------------------------------------------------------------- helpers

    async def _partial_protos(
        self, silo_intrinsic: Intrinsic, arg: CoordinatorValue
    ) -> list[executor_pb2.Value]:
        """Run an aggregation intrinsic at every silo; return the unplaced
        member of each silo's SERVER-placed partial, in cohort order."""
        partials = await self._invocation.call_at_silos(
            FunctionValue(self._invocation, silo_intrinsic, _EMPTY),
            arg,
            silo_intrinsic.type_signature.result,
        )
        released = await self._invocation.gather_from_silos(partials)
        members = []
        for silo in partials.ids:
            if silo not in released:  # dropped as a straggler or lost
                continue
            federated = released[silo].federated
            if len(federated.value) != 1:
                raise ValueError(f"silo {silo!r} returned a malformed aggregate")
            members.append(federated.value[0])
        return members

    async def _place_at_server(self, value: CoordinatorValue) -> CoordinatorValue:
        member_type = value.type_signature
        if isinstance(value, HostValue):
            # At SERVER in this process is the value itself (all-equal).
            return HostValue(
                self._invocation,
                value.value,
                computation_types.FederatedType(member_type, placements.SERVER),
            )
        intrinsic = building_blocks.Intrinsic(
            intrinsic_defs.FEDERATED_VALUE_AT_SERVER.uri,
            computation_types.FunctionType(
                member_type, computation_types.FederatedType(member_type, placements.SERVER)
            ),
        )
        return await self._at_server(intrinsic, value)


def tf_add(a: object, b: object) -> object:
    import tensorflow as tf

    return tf.add(a, b)


def tf_multiply(a: object, b: object) -> object:
    import tensorflow as tf

    return tf.multiply(a, b)


def tf_divide(a: object, b: object) -> object:
    import tensorflow as tf

    return tf.divide(a, b)


def _is_placed(type_spec: computation_types.Type) -> bool:
    return isinstance(type_spec, computation_types.FederatedType)


def tf_mod(a: object, b: object) -> object:
    import tensorflow as tf

    return tf.math.mod(a, tf.cast(b, a.dtype))  # type: ignore[attr-defined]


def _map_leaves(fn: Callable[[object, object], object], a: object, b: object) -> object:
    """`fn` leaf by leaf over two equally structured values (tensors or
    TFF structs, the empty struct included)."""
    if isinstance(a, structure.Struct):
        return structure.map_structure(fn, a, b)
    return fn(a, b)


def _broadcast_to(mod: object, like: object) -> object:
    """A single modulus applies to every leaf of a structured value."""
    if isinstance(like, structure.Struct) and not isinstance(mod, structure.Struct):
        return structure.map_structure(lambda _: mod, like)
    return mod


def _tf_binary_operator(
    operator: Callable[[object, object], object],
    first: computation_types.Type,
    second: computation_types.Type,
) -> tuple[object, computation_types.FunctionType]:
    """A compiled TensorFlow computation `<first, second> -> operator(...)`."""
    from tensorflow_federated.python.core.environments.tensorflow_backend import (
        tensorflow_computation_factory as factory,
    )

    return factory.create_binary_operator(operator, first, second)  # type: ignore[return-value]


@functools.lru_cache(maxsize=256)
def _silo_aggregate(
    signature: computation_types.Type,
) -> tuple[computation_types.Type, building_blocks.Lambda, building_blocks.Intrinsic]:
    """For a `federated_aggregate` of `signature`: its accumulator type, and
    the identity report and aggregate intrinsic each silo runs to produce its
    partial. The same objects for the same signature, so they are serialized
    once (`CoordinatorRuntime.function_wire` caches by building block), not
    per invocation.

    The silo-side aggregate is typed as the intrinsic declares its
    parameters, not as the arguments happen to be: a value may be all-equal
    at CLIENTS (a broadcast), a zero may have a static shape where the
    accumulator's is dynamic."""
    declared = signature.parameter  # type: ignore[attr-defined]
    value_type, accumulator_type, accumulate_type, merge_type, _ = [declared[i] for i in range(5)]
    identity = _identity(accumulator_type)
    silo_intrinsic = building_blocks.Intrinsic(
        intrinsic_defs.FEDERATED_AGGREGATE.uri,
        computation_types.FunctionType(
            [value_type, accumulator_type, accumulate_type, merge_type, identity.type_signature],
            computation_types.FederatedType(accumulator_type, placements.SERVER),
        ),
    )
    return accumulator_type, identity, silo_intrinsic


def _identity(type_spec: computation_types.Type) -> building_blocks.Lambda:
    return building_blocks.Lambda(
        "accumulator", type_spec, building_blocks.Reference("accumulator", type_spec)
    )


def supported_intrinsics() -> list[str]:
    return sorted(
        name
        for name in dir(FederatingStrategy)
        if (name.startswith(("federated_", "generic_", "sequence_")))
        and name not in _select.NOT_RUN_BY_NATIVE_TFF
    )
