"""Executors: really compress a model, step by step, as the estimators predict.

    prune     torch-pruning's MetaPruner with the plan's ignored layers (classifier, groups not followed);
              with data, fine-tuned for the training budget (optionally distilling from the original)
    distill   builds the student: width:F is the teacher pruned uniformly to width F and re-initialised,
              or a model spec; with data, trained by knowledge distillation from the original model
    quantize  Intel Neural Compressor 3.x (see quantize_exec), calibrated on the data's training batches
              when there are data; must be the last step
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
from estimators.modelspec import LoadedModel, as_inputs, format_input_shape, load_model
from estimators.plugins import Registry
from estimators.pruning import build_pruner
from estimators.strategy import DistillStep, PruneStep, QuantizeStep, Strategy, check_executable
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
    data: Any = None  # estimators.data.LoadedData when the strategy is executed with data
    train_cfg: Any = None  # tasks.train.TrainConfig
    teacher: nn.Module | None = None  # the original model, frozen
    progress: Callable[[str], None] = lambda m: None
    training: list[dict] = field(default_factory=list)  # what each training step did
    calibration: list = field(default_factory=list)  # the batches the quantizer calibrated on (the ONNX export's too)

    def trains(self) -> bool:
        return self.data is not None and self.train_cfg is not None and self.train_cfg.epochs > 0

    def fit(self, label: str, teacher: nn.Module | None) -> None:
        from .train import train

        res = train(self.model, self.data.train, self.data.val, self.train_cfg, teacher=teacher, progress=self.progress,
                    label=label)
        self.training.append({"step": label, "epochs": res.epochs, "seconds": round(res.seconds, 2),
                              "distilled": teacher is not None, "history": res.history})
        self.log.append(f"{label}: {res.epochs} epochs in {res.seconds:.1f} s"
                        + (f", val accuracy {res.history[-1]['accuracy']:.2f}%" if res.history else ""))

    def example(self, batch: int | None = None):
        """The seeded example: a tensor, or the tuple of a model's several inputs (fed positionally)."""
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
    if work.trains():
        work.fit(f"fine-tune after {step.compact()}", work.teacher if work.train_cfg.kd_finetune else None)
    return work


@register_executor("distill")
def execute_distill(work: Work, step: DistillStep) -> Work:
    if step.width is not None:
        _prune_module(work, PruneStep(ratio=round(1.0 - step.width, 12), scope="uniform"))
        torch.manual_seed(0)
        for m in work.model.modules():
            if hasattr(m, "reset_parameters") and m is not work.model:
                m.reset_parameters()
        work.log.append(f"student: the teacher at width {step.width:g}, re-initialised")
        return _train_student(work, f"distill to width {step.width:g}")
    shape = format_input_shape(work.loaded.input_shape)
    student = load_model(step.student, input_shape=shape, trust_pickle=work.loaded.trust_pickle)
    work.loaded = student
    work.model = copy.deepcopy(student.model)
    work.table = analyze(student)
    work.log.append(f"student: {step.student}")
    return _train_student(work, f"distill to {step.student}")


def _train_student(work: Work, label: str) -> Work:
    """Knowledge distillation from the original model when there are data; else say the student is untrained."""
    if work.trains():
        work.fit(label, work.teacher)
    else:
        work.log.append("the student is untrained: give --data to train it by knowledge distillation")
    return work


@register_executor("quantize")
def execute_quantize(work: Work, step: QuantizeStep) -> Work:
    from .quantize_exec import quantize

    t0 = time.perf_counter()
    if work.data is not None:
        calib = work.data.calibration_batches(4)
        source = f"{sum(len(c) for c in calib)} training inputs of {work.data.spec}"
    else:
        calib = [work.example(2)]
        if work.loaded.n_inputs == 1:  # only static INT8 calibrates, and it takes models of one input
            calib += [torch.randn_like(work.example(2)) for _ in range(3)]
        source = "random inputs (no data given)"
    eval_fn = None
    if step.tolerable_loss is not None:  # with data: run_strategy's check_executable
        from .train import accuracy

        def eval_fn(m):
            return accuracy(m, work.data.val, set_eval=False) / 100.0

    work.calibration = calib
    work.quant = quantize(work.model, calib[0], step.dtype, calib_batches=calib, keep_float=step.keep_float,
                          tolerable_loss=step.tolerable_loss, eval_fn=eval_fn)
    work.log.append(f"calibrated on {source}")
    if step.dtype == "int8" and work.quant.float_layers:
        work.log.append(f"kept in float: {', '.join(work.quant.float_layers)}"
                        + (" (chosen by autotune)" if step.tolerable_loss is not None else ""))
    work.program = work.quant.program
    work.log.append(f"quantized to {step.dtype} in {time.perf_counter() - t0:.1f} s")
    return work


def export_program(model: nn.Module, example):
    """torch.export with a dynamic batch dimension (example batch of 2). `example`: a tensor, or the tuple of a
    model's several inputs, exported as positional arguments that share the one dynamic batch (every input's
    first dimension)."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    xs = tuple(x if x.shape[0] >= 2 else x.expand(2, *x.shape[1:]).contiguous() for x in as_inputs(example))
    with torch.no_grad():
        return torch.export.export(model.eval(), xs, dynamic_shapes=tuple({0: batch} for _ in xs))


def run_strategy(loaded: LoadedModel, strategy: Strategy, export: bool = True, data: Any = None, train_cfg: Any = None,
                 progress: Callable[[str], None] = lambda m: None) -> Work:
    """Execute every step on a copy of the model; export the result unless told not to. With `data`, the
    steps that train (fine-tuning after pruning, distillation) train for `train_cfg.epochs`."""
    check_executable(strategy, data is not None, {n for n, _ in loaded.model.named_modules()}, loaded.n_inputs)
    work = Work(loaded=loaded, model=copy.deepcopy(loaded.model).eval(), table=analyze(loaded), data=data,
                train_cfg=train_cfg, progress=progress)
    if data is not None:
        from .train import frozen_copy

        work.teacher = frozen_copy(loaded.model)
    for step in strategy.steps:
        fn = EXECUTORS.get(step.method)
        if fn is None:
            raise UserInputError(f"no executor for method {step.method!r}")
        work = fn(work, step)
        work.model.eval()
    if work.program is None and export:
        work.program = export_program(work.model, work.example(2))
    return work


def check_out_dir(out_dir: str | Path) -> Path:
    """The folder artifacts go to, made and proved writable before any work (a bad --out is found in a second,
    not after the compression ran): an error where it names a file or cannot be written."""
    import tempfile

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out_dir} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise UserInputError(f"--out {out_dir} cannot be written: {exc.strerror or exc}") from None
    return out


def save_artifact(work: Work, strategy: Strategy, out_dir: str | Path) -> dict[str, str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "model.pt2"
    torch.export.save(work.program, str(model_path))
    (out / "strategy.json").write_text(json.dumps({"model": work.loaded.spec, "strategy": strategy.model_dump(exclude_none=True),
                                                   "compact": strategy.compact(), "log": work.log}, indent=2) + "\n")
    return {"model": str(model_path), "strategy": str(out / "strategy.json")}
