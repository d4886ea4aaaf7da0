"""Errors users see. Each says what failed, where, and what to do."""

from __future__ import annotations


class TffAmqpError(Exception):
    """Base class of tff-amqp errors."""


class BrokerUnreachableError(TffAmqpError):
    """The RabbitMQ broker could not be reached within the retry budget."""


class CohortError(TffAmqpError):
    """Not enough live silos formed a cohort in time."""


class QuorumError(CohortError):
    """Too few silos answered an aggregation phase (crashes, stragglers)."""


class SiloError(TffAmqpError):
    """A silo refused or failed an operation of the invocation."""

    def __init__(self, silo: str, code: str, message: str) -> None:
        super().__init__(message)
        self.silo = silo
        self.code = code


class InvocationTimeoutError(TffAmqpError, TimeoutError):
    """An invocation (or a wait inside it) passed its deadline."""


class UnsupportedIntrinsicError(TffAmqpError, NotImplementedError):
    """The computation uses an intrinsic this backend does not implement."""
