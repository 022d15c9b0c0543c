"""Compression strategies: an ordered list of steps, as JSON or as a compact string.

    {"steps": [{"method": "prune", "ratio": 0.5, "scope": "global"}, {"method": "quantize", "dtype": "int8"}]}
    prune:0.5:global,quantize:int8          distill:width:0.5          distill:torchvision:resnet18          none

A prune token takes optional `:uniform`/`:global`, `:round_to=N` and per-layer ratios
`:layers=NAME=R+NAME=R` (module names; `prune:layers=...` prunes only the named layers' groups). Each method's
step, grammar and parser live in its module (estimators.methods); this module composes them.
"""
from __future__ import annotations

import json
from typing import Annotated, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import UserInputError
from .methods import METHODS
from .methods.distill import DistillStep
from .methods.prune import PruneStep
from .methods.quantize import SINGLE_INPUT_DTYPES, QuantizeStep

__all__ = ["DistillStep", "PruneStep", "QuantizeStep", "Step", "Strategy", "STRATEGY_FORMS", "check_executable",
           "parse_strategy"]

STRATEGY_FORMS = (
    "strategy forms: JSON {\"steps\": [{\"method\": \"prune\", \"ratio\": 0.5, \"scope\": \"uniform\"}, "
    "{\"method\": \"quantize\", \"dtype\": \"int8\"}]} or a compact string such as prune:0.5,quantize:int8 "
    f"({', '.join(m.forms for m in METHODS.values())}, none)"
)

Step = Annotated[Union[tuple(m.step for m in METHODS.values())], Field(discriminator="method")]  # type: ignore[misc]


class Strategy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: list[Step] = Field(default_factory=list)

    def compact(self) -> str:
        return ",".join(s.compact() for s in self.steps) or "none"

    def label(self) -> str:
        """A short form for tables: per-layer ratio lists summarised (compact() spells them out)."""
        return ",".join(s.label() for s in self.steps) or "none"


def _parse_token(tok: str) -> dict:
    name, _, rest = tok.partition(":")
    method = METHODS.get(name.strip())
    if method is None:
        raise UserInputError(f"unknown compression method {name.strip()!r}; methods are {', '.join(METHODS)}; "
                             f"{STRATEGY_FORMS}")
    try:
        return method.parse(rest, tok)
    except UserInputError as exc:
        raise UserInputError(f"{exc}; {STRATEGY_FORMS}") from None


def parse_strategy(text: "str | dict | Strategy | None") -> Strategy:
    if isinstance(text, Strategy):
        return text
    try:
        if text is None:
            return Strategy()
        if isinstance(text, dict):
            return Strategy.model_validate(text)
        t = text.strip()
        if t.startswith("{"):
            try:
                data = json.loads(t)
            except json.JSONDecodeError as exc:
                raise UserInputError(f"strategy is not valid JSON: {exc}; {STRATEGY_FORMS}") from None
            return Strategy.model_validate(data)
        if t in ("", "none"):
            return Strategy()
        return Strategy.model_validate({"steps": [_parse_token(tok) for tok in t.split(",") if tok.strip()]})
    except ValidationError as exc:
        msgs = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e["loc"])
            msgs.append(f"{loc}: {e['msg']}")
        raise UserInputError(f"bad strategy: {'; '.join(msgs)}; {STRATEGY_FORMS}") from None


def check_executable(strategy: Strategy, has_data: bool, modules: "set[str] | None" = None, inputs: int = 1) -> None:
    """Refuse (UserInputError) what apply cannot execute, before any work: estimate, apply and the flows all
    check here, so a strategy is never predicted that apply would refuse. At most one quantize step, and it
    last (torch-pruning and distillation work on float models); accuracy-aware autotune (tolerable_loss) needs
    data to measure accuracy on; a model of several `inputs` is not quantized to SINGLE_INPUT_DTYPES; per-layer
    ratios name modules of the model (`modules`, when given) unless a distillation step before them changes the
    model."""
    q = [i for i, s in enumerate(strategy.steps) if s.method == "quantize"]
    if len(q) > 1:
        raise UserInputError("at most one quantize step can be executed")
    if q and q[0] != len(strategy.steps) - 1:
        raise UserInputError("quantize must be the last step to execute: torch-pruning and distillation work on "
                             "float models")
    if not has_data and any(s.method == "quantize" and s.tolerable_loss is not None for s in strategy.steps):
        raise UserInputError("tolerable_loss (accuracy-aware autotune) needs --data to measure accuracy on")
    if inputs > 1 and any(s.method == "quantize" and s.dtype in SINGLE_INPUT_DTYPES for s in strategy.steps):
        raise UserInputError(f"the model takes {inputs} inputs, and static INT8 quantization is executed for models "
                             "of one input only (its calibration feeds one tensor); quantize to int8-weight-only, "
                             "fp16 or bf16 instead")
    if modules is None:
        return
    for step in strategy.steps:
        if step.method == "distill":
            return
        if step.method == "prune" and step.layers:
            missing = [n for n in step.layers if n not in modules]
            if missing:
                raise UserInputError(f"per-layer ratios name modules the model lacks: {', '.join(missing)}")
