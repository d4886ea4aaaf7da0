"""One coordinator per federation, in either regime: a second one is refused
at start with an error that says why and what to do (real broker)."""

from __future__ import annotations

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
