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

Large values travel apart from control traffic (no head-of-line blocking):

- ``tff.<fed>.bulk``        direct exchange, coordinator -> silos, chunks of large values;
                            routing key = silo name, broadcast = one publish with a ``CC``
                            header naming the other silos (the broker fans out)
- ``tff.<fed>.bulk.<silo>`` durable queue of one silo's incoming chunks
- ``bulk.<silo>``           routing key of a silo's outgoing chunks on ``tff.<fed>.replies``
- ``tff.<fed>.coordinator.bulk`` the coordinator's chunk queue, bound with ``bulk.*``

The stateless (MapReduce) regime hands work items to pools of workers:

- ``tff.<fed>.work``        direct exchange, coordinator -> a silo's worker pool,
                            routing key = silo name
- ``tff.<fed>.work.<silo>`` durable queue shared by one silo's workers (competing consumers)

A silo's broker user therefore needs: configure nothing; write ``tff.<fed>.replies`` (topic
keys ``reply.<silo>`` and ``bulk.<silo>`` only); read ``tff.<fed>.(req|bulk|work).<silo>``.
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

    @property
    def bulk_exchange(self) -> str:
        return f"{self.prefix}.bulk"

    def bulk_queue(self, silo: str) -> str:
        check_silo_name(silo)
        return f"{self.prefix}.bulk.{silo}"

    @property
    def coordinator_bulk_queue(self) -> str:
        return f"{self.prefix}.coordinator.bulk"

    @staticmethod
    def bulk_reply_routing_key(silo: str) -> str:
        return f"bulk.{silo}"

    @staticmethod
    def bulk_reply_binding_key() -> str:
        return "bulk.*"

    @property
    def work_exchange(self) -> str:
        return f"{self.prefix}.work"

    def work_queue(self, silo: str) -> str:
        check_silo_name(silo)
        return f"{self.prefix}.work.{silo}"

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
