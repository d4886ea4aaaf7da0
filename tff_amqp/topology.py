"""Names of the broker objects of one federation.

Everything a federation uses lives under the prefix ``tff.<federation>.`` so
several federations share a broker without seeing each other, and so broker
permissions can be granted with one regular expression per role:

- ``tff.<fed>.requests``   direct exchange, coordinator -> silos, routing key = silo name
- ``tff.<fed>.req.<silo>`` durable queue of one silo, bound to the exchange above
- ``tff.<fed>.replies``    topic exchange, silos -> coordinator, routing key ``reply.<silo>``
                           (results, errors, hello/heartbeat/goodbye)
- ``tff.<fed>.coordinator`` the coordinator's queue, bound with ``reply.*``; durable (replies
                           survive a broker restart), deleted a minute after its consumer left
- ``tff.<fed>.dead``       fanout exchange receiving expired/rejected requests,
                           routed back to the coordinator's queue

Large values travel apart from control traffic (no head-of-line blocking):

- ``tff.<fed>.bulk``        direct exchange, coordinator -> silos, chunks of large values;
                            routing key = silo name, broadcast = one publish with a ``CC``
                            header naming the other silos (the broker fans out)
- ``tff.<fed>.bulk.<silo>`` durable queue of one silo's incoming chunks
- ``bulk.<silo>``           routing key of a silo's outgoing chunks on ``tff.<fed>.replies``
- ``tff.<fed>.coordinator.bulk`` the coordinator's chunk queue, bound with ``bulk.*`` (durable,
                            deleted a minute after its consumer left)

The stateless (MapReduce) regime hands work items to pools of workers:

- ``tff.<fed>.work``        direct exchange, coordinator -> a silo's worker pool,
                            routing key = silo name
- ``tff.<fed>.work.<silo>`` durable queue shared by one silo's workers (competing consumers)
- ``tff.<fed>.broadcast.<silo>`` a stream (``x-queue-type: stream``) of one silo: a round's
                            large broadcast, published once per round on ``tff.<fed>.bulk``
                            with key ``pool.<silo>`` (``CC`` for the other silos); every
                            worker reads it from the round's start (a stream is not consumed
                            away, unlike a queue whose competing consumers would each get
                            only some chunks)

A silo's broker user therefore needs: configure nothing; write ``tff.<fed>.replies`` (topic
keys ``reply.<silo>`` and ``bulk.<silo>`` only); read
``tff.<fed>.(req|bulk|work|broadcast).<silo>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tff_amqp.protocol import is_valid_name

# A coordinator's queues outlive a dropped connection (the robust connection
# resumes consuming them) and expire a minute after their consumer is gone.
COORDINATOR_QUEUE_EXPIRES_MS = 60_000
# A silo's broadcast stream keeps a round's broadcast for workers that start
# late, then drops it: whole segments go once older than the age or beyond the
# size (RabbitMQ deletes streams by segment, so segments are kept small).
BROADCAST_STREAM_MAX_AGE = "2h"
BROADCAST_STREAM_MAX_BYTES = 8 * 1024 * 1024 * 1024
BROADCAST_STREAM_SEGMENT_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class QueueSpec:
    """One queue of the schema: its arguments and its one binding."""

    name: str
    durable: bool
    arguments: dict[str, Any] = field(default_factory=dict)
    exchange: str = ""
    routing_key: str = ""


QUEUE_TYPES = ("classic", "quorum")


@dataclass(frozen=True)
class Topology:
    """Exchange, queue and routing-key names for one federation, and the type
    of its queues: "classic" (one node; the default) or "quorum" (replicated
    by Raft over a cluster's nodes; see docs/cluster.md). Every process of a
    federation must use the same type: RabbitMQ refuses a declaration that
    differs (transport.schema turns that into QueueTypeMismatchError)."""

    federation: str
    queue_type: str = "classic"

    def __post_init__(self) -> None:
        if not is_valid_name(self.federation):
            raise ValueError(
                f"invalid federation name {self.federation!r}: use 1-64 letters, digits, "
                "'-' or '_' (it becomes part of queue names)"
            )
        if self.queue_type not in QUEUE_TYPES:
            raise ValueError(
                f"invalid queue type {self.queue_type!r}: use one of {', '.join(QUEUE_TYPES)}"
            )

    @property
    def quorum(self) -> bool:
        return self.queue_type == "quorum"

    def _typed(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """`arguments` of a durable queue, with the federation's queue type."""
        if self.quorum:
            return {"x-queue-type": "quorum", **arguments}
        return arguments

    def lock_queue(self, holder: str) -> str:
        """An exclusive queue a process declares to hold a name ("coordinator"
        or a silo's): quorum queues do not enforce exclusive consumers, so
        in a quorum federation this lock is what refuses a second process."""
        return f"{self.prefix}.lock.{holder}"

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

    def broadcast_queue(self, silo: str) -> str:
        check_silo_name(silo)
        return f"{self.prefix}.broadcast.{silo}"

    @staticmethod
    def broadcast_routing_key(silo: str) -> str:
        # On the bulk exchange, apart from the stateful key (the silo name).
        return f"pool.{silo}"

    @staticmethod
    def request_routing_key(silo: str) -> str:
        return silo

    @staticmethod
    def reply_routing_key(silo: str) -> str:
        return f"reply.{silo}"

    @staticmethod
    def reply_binding_key() -> str:
        return "reply.*"

    # ------------------------------------------------------------ the schema
    # Every role and `tff-amqp provision` declare from these, so their
    # arguments cannot disagree (RabbitMQ refuses a redeclaration that differs).

    def exchanges(self) -> dict[str, str]:
        """Every exchange of the federation and its type (all durable)."""
        return {
            self.requests_exchange: "direct",
            self.replies_exchange: "topic",
            self.dead_letter_exchange: "fanout",
            self.bulk_exchange: "direct",
            self.work_exchange: "direct",
        }

    def request_queue_spec(self, silo: str) -> QueueSpec:
        # Expired requests dead-letter back to the coordinator, never run late.
        arguments: dict[str, Any] = {"x-dead-letter-exchange": self.dead_letter_exchange}
        if self.quorum:
            # Even a second consumer (the lock refuses it) never gets a message.
            arguments["x-single-active-consumer"] = True
        return QueueSpec(
            self.request_queue(silo),
            durable=True,
            arguments=self._typed(arguments),
            exchange=self.requests_exchange,
            routing_key=self.request_routing_key(silo),
        )

    def bulk_queue_spec(self, silo: str) -> QueueSpec:
        # Chunks do not dead-letter: expired 8 MiB chunks would crowd the
        # coordinator's control queue, and the deadline already fails the call.
        return QueueSpec(
            self.bulk_queue(silo),
            durable=True,
            arguments=self._typed({}),
            exchange=self.bulk_exchange,
            routing_key=self.request_routing_key(silo),
        )

    def work_queue_spec(self, silo: str) -> QueueSpec:
        return QueueSpec(
            self.work_queue(silo),
            durable=True,
            arguments=self._typed({"x-dead-letter-exchange": self.dead_letter_exchange}),
            exchange=self.work_exchange,
            routing_key=self.request_routing_key(silo),
        )

    def broadcast_queue_spec(self, silo: str) -> QueueSpec:
        # A stream, not a queue: every worker of the pool reads every chunk
        # (from an offset), and a worker that starts late still finds them.
        # Streams ignore per-message TTL; retention is by age and size.
        return QueueSpec(
            self.broadcast_queue(silo),
            durable=True,
            arguments={
                "x-queue-type": "stream",
                "x-max-age": BROADCAST_STREAM_MAX_AGE,
                "x-max-length-bytes": BROADCAST_STREAM_MAX_BYTES,
                "x-stream-max-segment-size-bytes": BROADCAST_STREAM_SEGMENT_BYTES,
            },
            exchange=self.bulk_exchange,
            routing_key=self.broadcast_routing_key(silo),
        )

    def silo_queue_specs(self, silo: str) -> list[QueueSpec]:
        """A silo's queues: requests, incoming chunks, work items, the pool's
        broadcast stream."""
        return [
            self.request_queue_spec(silo),
            self.bulk_queue_spec(silo),
            self.work_queue_spec(silo),
            self.broadcast_queue_spec(silo),
        ]

    def coordinator_queue_spec(self) -> QueueSpec:
        # Durable, so replies published while the broker restarts are kept
        # for the coordinator; `x-expires` deletes it a minute after the
        # coordinator is gone (the timer restarts with the broker).
        return QueueSpec(
            self.coordinator_queue,
            durable=True,
            arguments=self._typed({"x-expires": COORDINATOR_QUEUE_EXPIRES_MS}),
            exchange=self.replies_exchange,
            routing_key=self.reply_binding_key(),
        )

    def coordinator_bulk_queue_spec(self) -> QueueSpec:
        return QueueSpec(
            self.coordinator_bulk_queue,
            durable=True,
            arguments=self._typed({"x-expires": COORDINATOR_QUEUE_EXPIRES_MS}),
            exchange=self.replies_exchange,
            routing_key=self.bulk_reply_binding_key(),
        )

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


def add_queue_type_option(parser: Any) -> None:
    """--queue-type, one definition for every command that declares or
    provisions a federation's queues (env TFF_AMQP_QUEUE_TYPE)."""
    import os

    parser.add_argument(
        "--queue-type",
        choices=QUEUE_TYPES,
        default=os.environ.get("TFF_AMQP_QUEUE_TYPE", "classic"),
        help="type of the federation's durable queues: classic (one node) or quorum "
        "(replicated over a cluster's nodes); every process of a federation must use the "
        "same (default %(default)s)",
    )
