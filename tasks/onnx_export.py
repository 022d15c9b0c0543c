"""ONNX export of an executed strategy, verified in ONNX Runtime.

    fp32, fp16   the saved program itself through torch.onnx's dynamo exporter (opset 18), batch dimension
                 dynamic and named `batch`
    int8         a QDQ model for TensorRT's explicit quantization: the float module the INT8 program was built
                 from is exported as above, then quantized by ONNX Runtime's static quantizer on the calibration
                 batches the INT8 program was calibrated on, the same layers quantized (the ones Intel Neural
                 Compressor quantized), INT8 weights per output channel on axis 0, activations and weights
                 symmetric (zero point 0: TensorRT refuses any other), bias kept in float (TensorRT folds it)

The INC program is not translated directly: its activations are uint8 with non-zero zero points, which
TensorRT's parser refuses. Opset 18 is what the dynamo exporter writes and ONNX's converter cannot take a
ReduceMean of opset 18 below it; TensorRT parses opset 18 from 8.6 on (10.x included).

Every export is checked (`onnx.checker`, full check) and run in an ONNX Runtime session before it is kept:
float outputs must equal the program's within `FLOAT_RTOL` of the output's range, INT8 top-1 must agree with the
program's on the validation data (or on seeded inputs without data) for at least `INT8_AGREEMENT` of the inputs.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from estimators.errors import UserInputError
from estimators.modelspec import as_inputs

OPSET = 18
FLOAT_RTOL = 1e-4  # max |onnx - torch| over the largest |torch| output: fp32 kernels differ in summation order only
FP16_RTOL = 1e-2  # fp16 kernels round at 2^-11 per operation; the error accumulates over the layers
INT8_AGREEMENT = 0.99  # top-1 agreement of the QDQ model with the INT8 program the predictions were made for
ONNX_FORMS = ("fp32", "fp16", "int8")
TENSORRT = "TensorRT 8.6 or later (10.x included): opset 18, explicit INT8 by symmetric QDQ pairs"
# ONNX Runtime quantizes these op types when their inputs are activations; the ones that would quantize a weight
# other than a Conv/Gemm/MatMul weight (Gather's embedding table, normalisation scales) are left out, so that what
# is quantized is what the INT8 program quantized
_NOT_QUANTIZED = {"Gather", "GatherElements", "GatherND", "EmbedLayerNormalization", "LayerNormalization",
                  "InstanceNormalization", "BatchNormalization", "Attention", "MultiHeadAttention"}
_ELEMENT_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


def onnx_form(strategy) -> str:
    """The ONNX form of a strategy's artifact: its quantization dtype, or fp32; an error where ONNX has none."""
    q = next((s for s in strategy.steps if s.method == "quantize"), None)
    dtype = "fp32" if q is None else q.dtype
    if dtype not in ONNX_FORMS:
        raise UserInputError(f"no ONNX export for quantize:{dtype}: ONNX export takes fp32, fp16 and int8 "
                             "(bf16 and weight-only INT8 have no TensorRT or ONNX Runtime CPU kernels to verify on)")
    return dtype


def _failed_operator(exc: BaseException, program) -> str:
    """The operator (and the module it sits in) a dynamo export failed on, read from the exception chain."""
    chain, e = [], exc
    while e is not None and len(chain) < 12:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = " ".join(str(c) for c in chain)
    op = re.search(r"target=(?:torch\.ops\.)?([\w.]+)", text)
    node = re.search(r"translating node %(\w+)", text)
    where = ""
    if node and program is not None:
        for n in program.graph.nodes:
            if n.name == node.group(1):
                stack = n.meta.get("nn_module_stack") or {}
                if stack:
                    where = f" in module {list(stack.values())[-1][0] or '(root)'}"
                break
    reason = str(chain[-1]).splitlines()[0][:300] if chain else str(exc)
    return (f"operator {op.group(1)}{where}: {reason}" if op else f"{type(exc).__name__}: {reason}")


def _name_batch_dims(model) -> None:
    """The first dimension of every graph input and output is the dynamic batch: name it `batch`."""
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            dims[0].dim_param = "batch"


def export_float_onnx(program, example, path: str | Path) -> None:
    """The exported program (float, or cast to fp16) as ONNX at `path`, its batch dynamic; an error naming the
    operator that did not export."""
    import onnx

    xs = tuple(x if x.shape[0] >= 2 else x.expand(2, *x.shape[1:]).contiguous() for x in as_inputs(example))
    try:
        onx = torch.onnx.export(program, xs, dynamo=True, optimize=True, opset_version=OPSET, verbose=False)
    except Exception as exc:  # the exporter wraps every failure; the operator is named in its cause chain
        raise UserInputError(f"ONNX export failed at {_failed_operator(exc, program)}") from None
    model = onx.model_proto
    _name_batch_dims(model)
    onnx.save(model, str(path))


_WEIGHTED = ("Conv", "Gemm", "MatMul", "ConvTranspose")


def _weight_owners(model) -> dict[str, str]:
    """The module each Conv/Gemm/MatMul weight initializer belongs to: `<module>.weight` by its name, or, where
    the exporter folded a transposed copy under another name (a Linear on a 3-d input becomes a MatMul), by the
    node's name scopes (its module path, then the aten op)."""
    import json

    inits = {t.name for t in model.graph.initializer}
    owners = {}
    for n in model.graph.node:
        if n.op_type not in _WEIGHTED or len(n.input) < 2 or n.input[1] not in inits:
            continue
        w = n.input[1]
        if w.endswith(".weight"):
            owners[w] = w[: -len(".weight")]
            continue
        scopes = next((p.value for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        try:
            path = json.loads(scopes.replace("'", '"')) if scopes else []
        except ValueError:
            path = []
        if len(path) >= 2:
            owners[w] = path[-2]
    return owners


def quantize_onnx(float_path: str | Path, out_path: str | Path, calib_batches: list, quantized_layers: list[str]) -> None:
    """The float ONNX at `float_path` quantized to a QDQ model at `out_path` (module docstring): only the Conv,
    Gemm and MatMul nodes whose weight belongs to one of `quantized_layers` get INT8 weights."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry
    from onnxruntime.quantization.shape_inference import quant_pre_process

    owners = _weight_owners(onnx.load(str(float_path)))  # the pre-processed graph keeps no name scopes
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(float_path), str(pre))  # shape inference; BatchNorm folded into its convolution
        model = onnx.load(str(pre))
        inits = {t.name for t in model.graph.initializer}
        wanted = set(quantized_layers)
        exclude = [n.name for n in model.graph.node if n.op_type in _WEIGHTED
                   and not (len(n.input) > 1 and n.input[1] in inits and owners.get(n.input[1]) in wanted)]
        input_name = model.graph.input[0].name

        class Batches(CalibrationDataReader):
            def __init__(self):
                self._it = iter([{input_name: as_inputs(b)[0].detach().numpy()} for b in calib_batches])

            def get_next(self):
                return next(self._it, None)

        quantize_static(str(pre), str(out_path), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=exclude,
                        op_types_to_quantize=sorted(set(QDQRegistry) - _NOT_QUANTIZED),
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})
    model = onnx.load(str(out_path))
    _name_batch_dims(model)
    onnx.save(model, str(out_path))


def stored_bytes(path: str | Path) -> int:
    """Bytes of the tensors an ONNX file stores (its initializers and constant nodes' values), as
    hardware.measure.stored_tensor_bytes counts a program's."""
    import onnx

    model = onnx.load(str(path))
    total = 0
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    for t in tensors:
        total += int(np.prod(t.dims, dtype=np.int64)) * _ELEMENT_BYTES.get(t.data_type, 4)
    return total


def session(path: str | Path, threads: int | None = None, spinning: bool = False):
    """An ONNX Runtime CPU session as a deployment runs one: every graph optimisation, intra-op threads = the
    cores torch uses here, INT8 computed without saturation. Its threads do not spin-wait between calls unless `spinning`: two spinning sessions
    timed in alternation slow each other down (resnet18 at 64x64 here: 1.7 ms alone, 5.7-6.2 ms alternated with
    another spinning session, 2.2 ms without spinning), and the latencies are measured in alternation."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    # an x86 CPU without VNNI (AVX2, AVX-512 before VNNI) multiplies INT8 as u8 x s8 with 16-bit saturating pair
    # sums, which wrecks QDQ models (a digits CNN: 76% top-1 agreement with the INT8 program); this option makes
    # ONNX Runtime use exact u8 x u8 kernels there instead, and does nothing on VNNI or AMX machines
    opts.add_session_config_entry("session.x64quantprecision", "1")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def session_fn(sess) -> Callable:
    """A session as a function of torch tensors (the measurement helpers' signature), returning numpy arrays."""
    names = [i.name for i in sess.get_inputs()]

    def run(*xs):
        return sess.run(None, {n: x.detach().numpy() for n, x in zip(names, xs)})

    return run


def _first_output(out) -> np.ndarray:
    if isinstance(out, (list, tuple)):
        out = out[0]
    return out.detach().float().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, dtype=np.float32)


def verify(path: str | Path, reference: Callable, form: str, inputs: list, predicted_size: float | None,
           enforce_agreement: bool = True) -> dict[str, Any]:
    """Check the ONNX file at `path` against the PyTorch program `reference`: onnx.checker (full), an ONNX Runtime
    session on every batch of `inputs` (tensors, or tuples of a model's inputs), the outputs compared (float:
    relative max abs difference; int8: top-1 agreement, enforced when `enforce_agreement`), and its stored bytes
    against `predicted_size`. Returns the figures; raises UserInputError where a check fails."""
    import onnx

    try:
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    except Exception as exc:
        raise UserInputError(f"the exported ONNX model fails onnx.checker: {str(exc).splitlines()[0][:300]}") from None
    run = session_fn(session(path))
    diffs, scales, agree, total = [], [], 0, 0
    with torch.inference_mode():
        for x in inputs:
            xs = as_inputs(x)
            want = _first_output(reference(*xs))
            got = np.asarray(run(*xs)[0], dtype=np.float32)
            if got.shape != want.shape:
                raise UserInputError(f"the ONNX model's output has shape {got.shape}, the program's {want.shape}")
            diffs.append(float(np.abs(got - want).max()))
            scales.append(float(np.abs(want).max()))
            if want.ndim == 2:
                agree += int((got.argmax(1) == want.argmax(1)).sum())
                total += want.shape[0]
    out: dict[str, Any] = {"form": form, "opset": OPSET, "checker": "passed (full check)",
                           "runtime": "onnxruntime CPUExecutionProvider", "inputs": total or len(inputs)}
    rel = max(diffs) / max(max(scales), 1e-12)
    out["max_abs_diff"] = round(max(diffs), 8)
    out["max_rel_diff"] = round(rel, 8)
    if total:
        out["top1_agreement"] = round(agree / total, 6)
    if form == "int8":
        if enforce_agreement and total and agree / total < INT8_AGREEMENT:
            raise UserInputError(f"the INT8 ONNX model agrees with the INT8 program on {100 * agree / total:.1f}% of "
                                 f"top-1 predictions, below {100 * INT8_AGREEMENT:.0f}%")
    else:
        tol = FP16_RTOL if form == "fp16" else FLOAT_RTOL
        if rel > tol:
            raise UserInputError(f"the {form} ONNX model's outputs differ from the program's by {rel:.2e} of their "
                                 f"range (tolerance {tol:g})")
    out["size_bytes"] = stored_bytes(path)
    out["file_bytes"] = os.path.getsize(path)
    if predicted_size:
        out["size_err"] = round((predicted_size - out["size_bytes"]) / out["size_bytes"], 6)  # as err.* is
    return out


def trtexec_command(path: str | Path, form: str) -> str:
    """The command that builds a TensorRT engine of the export on a Jetson (or any TensorRT machine)."""
    flag = {"int8": " --int8", "fp16": " --fp16"}.get(form, "")
    return f"trtexec --onnx={Path(path).name}{flag} --saveEngine={Path(path).stem}.engine"


def export_onnx(work, strategy, out_dir: str | Path, predicted_size: float | None,
                progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """`model.onnx` in `out_dir` for the executed `work` (tasks.executors.Work) of `strategy`, verified against
    the program (verify): returns its path and the verification's figures. The INT8 form is checked for top-1
    agreement on the validation data when the strategy ran with data (the figure is reported, not enforced, on
    seeded inputs: an untrained network's outputs are near ties)."""
    form = onnx_form(strategy)
    path = Path(out_dir) / "model.onnx"
    example = work.example(2)
    progress(f"exporting {form} ONNX")
    if form == "int8":
        from .executors import export_program

        with tempfile.TemporaryDirectory() as tmp:
            float_path = Path(tmp) / "float.onnx"
            export_float_onnx(export_program(work.model, example), example, float_path)
            quantize_onnx(float_path, path, work.calibration, work.quant.quantized_layers)
    else:
        export_float_onnx(work.program, example, path)
    if work.data is not None:
        inputs = [xb for xb, _ in work.data.val]
    else:
        gen = torch.Generator().manual_seed(0)
        inputs = [work.example(1), example] + [torch.randn(example.shape, generator=gen) for _ in range(4)] \
            if work.loaded.n_inputs == 1 else [work.example(1), example]
    progress(f"checking model.onnx in ONNX Runtime on {len(inputs)} batches")
    checked = verify(path, work.program.module(), form, inputs, predicted_size, enforce_agreement=work.data is not None)
    return {"path": str(path), **checked, "tensorrt": TENSORRT, "trtexec": trtexec_command(path, form)}
