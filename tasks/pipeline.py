"""The pipeline's steps as pure functions with typed inputs, and the same steps as Prefect tasks.

    analyze_model -> accuracy_sensitivity -> search_space -> execute_candidate (top-k) -> (tracking)

The pure functions are what `bench/flow_overhead.py` calls directly; the tasks wrap them with what Prefect
adds: caching of the analysis and of the sensitivity by model spec and weights hash (never by an nn.Module
argument), persisted results (a rerun after a crash finds the finished steps, executed candidates included),
retries where the outside can fail (tracking). Estimating the candidates, predicting their latency and the
search are one task: they are one vectorised pass over thousands of candidates (search/batch.py), which a
task per candidate would slow by orders of magnitude.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, field_validator

from estimators.defaults import CALIBRATION_BUDGET_S
from estimators.errors import UserInputError
from estimators.modelspec import DEMO_WEIGHTS, INPUT_SHAPE_PATTERN, parse_input_shape
from estimators.strategy import parse_strategy
from search.requirements import Requirements
from search.results import CandidateResult, PlanReport

CODE_ROOT = Path(__file__).resolve().parents[1]


def _code_version(*packages: str) -> str:
    """Hash of the sources a cached result depends on, subpackages included: a code change invalidates the
    cache."""
    h = hashlib.sha256()
    for pkg in packages:
        for f in sorted((CODE_ROOT / pkg).rglob("*.py")):
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


ESTIMATOR_CODE = _code_version("estimators")
EXECUTOR_CODE = _code_version("estimators", "hardware", "search", "tasks")  # search: the result's type


class ModelInput(BaseModel):
    """Which model: a model spec (torchvision:NAME, demo:NAME, package.module:factory or a .pt2 path), optional
    state_dict weights and input shape, and whether a .pt2 that needs pickle may be loaded (it and its students)."""

    model_config = ConfigDict(extra="forbid")
    spec: str = Field(default="demo:digits-cnn", description="model spec")
    weights: Optional[str] = Field(default=None, description="state_dict file (loaded with weights_only=True)")
    input_shape: Optional[str] = Field(default=None, pattern=INPUT_SHAPE_PATTERN,
                                       description="e.g. 1,3,224,224; a model of several inputs: one shape per "
                                       "input separated by ';', e.g. 1,3,224,224;1,16 (default: the model's own)")
    trust_pickle: bool = Field(default=False, description="load a .pt2 that needs pickle (it can run any code): "
                               "only for a file whose source you trust")

    @field_validator("input_shape")
    @classmethod
    def _shape_parses(cls, v: Optional[str]) -> Optional[str]:
        """What the pattern admits, parse_input_shape parses: one rule for the form, the CLI and load_model."""
        parse_input_shape(v)
        return v

    def fingerprint(self) -> str:
        """Spec, input shape and the weights' content hash: what the analysis and sensitivity depend on."""
        h = hashlib.sha256(f"{self.spec}|{self.input_shape}".encode())
        w = Path(self.weights) if self.weights else None
        if w is None and self.spec.startswith("demo:"):
            w = DEMO_WEIGHTS / f"{self.spec[5:]}.pt"
        if w is None and self.spec.endswith(".pt2"):
            w = Path(self.spec)
        if w is not None and w.is_file():
            h.update(hashlib.sha256(w.read_bytes()).digest())
        return h.hexdigest()[:24]

    def load(self):
        from estimators.modelspec import load_model

        return load_model(self.spec, weights=self.weights, input_shape=self.input_shape, trust_pickle=self.trust_pickle)


class ParallelOptions(BaseModel):
    """Where executed candidates are built and trained: in the flow's process, or on a Dask cluster (a local
    one with `workers` > 1, or an existing one at `dask_address`). Latency is always measured afterwards, one
    candidate at a time, so that parallel builds never disturb it."""

    model_config = ConfigDict(extra="forbid")
    workers: int = Field(default=1, ge=1, le=64, description="local Dask workers (1: no cluster)")
    dask_address: Optional[str] = Field(default=None, description="an existing Dask scheduler, e.g. "
                                        "tcp://10.0.0.5:8786 (default: $DEPLOYFIT_DASK_ADDRESS)")
    threads: Optional[int] = Field(default=None, ge=1, le=256, description="torch threads per executed candidate "
                                   "(default: all cores in the flow's process, cores / workers on a local cluster); "
                                   "training results depend on it")
    verbose: bool = Field(default=False, description="show Dask's own logging (quiet otherwise: its warnings and "
                          "errors only)")

    def address(self) -> str | None:
        return self.dask_address or os.environ.get("DEPLOYFIT_DASK_ADDRESS") or None

    def distributed(self) -> bool:
        return self.workers > 1 or self.address() is not None

    def threads_per_candidate(self) -> int | str:
        """The torch threads each executed candidate gets (what training results depend on)."""
        if self.threads:
            return self.threads
        if self.distributed():
            return "the cluster's" if self.address() else max(1, (os.cpu_count() or 1) // self.workers)
        import torch

        return torch.get_num_threads()


class SearchOptions(BaseModel):
    """How the strategy space is searched and how executed candidates are trained."""

    model_config = ConfigDict(extra="forbid")
    grid_step: float = Field(default=0.01, ge=0.005, le=0.45, description="pruning-ratio grid of the structured space")
    nsga_evals: int = Field(default=10000, ge=0, le=200000, description="per-layer candidates NSGA-II evaluates")
    seed: int = Field(default=0, description="NSGA-II's random seed")
    students: list[str] = Field(default_factory=list, description="student model specs to distil into")
    finetune_epochs: int = Field(default=5, ge=0, le=1000, description="training budget of each executed candidate")


# ----------------------------------------------------------------------------------------------
# pure steps


def _log_info(message: str) -> None:
    """Progress into the Prefect run's log where there is one, else stderr."""
    try:
        from prefect import get_run_logger

        get_run_logger().info(message)
    except Exception:  # outside a flow or task run
        print(message, file=sys.stderr, flush=True)


class RunProgress:
    """A flow's progress (estimators.progress): messages into the Prefect run's log (_log_info), counting steps
    as rate-limited lines there, or as bars and spinners on the terminal of a `deployfit run` that shows them
    (estimators.progress.shown)."""

    def __call__(self, message: str) -> None:
        _log_info(message)

    def step(self, label: str, total: float, unit: str = "", lines: bool = True):
        from estimators.progress import Step, showing

        shown = showing()
        return shown.step(label, total, unit, lines=lines) if shown is not None else \
            Step(self, label, total, unit, lines=lines)

    def status(self, message: str, line: bool = True):
        from estimators.progress import showing, status

        shown = showing()
        return shown.status(message, line=line) if shown is not None else status(_log_info, message, line=line)


run_progress = RunProgress()


def analyze_model(model: ModelInput):
    """The model's LayerTable."""
    from estimators.analyze import analyze

    return analyze(model.load())


def accuracy_sensitivity(model: ModelInput, data: str, table, loaded=None):
    """The accuracy estimator's sensitivity analysis of the model on the data's validation split. `loaded`: the
    model already loaded (the CLI's), else it is loaded here."""
    from estimators.accuracy import sensitivity
    from estimators.data import load_data_for

    loaded = loaded or model.load()
    return sensitivity(loaded, table, load_data_for(data, loaded), progress=run_progress)


def search_space(model: ModelInput, table, hardware: str, requirements: Requirements, options: SearchOptions,
                 data: str | None = None, sens=None, student_tables: dict | None = None,
                 top_k: int = 5, anchor: bool = True, runtime: str = "pytorch", loaded=None) -> PlanReport:
    """Estimate every candidate (size, params, MACs, memory, latency on `hardware`, accuracy drop), search
    them against the requirements: the plan report (search.plan.plan), with the whole space as columns.
    `anchor`: latencies anchored on the original measured on the target, where it can be measured here;
    `runtime`: what they are for on this machine (tasks.onnx_runtime.RUNTIMES); `loaded`: the model already
    loaded (the CLI's), else it is loaded here."""
    from estimators.accuracy import DropScorer, ProxyScorer
    from search.plan import plan
    from tasks.anchoring import latency_context
    from tasks.onnx_runtime import plan_round_to

    prof, anc, info = latency_context(loaded or model.load(), table, hardware, requirements.batch_size, anchor,
                                      progress=run_progress, runtime=runtime)
    if data:
        if sens is None:
            raise UserInputError("data given without its sensitivity analysis")
        req = requirements.resolve_accuracy(sens.base_accuracy)
        scorer = DropScorer(None, table, None, options.finetune_epochs, sens=sens)
    else:
        req = requirements.resolve_accuracy(None)
        if req.max_accuracy_drop is not None:
            raise UserInputError("max_accuracy_drop needs data: without data accuracy is only ranked by a proxy")
        scorer = ProxyScorer()
    rep = plan(table, prof, req, scorer, top_k=top_k, students=tuple(options.students),
               student_tables=student_tables or {}, grid_step=options.grid_step, nsga_evals=options.nsga_evals,
               seed=options.seed, keep_candidates=True, anchor=anc, progress=run_progress,
               round_to=plan_round_to(runtime))
    return rep.model_copy(update={"profile_identity": info, "model": model.spec, "data": data,
                                  "base_accuracy": round(sens.base_accuracy, 4) if sens is not None else None})


def execute_candidate(model: ModelInput, strategy: str, out_dir: str, hardware: str, batch_size: int = 1,
                      data: str | None = None, finetune_epochs: int = 5, latency_now: bool = True,
                      threads: int | None = None, anchor: bool = True,
                      export: tuple[str, ...] = ("pt2", "onnx"), runtime: str = "pytorch") -> CandidateResult:
    """Execute one strategy (train where it trains), save the artifact (the `export` forms: model.pt2, and
    model.onnx checked in ONNX Runtime, whose failure is a note of the result, not a failure), measure it against
    its prediction (`runtime` `onnxruntime`: model.onnx is written whatever `export` says, and its latency is the
    one predicted and measured).
    `latency_now=False` leaves the latency to `measure_latencies` (candidates built in parallel are
    timed one at a time); `threads`: torch threads while executing (training results depend on it)."""
    import torch

    from hardware.measure import steady_allocator
    from tasks.apply import apply_and_measure
    from tasks.train import TrainConfig

    steady_allocator()  # a Dask worker trims freed memory eagerly (MALLOC_TRIM_THRESHOLD_): 2x slower without
    started = time.time()
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        rep = apply_and_measure(model.load(), parse_strategy(strategy), out_dir, hardware=hardware,
                                batch_size=batch_size, data_spec=data,
                                train_cfg=TrainConfig(epochs=finetune_epochs) if data else None, latency_now=latency_now,
                                anchor_on=anchor, export=tuple(export), onnx_required=False, runtime=runtime)
    finally:
        torch.set_num_threads(before)
    import socket

    return rep.model_copy(update={
        "executed_by": {"host": socket.gethostname(), "pid": os.getpid(), "threads": threads or before},
        "timing": {"started": started, "ended": time.time()}})  # the candidate's MLflow run spans them


def measure_latencies(results: list[CandidateResult], hardware: str, model: ModelInput | None = None,
                      anchor: bool = True, runtime: str = "pytorch") -> list[CandidateResult]:
    """The latency of each executed candidate's artifact, one at a time, measured on this machine in alternation
    with the original `model` when `hardware` is host (the results are returned completed); `runtime`
    `onnxruntime`: each candidate's model.onnx in ONNX Runtime, against the original's session."""
    if hardware != "host" or not results:
        return results
    from tasks.apply import measure_saved_latency
    from tasks.onnx_runtime import runtime_profile

    runtime_profile(hardware, runtime, run_progress)  # a first use calibrates before anything is timed
    from estimators.analyze import analyze
    from tasks.anchoring import original_program

    loaded = (model or ModelInput(spec=results[0].model)).load()
    table = analyze(loaded)
    original = original_program(loaded).module() if runtime == "pytorch" else None
    return [measure_saved_latency(r, loaded, anchor, run_progress, table, original, runtime) for r in results]


def calibrate_profile(quick: bool = True, budget_s: float = CALIBRATION_BUDGET_S, out: str | None = None,
                      runtime: str = "pytorch") -> str:
    """Calibrate the host profile on this machine (`runtime` onnxruntime: its ONNX Runtime profile,
    tasks.onnx_runtime.calibrate_ort, with `budget_s` of timing) and write it (default: this machine's file in the
    cache, hardware.hostprofile); returns its path."""
    from hardware.calibrate import calibrate_host

    from .onnx_runtime import calibrate_ort, check_runtime, ort_profile_path
    from .quantize_exec import compiled_int8
    from hardware.hostprofile import host_profile_path
    from hardware.profile import save_profile

    check_runtime(runtime, "host")
    if runtime == "onnxruntime":
        prof = calibrate_ort(quick=quick, progress=run_progress, budget_s=budget_s)
        path = Path(out) if out else ort_profile_path()
    else:
        prof = calibrate_host(quick=quick, budget_s=budget_s, build_int8=compiled_int8)
        path = Path(out) if out else host_profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_profile(prof, path)
    return str(path)


# ----------------------------------------------------------------------------------------------
# Prefect tasks


def _analysis_key(ctx, params: dict) -> str:
    return f"deployfit-analysis-{params['model'].fingerprint()}-{ESTIMATOR_CODE}"


def _sensitivity_key(ctx, params: dict) -> str:
    return f"deployfit-sensitivity-{params['model'].fingerprint()}-{params['data']}-{ESTIMATOR_CODE}"


def _execution_key(ctx, params: dict) -> str:
    h = hashlib.sha256(repr([params["model"].fingerprint(), params["strategy"], os.path.abspath(params["out_dir"]),
                             params["hardware"], params.get("batch_size", 1), params.get("data"),
                             params.get("finetune_epochs", 5), params.get("latency_now", True), params.get("threads"),
                             params.get("anchor", True), tuple(params.get("export", ("pt2", "onnx"))),
                             params.get("runtime", "pytorch"), EXECUTOR_CODE]).encode()).hexdigest()[:24]
    return f"deployfit-execution-{h}"


analyze_task = task(analyze_model, name="analyze", cache_key_fn=_analysis_key, persist_result=True,
                    cache_expiration=timedelta(days=30))
sensitivity_task = task(accuracy_sensitivity, name="accuracy-sensitivity", cache_key_fn=_sensitivity_key,
                        persist_result=True, cache_expiration=timedelta(days=30))
search_task = task(search_space, name="search", persist_result=True, cache_policy=NO_CACHE)
execute_task = task(execute_candidate, name="execute-and-measure", cache_key_fn=_execution_key, persist_result=True,
                    cache_expiration=timedelta(days=30), task_run_name="execute {strategy}")
measure_task = task(measure_latencies, name="measure-latency", cache_policy=NO_CACHE,
                    task_run_name="measure latency")
calibrate_task = task(calibrate_profile, name="calibrate", persist_result=False, cache_policy=NO_CACHE)
