"""Feedback during a cohort wait: "waiting for 3 silos: north, south live; 12 s of 120".

An invocation that needs silos waits (at most `cohort_timeout`) until
`min_silos` are live. Without feedback that wait is silent for up to minutes.
`CohortWaitDisplay` is an invocation observer: between an invocation's start
and its cohort (or its end), while fewer than `min_silos` silos are live, a
small thread writes one line every `interval` seconds (first after `delay`)
on stderr, through tqdm so it never breaks a progress bar.

Both regimes' coordinators attach it with their progress display (context
option ``progress``; by default when stderr is a terminal).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

from tqdm import tqdm


class CohortWaitDisplay:
    def __init__(
        self,
        options: Any,
        membership: Any,
        *,
        stream: TextIO | None = None,
        delay: float = 2.0,
        interval: float = 5.0,
    ) -> None:
        self._options = options  # CoordinatorOptions: min_silos, cohort_timeout
        self._membership = membership
        self._stream = stream if stream is not None else sys.stderr
        self._delay = delay
        self._interval = interval
        self._waiting: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------ observer events

    def invocation_started(self, invocation: str) -> None:
        done = threading.Event()
        with self._lock:
            self._waiting[invocation] = done
        threading.Thread(
            target=self._tick,
            args=(invocation, done, time.monotonic()),
            name=f"cohort-wait-{invocation[:8]}",
            daemon=True,
        ).start()

    def cohort_chosen(self, invocation: str, *_: object) -> None:
        self._stop(invocation)

    def invocation_finished(self, invocation: str, *_: object) -> None:
        self._stop(invocation)

    def close(self) -> None:
        with self._lock:
            waiting, self._waiting = self._waiting, {}
        for done in waiting.values():
            done.set()

    # ------------------------------------------------------------- helpers

    def _stop(self, invocation: str) -> None:
        with self._lock:
            done = self._waiting.pop(invocation, None)
        if done is not None:
            done.set()

    def _live(self) -> list[str] | None:
        for _ in range(3):  # the event loop may change the table meanwhile
            try:
                return [r.name for r in self._membership.live()]
            except RuntimeError:
                continue
        return None

    def line(self, invocation: str, waited: float) -> str | None:
        """The line to show now, or None when nothing is being waited for."""
        options = self._options
        live = self._live()
        needed = options.min_silos or 1
        if live is None or len(live) >= needed:
            return None
        names = ", ".join(live) + " live" if live else "none live yet"
        plural = "silo" if needed == 1 else "silos"
        return (
            f"[{invocation[:8]}] waiting for {needed} {plural}: {names}; "
            f"{waited:.0f} s of {options.cohort_timeout:.0f}"
        )

    def _tick(self, invocation: str, done: threading.Event, started: float) -> None:
        if done.wait(self._delay):
            return
        while True:
            line = self.line(invocation, time.monotonic() - started)
            if line is not None:
                tqdm.write(line, file=self._stream)
            if done.wait(self._interval):
                return
