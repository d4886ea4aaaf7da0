"""Long-lived coordinator resources shared by invocations: the broker link,
silo membership and the coordinator's local worker_binary."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Coroutine
from typing import Any

from tensorflow_federated.proto.v0 import executor_pb2

from tff_amqp.coordinator.membership import Membership
from tff_amqp.coordinator.options import CoordinatorOptions
from tff_amqp.coordinator.runtime import SharedRuntime
from tff_amqp.coordinator.stateful.identity_cache import IdentityCache
from tff_amqp.coordinator.stateful.link import CoordinatorLink
from tff_amqp.coordinator.stateful.values import CoordinatorValue, FunctionValue
from tff_amqp.inprocess.numpy_ops import HostFn, constant_value, host_function

log = logging.getLogger(__name__)


class CoordinatorRuntime(SharedRuntime[CoordinatorLink, Membership]):
    """Starts lazily on the event loop that first uses it; `close()` frees
    the broker connections and stops the local worker."""

    loop_error = (
        "an AMQP execution context is bound to the event loop it first ran on; "
        "create one context per event loop"
    )

    def __init__(self, options: CoordinatorOptions) -> None:
        super().__init__(options, Membership(liveness_timeout=options.heartbeat_timeout))
        self.options = options
        # Intrinsic calls dispatched, by URI (what ran here, for docs and tests).
        self.intrinsic_calls: collections.Counter[str] = collections.Counter()
        self._background: set[asyncio.Task[None]] = set()
        # id(building block) -> (building block, Value proto, bytes); the block
        # is kept so its id cannot be reused while cached.
        self._function_wire: dict[int, tuple[object, executor_pb2.Value, bytes]] = {}
        # Parsed computations, per compiled computation object (the compiler
        # pipeline caches those, so repeated calls hit this cache).
        self.parsed: IdentityCache[object] = IdentityCache()
        # id(building block) -> (building block, its NumPy version or None).
        self._host_functions: dict[int, tuple[object, HostFn | None]] = {}
        self._constants: dict[int, tuple[object, tuple[bool, object]]] = {}

    def function_wire(self, value: FunctionValue) -> tuple[executor_pb2.Value, bytes]:
        """A function's Value proto and its serialized bytes, built once per
        building block (they are large, and the same ones ship every round)."""
        from tff_amqp.coordinator.stateful.invocation import function_proto
        from tff_amqp.coordinator.stateful.select import check_runnable

        key = id(value.building_block)
        entry = self._function_wire.get(key)
        if entry is None or entry[0] is not value.building_block:
            check_runnable(value.building_block)
            proto = function_proto(value)
            entry = (value.building_block, proto, proto.SerializeToString())
            if len(self._function_wire) >= 1024:
                self._function_wire.pop(next(iter(self._function_wire)))
            self._function_wire[key] = entry
        return entry[1], entry[2]

    def host_function(self, value: CoordinatorValue) -> HostFn | None:
        """`value` as a NumPy function (see numpy_ops), or None if it must run
        on the worker; decided once per building block."""
        if not isinstance(value, FunctionValue):
            return None
        key = id(value.building_block)
        entry = self._host_functions.get(key)
        if entry is None or entry[0] is not value.building_block:
            entry = (value.building_block, host_function(value.building_block))
            if len(self._host_functions) >= 1024:
                self._host_functions.pop(next(iter(self._host_functions)))
            self._host_functions[key] = entry
        return entry[1]

    def host_constant(self, value: CoordinatorValue) -> tuple[bool, object]:
        """(True, its value) if calling `value` with no argument gives a small
        constant (see numpy_ops.constant_value); decided once per block."""
        if not isinstance(value, FunctionValue):
            return False, None
        key = id(value.building_block)
        entry = self._constants.get(key)
        if entry is None or entry[0] is not value.building_block:
            entry = (value.building_block, constant_value(value.building_block))
            if len(self._constants) >= 1024:
                self._constants.pop(next(iter(self._constants)))
            self._constants[key] = entry
        return entry[1]

    def in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run clean-up work without blocking the caller; awaited by close()."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def settle(self, timeout: float = 10.0) -> None:
        """Wait (bounded) for background clean-up, e.g. earlier invocations'
        `close` messages, so counters read afterwards cover only new work."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout)
        if self._link is not None:
            await self._link.flush_closes(timeout)

    async def _connect(self) -> CoordinatorLink:
        link = CoordinatorLink(
            self.options.broker_url,
            self.topology,
            self.membership,
            max_message_bytes=self.options.max_message_bytes,
            sender=self.options.coordinator_name,
        )
        await link.start()
        return link

    def _on_started(self) -> None:
        log.info("coordinator.started", extra={"federation": self.options.federation})

    async def close(self) -> None:
        # Bounded: earlier invocations' clean-up (their `close` messages) first.
        if self._background:
            await asyncio.wait(self._background, timeout=10.0)
        await super().close()
