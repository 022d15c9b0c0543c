"""Training and evaluation: accuracy on validation data, fine-tuning, knowledge distillation.

`kd_loss` is Hinton et al.'s: alpha x T^2 x KL(softmax(teacher/T) || softmax(student/T)) plus
(1 - alpha) x cross-entropy on the hard labels. `train` runs SGD with momentum and a cosine schedule for
a number of epochs, distilling from a teacher when one is given, and reports every epoch's loss and
validation accuracy through `progress`.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from estimators.data import accuracy  # noqa: F401  (the one top-1 accuracy; re-exported for tasks)
from estimators.defaults import FINETUNE_EPOCHS
from estimators.progress import step

Progress = Callable[[str], None]


@dataclass
class TrainConfig:
    epochs: int = FINETUNE_EPOCHS  # the budget of every step that trains (fine-tuning after pruning, KD of a student)
    lr: float = 0.05
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the soft (teacher) term
    kd_finetune: bool = False  # distil from the original model when fine-tuning after pruning
    seed: int = 0


@dataclass
class TrainResult:
    epochs: int
    seconds: float
    history: list[dict] = field(default_factory=list)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float = 4.0, alpha: float = 0.7) -> torch.Tensor:
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, 1), F.log_softmax(teacher_logits / t, 1), reduction="batchmean",
                    log_target=True) * (t * t)
    hard = F.cross_entropy(student_logits, labels)
    return alpha * soft + (1.0 - alpha) * hard


def train(model: nn.Module, train_loader: Iterable, val_loader: Iterable | None, cfg: TrainConfig,
          teacher: nn.Module | None = None, progress: Progress = lambda m: None, label: str = "train") -> TrainResult:
    """Train `model` in place for cfg.epochs (distilling from `teacher` when given)."""
    t0 = time.perf_counter()
    res = TrainResult(cfg.epochs, 0.0)
    if cfg.epochs <= 0:
        return res
    torch.manual_seed(cfg.seed)
    gen = getattr(train_loader, "generator", None)
    if isinstance(gen, torch.Generator):  # the shuffling order follows the seed too
        gen.manual_seed(cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = cfg.epochs * max(1, len(train_loader)) if hasattr(train_loader, "__len__") else None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps) if steps else None
    if teacher is not None:
        teacher = teacher.eval()
    # the batches as a bar on a terminal (lines elsewhere only where an epoch runs longer than a few seconds)
    counted = step(progress, label, steps, "batches") if steps else None
    try:
        for epoch in range(cfg.epochs):
            model.train()
            total, n = 0.0, 0
            for i, (x, y) in enumerate(train_loader):
                out = model(x)
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher(x)
                    loss = kd_loss(out, t_out, y, cfg.temperature, cfg.alpha)
                else:
                    loss = F.cross_entropy(out, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                total += float(loss.detach()) * len(y)
                n += len(y)
                if counted is not None:
                    counted.update(epoch * max(1, len(train_loader)) + i + 1, f"epoch {epoch + 1} of {cfg.epochs}")
            rec = {"epoch": epoch + 1, "loss": round(total / max(n, 1), 4)}
            if val_loader is not None:
                rec["accuracy"] = round(accuracy(model, val_loader), 2)
            res.history.append(rec)
            progress(f"{label}: epoch {epoch + 1}/{cfg.epochs}, loss {rec['loss']:.4f}"
                     + (f", val accuracy {rec['accuracy']:.2f}%" if "accuracy" in rec else ""))
    finally:
        if counted is not None:
            counted.finish(line=False)  # the epochs' lines say what it did (or the error)
    model.eval()
    res.seconds = time.perf_counter() - t0
    return res


def frozen_copy(model: nn.Module) -> nn.Module:
    """A teacher: an eval-mode copy with gradients off."""
    t = copy.deepcopy(model).eval()
    for p in t.parameters():
        p.requires_grad_(False)
    return t
