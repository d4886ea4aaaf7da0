"""What an invocation reports while it runs, for progress displays and metrics.

Core code calls an `InvocationEvents` (the runtime's `events`); observers are
plain objects with any subset of the methods of `InvocationObserver`. An
observer that raises is logged and skipped: watching never breaks a run.
All calls happen on the coordinator's event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

log = logging.getLogger(__name__)


class InvocationObserver:
    """No-op base: override what you need."""

    def invocation_started(self, invocation: str) -> None:
        """A new invocation (one computation call) began."""

    def cohort_chosen(self, invocation: str, silos: Sequence[str], waited: float) -> None:
        """The invocation's silos were selected after `waited` seconds."""

    def gather_started(self, invocation: str, silos: Sequence[str]) -> None:
        """The coordinator now waits for these silos' released values."""

    def silo_replied(self, invocation: str, silo: str) -> None:
        """`silo` delivered its released value in the current gather."""

    def gather_finished(self, invocation: str, replied: Sequence[str], seconds: float) -> None:
        """The gather ended with these silos' values after `seconds`."""

    def silos_dropped(self, invocation: str, silos: Sequence[str], reason: str) -> None:
        """`silos` were dropped from the invocation ("straggler" or "lost")."""

    def invocation_finished(self, invocation: str, ok: bool, seconds: float) -> None:
        """The invocation ended, successfully or not, after `seconds`."""


class InvocationEvents(InvocationObserver):
    """Fans every event out to the registered observers."""

    def __init__(self) -> None:
        self.observers: list[object] = []

    def add(self, observer: object) -> None:
        self.observers.append(observer)

    def remove(self, observer: object) -> None:
        if observer in self.observers:
            self.observers.remove(observer)

    def _emit(self, event: str, *args: object) -> None:
        for observer in list(self.observers):
            method = getattr(observer, event, None)
            if method is None:
                continue
            try:
                method(*args)
            except Exception:
                log.warning("observer.failed", extra={"event": event}, exc_info=True)

    def invocation_started(self, invocation: str) -> None:
        self._emit("invocation_started", invocation)

    def cohort_chosen(self, invocation: str, silos: Sequence[str], waited: float) -> None:
        self._emit("cohort_chosen", invocation, list(silos), waited)

    def gather_started(self, invocation: str, silos: Sequence[str]) -> None:
        self._emit("gather_started", invocation, list(silos))

    def silo_replied(self, invocation: str, silo: str) -> None:
        self._emit("silo_replied", invocation, silo)

    def gather_finished(self, invocation: str, replied: Sequence[str], seconds: float) -> None:
        self._emit("gather_finished", invocation, list(replied), seconds)

    def silos_dropped(self, invocation: str, silos: Sequence[str], reason: str) -> None:
        self._emit("silos_dropped", invocation, list(silos), reason)

    def invocation_finished(self, invocation: str, ok: bool, seconds: float) -> None:
        self._emit("invocation_finished", invocation, ok, seconds)
