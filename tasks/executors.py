"""Execution: a strategy really done on a copy of the model, step by step, each by its method's executor
(estimators.methods: prune, quantize, distill), then exported and saved.

`Work` carries the model through the steps and gives the executors the services of this layer: training
(`fit`, tasks.train), Intel Neural Compressor (`quantize`, tasks.quantize_exec) and accuracy on the validation
data (`accuracy`).
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from estimators.analyze import analyze
from estimators.errors import UserInputError
from estimators.methods import METHODS
from estimators.modelspec import LoadedModel, as_inputs
from estimators.strategy import Strategy, check_executable
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

    def quantize(self, example, dtype: str, **kw):
        """tasks.quantize_exec.quantize on the current model: a QuantResult (the program, layers kept float)."""
        from .quantize_exec import quantize

        return quantize(self.model, example, dtype, **kw)

    def accuracy(self, model: nn.Module) -> float:
        """Top-1 accuracy of `model` on the validation data, as a fraction (autotune's evaluation)."""
        from .train import accuracy

        return accuracy(model, self.data.val, set_eval=False) / 100.0

    def example(self, batch: int | None = None):
        """The seeded example: a tensor, or the tuple of a model's several inputs (fed positionally)."""
        return self.loaded.example_input(batch)


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
        method = METHODS.get(step.method)
        if method is None:
            raise UserInputError(f"no executor for method {step.method!r}")
        work = method.execute(work, step)
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
