"""Names of the broker objects of one federation.

Everything a federation uses lives under the prefix ``tff.<federation>.`` so
several federations share a broker without seeing each other, and so broker
permissions can be granted with one regular expression per role:

- ``tff.<fed>.requests``   direct exchange, coordinator -> silos, routing key = silo name
- ``tff.<fed>.req.<silo>`` durable queue of one silo, bound to the exchange above
- ``tff.<fed>.replies``    topic exchange, silos -> coordinator, routing key ``reply.<silo>``
                           (results, errors, hello/heartbeat/goodbye)
- ``tff.<fed>.coordinator`` the coordinator's queue, bound with ``reply.*``
- ``tff.<fed>.dead``       fanout exchange receiving expired/rejected requests,
                           routed back to the coordinator's queue
"""

from __future__ import annotations

from dataclasses import dataclass

from tff_amqp.protocol import is_valid_name


@dataclass(frozen=True)
class Topology:
    """Exchange, queue and routing-key names for one federation."""

    federation: str

    def __post_init__(self) -> None:
        if not is_valid_name(self.federation):
            raise ValueError(
                f"invalid federation name {self.federation!r}: use 1-64 letters, digits, "
                "'-' or '_' (it becomes part of queue names)"
            )

    @property
    def prefix(self) -> str:
        return f"tff.{self.federation}"

    @property
    def requests_exchange(self) -> str:
        return f"{self.prefix}.requests"

    @property
    def replies_exchange(self) -> str:
        return f"{self.prefix}.replies"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.prefix}.dead"

    @property
    def coordinator_queue(self) -> str:
        return f"{self.prefix}.coordinator"

    def request_queue(self, silo: str) -> str:
        check_silo_name(silo)
        return f"{self.prefix}.req.{silo}"

    @staticmethod
    def request_routing_key(silo: str) -> str:
        return silo

    @staticmethod
    def reply_routing_key(silo: str) -> str:
        return f"reply.{silo}"

    @staticmethod
    def reply_binding_key() -> str:
        return "reply.*"

    @staticmethod
    def silo_from_reply_key(routing_key: str) -> str | None:
        prefix = "reply."
        if routing_key.startswith(prefix) and is_valid_name(routing_key[len(prefix) :]):
            return routing_key[len(prefix) :]
        return None


def check_silo_name(silo: str) -> str:
    if not is_valid_name(silo):
        raise ValueError(
            f"invalid silo name {silo!r}: use 1-64 letters, digits, '-' or '_' "
            "(it becomes part of a queue name and a routing key)"
        )
    return silo
