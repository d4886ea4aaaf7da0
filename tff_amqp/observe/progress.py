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
    waiting: list[str] = field(default_factory=list)
    replied: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    gathers: int = 0
    bar: tqdm | None = None


class ProgressDisplay(InvocationObserver):
    """Renders invocation events; add it to the runtime's events."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._active: dict[str, _Invocation] = {}

    def _write(self, line: str) -> None:
        tqdm.write(line, file=self._stream)

    def invocation_started(self, invocation: str) -> None:
        self._active[invocation] = _Invocation(time.monotonic())

    def cohort_chosen(self, invocation: str, silos: Sequence[str], waited: float) -> None:
        state = self._active.setdefault(invocation, _Invocation(time.monotonic()))
        state.cohort = list(silos)
        self._write(
            f"[{invocation[:8]}] selected {len(silos)} silo(s): {', '.join(silos)} "
            f"(after {waited:.1f} s)"
        )

    def gather_started(self, invocation: str, silos: Sequence[str]) -> None:
        state = self._active.setdefault(invocation, _Invocation(time.monotonic()))
        state.gathers += 1
        state.waiting, state.replied = list(silos), []
        if state.bar is None:
            state.bar = tqdm(
                total=len(silos),
                desc=f"[{invocation[:8]}] replies",
                unit="silo",
                file=self._stream,
                leave=False,
                dynamic_ncols=True,
                bar_format="{desc}: {n_fmt}/{total_fmt} |{bar:20}| {elapsed} {postfix}",
            )
        else:
            state.bar.reset(total=len(silos))
        self._refresh(state)

    def silo_replied(self, invocation: str, silo: str) -> None:
        state = self._active.get(invocation)
        if state is None:
            return
        if silo in state.waiting:
            state.waiting.remove(silo)
        state.replied.append(silo)
        if state.bar is not None:
            state.bar.update(1)
        self._refresh(state)

    def silos_dropped(self, invocation: str, silos: Sequence[str], reason: str) -> None:
        state = self._active.get(invocation)
        if state is not None:
            for silo in silos:
                state.dropped[silo] = reason
                if silo in state.waiting:
                    state.waiting.remove(silo)
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
        waiting = ", ".join(state.waiting) if state.waiting else "nobody"
        state.bar.set_postfix_str(f"waiting on: {waiting}", refresh=True)
