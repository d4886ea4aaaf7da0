"""A recorder of AMQP traffic for `benchmarks/critical_path.py`: when each
message was published and delivered, by correlation id, on the clock every
process of the machine shares (`time.monotonic_ns`), with the recording
thread's own CPU time (`time.thread_time_ns`) beside it.

It wraps aio-pika's per-delivery `consumer` and aiormq's
`Channel.basic_publish` (the two points every message of both sides passes)
in the process that calls `install()`: the benchmark itself, and silo
processes through `timeline_hook/sitecustomize.py`. A measuring tool only:
nothing in tff_amqp imports it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

# (monotonic ns, "pub" | "recv" | a mark, correlation id or label, thread CPU ns)
Event = tuple[int, str, str, int]

events: list[Event] = []
_recording = False


def install() -> None:
    """Wrap the two functions once (idempotent); nothing is recorded until
    `start()`."""
    import aio_pika.queue
    import aiormq.channel

    if getattr(aio_pika.queue.consumer, "_timeline", False):
        return
    consumer = aio_pika.queue.consumer
    basic_publish = aiormq.channel.Channel.basic_publish

    async def recorded_consumer(callback: Any, message: Any, *, no_ack: bool) -> Any:
        if _recording:
            correlation = message.header.properties.correlation_id or ""
            events.append((time.monotonic_ns(), "recv", correlation, time.thread_time_ns()))
        return await consumer(callback, message, no_ack=no_ack)

    async def recorded_publish(self: Any, body: bytes, **kwargs: Any) -> Any:
        if _recording:
            correlation = getattr(kwargs.get("properties"), "correlation_id", None) or ""
            events.append((time.monotonic_ns(), "pub", correlation, time.thread_time_ns()))
        return await basic_publish(self, body, **kwargs)

    recorded_consumer._timeline = True  # type: ignore[attr-defined]
    # aio-pika looks `consumer` up when a queue starts consuming: install
    # before the process consumes.
    aio_pika.queue.consumer = recorded_consumer  # type: ignore[assignment]
    aiormq.channel.Channel.basic_publish = recorded_publish  # type: ignore[method-assign]


def start() -> None:
    global _recording
    events.clear()
    _recording = True


def stop() -> list[Event]:
    global _recording
    _recording = False
    return list(events)


def mark(label: str) -> None:
    events.append((time.monotonic_ns(), "mark", label, time.thread_time_ns()))


def dump(path: Path) -> None:
    path.write_text(json.dumps(stop()))
