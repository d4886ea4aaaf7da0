"""The event loop tff-amqp's own processes run on: uvloop unless
$TFF_AMQP_EVENT_LOOP says asyncio (see tff_amqp/event_loop.py). Silos on
either loop compute what TFF's native runtime does; a bad setting stops a
silo at once."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.support.computations import fed_mean
from tests.support.federation import assert_close, run_in, started_context, write_silo_csvs
from tests.support.silo_cli import assert_silo_refuses
from tff_amqp.coordinator.sync import LoopThread
from tff_amqp.event_loop import EVENT_LOOP_ENV, loop_kind, new_event_loop, run, running_kind
from tff_amqp.local import LocalFederation, SiloOptions

VALUES = [1.0, 2.5, -3.0, 4.0, 10.0, 0.5, 7.25]


def test_the_setting_is_read_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(EVENT_LOOP_ENV, raising=False)
    assert loop_kind() == "uvloop"
    for setting, kind in ((" asyncio ", "asyncio"), ("UVLOOP", "uvloop"), ("", "uvloop")):
        monkeypatch.setenv(EVENT_LOOP_ENV, setting)
        assert loop_kind() == kind
    monkeypatch.setenv(EVENT_LOOP_ENV, "trio")
    with pytest.raises(ValueError, match=f"{EVENT_LOOP_ENV}='trio': expected one of"):
        loop_kind()
    with pytest.raises(ValueError, match=EVENT_LOOP_ENV):
        new_event_loop()


@pytest.mark.parametrize("setting", ["uvloop", "asyncio"])
def test_run_and_the_sync_context_loop_use_the_setting(
    monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    monkeypatch.setenv(EVENT_LOOP_ENV, setting)

    async def kind() -> str:
        await asyncio.sleep(0)
        return running_kind()

    assert run(kind()) == setting
    thread = LoopThread()
    try:
        assert thread.run_coro_and_return_result(kind()) == setting
    finally:
        thread.stop()


def _ready_record(log: str, event: str) -> dict:
    for line in log.splitlines():
        if event in line:
            return json.loads(line[line.index("{") :])
    raise AssertionError(f"no {event!r} in the log:\n{log[-2000:]}")


def test_silos_on_either_loop_match_native(
    local: LocalFederation,
    amqp_url: str,
    native_context,
    tmp_path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over the real broker: a silo started without the variable runs on
    uvloop, one told `asyncio` on the standard loop (each says so in its
    ready event); a federated mean over both matches TFF native's."""
    monkeypatch.delenv(EVENT_LOOP_ENV, raising=False)
    settings = {"on-uvloop": None, "on-asyncio": {EVENT_LOOP_ENV: "asyncio"}}
    for i, (name, env) in enumerate(settings.items()):
        folder = write_silo_csvs(tmp_path, i, 2)
        local.start_silo(name, data={"readings": folder}, options=SiloOptions(env=env))
    local.wait_ready(timeout=240)
    for name, expected in (("on-uvloop", "uvloop"), ("on-asyncio", "asyncio")):
        ready = _ready_record(local.silos[name].log_text(), "silo.ready")
        assert ready.get("event_loop") == expected, ready
    with started_context(amqp_url, local.federation, len(settings)) as context:
        for values in (VALUES, VALUES[:1]):
            assert_close(
                run_in(context, fed_mean, values), run_in(native_context, fed_mean, values)
            )


@pytest.mark.parametrize("command", ["silo", "silos"])
def test_a_silo_with_a_bad_setting_stops_at_once(amqp_url: str, command: str) -> None:
    """Checked with the other flags, before the broker and TensorFlow:
    exit status 2 and one line naming the variable (a silo, a host)."""
    assert_silo_refuses(amqp_url, EVENT_LOOP_ENV, "trio", command)
