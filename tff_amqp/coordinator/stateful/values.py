"""Executor values on the coordinator.

A value lives in one of four places: the coordinator's local worker
(unplaced and SERVER-placed values), this process (`HostValue`: aggregates
folded in NumPy; `SerializedValue`: arguments as serialized), the silos (CLIENTS-placed values: one
handle per silo, the data never leaves), or nowhere yet (structs and functions
are kept symbolic until something needs them materialized).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tensorflow_federated.python.common_libs import structure
from tensorflow_federated.python.core.impl.compiler import building_blocks
from tensorflow_federated.python.core.impl.executors import executor_value_base
from tensorflow_federated.python.core.impl.types import computation_types

if TYPE_CHECKING:
    from tff_amqp.coordinator.stateful.invocation import Invocation
    from tff_amqp.coordinator.stateful.scope import Scope


class CoordinatorValue(executor_value_base.ExecutorValue):
    """Base class: every value knows its TFF type and its invocation."""

    def __init__(self, invocation: Invocation, type_spec: computation_types.Type) -> None:
        self._invocation = invocation
        self._type_signature = type_spec

    @property
    def type_signature(self) -> computation_types.Type:
        return self._type_signature

    @property
    def invocation(self) -> Invocation:
        return self._invocation

    @property
    def reference(self) -> object:
        # TFF's abstract API; our values are their own references.
        return self


class LocalValue(CoordinatorValue):
    """An unplaced or SERVER-placed value inside the coordinator's worker."""

    def __init__(
        self,
        invocation: Invocation,
        ref: Any,
        type_spec: computation_types.Type,
        *,
        producer: FunctionValue | None = None,
    ) -> None:
        super().__init__(invocation, type_spec)
        self.ref = ref
        # The no-argument computation this value is the output of, if any: a
        # silo can compute it itself instead of receiving it (see strategy).
        self.producer = producer

    async def compute(self) -> object:
        return await self._invocation.compute_local(self)


class HostValue(CoordinatorValue):
    """An unplaced or SERVER-placed value held in this process (NumPy leaves
    in TFF structures, as TFF deserializes them): an aggregate folded here
    (see numpy_ops). It enters the coordinator's worker only if a
    computation there needs it, and is shipped to silos serialized here."""

    def __init__(
        self, invocation: Invocation, value: object, type_spec: computation_types.Type
    ) -> None:
        super().__init__(invocation, type_spec)
        self.value = value

    async def compute(self) -> object:
        return self.value


class SerializedValue(CoordinatorValue):
    """An unplaced or SERVER-placed argument held in this process as the
    serialized TFF `Value` that `create_value` built: shipped to silos as
    these bytes, and created in the coordinator's worker only if a
    computation there needs it (a broadcast model never enters it, so the
    coordinator holds one serialized copy of it, not three)."""

    def __init__(
        self, invocation: Invocation, serialized: bytes, type_spec: computation_types.Type
    ) -> None:
        super().__init__(invocation, type_spec)
        self.serialized = serialized

    async def compute(self) -> object:
        return await self._invocation.local.compute_serialized_value(self)


class ClientsValue(CoordinatorValue):
    """A CLIENTS-placed value: one handle (value id) per silo of the cohort."""

    def __init__(
        self, invocation: Invocation, ids: dict[str, int], type_spec: computation_types.Type
    ) -> None:
        super().__init__(invocation, type_spec)
        self.ids = ids

    async def compute(self) -> object:
        return await self._invocation.release_clients_value(self)


class StructValue(CoordinatorValue):
    """A struct whose elements may live in different places."""

    def __init__(
        self,
        invocation: Invocation,
        elements: Sequence[tuple[str | None, CoordinatorValue]],
    ) -> None:
        self._invocation = invocation
        self._type_signature: computation_types.Type | None = None
        self.elements = list(elements)

    @property
    def type_signature(self) -> computation_types.Type:
        # Built when first read: most structs are only taken apart again,
        # and building a TFF type costs more than the rest of the struct.
        if self._type_signature is None:
            self._type_signature = computation_types.StructType(
                [(n, v.type_signature) if n else v.type_signature for n, v in self.elements]
            )
        return self._type_signature

    async def compute(self) -> object:
        import asyncio

        values = await asyncio.gather(*(v.compute() for _, v in self.elements))
        return structure.Struct([(name, val) for (name, _), val in zip(self.elements, values)])


class FunctionValue(CoordinatorValue):
    """A functional building block (lambda, compiled computation, intrinsic)
    and the scope it closes over; materialized only where it is called."""

    def __init__(
        self,
        invocation: Invocation,
        building_block: building_blocks.ComputationBuildingBlock,
        scope: Scope,
    ) -> None:
        super().__init__(invocation, building_block.type_signature)
        self.building_block = building_block
        self.scope = scope

    async def compute(self) -> object:
        raise TypeError(
            f"a function value ({self.building_block.compact_representation()[:80]}) cannot be "
            "computed into a Python value"
        )
