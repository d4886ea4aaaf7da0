"""Opening robust AMQP connections with a bounded retry budget."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time

import aio_pika
import aiormq
import aiormq.abc
import yarl
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractRobustConnection

from tff_amqp import protocol as p
from tff_amqp.errors import BrokerAuthError, BrokerPermissionError, BrokerUnreachableError
from tff_amqp.retry import RECONNECT_INTERVAL, RetryPolicy, connect_within

log = logging.getLogger(__name__)

# How long connect() tries (with retries) before reporting an unreachable
# broker, unless the caller passes a policy: 5 s, so a typo in a port or host
# is reported at once. Override with TFF_AMQP_CONNECT_TIMEOUT (seconds), e.g.
# for a coordinator started together with its broker.
DEFAULT_CONNECT_TIMEOUT = 5.0
# One connection attempt never takes longer than this (a silently dropping
# firewall would otherwise hold an attempt for the OS's TCP timeout).
ATTEMPT_TIMEOUT = 10.0


def default_connect_timeout() -> float:
    try:
        return float(os.environ.get("TFF_AMQP_CONNECT_TIMEOUT") or DEFAULT_CONNECT_TIMEOUT)
    except ValueError:
        return DEFAULT_CONNECT_TIMEOUT


_HOW_TO_GET_A_BROKER = (
    "Start one with `rabbitmq-server -detached` (local service) or "
    "`docker compose up -d rabbitmq`, or point --broker / AMQP_URL at a reachable broker."
)


def broker_urls(url: str) -> list[str]:
    """The addresses of a broker URL: one URL, or several comma-separated
    (the nodes of one cluster: clients connect to any and fail over)."""
    return [part.strip() for part in url.split(",") if part.strip()] or [url]


def redact_url(url: str) -> str:
    """The URL(s) without passwords, for logs and error messages."""
    shown = []
    for part in broker_urls(url):
        try:
            parsed = yarl.URL(part)
            shown.append(str(parsed.with_password("***")) if parsed.password else str(parsed))
        except ValueError:
            shown.append("<unparsable URL>")
    return ",".join(shown)


def username_of(url: str) -> str:
    """The user of the (first) broker URL; every address of a cluster names
    the same user."""
    try:
        return yarl.URL(broker_urls(url)[0]).user or "guest"
    except ValueError:
        return "guest"


class FailoverConnection(aio_pika.RobustConnection):
    """A robust connection over several broker addresses (the nodes of one
    cluster): each connection attempt, the first and every reconnect, goes
    to the next address in turn, so a dead node is skipped after one failed
    attempt. With one address it is aio-pika's robust connection.

    aio-pika starts each attempt by clearing `transport` (an established
    connection that drops clears it first, so its reconnect does too); the
    address moves on exactly then."""

    def __init__(self, url: yarl.URL, *, addresses: list[yarl.URL], **kwargs: object) -> None:
        self._addresses = addresses
        self._address = -1
        self._transport: object = None
        super().__init__(url, **kwargs)  # type: ignore[arg-type]

    @property  # type: ignore[override]
    def transport(self) -> object:
        return self._transport

    @transport.setter
    def transport(self, value: object) -> None:
        # None over None: a new attempt (not a drop); `kwargs` is set once
        # __init__ is done (its own clearing is not an attempt).
        if value is None and self._transport is None and hasattr(self, "kwargs"):
            self._address = (self._address + 1) % len(self._addresses)
            self.url = self._addresses[self._address]
        self._transport = value

    @property
    def address(self) -> str:
        """The address in use (password redacted)."""
        return redact_url(str(self.url))


async def connect(
    url: str,
    *,
    name: str,
    policy: RetryPolicy | None = None,
    ssl_context: ssl.SSLContext | None = None,
    heartbeat: int = 15,
) -> AbstractRobustConnection:
    """Connect with retries; afterwards aio-pika's robust connection restores
    channels, queues, bindings and consumers after a connection loss.

    Raises ValueError for a malformed URL, BrokerAuthError when the broker
    refuses the credentials, BrokerPermissionError when the user may not use
    the virtual host, and BrokerUnreachableError when no connection could be
    made within the policy's total_timeout (default 5 s, see
    default_connect_timeout)."""
    policy = policy or connect_within(default_connect_timeout())
    addresses = []
    for address in broker_urls(url):
        parsed = parse_broker_url(address)
        if "heartbeat" not in parsed.query:
            parsed = parsed.update_query(heartbeat=heartbeat)
        if "reconnect_interval" not in parsed.query:
            parsed = parsed.update_query(reconnect_interval=RECONNECT_INTERVAL)
        addresses.append(parsed)
    parsed = addresses[0]
    kwargs: dict[str, object] = {"client_properties": {"connection_name": name}}
    if ssl_context is not None:
        kwargs["ssl_context"] = ssl_context
    deadline = time.monotonic() + policy.total_timeout
    errors: list[BaseException] = []

    def retryable(error: BaseException) -> bool:
        # An attempt cut short by the budget ends in CancelledError, which
        # says nothing: the error reported is the last real one.
        if not isinstance(error, asyncio.CancelledError):
            errors.append(error)
        # Wrong credentials or a forbidden vhost will not fix themselves.
        if isinstance(error, _REFUSALS):
            return False
        return isinstance(error, OSError | aiormq.exceptions.AMQPError | asyncio.TimeoutError)

    try:
        # The budget bounds the backoff's sleeps too, not only the attempts.
        async with asyncio.timeout(policy.total_timeout):
            async for attempt in policy.retrying(retryable):
                with attempt:
                    # Each attempt is bounded by what is left of the budget.
                    left = min(ATTEMPT_TIMEOUT, max(0.5, deadline - time.monotonic()))
                    # Each attempt starts at the next address.
                    start = attempt.retry_state.attempt_number - 1
                    ring = addresses[start % len(addresses) :] + addresses[: start % len(addresses)]
                    connection = FailoverConnection(ring[0], addresses=ring, **kwargs)
                    try:
                        await connection.connect(timeout=left)
                    except BaseException:
                        with contextlib.suppress(Exception):
                            await connection.close()
                        raise
                    return connection
    except _AUTH_REFUSALS:
        raise BrokerAuthError(
            f"the broker at {redact_url(url)} refused user {username_of(url)!r}: wrong user "
            "name or password (or client certificate). Check the credentials in the broker URL."
        ) from None  # the message says it all; the library's chain is 50+ lines
    except aiormq.exceptions.ConnectionNotAllowed:
        raise BrokerPermissionError(
            f"the broker at {redact_url(url)} does not let user {username_of(url)!r} use "
            f"virtual host {parsed.path[1:] or '/'!r} (it may not exist). Check the URL's path."
        ) from None
    except Exception as e:
        # Cut short by the budget: the last attempt's error says more.
        last = errors[-1] if isinstance(e, TimeoutError) and errors else e
        raise BrokerUnreachableError(
            f"cannot reach the RabbitMQ broker at {redact_url(url)} within "
            f"{policy.total_timeout:.0f} s ({describe_error(last)}). " + _HOW_TO_GET_A_BROKER
        ) from None
    raise AssertionError("unreachable")


_AUTH_REFUSALS = (
    aiormq.exceptions.ProbableAuthenticationError,
    aiormq.exceptions.AuthenticationError,
)
_REFUSALS = (*_AUTH_REFUSALS, aiormq.exceptions.ConnectionNotAllowed)


def parse_broker_url(url: str) -> yarl.URL:
    """The URL, checked: amqp[s]://[user:password@]host[:port][/vhost]."""
    try:
        parsed = yarl.URL(url)
        port = parsed.port
    except ValueError as e:
        raise ValueError(f"invalid broker URL {url!r}: {e}") from None
    if parsed.scheme not in ("amqp", "amqps") or not parsed.host or port is None:
        raise ValueError(
            f"broker URL must look like amqp://user:password@host:5672/ (or amqps://), "
            f"got {redact_url(url)!r}"
        )
    return parsed


def describe_error(error: BaseException) -> str:
    """A short description of a connection error, without the library's
    multi-line or repeated text."""
    text = " ".join(str(error).split())
    if isinstance(error, ConnectionRefusedError | OSError) and getattr(error, "strerror", None):
        text = str(error.strerror)
    if isinstance(error, asyncio.TimeoutError | TimeoutError):
        text = "no answer"
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def access_refused_message(error: BaseException, what: str) -> str:
    """One sentence for a channel closed with ACCESS_REFUSED (the broker's own
    text is long and ends with its log file's name)."""
    text = str(error)
    detail = ""
    if " - " in text:
        detail = text.split(" - ", 1)[1].split(" in vhost", 1)[0].strip(" '\"()")
    return f"the broker refused to {what}" + (f" ({detail})" if detail else "")


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


async def ack_queued(message: AbstractIncomingMessage) -> None:
    """Acknowledge `message` without waiting for the ack to be written: it
    is queued on the channel in order, and waiting for the socket write
    delays the caller by a turn of the connection's writer (the silo would
    start a request only after it)."""
    if message.delivery_tag is not None:
        await message.channel.basic_ack(delivery_tag=message.delivery_tag, wait=False)


async def publish_with_retry(
    exchange: AbstractExchange,
    message: aio_pika.Message,
    routing_key: str,
    policy: RetryPolicy,
    *,
    mandatory: bool = False,
) -> bool:
    """Publish with confirms; retry while the robust connection reconnects.
    A retry can duplicate a message whose confirm was lost: receivers drop
    duplicates by message id.

    With `mandatory`, a message no queue is bound for comes back from the
    broker (Basic.Return, before its confirm) and this returns False instead
    of losing it silently; otherwise (and for every routed message) True."""
    # The first attempt outside the retry policy: entering tenacity's loop
    # for every publish cost ~5 % of a small invocation's event loop.
    started = time.monotonic()
    try:
        return await _publish(exchange, message, routing_key, mandatory)
    except Exception as error:
        if not _transient(error):
            raise
        failed: BaseException | None = error
    async for attempt in policy.retrying_since(_transient, started):
        with attempt:
            if failed is not None:
                # The policy's first attempt is the one above: its waits and
                # time bound are as if the policy had run it.
                first, failed = failed, None
                raise first
            return await _publish(exchange, message, routing_key, mandatory)
    raise AssertionError("unreachable")


async def _publish(
    exchange: AbstractExchange, message: aio_pika.Message, routing_key: str, mandatory: bool
) -> bool:
    result = await exchange.publish(
        message, routing_key=routing_key, mandatory=mandatory, timeout=10
    )
    # The channel does not raise on returns (on_return_raises=False): a
    # returned message is the result instead of the broker's ack.
    return not isinstance(result, aiormq.abc.DeliveredMessage)


def envelope_message(
    envelope: p.Envelope,
    payload: bytes,
    *,
    user_id: str | None = None,
    persistent: bool = False,
    expires: bool = True,
    ttl: float | None = None,
) -> aio_pika.Message:
    """The AMQP message of an encoded envelope, whoever sends it: its ids and
    kind as properties (receivers route and drop duplicates by them); with
    `expires`, the envelope's deadline as the message's expiration (an expired
    request is dead-lettered back to the coordinator, never run late); with
    `user_id`, the sender's broker user, which RabbitMQ validates. `ttl`
    (seconds) sets the expiration instead of the deadline."""
    if ttl is None and expires:
        ttl = envelope.ttl_seconds()
    return aio_pika.Message(
        payload,
        content_type=p.CONTENT_TYPE,
        message_id=envelope.message_id,
        correlation_id=envelope.correlation_id or None,
        type=str(envelope.kind),
        user_id=user_id,
        timestamp=time.time(),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT if persistent else None,
        expiration=max(ttl, 0.001) if ttl is not None else None,
    )
