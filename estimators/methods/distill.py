"""Distillation: the step, its string form, its estimate and its executor (the student built, then trained by
knowledge distillation from the original model when there are data).

    distill:width:F        the teacher at width F: every followed channel group keeps int(L * F) channels
    distill:MODEL_SPEC     another model (a torchvision name, a file, a demo net)
"""
from __future__ import annotations

import copy
from typing import Literal

from pydantic import Field, field_validator

from ..table import LayerTable
from .base import Method, StepModel
from .prune import PruneStep, estimate as estimate_prune, prune_module

FORMS = "distill:width:F, distill:MODEL_SPEC"


class DistillStep(StepModel):
    method: Literal["distill"] = "distill"
    student: str = Field(description="width:F (the teacher at width F) or a model spec")

    @field_validator("student")
    @classmethod
    def _student(cls, v: str):
        if v.startswith("width:"):
            try:
                f = float(v[6:])
            except ValueError:
                raise ValueError(f"bad width multiplier in {v!r}") from None
            if not 0.0 < f <= 1.0:
                raise ValueError(f"width multiplier {f} is outside (0, 1]")
        return v

    @property
    def width(self) -> float | None:
        return float(self.student[6:]) if self.student.startswith("width:") else None

    def compact(self) -> str:
        return f"distill:{self.student}"


def parse(rest: str, tok: str) -> dict:
    return {"method": "distill", "student": rest}


def _width_prune(step: DistillStep) -> PruneStep:
    # the teacher at width F is exactly torch-pruning's uniform arithmetic at ratio 1 - F
    return PruneStep(ratio=round(1.0 - step.width, 12), scope="uniform")


def estimate(table: LayerTable, step: DistillStep) -> LayerTable:
    if step.width is not None:
        out = estimate_prune(table, _width_prune(step))
        out.state.steps[-1] = step.model_dump()
        return out
    from ..analyze import analyze
    from ..modelspec import format_input_shape, load_model

    student = analyze(load_model(step.student, input_shape=format_input_shape(table.input_shape)))
    s = student.state.copy()
    s.steps = list(table.state.steps) + [step.model_dump()]
    return student.with_state(s)


def execute(work, step: DistillStep):
    if step.width is not None:
        import torch

        prune_module(work, _width_prune(step))
        torch.manual_seed(0)
        for m in work.model.modules():
            if hasattr(m, "reset_parameters") and m is not work.model:
                m.reset_parameters()
        work.log.append(f"student: the teacher at width {step.width:g}, re-initialised")
        return _train_student(work, f"distill to width {step.width:g}")
    from ..analyze import analyze
    from ..modelspec import format_input_shape, load_model

    shape = format_input_shape(work.loaded.input_shape)
    student = load_model(step.student, input_shape=shape, trust_pickle=work.loaded.trust_pickle)
    work.loaded = student
    work.model = copy.deepcopy(student.model)
    work.table = analyze(student)
    work.log.append(f"student: {step.student}")
    return _train_student(work, f"distill to {step.student}")


def _train_student(work, label: str):
    """Knowledge distillation from the original model when there are data; else say the student is untrained."""
    if work.trains():
        work.fit(label, work.teacher)
    else:
        work.log.append("the student is untrained: give --data to train it by knowledge distillation")
    return work


METHOD = Method(name="distill", step=DistillStep, forms=FORMS, parse=parse, estimate=estimate, execute=execute)
