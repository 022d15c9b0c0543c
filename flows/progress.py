"""The command line's progress on stderr: rich bars with the time left where stderr is a terminal, lines elsewhere.

ConsoleProgress is a `progress` callable (estimators.progress): a message is one dim line, printed as is (not
taken for markup). Its counting steps (estimators.progress.step) are bars (description, bar, count, time left,
the step's latest note) when the console is a terminal; elsewhere (tests, CI, a pipe, `--json`) they are lines,
at most one per LINE_INTERVAL_S per step and a final one. A bar ends as one line, so the scrollback keeps what
each step did. Spinners (status) are tasks of the same display: there is one live display at a time."""
from __future__ import annotations

import io
import logging
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, Progress, ProgressColumn, SpinnerColumn, TaskID, TextColumn,
                           TimeRemainingColumn)
from rich.table import Column
from rich.text import Text

from estimators.progress import Scoped, Step, count_text, final_line


class TimeLeftColumn(TimeRemainingColumn):
    """The time left (`0:12 left`), never negative: the pace so far, or what is left of the budget of a step that
    counts its budget's seconds; nothing for a spinner's task (no total)."""

    def render(self, task) -> Text:
        if task.total is None:
            return Text("")
        if task.fields.get("clocked"):
            left = task.total - (task.elapsed or 0.0)
        else:
            left = task.time_remaining
        if left is None:
            return Text("-:-- left", style="progress.remaining")
        m, s = divmod(max(0, int(left)), 60)
        h, m = divmod(m, 60)
        return Text((f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}") + " left", style="progress.remaining")


class CountColumn(ProgressColumn):
    """`2,000/10,000 per-layer candidates`, `15/72 s`; nothing for a spinner's task."""

    def render(self, task) -> Text:
        return Text("") if task.total is None else Text(count_text(task.completed, task.total, task.fields["unit"]))


class NoteColumn(ProgressColumn):
    """A step's latest note, dim, cut with an ellipsis where the line is too short (the one column that gives way:
    the others do not wrap)."""

    def render(self, task) -> Text:
        return Text(task.fields.get("note", ""), style="dim", no_wrap=True, overflow="ellipsis")


class StepBarColumn(BarColumn):
    """The bar of a counting step; none for a spinner's task (no total)."""

    def render(self, task):
        return Text("") if task.total is None else super().render(task)


class _Bars(Progress):
    """Bars whose clocked steps (counting their budget's seconds) advance with the clock between updates."""

    def get_renderables(self):
        with self._lock:
            for task in self._tasks.values():
                if task.fields.get("clocked") and task.total is not None and task.finished_time is None:
                    task.completed = min(task.elapsed or 0.0, task.total)
        yield from super().get_renderables()


class _Above(io.TextIOBase):
    """A file whose lines `console` prints above its live display, their ANSI styles kept (rich's own FileProxy
    does not do for a console's file: a console writes to the file a FileProxy wraps)."""

    def __init__(self, console: Console, file):
        self._console, self._file, self._buffer = console, file, ""

    def write(self, text: str) -> int:
        self._buffer += text
        if "\n" in self._buffer:
            *lines, self._buffer = self._buffer.split("\n")
            self._console.print(Text("\n").join(Text.from_ansi(ln) for ln in lines), soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        if self._buffer:
            self._console.print(Text.from_ansi(self._buffer), soft_wrap=True)
            self._buffer = ""

    def isatty(self) -> bool:
        return self._file.isatty()

    def fileno(self) -> int:
        return self._file.fileno()


def _proxy_log_consoles(console: Console) -> list:
    """Logging handlers that print through a rich console of their own (Prefect's console handler, bound to the
    real stderr when logging was set up) print through `console` instead, above its live display rather than
    into it. Returns what to restore."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    moved, seen = [], set()
    for lg in loggers:
        for h in lg.handlers:
            c = getattr(h, "console", None)
            if isinstance(c, Console) and c is not console and id(c) not in seen and c.is_terminal:
                seen.add(id(c))
                moved.append((c, getattr(c, "_file", c.file)))  # its own file (None: whatever sys.stderr is)
                c.file = _Above(console, c.file)
    return moved


class ConsoleProgress:
    """Progress on `console` (the command line's stderr): messages as dim lines, counting steps as bars with
    the time left where it is a terminal (and `lines_only` is not set: `--json`), else as rate-limited lines."""

    def __init__(self, console: Console, interval: Optional[float] = None):
        self.console = console
        self.interval = interval  # None: estimators.progress.LINE_INTERVAL_S
        self.lines_only = False
        self._lock = threading.RLock()
        self._bars: Optional[Progress] = None
        self._active = 0
        self._moved: list = []

    @property
    def terminal(self) -> bool:
        """Whether steps show as bars."""
        return self.console.is_terminal and not self.lines_only

    def __call__(self, message) -> None:
        """A progress line on stderr, dimmed; its text printed as is ("[fp32]" is not markup)."""
        self.console.print(f"[dim]{escape(str(message))}[/]", highlight=False)

    def step(self, label: str, total: float, unit: str = "", lines: bool = True):
        if not self.terminal:
            return Step(self, label, total, unit, self.interval, lines=lines)
        return _BarStep(self, label, total, unit)

    @contextmanager
    def status(self, message: str, line: bool = True) -> Iterator[None]:
        """A spinner with `message` on a terminal, removed when the block ends; elsewhere the message as a line
        (`line=False`: nothing, so that an error stays the one line a command prints)."""
        if not self.terminal:
            if line:
                self(message)
            yield
            return
        bars, task = self._add(escape(message), None)
        try:
            yield
        finally:
            self._remove(bars, task)

    def _add(self, description: str, total: Optional[float], unit: str = "") -> tuple[Progress, TaskID]:
        with self._lock:
            if self._bars is None:
                fixed = Column(no_wrap=True)
                self._bars = _Bars(
                    SpinnerColumn(table_column=fixed), TextColumn("{task.description}", table_column=fixed),
                    StepBarColumn(bar_width=28, table_column=fixed), CountColumn(table_column=fixed),
                    TimeLeftColumn(compact=True, table_column=fixed), NoteColumn(),
                    console=self.console, transient=True, redirect_stdout=False, refresh_per_second=4,
                    speed_estimate_period=300.0)
            if not self._active:
                self._bars.start()
                self._moved = _proxy_log_consoles(self.console)
            self._active += 1
            return self._bars, self._bars.add_task(description, total=total, unit=unit, clocked=unit == "s", note="")

    def _remove(self, bars: Progress, task: TaskID) -> None:
        with self._lock:
            if bars is not self._bars or task not in bars.task_ids:  # closed meanwhile
                return
            bars.remove_task(task)
            self._active -= 1
            if not self._active:
                self._stop()

    def _stop(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None  # a new display next time: a stopped one leaves its finished rendering behind
        for c, f in self._moved:
            c._file = f
        self._moved = []
        self._active = 0

    def close(self) -> None:
        """Remove every bar and spinner (the command ended, or was interrupted)."""
        with self._lock:
            self._stop()


class _BarStep(Scoped):
    """A counting step as a bar of a ConsoleProgress (the interface of estimators.progress.Step)."""

    def __init__(self, owner: ConsoleProgress, label: str, total: float, unit: str):
        self.owner, self.label, self.total, self.unit = owner, label, max(float(total), 0.0), unit
        self.done = 0.0
        self.ended = False
        self.t0 = time.monotonic()
        self.bars, self.task = owner._add(escape(label), self.total, unit)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def update(self, done: float, note: str = "") -> None:
        if self.ended:
            return
        self.done = min(max(float(done), 0.0), self.total)
        fields = {"note": note} if note else {}
        if self.unit != "s":  # a step counting its budget's seconds advances with the clock (_Bars)
            fields["completed"] = self.done
        with self.owner._lock:
            if self.bars is self.owner._bars:
                self.bars.update(self.task, **fields)

    def finish(self, note: str = "", done: Optional[float] = None, line: bool = True) -> None:
        if done is not None:
            self.done = min(max(float(done), 0.0), self.total)
        if self.ended:
            return
        elapsed = self.elapsed()
        self.close()
        if line:
            self.owner(final_line(self.label, self.done, self.total, self.unit, elapsed, note))

    def close(self) -> None:
        if not self.ended:
            self.ended = True
            self.owner._remove(self.bars, self.task)
