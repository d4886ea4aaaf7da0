"""A finished invocation's close rides the next invocation's batch to each
silo. The silo frees the finished invocation's values once that carrying
batch has been applied, not before it: the worker serves a `Dispose` ahead of
the calls queued behind it, and the carrying batch is what the coordinator
waits for. Real broker, three real silo processes (their debug log lines
read back), results compared with TFF's native runtime."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.support.computations import fed_mean
from tests.support.federation import (
    SILO_NAMES,
    assert_close,
    run_in,
    start_federation,
    started_context,
)
from tff_amqp.local import LocalFederation

VALUES = [1.0, 2.5, -3.0, 4.0, 10.0, 0.5, 7.25]
MEANS = 4


def _events(log: Path) -> list[dict[str, Any]]:
    events = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") in ("silo.batch_applied", "silo.session_freed"):
                events.append(event)
    return events


def test_a_carried_close_frees_its_invocation_after_the_carrying_batch(
    local: LocalFederation, amqp_url: str, native_context: Any, tmp_path: Path
) -> None:
    start_federation(local, tmp_path, env={"TFF_AMQP_LOG_LEVEL": "debug"})
    expected = run_in(native_context, fed_mean, VALUES)
    with started_context(amqp_url, local.federation, len(SILO_NAMES)) as context:
        for _ in range(MEANS):  # back to back: each close rides the next batch
            assert_close(run_in(context, fed_mean, VALUES), expected)
    local.stop_all()  # logs complete
    for silo in SILO_NAMES:
        events = _events(local.log_dir / f"silo-{silo}.log")
        freed = [e for e in events if e["event"] == "silo.session_freed"]
        # Every invocation was freed (the last by a close of its own).
        assert len({e["invocation"] for e in freed}) == MEANS, events
        carried = [e for e in freed if e["carried_close"]]
        assert len(carried) >= MEANS - 1, events
        for event in carried:
            at = events.index(event)
            mine = [i for i, e in enumerate(events) if e["invocation"] == event["invocation"]]
            # Between the invocation's own last batch and its freeing, another
            # invocation's batch (the one carrying the close) was applied.
            applied_after = [
                e
                for e in events[max(i for i in mine if i < at) + 1 : at]
                if e["event"] == "silo.batch_applied"
            ]
            assert applied_after, (silo, event, events)
