"""The `deployfit` command line: the model commands (analyze, estimate, apply, plan, run) here, the
administrative ones in flows.cli_admin, what they share in flows.cli_common. Every subcommand takes --json and
then prints one JSON object."""
from __future__ import annotations

import sys
from contextlib import nullcontext
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from estimators.defaults import CALIBRATION_BUDGET_S, FINETUNE_EPOCHS
from estimators.errors import UserInputError
from flows.cli_common import (
    app, console, err_console, progress, warn, emit, fmt, totals_table, compute, load, run_analysis, search_options,
    print_unpruned, signals, guard_process, ModelArg, WeightsOpt, ShapeOpt, StrategyOpt, JsonOpt, TrustOpt,
    HardwareReq, HardwareOpt, BatchOpt, DataOpt, EpochsOpt, RuntimeOpt, AnchorOpt, MaxLatency, MaxSize, MaxParams,
    MaxMacs, MaxMemory, MaxDrop, MinAcc, ReqBatch, ReqFile, StudentsOpt, GridOpt, NsgaOpt, SeedOpt)
from flows.cli_report import print_latency_basis, print_onnx, print_plan, print_run


@app.command(short_help="Trace a model into its layer table.")
def analyze(model: ModelArg, weights: WeightsOpt = None, input_shape: ShapeOpt = None, trust_pickle: TrustOpt = False,
            as_json: JsonOpt = False) -> None:
    """Trace MODEL into a layer table: per-operator params, MACs, bytes; coupled channel groups."""

    def body():
        from estimators.report import analysis_report

        loaded = load(model, weights, input_shape, trust_pickle)
        return analysis_report(loaded, run_analysis(loaded))

    rep = compute(as_json, body)
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
        t.add_row(r["name"], r["op"], r["kind"], out, fmt(r["params"]), fmt(r["macs"]), fmt(r["weight_bytes"]),
                  fmt(r["act_read_bytes"]), fmt(r["act_write_bytes"]))
    console.print(t)
    console.print(totals_table("totals", {"value": rep["totals"]}))
    console.print(f"{len(rep['channel_groups'])} prunable channel groups; {len(rep['unpruned'])} parts stay unpruned")
    print_unpruned(rep)
    if rep["unsupported_ops"]:
        console.print("[yellow]unsupported ops (not costed):[/] "
                      + ", ".join(f"{u['layer']} ({u['op']})" for u in rep["unsupported_ops"]))


def _with_latency(rep: dict[str, Any], loaded, table, strat, hardware: Optional[str], batch_size: int,
                  anchor: bool = True, runtime: str = "pytorch") -> dict[str, Any]:
    if hardware:
        from estimators.compress import estimate as run_estimate
        from hardware.latency import group_slow_note, predict_latency
        from tasks.anchoring import latency_context
        from tasks.onnx_runtime import slow_path_note

        prof, anc, info = latency_context(loaded, table, hardware, batch_size, anchor, progress=progress,
                                          runtime=runtime)
        est = run_estimate(table, strat)
        lat = predict_latency(est, prof, batch_size, anchor=anc)
        rep["pred"]["latency_ms"] = round(lat.latency_ms, 4)
        rep["latency_basis"] = lat.basis
        rep["hardware"] = info
        for note in (slow_path_note(table, est, runtime), group_slow_note(table, est, prof, batch_size)):
            if note:
                rep["notes"] = [*rep.get("notes", []), note]
    return rep


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
        loaded = load(model, weights, input_shape, trust_pickle)
        check_executable(strat, bool(data), {n for n, _ in loaded.model.named_modules()}, loaded.n_inputs)
        table = run_analysis(loaded)
        rep = _with_latency(estimate_report(loaded, table, strat), loaded, table, strat, hardware, batch_size, anchor,
                            runtime)
        if data:
            from estimators.data import load_data_for

            d = load_data_for(data, loaded)
            acc = predict_drop(loaded, table, strat, d, finetune_epochs,
                               progress=progress)
            rep["pred"]["accuracy_drop"] = acc["accuracy_drop"]
            rep["accuracy_estimate"] = acc
        else:
            rep["accuracy_proxy"] = proxy_report(table, strat)
        return rep

    rep = compute(as_json, body)
    if as_json:
        return
    console.print(totals_table(f"{model} with {rep['compact']} (predicted)", {"pred": rep["pred"]}))
    print_latency_basis(rep)
    for n in rep.get("notes", []):
        warn(n)
    if "accuracy_proxy" in rep:
        console.print(f"accuracy proxy {rep['accuracy_proxy']['score']:.4f}: {rep['accuracy_proxy']['note']}",
                      highlight=False)
    print_unpruned(rep)


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
        loaded = load(model, weights, input_shape, trust_pickle)
        return apply_and_measure(loaded, strat, out, hardware=hardware, batch_size=batch_size,
                                 progress=progress, data_spec=data,
                                 train_cfg=TrainConfig(epochs=finetune_epochs, kd_finetune=kd), anchor_on=anchor,
                                 export=tuple(export or ("pt2",)), runtime=runtime).dump()

    rep = compute(as_json, body)
    if as_json:
        return
    from estimators.report import POINTS

    cols = {"pred": rep["pred"], "meas": {k: rep["meas"].get(k, "") for k in rep["pred"]},
            "err": {k: ("" if k not in rep["err"] else f"{rep['err'][k]:+.2f} pts" if k in POINTS
                        else f"{100 * rep['err'][k]:+.2f} %") for k in rep["pred"]}}
    console.print(totals_table(f"{model} with {rep['compact']}", cols))
    print_latency_basis(rep)
    if rep.get("data"):
        d = rep["data"]
        console.print(f"accuracy on {d['spec']} ({d['val_size']} validation inputs): {d['accuracy_before']:.2f}% -> "
                      f"{rep['meas']['accuracy']:.2f}% (drop {rep['meas']['accuracy_drop']:+.2f} points; "
                      f"{d['finetune_epochs']} training epochs per step)", highlight=False)
    print_unpruned(rep)
    for n in rep["notes"]:
        console.print(f"  note: {n}", highlight=False)
    console.print(f"artifact: {rep['artifact']['model']}")
    if rep.get("onnx") and "path" in rep["onnx"]:
        print_onnx(rep["onnx"])


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
    with the least predicted accuracy drop. Exit code 3 when nothing fits (with the nearest relaxation).
    `--runtime pytorch,onnxruntime` plans for each runtime in turn and compares their recommendations (exit code 3
    when nothing fits on any)."""
    runtimes = [r.strip() for r in runtime.split(",") if r.strip()]

    def body():
        from estimators.modelspec import format_input_shape
        from estimators.progress import shown
        from tasks.onnx_runtime import check_runtime
        from tasks.pipeline import ModelInput, accuracy_sensitivity, search_space

        if not runtimes or len(set(runtimes)) != len(runtimes):
            raise UserInputError(f"--runtime: one runtime, or several without repeats, not {runtime!r}")
        for r in runtimes:  # every runtime checked before anything is measured
            check_runtime(r, hardware)
        req = _requirements(requirements, max_latency_ms=max_latency_ms, max_size_mb=max_size_mb, max_params=max_params,
                            max_macs=max_macs, max_memory_mb=max_memory_mb, max_accuracy_drop=max_accuracy_drop,
                            min_accuracy=min_accuracy, batch_size=batch_size)
        opts = search_options(grid_step, nsga_evals, seed, students, finetune_epochs)
        if not data and req.max_accuracy_drop is not None:
            raise UserInputError("--max-accuracy-drop needs --data: without data accuracy is only ranked by a proxy")
        loaded = load(model, weights, input_shape, trust_pickle)
        table = run_analysis(loaded)
        spec = ModelInput(spec=model, weights=weights, input_shape=input_shape, trust_pickle=trust_pickle)
        shape = format_input_shape(loaded.input_shape)
        tables = {n: run_analysis(load(n, None, shape, trust_pickle)) for n in opts.students}
        reps = {}
        with shown(progress):  # the pipeline's steps draw on this command's progress
            sens = accuracy_sensitivity(spec, data, table, loaded) if data else None
            for r in runtimes:  # the plan the flows make (tasks.pipeline.search_space), once per runtime
                planned = search_space(spec, table, hardware, req, opts, data=data, sens=sens, student_tables=tables,
                                       top_k=top_k, anchor=anchor, runtime=r, loaded=loaded)
                info = planned.profile_identity or {}
                note = info.get("warning")
                if note:
                    warn(note)
                out = {**planned.dump(), "profile": info}
                reps[r] = {**out, "warning": note} if note else out
        if len(runtimes) == 1:
            return reps[runtimes[0]]
        return {"runtimes": reps, "comparison": _runtime_comparison(reps)}

    rep = compute(as_json, body)
    if len(runtimes) == 1:
        print_plan(model, rep, as_json)
        if rep.get("infeasible"):
            err_console.print(f"infeasible: {rep['infeasible']['message']}", highlight=False)
            raise typer.Exit(3)
        return
    for r, one in rep["runtimes"].items():
        if not as_json:
            console.print(f"[bold]runtime {r}[/]")
        print_plan(model, one, as_json)
        if one.get("infeasible"):
            err_console.print(f"infeasible on {r}: {one['infeasible']['message']}", highlight=False)
    if not as_json:
        for c in rep["comparison"]:
            console.print(f"{c['runtime']}: " + (f"{c['recommended']} at {c['latency_ms']:.3f} ms predicted "
                                                 f"({c['latency_basis']})" if c["recommended"] else "nothing fits"),
                          highlight=False)
    if all(one.get("infeasible") for one in rep["runtimes"].values()):
        raise typer.Exit(3)


def _runtime_comparison(reps: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per runtime planned for: its recommended strategy and that strategy's predicted latency (None where nothing
    fits), fastest first."""
    out = []
    for r, rep in reps.items():
        best = rep.get("recommended") if not rep.get("infeasible") else None
        out.append({"runtime": r, "recommended": best["compact"] if best else None,
                    "latency_ms": best["pred"]["latency_ms"] if best else None,
                    "latency_basis": best["latency_basis"] if best else None})
    return sorted(out, key=lambda c: (c["latency_ms"] is None, c["latency_ms"] or 0.0))


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
            anchor: AnchorOpt = True, runtime: RuntimeOpt = "pytorch",
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
        _preflight(model, weights, input_shape, trust_pickle, hardware, data, out_dir, runtime)
        from flows.pipeline import HardwareName, run_flow, terminal_run
        from tasks.apply import check_export_forms

        forms = list(check_export_forms(export or ["pt2", "onnx"]))
        from tasks.pipeline import ModelInput, ParallelOptions

        known = hardware in HardwareName.__members__ and hardware != "path"
        hw_name, hw_path = (hardware, None) if known else ("path", hardware)

        opts = search_options(grid_step, nsga_evals, seed, students, finetune_epochs)
        from estimators.progress import shown

        # in a terminal, the flow's counting steps (search, candidates, calibration) show as bars here
        with terminal_run(), (shown(progress) if progress.terminal else nullcontext()):
            state = run_flow(model=ModelInput(spec=model, weights=weights, input_shape=input_shape,
                                              trust_pickle=trust_pickle), data=data,
                             hardware=hw_name, hardware_path=hw_path, requirements=req, search=opts,
                             execute=execute, top_k=top_k, out_dir=out_dir, return_state=True,
                             parallel=ParallelOptions(workers=workers, dask_address=dask_address, threads=threads,
                                                      verbose=verbose),
                             device_measure=device_measure, device_timeout_s=device_timeout,
                             device_calibrate=device_calibrate, device_calibrate_budget_s=device_calibrate_budget,
                             anchor=anchor, runtime=runtime, register_as=register, export=forms)
        if state.is_failed():
            try:
                state.result()
            except UserInputError:
                raise
            except Exception as exc:
                raise UserInputError(f"flow run failed: {type(exc).__name__}: {exc}") from None
        return state.result()

    rep = compute(as_json, body)
    if not as_json:
        print_run(rep)
    if rep.get("infeasible"):
        raise typer.Exit(3)


def _preflight(model: str, weights: Optional[str], input_shape: Optional[str], trust_pickle: bool, hardware: str,
               data: Optional[str], out_dir: str, runtime: str = "pytorch") -> None:
    """What a flow run would only find inside the flow (with Prefect's tracebacks, seconds later), checked here
    first: the runtime fits the hardware, the model loads, the hardware profile exists (host is calibrated inside
    the flow when missing), the data loads and fits the model, the output folder can be written."""
    from tasks.executors import check_out_dir
    from tasks.onnx_runtime import check_runtime

    check_runtime(runtime, hardware)

    loaded = load(model, weights, input_shape, trust_pickle)
    if hardware != "host":
        from hardware.profile import load_profile

        load_profile(hardware)
    if data:
        from estimators.data import load_data_for

        load_data_for(data, loaded)
    check_out_dir(out_dir)


from flows import cli_admin  # noqa: E402

ADMIN = cli_admin  # imported for its commands: registered after the model commands, --help lists them in this order


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
    guard_process(args)
    try:
        rc = _command().main(args=args, prog_name="deployfit", standalone_mode=False)
    except (KeyboardInterrupt, Abort):
        err_console.print("terminated" if signals.terminated else "interrupted")
        sys.exit(143 if signals.terminated else 130)
    except TyperException as exc:  # the argument parser's (typer's own click) errors
        msg = " ".join(exc.format_message().split())
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        err_console.print(f"[bold red]error:[/] {msg}{hint}", highlight=False)
        if "--json" in args:
            emit({"error": msg})
        sys.exit(2)
    except Exception:
        if signals.terminated:  # a library that wrapped the interrupt in its own error: the cause is the SIGTERM
            err_console.print("terminated")
            sys.exit(143)
        raise
    if signals.terminated or rc == 130:  # click returns 130 for an interrupt it caught itself
        err_console.print("terminated" if signals.terminated else "interrupted")
        sys.exit(143 if signals.terminated else 130)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
