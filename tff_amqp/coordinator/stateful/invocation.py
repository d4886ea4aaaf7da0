"""One invocation of a computation: a thin composition of its parts.

- `Cohort` (cohort.py): the silos, chosen once, their outboxes, drops;
- `Shipping` (shipping.py): values and calls into the silos;
- `SiloGather` (gather.py): waiting for replies, K of N, quorum errors;
- `LocalExecutor` (local.py): SERVER and unplaced values in the
  coordinator's TFF worker.

The invocation itself owns the lifecycle (started at creation, `close()`
bounded and always run by the context) and wraps the parts' ids and
references in values. It never moves a CLIENTS value to the coordinator
except through a silo's release, which the silo's privacy policy governs.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.core.impl.compiler import building_blocks
from tensorflow_federated.python.core.impl.types import computation_types

from tff_amqp.coordinator.stateful.cohort import Cohort, InvocationClock, InvocationScope
from tff_amqp.coordinator.stateful.gather import SiloGather
from tff_amqp.coordinator.stateful.local import LocalExecutor
from tff_amqp.coordinator.stateful.outbox import Activity, OutboxChannel, SiloOutbox
from tff_amqp.coordinator.stateful.shipping import Shipping
from tff_amqp.coordinator.stateful.values import (
    ClientsValue,
    CoordinatorValue,
    FunctionValue,
    LocalValue,
)

if TYPE_CHECKING:
    from tff_amqp.coordinator.stateful.runtime import CoordinatorRuntime


class Invocation:
    """State of one invocation across the coordinator and its cohort."""

    def __init__(self, runtime: CoordinatorRuntime, clients: int | None) -> None:
        self.runtime = runtime
        self.id = uuid.uuid4().hex
        self.clock = InvocationClock.start(runtime.options.deadline)
        self.events = runtime.events
        self.closed = False
        # Outboxes see only this channel. Everything in it is looked up when
        # used: the runtime owns the link and bulk, and gather and shipping
        # are built below (an outbox exists only once the cohort is chosen).
        self.activity = Activity()
        channel = OutboxChannel(
            sender=runtime.options.coordinator_name,
            invocation_id=self.id,
            deadline_epoch=self.clock.deadline_epoch,
            max_message_bytes=runtime.options.max_message_bytes,
            publish=lambda silo, envelope, expect_reply: runtime.link.send(
                silo, envelope, expect_reply=expect_reply
            ),
            # Pinned like replies: chunks only from the process asked.
            expect_chunks=lambda corr, silo, inv: runtime.bulk.expect(
                corr, silo, inv, runtime.membership.instance_of(silo) or None
            ),
            wait_for_reply=lambda silo, future: self.gather.wait_for_silo(silo, future),
            receive_blob=lambda silo, blob: self.shipping.receive_blob(silo, blob),
            activity=self.activity,
            defer_close=lambda silo, seq: runtime.link.defer_close(
                silo, self.id, seq, self.clock.deadline_epoch
            ),
        )
        self.cohort = Cohort(runtime, self.id, self.clock, clients, channel)
        self.local = LocalExecutor(runtime)
        scope = InvocationScope(runtime, self.id, self.clock, self.cohort)
        self.shipping = Shipping(scope, self.local)
        self.gather = SiloGather(scope)
        self.events.invocation_started(self.id)

    @property
    def started(self) -> float:
        return self.clock.started

    def describe_wait(self) -> str:
        """Where the invocation stands, for an error raised at its deadline."""
        return self.gather.describe_wait()

    async def outbox(self, silo: str) -> SiloOutbox:
        return await self.cohort.outbox(silo)

    # ------------------------------------------------------------ local side

    async def create_local(
        self, value: executor_pb2.Value, type_spec: computation_types.Type
    ) -> LocalValue:
        return LocalValue(self, await self.local.create_value(value), type_spec)

    async def local_call(self, fn: Any, arg: Any | None) -> Any:
        return await self.local.create_call(fn, arg)

    async def local_selection(self, source: Any, index: int) -> Any:
        return await self.local.create_selection(source, index)

    async def compute_local(self, value: LocalValue) -> object:
        return await self.local.compute(value)

    async def to_local(self, value: CoordinatorValue) -> Any:
        """A reference to `value` inside the coordinator's worker."""
        return await self.local.to_local(value)

    # ------------------------------------------------------------- silo side

    async def to_silo(self, value: CoordinatorValue, silo: str) -> int:
        """The id of `value` at `silo`, sending it there once if needed."""
        return await self.shipping.to_silo(value, silo)

    async def ship_to(self, value: LocalValue, silos: Sequence[str]) -> dict[str, int]:
        return await self.shipping.ship_to(value, silos)

    async def call_at_silos(
        self,
        fn: CoordinatorValue,
        arg: CoordinatorValue | None,
        result_type: computation_types.Type,
    ) -> ClientsValue:
        return ClientsValue(self, await self.shipping.call(fn, arg), result_type)

    async def create_clients_value(
        self, value: object, type_spec: computation_types.FederatedType
    ) -> ClientsValue:
        return ClientsValue(self, await self.shipping.clients_value(value, type_spec), type_spec)

    async def create_silo_data(
        self, key: str, type_spec: computation_types.FederatedType
    ) -> ClientsValue:
        return ClientsValue(self, await self.shipping.silo_data(key, type_spec), type_spec)

    async def gather_from_silos(self, value: ClientsValue) -> dict[str, executor_pb2.Value]:
        return await self.gather.gather(value.ids)

    async def release_clients_value(self, value: ClientsValue) -> object:
        type_spec = value.type_signature
        assert isinstance(type_spec, computation_types.FederatedType)
        return await self.gather.release(value.ids, type_spec)

    # ---------------------------------------------------------------- ending

    async def close(self) -> None:
        """Free the invocation's state everywhere. Bounded, never raises."""
        if self.closed:
            return
        self.closed = True
        await self.cohort.close()
        self.runtime.link.forget_invocation(self.id)
        self.runtime.bulk.forget_invocation(self.id)
        self.shipping.cancel()
        self.local.cancel()
        await self.local.dispose()
        self.shipping.release()


def function_proto(value: FunctionValue) -> executor_pb2.Value:
    bb = value.building_block
    if isinstance(bb, building_blocks.Lambda | building_blocks.Block) and not value.scope.is_empty:
        free = _free_references(bb)
        if free:
            raise NotImplementedError(
                f"cannot ship a function that closes over {sorted(free)}; tff-amqp sends only "
                "closed functions (the native compiler produces these)"
            )
    return executor_pb2.Value(computation=bb.proto)


def _free_references(bb: building_blocks.ComputationBuildingBlock) -> set[str]:
    from tensorflow_federated.python.core.impl.compiler import transformation_utils

    return set(transformation_utils.get_map_of_unbound_references(bb)[bb])
