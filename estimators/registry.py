"""Per-operator cost registry: one pure function of shapes per operator, returning a cost record.

Every quantity of a row is a sum of terms `num * cin**a * cout**b // den`, where `cin` and `cout`
are the row's input and output channel counts. Written that way, the same record costs the layer
before and after pruning (the pruning estimator only changes `cin`/`cout`), exactly and vectorised.

Quantities (per traced batch, elements unless said otherwise):
  params       parameter elements owned by the row
  buffers      floating-point buffer elements the deployed model needs (BatchNorm running stats)
  fixed_bytes  other stored bytes (e.g. BatchNorm's int64 num_batches_tracked)
  macs         multiply-accumulates as torch-pruning's counter (tp.utils.count_ops_and_params) counts
               them: conv/linear/attention MACs plus one per element for the norm, activation and
               pooling module types it knows; functional ops count zero there
  gemm_macs    true multiply-accumulates of conv, linear, matmul and attention (FlopCounterMode / 2)
  act_in       activation elements read
  act_out      activation elements written

Module handlers are keyed by exact module type (as torch-pruning's counter matches them); function
handlers by the function's name (torch function, Tensor method or aten op packet name).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .plugins import Registry

QUANTITIES = ("params", "buffers", "fixed_bytes", "macs", "gemm_macs", "act_in", "act_out")
Q_INDEX = {q: i for i, q in enumerate(QUANTITIES)}

MAXPOOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


@dataclass
class TMeta:
    """What a cost function sees of a tensor."""

    shape: tuple[int, ...]
    axis: int | None = None  # the channel dim where the tracer knows it (see chan_axis)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def chan_axis(self) -> int:
        # where the tracer knows it (a Linear's output, and rows that keep its layout), the dim it names; else
        # NCHW-style tensors carry channels on dim 1, token tensors (N, L, D) on the last dim
        if self.axis is not None:
            return self.axis
        return -1 if len(self.shape) == 3 else 1

    @property
    def chan(self) -> int:
        if len(self.shape) < 2:
            return self.shape[0] if self.shape else 1
        return self.shape[self.chan_axis]

    @property
    def per_chan(self) -> int:
        return self.numel // self.chan if self.chan else 0


@dataclass
class Cost:
    kind: str
    cin: int
    cout: int
    terms: list[tuple[str, int, int, int, int]] = field(default_factory=list)  # (quantity, num, den, a, b)
    # False when a term is a constant that pruning would change (then the row must not be pruned through)
    channel_exact: bool = True
    bias: bool = False  # the layer stores a bias (stays float when its weight is quantized)
    ksize: int = 1  # kernel elements of a convolution or pooling window (1 otherwise): latency models use it
    groups: int = 1  # convolution groups (latency models tell grouped convolutions apart)

    def add(self, q: str, num: int, a: int = 0, b: int = 0, den: int = 1) -> "Cost":
        if num:
            self.terms.append((q, int(num), int(den), a, b))
        return self

    def value(self, q: str) -> int:
        return sum(n * self.cin**a * self.cout**b // d for qq, n, d, a, b in self.terms if qq == q)


@dataclass
class Ctx:
    """Inputs of a cost function: activation tensors in/out, the module (module rows) or the call."""

    inputs: list[TMeta]
    outputs: list[TMeta]
    module: nn.Module | None = None
    params: list[torch.Tensor] = field(default_factory=list)  # parameter/buffer tensors passed to a function
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


CostFn = Callable[[Ctx], Cost]
MODULE_COSTS = Registry("module cost")  # module type -> cost fn
FUNCTION_COSTS = Registry("function cost")  # function name -> (cost fn, channel rule)
CHANNEL_RULES = ("same", "cat", "reshape", "fixed")


def register_module(*types: type) -> Callable[[CostFn], CostFn]:
    return MODULE_COSTS.register(*types)


def register_function(*names: str, rule: str = "same") -> Callable[[CostFn], CostFn]:
    if rule not in CHANNEL_RULES:
        raise ValueError(f"unknown channel rule {rule!r}")
    return FUNCTION_COSTS.register(*names, value=rule)


# ----------------------------------------------------------------------------------------------
# helpers


def acts(c: Cost, ctx: Ctx) -> Cost:
    """Activation reads and writes, each tensor in terms of cin (first input) or cout when its channel
    count is one of those; otherwise a constant and the row is not channel-exact."""
    for i, t in enumerate(ctx.inputs):
        if i == 0 and t.chan == c.cin:
            c.add("act_in", t.per_chan, a=1)
        elif t.chan == c.cout:
            c.add("act_in", t.per_chan, b=1)
        elif t.chan == c.cin:
            c.add("act_in", t.per_chan, a=1)
        else:
            c.add("act_in", t.numel)
            c.channel_exact = False
    for t in ctx.outputs:
        if t.chan == c.cout:
            c.add("act_out", t.per_chan, b=1)
        else:
            c.add("act_out", t.numel)
            c.channel_exact = False
    return c


def io(ctx: Ctx) -> tuple[int, int]:
    cin = ctx.inputs[0].chan if ctx.inputs else 0
    cout = ctx.outputs[0].chan if ctx.outputs else 0
    return cin, cout


def const_params(c: Cost, tensors: list[torch.Tensor]) -> Cost:
    for p in tensors:
        q = "params" if isinstance(p, nn.Parameter) else "buffers"
        if p.is_floating_point():
            c.add(q, p.numel())
        else:
            c.add("fixed_bytes", p.numel() * p.element_size())
        c.channel_exact = False
    return c


def channel_params(c: Cost, tensors: list[torch.Tensor]) -> Cost:
    """A float tensor with one element per output channel (norm affine, layer scale) scales with the channels;
    any other parameter or buffer is a constant."""
    for p in tensors:
        if p.is_floating_point() and p.numel() == c.cout and c.cout > 1:
            c.add("params" if isinstance(p, nn.Parameter) else "buffers", 1, b=1)
        else:
            const_params(c, [p])
    return c


# ----------------------------------------------------------------------------------------------
# modules (exact types, as torch-pruning's counter)


def conv_cost(cin: int, cout: int, groups: int, ksize: int, out_per_chan: int, bias: bool) -> Cost:
    depthwise = groups > 1 and groups == cin
    c = Cost("dwconv" if depthwise else "conv", cin, cout, ksize=ksize, groups=int(groups))
    if depthwise:  # groups follow the channels when pruned: everything scales with cout
        c.add("params", ksize, b=1)
        c.add("macs", ksize * out_per_chan, b=1)
        c.add("gemm_macs", ksize * out_per_chan, b=1)
    else:
        c.add("params", ksize, a=1, b=1, den=groups)
        c.add("macs", ksize * out_per_chan, a=1, b=1, den=groups)
        c.add("gemm_macs", ksize * out_per_chan, a=1, b=1, den=groups)
    if bias:
        c.bias = True
        c.add("params", 1, b=1)
        c.add("macs", out_per_chan, b=1)
    return c


@register_module(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def conv_module(ctx: Ctx) -> Cost:
    """Convolutions; transposed ones too (torch-pruning's counter uses the conv formula on output positions)."""
    m = ctx.module
    y = ctx.outputs[0]
    c = conv_cost(m.in_channels, m.out_channels, m.groups, math.prod(m.kernel_size), y.numel // m.out_channels,
                   m.bias is not None)
    return acts(c, ctx)


@register_module(nn.Linear)
def linear_module(ctx: Ctx) -> Cost:
    m = ctx.module
    x = ctx.inputs[0]
    c = Cost("gemm", m.in_features, m.out_features)
    rows = x.numel // m.in_features
    c.add("params", 1, a=1, b=1)
    c.add("macs", rows, a=1, b=1)
    c.add("gemm_macs", rows, a=1, b=1)
    if m.bias is not None:
        c.bias = True
        c.add("params", 1, b=1)
        c.add("macs", 1, b=1)  # the counter adds out_features once, not per row
    # a Linear on (N, L, D) reads tokens along the last dim, on (N, F) features: both are cin/cout
    for t in ctx.inputs:
        c.add("act_in", t.numel // m.in_features, a=1)
    for t in ctx.outputs:
        c.add("act_out", t.numel // m.out_features, b=1)
    return c


def norm(ctx: Ctx, channels: int, affine: bool, stats: bool) -> Cost:
    x = ctx.inputs[0]
    c = Cost("norm", channels, channels)
    if affine:
        c.add("params", 2, b=1)
    if stats:
        c.add("buffers", 2, b=1)
        c.add("fixed_bytes", 8)  # num_batches_tracked, int64
    c.add("macs", (2 if affine else 1) * (x.numel // channels), b=1)
    return acts(c, ctx)


@register_module(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batchnorm_module(ctx: Ctx) -> Cost:
    m = ctx.module
    c = norm(ctx, m.num_features, m.affine, m.track_running_stats)
    if m.track_running_stats and m.num_batches_tracked is None:
        c.terms = [t for t in c.terms if t[0] != "fixed_bytes"]
    return c


@register_module(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def instancenorm_module(ctx: Ctx) -> Cost:
    m = ctx.module
    return norm(ctx, m.num_features, m.affine, m.track_running_stats)


@register_module(nn.GroupNorm)
def groupnorm_module(ctx: Ctx) -> Cost:
    m = ctx.module
    c = norm(ctx, m.num_channels, m.affine, False)
    return c


@register_module(nn.LayerNorm)
def layernorm_module(ctx: Ctx) -> Cost:
    m = ctx.module
    x = ctx.inputs[0]
    d = x.shape[-1]
    c = Cost("norm", d, d)
    per = math.prod(m.normalized_shape) // d
    if m.elementwise_affine:
        c.add("params", per, b=1)
        if m.bias is not None:
            c.add("params", per, b=1)
    c.add("macs", (2 if m.elementwise_affine else 1) * (x.numel // d), b=1)
    return acts(c, ctx)


@register_module(nn.ReLU, nn.ReLU6, nn.ELU, nn.LeakyReLU, nn.GELU, nn.PReLU)
def counted_activation_module(ctx: Ctx) -> Cost:
    cin, cout = io(ctx)
    c = Cost("elementwise", cin, cout)
    y = ctx.outputs[0]
    c.add("macs", y.per_chan, b=1)
    if isinstance(ctx.module, nn.PReLU):
        n = ctx.module.weight.numel()
        if n == cout and n > 1:
            c.add("params", 1, b=1)
        else:
            c.add("params", n)
    return acts(c, ctx)


def window(k) -> int:
    """Elements of a pooling window (kernel_size as an int or a tuple; adaptive pools count 1)."""
    if isinstance(k, (tuple, list)):
        return int(math.prod(int(x) for x in k)) if all(isinstance(x, int) for x in k) else 1
    return int(k) ** 2 if isinstance(k, int) else 1


@register_module(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
def pool_module(ctx: Ctx) -> Cost:
    cin, cout = io(ctx)
    c = Cost("maxpool" if isinstance(ctx.module, MAXPOOL_MODULES) else "pool", cin, cout,
             ksize=window(getattr(ctx.module, "kernel_size", 1)))
    c.add("macs", ctx.inputs[0].per_chan, a=1)
    return acts(c, ctx)


@register_module(nn.Upsample)
def upsample_module(ctx: Ctx) -> Cost:
    cin, cout = io(ctx)
    c = Cost("copy", cin, cout)
    y = ctx.outputs[0]
    c.add("macs", math.prod(y.shape[2:]), b=1)  # the counter counts output[0]'s elements
    return acts(c, ctx)


@register_module(nn.MultiheadAttention)
def mha_module(ctx: Ctx) -> Cost:
    m = ctx.module
    q, k, v = ctx.inputs[:3] if len(ctx.inputs) >= 3 else (ctx.inputs[0],) * 3
    if m.batch_first:
        b, ql, kl, vl = q.shape[0], q.shape[1], k.shape[1], v.shape[1]
    else:
        b, ql, kl, vl = q.shape[1], q.shape[0], k.shape[0], v.shape[0]
    qd, kd, vd = q.shape[2], k.shape[2], v.shape[2]
    h = m.num_heads
    macs = ql * qd + ql * qd * qd + kl * kd * kd + vl * vd * vd
    if m.in_proj_bias is not None:
        macs += (ql + kl + vl) * qd
    macs += h * (ql * kl * (qd // h) + ql * kl + ql * kl * (vd // h))
    macs += ql * vd * (vd + 1)
    gemm = ql * qd * qd + kl * kd * kd + vl * vd * vd + h * ql * kl * (qd // h + vd // h) + ql * vd * vd
    c = Cost("attention", qd, vd, channel_exact=False)
    c.add("macs", macs * b)
    c.add("gemm_macs", gemm * b)
    c.add("params", sum(p.numel() for p in m.parameters()))
    inter = b * h * ql * kl  # attention scores written and read once
    c.add("act_in", sum(t.numel for t in ctx.inputs) + inter)
    c.add("act_out", sum(t.numel for t in ctx.outputs) + inter)
    return c


# Module types that leave a tensor's layout as it is (elementwise, or acting on the last dim): their output
# keeps its input's channel dim. A Linear (module or function) puts its output features on the last dim,
# whatever the rank: on a channels-last (N, H, W, C) tensor that is not the NCHW dim 1.
LAYOUT_KEEPING_MODULES = (nn.ReLU, nn.ReLU6, nn.ELU, nn.LeakyReLU, nn.GELU, nn.LayerNorm)
LINEAR_MODULES = (nn.Linear,)
LINEAR_FUNCTIONS = ("linear",)


def module_cost_fn(module: nn.Module) -> CostFn | None:
    return MODULE_COSTS.get(type(module))


def function_name(func: Any) -> str:
    """Canonical name of a torch function, Tensor method or aten overload."""
    op = getattr(func, "overloadpacket", None)
    if op is not None:
        return getattr(op, "__name__", str(op)).split(".")[-1]
    name = getattr(func, "__name__", None) or str(func)
    return name


from . import function_costs  # noqa: E402  (registers the function costs; it imports this module's types)

FUNCTION_COSTS_MODULE = function_costs
