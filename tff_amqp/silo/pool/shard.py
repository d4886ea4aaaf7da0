"""Running one work item on a local worker_binary: MapReduceForm `work` per
client of the shard, folded with `zero` / `accumulate` as TFF's own
`federated_aggregate` does (accumulate over clients, in client order)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from tff_amqp.tff_worker import WorkerExecutor

log = logging.getLogger(__name__)


def shard_bounds(clients: int, shard: int, shards: int) -> tuple[int, int]:
    """[start, stop) of the `shard`-th of `shards` contiguous, near-equal
    slices of `clients` clients (the first `clients % shards` get one more)."""
    base, extra = divmod(clients, shards)
    start = shard * base + min(shard, extra)
    return start, start + base + (1 if shard < extra else 0)


class ShardRunner:
    """Evaluates one shard inside an unplaced worker executor; frees every
    value it created."""

    MAX_CONCURRENT_CLIENTS = 8

    def __init__(self, executor: WorkerExecutor) -> None:
        self._executor = executor
        self._created: list[object] = []

    async def run(
        self,
        *,
        work: tuple[bytes, object],
        zero: tuple[bytes, object],
        accumulate: tuple[bytes, object],
        broadcast: object,
        client_data: Sequence[object],
        work_param_names: tuple[str | None, str | None],
        accumulate_param_names: tuple[str | None, str | None],
    ) -> object:
        """The shard's accumulator as an `executor_pb2.Value`.

        `work`, `zero`, `accumulate`: (serialized bytes, Value proto) of each
        computation; `broadcast` and each of `client_data`: Value protos."""
        ex = self._executor
        try:
            work_fn = await self._computation(*work)
            accumulate_fn = await self._computation(*accumulate)
            zero_fn = await self._computation(*zero)
            broadcast_ref = await self._track(ex.create_value(broadcast))  # type: ignore[arg-type]
            accumulator = await self._track(ex.create_call(zero_fn))

            # Bounded, so a shard of many clients does not load them all at once.
            concurrency = asyncio.Semaphore(self.MAX_CONCURRENT_CLIENTS)

            async def client_update(data: object) -> object:
                async with concurrency:
                    return await one_client(data)

            async def one_client(data: object) -> object:
                data_ref = await self._track(ex.create_value(data))  # type: ignore[arg-type]
                arg = await self._track(
                    ex.create_struct(
                        [(work_param_names[0], data_ref), (work_param_names[1], broadcast_ref)]
                    )
                )
                output = await self._track(ex.create_call(work_fn, arg))
                # work returns <aggregate input, 3 secure-sum inputs>; the
                # context refuses forms that use secure sums.
                return await self._track(ex.create_selection(output, 0))

            # Client work runs concurrently inside the worker; accumulation
            # folds in client order, like TFF's federated_aggregate.
            updates = [asyncio.ensure_future(client_update(d)) for d in client_data]
            try:
                for update in updates:
                    arg = await self._track(
                        ex.create_struct(
                            [
                                (accumulate_param_names[0], accumulator),
                                (accumulate_param_names[1], await update),
                            ]
                        )
                    )
                    accumulator = await self._track(ex.create_call(accumulate_fn, arg))
            finally:
                for update in updates:
                    update.cancel()
            return await ex.compute(accumulator)  # type: ignore[arg-type]
        finally:
            await self._free()

    async def _computation(self, serialized: bytes, value: object) -> object:
        ref, cached = await self._executor.create_computation(serialized, value)  # type: ignore[arg-type]
        if not cached:
            self._created.append(ref)
        return ref

    async def _track(self, awaitable: object) -> object:
        ref = await awaitable  # type: ignore[misc]
        self._created.append(ref)
        return ref

    async def _free(self) -> None:
        refs, self._created = self._created, []
        try:
            await self._executor.dispose(refs)  # type: ignore[arg-type]
        except Exception:  # the worker may be gone; nothing else to free
            log.debug("pool_worker.dispose_failed", exc_info=True)
