"""Options of a coordinator, either regime's (the MapReduce context uses the
cohort, deadline and K-of-N ones the same way)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from tff_amqp import protocol as p
from tff_amqp.topology import Topology
from tff_amqp.transport.bulk import chunk_bytes_for


@dataclass(frozen=True)
class CoordinatorOptions:
    """Options of an AMQP execution context (see the README for each)."""

    broker_url: str
    federation: str = "default"
    # The federation's queue type: "classic" (default) or "quorum" (a
    # cluster; every process of the federation uses the same, see Topology).
    queue_type: str = "classic"
    # The cohort barrier waits for this many live silos, and K of N may drop
    # silos down to it. None (default): the barrier needs one live silo and
    # every cohort silo must answer (nothing is dropped; see quorum.quorum_of).
    min_silos: int | None = None
    max_silos: int | None = None
    cohort_timeout: float = 60.0
    deadline: float = 600.0
    heartbeat_timeout: float = 5.0
    # K of N: after this many seconds of an aggregation phase, proceed with the
    # partials of at least min_silos silos and drop the rest (None: wait for all).
    straggler_timeout: float | None = None
    # Once min_silos answered a phase, wait at most this much longer for the
    # others (None: no grace limit; the straggler timeout still applies).
    quorum_grace: float | None = None
    # Any silo dropped from an invocation (or round) makes it fail with
    # PartialResultError instead of returning a result over the others
    # (False: the result comes with a PartialResultWarning).
    strict: bool = False
    max_message_bytes: int = p.DEFAULT_MAX_MESSAGE_BYTES
    # Serve Prometheus metrics on this port (0: any free port; None: off).
    metrics_port: int | None = None
    # Progress display on stderr: True, False, or None (only when it is a terminal).
    progress: bool | None = None
    # federated_select ships only the slices silos ask for, learning each
    # silo's requested key set (docs/privacy.md); off: the whole server value.
    select_slices: bool = False
    coordinator_name: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}"[:64]
    )

    def __post_init__(self) -> None:
        if self.min_silos is not None and self.min_silos < 1:
            raise ValueError("min_silos must be at least 1 (or None: every cohort silo)")
        if self.max_silos is not None and self.max_silos < (self.min_silos or 1):
            raise ValueError("max_silos must be >= min_silos")
        if self.straggler_timeout is not None and not self.straggler_timeout > 0:
            raise ValueError("straggler_timeout must be a positive number of seconds or None")
        if self.quorum_grace is not None and not self.quorum_grace >= 0:
            raise ValueError("quorum_grace must be a non-negative number of seconds or None")
        if self.min_silos is None and (
            self.straggler_timeout is not None or self.quorum_grace is not None
        ):
            # Without min_silos every cohort silo is required: a cut-off could
            # drop nobody, and a straggler would only run into the deadline.
            raise ValueError(
                "straggler_timeout and quorum_grace drop slow silos down to min_silos "
                "(K of N): set min_silos=K too (K silos must answer each phase)"
            )
        for name in ("cohort_timeout", "deadline", "heartbeat_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds")
        Topology(self.federation, self.queue_type)  # validates the name and type
        chunk_bytes_for(self.max_message_bytes)  # validates the limit
