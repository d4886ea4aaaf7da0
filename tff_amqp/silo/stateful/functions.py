"""The functions a silo process was sent, by digest, so batches may name them.

A coordinator ships the same computations every round (a FedAvg round's are
~85 KB of its ~113 KB request per silo). Every function a batch carries in
full (a `CreateValue` of a computation) of at least the protocol's
NAMED_FUNCTION_MIN_BYTES (smaller ones always travel in full) is kept here
under its SHA-256; a
later batch names it with `CreateKnownFunction`, which becomes that
`CreateValue` again before any session sees the batch. Batches are taken in
the order the silo's queue delivers them, which is the order the coordinator
sent them, so what the coordinator learned the silo holds is a prefix of what
this store touched last; the coordinator tracks a quarter of this store's
bounds (tff_amqp/coordinator/stateful/known_functions.py), so what it names
is still here. A digest that is not (a silo restarted since, or an
unexpected second coordinator) refuses the batch with MISSING_FUNCTIONS
before anything runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import OrderedDict

from tff_amqp import protocol as p
from tff_amqp.tff_worker.client import serialized_is_computation

# Bounds of the store (the protocol's promise; the coordinator names at most
# a quarter of each).
MAX_FUNCTIONS = p.HELD_FUNCTIONS
MAX_BYTES = p.HELD_FUNCTION_BYTES


def held_functions() -> int:
    """How many functions a silo keeps: TFF_AMQP_HELD_FUNCTIONS, else the
    protocol's HELD_FUNCTIONS. 0 keeps none (the silo's status says so, and
    batches carry every function in full); fewer than the protocol promises
    makes the coordinator meet refusals and send the functions again."""
    raw = os.environ.get("TFF_AMQP_HELD_FUNCTIONS", "")
    if not raw:
        return MAX_FUNCTIONS
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"TFF_AMQP_HELD_FUNCTIONS must be a whole number, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"TFF_AMQP_HELD_FUNCTIONS must be 0 or more, got {value}")
    return value


class FunctionStore:
    """Functions by SHA-256, least recently used evicted first."""

    def __init__(self, max_functions: int = MAX_FUNCTIONS, max_bytes: int = MAX_BYTES) -> None:
        self._max_functions = max_functions
        self._max_bytes = max_bytes
        self._functions: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._functions)

    def __contains__(self, digest: object) -> bool:
        return digest in self._functions

    def take(self, batch: p.Batch) -> p.Batch:
        """`batch` with every function it names by digest given in full, after
        keeping every function it carries; ProtocolError(MISSING_FUNCTIONS)
        naming the digests this store does not hold (nothing is kept then)."""
        missing = [
            op.digest
            for op in batch.operations
            if isinstance(op, p.CreateKnownFunction) and op.digest not in self._functions
        ]
        if missing:
            named = ", ".join(d.hex()[:16] for d in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise p.ProtocolError(
                p.ErrorCode.MISSING_FUNCTIONS,
                f"does not hold function(s) {named}{more} named by digest (the silo restarted "
                "since they were sent, or another coordinator's batches pushed them out); the "
                "coordinator sends them in full from now on",
            )
        operations: list[p.Operation] = []
        named_any = False
        for op in batch.operations:
            if isinstance(op, p.CreateKnownFunction):
                named_any = True
                self._functions.move_to_end(op.digest)
                operations.append(p.CreateValue(target=op.target, value=self._functions[op.digest]))
            else:
                if (
                    isinstance(op, p.CreateValue)
                    and len(op.value) >= p.NAMED_FUNCTION_MIN_BYTES
                    and serialized_is_computation(op.value)
                ):
                    self._keep(op.value)
                operations.append(op)
        if not named_any:
            return batch
        return dataclasses.replace(batch, operations=tuple(operations))

    def _keep(self, serialized: bytes) -> None:
        if len(serialized) > self._max_bytes:
            return
        digest = hashlib.sha256(serialized).digest()
        if digest in self._functions:
            self._functions.move_to_end(digest)
            return
        self._functions[digest] = bytes(serialized)
        self._bytes += len(serialized)
        while len(self._functions) > self._max_functions or self._bytes > self._max_bytes:
            _, dropped = self._functions.popitem(last=False)
            self._bytes -= len(dropped)


class RefusedBatches:
    """Per invocation, the batch refused for functions it named that this
    silo no longer holds. The invocation's later batches (already on their
    way) are refused too until that batch comes again: they may use its
    values, and a session applies batches only in order. The coordinator
    sends the refused batch again, carrying the functions, with every batch
    it published after it."""

    def __init__(self) -> None:
        # invocation id -> (seq of the refused batch, the invocation's deadline)
        self._refused: dict[str, tuple[int, float]] = {}

    def __len__(self) -> int:
        return len(self._refused)

    def blocking(self, invocation_id: str, seq: int) -> int | None:
        """The refused batch that batch `seq` must wait for, if any."""
        refused = self._refused.get(invocation_id)
        if refused is not None and seq > refused[0]:
            return refused[0]
        return None

    def refuse(self, invocation_id: str, seq: int, deadline: float) -> None:
        self._refused[invocation_id] = (seq, deadline)

    def passed(self, invocation_id: str, seq: int) -> None:
        """Batch `seq` was taken: a refusal it was blocked by, if any, is over."""
        refused = self._refused.get(invocation_id)
        if refused is not None and refused[0] <= seq:
            del self._refused[invocation_id]

    def forget(self, invocation_id: str) -> None:
        self._refused.pop(invocation_id, None)

    def expire(self, now: float, grace: float) -> None:
        """Forget refusals of invocations past their deadline plus `grace`."""
        for invocation_id, (_, deadline) in list(self._refused.items()):
            if now > deadline + grace:
                del self._refused[invocation_id]
