"""`silo_data(KEY)`: a CLIENTS-placed argument that stays at the silos.

Pass it where a computation expects per-client data; each silo resolves KEY to
its own datasets (`tff-amqp silo --data KEY=PATH`). Nothing but the key
crosses the broker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tensorflow_federated.python.core.impl.executors import cardinality_carrying_base

_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


@dataclass(frozen=True)
class SiloDataReference(cardinality_carrying_base.CardinalityCarrying):
    """Reference to data every silo holds under `key`."""

    key: str

    def __post_init__(self) -> None:
        if not _KEY.match(self.key):
            raise ValueError(
                f"invalid data key {self.key!r}: use letters, digits, '_', '.' or '-' "
                "(the same KEY as in the silo's --data KEY=PATH)"
            )

    @property
    def cardinality(self) -> dict:
        # Each silo knows its own client count; nothing to infer here.
        return {}


def silo_data(key: str) -> SiloDataReference:
    """A CLIENTS-placed argument resolved by each silo to its data under `key`."""
    return SiloDataReference(key)
