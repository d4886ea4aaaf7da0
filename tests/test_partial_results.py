"""No silent partial results: an invocation that dropped silos (K of N) warns
with a PartialResultWarning naming them and why, reports them on the context
(`last_invocation`), and with `strict=True` fails with PartialResultError.
Real broker, real silo processes; results compared with TFF's native runtime.

Tests run in file order on one 3-silo federation; the last one kills a silo.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import time
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import tensorflow_federated as tff

import tff_amqp
from tests.support.computations import mean_glucose
from tests.support.federation import (
    Federation,
    local_federation,
    native_over,
    run_in,
    start_federation,
    wait_live,
)
from tff_amqp.errors import PartialResultError, PartialResultWarning, QuorumError
from tff_amqp.observe.progress import ProgressDisplay

# Long real-broker tests: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

NAMES = ("ash", "birch", "cedar")


@pytest.fixture(scope="module")
def three_silos(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("partial")
    with local_federation(amqp_url, root / "logs") as local:
        yield start_federation(local, root, names=NAMES, clients_per_silo=(2, 1, 3))


def _context(amqp_url: str, federation: Federation, **options) -> tff_amqp.AmqpSyncExecutionContext:
    options.setdefault("cohort_timeout", 60.0)
    options.setdefault("deadline", 120.0)
    options.setdefault("progress", False)
    return tff_amqp.create_sync_amqp_execution_context(
        amqp_url, federation=federation.name, **options
    ).start()


def _partial_warnings(caught: list[warnings.WarningMessage]) -> list[PartialResultWarning]:
    return [w.message for w in caught if isinstance(w.message, PartialResultWarning)]


def test_complete_invocation_gives_no_warning_and_lists_every_silo(
    amqp_url, three_silos, native_context
):
    stream = io.StringIO()
    # Every silo required: this also warms them up for the 1 s straggler
    # timeouts below (a cold first round can take longer on its own).
    with _context(amqp_url, three_silos, min_silos=3) as context:
        context.runtime.events.add(ProgressDisplay(stream))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = run_in(context, mean_glucose, tff_amqp.silo_data("readings"))
        report = context.last_invocation
    assert _partial_warnings(caught) == []
    np.testing.assert_allclose(
        result, native_over(native_context, mean_glucose, three_silos, NAMES), rtol=1e-6
    )
    assert report is not None and not report.partial
    assert sorted(report.cohort) == sorted(NAMES)
    assert sorted(report.took_part) == sorted(NAMES)
    assert report.dropped == {}
    assert len(report.invocation_id) == 32 and report.seconds > 0
    assert "3/3 silo(s) took part" in stream.getvalue()


def test_straggler_drop_warns_and_is_reported(amqp_url, three_silos, native_context):
    frozen = three_silos.local.silos["cedar"].process
    others = [n for n in NAMES if n != "cedar"]
    stream = io.StringIO()
    # A long heartbeat timeout, so this exercises the straggler path, not liveness.
    with _context(
        amqp_url, three_silos, min_silos=2, straggler_timeout=1.0, heartbeat_timeout=60.0
    ) as context:
        context.runtime.events.add(ProgressDisplay(stream))
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            with pytest.warns(PartialResultWarning, match=r"cedar \(straggler\)") as caught:
                result = run_in(context, mean_glucose, tff_amqp.silo_data("readings"))
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        report = context.last_invocation
    [warning] = _partial_warnings(caught.list)
    assert warning.dropped == {"cedar": "straggler"}
    assert sorted(warning.took_part) == sorted(others)
    np.testing.assert_allclose(
        result, native_over(native_context, mean_glucose, three_silos, others), rtol=1e-6
    )
    assert report is not None and report.partial
    assert warning.invocation_id == report.invocation_id
    assert sorted(report.cohort) == sorted(NAMES)
    assert sorted(report.took_part) == sorted(others)
    assert report.dropped == {"cedar": "straggler"}
    text = stream.getvalue()
    assert "2/3 silo(s) took part" in text and "dropped cedar (straggler)" in text


def test_strict_turns_a_straggler_drop_into_an_error(amqp_url, three_silos):
    frozen = three_silos.local.silos["cedar"].process
    with _context(
        amqp_url,
        three_silos,
        min_silos=2,
        straggler_timeout=1.0,
        heartbeat_timeout=60.0,
        strict=True,
    ) as context:
        wait_live(context, NAMES)
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with pytest.raises(PartialResultError, match=r"cedar \(straggler\)") as info:
                    run_in(context, mean_glucose, tff_amqp.silo_data("readings"))
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        report = context.last_invocation
    # An error instead of the result, not in addition to a warning.
    assert _partial_warnings(caught) == []
    assert isinstance(info.value, QuorumError)
    assert info.value.dropped == {"cedar": "straggler"}
    assert report is not None and report.dropped == {"cedar": "straggler"}


def test_strict_without_a_drop_returns_the_result(amqp_url, three_silos, native_context):
    with _context(amqp_url, three_silos, min_silos=3, strict=True) as context:
        wait_live(context, NAMES)
        result = run_in(context, mean_glucose, tff_amqp.silo_data("readings"))
        assert sorted(context.last_invocation.took_part) == sorted(NAMES)
    np.testing.assert_allclose(
        result, native_over(native_context, mean_glucose, three_silos, NAMES), rtol=1e-6
    )


def test_by_default_a_lost_silo_fails_the_invocation_naming_it(amqp_url, three_silos):
    """min_silos unset (the default): every cohort silo is required, so a
    silo that goes silent fails the invocation naming it and saying how to
    allow K of N, instead of returning a result over the others."""
    frozen = three_silos.local.silos["cedar"].process
    with _context(amqp_url, three_silos, heartbeat_timeout=2.0) as context:
        wait_live(context, NAMES)
        os.kill(frozen.pid, signal.SIGSTOP)
        started = time.monotonic()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", PartialResultWarning)
                with pytest.raises(QuorumError) as caught:
                    run_in(context, mean_glucose, tff_amqp.silo_data("readings"))
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        elapsed = time.monotonic() - started
        report = context.last_invocation
    assert not isinstance(caught.value, PartialResultError)
    message = str(caught.value)
    assert "'cedar'" in message and "min_silos unset" in message and "min_silos=K" in message
    assert elapsed < 2.0 + 4.0, f"failed after {elapsed:.1f} s"
    assert report is not None and sorted(report.cohort) == sorted(NAMES)


def test_async_context_warns_and_reports_a_straggler_drop(amqp_url, three_silos, native_context):
    """The async context (awaited in the caller's event loop) warns and
    reports exactly like the sync one."""
    frozen = three_silos.local.silos["cedar"].process
    others = [n for n in NAMES if n != "cedar"]

    async def run() -> tuple[object, object]:
        context = tff_amqp.create_async_amqp_execution_context(
            amqp_url,
            federation=three_silos.name,
            min_silos=2,
            straggler_timeout=1.0,
            heartbeat_timeout=60.0,
            cohort_timeout=60.0,
            deadline=120.0,
            progress=False,
        )
        await context.start()
        try:
            # Frozen once the context has seen it live: it is in the cohort.
            until = time.monotonic() + 30
            while not all(context.runtime.membership.is_live(s) for s in NAMES):
                assert time.monotonic() < until, f"silos {NAMES} not live"
                await asyncio.sleep(0.2)
            os.kill(frozen.pid, signal.SIGSTOP)
            with tff.framework.get_context_stack().install(context):
                result = await mean_glucose(tff_amqp.silo_data("readings"))
            return result, context.last_invocation
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
            await context.close()

    with pytest.warns(PartialResultWarning, match=r"cedar \(straggler\)") as caught:
        result, report = asyncio.run(run())
    [warning] = _partial_warnings(caught.list)
    assert warning.dropped == {"cedar": "straggler"}
    np.testing.assert_allclose(
        result, native_over(native_context, mean_glucose, three_silos, others), rtol=1e-6
    )
    assert report is not None and report.dropped == {"cedar": "straggler"}
    assert sorted(report.took_part) == sorted(others)
    assert warning.invocation_id == report.invocation_id


def test_killed_silo_drop_warns_as_lost(amqp_url, three_silos, native_context):
    victim = three_silos.local.silos["birch"].process
    others = [n for n in NAMES if n != "birch"]
    stream = io.StringIO()
    with _context(amqp_url, three_silos, min_silos=2, heartbeat_timeout=2.0) as context:
        context.runtime.events.add(ProgressDisplay(stream))
        wait_live(context, NAMES)
        os.kill(victim.pid, signal.SIGKILL)
        with pytest.warns(PartialResultWarning, match=r"birch \(lost\)"):
            result = run_in(context, mean_glucose, tff_amqp.silo_data("readings"))
        report = context.last_invocation
    np.testing.assert_allclose(
        result, native_over(native_context, mean_glucose, three_silos, others), rtol=1e-6
    )
    assert report is not None
    assert report.dropped == {"birch": "lost"}
    assert sorted(report.took_part) == sorted(others)
    # The summary counts the silos that took part, not the cohort.
    assert "2/3 silo(s) took part (ash, cedar); dropped birch (lost)" in stream.getvalue()
