"""Deployment requirements: the limits a strategy must meet (CLI flags or a requirements.yaml)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from estimators.errors import UserInputError, read_yaml_mapping

if TYPE_CHECKING:
    from .results import CandidateResult, PlanReport

# requirement -> (predicted metric it limits, "max" or "min", unit factor from the requirement to the metric)
LIMITS = {
    "max_latency_ms": ("latency_ms", "max", 1.0),
    "max_size_mb": ("size_bytes", "max", 1e6),
    "max_params": ("params", "max", 1.0),
    "max_macs": ("macs", "max", 1.0),
    "max_memory_mb": ("peak_memory_bytes", "max", 1e6),
    "max_accuracy_drop": ("accuracy_drop", "max", 1.0),
}


class Requirements(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a NaN or infinite limit is no limit: refused

    max_latency_ms: Optional[float] = Field(default=None, gt=0, title="Max latency (ms)",
                                            description="per batch on the hardware, in milliseconds")
    max_size_mb: Optional[float] = Field(default=None, gt=0, title="Max size (MB)",
                                         description="bytes the deployed artifact stores, in megabytes (10^6 bytes)")
    max_params: Optional[int] = Field(default=None, gt=0, title="Max parameters",
                                      description="parameter count (weights, biases), e.g. 1000000")
    max_macs: Optional[int] = Field(default=None, gt=0, title="Max MACs",
                                    description="multiply-accumulates per input, e.g. 500000000 (0.5 GMACs)")
    max_memory_mb: Optional[float] = Field(default=None, gt=0, title="Max peak memory (MB)",
                                           description="peak memory of one inference, in megabytes (10^6 bytes)")
    max_accuracy_drop: Optional[float] = Field(default=None, ge=0, title="Max accuracy drop (points)",
                                               description="top-1 accuracy lost, in percentage points (needs data "
                                               "for a measured accuracy; else a sensitivity proxy)")
    min_accuracy: Optional[float] = Field(default=None, gt=0, le=100, title="Min accuracy (%)",
                                          description="top-1 accuracy on the data's validation split, in percent "
                                          "(not with max accuracy drop)")
    batch_size: int = Field(default=1, ge=1, title="Batch size",
                            description="inputs per inference: latency and memory are for a batch of this size")

    @model_validator(mode="after")
    def _one_accuracy_form(self):
        if self.max_accuracy_drop is not None and self.min_accuracy is not None:
            raise ValueError("give max_accuracy_drop or min_accuracy, not both")
        return self

    def active(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in LIMITS if getattr(self, k) is not None}

    def resolve_accuracy(self, base_accuracy: float | None) -> "Requirements":
        """min_accuracy as a max_accuracy_drop against the model's own accuracy (an error if above it)."""
        if self.min_accuracy is None:
            return self
        if base_accuracy is None:
            raise UserInputError("min_accuracy needs --data: the model's accuracy is measured on it")
        if self.min_accuracy > base_accuracy:
            raise UserInputError(f"min_accuracy {self.min_accuracy:g}% is above the model's own accuracy "
                                 f"{base_accuracy:.2f}%: no compression can reach it")
        return self.model_copy(update={"min_accuracy": None, "max_accuracy_drop": base_accuracy - self.min_accuracy})


def parse_requirements(values: dict, path: str | None = None) -> Requirements:
    """Flags (None = not given) over the fields of an optional requirements.yaml."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserInputError(f"requirements file {path} does not exist")
        data.update(read_yaml_mapping(p, f"requirements file {path}", empty_ok=True))
    data.update({k: v for k, v in values.items() if v is not None})
    try:
        return Requirements.model_validate(data)
    except ValidationError as exc:
        msgs = [f"{'.'.join(str(x) for x in e['loc']) or 'requirements'}: {e['msg']}" for e in exc.errors()]
        raise UserInputError("invalid requirements: " + "; ".join(msgs)) from None


def broken_as_measured(meas, req: Requirements) -> list[str]:
    """The requirements a measured candidate breaks (`meas`: a search.results.Measurement or its JSON; a metric
    the measurement lacks counts as broken)."""
    broken = []
    for name, limit in req.active().items():
        metric, _, unit = LIMITS[name]
        v = meas.get(metric)
        if v is None or v > limit * unit + 1e-9:
            broken.append(name)
    return broken


def settle_infeasible(rep: "PlanReport", executed: "list[CandidateResult]") -> "PlanReport":
    """The plan report `rep` settled by the executed candidates' measurements (a new report; `rep` is left as it
    is). A plan infeasible by predicted accuracy executed the candidates that meet every other requirement
    (`verify`): the one of them that meets every requirement as measured, with the least measured accuracy drop,
    becomes the recommendation (the prediction's verdict moves to `predicted_infeasible`); else the message says
    the measurements confirm it. Any other report is returned as it is."""
    if rep.recommended or not rep.verify or not executed or rep.infeasible is None:
        return rep
    req = Requirements(**rep.requirements)
    ok = [e for e in executed if not broken_as_measured(e.meas, req)]
    if not ok:
        msg = f"{rep.infeasible.message}; executed, none of the {len(executed)} meets every requirement as measured"
        return rep.model_copy(update={"infeasible": rep.infeasible.model_copy(update={"message": msg, "verified": True})})
    best = min(ok, key=lambda e: e.meas.get("accuracy_drop", 0.0))
    planned = next(r for r in rep.verify if r.compact == best.compact)
    msg = (f"{rep.infeasible.message}; executed, {best.label} meets every requirement as measured (accuracy drop "
           f"{best.meas.get('accuracy_drop', 0.0):+.2f} points)")
    return rep.model_copy(update={
        "recommended": planned.model_copy(update={"by": "measurement", "meas": best.meas}), "binding": [],
        "infeasible": None, "predicted_infeasible": rep.infeasible.model_copy(update={"message": msg})})
