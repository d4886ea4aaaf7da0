"""TFF `Struct`s built without `Struct.__init__`'s per-element checks.

In-process plans build a few `Struct`s per client per batch (zips, the
`accumulate` argument, a computation's result); `Struct.__init__` checks
each element with `py_typecheck` and cost a silo more than the arithmetic.
`struct_of` fills the same slots directly when the names are distinct and
not reserved (always so for names taken from a TFF type), else it leaves the
work, and the error, to `Struct` itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tensorflow_federated.python.common_libs import structure

_SLOTS = ("_hash", "_element_array", "_name_to_index", "_name_array", "_elements_cache")
# Another TFF release may lay a Struct out differently: then always Struct().
_FAST = tuple(structure.Struct.__slots__) == _SLOTS
_RESERVED = frozenset(("_asdict", *_SLOTS))


def struct_of(elements: Sequence[tuple[str | None, Any]]) -> structure.Struct:
    """`structure.Struct(elements)`, equal to it in every way."""
    if not _FAST:
        return structure.Struct(elements)
    names: list[str | None] = []
    values: list[Any] = []
    index: dict[str, int] = {}
    named = 0
    for position, element in enumerate(elements):
        if type(element) is not tuple or len(element) != 2:
            return structure.Struct(elements)
        name, value = element
        names.append(name)
        values.append(value)
        if name is not None:
            if not isinstance(name, str):
                return structure.Struct(elements)
            named += 1
            index[name] = position
    if len(index) != named or (index and not _RESERVED.isdisjoint(index)):
        return structure.Struct(elements)  # raises TFF's own error
    made = object.__new__(structure.Struct)
    made._hash = None
    made._element_array = tuple(values)
    made._name_to_index = index
    made._name_array = names
    made._elements_cache = None
    return made


def unnamed(*values: Any) -> structure.Struct:
    """`structure.Struct([(None, v) for v in values])`."""
    return struct_of([(None, value) for value in values])
