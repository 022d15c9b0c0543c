"""Quantization: the step, its string form, its estimate (bytes per element and the quantization parameters the
executor stores) and its executor (Intel Neural Compressor 3.x through tasks.quantize_exec, reached as
Work.quantize; calibrated on the data's training batches when there are data; the last step).

    quantize:int8|int8-weight-only|fp16|bf16[:keep_float=LAYER+LAYER][:tolerable_loss=0.01]

The estimate follows what the executor produces (tests/test_quantize_apply.py checks it to the byte on
resnet18, mobilenet_v2 and a tiny CNN):

int8 (static, Intel Neural Compressor 3.x, x86 inductor quantizer)
    every Conv2d and Linear module is quantized (a Conv1d only when a ReLU follows it; Conv3d and
    transposed convs stay float): int8 weight, per output channel an fp32 scale and an int64 zero
    point (12 bytes), bias kept fp32. A BatchNorm fed directly by a conv or linear is folded into
    it (its tensors disappear; the layer gains an fp32 bias if it had none). Other BatchNorms stay
    fp32 without num_batches_tracked. Activation scales are graph scalars (no storage). In the
    deployed (inductor-compiled) form activations are uint8.
int8-weight-only (INC RTN, 8 bits, symmetric, per output channel)
    every Linear except LM heads (names containing lm_head, output_layer, embed_out): int8 weight,
    fp32 scale per output channel, fp32 bias. Convolutions and everything else stay fp32.
fp16 / bf16
    every floating tensor in 2 bytes (BatchNorm stats included); integer buffers unchanged;
    activations in 2 bytes.
"""
from __future__ import annotations

import time
from typing import Literal, Optional

import numpy as np
from pydantic import Field

from ..errors import UserInputError
from ..table import LayerTable
from .base import Method, StepModel

DTYPES = ("int8", "int8-weight-only", "fp16", "bf16")  # every dtype a quantize step may name and the executor runs
# dtypes whose executor takes a model of one input only: static INT8 (Intel Neural Compressor's PT2E path)
# calibrates on batches of one tensor
SINGLE_INPUT_DTYPES = ("int8",)
FORMS = "quantize:int8|int8-weight-only|fp16|bf16[:keep_float=LAYER+LAYER][:tolerable_loss=0.01]"


class QuantizeStep(StepModel):
    method: Literal["quantize"] = "quantize"
    dtype: Literal[DTYPES]  # type: ignore[valid-type]
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


def parse(rest: str, tok: str) -> dict:
    dtype, *opts = rest.split(":")
    step: dict = {"method": "quantize", "dtype": dtype}
    for p in opts:
        key, _, val = p.partition("=")
        if key == "keep_float" and val:
            step["keep_float"] = [v for v in val.split("+") if v]
        elif key == "tolerable_loss" and val:
            try:
                step["tolerable_loss"] = float(val)
            except ValueError:
                raise UserInputError(f"bad tolerable_loss in {tok!r}") from None
        else:
            raise UserInputError(f"unknown quantize option {p!r} in {tok!r}")
    return step


# ----------------------------------------------------------------------------------------------
# estimate

_LM_HEAD = ("lm_head", "output_layer", "embed_out")
_BN = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")
_FOLD_INTO = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Linear")
_RELU = ("ReLU", "relu", "relu_")


def estimate(table: LayerTable, step: QuantizeStep) -> LayerTable:
    s = table.state.copy()
    ops = table.ops
    mod = table.is_module
    if step.dtype in ("fp16", "bf16"):
        s.wbytes[:] = 2.0
        s.bbytes[:] = 2.0
        s.abytes[:] = 2.0
        s.wdtype = [step.dtype] * table.n
        s.xdtype = [step.dtype] * table.n
    elif step.dtype == "int8-weight-only":
        for i in range(table.n):
            if mod[i] and ops[i] == "Linear" and not any(p in table.module_names[i] for p in _LM_HEAD):
                s.wbytes[i] = 1.0
                s.extra_per_cout[i] += 4.0 + (3.0 if table.has_bias[i] else 0.0)  # fp32 scale; bias stays fp32
                s.wdtype[i] = "int8"
    elif step.dtype == "int8":
        keep_float = set(step.keep_float)
        unknown = keep_float - set(table.module_names)
        if unknown:
            raise UserInputError(f"keep_float names layers the model lacks: {', '.join(sorted(unknown))}")
        consumers: dict[int, list[int]] = {}
        for i, src in enumerate(table.src_row):
            if src >= 0:
                consumers.setdefault(int(src), []).append(i)
        folded_into: set[int] = set()
        for i in range(table.n):
            if mod[i] and ops[i] in _BN:
                src = int(table.src_row[i])
                s.fixed_scale[i] = 0.0  # num_batches_tracked is not stored
                if src >= 0 and mod[src] and ops[src] in _FOLD_INTO:
                    s.wscale[i] = 0.0
                    folded_into.add(src)
        for i in range(table.n):
            if not mod[i]:
                continue
            quantized = (ops[i] in ("Conv2d", "Linear") or (
                ops[i] == "Conv1d" and any(ops[c] in _RELU for c in consumers.get(i, [])))) \
                and table.module_names[i] not in keep_float
            if quantized:
                s.wbytes[i] = 1.0
                s.extra_per_cout[i] += 12.0 + (3.0 if table.has_bias[i] else 0.0)
                s.wdtype[i] = "int8"
            if i in folded_into and not table.has_bias[i]:
                s.extra_per_cout[i] += 4.0
        s.abytes[:] = 1.0
        s.xdtype = ["int8"] * table.n
    else:  # pydantic already restricts the dtype
        raise ValueError(step.dtype)
    s.steps.append(step.model_dump())
    return table.with_state(s)


ONNX_QDQ_PER_COUT = 5.0  # ONNX Runtime's QDQ weight: an fp32 scale and an int8 zero point per output channel


def onnx_layout(table: LayerTable) -> LayerTable:
    """The estimated model stored as tasks.onnx_export writes it: the exporter folds every BatchNorm fed directly
    by a convolution or linear layer into it (the layer gains a bias in its dtype if it had none) and stores no
    num_batches_tracked; an INT8 layer stores per output channel an fp32 scale and an int8 zero point (ONNX
    Runtime's QDQ weights) where the INT8 program stores an fp32 scale and an int64 zero point."""
    s = table.state.copy()
    ops = table.ops
    mod = table.is_module
    for i in range(table.n):
        if not (mod[i] and ops[i] in _BN):
            continue
        s.fixed_scale[i] = 0.0
        src = int(table.src_row[i])
        if src >= 0 and mod[src] and ops[src] in _FOLD_INTO and s.wscale[i] != 0.0:
            s.wscale[i] = 0.0
            if not table.has_bias[src]:
                s.extra_per_cout[src] += 4.0 if s.wdtype[src] == "int8" else s.wbytes[src]
    int8 = np.array([d == "int8" for d in s.wdtype]) & any(st.get("dtype") == "int8" for st in s.steps)
    s.extra_per_cout[int8] -= 12.0 - ONNX_QDQ_PER_COUT
    return table.with_state(s)


# ----------------------------------------------------------------------------------------------
# execute


def execute(work, step: QuantizeStep):
    import torch

    t0 = time.perf_counter()
    if work.data is not None:
        calib = work.data.calibration_batches(4)
        source = f"{sum(len(c) for c in calib)} training inputs of {work.data.spec}"
    else:
        calib = [work.example(2)]
        if work.loaded.n_inputs == 1:  # only static INT8 calibrates, and it takes models of one input
            calib += [torch.randn_like(work.example(2)) for _ in range(3)]
        source = "random inputs (no data given)"
    # accuracy-aware autotune measures on the validation data (strategy.check_executable: it has data)
    eval_fn = work.accuracy if step.tolerable_loss is not None else None
    work.calibration = calib
    work.quant = work.quantize(calib[0], step.dtype, calib_batches=calib, keep_float=step.keep_float,
                               tolerable_loss=step.tolerable_loss, eval_fn=eval_fn)
    work.log.append(f"calibrated on {source}")
    if step.dtype == "int8" and work.quant.float_layers:
        work.log.append(f"kept in float: {', '.join(work.quant.float_layers)}"
                        + (" (chosen by autotune)" if step.tolerable_loss is not None else ""))
    work.program = work.quant.program
    work.log.append(f"quantized to {step.dtype} in {time.perf_counter() - t0:.1f} s")
    return work


METHOD = Method(name="quantize", step=QuantizeStep, forms=FORMS, parse=parse, estimate=estimate, execute=execute)
