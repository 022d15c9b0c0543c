"""The `deployfit` command line. Every subcommand takes --json and then prints one JSON object."""
from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from contextlib import contextmanager, nullcontext
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from estimators.errors import CALIBRATION_BUDGET_S, FINETUNE_EPOCHS, QUICK_CALIBRATION_S, UserInputError
from flows.progress import ConsoleProgress

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Estimate, search and execute DNN compression strategies against deployment requirements.")
err_console = Console(stderr=True, soft_wrap=True)
# progress on stderr: a message is a dim line printed as is (not markup); a counting step (NSGA-II's evaluations, a
# calibration stage, the sensitivity passes) is a bar with the time left on a terminal, rate-limited lines elsewhere
_progress = ConsoleProgress(err_console)


def _warn(message: str) -> None:
    """A warning line on stderr, its text printed as is."""
    err_console.print(f"warning: {escape(message)}", highlight=False)


console = Console()

MODEL_HELP = ("torchvision:NAME, demo:NAME (demo:digits-cnn, demo:digits-resnet), package.module:factory, "
              "or a .pt2 file")


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("LOGLEVEL", "ERROR")  # Intel Neural Compressor's logger level, read on import
    for name in ("torch_pruning", "neural_compressor", "torchao", "torch._export", "torch.export", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TQDM_DISABLE", "1")


def _emit(obj: dict[str, Any]) -> None:
    """One JSON object on stdout, strict: a value that is not a finite number (NaN, inf) is null."""
    sys.stdout.write(json.dumps(_finite(obj), default=_json_default, allow_nan=False) + "\n")
    sys.stdout.flush()


def _finite(o: Any) -> Any:
    import math

    import numpy as np

    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(o) else None
    return o


def _json_default(o: Any):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def _fail(msg: str, as_json: bool) -> None:
    err_console.print(f"[bold red]error:[/] {msg}", highlight=False)
    if as_json:
        _emit({"error": msg})
    raise typer.Exit(code=2)


def _fmt(v: Any) -> str:
    if isinstance(v, float) and abs(v) < 10 and not v.is_integer():
        return f"{v:.4g}"  # milliseconds and points: significant digits, not one decimal
    if isinstance(v, float) and not v.is_integer():
        return f"{v:,.1f}"
    if isinstance(v, (int, float)):
        return f"{int(v):,}"
    return str(v)


def _totals_table(title: str, cols: dict[str, dict[str, Any]]) -> Table:
    t = Table(title=title)
    t.add_column("metric")
    for c in cols:
        t.add_column(c, justify="right")
    keys = list(next(iter(cols.values())).keys())
    for k in keys:
        t.add_row(k, *[_fmt(cols[c].get(k, "")) for c in cols])
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


def _compute(as_json: bool, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a command body; bad input ends with exit code 2 and one message, never a traceback. Its progress
    shows as bars on a terminal, as lines under --json (whose reader is a program) or off a terminal."""
    _quiet()
    _progress.lines_only = as_json
    try:
        rep = fn()
    except UserInputError as exc:
        _progress.close()
        if _TERMINATED:  # the flow failed because it was stopped: say so, not the failure it led to
            raise KeyboardInterrupt from None
        _fail(str(exc), as_json)
    finally:
        _progress.close()  # no bar outlives its command (an interrupt included)
    if as_json:
        _emit(rep)
    return rep


@contextmanager
def _status(message: str):
    """A step that can take seconds: a spinner with the message on a terminal, cleared when the step ends (so an
    error stays the one line a command prints); nothing where stderr is not a terminal."""
    with _progress.status(message, line=False):
        yield


def _load(model: str, weights: Optional[str], input_shape: Optional[str], trust_pickle: bool = False):
    with _status(f"loading {model}"):
        from estimators.modelspec import load_model

        return load_model(model, weights=weights, input_shape=input_shape, trust_pickle=trust_pickle)


def run_analysis(loaded):
    """The layer table of `loaded` (cached by model), tracing it where it is not cached, with a spinner."""
    from estimators.analyze import analyze

    with _status(f"tracing {loaded.spec} into its layer table"):
        return analyze(loaded)


def _print_unpruned(rep: dict[str, Any]) -> None:
    for u in rep["unpruned"]:
        console.print(f"  unpruned {u['layer']}: {u['reason']}", highlight=False)


@app.command(short_help="Trace a model into its layer table.")
def analyze(model: ModelArg, weights: WeightsOpt = None, input_shape: ShapeOpt = None, trust_pickle: TrustOpt = False,
            as_json: JsonOpt = False) -> None:
    """Trace MODEL into a layer table: per-operator params, MACs, bytes; coupled channel groups."""

    def body():
        from estimators.report import analysis_report

        loaded = _load(model, weights, input_shape, trust_pickle)
        return analysis_report(loaded, run_analysis(loaded))

    rep = _compute(as_json, body)
    if as_json:
        return
    from estimators.modelspec import format_input_shape

    t = Table(title=f"{model}  input {format_input_shape(rep['input_shape'])}")
    for c in ("layer", "op", "kind", "output", "params", "MACs", "weight B", "act read B", "act write B"):
        t.add_column(c, justify="left" if c in ("layer", "op", "kind", "output") else "right")
    for r in rep["layers"]:
        if r["kind"] == "view":
            continue
        out = "x".join(map(str, r["output_shapes"][0])) if r["output_shapes"] else ""
        t.add_row(r["name"], r["op"], r["kind"], out, _fmt(r["params"]), _fmt(r["macs"]), _fmt(r["weight_bytes"]),
                  _fmt(r["act_read_bytes"]), _fmt(r["act_write_bytes"]))
    console.print(t)
    console.print(_totals_table("totals", {"value": rep["totals"]}))
    console.print(f"{len(rep['channel_groups'])} prunable channel groups; {len(rep['unpruned'])} parts stay unpruned")
    _print_unpruned(rep)
    if rep["unsupported_ops"]:
        console.print("[yellow]unsupported ops (not costed):[/] "
                      + ", ".join(f"{u['layer']} ({u['op']})" for u in rep["unsupported_ops"]))


HardwareOpt = Annotated[Optional[str], typer.Option("--hardware", help="hardware profile name or YAML path (adds latency_ms)")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="batch size for latency")]


DataOpt = Annotated[Optional[str], typer.Option("--data", help="digits | imagefolder:PATH | cifar10:PATH | "
                                                               "package.module:function")]
EpochsOpt = Annotated[int, typer.Option("--finetune-epochs", min=0, help="training budget of every step that "
                                        "trains (fine-tuning after pruning, distilling a student)")]


def _with_latency(rep: dict[str, Any], loaded, table, strat, hardware: Optional[str], batch_size: int,
                  anchor: bool = True, runtime: str = "pytorch") -> dict[str, Any]:
    if hardware:
        from estimators.compress import estimate as run_estimate
        from hardware.latency import predict_latency
        from tasks.anchoring import latency_context

        prof, anc, info = latency_context(loaded, table, hardware, batch_size, anchor, progress=_progress,
                                          runtime=runtime)
        lat = predict_latency(run_estimate(table, strat), prof, batch_size, anchor=anc)
        rep["pred"]["latency_ms"] = round(lat.latency_ms, 4)
        rep["latency_basis"] = lat.basis
        rep["hardware"] = info
    return rep


def _print_latency_basis(rep: dict[str, Any]) -> None:
    """Where a latency prediction comes from, and a warning for a profile calibrated on another machine."""
    hw = rep.get("hardware")
    if not hw:
        return
    if hw.get("warning"):
        _warn(hw["warning"])
    anc = hw.get("anchor")
    if anc:
        where = " in ONNX Runtime" if hw.get("runtime") == "onnxruntime" else ""
        console.print(f"latency anchored on the original measured here{where}: {anc['total_ms']} ms at batch {anc['batch']} "
                      f"(the {hw['name']} profile alone predicted {anc['predicted_ms']} ms; {anc['truths']} measured "
                      "candidates refine it)", highlight=False)
    elif hw.get("anchor_note"):
        console.print(hw["anchor_note"], highlight=False)


RuntimeOpt = Annotated[str, typer.Option("--runtime", metavar="RUNTIME", help="what the latency is predicted and "
                                         "measured for with --hardware host: pytorch (the saved program) or "
                                         "onnxruntime (model.onnx in ONNX Runtime)")]
AnchorOpt = Annotated[bool, typer.Option("--anchor/--no-anchor", help="predict latency relative to the original "
                                         "model measured on the target, where it can be measured (this machine)")]


@app.command(short_help="Predict what a strategy does to a model.")
def estimate(model: ModelArg, strategy: StrategyOpt = "none", weights: WeightsOpt = None, input_shape: ShapeOpt = None,
             hardware: HardwareOpt = None, batch_size: BatchOpt = 1, data: DataOpt = None,
             finetune_epochs: EpochsOpt = FINETUNE_EPOCHS, runtime: RuntimeOpt = "pytorch", anchor: AnchorOpt = True,
             trust_pickle: TrustOpt = False,
             as_json: JsonOpt = False) -> None:
    """Predict what STRATEGY does to MODEL without compressing it.

    With --data, pred.accuracy_drop comes from a sensitivity analysis on the validation data and a recovery
    model for --finetune-epochs of training (it learns from every `apply --data` truth); without, a
    data-free proxy ranks candidates (`accuracy_proxy`, not in points)."""

    def body():
        from estimators.accuracy import predict_drop, proxy_report
        from estimators.report import estimate_report
        from estimators.strategy import check_executable, parse_strategy

        strat = parse_strategy(strategy)
        loaded = _load(model, weights, input_shape, trust_pickle)
        check_executable(strat, bool(data), {n for n, _ in loaded.model.named_modules()}, loaded.n_inputs)
        table = run_analysis(loaded)
        rep = _with_latency(estimate_report(loaded, table, strat), loaded, table, strat, hardware, batch_size, anchor,
                            runtime)
        if data:
            from estimators.data import load_data_for

            d = load_data_for(data, loaded)
            acc = predict_drop(loaded, table, strat, d, finetune_epochs,
                               progress=_progress)
            rep["pred"]["accuracy_drop"] = acc["accuracy_drop"]
            rep["accuracy_estimate"] = acc
        else:
            rep["accuracy_proxy"] = proxy_report(table, strat)
        return rep

    rep = _compute(as_json, body)
    if as_json:
        return
    console.print(_totals_table(f"{model} with {rep['compact']} (predicted)", {"pred": rep["pred"]}))
    _print_latency_basis(rep)
    if "accuracy_proxy" in rep:
        console.print(f"accuracy proxy {rep['accuracy_proxy']['score']:.4f}: {rep['accuracy_proxy']['note']}",
                      highlight=False)
    _print_unpruned(rep)


@app.command(short_help="Execute a strategy, save the artifact, measure it.")
def apply(model: ModelArg, out: Annotated[str, typer.Option("--out", help="folder for model.pt2 and strategy.json")],
          strategy: StrategyOpt = "none", weights: WeightsOpt = None, input_shape: ShapeOpt = None,
          hardware: HardwareOpt = None, batch_size: BatchOpt = 1,
          data: DataOpt = None, finetune_epochs: EpochsOpt = FINETUNE_EPOCHS,
          kd: Annotated[bool, typer.Option("--kd/--no-kd", help="distil from the original model when fine-tuning "
                                           "after pruning")] = False,
          export: Annotated[Optional[list[str]], typer.Option(
              "--export", metavar="FORMAT", help="pt2 (model.pt2, always written: it is what is measured) or onnx "
              "(model.onnx too, checked in ONNX Runtime); repeatable")] = None,
          runtime: RuntimeOpt = "pytorch", anchor: AnchorOpt = True, trust_pickle: TrustOpt = False, as_json: JsonOpt = False) -> None:
    """Execute STRATEGY on MODEL, save the artifact, and measure it against the prediction.

    With --hardware host the artifact's latency is measured here too, in alternation with the original (their
    ratio, times the original's anchored latency: what the machine's drift barely moves); with --data,
    pruned models are fine-tuned, students distilled, int8 calibrated on the data, and the accuracy before
    and after is measured on its validation split."""

    def body():
        from estimators.strategy import parse_strategy
        from tasks.apply import apply_and_measure
        from tasks.train import TrainConfig

        strat = parse_strategy(strategy)
        loaded = _load(model, weights, input_shape, trust_pickle)
        return apply_and_measure(loaded, strat, out, hardware=hardware, batch_size=batch_size,
                                 progress=_progress, data_spec=data,
                                 train_cfg=TrainConfig(epochs=finetune_epochs, kd_finetune=kd), anchor_on=anchor,
                                 export=tuple(export or ("pt2",)), runtime=runtime)

    rep = _compute(as_json, body)
    if as_json:
        return
    from estimators.report import POINTS

    cols = {"pred": rep["pred"], "meas": {k: rep["meas"].get(k, "") for k in rep["pred"]},
            "err": {k: ("" if k not in rep["err"] else f"{rep['err'][k]:+.2f} pts" if k in POINTS
                        else f"{100 * rep['err'][k]:+.2f} %") for k in rep["pred"]}}
    console.print(_totals_table(f"{model} with {rep['compact']}", cols))
    _print_latency_basis(rep)
    if rep.get("data"):
        d = rep["data"]
        console.print(f"accuracy on {d['spec']} ({d['val_size']} validation inputs): {d['accuracy_before']:.2f}% -> "
                      f"{rep['meas']['accuracy']:.2f}% (drop {rep['meas']['accuracy_drop']:+.2f} points; "
                      f"{d['finetune_epochs']} training epochs per step)", highlight=False)
    _print_unpruned(rep)
    for n in rep["notes"]:
        console.print(f"  note: {n}", highlight=False)
    console.print(f"artifact: {rep['artifact']['model']}")
    if rep.get("onnx") and "path" in rep["onnx"]:
        _print_onnx(rep["onnx"])


def _print_onnx(o: dict[str, Any]) -> None:
    agree = f", top-1 agreement {100 * o['top1_agreement']:.2f}%" if "top1_agreement" in o else ""
    console.print(f"ONNX ({o['form']}, opset {o['opset']}): {o['path']}; checker passed; ONNX Runtime outputs within "
                  f"{o['max_rel_diff']:.1e} of the program's range{agree}; stored {_fmt(o['size_bytes'])} bytes "
                  f"(the prediction's error {100 * o.get('size_err', 0):+.2f}%)", highlight=False)
    console.print(f"  on a TensorRT machine ({o['tensorrt']}): {o['trtexec']}", highlight=False)


HardwareReq = Annotated[str, typer.Option("--hardware", help="hardware profile name or YAML path")]
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


def _requirements(requirements: Optional[str], **flags):
    from search.requirements import parse_requirements

    return parse_requirements(flags, requirements)


@app.command(short_help="Search for the best strategy under requirements.")
def plan(model: ModelArg, hardware: HardwareReq, weights: WeightsOpt = None, input_shape: ShapeOpt = None,
         max_latency_ms: MaxLatency = None, max_size_mb: MaxSize = None, max_params: MaxParams = None,
         max_macs: MaxMacs = None, max_memory_mb: MaxMemory = None, max_accuracy_drop: MaxDrop = None,
         min_accuracy: MinAcc = None, batch_size: ReqBatch = None, requirements: ReqFile = None,
         data: DataOpt = None, finetune_epochs: EpochsOpt = FINETUNE_EPOCHS, students: StudentsOpt = None,
         top_k: Annotated[int, typer.Option("--top-k", min=1, help="strategies the report lists")] = 5, grid_step: GridOpt = 0.01,
         nsga_evals: NsgaOpt = 10000, seed: SeedOpt = 0, runtime: RuntimeOpt = "pytorch", anchor: AnchorOpt = True,
         trust_pickle: TrustOpt = False, as_json: JsonOpt = False) -> None:
    """Search distill -> prune -> quantize strategies for the one that meets every requirement on HARDWARE
    with the least predicted accuracy drop. Exit code 3 when nothing fits (with the nearest relaxation)."""

    def body():
        from estimators.accuracy import DropScorer, ProxyScorer
        from estimators.modelspec import format_input_shape
        from search.plan import plan as run_plan
        from tasks.anchoring import latency_context

        req = _requirements(requirements, max_latency_ms=max_latency_ms, max_size_mb=max_size_mb, max_params=max_params,
                            max_macs=max_macs, max_memory_mb=max_memory_mb, max_accuracy_drop=max_accuracy_drop,
                            min_accuracy=min_accuracy, batch_size=batch_size)
        loaded = _load(model, weights, input_shape, trust_pickle)
        table = run_analysis(loaded)
        say = _progress
        prof, anc, info = latency_context(loaded, table, hardware, req.batch_size, anchor, progress=say,
                                          runtime=runtime)
        note = info.get("warning")
        if note:
            _warn(note)
        if data:
            from estimators.data import accuracy, load_data_for

            d = load_data_for(data, loaded)
            req = req.resolve_accuracy(accuracy(loaded.model, d.val))
            scorer = DropScorer(loaded, table, d, finetune_epochs, progress=say)
        else:
            req = req.resolve_accuracy(None)
            if req.max_accuracy_drop is not None:
                raise UserInputError("--max-accuracy-drop needs --data: without data accuracy is only ranked by a proxy")
            scorer = ProxyScorer()

        names = tuple(x.strip() for x in (students or "").split(",") if x.strip())
        shape = format_input_shape(loaded.input_shape)
        tables = {n: run_analysis(_load(n, None, shape, trust_pickle)) for n in names}
        out = run_plan(table, prof, req, scorer, top_k=top_k, students=names, student_tables=tables, progress=say,
                       grid_step=grid_step, nsga_evals=nsga_evals, seed=seed, anchor=anc)
        out["profile"] = info
        return {**out, "warning": note} if note else out

    rep = _compute(as_json, body)
    if not as_json and rep["top"]:
        t = Table(title=f"{model} on {rep['hardware']}: {rep['candidates_evaluated']:,} candidates in {rep['seconds']} s "
                        f"({rep['search']['structured']:,} structured, {rep['search']['nsga2']:,} by NSGA-II)")
        for c in ("strategy", "latency ms", "size MB", "params", "accuracy drop" if rep["accuracy_unit"] == "points"
                  else "accuracy proxy"):
            t.add_column(c, justify="left" if c == "strategy" else "right")
        for r in rep["top"]:
            p = r["pred"]
            t.add_row(r["label"], f"{p['latency_ms']:.3f}", f"{p['size_bytes'] / 1e6:.3f}", f"{p['params']:,}",
                      f"{p['accuracy_drop']:.3f}")
        console.print(t)
        console.print(f"recommended: {rep['recommended']['compact']}; binding: "
                      + (", ".join(b["requirement"] for b in rep["binding"]) or "none"), highlight=False)
    if not as_json:
        console.print(f"{rep['candidates_evaluated']:,} candidates in {rep['seconds']} s "
                      f"({rep['candidates_per_second']:,.0f}/s); Pareto front: {len(rep['pareto'])} strategies "
                      "(--json lists them)", highlight=False)
    if rep.get("infeasible"):
        err_console.print(f"infeasible: {rep['infeasible']['message']}", highlight=False)
        raise typer.Exit(3)


@app.command("run", short_help="Plan, execute the top-k and measure (Prefect flow).")
def run_cmd(model: ModelArg, hardware: HardwareReq = "host", weights: WeightsOpt = None, input_shape: ShapeOpt = None,
            max_latency_ms: MaxLatency = None, max_size_mb: MaxSize = None, max_params: MaxParams = None,
            max_macs: MaxMacs = None, max_memory_mb: MaxMemory = None, max_accuracy_drop: MaxDrop = None,
            min_accuracy: MinAcc = None, batch_size: ReqBatch = None, requirements: ReqFile = None,
            data: DataOpt = None, finetune_epochs: EpochsOpt = FINETUNE_EPOCHS, students: StudentsOpt = None,
            top_k: Annotated[int, typer.Option("--top-k", min=1, max=50, help="strategies to execute")] = 3,
            execute: Annotated[bool, typer.Option("--execute/--no-execute", help="execute and measure the top-k")] = True,
            grid_step: GridOpt = 0.01, nsga_evals: NsgaOpt = 10000, seed: SeedOpt = 0,
            out_dir: Annotated[str, typer.Option("--out-dir", help="run reports and executed artifacts")] = "build/runs",
            workers: Annotated[int, typer.Option("--workers", min=1, help="build and train the top-k on a local Dask "
                                                 "cluster of this many workers (1: in this process)")] = 1,
            dask_address: Annotated[Optional[str], typer.Option("--dask-address", help="an existing Dask scheduler "
                                                                "(default $DEPLOYFIT_DASK_ADDRESS)")] = None,
            threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="torch threads per executed "
                                                           "candidate")] = None,
            verbose: Annotated[bool, typer.Option("--verbose", help="show Dask's own logging (with --workers or "
                                                  "--dask-address)")] = False,
            device_measure: Annotated[Optional[bool], typer.Option("--device-measure/--no-device-measure",
                                                                   help="measure latency on the device through the "
                                                                   "work pool deployfit-HARDWARE (default: for any "
                                                                   "hardware but host)")] = None,
            device_calibrate: Annotated[bool, typer.Option("--device-calibrate", help="calibrate the hardware's "
                                                           "profile on the device first (work pool)")] = False,
            device_calibrate_budget: Annotated[float, typer.Option("--device-calibrate-budget", min=1,
                                                                 help="seconds of timing the device calibration may spend")
                                               ] = CALIBRATION_BUDGET_S,
            device_timeout: Annotated[float, typer.Option("--device-timeout", min=1, help="seconds to wait for a "
                                                          "device worker per step")] = 600.0,
            anchor: AnchorOpt = True,
            export: Annotated[Optional[list[str]], typer.Option(
                "--export", metavar="FORMAT", help="forms each executed candidate is saved in: pt2 (always) and "
                "onnx (checked in ONNX Runtime); repeatable (default: both)")] = None,
            register: Annotated[Optional[str], typer.Option("--register", metavar="NAME", help="register the "
                                                            "recommended candidate's model as a new version of "
                                                            "NAME in the MLflow Model Registry")] = None,
            trust_pickle: TrustOpt = False, as_json: JsonOpt = False) -> None:
    """Run the `deployfit-run` Prefect flow: plan, execute the top-k, measure and compare, tracked in MLflow
    (the same parameters as the flow's form in the Prefect UI). Runs in this terminal without flow-run
    heartbeats unless PREFECT_FLOWS_HEARTBEAT_FREQUENCY is set."""

    def body():
        req = _requirements(requirements, max_latency_ms=max_latency_ms, max_size_mb=max_size_mb, max_params=max_params,
                            max_macs=max_macs, max_memory_mb=max_memory_mb, max_accuracy_drop=max_accuracy_drop,
                            min_accuracy=min_accuracy, batch_size=batch_size)
        _preflight(model, weights, input_shape, trust_pickle, hardware, data, out_dir)
        from flows.pipeline import HardwareName, run_flow, terminal_run
        from tasks.apply import check_export_forms

        forms = list(check_export_forms(export or ["pt2", "onnx"]))
        from tasks.pipeline import ModelInput, ParallelOptions, SearchOptions

        known = hardware in HardwareName.__members__ and hardware != "path"
        hw_name, hw_path = (hardware, None) if known else ("path", hardware)

        names = [x.strip() for x in (students or "").split(",") if x.strip()]
        opts = SearchOptions(grid_step=grid_step, nsga_evals=nsga_evals, seed=seed, students=names,
                             finetune_epochs=finetune_epochs)
        from estimators.progress import shown

        # in a terminal, the flow's counting steps (search, candidates, calibration) show as bars here
        with terminal_run(), (shown(_progress) if _progress.terminal else nullcontext()):
            state = run_flow(model=ModelInput(spec=model, weights=weights, input_shape=input_shape,
                                              trust_pickle=trust_pickle), data=data,
                             hardware=hw_name, hardware_path=hw_path, requirements=req, search=opts,
                             execute=execute, top_k=top_k, out_dir=out_dir, return_state=True,
                             parallel=ParallelOptions(workers=workers, dask_address=dask_address, threads=threads,
                                                      verbose=verbose),
                             device_measure=device_measure, device_timeout_s=device_timeout,
                             device_calibrate=device_calibrate, device_calibrate_budget_s=device_calibrate_budget,
                             anchor=anchor, register_as=register, export=forms)
        if state.is_failed():
            try:
                state.result()
            except UserInputError:
                raise
            except Exception as exc:
                raise UserInputError(f"flow run failed: {type(exc).__name__}: {exc}") from None
        return state.result()

    rep = _compute(as_json, body)
    if not as_json:
        _print_run(rep)
    if rep.get("infeasible"):
        raise typer.Exit(3)


def _preflight(model: str, weights: Optional[str], input_shape: Optional[str], trust_pickle: bool, hardware: str,
               data: Optional[str], out_dir: str) -> None:
    """What a flow run would only find inside the flow (with Prefect's tracebacks, seconds later), checked here
    first: the model loads, the hardware profile exists (host is calibrated inside the flow when missing), the
    data loads and fits the model, the output folder can be written."""
    from tasks.executors import check_out_dir

    loaded = _load(model, weights, input_shape, trust_pickle)
    if hardware != "host":
        from hardware.profile import load_profile

        load_profile(hardware)
    if data:
        from estimators.data import load_data_for

        load_data_for(data, loaded)
    check_out_dir(out_dir)


def _print_run(rep: dict[str, Any]) -> None:
    if rep.get("recommended"):
        console.print(f"recommended: {rep['recommended']['label']}  ({rep['candidates_evaluated']:,} candidates in "
                      f"{rep['seconds']} s)", highlight=False)
        if rep.get("predicted_infeasible"):
            console.print(f"predicted infeasible, settled by measurement: {rep['predicted_infeasible']['message']}",
                          highlight=False)
    else:
        err_console.print(f"infeasible: {rep['infeasible']['message']}", highlight=False)
    if rep.get("executed"):
        t = Table(title="executed: predicted vs measured")
        for c in ("strategy", "metric", "predicted", "measured", "error"):
            t.add_column(c, justify="left" if c in ("strategy", "metric") else "right")
        for e in rep["executed"]:
            keys = [k for k in ("latency_ms", "size_bytes", "params", "accuracy_drop", "onnx_size_bytes")
                    if k in e["meas"] and k in e["pred"]]
            for i, k in enumerate(keys):
                err = e["err"].get(k)
                es = "" if err is None else (f"{err:+.2f} pts" if k.startswith("accuracy") else f"{err:+.1%}")
                fmt = (lambda v: f"{v:.4g}") if k in ("latency_ms", "accuracy_drop") else _fmt
                t.add_row(e["label"] if i == 0 else "", k, fmt(e["pred"][k]), fmt(e["meas"][k]), es,
                          end_section=i == len(keys) - 1)
        console.print(t)
    onnx = [e for e in rep.get("executed", []) if (e.get("onnx") or {}).get("path")]
    if onnx:
        console.print(f"ONNX exports, checked in ONNX Runtime (for {onnx[0]['onnx']['tensorrt']}):", highlight=False)
        for e in onnx:
            console.print(f"  {e['label']}: {e['onnx']['path']}  ({e['onnx']['trtexec']})", highlight=False)
    for f in rep.get("failed", []):
        err_console.print(f"execution failed: {f['label']}: {f['error']}", highlight=False)
    tr = rep.get("tracking", {})
    if tr.get("run_id"):
        console.print(f"MLflow: run {tr['run_id']} in {tr['uri']}; UI: {tr['link']}", highlight=False)
        if tr.get("registered"):
            r = tr["registered"]
            console.print(f"registered {r['strategy']} as {r['name']} version {r['version']}"
                          + ("" if r["recommended"] else " (the recommendation was not executed: the first executed "
                             "candidate)"), highlight=False)
    else:
        err_console.print(f"tracking store unreachable; results saved under {tr.get('saved_locally')}", highlight=False)
    console.print(f"report: {rep['report_dir']}/report.json; Prefect flow run {rep['flow_run_id']}. "
                  "See both UIs with `deployfit ui`.", highlight=False)


@app.command(short_help="Serve the deployments of prefect.yaml.")
def serve(file: Annotated[str, typer.Option("--file", help="deployments file")] = "prefect.yaml") -> None:
    """Serve the deployments of prefect.yaml (schedules included) so the Prefect UI can trigger them; runs
    until interrupted."""
    from flows.deployments import serve_deployments

    try:
        serve_deployments(file, say=lambda m: console.print(m, highlight=False))
    except UserInputError as exc:
        _fail(str(exc), False)


@app.command(short_help="Start the Prefect and MLflow UIs on loopback.")
def ui(prefect_port: Annotated[int, typer.Option("--prefect-port", help="the Prefect server's port")] = 4200,
       mlflow_port: Annotated[int, typer.Option("--mlflow-port", help="the MLflow server's port")] = 5000) -> None:
    """Start a Prefect server and an MLflow server on 127.0.0.1 over the same stores the flows use, print
    both URLs, and run until interrupted."""
    from flows.deployments import start_uis

    try:
        start_uis(prefect_port, mlflow_port, say=lambda m: console.print(m, highlight=False))
    except UserInputError as exc:
        _fail(str(exc), False)


@app.command(short_help="Push a run kept locally into MLflow.")
def sync(folder: Annotated[str, typer.Argument(help="a run's tracking-fallback folder (RUN_DIR/tracking-fallback)")],
         as_json: JsonOpt = False) -> None:
    """Push a run kept locally while the tracking store was unreachable into MLflow (MLFLOW_TRACKING_URI, else
    mlflow/mlflow.db); a folder already pushed is not logged twice."""

    def body():
        from flows.tracking import sync_local

        return sync_local(folder)

    rep = _compute(as_json, body)
    if not as_json:
        console.print(("already in the store as run " if rep["already"] else "logged as run ") + rep["run_id"]
                      + (f": {rep['link']}" if rep.get("link") else ""), highlight=False)


_TERMINATED = False
TERM_DEADLINE_S = 5.0  # a command still running this long after SIGTERM exits at once; its watchdog stops the rest


def _exit_terminated() -> None:
    err_console.print("terminated")
    os._exit(143)


def _guard_process(args: list[str]) -> None:
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
        global _TERMINATED
        if _TERMINATED:
            return
        _TERMINATED = True
        if not orderly:
            timer = threading.Timer(TERM_DEADLINE_S, _exit_terminated)
            timer.daemon = True
            timer.start()
        raise KeyboardInterrupt

    reaper.install()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_term)


@app.command(short_help="Run a device worker on the hardware's work pool.")
def worker(hardware: HardwareReq,
           trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="load fetched model.pt2 artifacts that "
                                                      "need pickle (refused otherwise: unpickling can run any code)")
                                   ] = False) -> None:
    """On the device: create the work pool deployfit-HARDWARE if needed, register the deployfit-measure/HARDWARE
    deployment and run a Prefect process worker on it (needs PREFECT_API_URL and MLFLOW_TRACKING_URI pointing at
    the shared servers); runs until interrupted."""
    from flows.device import start_worker

    p = start_worker(hardware, trust_pickle=trust_pickle)
    console.print(f"worker on pool deployfit-{hardware}; Ctrl-C stops it", highlight=False)
    try:
        p.wait()
    except KeyboardInterrupt:
        p.terminate()
        p.wait(30)


stores_app = typer.Typer(rich_markup_mode=None, short_help="Shared PostgreSQL, Prefect and MLflow stores.", help="Shared stores: PostgreSQL, a Prefect server and an MLflow server on it (loopback).",
                         no_args_is_help=True)
app.add_typer(stores_app, name="stores")


@stores_app.command("up")
def stores_up(folder: Annotated[str, typer.Option("--dir", help="cluster, logs and MLflow artifacts")] = "build/stores",
              pg_port: Annotated[int, typer.Option("--pg-port", help="PostgreSQL's port")] = 5433,
              prefect_port: Annotated[int, typer.Option("--prefect-port", help="the Prefect server's port")] = 4200,
              mlflow_port: Annotated[int, typer.Option("--mlflow-port", help="the MLflow server's port")] = 5000) -> None:
    """Start PostgreSQL (Debian's postgresql package) on 127.0.0.1, the Prefect server and the MLflow server on
    it, print the variables every user sets, and run until interrupted (then stop all three)."""
    import time as _time

    from flows.stores import up

    try:
        st = up(folder, pg_port, prefect_port, mlflow_port, say=lambda m: console.print(m, highlight=False))
    except UserInputError as exc:
        _fail(str(exc), False)
    try:
        while all(p.poll() is None for p in st.procs):
            _time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        st.stop()


hardware_app = typer.Typer(rich_markup_mode=None, short_help="List and show hardware profiles.", help="Hardware profiles: `host` (this machine, kept in the cache) and the shipped "
                           "hardware/profiles/*.yaml.", no_args_is_help=True)
app.add_typer(hardware_app, name="hardware")


@hardware_app.command("list")
def hardware_list(as_json: JsonOpt = False) -> None:
    """List the hardware profiles and the runtime each predicts."""

    def body():
        from hardware.hostprofile import describe, host_calibrated, host_key
        from hardware.profile import list_profiles, load_profile

        path = host_calibrated()
        host = {"name": "host", "runtime": f"this machine: {describe(host_key())}; "
                + (f"calibrated ({path})" if path else "not calibrated yet (calibrated at first use)")}
        return {"profiles": [host] + [{"name": n, "runtime": load_profile(n).runtime} for n in list_profiles()
                                      if n != "host"]}

    rep = _compute(as_json, body)
    if not as_json:
        t = Table(title="hardware profiles")
        t.add_column("name")
        t.add_column("runtime")
        for p in rep["profiles"]:
            t.add_row(p["name"], p["runtime"])
        console.print(t)


@hardware_app.command("show")
def hardware_show(name: Annotated[str, typer.Argument(help="profile name or YAML path")], as_json: JsonOpt = False) -> None:
    """Show one profile with its sources."""

    def body():
        from hardware.hostprofile import foreign_note, profile_hash
        from hardware.profile import load_profile

        prof = load_profile(name, progress=_progress)
        note = foreign_note(prof)
        return {**prof.model_dump(exclude_none=True), "hash": profile_hash(prof), **({"warning": note} if note else {})}

    rep = _compute(as_json, body)
    if not as_json:
        import yaml

        note = rep.pop("warning", None)
        console.print(yaml.safe_dump(rep, sort_keys=False, width=110), highlight=False)
        if note:
            _warn(note)


@app.command(short_help="Calibrate this machine's host profile.")
def calibrate(
    hardware: Annotated[str, typer.Option("--hardware", help="only `host` (this machine) can be calibrated here")] = "host",
    out: Annotated[Optional[str], typer.Option("--out", help="profile path (default: this machine's host profile in "
                                               "the cache, $DEPLOYFIT_CACHE_DIR/profiles)")] = None,
    quick: Annotated[bool, typer.Option("--quick", help=f"about {QUICK_CALIBRATION_S:.0f} s in all: fewer synthetic "
                                        "networks (what a first use of `host` runs)")] = False,
    int8: Annotated[bool, typer.Option("--int8/--no-int8", help="also calibrate the compiled INT8 path")] = True,
    budget: Annotated[float, typer.Option("--budget", help="seconds of timing (peaks and set-up come on top)")
                      ] = CALIBRATION_BUDGET_S,
    keep_samples: Annotated[Optional[str], typer.Option(
        "--keep-samples", help="also save what this calibration timed here (an npz of data only, for --pool "
                               "later)")] = None,
    pool: Annotated[Optional[str], typer.Option(
        "--pool", help="comma-separated samples of earlier calibrations of this machine (--keep-samples): fitted "
                       "together with this run's")] = None,
    refit: Annotated[bool, typer.Option("--refit", help="time nothing: fit the --pool samples alone")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Fit the host profile to operators timed inside synthetic networks on this machine (about 2.7 minutes
    on 2 cores) and write it with its provenance. Calibrations of one machine can be pooled (--keep-samples,
    then --pool): more compiled INT8 networks and operators per fit, at 2.7 minutes a run."""

    def body():
        from pathlib import Path

        from hardware.calibrate import collect_samples, fit_profile, load_samples, merge_samples, save_samples
        from hardware.hostprofile import host_profile_path
        from hardware.profile import save_profile
        from tasks.quantize_exec import compiled_int8

        if hardware != "host":
            raise UserInputError(f"only the host can be calibrated from here, not {hardware!r}")
        if budget <= 0:
            raise UserInputError(f"--budget must be positive seconds, not {budget}")
        if refit and not pool:
            raise UserInputError("--refit fits earlier samples: name them with --pool")
        if refit and keep_samples:
            raise UserInputError("--refit times nothing: there are no new samples to keep")
        earlier = []
        for p in (pool.split(",") if pool else []):
            if not Path(p.strip()).is_file():
                raise UserInputError(f"--pool: no such samples file {p.strip()!r}")
            try:
                earlier.append(load_samples(p.strip()))
            except ValueError as e:
                raise UserInputError(str(e)) from e
        runs = earlier
        if not refit:
            new = collect_samples(quick=quick, progress=_progress, int8=int8, budget_s=budget, after=earlier,
                                  build_int8=compiled_int8)
            if keep_samples:
                save_samples(new, keep_samples)
                _progress(f"samples saved to {keep_samples}")
            runs = [new] + earlier
        try:
            samples = merge_samples(runs)
        except ValueError as e:
            raise UserInputError(f"--pool: {e}") from e
        prof = fit_profile(samples, _progress)
        path = Path(out) if out else host_profile_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_profile(prof, path)
        return {"profile": str(path), "provenance": prof.provenance.model_dump() if prof.provenance else None}

    rep = _compute(as_json, body)
    if not as_json:
        console.print(f"wrote {rep['profile']} in {rep['provenance']['fit']['seconds']} s")


METAVARS = {"hardware": "NAME|PATH", "weights": "FILE", "input_shape": "SHAPE", "requirements": "FILE",
            "data": "SPEC", "students": "SPECS", "strategy": "STRATEGY", "out": "DIR", "out_dir": "DIR",
            "file": "FILE", "folder": "DIR", "pool": "FILES", "keep_samples": "FILE", "dask_address": "ADDRESS",
            "grid_step": "STEP", "budget": "SECONDS", "device_calibrate_budget": "SECONDS",
            "device_timeout": "SECONDS", "name": "NAME"}


def _command():
    """The click command behind `app`, every value shown in --help by a plain metavar (MODEL, FILE, N ...), not
    typer's `<str>` and `{model}`."""
    cmd = typer.main.get_command(app)

    def walk(c) -> None:
        for p in c.params:
            if p.param_type_name == "argument":  # usage `MODEL` (not `{model}`), help `MODEL  text`
                p.metavar = p.metavar or p.name.upper()
                p.display_type_rich = lambda ctx: None
                p._usage_display_name = (lambda a: lambda: a.metavar if a.required else f"[{a.metavar}]")(p)
            elif not getattr(p, "is_flag", False) and p.metavar is None:
                kind = getattr(getattr(p, "type_descriptor", None), "annotation", None)
                p.metavar = METAVARS.get(p.name) or {int: "N", float: "NUMBER"}.get(kind, "TEXT")
        for sub in getattr(c, "commands", {}).values():
            walk(sub)

    walk(cmd)
    return cmd


def main(argv: Optional[list[str]] = None) -> None:
    """The `deployfit` command. Every bad input ends alike, the argument parser's included: exit code 2, one
    line on stderr and, under --json, {"error": ...} on stdout."""
    from typer.exceptions import Abort, TyperException

    args = sys.argv[1:] if argv is None else list(argv)
    _guard_process(args)
    try:
        rc = _command().main(args=args, prog_name="deployfit", standalone_mode=False)
    except (KeyboardInterrupt, Abort):
        err_console.print("terminated" if _TERMINATED else "interrupted")
        sys.exit(143 if _TERMINATED else 130)
    except TyperException as exc:  # the argument parser's (typer's own click) errors
        msg = " ".join(exc.format_message().split())
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        err_console.print(f"[bold red]error:[/] {msg}{hint}", highlight=False)
        if "--json" in args:
            _emit({"error": msg})
        sys.exit(2)
    except Exception:
        if _TERMINATED:  # a library that wrapped the interrupt in its own error: the cause is the SIGTERM
            err_console.print("terminated")
            sys.exit(143)
        raise
    if _TERMINATED or rc == 130:  # click returns 130 for an interrupt it caught itself
        err_console.print("terminated" if _TERMINATED else "interrupted")
        sys.exit(143 if _TERMINATED else 130)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
