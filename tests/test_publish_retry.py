"""`publish_with_retry` publishes once directly and enters its retry policy
only after a transient failure, with the policy's semantics unchanged: the
direct attempt is the policy's first (its time counts against the bound)."""

from __future__ import annotations

import asyncio
import time
from unittest import mock

import aio_pika
import aiormq
import aiormq.abc
import pytest

from tff_amqp.retry import RetryPolicy
from tff_amqp.transport.connection import publish_with_retry

POLICY = RetryPolicy(initial_delay=0.01, max_delay=0.02, total_timeout=0.5)


class FakeExchange:
    """Publishes by running the next scripted outcome: an exception to raise,
    a number of seconds to take before succeeding, or a result to return."""

    def __init__(self, *outcomes: object) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[float] = []

    async def publish(self, message: object, **kwargs: object) -> object:
        self.calls.append(time.monotonic())
        outcome = self.outcomes.pop(0) if self.outcomes else "ack"
        if isinstance(outcome, tuple):  # (seconds, then this)
            seconds, outcome = outcome
            await asyncio.sleep(seconds)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def _publish(exchange: FakeExchange, policy: RetryPolicy = POLICY, **kwargs: bool) -> bool:
    message = aio_pika.Message(b"x")
    return asyncio.run(publish_with_retry(exchange, message, "key", policy, **kwargs))  # type: ignore[arg-type]


def test_success_is_one_publish() -> None:
    exchange = FakeExchange("ack")
    assert _publish(exchange) is True
    assert len(exchange.calls) == 1


def test_a_returned_message_is_false() -> None:
    returned = mock.Mock(spec=aiormq.abc.DeliveredMessage)
    exchange = FakeExchange(returned)
    assert _publish(exchange, mandatory=True) is False
    assert len(exchange.calls) == 1


def test_transient_failures_are_retried() -> None:
    exchange = FakeExchange(ConnectionError("gone"), TimeoutError(), "ack")
    assert _publish(exchange) is True
    assert len(exchange.calls) == 3


def test_a_returned_message_after_a_retry_is_false() -> None:
    returned = mock.Mock(spec=aiormq.abc.DeliveredMessage)
    exchange = FakeExchange(aiormq.exceptions.ChannelInvalidStateError("closing"), returned)
    assert _publish(exchange, mandatory=True) is False
    assert len(exchange.calls) == 2


def test_other_errors_are_raised_at_once() -> None:
    exchange = FakeExchange(ValueError("bad message"))
    with pytest.raises(ValueError, match="bad message"):
        _publish(exchange)
    assert len(exchange.calls) == 1


def test_other_errors_on_a_retry_are_raised_at_once() -> None:
    exchange = FakeExchange(ConnectionError("gone"), ValueError("bad"), "ack")
    with pytest.raises(ValueError, match="bad"):
        _publish(exchange)
    assert len(exchange.calls) == 2


def test_persistent_failure_ends_after_the_policys_bound_with_the_last_error() -> None:
    errors = [ConnectionError(f"gone {i}") for i in range(1000)]
    exchange = FakeExchange(*errors)
    started = time.monotonic()
    with pytest.raises(ConnectionError) as raised:
        _publish(exchange)
    elapsed = time.monotonic() - started
    calls = len(exchange.calls)
    assert POLICY.total_timeout <= elapsed < POLICY.total_timeout + 0.3
    assert calls > 3
    assert str(raised.value) == f"gone {calls - 1}"


def test_the_first_attempts_time_counts_against_the_bound() -> None:
    # A first attempt that fails after the whole bound is not retried (as
    # when the policy ran it).
    exchange = FakeExchange((0.3, ConnectionError("late")), "ack")
    with pytest.raises(ConnectionError, match="late"):
        _publish(exchange, RetryPolicy(initial_delay=0.01, max_delay=0.02, total_timeout=0.2))
    assert len(exchange.calls) == 1


def test_the_first_retry_waits_the_policys_first_wait() -> None:
    # Attempt 2 comes after the first backoff (not at once, as a fresh
    # policy's first attempt would).
    policy = RetryPolicy(initial_delay=0.2, max_delay=1.0, total_timeout=5.0)
    exchange = FakeExchange(ConnectionError("gone"), "ack")
    assert _publish(exchange, policy) is True
    first, second = exchange.calls
    assert second - first >= 0.2
