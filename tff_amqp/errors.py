"""Errors users see. Each says what failed, where, and what to do."""

from __future__ import annotations

import grpc


class TffAmqpError(Exception):
    """Base class of tff-amqp errors."""


class BrokerUnreachableError(TffAmqpError):
    """The RabbitMQ broker could not be reached within the retry budget."""


class BrokerAuthError(BrokerUnreachableError):
    """The broker answered but refused the credentials (user name, password or
    client certificate). Not retried: wrong credentials do not fix themselves.

    A subclass of BrokerUnreachableError so that code written against earlier
    versions (``except BrokerUnreachableError``) still catches it; catch
    BrokerAuthError first to tell the two apart."""


class BrokerPermissionError(TffAmqpError):
    """The broker accepted the credentials but refused an operation
    (ACCESS_REFUSED: a missing configure, write or read permission, or a
    virtual host the user may not use)."""


class FederationNotFoundError(TffAmqpError):
    """The federation has no exchanges on the broker (nothing ever ran it, or
    it was removed)."""


class CohortError(TffAmqpError):
    """Not enough live silos formed a cohort in time."""


class QuorumError(CohortError):
    """Too few silos answered an aggregation phase (crashes, stragglers)."""


class MissingColumnError(TffAmqpError, ValueError):
    """A cohort silo's data lacks a column the computation's element type
    names (from the columns the silo advertised): refused before any work
    is sent. `lacking` maps each such silo to the columns it lacks."""

    def __init__(self, key: str, lacking: dict[str, list[str]], has: dict[str, list[str]]) -> None:
        parts = [
            f"silo {silo!r} has no column {', '.join(repr(c) for c in columns)} under data "
            f"key {key!r} (it has: {', '.join(has[silo]) or 'no columns'})"
            for silo, columns in lacking.items()
        ]
        super().__init__(
            "; ".join(parts) + ". Nothing was sent; name the element type's fields after "
            "columns every silo has, or fix the silo's data"
        )
        self.key = key
        self.lacking = dict(lacking)


def _describe_drops(dropped: dict[str, str]) -> str:
    return ", ".join(f"{silo} ({reason})" for silo, reason in dropped.items())


class PartialResultError(QuorumError):
    """`strict=True`: an invocation dropped silos (stragglers, lost, restarted
    or unreachable silos), so its result would cover only the others; raised
    instead of returning that result. `dropped` maps each silo to its reason."""

    def __init__(self, invocation_id: str, dropped: dict[str, str], took_part: list[str]) -> None:
        super().__init__(
            f"invocation {invocation_id[:8]} dropped silo(s) {_describe_drops(dropped)}; "
            f"only {len(took_part)} silo(s) took part ({', '.join(took_part) or '-'}). "
            "strict=True refuses a partial result"
        )
        self.invocation_id = invocation_id
        self.dropped = dict(dropped)
        self.took_part = list(took_part)


class PartialResultWarning(UserWarning):
    """A result covers only part of the cohort: silos were dropped (K of N,
    `min_silos` below the cohort). `dropped` maps each silo to its reason
    ("straggler", "lost", "restarted", "unreachable"). Turn it into an error
    with `strict=True`, or require every silo with `min_silos=N`."""

    def __init__(self, invocation_id: str, dropped: dict[str, str], took_part: list[str]) -> None:
        super().__init__(
            f"partial result: invocation {invocation_id[:8]} dropped silo(s) "
            f"{_describe_drops(dropped)}; the result covers the {len(took_part)} silo(s) "
            f"that took part ({', '.join(took_part) or '-'})"
        )
        self.invocation_id = invocation_id
        self.dropped = dict(dropped)
        self.took_part = list(took_part)


class CodedError(TffAmqpError):
    """An error with a machine-readable `code` (a protocol `ErrorCode`, or its
    string on the coordinator side) besides its message: what error replies
    carry across the broker."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class SiloError(CodedError):
    """A silo refused or failed an operation of the invocation."""

    def __init__(self, silo: str, code: str, message: str) -> None:
        super().__init__(code, message)
        self.silo = silo

    @classmethod
    def from_report(
        cls, silo: str, code: str, message: str, worker_status: str | None
    ) -> SiloError:
        """The error for a silo's error reply: a `SiloWorkerError` when the
        silo's TFF worker raised it, so it carries the worker's status."""
        if worker_status is None:
            return cls(silo, code, message)
        return SiloWorkerError(silo, code, message, worker_status)


class SiloUnreachableError(SiloError):
    """The broker had no queue for a request to this silo (it returned the
    message): the silo's queue does not exist, e.g. a silo name announced by
    a process that never declared it, or a queue deleted by an operator. The
    request was not delivered; nothing ran."""

    def __init__(self, silo: str, what: str = "request") -> None:
        super().__init__(
            silo,
            "unroutable",
            f"silo {silo!r} is unreachable: the broker has no queue for its {what} "
            "(it returned the message at once). Check `tff-amqp status` and that the silo's "
            "queue exists (the silo process declares it at start, or `tff-amqp provision` "
            "does for provisioned silos); a status message from a silo without a queue can "
            "also be forged by a broker user that may publish on the replies exchange.",
        )


class WorkerRpcError(grpc.RpcError):
    """A TFF worker_binary's gRPC error, as a silo reported it: what TFF's
    native runtime raises for the same failure (`code()`, `details()`)."""

    _status = grpc.StatusCode.UNKNOWN
    _details = ""

    @classmethod
    def reported(cls, status: str, details: str) -> WorkerRpcError:
        error = cls(details)
        error._set_status(status, details)
        return error

    def _set_status(self, status: str, details: str) -> None:
        self._status = getattr(grpc.StatusCode, status, grpc.StatusCode.UNKNOWN)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._status

    def details(self) -> str:
        return self._details


class SiloWorkerError(SiloError):
    """A silo's TFF worker failed an operation (e.g. a TensorFlow assertion).

    The worker's own error, the `grpc.RpcError` TFF's native runtime raises for
    the same failure, is chained as `__cause__`; `worker_status` is its gRPC
    status code."""

    def __init__(self, silo: str, code: str, message: str, worker_status: str) -> None:
        super().__init__(silo, code, message)
        self.__cause__ = WorkerRpcError.reported(worker_status, message)

    @property
    def worker_status(self) -> grpc.StatusCode:
        cause = self.__cause__
        return cause.code() if isinstance(cause, WorkerRpcError) else grpc.StatusCode.UNKNOWN


class InvocationTimeoutError(TffAmqpError, TimeoutError):
    """An invocation (or a wait inside it) passed its deadline."""


class UnsupportedIntrinsicError(TffAmqpError, NotImplementedError):
    """The computation uses an intrinsic this backend does not implement."""


class QueueTypeMismatchError(TffAmqpError):
    """A federation's queue exists with another type (classic or quorum) than
    this process was started with; RabbitMQ refused the declaration."""

    def __init__(self, queue: str, topology: object, broker: str) -> None:
        wanted = getattr(topology, "queue_type", "?")
        federation = getattr(topology, "federation", "?")
        other = "classic" if wanted == "quorum" else "quorum"
        super().__init__(
            f"queue {queue} of federation {federation!r} exists as a {other} queue, but this "
            f"process was started with queue type {wanted!r} ({' '.join(broker.split())[:160]}). "
            f"Every process of a federation uses one queue type: start this one with "
            f"--queue-type {other} (queue_type={other!r}). To change a federation's type, stop "
            f"all its processes, remove it (`tff-amqp federation remove {federation}`: queued "
            f"requests are dropped) and start everything with the new type."
        )


class SiloNameTakenError(TffAmqpError):
    """Another live process already serves this silo name (the broker
    refused this one the exclusive consumer on the silo's request queue)."""


class SiloRestartedError(SiloError):
    """A silo's process changed (a new instance id) while the invocation
    waited for its replies: the new process has none of the invocation's
    state, and the old one's replies must not be mixed with the new one's.
    Code "lost", so a K-of-N gather treats the silo as dropped."""

    def __init__(self, silo: str, old_instance: str, new_instance: str) -> None:
        super().__init__(
            silo,
            "lost",
            f"silo {silo!r} restarted mid-invocation (instance {old_instance[:8] or '?'} -> "
            f"{new_instance[:8] or '?'}): its pending replies are dropped from this invocation",
        )
        self.old_instance = old_instance
        self.new_instance = new_instance
