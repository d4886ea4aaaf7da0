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
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.core.impl.compiler import building_blocks, intrinsic_defs
from tensorflow_federated.python.core.impl.types import computation_types, placements

from tff_amqp.coordinator import select as _select
from tff_amqp.coordinator.scope import EMPTY_SCOPE as _EMPTY
from tff_amqp.coordinator.values import (
    ClientsValue,
    CoordinatorValue,
    FunctionValue,
    LocalValue,
    StructValue,
)
from tff_amqp.errors import UnsupportedIntrinsicError

if TYPE_CHECKING:
    from tff_amqp.coordinator.executor import AmqpExecutor

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
    ) -> LocalValue:
        fn = FunctionValue(self._invocation, intrinsic, _EMPTY)
        return await self._executor.call_locally(fn, arg, intrinsic.type_signature.result)

    async def federated_apply(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        return await self._at_server(intrinsic, arg)

    async def federated_zip_at_server(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        return await self._at_server(intrinsic, arg)

    async def federated_value_at_server(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        return await self._at_server(intrinsic, arg)

    async def federated_eval_at_server(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        return await self._at_server(intrinsic, arg)

    async def generic_plus(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        return await self._at_server(intrinsic, arg)

    async def generic_multiply(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        return await self._at_server(intrinsic, arg)

    async def generic_divide(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        return await self._at_server(intrinsic, arg)

    async def generic_zero(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        return await self._at_server(intrinsic, arg)

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
        accumulator_type = accumulate.type_signature.result
        identity = building_blocks.Lambda(
            "accumulator",
            accumulator_type,
            building_blocks.Reference("accumulator", accumulator_type),
        )
        silo_intrinsic = building_blocks.Intrinsic(
            intrinsic_defs.FEDERATED_AGGREGATE.uri,
            computation_types.FunctionType(
                [
                    value.type_signature,
                    zero.type_signature,
                    accumulate.type_signature,
                    merge.type_signature,
                    identity.type_signature,
                ],
                computation_types.FederatedType(accumulator_type, placements.SERVER),
            ),
        )
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
        partials = await self._partials(silo_intrinsic, silo_arg, accumulator_type)
        total = partials[0]
        for partial in partials[1:]:
            total = await self._executor.call(
                merge, StructValue(invocation, [(None, total), (None, partial)])
            )
        reported = await self._executor.call(report, total)
        return await self._place_at_server(reported)

    async def federated_sum(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        return await self._summed(arg)

    async def federated_secure_sum_bitwidth(
        self, intrinsic: Intrinsic, arg: Arg
    ) -> CoordinatorValue:
        # Plain-sum semantics (not secure): see the module docstring.
        return await self._summed(await self._executor.select(arg, 0))

    async def federated_secure_sum(self, intrinsic: Intrinsic, arg: Arg) -> CoordinatorValue:
        # Plain-sum semantics (not secure): see the module docstring.
        return await self._summed(await self._executor.select(arg, 0))

    async def _summed(self, value: CoordinatorValue) -> CoordinatorValue:
        """A sum as an aggregation with a TensorFlow zero and add: one code path
        for every aggregation (worker_binary's own federated_sum cannot take a
        CLIENTS value that was computed in place, and native TFF never sends it)."""
        import tensorflow as tf
        from tensorflow_federated.python.core.environments.tensorflow_backend import (
            tensorflow_computation_factory as factory,
        )

        member_type = value.type_signature.member  # type: ignore[attr-defined]
        invocation = self._invocation
        zero_proto, zero_type = factory.create_constant(0, member_type)
        add_proto, add_type = factory.create_binary_operator(tf.add, member_type)
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
                [value.type_signature, member_type, add_type, add_type, identity.type_signature],
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

    async def _partials(
        self,
        silo_intrinsic: Intrinsic,
        arg: CoordinatorValue,
        accumulator_type: computation_types.Type,
    ) -> list[LocalValue]:
        protos = await self._partial_protos(silo_intrinsic, arg)
        return list(
            await asyncio.gather(
                *(self._invocation.create_local(m, accumulator_type) for m in protos)
            )
        )

    async def _place_at_server(self, value: CoordinatorValue) -> LocalValue:
        member_type = value.type_signature
        intrinsic = building_blocks.Intrinsic(
            intrinsic_defs.FEDERATED_VALUE_AT_SERVER.uri,
            computation_types.FunctionType(
                member_type, computation_types.FederatedType(member_type, placements.SERVER)
            ),
        )
        return await self._at_server(intrinsic, value)


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
