"""A terminal progress display of invocations (tqdm on stderr).

For each invocation: which silos were selected, a bar of who has replied in
the current gather and whom it still waits on, stragglers dropped, and one
summary line when it ends. Enabled by the context option ``progress``:
True, False, or None (auto: only when stderr is a terminal), so logs and
pipes stay clean.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

from tqdm import tqdm

from tff_amqp.observe.events import InvocationObserver


def progress_enabled(setting: bool | None, stream: TextIO | None = None) -> bool:
    """`setting`, or for None whether `stream` (stderr) is a terminal."""
    if setting is not None:
        return setting
    stream = stream if stream is not None else sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@dataclass
class _Invocation:
    started: float
    cohort: list[str] = field(default_factory=list)
    # Gathers can overlap (FedAvg aggregates several values at once): a silo
    # is waited on while any of its gathers is open.
    outstanding: Counter[str] = field(default_factory=Counter)
    dropped: dict[str, str] = field(default_factory=dict)
    bar: tqdm | None = None

    @property
    def waiting(self) -> list[str]:
        return sorted(s for s, n in self.outstanding.items() if n > 0 and s not in self.dropped)


class ProgressDisplay(InvocationObserver):
    """Renders invocation events; add it to the runtime's events."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._active: dict[str, _Invocation] = {}

    def _write(self, line: str) -> None:
        tqdm.write(line, file=self._stream)

    def _state(self, invocation: str) -> _Invocation:
        return self._active.setdefault(invocation, _Invocation(time.monotonic()))

    def invocation_started(self, invocation: str) -> None:
        self._state(invocation)

    def cohort_chosen(self, invocation: str, silos: Sequence[str], waited: float) -> None:
        self._state(invocation).cohort = list(silos)
        self._write(
            f"[{invocation[:8]}] selected {len(silos)} silo(s): {', '.join(silos)} "
            f"(after {waited:.1f} s)"
        )

    def gather_started(self, invocation: str, silos: Sequence[str]) -> None:
        state = self._state(invocation)
        state.outstanding.update(silos)
        if state.bar is None:
            state.bar = tqdm(
                total=len(state.cohort) or len(silos),
                desc=f"[{invocation[:8]}] replied",
                unit="silo",
                file=self._stream,
                leave=False,
                dynamic_ncols=True,
                bar_format="{desc}: {n}/{total} |{bar:20}| {elapsed} {postfix}",
            )
        self._refresh(state)

    def silo_replied(self, invocation: str, silo: str) -> None:
        state = self._active.get(invocation)
        if state is None:
            return
        if state.outstanding[silo] > 0:
            state.outstanding[silo] -= 1
        self._refresh(state)

    def silos_dropped(self, invocation: str, silos: Sequence[str], reason: str) -> None:
        state = self._active.get(invocation)
        if state is not None:
            state.dropped.update(dict.fromkeys(silos, reason))
            self._refresh(state)
        what = "straggler(s)" if reason == "straggler" else f"silo(s) ({reason})"
        self._write(f"[{invocation[:8]}] dropped {what}: {', '.join(silos)}")

    def invocation_finished(self, invocation: str, ok: bool, seconds: float) -> None:
        state = self._active.pop(invocation, None)
        if state is None:
            return
        if state.bar is not None:
            state.bar.close()
        if not state.cohort:
            return  # ran at the coordinator only: nothing to report about silos
        answered = [s for s in state.cohort if s not in state.dropped]
        dropped = (
            "; dropped " + ", ".join(f"{s} ({r})" for s, r in state.dropped.items())
            if state.dropped
            else ""
        )
        outcome = "done" if ok else "FAILED"
        self._write(
            f"[{invocation[:8]}] {outcome} in {seconds:.2f} s: {len(answered)}/{len(state.cohort)} "
            f"silo(s) took part ({', '.join(answered) or '-'}){dropped}"
        )

    def _refresh(self, state: _Invocation) -> None:
        if state.bar is None:
            return
        waiting = state.waiting
        members = state.cohort or list(state.outstanding)
        state.bar.n = len([s for s in members if s not in waiting and s not in state.dropped])
        state.bar.set_postfix_str(f"waiting on: {', '.join(waiting) or 'nobody'}", refresh=True)
