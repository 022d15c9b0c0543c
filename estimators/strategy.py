"""Compression strategies: an ordered list of steps, as JSON or as a compact string.

    {"steps": [{"method": "prune", "ratio": 0.5, "scope": "global"}, {"method": "quantize", "dtype": "int8"}]}
    prune:0.5:global,quantize:int8          distill:width:0.5          distill:torchvision:resnet18          none

A prune token takes optional `:uniform`/`:global`, `:round_to=N` and per-layer ratios
`:layers=NAME=R+NAME=R` (module names; `prune:layers=...` prunes only the named layers' groups).
"""
from __future__ import annotations

import json
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import UserInputError

QUANT_DTYPES = ("int8", "int8-weight-only", "fp16", "bf16")
STRATEGY_FORMS = (
    "strategy forms: JSON {\"steps\": [{\"method\": \"prune\", \"ratio\": 0.5, \"scope\": \"uniform\"}, "
    "{\"method\": \"quantize\", \"dtype\": \"int8\"}]} or a compact string such as prune:0.5,quantize:int8 "
    "(prune:RATIO[:uniform|:global][:round_to=N][:layers=NAME=R+NAME=R], quantize:int8|int8-weight-only|fp16|bf16"
    "[:keep_float=LAYER+LAYER][:tolerable_loss=0.01], distill:width:F, "
    "distill:MODEL_SPEC, none)"
)


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PruneStep(_Step):
    method: Literal["prune"] = "prune"
    ratio: float = Field(ge=0.0, lt=1.0, description="share of channels removed per group (uniform) or overall (global)")
    scope: Literal["uniform", "global"] = "uniform"
    round_to: int | None = Field(default=None, ge=1, description="keep channel counts multiples of this")
    layers: dict[str, float] | None = Field(default=None, description="per-layer ratios (module name -> ratio), uniform scope")

    @field_validator("layers")
    @classmethod
    def _layers(cls, v):
        if v:
            for k, r in v.items():
                if not 0.0 <= r < 1.0:
                    raise ValueError(f"ratio {r} for layer {k!r} is outside [0, 1)")
        return v

    def compact(self) -> str:
        s = "prune" if self.layers and self.ratio == 0 else f"prune:{self.ratio:g}"
        if self.scope != "uniform":
            s += f":{self.scope}"
        if self.round_to:
            s += f":round_to={self.round_to}"
        if self.layers:
            s += ":layers=" + "+".join(f"{k}={v:g}" for k, v in self.layers.items())
        return s

    def label(self) -> str:
        """compact(), with a per-layer list summarised (for tables and messages)."""
        if not self.layers:
            return self.compact()
        rs = list(self.layers.values())
        base = f"prune:{self.ratio:g}" if self.ratio else "prune"
        return f"{base}:per-layer({len(rs)} layers, {min(rs):g}-{max(rs):g})"


class QuantizeStep(_Step):
    method: Literal["quantize"] = "quantize"
    dtype: Literal["int8", "int8-weight-only", "fp16", "bf16"]
    keep_float: list[str] = Field(default_factory=list, description="int8: conv/linear modules left in float")
    tolerable_loss: Optional[float] = Field(default=None, ge=0.0, le=1.0, description=(
        "int8 with data: Intel Neural Compressor's accuracy-aware autotune, relative accuracy loss allowed "
        "(0.01 = 1%); layers it falls back to float are reported and re-estimated"))

    def compact(self) -> str:
        out = f"quantize:{self.dtype}"
        if self.keep_float:
            out += ":keep_float=" + "+".join(self.keep_float)
        if self.tolerable_loss is not None:
            out += f":tolerable_loss={self.tolerable_loss:g}"
        return out


class DistillStep(_Step):
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


Step = Annotated[Union[PruneStep, QuantizeStep, DistillStep], Field(discriminator="method")]


class Strategy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: list[Step] = Field(default_factory=list)

    def compact(self) -> str:
        return ",".join(s.compact() for s in self.steps) or "none"

    def label(self) -> str:
        """A short form for tables: per-layer ratio lists summarised (compact() spells them out)."""
        return ",".join(s.label() if isinstance(s, PruneStep) else s.compact() for s in self.steps) or "none"


def _parse_token(tok: str) -> dict:
    method, _, rest = tok.partition(":")
    method = method.strip()
    if method == "prune":
        parts = [p for p in rest.split(":") if p]
        if not parts:
            raise UserInputError(f"prune needs a ratio, e.g. prune:0.5; {STRATEGY_FORMS}")
        if parts[0].startswith(("layers=", "round_to=")) and any(x.startswith("layers=") for x in parts):
            parts.insert(0, "0")  # per-layer ratios only: groups not named are not pruned
        try:
            step: dict = {"method": "prune", "ratio": float(parts[0])}
        except ValueError:
            raise UserInputError(f"bad prune ratio {parts[0]!r}; {STRATEGY_FORMS}") from None
        for p in parts[1:]:
            if p.startswith("layers="):
                layers = {}
                for item in p[len("layers="):].split("+"):
                    name, eq, val = item.rpartition("=")
                    try:
                        layers[name] = float(val)
                    except ValueError:
                        name = ""
                    if not eq or not name:
                        raise UserInputError(f"bad per-layer ratio {item!r} in {tok!r}: use layers=NAME=RATIO+NAME=RATIO; "
                                             f"{STRATEGY_FORMS}") from None
                step["layers"] = layers
            elif p in ("uniform", "global"):
                step["scope"] = p
            elif p.startswith("round_to="):
                try:
                    step["round_to"] = int(p.split("=", 1)[1])
                except ValueError:
                    raise UserInputError(f"bad round_to in {tok!r}; {STRATEGY_FORMS}") from None
            else:
                raise UserInputError(f"unknown prune option {p!r} in {tok!r}; {STRATEGY_FORMS}")
        return step
    if method == "quantize":
        dtype, *opts = rest.split(":")
        step = {"method": "quantize", "dtype": dtype}
        for p in opts:
            key, _, val = p.partition("=")
            if key == "keep_float" and val:
                step["keep_float"] = [v for v in val.split("+") if v]
            elif key == "tolerable_loss" and val:
                try:
                    step["tolerable_loss"] = float(val)
                except ValueError:
                    raise UserInputError(f"bad tolerable_loss in {tok!r}; {STRATEGY_FORMS}") from None
            else:
                raise UserInputError(f"unknown quantize option {p!r} in {tok!r}; {STRATEGY_FORMS}")
        return step
    if method == "distill":
        return {"method": "distill", "student": rest}
    raise UserInputError(f"unknown compression method {method!r}; methods are prune, quantize, distill; {STRATEGY_FORMS}")


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
            loc = ".".join(str(x) for x in e["loc"] if not isinstance(x, int) or True)
            msgs.append(f"{loc}: {e['msg']}")
        raise UserInputError(f"bad strategy: {'; '.join(msgs)}; {STRATEGY_FORMS}") from None


# dtypes whose executor takes a model of one input only: static INT8 (Intel Neural Compressor's PT2E path)
# calibrates on batches of one tensor
SINGLE_INPUT_DTYPES = ("int8",)


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
