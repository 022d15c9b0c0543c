"""Progress of long steps through any `progress` callable (Callable[[str], None]: it shows or logs one line
per message, as every step of deployfit reports).

A step that counts (NSGA-II's evaluations, a calibration stage's seconds, the sensitivity analysis' passes, the
epochs' batches, the candidates a run executes) reports through `step(progress, label, total, unit)`, a Step
updated with `update(done, note)` and ended by `finish(note)` (or by leaving its `with` block). A progress
that draws bars (flows.progress.ConsoleProgress where stderr is a terminal) has a `step` method of its own and
shows the count as a bar with the time left; to any other callable the step says lines: at most one per
LINE_INTERVAL_S while it runs (NSGA-II alone would say one every 0.2 s) and a final one, so that neither a
terminal nor a log is flooded and no long step is silent for more than LINE_INTERVAL_S between its updates.

`status(progress, message)` wraps a step that cannot count (tracing a model, measuring the peaks): a spinner
where a progress draws one, else the message as one line."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

Progress = Callable[[str], None]

LINE_INTERVAL_S = 2.0  # a step's lines, where no bar shows it: at most one per this many seconds, and its last


def _count(v: float, unit: str) -> str:
    if unit == "s":
        return f"{v:.0f}"
    return f"{int(v):,}" if float(v).is_integer() else f"{v:,.1f}"


def _duration(s: float) -> str:
    s = max(0.0, s)  # never a negative time
    if s < 90:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    return f"{s / 60:.1f} min"


def count_text(done: float, total: float, unit: str = "") -> str:
    """`done/total unit`, e.g. `2,000/10,000 per-layer candidates` or `15/72 s`."""
    return f"{_count(done, unit)}/{_count(total, unit)}" + (f" {unit}" if unit else "")


def time_left(done: float, total: float, elapsed: float) -> Optional[float]:
    """Seconds left at the pace so far (never negative); None before anything is done."""
    if done <= 0 or elapsed <= 0:
        return None
    return max(0.0, (total - done) * elapsed / done)


def progress_line(label: str, done: float, total: float, unit: str, elapsed: float, note: str = "") -> str:
    """A running step's line: `NSGA-II: 2,000/10,000 per-layer candidates, about 6.0 s left`."""
    left = time_left(done, total, elapsed)
    return (f"{label}: {count_text(done, total, unit)}" + (f", {note}" if note else "")
            + (f" (about {_duration(left)} left)" if left is not None and done < total else ""))


def final_line(label: str, done: float, total: float, unit: str, elapsed: float, note: str = "") -> str:
    """A finished step's line: `NSGA-II: 10,000/10,000 per-layer candidates in 3.1 s`; a step counting its
    budget's seconds says the seconds it took: `fp32 networks: 23 s (budget 22 s), ...`."""
    head = (f"{label}: {_duration(elapsed)} (budget {_duration(total)})" if unit == "s"
            else f"{label}: {count_text(done, total, unit)} in {_duration(elapsed)}")
    return head + (f", {note}" if note else "")


class Scoped:
    """A step as a `with` block: finished when the block ends normally, closed (no final line) on an error."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.close()


class Step(Scoped):
    """A counting step said as lines through a plain progress callable: at most one per `interval` seconds (the
    first `interval` after it starts) and the final one. `done` is kept within 0..total (a search that evaluates
    a few more than asked, a stage that overruns its budget's seconds). `lines=False`: no lines at all (where the
    caller says its own)."""

    def __init__(self, progress: Progress, label: str, total: float, unit: str = "",
                 interval: Optional[float] = None, lines: bool = True, clock: Callable[[], float] = time.monotonic):
        self.progress, self.label, self.total, self.unit = progress, label, max(float(total), 0.0), unit
        self.interval = LINE_INTERVAL_S if interval is None else interval
        self.lines, self.clock = lines, clock
        self.t0 = self.last = clock()
        self.done = 0.0
        self.ended = False

    def _set(self, done: Optional[float]) -> None:
        if done is not None:
            self.done = min(max(float(done), 0.0), self.total)

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def update(self, done: float, note: str = "") -> None:
        self._set(done)
        now = self.clock()
        if self.lines and not self.ended and self.done < self.total and now - self.last >= self.interval:
            self.last = now
            self.progress(progress_line(self.label, self.done, self.total, self.unit, now - self.t0, note))

    def finish(self, note: str = "", done: Optional[float] = None, line: bool = True) -> None:
        """The step is over: its final line (`line=False`: none, where the caller says its own)."""
        self._set(done)
        if self.ended:
            return
        self.ended = True
        if self.lines and line:
            self.progress(final_line(self.label, self.done, self.total, self.unit, self.elapsed(), note))

    def close(self) -> None:
        """The step stopped (an error, an interrupt): no final line."""
        self.ended = True


def step(progress: Progress, label: str, total: float, unit: str = "", lines: bool = True) -> Step:
    """A counting step reported to `progress`: its own (a bar) where it draws them, else lines (Step).
    `unit`: what is counted, shown after the count (`s`: the step counts the seconds of its budget)."""
    own = getattr(progress, "step", None)
    if callable(own):
        return own(label, total, unit, lines=lines)
    return Step(progress, label, total, unit, lines=lines)


@contextmanager
def status(progress: Progress, message: str, line: bool = True) -> Iterator[None]:
    """A step that cannot count: a spinner with `message` where `progress` draws one, else the message as a line
    (`line=False`: nothing)."""
    own = getattr(progress, "status", None)
    if callable(own):
        with own(message, line=line):
            yield
        return
    if line:
        progress(message)
    yield


_SHOWN: list = []  # progress a terminal shows (flows.progress.ConsoleProgress), innermost last


@contextmanager
def shown(progress) -> Iterator[None]:
    """Within this block, steps that otherwise log (a Prefect flow's, tasks.pipeline.RunProgress) draw on
    `progress` instead: `deployfit run` in a terminal shows the flow's steps as bars."""
    _SHOWN.append(progress)
    try:
        yield
    finally:
        _SHOWN.remove(progress)


def showing():
    """The progress steps draw on (shown()), or None."""
    return _SHOWN[-1] if _SHOWN else None
