"""A small cache keyed by object identity.

TFF's `ConcreteComputation` hashes by serializing its whole proto, so a
dict or `lru_cache` lookup of a large computation (a FedAvg round) costs a
serialization per call. The same computation objects come back every round;
finding them by `id` (and checking it is the same object) costs nothing."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

V = TypeVar("V")


class IdentityCache(Generic[V]):
    """At most `size` entries, least recently used dropped first. Keys are
    kept alive while cached, so an id is never reused under a live entry."""

    def __init__(self, size: int = 128) -> None:
        self._size = size
        self._entries: OrderedDict[int, tuple[object, V]] = OrderedDict()

    def get(self, key: object) -> V | None:
        entry = self._entries.get(id(key))
        if entry is None or entry[0] is not key:
            return None
        self._entries.move_to_end(id(key))
        return entry[1]

    def put(self, key: object, value: V) -> None:
        self._entries[id(key)] = (key, value)
        self._entries.move_to_end(id(key))
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
