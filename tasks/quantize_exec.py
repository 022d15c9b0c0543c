"""The quantization executor: a model converted to a dtype and exported as a program with a dynamic batch dim.

- ``quantize(model, example_input, dtype, calib_batches=None, keep_float=(), tolerable_loss=None, eval_fn=None)
  -> QuantResult``: converts a deep copy of ``model`` to ``dtype`` (one of
  ``estimators.methods.quantize.DTYPES``) and exports it. ``int8`` is static W8A8 post-training quantization with Intel
  Neural Compressor 3.x (PT2E), its weights folded to stored INT8; ``int8-weight-only`` INC's RTN on Linear
  layers; ``fp16``/``bf16`` a cast with the input and outputs cast at the edges.
- ``load_program(path, trust_pickle=False)``: ``torch.export.load`` that registers the quantized ops first
  (an INT8 program needs them in a fresh process).
- ``compile_for_inference(ep, dynamic=False)``: inductor with freezing, the form INT8 runs fast in.
- ``compiled_int8(model, example)``: both, as a full calibration times INT8 networks.

What each dtype stores, byte for byte (the rule ``estimators.methods.quantize`` predicts), is in docs/quantization.md.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from estimators.modelspec import as_inputs
from estimators.methods.quantize import DTYPES
from hardware.measure import stored_tensor_bytes, stored_tensors

from .int8_fold import fold_and_rename

logger = logging.getLogger(__name__)
# Intel Neural Compressor writes a log folder under $HOME unless HABANA_LOGS points elsewhere
os.environ.setdefault("HABANA_LOGS", os.path.join(tempfile.gettempdir(), "deployfit-inc-logs"))


_CONV_LINEAR_TYPES = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)


@dataclass
class QuantResult:
    program: torch.export.ExportedProgram
    dtype: str
    quantized_layers: list[str] = field(default_factory=list)
    float_layers: list[str] = field(default_factory=list)
    stored_tensors: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    stored_bytes: int = 0


# --------------------------------------------------------------------------- helpers


def _describe_storage(ep: torch.export.ExportedProgram):
    stored: dict[str, tuple[str, tuple[int, ...]]] = {}
    total = 0
    for name, t in stored_tensors(ep):
        stored[name] = (str(t.dtype).replace("torch.", ""), tuple(int(s) for s in t.shape))
        total += t.numel() * t.element_size()
    dedup = stored_tensor_bytes(ep)
    if dedup != total:
        logger.warning("stored bytes %d (per tensor) != %d (deduplicated by storage)", total, dedup)
    return stored, int(total)


def _conv_linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, _CONV_LINEAR_TYPES)]


def _batch_dim():
    return torch.export.Dim("batch")


def _example_batch(example_input, min_batch: int = 2):
    """Example with a batch of at least 2 so torch.export keeps the batch dim symbolic
    (a batch of 1 would be specialized); a tuple of a model's several inputs, each so."""
    if not isinstance(example_input, torch.Tensor):
        return tuple(_example_batch(x, min_batch) for x in example_input)
    if example_input.dim() == 0 or example_input.shape[0] == 0:
        raise ValueError("example_input must have a non-empty leading batch dimension")
    b = example_input.shape[0]
    if b >= min_batch:
        return example_input
    reps = -(-min_batch // b)
    return example_input.repeat(reps, *([1] * (example_input.dim() - 1)))[:min_batch]


def _export(module: torch.nn.Module, example, varargs: bool = False) -> torch.export.ExportedProgram:
    """Export `module` on `example` (a tensor, or a tuple of a model's several inputs, passed positionally and
    sharing one dynamic batch). `varargs`: the module's forward is `(x, *rest)` (_CastIO), whose dynamic shapes
    nest the rest in a tuple."""
    xs = as_inputs(example)
    batch = _batch_dim()
    specs = tuple({0: batch} for _ in xs)
    if varargs and len(specs) > 1:
        specs = (specs[0], specs[1:])
    with torch.no_grad():
        return torch.export.export(module, xs, dynamic_shapes=specs)


def _set_submodule(root: torch.nn.Module, fqn: str, new: torch.nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _result(ep, dtype, quantized, model) -> QuantResult:
    qset = set(quantized)
    all_cl = _conv_linear_names(model)
    quantized_layers = [n for n in all_cl if n in qset] + sorted(qset - set(all_cl))
    float_layers = [n for n in all_cl if n not in qset]
    stored, nbytes = _describe_storage(ep)
    return QuantResult(
        program=ep,
        dtype=dtype,
        quantized_layers=quantized_layers,
        float_layers=float_layers,
        stored_tensors=stored,
        stored_bytes=nbytes,
    )


# --------------------------------------------------------------------------- fp16 / bf16


class _CastIO(torch.nn.Module):
    """Runs ``inner`` (already cast to ``dtype``) on inputs cast to ``dtype``; outputs go back to fp32.

    Only used as the export root; its child is registered with ``register_module`` under the
    name ``m`` so stored tensor names are ``m.<original FQN>``.
    """

    def __init__(self, inner: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.m = inner
        self.dtype = dtype

    def forward(self, x, *rest):  # rest: a model's further inputs, each cast alike
        out = self.m(x.to(self.dtype), *(r.to(self.dtype) for r in rest))
        return torch.utils._pytree.tree_map(
            lambda t: t.to(torch.float32) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, out
        )


def _quantize_half(model, example_input, dtype_name):
    tdt = torch.float16 if dtype_name == "fp16" else torch.bfloat16
    inner = copy.deepcopy(model).eval().to(tdt)
    wrapper = _CastIO(inner, tdt).eval()
    ep = _export(wrapper, _example_batch(example_input), varargs=True)
    quantized = _conv_linear_names(model)  # every conv/linear weight is stored in fp16/bf16
    return _result(ep, dtype_name, quantized, model)


# --------------------------------------------------------------------------- int8 weight-only


class Int8WeightOnlyLinear(torch.nn.Module):
    """Exportable stored form of an INC RTN (bits=8, sym, per-output-channel) Linear.

    INC's own ``INCWeightOnlyLinear`` packs the int8 codes into int32 words and recovers the
    fp32 weight in ``forward`` with numba/``.numpy()`` and a python loop over input features,
    which ``torch.export`` cannot trace.  This module stores exactly INC's quantized values
    (``int_weight`` and ``scales`` from ``INCWeightOnlyLinear.unpack()``) unpacked:

    * ``weight``: int8 ``[out, in]`` (buffer)
    * ``weight_scale``: fp32 ``[out]`` (buffer)
    * ``bias``: fp32 ``[out]`` (parameter) only if the original Linear had a bias

    and dequantizes in forward: ``F.linear(x, weight.float() * weight_scale[:, None], bias)``.
    """

    def __init__(self, int_weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", int_weight.to(torch.int8).contiguous())
        self.register_buffer("weight_scale", scale.reshape(-1).to(torch.float32).contiguous())
        if bias is not None:
            self.bias = torch.nn.Parameter(bias.detach().to(torch.float32).clone(), requires_grad=False)
        else:
            self.bias = None
        self.in_features = int(int_weight.shape[1])
        self.out_features = int(int_weight.shape[0])

    def forward(self, x):
        w = self.weight.to(torch.float32) * self.weight_scale.unsqueeze(1)
        return F.linear(x, w.to(x.dtype), self.bias)


def _quantize_weight_only(model, example_input):
    from neural_compressor.torch.algorithms.weight_only.modules import INCWeightOnlyLinear
    from neural_compressor.torch.quantization import RTNConfig, convert, prepare

    _inc_quiet()

    original_biases = {n: (m.bias is not None) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    work = copy.deepcopy(model).eval()
    # group_size=-1: one scale per output channel; use_layer_wise=False: the layer-wise
    # default needs `accelerate` and a checkpoint path; use_optimum_format=False keeps the
    # scales in fp32 and the codes signed (no +128 shift / zero points).
    cfg = RTNConfig(bits=8, group_size=-1, use_sym=True, use_layer_wise=False)
    work = prepare(work, cfg)
    work = convert(work, use_optimum_format=False)

    quantized = []
    for name, mod in list(work.named_modules()):
        if not isinstance(mod, INCWeightOnlyLinear):
            continue
        u = mod.unpack()
        int_weight, scales, zp = u["int_weight"], u["scales"], u.get("zp")
        if zp is not None:
            raise RuntimeError(f"unexpected zero points from INC RTN for {name}")
        if tuple(int_weight.shape) != (mod.out_features, mod.in_features) or scales.numel() != mod.out_features:
            raise RuntimeError(f"unexpected INC RTN layout for {name}: {tuple(int_weight.shape)} {tuple(scales.shape)}")
        if int(int_weight.min()) < -128 or int(int_weight.max()) > 127:
            raise RuntimeError(f"INC RTN codes out of int8 range for {name}")
        bias = mod.bias if original_biases.get(name, mod.bias is not None) else None
        new = Int8WeightOnlyLinear(int_weight, scales, bias)
        if name == "":
            work = new
        else:
            _set_submodule(work, name, new)
        quantized.append(name)
    logger.info("INC RTN int8 weight-only selected %d Linear layers", len(quantized))
    ep = _export(work, _example_batch(example_input))
    return _result(ep, "int8-weight-only", quantized, model)


# --------------------------------------------------------------------------- int8 static (W8A8)


def _inc_quiet() -> None:
    """INC sets its logger to INFO on import; keep it to errors unless DEPLOYFIT_INC_LOGLEVEL says otherwise."""
    logging.getLogger("neural_compressor").setLevel(os.environ.get("DEPLOYFIT_INC_LOGLEVEL", "ERROR").upper())


def _default_calibration(example: torch.Tensor, n_random: int = 3) -> list[torch.Tensor]:
    batches = [example]
    if example.is_floating_point():
        mean = example.mean()
        std = example.std() if example.numel() > 1 else torch.ones((), dtype=example.dtype)
        g = torch.Generator().manual_seed(0)
        for _ in range(n_random):
            noise = torch.randn(example.shape, generator=g, dtype=example.dtype)
            batches.append(noise * std + mean)
    return batches


def _static_config(keep_float=()):
    from neural_compressor.torch.quantization import StaticQuantConfig

    cfg = StaticQuantConfig()  # W int8 sym per-channel, A uint8 asym per-tensor
    for name in keep_float:
        cfg.set_local(name, StaticQuantConfig(w_dtype="fp32", act_dtype="fp32"))
    return cfg


def tuning_configs(model, keep_float=()) -> list:
    """Intel Neural Compressor autotune's search space, cheapest first: everything int8, then the
    classifier (linear layers) in float, then also the first convolution (the stem) in float."""
    names = _conv_linear_names(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    convs = [n for n in names if n not in linears]
    sets, seen = [], set()
    for extra in ([], linears, linears + convs[:1]):
        key = tuple(sorted(set(keep_float) | set(extra)))
        if key not in seen:
            seen.add(key)
            sets.append(list(key))
    return [_static_config(k) for k in sets]


def _quantize_int8(model, example_input, calib_batches, keep_float=(), tolerable_loss=None, eval_fn=None):
    from neural_compressor.torch.export import export as inc_export
    from neural_compressor.torch.quantization import TuningConfig, autotune, convert, prepare

    _inc_quiet()
    example = _example_batch(example_input)
    work = copy.deepcopy(model).eval()
    gm = inc_export(work, (example,), dynamic_shapes=({0: _batch_dim()},))
    calib = calib_batches if calib_batches else _default_calibration(example)

    def run_fn(m):
        with torch.no_grad():
            for b in calib:
                m(b)

    if tolerable_loss is not None and eval_fn is not None:  # accuracy-aware: INC tries the configs in order
        q = autotune(gm, TuningConfig(config_set=tuning_configs(model, keep_float), tolerable_loss=tolerable_loss),
                     eval_fn=eval_fn, run_fn=run_fn, example_inputs=(example,))
        if q is None:
            from estimators.errors import UserInputError

            raise UserInputError(f"Intel Neural Compressor's autotune found no int8 configuration within a relative "
                                 f"accuracy loss of {tolerable_loss:g} (tried: all int8, linear layers in float, "
                                 "also the first convolution in float); allow more loss or keep layers float")
    else:
        prepared = prepare(gm, _static_config(keep_float))
        run_fn(prepared)
        q = convert(prepared)  # Q/DQ graph, fp32 weights
    layers = fold_and_rename(q)
    ep = _export(q, example)
    return _result(ep, "int8", layers, model)


# --------------------------------------------------------------------------- public API


def quantize(
    model: torch.nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    dtype: str,
    calib_batches: list[torch.Tensor] | None = None,
    keep_float: list[str] | tuple = (),
    tolerable_loss: float | None = None,
    eval_fn=None,
) -> QuantResult:
    """Quantize/convert ``model`` to ``dtype`` and export it (dynamic batch dim).

    ``model`` is not modified (a deep copy is used). ``example_input`` is a batched
    tensor, or for a model of several inputs the tuple of them (fed positionally, sharing the
    dynamic batch; not for ``int8``); if its batch is < 2 it is repeated to 2 for export. ``calib_batches``,
    ``keep_float`` (module names left in float) and the accuracy-aware autotune
    (``tolerable_loss`` relative, ``eval_fn(graph_module) -> accuracy``) are only used for ``int8``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    several = isinstance(example_input, tuple) and len(example_input) > 1
    if not (isinstance(example_input, torch.Tensor)
            or isinstance(example_input, tuple) and all(isinstance(x, torch.Tensor) for x in example_input)):
        raise TypeError("example_input must be a torch.Tensor, or a tuple of them for a model of several inputs")
    if several and dtype == "int8":
        raise ValueError("static int8 quantization calibrates a model of one input (a tensor per batch)")
    if isinstance(example_input, tuple) and not several:
        example_input = example_input[0]
    if dtype == "int8":
        return _quantize_int8(model, example_input, calib_batches, keep_float, tolerable_loss, eval_fn)
    if dtype == "int8-weight-only":
        return _quantize_weight_only(model, example_input)
    return _quantize_half(model, example_input, dtype)


def load_program(path, trust_pickle: bool = False) -> torch.export.ExportedProgram:
    """``torch.export.load`` that first registers the ``quantized_decomposed`` ops and refuses
    an archive that needs pickle unless ``trust_pickle`` (``estimators.pt2.load_pt2``).

    An ``int8`` program contains ``torch.ops.quantized_decomposed.(de)quantize_per_*`` nodes;
    in a fresh process plain ``torch.export.load`` fails ("failed to resolve
    torch.ops.quantized_decomposed.dequantize_per_channel.default") unless
    ``torch.ao.quantization.fx._decomposed`` has been imported.
    """
    from estimators.pt2 import load_pt2

    return load_pt2(path, trust_pickle)


def compile_for_inference(ep: torch.export.ExportedProgram, dynamic: bool | None = False):
    """``torch.compile`` (inductor, freezing on) of the program's module.

    Freezing lets inductor constant-fold the weight dequantization and, for the int8 Q/DQ
    graph on x86, lower the Q/DQ patterns to oneDNN int8 kernels (the eager Q/DQ program is a
    slow reference: ~2.7x slower than fp32 eager for resnet18). Sets the global
    ``torch._inductor.config.freezing = True``; ``dynamic`` is passed to ``torch.compile``.
    Static by default: a graph is specialised for each batch size it runs at, as a model deployed at
    that batch is. Dynamic recompilation (torch.compile's default after a second shape) picks slower
    kernels: resnet50 int8 at batch 8 ran 88 ms compiled after batch 1, 42 ms static.
    """
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(ep.module(), dynamic=dynamic)


def compiled_int8(model: torch.nn.Module, example: torch.Tensor):
    """`model` quantized to static INT8 (calibrated on `example`) and compiled as deployed: what a full calibration
    times (hardware.calibrate.int8.Int8Builder)."""
    return compile_for_inference(quantize(model, example, "int8").program)
