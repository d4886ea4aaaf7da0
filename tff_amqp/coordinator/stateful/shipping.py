"""Values into the silos of one invocation: server values and functions
materialized at a silo once, client arguments split across the cohort,
calls placed at every active silo, and large values as chunked transfers
(a value every silo needs is published once, the broker fans it out)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tensorflow_federated.python.common_libs import structure
from tensorflow_federated.python.core.impl.types import (
    computation_types,
    placements,
    type_serialization,
)

from tff_amqp import protocol as p
from tff_amqp.coordinator.stateful import values
from tff_amqp.coordinator.stateful.local import serialize_host
from tff_amqp.errors import SiloError
from tff_amqp.transport.bulk import TransferError

if TYPE_CHECKING:
    from tff_amqp.coordinator.stateful.cohort import InvocationScope
    from tff_amqp.coordinator.stateful.local import LocalExecutor


class Shipping:
    """Creates values and calls at the cohort's silos; returns their ids per
    silo (the invocation wraps them in values)."""

    def __init__(self, scope: InvocationScope, local: LocalExecutor) -> None:
        self._scope = scope
        self._local = local
        # (id(value), silo) -> its id there; values kept alive in _pins
        self._at_silo: dict[tuple[int, str], asyncio.Future[int]] = {}
        # (key, silos) -> chunked transfer of a large value, published once
        # for all those silos (the broker fans it out)
        self._uploads: dict[tuple[object, tuple[str, ...]], asyncio.Future[p.BlobRef]] = {}
        self._pins: list[object] = []

    async def to_silo(self, value: values.CoordinatorValue, silo: str) -> int:
        """The id of `value` at `silo`, sending it there once if needed."""
        now = self._at_silo_now(value, silo)
        if now is not None:
            return now
        if isinstance(value, values.ClientsValue):
            if silo not in value.ids:
                raise SiloError(silo, "bad_reference", f"value is not present at silo {silo!r}")
            return value.ids[silo]
        key = (id(value), silo)
        if key not in self._at_silo:
            self._pins.append(value)
            self._at_silo[key] = asyncio.ensure_future(self._materialize_at_silo(value, silo))
        return await self._at_silo[key]

    def _at_silo_now(self, value: values.CoordinatorValue, silo: str) -> int | None:
        """`to_silo` without waiting, when nothing needs waiting for: the value
        is there already, or it is small and at hand (a function, serialized
        bytes, a struct of such) and the silo's outbox is open; None
        otherwise. Most values of an invocation take this path: a task per
        value and silo was most of the coordinator's tasks."""
        if isinstance(value, values.ClientsValue):
            return value.ids.get(silo)
        key = (id(value), silo)
        known = self._at_silo.get(key)
        if known is not None:
            if known.done() and not known.cancelled() and known.exception() is None:
                return known.result()
            return None
        outbox = self._scope.cohort.outbox_now(silo)
        if outbox is None:
            return None
        if isinstance(value, values.StructValue):
            ids = [self._at_silo_now(v, silo) for _, v in value.elements]
            if any(i is None for i in ids):
                return None
            made = outbox.create_struct([(name, i) for (name, _), i in zip(value.elements, ids)])  # type: ignore[misc]
        else:
            serialized: bytes | None = None
            if isinstance(value, values.FunctionValue):
                _, serialized = self._scope.runtime.function_wire(value)
            elif isinstance(value, values.LocalValue | values.HostValue | values.SerializedValue):
                serialized = self._local.serialized_now(value)
            if serialized is None or len(serialized) > self._scope.runtime.bulk.inline_limit:
                return None
            made = outbox.create_value(serialized)
        self._pins.append(value)
        done = asyncio.get_running_loop().create_future()
        done.set_result(made)
        self._at_silo[key] = done
        return made

    async def _materialize_at_silo(self, value: values.CoordinatorValue, silo: str) -> int:
        if isinstance(value, values.StructValue):
            ids = await asyncio.gather(*(self.to_silo(v, silo) for _, v in value.elements))
            outbox = await self._scope.cohort.outbox(silo)
            return outbox.create_struct([(name, i) for (name, _), i in zip(value.elements, ids)])
        if isinstance(value, values.FunctionValue):
            _, serialized = self._scope.runtime.function_wire(value)
        elif isinstance(value, values.LocalValue | values.HostValue | values.SerializedValue):
            # Server values are computed and serialized once, then shipped.
            serialized = await self._local.serialized(value)
        else:
            raise TypeError(f"cannot send {type(value).__name__} to a silo")
        return await self._ship(id(value), serialized, silo)

    async def _ship(
        self, key: object, serialized: bytes, silo: str, *, broadcast: bool = True
    ) -> int:
        """Create a serialized value at `silo`: inline if small, else as a
        chunked transfer. A `broadcast` value is needed by every active silo,
        so its transfer is published once for all of them (keyed by `key`)."""
        outbox = await self._scope.cohort.outbox(silo)
        if len(serialized) <= self._scope.runtime.bulk.inline_limit:
            return outbox.create_value(serialized)
        silos = tuple(self._scope.cohort.active()) if broadcast else (silo,)
        if silo not in silos:
            silos = (silo,)
        blob = await self._upload(key, serialized, silos)
        return outbox.create_blob_value(blob)

    async def _upload(self, key: object, data: bytes, silos: tuple[str, ...]) -> p.BlobRef:
        upload = self._uploads.get((key, silos))
        if upload is None:
            upload = asyncio.ensure_future(
                self._scope.runtime.bulk.send(
                    data,
                    silos,
                    invocation_id=self._scope.invocation_id,
                    deadline=self._scope.clock.deadline_epoch,
                )
            )
            self._uploads[(key, silos)] = upload
        return await upload

    async def ship_to(
        self,
        value: values.LocalValue | values.HostValue | values.SerializedValue,
        silos: Sequence[str],
    ) -> dict[str, int]:
        """Create a server value at just these silos (its id at each); if large,
        one transfer published once for all of them."""
        serialized = await self._local.serialized(value)
        self._pins.append(value)
        ids: dict[str, int] = {}
        for silo in silos:
            outbox = await self._scope.cohort.outbox(silo)
            if len(serialized) <= self._scope.runtime.bulk.inline_limit:
                ids[silo] = outbox.create_value(serialized)
            else:
                blob = await self._upload(id(value), serialized, tuple(silos))
                ids[silo] = outbox.create_blob_value(blob)
        return ids

    async def receive_blob(self, silo: str, blob: p.BlobRef) -> bytearray:
        """A silo's large result, sent as a chunked transfer (bounded by the
        invocation's deadline)."""
        try:
            return await self._scope.runtime.bulk.receive(
                silo,
                blob,
                invocation_id=self._scope.invocation_id,
                timeout=self._scope.clock.remaining(),
            )
        except TransferError as e:
            raise SiloError(silo, str(e.code), str(e)) from e

    async def call(
        self, fn: values.CoordinatorValue, arg: values.CoordinatorValue | None
    ) -> dict[str, int]:
        """Place the call `fn(arg)` at every active silo; its id at each."""
        await self._scope.cohort.silos()
        silos = self._scope.cohort.active()

        async def at(silo: str) -> int:
            fn_id = await self.to_silo(fn, silo)
            arg_id = await self.to_silo(arg, silo) if arg is not None else None
            return (await self._scope.cohort.outbox(silo)).create_call(fn_id, arg_id)

        ids: dict[str, int] = {}
        waiting: list[str] = []
        for silo in silos:
            # Without a task per silo when the function and argument are at hand.
            fn_id = self._at_silo_now(fn, silo)
            arg_id = self._at_silo_now(arg, silo) if arg is not None else None
            outbox = self._scope.cohort.outbox_now(silo)
            if fn_id is None or (arg is not None and arg_id is None) or outbox is None:
                waiting.append(silo)
            else:
                ids[silo] = outbox.create_call(fn_id, arg_id)
        if waiting:
            ids.update(zip(waiting, await asyncio.gather(*(at(s) for s in waiting))))
        return {silo: ids[silo] for silo in silos}

    async def clients_value(
        self, value: object, type_spec: computation_types.FederatedType
    ) -> dict[str, int]:
        """A CLIENTS argument at the silos: an all-equal value once for all,
        a list of client values split in contiguous parts."""
        silos = await self._scope.cohort.silos()
        if type_spec.all_equal:
            # One value for every silo: serialized once, shipped once.
            serialized = await serialize_host(value, type_spec)
            key = object()
            return {silo: await self._ship(key, serialized, silo) for silo in silos}

        async def part_for(silo: str) -> bytes:
            if not isinstance(value, list | tuple):
                raise TypeError(
                    f"a CLIENTS-placed argument must be a list of client values or "
                    f"tff_amqp.silo_data(KEY); got {type(value).__name__}"
                )
            chunk = self._scope.cohort.assignment.chunks
            if chunk is None:
                raise ValueError("client lists need a known CLIENTS cardinality")
            start, stop = chunk[silo]
            part = list(value[start:stop])
            return await serialize_host(part, type_spec)

        parts = await asyncio.gather(*(part_for(silo) for silo in silos))
        ids: dict[str, int] = {}
        for silo, serialized in zip(silos, parts):
            # Each silo's part is its own (unicast) transfer if large.
            ids[silo] = await self._ship(object(), serialized, silo, broadcast=False)
        return ids

    async def silo_data(
        self, key: str, type_spec: computation_types.FederatedType
    ) -> dict[str, int]:
        """`tff_amqp.silo_data(key)`: each silo's own data, which never moves."""
        if type_spec.placement is not placements.CLIENTS or type_spec.all_equal:
            raise TypeError(
                f"tff_amqp.silo_data({key!r}) stands for per-client data and must be passed "
                f"where a CLIENTS-placed (not all-equal) value is expected, not {type_spec}"
            )
        silos = await self._scope.cohort.silos()
        # Before anything is queued for a silo: a column a silo lacks is
        # refused here, naming the silo and column, not at the silos.
        self._scope.cohort.check_columns(key, _field_names(type_spec))
        type_bytes = type_serialization.serialize_type(type_spec).SerializeToString()
        ids = {}
        for silo in silos:
            outbox = await self._scope.cohort.outbox(silo, data_key=key)
            ids[silo] = outbox.create_data(key, type_bytes)
        return ids

    def cancel(self) -> None:
        """Stop transfers and materializations still in flight (closing)."""
        for future in [*self._uploads.values(), *self._at_silo.values()]:
            if not future.done():
                future.cancel()

    def release(self) -> None:
        self._pins.clear()


def _field_names(type_spec: computation_types.FederatedType) -> list[str]:
    """The column names a `{<a=..,b=..>*}@CLIENTS` type reads (none for others)."""
    member = type_spec.member
    if not isinstance(member, computation_types.SequenceType):
        return []
    element = member.element
    if not isinstance(element, computation_types.StructType):
        return []
    return [name for name, _ in structure.iter_elements(element) if name]
