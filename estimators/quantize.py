"""Quantization estimator: bytes per element and the quantization parameters the executor stores.

The rule follows what tasks/quantize_exec.py produces (verified there on resnet18, mobilenet_v2 and a
tiny CNN to the byte):

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

import numpy as np

from .compress import register_estimator
from .strategy import QuantizeStep
from .table import LayerTable

_LM_HEAD = ("lm_head", "output_layer", "embed_out")
_BN = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")
_FOLD_INTO = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Linear")
_RELU = ("ReLU", "relu", "relu_")


@register_estimator("quantize")
def estimate_quantize(table: LayerTable, step: QuantizeStep) -> LayerTable:
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
            from .errors import UserInputError

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
