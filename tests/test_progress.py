"""Progress of long steps: bars with the time left on a terminal, rate-limited lines elsewhere, plain callables
still given strings."""
import io
import re
from types import SimpleNamespace

from rich.console import Console
from typer.testing import CliRunner

import estimators.progress as P
from estimators.progress import Step, shown, status, step
from flows.progress import ConsoleProgress, TimeLeftColumn


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_lines_are_rate_limited_and_end_with_a_final_line():
    clock, lines = FakeClock(), []
    s = Step(lines.append, "NSGA-II", 10_000, "per-layer candidates", interval=2.0, clock=clock)
    for i in range(1, 41):  # a generation every 0.25 s for 10 s
        clock.t = 0.25 * i
        s.update(250 * i)
    s.finish(done=10_040)  # a search evaluates a few more than asked: the count stays at its total
    assert len(lines) == 5  # at 2, 4, 6 and 8 s (at 10 s it is done), then the final line
    assert lines[0].startswith("NSGA-II: 2,000/10,000 per-layer candidates") and "about 8.0 s left" in lines[0]
    assert lines[-1] == "NSGA-II: 10,000/10,000 per-layer candidates in 10 s"
    s.finish()
    assert len(lines) == 5  # one final line only


def test_short_step_says_only_its_final_line_and_an_error_none():
    lines = []
    with step(lines.append, "sensitivity", 3, "passes") as s:
        for i in range(3):
            s.update(i + 1, f"group {i}")
    assert len(lines) == 1 and lines[0].startswith("sensitivity: 3/3 passes in ")
    lines.clear()
    try:
        with step(lines.append, "fp32 networks", 20, "s") as s:
            s.update(5.0)
            raise RuntimeError("stopped")
    except RuntimeError:
        pass
    assert lines == []


def test_seconds_step_never_says_a_negative_time_left():
    clock, lines = FakeClock(), []
    s = Step(lines.append, "fp32 networks", 22.0, "s", interval=2.0, clock=clock)
    clock.t = 25.0
    s.update(21.0, "5 synthetic networks timed")
    assert lines == ["fp32 networks: 21/22 s, 5 synthetic networks timed (about 1.2 s left)"]
    s.finish("done", done=26.0)  # the stage overran its budget
    assert lines[-1] == "fp32 networks: 25 s (budget 22 s), done"
    assert P.time_left(30, 22, 10.0) == 0.0 and "-" not in P.progress_line("x", 30, 22, "s", 10.0)


def test_plain_callables_get_strings():
    """Every progress callable of type Callable[[str], None] keeps working: steps and statuses say lines."""
    got = []
    with status(got.append, "measuring this machine's peaks"):
        pass
    with step(got.append, "train", 4, "batches", lines=False) as s:  # the caller says its own lines
        s.update(4)
    assert got == ["measuring this machine's peaks"] and all(isinstance(m, str) for m in got)


def _terminal():
    out = io.StringIO()
    return ConsoleProgress(Console(file=out, force_terminal=True, width=150, color_system=None)), out


def test_terminal_shows_a_bar_with_the_time_left_then_one_line():
    prog, out = _terminal()
    s = step(prog, "NSGA-II", 10_000, "per-layer candidates")
    assert not isinstance(s, Step)  # a bar, not lines
    s.update(2_000, "generation 10")
    s.update(4_000, "generation 20")
    prog._bars.refresh()
    shown_now = out.getvalue()
    assert "NSGA-II" in shown_now and "4,000/10,000 per-layer candidates" in shown_now
    assert re.search(r"\d+:\d\d left", shown_now) and "━" in shown_now and "generation 20" in shown_now
    prog("[fp32 15/72 s] a message, not markup")  # printed above the bar
    s.finish(done=10_000)
    assert prog._bars is None  # the display stopped with its last bar
    text = out.getvalue()
    assert "[fp32 15/72 s] a message, not markup" in text
    assert re.search(r"NSGA-II: 10,000/10,000 per-layer candidates in [\d.]+ s\s*$", text)


def test_terminal_spinner_and_lines_only():
    prog, out = _terminal()
    with prog.status("tracing torchvision:resnet50", line=False):
        prog._bars.refresh()
        assert "tracing torchvision:resnet50" in out.getvalue()
    assert prog._bars is None
    prog.lines_only = True  # --json: lines even on a terminal
    assert isinstance(step(prog, "x", 1), Step)
    prog.close()


def test_time_left_column_is_never_negative():
    col = TimeLeftColumn(compact=True)
    assert col.render(SimpleNamespace(total=10.0, time_remaining=-7.0, fields={})).plain == "0:00 left"
    assert col.render(SimpleNamespace(total=10.0, time_remaining=75.0, fields={})).plain == "1:15 left"
    assert col.render(SimpleNamespace(total=None, time_remaining=None, fields={})).plain == ""


def test_a_stage_counting_its_budget_follows_the_clock_and_overruns_at_zero_left():
    """A calibration stage counts its budget's seconds: its bar and time left move between its updates (a network
    can take many seconds) and, past its budget, it stays full at 0:00 left."""
    prog, out = _terminal()
    s = step(prog, "fp32 networks", 30.0, "s")
    s.update(0.0, "1 synthetic networks timed")
    task = prog._bars._tasks[s.task]
    task.start_time -= 12.0  # 12 s into the stage, no update since
    prog._bars.refresh()
    assert "12/30 s" in out.getvalue() and ("0:18 left" in out.getvalue() or "0:17 left" in out.getvalue())
    task.start_time -= 30.0  # past its budget
    prog._bars.refresh()
    text = out.getvalue()
    assert "30/30 s" in text and "0:00 left" in text and "-0:" not in text and "-1" not in text
    s.finish("5 networks", done=42.0)
    assert re.search(r"fp32 networks: [\d.]+ s \(budget 30 s\), 5 networks\s*$", out.getvalue())


def test_a_flow_step_draws_on_the_shown_terminal():
    """`deployfit run` in a terminal shows the flow's steps (tasks.pipeline.run_progress) as its bars; without a
    shown progress they are lines of the run's log."""
    from tasks.pipeline import run_progress

    prog, out = _terminal()
    assert isinstance(run_progress.step("executing candidates", 3), Step)
    with shown(prog):
        s = run_progress.step("executing candidates", 3, lines=False)
        assert not isinstance(s, Step)
        s.update(1, "prune:0.5")
        s.finish()
    assert "executing candidates: 1/3 in" in out.getvalue()


def test_plan_prints_few_nsga_lines():
    """A real search (no mock) off a terminal: NSGA-II says at most one line per LINE_INTERVAL_S and a final one
    (it said one every 10 generations: 50 lines for 100,000 evaluations)."""
    from flows.cli import app

    r = CliRunner().invoke(app, ["plan", "demo:digits-cnn", "--hardware", "a100", "--max-params", "20000",
                                 "--nsga-evals", "20000", "--json"])
    assert r.exit_code == 0, r.output
    nsga = [ln for ln in r.stderr.splitlines() if ln.startswith("NSGA-II")]
    final = re.fullmatch(r"NSGA-II: 20,000/20,000 per-layer candidates in ([\d.]+) s", nsga[-1])
    assert final, nsga
    assert len(nsga) <= 1 + float(final.group(1)) / P.LINE_INTERVAL_S
    assert "━" not in r.stderr  # no bar off a terminal
