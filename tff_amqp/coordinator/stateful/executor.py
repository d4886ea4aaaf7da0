"""The coordinator's executor: TFF's executor API over silos.

`AmqpExecutor` is the reference-resolving layer: it evaluates the compiled
computation (lambdas, blocks, references, structs, selections, calls) on the
coordinator, and hands every intrinsic call to the federating strategy, which
decides where the work runs. Compiled TensorFlow computations that are not
arguments of intrinsics run on the coordinator's local worker.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tensorflow_federated.proto.v0 import computation_pb2
from tensorflow_federated.python.common_libs import structure
from tensorflow_federated.python.core.impl.compiler import building_blocks
from tensorflow_federated.python.core.impl.computation import computation_impl
from tensorflow_federated.python.core.impl.executors import executor_base, value_serialization
from tensorflow_federated.python.core.impl.types import computation_types, placements

from tff_amqp.coordinator.stateful.invocation import Invocation
from tff_amqp.coordinator.stateful.local import serialize_typed
from tff_amqp.coordinator.stateful.scope import EMPTY_SCOPE, Scope
from tff_amqp.coordinator.stateful.strategy import FederatingStrategy
from tff_amqp.coordinator.stateful.values import (
    ClientsValue,
    CoordinatorValue,
    FunctionValue,
    HostValue,
    LocalValue,
    SerializedValue,
    StructValue,
)
from tff_amqp.data_reference import SiloDataReference

_FUNCTIONAL = (
    building_blocks.Lambda,
    building_blocks.CompiledComputation,
    building_blocks.Intrinsic,
    building_blocks.Data,
    building_blocks.Placement,
)


class AmqpExecutor(executor_base.Executor):
    """Executor for one invocation (TFF creates one per call)."""

    def __init__(self, invocation: Invocation) -> None:
        self.invocation = invocation
        self.strategy = FederatingStrategy(self)

    def close(self) -> None:
        # The execution context closes the invocation when the call ends.
        pass

    # --------------------------------------------------------- executor API

    async def create_value(self, value: Any, type_spec: Any = None) -> CoordinatorValue:
        if isinstance(value, CoordinatorValue):
            return value
        if isinstance(value, computation_impl.ConcreteComputation):
            parsed = self.invocation.runtime.parsed
            bb = parsed.get(value)
            if bb is None:
                proto = computation_impl.ConcreteComputation.get_proto(value)
                bb = building_blocks.ComputationBuildingBlock.from_proto(proto)
                parsed.put(value, bb)
            return self.evaluate_functional(bb, EMPTY_SCOPE)
        if isinstance(value, computation_pb2.Computation):
            bb = building_blocks.ComputationBuildingBlock.from_proto(value)
            return self.evaluate_functional(bb, EMPTY_SCOPE)
        type_spec = computation_types.to_type(type_spec) if type_spec is not None else None
        if type_spec is None:
            raise TypeError(f"a type is required to embed a value of type {type(value).__name__}")
        if isinstance(value, SiloDataReference):
            if not isinstance(type_spec, computation_types.FederatedType):
                raise TypeError(f"{value!r} must be passed as a CLIENTS-placed argument")
            return await self.invocation.create_silo_data(value.key, type_spec)
        if isinstance(type_spec, computation_types.FederatedType):
            if type_spec.placement is placements.CLIENTS:
                return await self.invocation.create_clients_value(value, type_spec)
        elif isinstance(type_spec, computation_types.StructType) and _has_clients(type_spec):
            elements = structure.iter_elements(structure.from_container(value))
            created = await asyncio.gather(
                *(
                    self.create_value(v, t)
                    for (_, v), (_, t) in zip(elements, structure.iter_elements(type_spec))
                )
            )
            names = structure.name_list_with_nones(type_spec)
            return StructValue(self.invocation, list(zip(names, created)))
        # Serialized once, here (inline when small), and kept as bytes: they
        # are what silos receive, and the worker gets them only if it needs
        # the value, so a large model is never computed back out of it.
        serialized, type_spec = await serialize_typed(value, type_spec)
        return SerializedValue(self.invocation, serialized, type_spec)

    async def create_call(
        self, comp: CoordinatorValue, arg: CoordinatorValue | None = None
    ) -> CoordinatorValue:
        return await self.call(comp, arg)

    async def create_struct(self, elements: Any) -> StructValue:
        items = structure.iter_elements(structure.from_container(elements))
        return StructValue(self.invocation, [(name, value) for name, value in items])

    async def create_selection(self, source: CoordinatorValue, index: int) -> CoordinatorValue:
        return await self.select(source, index)

    # ---------------------------------------------------- reference resolving

    async def evaluate(
        self, bb: building_blocks.ComputationBuildingBlock, scope: Scope
    ) -> CoordinatorValue:
        # Entering and leaving are steps of this invocation: outboxes hold a
        # batch while its branches still take them (see outbox.Activity).
        activity = self.invocation.activity
        activity.step()
        try:
            return await self._evaluate(bb, scope)
        finally:
            activity.step()

    async def _evaluate(
        self, bb: building_blocks.ComputationBuildingBlock, scope: Scope
    ) -> CoordinatorValue:
        if isinstance(bb, building_blocks.Reference):
            return await scope.lookup(bb.name)
        if isinstance(bb, building_blocks.Block):
            return await self._evaluate_block(bb, scope)
        if isinstance(bb, building_blocks.Call):
            fn = await self.evaluate(bb.function, scope)
            arg = await self.evaluate(bb.argument, scope) if bb.argument is not None else None
            return await self.call(fn, arg)
        if isinstance(bb, building_blocks.Struct):
            elements = [e for _, e in structure.iter_elements(bb)]
            values = [self._evaluate_now(e, scope) for e in elements]
            waiting = [i for i, v in enumerate(values) if v is None]
            if len(waiting) == 1:
                values[waiting[0]] = await self.evaluate(elements[waiting[0]], scope)
            elif waiting:
                got = await asyncio.gather(*(self.evaluate(elements[i], scope) for i in waiting))
                for i, value in zip(waiting, got):
                    values[i] = value
            names = structure.name_list_with_nones(bb)
            return StructValue(self.invocation, list(zip(names, values)))  # type: ignore[arg-type]
        if isinstance(bb, building_blocks.Selection):
            source = await self.evaluate(bb.source, scope)
            return await self.select(source, bb.as_index())
        if isinstance(bb, building_blocks.Literal):
            return await self.invocation.create_local(
                value_serialization.serialize_value(bb.proto, bb.type_signature)[0],
                bb.type_signature,
            )
        return self.evaluate_functional(bb, scope)

    def _evaluate_now(
        self, bb: building_blocks.ComputationBuildingBlock, scope: Scope
    ) -> CoordinatorValue | None:
        """`evaluate(bb, scope)` when nothing needs waiting for: a function, a
        reference to a value already there, a struct or selection of such;
        None otherwise. Spares a task per struct element and block local,
        most of which are just these."""
        if isinstance(bb, building_blocks.Reference):
            return scope.lookup_now(bb.name)
        if isinstance(bb, _FUNCTIONAL):
            return FunctionValue(self.invocation, bb, scope)
        if isinstance(bb, building_blocks.Selection):
            source = self._evaluate_now(bb.source, scope)
            if isinstance(source, StructValue):
                return source.elements[bb.as_index()][1]
            return None
        if isinstance(bb, building_blocks.Struct):
            elements = [self._evaluate_now(e, scope) for _, e in structure.iter_elements(bb)]
            if any(e is None for e in elements):
                return None
            names = structure.name_list_with_nones(bb)
            return StructValue(self.invocation, list(zip(names, elements)))  # type: ignore[arg-type]
        return None

    def evaluate_functional(
        self, bb: building_blocks.ComputationBuildingBlock, scope: Scope
    ) -> CoordinatorValue:
        if isinstance(bb, _FUNCTIONAL):
            return FunctionValue(self.invocation, bb, scope)
        raise NotImplementedError(f"unsupported computation building block {type(bb).__name__}")

    async def _evaluate_block(self, bb: building_blocks.Block, scope: Scope) -> CoordinatorValue:
        # Locals run as concurrent tasks: independent aggregations overlap and
        # their requests share broker round trips; references wait as needed.
        tasks: list[asyncio.Task[CoordinatorValue]] = []
        try:
            for name, local in bb.locals:
                now = self._evaluate_now(local, scope)
                if now is not None:
                    scope = scope.bind(name, now)
                    continue
                task = asyncio.create_task(self.evaluate(local, scope))
                tasks.append(task)
                scope = scope.bind(name, task)
            return await self.evaluate(bb.result, scope)
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def call(self, fn: CoordinatorValue, arg: CoordinatorValue | None) -> CoordinatorValue:
        if isinstance(fn, FunctionValue):
            bb = fn.building_block
            if isinstance(bb, building_blocks.Intrinsic):
                return await self.strategy.call(bb, arg)
            if isinstance(bb, building_blocks.Lambda):
                scope = fn.scope
                if bb.parameter_name is not None:
                    if arg is None:
                        raise TypeError(f"lambda {bb.parameter_name!r} called without argument")
                    scope = scope.bind(bb.parameter_name, arg)
                return await self.evaluate(bb.result, scope)
        result_type = fn.type_signature.result  # type: ignore[attr-defined]
        return await self.call_locally(fn, arg, result_type)

    async def call_locally(
        self,
        fn: CoordinatorValue,
        arg: CoordinatorValue | None,
        result_type: computation_types.Type,
    ) -> LocalValue | HostValue:
        """Run a call on the coordinator's worker (unplaced / SERVER work);
        a small constant (a mean's weight 1.0, a sum's zero) is computed
        here instead, and shipped as its value."""
        invocation = self.invocation
        if arg is None:
            is_constant, constant = invocation.runtime.host_constant(fn)
            if is_constant:
                return HostValue(invocation, constant, result_type)
        fn_ref = await invocation.to_local(fn)
        arg_ref = await invocation.to_local(arg) if arg is not None else None
        ref = await invocation.local_call(fn_ref, arg_ref)
        producer = fn if arg is None and isinstance(fn, FunctionValue) else None
        return LocalValue(invocation, ref, result_type, producer=producer)

    async def select(self, source: CoordinatorValue, index: int) -> CoordinatorValue:
        if isinstance(source, StructValue):
            return source.elements[index][1]
        type_spec = source.type_signature
        if not isinstance(type_spec, computation_types.StructType):
            raise TypeError(f"cannot select [{index}] from a value of type {type_spec}")
        element_type = type_spec[index]
        if isinstance(source, LocalValue):
            ref = await self.invocation.local_selection(source.ref, index)
            return LocalValue(self.invocation, ref, element_type)
        if isinstance(source, HostValue):
            return HostValue(self.invocation, source.value[index], element_type)  # type: ignore[index]
        if isinstance(source, SerializedValue):
            ref = await self.invocation.local_selection(
                await self.invocation.to_local(source), index
            )
            return LocalValue(self.invocation, ref, element_type)
        if isinstance(source, ClientsValue):
            raise TypeError("selection from a CLIENTS-placed value is not expected here")
        raise TypeError(f"cannot select from {type(source).__name__}")


def _has_clients(type_spec: computation_types.Type) -> bool:
    if isinstance(type_spec, computation_types.FederatedType):
        return type_spec.placement is placements.CLIENTS
    if isinstance(type_spec, computation_types.StructType):
        return any(_has_clients(t) for _, t in structure.iter_elements(type_spec))
    return False
