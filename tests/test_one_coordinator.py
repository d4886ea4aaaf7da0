"""One coordinator per federation, in either regime: a second one is refused
at start with an error that says why and what to do (real broker)."""

from __future__ import annotations

import asyncio

import pytest

import tff_amqp
from tff_amqp.errors import TffAmqpError


@pytest.mark.parametrize("second_regime", ["stateful", "mapreduce"])
def test_a_second_coordinator_of_a_federation_is_refused(amqp_url, federation, second_regime):
    first = tff_amqp.create_sync_amqp_execution_context(amqp_url, federation=federation)
    with first.start():
        if second_regime == "stateful":
            second = tff_amqp.create_sync_amqp_execution_context(amqp_url, federation=federation)
        else:
            second = tff_amqp.create_sync_amqp_mapreduce_context(amqp_url, federation=federation)
        try:
            with pytest.raises(TffAmqpError) as error:
                second.start()
        finally:
            second.close()
        message = str(error.value)
        assert "another coordinator is already running" in message
        assert f"tff.{federation}.coordinator" in message
    # Once the first has gone, the federation takes a new coordinator.
    with tff_amqp.create_sync_amqp_execution_context(amqp_url, federation=federation).start():
        pass


@pytest.mark.parametrize("regime", ["stateful", "mapreduce"])
def test_set_installs_a_context_that_starts_once_on_its_loop_and_closes(
    amqp_url, federation, regime
):
    # Both regimes' contexts share the runtime lifecycle and the `set_*`
    # installer (tff_amqp/coordinator/runtime.py, context.py).
    from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

    stack = context_stack_impl.context_stack
    previous = stack.current
    if regime == "stateful":
        context = tff_amqp.set_sync_amqp_execution_context(
            amqp_url, federation=federation, deadline=42.0
        )
        deadline = context.options.deadline
    else:
        context = tff_amqp.set_sync_amqp_mapreduce_context(
            amqp_url, federation=federation, deadline=42.0, shards_per_silo=3
        )
        deadline = context.options.coordinator.deadline
        assert context.options.shards_per_silo == 3
    try:
        assert stack.current is context
        assert deadline == 42.0
        setter = f"set_sync_amqp_{'execution' if regime == 'stateful' else 'mapreduce'}_context"
        assert getattr(tff_amqp, setter).__name__ == setter
        context.start()
        runtime = context._async_context.runtime
        assert runtime.started and runtime.telemetry is not None
        assert runtime.worker.is_running
        # Bound to the shared loop it started on: another loop is refused.
        with pytest.raises(RuntimeError, match="bound to the event loop it first ran on"):
            asyncio.run(context._async_context.start())
    finally:
        context.close()
        stack.set_default_context(previous)
    assert not runtime.started and runtime.telemetry is None
    with pytest.raises(RuntimeError, match="not started"):
        runtime.worker  # noqa: B018
