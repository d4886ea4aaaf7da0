"""One retry policy for everything that reconnects (Flower-style: retries live
in a policy object, not sprinkled through call sites)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import tenacity


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded in total time.

    `total_timeout` bounds every wait: an unreachable broker becomes a clear
    error instead of a hang. Wait n (from 0) is ``initial_delay * 2**n`` plus
    a random part of up to `jitter` seconds (so silos started together do not
    retry in step), at most `max_delay`.
    """

    initial_delay: float = 0.2
    max_delay: float = 5.0
    total_timeout: float = 30.0
    jitter: float = 1.0

    def retrying(self, should_retry: Callable[[BaseException], bool]) -> tenacity.AsyncRetrying:
        """An async iterator of attempts; the last error is re-raised."""
        return tenacity.AsyncRetrying(**self._schedule(should_retry))

    def retrying_since(
        self, should_retry: Callable[[BaseException], bool], started: float
    ) -> tenacity.AsyncRetrying:
        """`retrying`, for an operation whose first attempt ran outside it
        (from `started`, a `time.monotonic()`): the time already spent counts
        against `total_timeout`. The caller re-raises that attempt's error in
        the first attempt, so the waits are those of attempts 2, 3, ..."""
        elapsed = time.monotonic() - started
        remaining = replace(self, total_timeout=max(self.total_timeout - elapsed, 0.0))
        return remaining.retrying(should_retry)

    def retrying_blocking(self, should_retry: Callable[[BaseException], bool]) -> tenacity.Retrying:
        """The same for blocking code (e.g. a silo reading data in a thread)."""
        return tenacity.Retrying(**self._schedule(should_retry))

    def _schedule(self, should_retry: Callable[[BaseException], bool]) -> dict[str, Any]:
        """The policy as tenacity's arguments, one definition for both kinds."""
        return dict(
            wait=tenacity.wait_exponential_jitter(
                multiplier=self.initial_delay, max=self.max_delay, jitter=self.jitter
            ),
            stop=tenacity.stop_after_delay(self.total_timeout),
            retry=tenacity.retry_if_exception(should_retry),
            reraise=True,
        )


# The policies in use, named here so every call site agrees.
# Publishes ride out a reconnect of the robust connection, bounded; a silo's
# results wait longer than the coordinator's requests (whose invocation's
# deadline retries them anyway).
COORDINATOR_PUBLISH = RetryPolicy(initial_delay=0.1, max_delay=2.0, total_timeout=30.0)
SILO_PUBLISH = RetryPolicy(initial_delay=0.1, max_delay=2.0, total_timeout=60.0)
# A silo fetching its data from an HTTPS URL: a server that is down or
# answering 5xx gets a few more tries, not minutes of a silo's start-up.
HTTP_FETCH = RetryPolicy(initial_delay=0.2, max_delay=2.0, total_timeout=10.0)


# Seconds aio-pika's robust connection waits between reconnect attempts once
# connected (its default is 5 s): silos should be back well within the
# coordinator's heartbeat timeout.
RECONNECT_INTERVAL = 1


def connect_within(seconds: float) -> RetryPolicy:
    """First connection to the broker: the default backoff, within `seconds`."""
    return RetryPolicy(total_timeout=seconds)
