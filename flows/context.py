"""What every step of one flow run shares, typed: the run's inputs as the flow received them, resolved once (the
hardware as the estimators take it, the export forms, whether latency is measured on the device), and the run's
identity (its Prefect flow run, its folder). The steps take this instead of a dozen loose arguments."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from search.requirements import Requirements
from tasks.onnx_runtime import RUNTIMES
from tasks.pipeline import ModelInput, ParallelOptions, SearchOptions

Runtime = Literal[RUNTIMES]  # type: ignore[valid-type]


class RunContext(BaseModel):
    """One flow run of `deployfit-plan` or `deployfit-run`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    flow: Literal["plan", "run"]
    model: ModelInput
    data: Optional[str]
    hardware: str = Field(description="a profile name or a profile YAML path (flows.pipeline.hardware_spec)")
    requirements: Requirements
    search: SearchOptions
    top_k: int
    anchor: bool = True
    runtime: Runtime = "pytorch"
    out_dir: str
    workdir: Path = Field(description="this run's own folder under out_dir: its report and tracking fallback")
    flow_run_id: str = ""
    run_name: str = ""
    started: float = Field(description="time.perf_counter() when the flow started")
    # `run` only
    execute: bool = False
    export: tuple[str, ...] = ("pt2",)
    parallel: ParallelOptions = ParallelOptions()
    device_measure: bool = Field(default=False, description="latency measured on the device through its work pool")
    device_timeout_s: float = 600.0
    register_as: Optional[str] = None
    profile: Optional[str] = Field(default=None, description="a profile calibrated on the device for this run: "
                                   "planned with in place of the stored `hardware` one")

    @property
    def batch_size(self) -> int:
        return self.requirements.batch_size

    @property
    def plan_hardware(self) -> str:
        """The profile the plan predicts with."""
        return self.profile or self.hardware

    def record(self) -> dict[str, Any]:
        """What the tracking store records of the run (flows.mlflow_logger: params and tags)."""
        out: dict[str, Any] = {"flow": self.flow, "flow_run_id": self.flow_run_id, "run_name": self.run_name,
                               "model": self.model.spec, "hardware": self.hardware, "runtime": self.runtime,
                               "data": self.data, "requirements": self.requirements.model_dump(exclude_none=True),
                               "search": self.search.model_dump()}
        if self.flow == "run":
            out.update(register=self.register_as or None, export=list(self.export),
                       parallel={"workers": self.parallel.workers, "dask_address": self.parallel.address() or "",
                                 "threads": self.parallel.threads_per_candidate()})
        return out
