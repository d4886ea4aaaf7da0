"""Errors users see. Each says what failed, where, and what to do."""

from __future__ import annotations


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
