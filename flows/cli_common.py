"""What every `deployfit` command shares: the Typer app, the consoles and progress on stderr, one JSON object on
stdout under --json, bad input as exit code 2 with one message, the option types, and SIGTERM handling."""
from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from estimators.errors import UserInputError
from flows.progress import ConsoleProgress

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Estimate, search and execute DNN compression strategies against deployment requirements.")
err_console = Console(stderr=True, soft_wrap=True)
# progress on stderr: a message is a dim line printed as is (not markup); a counting step (NSGA-II's evaluations, a
# calibration stage, the sensitivity passes) is a bar with the time left on a terminal, rate-limited lines elsewhere
progress = ConsoleProgress(err_console)


def warn(message: str) -> None:
    """A warning line on stderr, its text printed as is."""
    err_console.print(f"warning: {escape(message)}", highlight=False)


console = Console()

MODEL_HELP = ("torchvision:NAME, demo:NAME (demo:digits-cnn, demo:digits-resnet), package.module:factory, "
              "or a .pt2 file")


def quiet() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("LOGLEVEL", "ERROR")  # Intel Neural Compressor's logger level, read on import
    for name in ("torch_pruning", "neural_compressor", "torchao", "torch._export", "torch.export", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TQDM_DISABLE", "1")


def emit(obj: dict[str, Any]) -> None:
    """One JSON object on stdout, strict: a value that is not a finite number (NaN, inf) is null."""
    sys.stdout.write(json.dumps(finite(obj), default=json_default, allow_nan=False) + "\n")
    sys.stdout.flush()


def finite(o: Any) -> Any:
    import math

    import numpy as np

    if isinstance(o, dict):
        return {k: finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(o) else None
    return o


def json_default(o: Any):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def fail(msg: str, as_json: bool) -> None:
    err_console.print(f"[bold red]error:[/] {msg}", highlight=False)
    if as_json:
        emit({"error": msg})
    raise typer.Exit(code=2)


def fmt(v: Any) -> str:
    if isinstance(v, float) and abs(v) < 10 and not v.is_integer():
        return f"{v:.4g}"  # milliseconds and points: significant digits, not one decimal
    if isinstance(v, float) and not v.is_integer():
        return f"{v:,.1f}"
    if isinstance(v, (int, float)):
        return f"{int(v):,}"
    return str(v)


def totals_table(title: str, cols: dict[str, dict[str, Any]]) -> Table:
    t = Table(title=title)
    t.add_column("metric")
    for c in cols:
        t.add_column(c, justify="right")
    keys = list(next(iter(cols.values())).keys())
    for k in keys:
        t.add_row(k, *[fmt(cols[c].get(k, "")) for c in cols])
    return t


ModelArg = Annotated[str, typer.Argument(help=MODEL_HELP)]
WeightsOpt = Annotated[Optional[str], typer.Option("--weights", help="state_dict file (loaded with weights_only=True)")]
ShapeOpt = Annotated[Optional[str], typer.Option("--input-shape", help="comma-separated positive integers, batch "
                                                 "first, e.g. 1,3,224,224; a model of several inputs takes one shape "
                                                 "per forward argument, in order, separated by ';' (quote it: "
                                                 "'1,3,224,224;1,16'); default: the model's own")]
StrategyOpt = Annotated[str, typer.Option("--strategy", "-s", help="e.g. prune:0.5:global,quantize:int8, or JSON")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]
TrustOpt = Annotated[bool, typer.Option("--trust-pickle", help="load a .pt2 model that needs pickle (refused "
                                        "otherwise: unpickling can run any code); only for a file you trust")]


def compute(as_json: bool, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a command body; bad input ends with exit code 2 and one message, never a traceback. Its progress
    shows as bars on a terminal, as lines under --json (whose reader is a program) or off a terminal."""
    quiet()
    progress.lines_only = as_json
    try:
        rep = fn()
    except UserInputError as exc:
        progress.close()
        if signals.terminated:  # the flow failed because it was stopped: say so, not the failure it led to
            raise KeyboardInterrupt from None
        fail(str(exc), as_json)
    finally:
        progress.close()  # no bar outlives its command (an interrupt included)
    if as_json:
        emit(rep)
    return rep


@contextmanager
def status(message: str):
    """A step that can take seconds: a spinner with the message on a terminal, cleared when the step ends (so an
    error stays the one line a command prints); nothing where stderr is not a terminal."""
    with progress.status(message, line=False):
        yield


def load(model: str, weights: Optional[str], input_shape: Optional[str], trust_pickle: bool = False):
    with status(f"loading {model}"):
        from estimators.modelspec import load_model

        return load_model(model, weights=weights, input_shape=input_shape, trust_pickle=trust_pickle)


def search_options(grid_step: float, nsga_evals: int, seed: int, students: Optional[str], finetune_epochs: int):
    """The search options of `plan` and `run`, `--students` split at its commas."""
    from tasks.pipeline import SearchOptions

    return SearchOptions(grid_step=grid_step, nsga_evals=nsga_evals, seed=seed, finetune_epochs=finetune_epochs,
                         students=[x.strip() for x in (students or "").split(",") if x.strip()])


def run_analysis(loaded):
    """The layer table of `loaded` (cached by model), tracing it where it is not cached, with a spinner."""
    from estimators.analyze import analyze

    with status(f"tracing {loaded.spec} into its layer table"):
        return analyze(loaded)


def print_unpruned(rep: dict[str, Any]) -> None:
    for u in rep["unpruned"]:
        console.print(f"  unpruned {u['layer']}: {u['reason']}", highlight=False)


HardwareReq = Annotated[str, typer.Option("--hardware", help="hardware profile name or YAML path")]


class _Signals:
    """What the process was told: `terminated` once SIGTERM arrived (guard_process)."""

    terminated = False


signals = _Signals()
TERM_DEADLINE_S = 5.0  # a command still running this long after SIGTERM exits at once; its watchdog stops the rest


def exit_terminated() -> None:
    err_console.print("terminated")
    os._exit(143)


def guard_process(args: list[str]) -> None:
    """Nothing a command starts outlives it. SIGTERM (a service manager's stop, `kill`) ends a command as Ctrl-C
    does, so its servers and runs are closed on the way out, and within TERM_DEADLINE_S at most (`ui` and
    `stores up` take the time their servers' orderly stop needs: PostgreSQL's fast shutdown). A watchdog
    (flows.reaper) stops whatever the command started when it dies without the chance to (SIGKILL, out of
    memory, the deadline)."""
    import signal
    import threading

    from flows import reaper

    orderly = bool(args) and args[0] in ("ui", "stores")

    def _on_term(signum, frame):
        if signals.terminated:
            return
        signals.terminated = True
        if not orderly:
            timer = threading.Timer(TERM_DEADLINE_S, exit_terminated)
            timer.daemon = True
            timer.start()
        raise KeyboardInterrupt

    reaper.install()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_term)


# the model commands' options
HardwareOpt = Annotated[Optional[str], typer.Option("--hardware", help="hardware profile name or YAML path (adds latency_ms)")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="batch size for latency")]
DataOpt = Annotated[Optional[str], typer.Option("--data", help="digits | imagefolder:PATH | cifar10:PATH | "
                                                               "package.module:function")]
EpochsOpt = Annotated[int, typer.Option("--finetune-epochs", min=0, help="training budget of every step that "
                                        "trains (fine-tuning after pruning, distilling a student)")]
RuntimeOpt = Annotated[str, typer.Option("--runtime", metavar="RUNTIME", help="what the latency is predicted and "
                                         "measured for with --hardware host: pytorch (the saved program) or "
                                         "onnxruntime (model.onnx in ONNX Runtime)")]
AnchorOpt = Annotated[bool, typer.Option("--anchor/--no-anchor", help="predict latency relative to the original "
                                         "model measured on the target, where it can be measured (this machine)")]
MaxLatency = Annotated[Optional[float], typer.Option("--max-latency-ms", metavar="MS",
                                                     help="latency per batch on the hardware, milliseconds")]
MaxSize = Annotated[Optional[float], typer.Option("--max-size-mb", metavar="MB",
                                                  help="bytes the artifact stores, megabytes (10^6)")]
MaxParams = Annotated[Optional[int], typer.Option("--max-params", metavar="N", help="parameter count")]
MaxMacs = Annotated[Optional[int], typer.Option("--max-macs", metavar="N", help="multiply-accumulates per input")]
MaxMemory = Annotated[Optional[float], typer.Option("--max-memory-mb", metavar="MB",
                                                    help="peak memory of one inference, megabytes (10^6)")]
MaxDrop = Annotated[Optional[float], typer.Option("--max-accuracy-drop", metavar="POINTS",
                                                  help="top-1 accuracy lost, percentage points")]
MinAcc = Annotated[Optional[float], typer.Option("--min-accuracy", metavar="PERCENT",
                                                 help="top-1 accuracy on the data, percent (needs --data)")]
ReqBatch = Annotated[Optional[int], typer.Option("--batch-size", metavar="N",
                                                 help="inputs per inference the limits hold for (default 1)")]
ReqFile = Annotated[Optional[str], typer.Option("--requirements", help="requirements.yaml with the same fields (flags win)")]
StudentsOpt = Annotated[Optional[str], typer.Option("--students", help="comma-separated student model specs")]
GridOpt = Annotated[float, typer.Option("--grid-step", min=0.005, max=0.45, help="pruning-ratio grid of the structured space")]
NsgaOpt = Annotated[int, typer.Option("--nsga-evals", min=0, help="per-layer candidates NSGA-II evaluates (0: structured "
                                      "space only)")]
SeedOpt = Annotated[int, typer.Option("--seed", help="NSGA-II's random seed")]
