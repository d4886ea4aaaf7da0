"""What each silo process holds of the functions sent to it, so batches name
them by digest instead of carrying them again (see
tff_amqp/silo/stateful/functions.py for the silo's side).

A function counts as held once a silo process answered a batch that carried
it in full; it is named (`CreateKnownFunction`) only in batches to that same
process (its instance id) that expect a reply, and only while it is among the
most recently used quarter of the silo store's bounds, so the silo, whose
store sees the same batches in the same order, still has it. A silo that
restarted is another instance: nothing is named to it until it answers
again. A MISSING_FUNCTIONS refusal (which these rules should make impossible)
forgets everything about that silo, and answers to batches published before
it teach nothing more: the silo may have dropped what they carried since.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tff_amqp import protocol as p
from tff_amqp.tff_worker.client import serialized_is_computation

MAX_FUNCTIONS = p.HELD_FUNCTIONS // 4
MAX_BYTES = p.HELD_FUNCTION_BYTES // 4
# Functions smaller than a digest reference gain nothing by being named
# (silos do not keep them).
MIN_BYTES = p.NAMED_FUNCTION_MIN_BYTES


@dataclass
class _Held:
    instance: str
    functions: OrderedDict[bytes, int] = field(default_factory=OrderedDict)
    size: int = 0


class KnownFunctions:
    """Per silo: the digests of the functions its current process holds."""

    def __init__(self, max_functions: int = MAX_FUNCTIONS, max_bytes: int = MAX_BYTES) -> None:
        self._max_functions = max_functions
        self._max_bytes = max_bytes
        self._held: dict[str, _Held] = {}
        # Per silo, how many times it was forgotten: what a batch published
        # before the latest `forget` carried is not learned from its answer.
        self._forgotten: dict[str, int] = {}
        # The digest of each serialized function (the same bytes objects ship
        # every round: the lookup hashes each object's bytes once).
        self._digests: OrderedDict[bytes, bytes] = OrderedDict()

    def digest(self, serialized: bytes) -> bytes:
        if not isinstance(serialized, bytes):  # a view or bytearray: not kept
            return hashlib.sha256(serialized).digest()
        found = self._digests.get(serialized)
        if found is None:
            found = self._digests[serialized] = hashlib.sha256(serialized).digest()
            if len(self._digests) > self._max_functions:
                self._digests.popitem(last=False)
        return found

    def name_known(
        self, silo: str, instance: str, operations: Sequence[p.Operation]
    ) -> tuple[tuple[p.Operation, ...], tuple[tuple[bytes, int], ...]]:
        """`operations` with the functions `silo`'s process `instance` holds
        named by digest, and (digest, size) of the functions they carry in
        full (to `learn` once the silo answers)."""
        held = self._held.get(silo)
        if held is not None and held.instance != instance:
            del self._held[silo]
            held = None
        named: list[p.Operation] = []
        carried: list[tuple[bytes, int]] = []
        for op in operations:
            if (
                isinstance(op, p.CreateValue)
                and len(op.value) >= MIN_BYTES
                and serialized_is_computation(op.value)
            ):
                digest = self.digest(op.value)
                if held is not None and digest in held.functions:
                    held.functions.move_to_end(digest)
                    named.append(p.CreateKnownFunction(target=op.target, digest=digest))
                    continue
                carried.append((digest, len(op.value)))
            named.append(op)
        return tuple(named), tuple(carried)

    def epoch(self, silo: str) -> int:
        """Taken when a batch is published; given back to `learn`."""
        return self._forgotten.get(silo, 0)

    def learn(
        self,
        silo: str,
        instance: str,
        carried: Iterable[tuple[bytes, int]],
        epoch: int | None = None,
    ) -> None:
        """`silo`'s process `instance` answered a batch carrying these
        functions ((digest, size) pairs), published at `epoch` (ignored when
        the silo was forgotten since)."""
        if epoch is not None and epoch != self.epoch(silo):
            return
        held = self._held.get(silo)
        if held is None or held.instance != instance:
            held = self._held[silo] = _Held(instance)
        for digest, size in carried:
            if digest in held.functions:
                held.functions.move_to_end(digest)
                continue
            held.functions[digest] = size
            held.size += size
        while len(held.functions) > self._max_functions or held.size > self._max_bytes:
            _, size = held.functions.popitem(last=False)
            held.size -= size

    def forget(self, silo: str) -> None:
        self._held.pop(silo, None)
        self._forgotten[silo] = self.epoch(silo) + 1

    def held(self, silo: str) -> int:
        """How many functions `silo` is known to hold (tests, status)."""
        held = self._held.get(silo)
        return 0 if held is None else len(held.functions)
