"""Executors: really compress a model, step by step, as the estimators predict.

    prune     torch-pruning's MetaPruner with the plan's ignored layers (classifier, groups not followed)
    distill   builds the student: width:F is the teacher pruned uniformly to width F and re-initialised
              (training it by knowledge distillation comes with the data pipeline), or a model spec
    quantize  Intel Neural Compressor 3.x (see quantize_exec); must be the last step
"""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from estimators.analyze import analyze
from estimators.errors import UserInputError
from estimators.modelspec import LoadedModel, load_model
from estimators.plugins import Registry
from estimators.pruning import build_pruner
from estimators.strategy import DistillStep, PruneStep, QuantizeStep, Strategy
from estimators.table import LayerTable

log = logging.getLogger(__name__)


@dataclass
class Work:
    """The model being compressed and what the executors need to know about it."""

    loaded: LoadedModel
    model: nn.Module
    table: LayerTable  # the analysis of the model the next step starts from
    program: Any = None  # torch.export.ExportedProgram once quantized
    quant: Any = None
    log: list[str] = field(default_factory=list)

    def example(self, batch: int | None = None) -> torch.Tensor:
        return self.loaded.example_input(batch)


Executor = Callable[[Work, Any], Work]
EXECUTORS = Registry("executor")  # compression method -> executor
register_executor = EXECUTORS.register


def _prune_module(work: Work, step: PruneStep) -> None:
    plan = work.table.plan
    if plan.error:
        work.log.append(f"prune: nothing pruned ({plan.error})")
        return
    pruner = build_pruner(work.model, work.example(), plan.classifier + plan.ignored_roots, ratio=step.ratio,
                          global_pruning=step.scope == "global", round_to=step.round_to, layer_ratios=step.layers)
    with torch.no_grad():
        pruner.step()


@register_executor("prune")
def execute_prune(work: Work, step: PruneStep) -> Work:
    if step.layers:
        missing = [n for n in step.layers if n not in dict(work.model.named_modules())]
        if missing:
            raise UserInputError(f"per-layer ratios name modules that {work.loaded.spec} lacks: {', '.join(missing)}")
    _prune_module(work, step)
    work.log.append(f"pruned with torch-pruning: {step.compact()}")
    return work


@register_executor("distill")
def execute_distill(work: Work, step: DistillStep) -> Work:
    if step.width is not None:
        _prune_module(work, PruneStep(ratio=round(1.0 - step.width, 12), scope="uniform"))
        torch.manual_seed(0)
        for m in work.model.modules():
            if hasattr(m, "reset_parameters") and m is not work.model:
                m.reset_parameters()
        work.log.append(f"student: the teacher at width {step.width:g}, re-initialised (train it with --data)")
        return work
    shape = ",".join(map(str, work.loaded.input_shape))
    student = load_model(step.student, input_shape=shape)
    work.loaded = student
    work.model = copy.deepcopy(student.model)
    work.table = analyze(student)
    work.log.append(f"student: {step.student}, untrained (train it with --data)")
    return work


@register_executor("quantize")
def execute_quantize(work: Work, step: QuantizeStep) -> Work:
    from .quantize_exec import quantize

    t0 = time.perf_counter()
    calib = [work.example(2)] + [torch.randn_like(work.example(2)) for _ in range(3)]
    work.quant = quantize(work.model, work.example(2), step.dtype, calib_batches=calib)
    work.program = work.quant.program
    work.log.append(f"quantized to {step.dtype} in {time.perf_counter() - t0:.1f} s")
    return work


def check_order(strategy: Strategy) -> None:
    q = [i for i, s in enumerate(strategy.steps) if s.method == "quantize"]
    if len(q) > 1:
        raise UserInputError("at most one quantize step can be executed")
    if q and q[0] != len(strategy.steps) - 1:
        raise UserInputError("quantize must be the last step to execute: torch-pruning and distillation work on float models")


def export_program(model: nn.Module, example: torch.Tensor):
    """torch.export with a dynamic batch dimension (example batch of 2)."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    ex = example if example.shape[0] >= 2 else example.expand(2, *example.shape[1:]).contiguous()
    with torch.no_grad():
        return torch.export.export(model.eval(), (ex,), dynamic_shapes=({0: batch},))


def run_strategy(loaded: LoadedModel, strategy: Strategy, export: bool = True) -> Work:
    """Execute every step on a copy of the model; export the result unless told not to."""
    check_order(strategy)
    work = Work(loaded=loaded, model=copy.deepcopy(loaded.model).eval(), table=analyze(loaded))
    for step in strategy.steps:
        fn = EXECUTORS.get(step.method)
        if fn is None:
            raise UserInputError(f"no executor for method {step.method!r}")
        work = fn(work, step)
        work.model.eval()
    if work.program is None and export:
        work.program = export_program(work.model, work.example(2))
    return work


def save_artifact(work: Work, strategy: Strategy, out_dir: str | Path) -> dict[str, str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "model.pt2"
    torch.export.save(work.program, str(model_path))
    (out / "strategy.json").write_text(json.dumps({"model": work.loaded.spec, "strategy": strategy.model_dump(exclude_none=True),
                                                   "compact": strategy.compact(), "log": work.log}, indent=2) + "\n")
    return {"model": str(model_path), "strategy": str(out / "strategy.json")}
