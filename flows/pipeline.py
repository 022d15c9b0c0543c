"""Prefect flows: `plan` (analyze -> sensitivity -> estimate, predict latency and search -> report),
`run` (plan, then execute the top-k, measure and compare) and `calibrate`.

Parameters are pydantic models, so the Prefect UI renders a form with defaults and validation. Each flow
run leaves a markdown artifact (recommendation, top-k, predicted against measured, the MLflow link) and an
MLflow parent run (flows/tracking.py); when the tracking store is down the results are written under the
run's folder and the artifact and the returned report say where.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote
from pydantic import Field

from estimators.defaults import CALIBRATION_BUDGET_S
from estimators.modelspec import format_input_shape
from estimators.progress import step
from search.requirements import Requirements, settle_infeasible
from search.results import CandidateResult, PlannedCandidate, PlanReport, Prediction
from tasks.apply import EXPORT_FORMS, check_export_forms
from tasks.onnx_runtime import RUNTIMES
from tasks.pipeline import (ModelInput, ParallelOptions, SearchOptions, analyze_task, calibrate_task, execute_task,
                            measure_task, run_progress, search_task, sensitivity_task)

from . import tracking
from .context import RunContext, Runtime
from .markdown import markdown_report

DEFAULT_OUT = "build/runs"


def _hardware_names() -> list[str]:
    from hardware.profile import PROFILE_DIR

    return ["host", *sorted(p.stem for p in Path(PROFILE_DIR).glob("*.yaml")), "path"]


# the form's hardware choice: this machine, each shipped profile, or `path` (a profile file in hardware_path)
HardwareName = Enum("HardwareName", {n: n for n in _hardware_names()}, type=str)


ExportFormat = Enum("ExportFormat", {f: f for f in EXPORT_FORMS}, type=str)  # a form candidates are saved in


def hardware_spec(hardware: "HardwareName | str", hardware_path: Optional[str]) -> str:
    """The hardware as the estimators take it: a profile name or a YAML path."""
    name = hardware.value if isinstance(hardware, Enum) else str(hardware)
    if name == "path":
        if not hardware_path:
            from estimators.errors import UserInputError

            raise UserInputError("hardware is `path`: give the profile's YAML file in hardware_path")
        return hardware_path
    return name


@contextmanager
def terminal_run() -> Iterator[None]:
    """Settings for a flow run started in a terminal (`deployfit run`), not by a deployment: no flow-run
    heartbeats unless PREFECT_FLOWS_HEARTBEAT_FREQUENCY is set. Heartbeats let an automation mark a
    deployment's run Crashed when its machine vanishes; a terminal run's crash is seen in the terminal, and
    Prefect stops its heartbeat thread in 1 s sleeps, so each run would end up to 1 s later (half a second
    on average, measured by bench/flow_overhead.py). Served and worker-run deployments keep Prefect's setting."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from .deployments import ensure_prefect_home

    ensure_prefect_home()  # for the temporary server this run starts
    with temporary_settings(set_defaults={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


@task(name="track", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def track_task(record: dict, plan: dict, executed: list[dict], layers: list[dict], workdir: str,
               session: Optional[tracking.Session] = None) -> dict:
    """The flow run in MLflow: the first attempt completes the background session (the plan already logged
    while the candidates executed), a retry logs the whole run anew."""
    if session is not None and not session.used:
        return session.finish(executed)
    return tracking.log_run(record, plan, executed, layers, Path(workdir))


_PREFECT_NAME = re.compile(r"^[a-z]+-[a-z]+$")  # the adjective-animal names Prefect gives unnamed runs


def _name_flow_run(spec: str, hardware: str) -> str:
    """The flow run's name, shared with its MLflow parent run: the name typed when it was triggered, else (in
    place of Prefect's random `adjective-animal`) model, hardware and start time, so runs tell apart."""
    from prefect.runtime import flow_run

    name = flow_run.name or ""
    if name and not _PREFECT_NAME.match(name):
        return name
    hw = Path(hardware).stem if hardware.endswith((".yaml", ".yml")) else hardware
    new = f"{spec} on {hw} {time.strftime('%Y-%m-%d %H:%M:%S')}"
    if flow_run.id:
        try:
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                client.update_flow_run(flow_run.id, name=new)
        except Exception:  # noqa: BLE001 - a name is a convenience: the run goes on under Prefect's
            return name or new
    return new


def _flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or "")


def _key(*parts: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


def _ensure_profile(hardware: str, runtime: str) -> None:
    """Load the profile first: `host` (or its ONNX Runtime profile) on a machine without one is calibrated here
    (quickly, saying so), before the tracking session starts and before anything is timed."""
    from tasks.onnx_runtime import runtime_profile

    runtime_profile(hardware, runtime, run_progress)


def _open(flow_name: str, model: ModelInput, data: Optional[str], hardware: str, requirements: Requirements,
          search: SearchOptions, top_k: int, anchor: bool, runtime: Runtime, out_dir: str, **run: Any) -> RunContext:
    """The run's context: its inputs, its Prefect flow run (named) and its own folder, created. The runtime is
    checked here, before any work (ONNX Runtime is measured on this machine only)."""
    from tasks.onnx_runtime import check_runtime

    runtime = runtime.value if isinstance(runtime, Enum) else runtime
    check_runtime(runtime, hardware)
    run_id = _flow_run_id()
    workdir = Path(out_dir) / (run_id or time.strftime("%Y%m%d-%H%M%S"))
    workdir.mkdir(parents=True, exist_ok=True)
    return RunContext(flow=flow_name, model=model, data=data, hardware=hardware, requirements=requirements,
                      search=search, top_k=top_k, anchor=anchor,
                      runtime=runtime, out_dir=out_dir,
                      workdir=workdir, flow_run_id=run_id, run_name=_name_flow_run(model.spec, hardware),
                      started=time.perf_counter(), **run)


def _plan_steps(ctx: RunContext) -> tuple[PlanReport, list[dict]]:
    """Analysis, sensitivity (with data), the students' analyses and the search: the plan report and the layer rows."""
    log = get_run_logger()
    model = ctx.model
    with run_progress.status(f"tracing {model.spec} into its layer table", line=False):  # a spinner on a terminal
        table = analyze_task(model)
    sens = sensitivity_task(model, ctx.data, quote(table)) if ctx.data else None
    shape = format_input_shape(table.input_shape)
    students = {}
    for s in ctx.search.students:
        with run_progress.status(f"tracing the student {s}", line=False):
            students[s] = analyze_task(ModelInput(spec=s, input_shape=shape, trust_pickle=model.trust_pickle))
    # quote(): large payloads pass through as they are (Prefect would walk them looking for futures)
    rep = search_task(model, quote(table), ctx.plan_hardware, ctx.requirements, ctx.search, data=ctx.data,
                      sens=quote(sens), student_tables=quote(students), top_k=ctx.top_k, anchor=ctx.anchor,
                      runtime=ctx.runtime)
    log.info(f"{rep.candidates_evaluated:,} candidates in {rep.seconds} s; recommended "
             f"{rep.recommended.label if rep.recommended else 'none: ' + rep.infeasible.message}")
    from estimators.table import layer_rows

    return rep, layer_rows(table)


def _track(ctx: RunContext, session: tracking.Session, plan: dict, done: list[dict], layers: list[dict]) -> dict:
    """The run in MLflow, or (the store down) everything kept on disk, and where: `plan` and `done` are the plan
    report's and the executed candidates' JSON."""
    log = get_run_logger()
    record = ctx.record()
    t_track = time.perf_counter()
    state = track_task(record, quote(plan), quote(done), quote(layers), str(ctx.workdir), quote(session),
                       return_state=True)
    if state.is_completed():
        tracked = state.result()
        log.info(f"tracked in MLflow run {tracked['run_id']} ({tracked['link']})")
    else:
        try:
            state.result()
            error = "unknown"
        except Exception as exc:  # the store is down: keep everything on disk and say where
            error = f"{type(exc).__name__}: {str(exc)[:300]}"
        tracked = tracking.save_local(ctx.workdir / "tracking-fallback", record, plan, done, layers, error)
        log.warning(f"tracking store unreachable ({error}); results saved under {tracked['saved_locally']}")
    tracked["seconds"] = round(time.perf_counter() - t_track, 3)
    return tracked


def _measure_on_device(ctx: RunContext, executed: list[CandidateResult], tracked: dict) -> list[CandidateResult]:
    """Latency measured on the device: the worker of pool deployfit-<hardware> fetches each artifact from the
    tracking store, measures it and logs into the candidate's run. Returns the executed candidates with the
    measurements that came back (a candidate no worker measured in time keeps its prediction, with a note)."""
    from .device import measure_remote, pool_name

    log = get_run_logger()
    if not tracked.get("executed_runs"):
        log.warning("device measurement needs the tracking store (the artifacts travel through it): skipped")
        return executed
    got = measure_remote(tracked["executed_runs"], tracked["uri"], ctx.hardware, ctx.batch_size,
                         ctx.device_timeout_s, say=log.warning)
    out = []
    for e, m in zip(executed, got):
        if m and "meas.latency_ms" in m:
            out.append(e.model_copy(update={"meas": e.meas.model_copy(update={"latency_ms": m["meas.latency_ms"]}),
                                            "measured_on": f"pool {pool_name(ctx.hardware)}",
                                            "device_onnx": m.get("device_onnx") or None}))
        else:
            out.append(e.model_copy(update={
                "notes": [*e.notes, "latency not measured: no device worker answered in time"]}))
    return out


def _finish(ctx: RunContext, session: tracking.Session, rep: PlanReport, executed: list[CandidateResult],
            layers: list[dict], failed: list[dict] | None = None) -> dict:
    """Settle the plan on the measurements, track the run, leave its Prefect artifact and report.json; returns the
    report."""
    on_device = ctx.device_measure and bool(executed)
    if not on_device:  # measured here: settled before it is tracked
        rep = settle_infeasible(rep, executed)
    plan, done = rep.dump(), [e.dump() for e in executed]  # the JSON the store, the artifact and report.json take
    tracked = _track(ctx, session, plan, done, layers)
    if on_device:
        executed = _measure_on_device(ctx, executed, tracked)
        rep = settle_infeasible(rep, executed)  # on the device's measurements, just taken
        plan, done = rep.dump(), [e.dump() for e in executed]
    title = f"deployfit {ctx.flow}: {ctx.model.spec} on {ctx.hardware}" + (
        " (ONNX Runtime)" if ctx.runtime == "onnxruntime" else "")
    create_markdown_artifact(markdown_report(title, plan, done, tracked, failed or []),
                             key=_key("deployfit", ctx.flow, ctx.model.spec, ctx.hardware), description=title)
    out = rep.dump(candidates=False)
    out.update(executed=[{k: e.get(k) for k in ("compact", "label", "pred", "meas", "err", "artifact", "executed_by",
                                                 "measured_on", "device_onnx", "notes", "onnx")}
                         for e in done],
               failed=failed or [], tracking=tracked, flow_run_id=ctx.flow_run_id, runtime=ctx.runtime,
               seconds_total=round(time.perf_counter() - ctx.started, 2), report_dir=str(ctx.workdir))
    (ctx.workdir / "report.json").write_text(json.dumps(out, indent=1, default=str))
    return out


RuntimeName = Enum("RuntimeName", {r: r for r in RUNTIMES}, type=str)  # the form's runtime choice


@flow(name="deployfit-plan", log_prints=True)
def plan_flow(model: ModelInput = ModelInput(), data: Optional[str] = "digits", hardware: HardwareName = "host",
              hardware_path: Optional[str] = None, requirements: Requirements = Requirements(max_size_mb=0.05),
              search: SearchOptions = SearchOptions(), top_k: Annotated[int, Field(ge=1, le=100)] = 5,
              anchor: bool = True, runtime: RuntimeName = RuntimeName.pytorch, out_dir: str = DEFAULT_OUT) -> dict:
    """Estimate every candidate of the distill -> prune -> quantize space for MODEL on HARDWARE and
    recommend the strategy that meets the requirements with the least predicted accuracy drop.

    Args:
        model: the model to compress: a spec (torchvision:NAME, demo:NAME, package.module:factory or a .pt2
            file), optional state_dict weights and input shape
        data: labelled data for accuracy (digits, imagefolder:PATH, cifar10:PATH or package.module:function);
            empty: accuracy drop is predicted by a sensitivity proxy
        hardware: the target: host (this machine), a shipped profile, or path (then give hardware_path)
        hardware_path: a hardware profile YAML file, used when hardware is path
        requirements: the limits every recommended strategy must meet (units in each field)
        search: the search space and budget (pruning grid, NSGA-II evaluations, students, fine-tuning epochs)
        top_k: how many of the best strategies the report lists (1-100)
        anchor: predict latency relative to the original model measured on this machine (host only)
        runtime: what latency is predicted for on host: pytorch (the saved program) or onnxruntime (the ONNX
            export in ONNX Runtime)
        out_dir: folder for run reports, on the machine that runs the flow
    """
    hardware = hardware_spec(hardware, hardware_path)
    _ensure_profile(hardware, RuntimeName(runtime).value)
    ctx = _open("plan", model, data, hardware, requirements, search, top_k, anchor, runtime, out_dir)
    session = tracking.Session()  # after any calibration: the session's start must not disturb its timing
    try:
        rep, layers = _plan_steps(ctx)
        session.start(ctx.record(), rep.dump(), layers, ctx.workdir)
        return _finish(ctx, session, rep, [], layers)
    finally:
        session.close()


def _failure(candidate: dict, exc: Exception) -> dict:
    """A candidate whose execution raised: reported, the others go on."""
    return {"error": f"{type(exc).__name__}: {exc}", "compact": candidate["compact"], "label": candidate["label"]}


@flow(name="deployfit-execute", log_prints=True)
def execute_flow(model: ModelInput, candidates: list[dict], out_dir: str, hardware: str, batch_size: int,
                 data: Optional[str], finetune_epochs: int, threads: Optional[int],
                 export: tuple[str, ...] = ("pt2", "onnx"), runtime: str = "pytorch") -> list[dict]:
    """Build, train and measure (all but latency) the candidates concurrently on the flow's task runner (a
    DaskTaskRunner when called from `run` with workers or a cluster address). Returns one dict per candidate:
    its result, or {"error": ...}."""
    futures = [execute_task.submit(model, c["compact"], c["out_dir"], hardware, batch_size=batch_size, data=data,
                                   finetune_epochs=finetune_epochs, latency_now=False, threads=threads,
                                   export=export, runtime=runtime)
               for c in candidates]
    out = []
    with step(run_progress, "candidates built", len(candidates), lines=False) as counted:  # a bar on a terminal
        for c, f in zip(candidates, futures):
            try:
                out.append(f.result())
            except Exception as exc:
                out.append(_failure(c, exc))
            counted.update(len(out), c["label"])
    return out


def _with_plan_prediction(res: CandidateResult, pred: Prediction) -> CandidateResult:
    """An executed candidate's accuracy and latency predictions are the plan's, which chose it: the ones `apply`
    makes while executing have already learnt from candidates executed before it (and in parallel, from whichever
    finished first), so the order of execution would change them."""
    keep = {k: pred.get(k) for k in ("accuracy_drop", "latency_ms") if pred.get(k) is not None}
    return res.model_copy(update={"pred": res.pred.model_copy(update=keep)}) if keep else res


def _task_runner(parallel: ParallelOptions):
    """The Dask runner: a local cluster, quiet (Dask's warnings and errors only) unless `verbose`."""
    import logging

    from prefect_dask import DaskTaskRunner

    if not parallel.verbose:
        for name in ("distributed", "distributed.nanny", "distributed.scheduler", "distributed.worker",
                     "distributed.core", "distributed.http.proxy"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if parallel.address():
        return DaskTaskRunner(address=parallel.address())
    return DaskTaskRunner(cluster_kwargs={"n_workers": parallel.workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None,
                                          "silence_logs": logging.INFO if parallel.verbose else logging.WARNING})


@flow(name="deployfit-run", log_prints=True)
def run_flow(model: ModelInput = ModelInput(), data: Optional[str] = "digits", hardware: HardwareName = "host",
             hardware_path: Optional[str] = None,
             requirements: Requirements = Requirements(max_latency_ms=1.0, max_size_mb=0.05),
             search: SearchOptions = SearchOptions(), execute: bool = True,
             top_k: Annotated[int, Field(ge=1, le=50)] = 3,
             parallel: ParallelOptions = ParallelOptions(), device_measure: Optional[bool] = None,
             device_calibrate: bool = False,
             device_calibrate_budget_s: Annotated[float, Field(gt=0, le=3600)] = CALIBRATION_BUDGET_S,
             device_timeout_s: Annotated[float, Field(gt=0, le=86400)] = 600.0, anchor: bool = True,
             runtime: RuntimeName = RuntimeName.pytorch,
             register_as: Optional[str] = None, export: list[ExportFormat] = [ExportFormat.pt2, ExportFormat.onnx],
             out_dir: str = DEFAULT_OUT) -> dict:
    """Plan, then execute the top-k strategies (training where they train; in parallel on Dask with
    `parallel`), measure each artifact (latency one at a time; on the device through the work pool
    deployfit-<hardware> with `device_measure`, by default for any target but host) and compare it with its
    prediction; everything tracked in MLflow.

    Args:
        model: the model to compress: a spec (torchvision:NAME, demo:NAME, package.module:factory or a .pt2
            file), optional state_dict weights and input shape
        data: labelled data for accuracy (digits, imagefolder:PATH, cifar10:PATH or package.module:function);
            empty: accuracy drop is predicted by a sensitivity proxy and nothing is fine-tuned
        hardware: the target: host (this machine), a shipped profile, or path (then give hardware_path)
        hardware_path: a hardware profile YAML file, used when hardware is path
        requirements: the limits every recommended strategy must meet (units in each field)
        search: the search space and budget (pruning grid, NSGA-II evaluations, students, fine-tuning epochs)
        execute: build, fine-tune and measure the top-k strategies (off: plan only)
        top_k: how many of the best strategies to execute and measure (1-50)
        parallel: where the top-k are built: in the flow's process, or on a local or existing Dask cluster
        device_measure: measure latency on the device through the work pool deployfit-HARDWARE (empty: for
            every hardware but host)
        device_calibrate: calibrate the hardware's profile on the device first (needs a worker on its pool)
        device_calibrate_budget_s: seconds of timing the device calibration may spend (1-3600)
        device_timeout_s: seconds to wait for a device worker per step before keeping the predictions
        anchor: predict latency relative to the original model measured on this machine (host only)
        runtime: what latency is predicted and measured for on host: pytorch (the saved program) or onnxruntime
            (each candidate's model.onnx in ONNX Runtime, which is then always exported)
        register_as: register the recommended executed candidate's model under this name in the MLflow Model
            Registry (a new version per run; empty: none)
        export: the forms each executed candidate is saved in: pt2 (always: it is what is measured) and onnx
            (checked in ONNX Runtime; for TensorRT or ONNX Runtime deployments)
        out_dir: folder for run reports and executed artifacts, on the machine that runs the flow
    """
    log = get_run_logger()
    hardware = hardware_spec(hardware, hardware_path)
    _ensure_profile(hardware, RuntimeName(runtime).value)
    forms = check_export_forms(["pt2", *(ExportFormat(f).value for f in export)], RuntimeName(runtime).value)
    ctx = _open("run", model, data, hardware, requirements, search, top_k, anchor, runtime, out_dir,
                execute=execute, export=forms, parallel=parallel,
                # a target other than this machine is measured on the device when a worker serves it
                device_measure=hardware != "host" if device_measure is None else device_measure,
                device_timeout_s=device_timeout_s, register_as=register_as or None)
    if device_calibrate:  # the device calibrates the hardware's profile; it comes back through the tracking store
        from .device import calibrate_remote

        got = calibrate_remote(hardware, tracking.tracking_uri(), Path(out_dir) / "profiles", quick=
                               device_calibrate_budget_s < 30, budget_s=device_calibrate_budget_s,
                               timeout_s=device_timeout_s, say=log.warning)
        if got:
            ctx = ctx.model_copy(update={"profile": str(got)})
            log.info(f"planning with the {hardware} profile calibrated on the device ({got})")
    session = tracking.Session()  # after any calibration: the session's start must not disturb its timing
    try:
        return _run_steps(ctx, session)
    finally:
        session.close()


def _candidates(ctx: RunContext, chosen: list[PlannedCandidate]) -> list[dict]:
    """The chosen strategies to execute, each with its own artifact folder (by model and strategy)."""
    out = []
    for cand in chosen:
        tag = hashlib.sha256(f"{ctx.model.fingerprint()}|{cand.compact}".encode()).hexdigest()[:12]
        out.append({"compact": cand.compact, "label": cand.label,
                    "out_dir": str(Path(ctx.out_dir) / "artifacts" / f"{_key(ctx.model.spec)}-{tag}")})
    return out


def _execute(ctx: RunContext, cands: list[dict], built) -> None:
    """Build and train each candidate (on Dask with `ctx.parallel`, else one after another here), handing each
    result, or its failure, to `built`."""
    log = get_run_logger()
    parallel = ctx.parallel
    if parallel.distributed():
        runner = _task_runner(parallel)
        log.info(f"executing {len(cands)} candidates on Dask ({parallel.address() or f'{parallel.workers} local workers'})")
        per = parallel.threads or (None if parallel.address() else parallel.threads_per_candidate())
        for res in execute_flow.with_options(task_runner=runner)(ctx.model, cands, ctx.out_dir, ctx.hardware,
                                                                 ctx.batch_size, ctx.data, ctx.search.finetune_epochs,
                                                                 per, ctx.export, ctx.runtime):
            built(res)
        return
    # the log says which candidate runs; a terminal also shows them as a bar with the time left
    with step(run_progress, "executing candidates", len(cands), lines=False) as counted:
        for i, c in enumerate(cands):
            log.info(f"executing {i + 1}/{len(cands)}: {c['label']}")
            counted.update(i, c["label"])
            state = execute_task(ctx.model, c["compact"], c["out_dir"], ctx.hardware, batch_size=ctx.batch_size,
                                 data=ctx.data, finetune_epochs=ctx.search.finetune_epochs, latency_now=False,
                                 threads=parallel.threads, anchor=ctx.anchor, export=ctx.export, runtime=ctx.runtime,
                                 return_state=True)
            try:  # one candidate failing (a runtime that cannot build it) must not lose the others
                built(state.result())
            except Exception as exc:
                built(_failure(c, exc))
            counted.update(i + 1)


def _run_steps(ctx: RunContext, session: tracking.Session) -> dict:
    log = get_run_logger()
    rep, layers = _plan_steps(ctx)
    rep = rep.model_copy(update={"profile": ctx.plan_hardware})
    session.start(ctx.record(), rep.dump(), layers, ctx.workdir)  # logged in the background while candidates execute
    executed: list[CandidateResult] = []
    failed: list[dict] = []
    # nothing predicted feasible, but candidates that miss only the predicted accuracy: executed to check it
    chosen = (rep.top or rep.verify)[:ctx.top_k]
    if ctx.execute and chosen:
        plan_pred = {c.compact: c.pred for c in chosen}

        def built(res: CandidateResult | dict) -> None:  # tracked in the background while the next ones execute
            if isinstance(res, dict):  # _failure's
                failed.append(res)
                log.warning(f"{res['label']} failed: {res['error']}")
                return
            executed.append(_with_plan_prediction(res, plan_pred[res.compact]))
            session.executed(len(executed) - 1, executed[-1].dump())

        _execute(ctx, _candidates(ctx, chosen), built)
        if not ctx.device_measure:
            session.idle()  # nothing else runs while latency is timed, one candidate at a time
            executed[:] = measure_task(quote(executed), ctx.hardware, ctx.model, ctx.anchor, ctx.runtime)
    return _finish(ctx, session, rep, executed, layers, failed)


@flow(name="deployfit-calibrate", log_prints=True)
def calibrate_flow(quick: bool = False, budget_s: Annotated[float, Field(gt=0, le=3600)] = CALIBRATION_BUDGET_S,
                   out: Optional[str] = None, runtime: RuntimeName = RuntimeName.pytorch) -> str:
    """Calibrate the host profile on this machine (micro-benchmarks in synthetic networks) and write it.

    Args:
        quick: a short calibration (what a first use of `host` runs)
        budget_s: seconds of timing
        out: the profile's path (default: this machine's file in the deployfit cache)
        runtime: pytorch (the host profile) or onnxruntime (this machine's ONNX Runtime profile: synthetic networks
            exported to ONNX and timed whole in ONNX Runtime)
    """
    return calibrate_task(quick=quick, budget_s=budget_s, out=out, runtime=RuntimeName(runtime).value)
