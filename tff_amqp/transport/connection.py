"""Opening robust AMQP connections with a bounded retry budget."""

from __future__ import annotations

import asyncio
import logging
import ssl

import aio_pika
import aiormq
import yarl
from aio_pika.abc import AbstractExchange, AbstractRobustConnection

from tff_amqp.errors import BrokerUnreachableError
from tff_amqp.retry import RetryPolicy

log = logging.getLogger(__name__)

_HOW_TO_GET_A_BROKER = (
    "Start one with `rabbitmq-server -detached` (local service) or "
    "`docker compose up -d rabbitmq`, or point --broker / AMQP_URL at a reachable broker."
)


def redact_url(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    parsed = yarl.URL(url)
    return str(parsed.with_password("***")) if parsed.password else str(parsed)


def username_of(url: str) -> str:
    return yarl.URL(url).user or "guest"


async def connect(
    url: str,
    *,
    name: str,
    policy: RetryPolicy | None = None,
    ssl_context: ssl.SSLContext | None = None,
    heartbeat: int = 15,
) -> AbstractRobustConnection:
    """Connect with retries; afterwards aio-pika's robust connection restores
    channels, queues, bindings and consumers after a connection loss."""
    policy = policy or RetryPolicy()
    parsed = yarl.URL(url)
    if parsed.scheme not in ("amqp", "amqps"):
        raise ValueError(f"broker URL must start with amqp:// or amqps://, got {redact_url(url)}")
    if "heartbeat" not in parsed.query:
        parsed = parsed.update_query(heartbeat=heartbeat)
    if "reconnect_interval" not in parsed.query:
        # aio-pika waits 5 s between attempts by default; silos should be
        # back well within the coordinator's heartbeat timeout.
        parsed = parsed.update_query(reconnect_interval=1)
    kwargs: dict[str, object] = {"client_properties": {"connection_name": name}, "timeout": 10}
    if ssl_context is not None:
        kwargs["ssl_context"] = ssl_context

    def retryable(error: BaseException) -> bool:
        # Wrong credentials will not fix themselves: fail at once.
        if isinstance(error, aiormq.exceptions.ProbableAuthenticationError):
            return False
        return isinstance(error, OSError | aiormq.exceptions.AMQPError | asyncio.TimeoutError)

    try:
        async for attempt in policy.retrying(retryable):
            with attempt:
                return await aio_pika.connect_robust(parsed, **kwargs)
    except aiormq.exceptions.ProbableAuthenticationError as e:
        raise BrokerUnreachableError(
            f"the broker at {redact_url(url)} refused the credentials: {e}. "
            "Check the user and password (or client certificate) in the broker URL."
        ) from e
    except Exception as e:
        raise BrokerUnreachableError(
            f"cannot reach the RabbitMQ broker at {redact_url(url)} within "
            f"{policy.total_timeout:.0f} s ({type(e).__name__}: {e}). " + _HOW_TO_GET_A_BROKER
        ) from e
    raise AssertionError("unreachable")


def _transient(error: BaseException) -> bool:
    return isinstance(
        error,
        aiormq.exceptions.ChannelInvalidStateError
        | aiormq.exceptions.ConnectionClosed
        | aiormq.exceptions.ChannelClosed
        | aio_pika.exceptions.ChannelInvalidStateError
        | ConnectionError
        | asyncio.TimeoutError,
    )


async def publish_with_retry(
    exchange: AbstractExchange, message: aio_pika.Message, routing_key: str, policy: RetryPolicy
) -> None:
    """Publish with confirms; retry while the robust connection reconnects.
    A retry can duplicate a message whose confirm was lost: receivers drop
    duplicates by message id."""
    async for attempt in policy.retrying(_transient):
        with attempt:
            await exchange.publish(message, routing_key=routing_key, mandatory=False, timeout=10)
