"""The asyncio event loop tff-amqp's own processes run on.

Silos, simulation hosts, pool workers and the synchronous execution context's
loop thread run on uvloop (libuv's loop for asyncio) by default: their CPU is
mostly asyncio scheduling, AMQP frames and gRPC calls to the TFF worker, and
uvloop does the scheduling and socket I/O in C (a federated mean ~9 % faster
in A/B runs of `benchmarks/overhead.py`, docs/operations.md). `TFF_AMQP_EVENT_LOOP=asyncio`
selects the standard library's loop; where uvloop is not installed (it does
not exist for Windows) that is what runs. An asynchronous context runs on
the caller's loop, whatever it is.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

EVENT_LOOP_ENV = "TFF_AMQP_EVENT_LOOP"
LoopKind = Literal["uvloop", "asyncio"]
_KINDS: tuple[LoopKind, ...] = ("uvloop", "asyncio")

T = TypeVar("T")


def loop_kind() -> LoopKind:
    """The loop $TFF_AMQP_EVENT_LOOP asks for (unset or empty: uvloop, if
    installed); ValueError naming the variable for anything else."""
    raw = os.environ.get(EVENT_LOOP_ENV, "").strip().lower()
    if not raw:
        return "uvloop" if _uvloop_installed() else "asyncio"
    for kind in _KINDS:
        if raw == kind:
            if kind == "uvloop" and not _uvloop_installed():
                raise ValueError(
                    f"{EVENT_LOOP_ENV}=uvloop, but uvloop is not installed "
                    "(pip install uvloop, or unset the variable)"
                )
            return kind
    raise ValueError(f"{EVENT_LOOP_ENV}={raw!r}: expected one of {', '.join(_KINDS)}")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new loop of the kind `loop_kind` names."""
    if loop_kind() == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on a loop of the kind `loop_kind` names."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)


def running_kind() -> str:
    """The running loop's implementation ("uvloop" or "asyncio"), for logs."""
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]


def _uvloop_installed() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True
