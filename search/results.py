"""What the pipeline's steps hand each other, typed: a candidate's predicted and measured metrics, a planned
candidate, the plan report, and an executed candidate's result.

    plan (search.plan)                   -> PlanReport: the candidates ranked, the recommendation or why none fits
    apply (tasks.apply.apply_and_measure) -> CandidateResult: the artifact, its prediction, measurement and error

The flows pass these between their steps; each becomes JSON only where it leaves the pipeline (the CLI's output,
report.json, the tracking store, the Prefect artifact) through `dump()`. A metric that is not predicted or not
measured is None and left out of the JSON.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, computed_field, model_serializer, model_validator

from estimators.report import rel_err

Number = int | float


class _Metrics(BaseModel):
    """Metrics by name; the ones not given are None and not serialized (a candidate's JSON lists what it has)."""

    model_config = ConfigDict(extra="forbid")

    @model_serializer(mode="wrap")
    def _given(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}

    def get(self, name: str, default: Any = None) -> Any:
        v = getattr(self, name, None)
        return default if v is None else v

    def given(self) -> dict[str, Number]:
        return self.model_dump()


class Prediction(_Metrics):
    """A candidate's predicted metrics (README: Metrics). Sizes and counts are integers where they are whole."""

    params: Optional[Number] = None
    size_bytes: Optional[Number] = None
    macs: Optional[Number] = None
    flops: Optional[Number] = None
    memory_access_bytes: Optional[Number] = None
    peak_memory_bytes: Optional[Number] = None
    latency_ms: Optional[float] = None
    accuracy_drop: Optional[float] = None  # points of top-1 accuracy with data, else a proxy (PlanReport.accuracy_unit)
    onnx_size_bytes: Optional[Number] = None  # the ONNX export's stored tensors


class Measurement(_Metrics):
    """An executed candidate's measured metrics: on the saved artifact, latency in alternation with the original."""

    params: Optional[Number] = None
    macs: Optional[Number] = None
    flops: Optional[Number] = None
    size_bytes: Optional[Number] = None
    artifact_file_bytes: Optional[int] = None
    gemm_macs: Optional[Number] = None
    memory_access_bytes: Optional[Number] = None
    peak_memory_bytes: Optional[Number] = None
    latency_ms: Optional[float] = None
    speedup: Optional[float] = None  # the original's latency over the candidate's, timed in alternation
    onnx_size_bytes: Optional[Number] = None
    accuracy: Optional[float] = None
    accuracy_drop: Optional[float] = None


def errors(pred: Prediction, meas: Measurement) -> dict[str, float]:
    """Relative error (pred - meas) / meas of every measured metric that is predicted; accuracy in points."""
    return rel_err(pred.given(), meas.given())


class PlannedCandidate(BaseModel):
    """A candidate of the plan: its strategy and predictions."""

    model_config = ConfigDict(extra="forbid")
    compact: str
    label: str
    pred: Prediction
    latency_basis: str = "profile"  # anchored: corrected by the original measured on the target
    strategy: Optional[dict[str, Any]] = None  # the JSON form (the Pareto front and the table carry compact only)
    by: Optional[str] = None  # "measurement": recommended because it met every requirement when executed
    meas: Optional[Measurement] = None  # with `by`


class Binding(BaseModel):
    """A requirement that excluded candidates ranked above the recommendation (or one no candidate meets)."""

    model_config = ConfigDict(extra="forbid")
    requirement: str
    limit: float
    candidates_excluded: Optional[int] = None


class Infeasible(BaseModel):
    """Why nothing fits: the requirements out of reach, and the candidate that breaks them least."""

    model_config = ConfigDict(extra="forbid")
    message: str
    unreachable: list[str]
    relaxed: dict[str, float]  # the limits the nearest candidate would need
    nearest: PlannedCandidate
    verified: Optional[bool] = None  # executed, and confirmed by measurement


class PlanReport(BaseModel):
    """search.plan.plan's result: the space searched, the recommendation (or why none), the Pareto front."""

    model_config = ConfigDict(extra="forbid")
    candidates_evaluated: int
    distinct_candidates: int
    seconds: float
    candidates_per_second: float
    search: dict[str, Number]  # structured candidates, their seconds, NSGA-II evaluations
    hardware: str  # the profile's name
    requirements: dict[str, Any]
    accuracy_unit: str  # points (predicted with data) or proxy
    pareto: list[PlannedCandidate]
    recommended: Optional[PlannedCandidate] = None
    top: list[PlannedCandidate] = []
    binding: list[Binding] = []
    verify: list[PlannedCandidate] = []  # infeasible by predicted accuracy only: executing them settles it
    infeasible: Optional[Infeasible] = None
    predicted_infeasible: Optional[Infeasible] = None  # the prediction's verdict, settled by measurement
    candidates: Optional[dict[str, list]] = None  # the whole space as columns (keep_candidates)
    # set by the pipeline (tasks.pipeline.search_space, flows)
    model: Optional[str] = None
    data: Optional[str] = None
    base_accuracy: Optional[float] = None
    profile_identity: Optional[dict[str, Any]] = None
    profile: Optional[str] = None  # the profile planned with, where it is not `hardware`'s stored one

    def dump(self, candidates: bool = True) -> dict[str, Any]:
        """The JSON form; without the whole space's columns unless `candidates`."""
        return self.model_dump(exclude=None if candidates else {"candidates"})


class CandidateResult(BaseModel):
    """An executed candidate (tasks.apply.apply_and_measure): the artifact, what was predicted for it, what was
    measured on it, and the error of each prediction."""

    model_config = ConfigDict(extra="forbid")
    model: str
    input_shape: Any  # the model's input shape as JSON: a list, or one list per input
    batch_size: int
    strategy: dict[str, Any]  # the JSON form
    compact: str
    label: str
    artifact: dict[str, str]  # form -> path: model (the .pt2), strategy (strategy.json), onnx
    pred: Prediction
    meas: Measurement
    pred_before_tuning: Optional[Prediction] = None  # before autotune left layers in float
    latency_measurement: Optional[dict[str, Any]] = None  # the alternation's figures (tasks.anchoring)
    latency_basis: Optional[str] = None
    latency_runtime: Optional[str] = None
    pred_latency_before_truths_ms: Optional[float] = None  # what a latency truth is recorded against
    hardware: Optional[dict[str, Any]] = None  # the profile's identity
    unpruned: list[dict[str, Any]] = []
    unsupported_ops: list[dict[str, Any]] = []
    log: list[str] = []
    notes: list[str] = []
    float_layers: list[str] = []
    data: Optional[dict[str, Any]] = None  # the data it was trained and measured on, and the accuracy estimate
    training: list[dict[str, Any]] = []
    onnx: Optional[dict[str, Any]] = None  # the ONNX export's checks, or {error}
    executed_by: Optional[dict[str, Any]] = None  # host, pid and threads of the process that built it
    timing: Optional[dict[str, float]] = None
    measured_on: Optional[str] = None  # the device's work pool, when a device worker measured the latency
    device_onnx: Optional[Any] = None

    @model_validator(mode="before")
    @classmethod
    def _derived(cls, data: Any) -> Any:
        # `err` is computed from pred and meas: a dumped result validates again without it
        return {k: v for k, v in data.items() if k != "err"} if isinstance(data, dict) else data

    @computed_field  # type: ignore[prop-decorator]
    @property
    def err(self) -> dict[str, float]:
        """Relative error of each measured prediction (search.results.errors)."""
        return errors(self.pred, self.meas)

    def dump(self) -> dict[str, Any]:
        return self.model_dump()
