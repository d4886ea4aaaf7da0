"""Lexical scopes of the coordinator's evaluation: `lookup_now` gives a bound
value only when it is already there, and never hides an error or a wait
(those go through `lookup`)."""

from __future__ import annotations

import asyncio

import pytest

from tff_amqp.coordinator.stateful.scope import EMPTY_SCOPE


async def test_lookup_now_gives_values_that_are_there_and_nothing_else() -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    done.set_result("done-value")
    failed = loop.create_future()
    failed.set_exception(ValueError("local failed"))
    pending = loop.create_future()
    cancelled = loop.create_future()
    cancelled.cancel()
    scope = (
        EMPTY_SCOPE.bind("plain", "plain-value")  # type: ignore[arg-type]
        .bind("done", done)  # type: ignore[arg-type]
        .bind("failed", failed)  # type: ignore[arg-type]
        .bind("pending", pending)  # type: ignore[arg-type]
        .bind("cancelled", cancelled)  # type: ignore[arg-type]
        .bind("plain", "shadowing-value")  # type: ignore[arg-type]
    )
    assert scope.lookup_now("plain") == "shadowing-value"  # the innermost binding
    assert scope.lookup_now("done") == "done-value"
    # Not there yet, or there as an error: the caller awaits `lookup`, which
    # waits or raises as before.
    assert scope.lookup_now("pending") is None
    assert scope.lookup_now("failed") is None
    assert scope.lookup_now("cancelled") is None
    assert scope.lookup_now("unbound") is None
    with pytest.raises(ValueError, match="local failed"):
        await scope.lookup("failed")
    with pytest.raises(NameError, match="unbound"):
        await scope.lookup("unbound")
    pending.set_result("late-value")
    assert await scope.lookup("pending") == "late-value"
    assert scope.lookup_now("pending") == "late-value"
