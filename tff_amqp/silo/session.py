"""State of one invocation at a silo, and the silo's privacy boundary.

The coordinator names every value with an integer id; the session maps those
ids to references inside the silo's local ``worker_binary`` and applies batch
operations in order. It also decides what may leave the silo: only values
produced by federated aggregation intrinsics (and values the coordinator sent
itself), unless the silo was started with ``--allow-raw-client-values``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from tff_amqp import protocol as p
from tff_amqp.worker import WorkerClient, WorkerError, WorkerExecutor

log = logging.getLogger(__name__)

# Intrinsics whose SERVER-placed output is an aggregate over the silo's
# clients: the only client-derived values a silo releases by default.
AGGREGATION_URIS = frozenset(
    {
        "federated_aggregate",
        "federated_sum",
        "federated_mean",
        "federated_weighted_mean",
        "federated_min",
        "federated_max",
        "federated_secure_sum",
        "federated_secure_sum_bitwidth",
    }
)


class SessionError(Exception):
    """An operation failed; carries the protocol error code for the reply."""

    def __init__(self, code: p.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class PrivacyPolicy:
    """What the silo lets leave it."""

    allow_raw_client_values: bool = False
    min_clients_per_aggregate: int = 1


# Resolves (data key, serialized CLIENTS type) to (client count, serialized Value).
DataResolver = Callable[[str, bytes], tuple[int, bytes]]
# Client count of the silo's data under a key (for Open(data_key=...)).
ClientCounter = Callable[[str | None], int]


class InvocationSession:
    """Per-invocation handles and provenance at one silo."""

    def __init__(
        self,
        *,
        silo: str,
        invocation_id: str,
        worker: WorkerClient,
        policy: PrivacyPolicy,
        resolve_data: DataResolver,
        count_clients: ClientCounter,
        deadline: float,
    ) -> None:
        self.silo = silo
        self.invocation_id = invocation_id
        self.deadline = deadline
        self._worker = worker
        self._policy = policy
        self._resolve_data = resolve_data
        self._count_clients = count_clients
        self._executor: WorkerExecutor | None = None
        self._clients: int | None = None
        self._refs: dict[int, object] = {}
        # ids of values that may leave the silo under the default policy
        self._releasable: set[int] = set()
        # ids of values that are aggregation intrinsics (their calls are releasable)
        self._aggregators: set[int] = set()
        self._last_seq = -1
        self.failed: SessionError | None = None
        self.closed = False

    @property
    def clients(self) -> int | None:
        return self._clients

    def is_duplicate(self, seq: int) -> bool:
        return seq <= self._last_seq

    async def apply(self, batch: p.Batch) -> dict[int, bytes]:
        """Apply a batch in order; return the values its Compute ops release."""
        if self.failed is not None:
            raise self.failed
        self._last_seq = batch.seq
        released: dict[int, bytes] = {}
        op: p.Operation | None = None
        try:
            for op in batch.operations:
                value = await self._apply_one(op)
                if value is not None:
                    released[op.source] = value  # type: ignore[attr-defined]
        except SessionError as e:
            self.failed = e
            raise
        except WorkerError as e:
            self.failed = SessionError(
                p.ErrorCode.EXECUTION, f"silo {self.silo!r}, operation {_describe(op)}: {e}"
            )
            raise self.failed from e
        return released

    async def _apply_one(self, op: p.Operation) -> bytes | None:
        match op:
            case p.Open():
                await self._open(op)
            case p.CreateValue():
                await self._create_value(op)
            case p.CreateData():
                await self._create_data(op)
            case p.CreateCall():
                await self._create_call(op)
            case p.CreateStruct():
                executor = self._require_executor()
                elements = [(name, self._ref(ref)) for name, ref in op.elements]
                self._bind(op.target, await executor.create_struct(elements))
                if all(ref in self._releasable for _, ref in op.elements):
                    self._releasable.add(op.target)
            case p.CreateSelection():
                executor = self._require_executor()
                self._bind(
                    op.target, await executor.create_selection(self._ref(op.source), op.index)
                )
                if op.source in self._releasable:
                    self._releasable.add(op.target)
            case p.Compute():
                return await self._compute(op)
            case p.Dispose():
                await self._dispose(op.targets)
            case p.Close():
                await self.close()
            case _:
                raise SessionError(p.ErrorCode.UNKNOWN_OPERATION, f"unsupported operation {op!r}")
        return None

    async def _open(self, op: p.Open) -> None:
        if self._executor is not None:
            raise SessionError(p.ErrorCode.MALFORMED, "invocation already opened")
        if op.clients is not None:
            clients = op.clients
        else:
            try:
                clients = self._count_clients(op.data_key)
            except Exception as e:
                raise SessionError(p.ErrorCode.DATA, str(e)) from e
        self._clients = clients
        self._executor = await self._worker.get_executor(clients)
        log.debug(
            "opened invocation",
            extra={"invocation": self.invocation_id, "clients": clients},
        )

    async def _create_value(self, op: p.CreateValue) -> None:
        from tensorflow_federated.proto.v0 import executor_pb2

        executor = self._require_executor()
        value = executor_pb2.Value()
        try:
            value.ParseFromString(op.value)
        except Exception as e:
            raise SessionError(
                p.ErrorCode.MALFORMED, f"value {op.target}: not a TFF Value: {e}"
            ) from e
        self._bind(op.target, await executor.create_value(value))
        self._releasable.add(op.target)
        if value.WhichOneof("value") == "computation":
            comp = value.computation
            if (
                comp.WhichOneof("computation") == "intrinsic"
                and comp.intrinsic.uri in AGGREGATION_URIS
            ):
                self._aggregators.add(op.target)

    async def _create_data(self, op: p.CreateData) -> None:
        from tensorflow_federated.proto.v0 import executor_pb2

        executor = self._require_executor()
        try:
            count, serialized = await asyncio.to_thread(self._resolve_data, op.key, op.type_spec)
        except SessionError:
            raise
        except Exception as e:
            raise SessionError(p.ErrorCode.DATA, str(e)) from e
        if count != self._clients:
            raise SessionError(
                p.ErrorCode.DATA,
                f"silo {self.silo!r}: data {op.key!r} has {count} clients but this invocation "
                f"was opened for {self._clients}; every silo_data argument of one invocation "
                "must have the same number of clients at a silo",
            )
        value = executor_pb2.Value.FromString(serialized)
        # Client data never becomes releasable by itself.
        self._bind(op.target, await executor.create_value(value))

    async def _create_call(self, op: p.CreateCall) -> None:
        executor = self._require_executor()
        fn = self._ref(op.fn)
        arg = self._ref(op.arg) if op.arg is not None else None
        is_aggregation = op.fn in self._aggregators
        if is_aggregation and (self._clients or 0) < self._policy.min_clients_per_aggregate:
            raise SessionError(
                p.ErrorCode.PRIVACY,
                f"silo {self.silo!r} refuses to aggregate over {self._clients} client(s): "
                f"its policy requires at least {self._policy.min_clients_per_aggregate}",
            )
        self._bind(op.target, await executor.create_call(fn, arg))
        if is_aggregation:
            self._releasable.add(op.target)

    async def _compute(self, op: p.Compute) -> bytes:
        executor = self._require_executor()
        ref = self._ref(op.source)
        if op.source not in self._releasable and not self._policy.allow_raw_client_values:
            raise SessionError(
                p.ErrorCode.PRIVACY,
                f"silo {self.silo!r} refuses to release value {op.source}: it is not the output "
                "of a federated aggregation over its clients. Only aggregates leave a silo; "
                "start the silo with --allow-raw-client-values to permit this (simulation and "
                "testing only)",
            )
        value = await executor.compute(ref)
        return value.SerializeToString()

    async def _dispose(self, targets: tuple[int, ...]) -> None:
        refs = [self._refs.pop(t) for t in targets if t in self._refs]
        for t in targets:
            self._releasable.discard(t)
            self._aggregators.discard(t)
        if refs and self._executor is not None:
            await self._executor.dispose(refs)

    async def close(self) -> None:
        """Free everything this invocation holds; idempotent, never raises."""
        if self.closed:
            return
        self.closed = True
        self._refs.clear()
        self._releasable.clear()
        self._aggregators.clear()
        if self._executor is not None:
            executor, self._executor = self._executor, None
            try:
                await executor.close()
            except Exception:  # the worker may already be gone
                log.debug("closing worker executor failed", exc_info=True)

    def _require_executor(self) -> WorkerExecutor:
        if self._executor is None:
            raise SessionError(
                p.ErrorCode.MALFORMED,
                "the first operation of an invocation must be 'open'"
                + (" (it is closed)" if self.closed else ""),
            )
        return self._executor

    def _ref(self, value_id: int) -> object:
        try:
            return self._refs[value_id]
        except KeyError:
            raise SessionError(
                p.ErrorCode.BAD_REFERENCE,
                f"silo {self.silo!r} has no value {value_id} in invocation {self.invocation_id}",
            ) from None

    def _bind(self, value_id: int, ref: object) -> None:
        if value_id in self._refs:
            raise SessionError(p.ErrorCode.BAD_REFERENCE, f"value id {value_id} is already in use")
        self._refs[value_id] = ref


def _describe(op: p.Operation | None) -> str:
    if op is None:
        return "?"
    target = getattr(op, "target", None)
    return f"{op.op}" + (f" -> #{target}" if target is not None else "")
