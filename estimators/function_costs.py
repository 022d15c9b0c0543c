"""Costs of torch functions, Tensor methods and aten ops (estimators.registry's FUNCTION_COSTS), registered on
import; estimators.registry imports this module, so every lookup finds them."""
from __future__ import annotations

import math

import torch

from .registry import TMeta, Cost, Ctx, acts, channel_params, const_params, conv_cost, io, register_function, window


@register_function("conv1d", "conv2d", "conv3d", "convolution", "_convolution", rule="fixed")
def conv_function(ctx: Ctx) -> Cost:
    w = ctx.args[1] if len(ctx.args) > 1 else ctx.kwargs["weight"]
    bias = ctx.args[2] if len(ctx.args) > 2 else ctx.kwargs.get("bias")
    groups = ctx.kwargs.get("groups")
    if groups is None:  # F.conv2d(x, w, b, stride, padding, dilation, groups); aten.convolution puts it 9th
        groups = ctx.args[8] if len(ctx.args) >= 9 else (ctx.args[6] if len(ctx.args) >= 7 else 1)
    cin = ctx.inputs[0].chan
    cout = w.shape[0]
    c = conv_cost(cin, cout, int(groups), math.prod(w.shape[2:]), ctx.outputs[0].numel // cout,
                   isinstance(bias, torch.Tensor))
    return acts(c, ctx)


@register_function("linear", rule="fixed")
def linear_function(ctx: Ctx) -> Cost:
    w = ctx.args[1] if len(ctx.args) > 1 else ctx.kwargs["weight"]
    bias = ctx.args[2] if len(ctx.args) > 2 else ctx.kwargs.get("bias")
    cout, cin = w.shape
    x = ctx.inputs[0]
    c = Cost("gemm", cin, cout)
    c.add("params", 1, a=1, b=1)
    c.add("gemm_macs", x.numel // cin, a=1, b=1)
    if isinstance(bias, torch.Tensor):
        c.bias = True
        c.add("params", 1, b=1)
    return acts(c, ctx)


@register_function("batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm", "instance_norm", "group_norm",
                   "layer_norm", "native_layer_norm", "rms_norm", rule="same")
def norm_function(ctx: Ctx) -> Cost:
    cin, cout = io(ctx)
    c = Cost("norm", cin, cout)
    channel_params(c, ctx.params)
    return acts(c, ctx)


@register_function(
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "silu", "silu_", "gelu", "sigmoid", "sigmoid_", "hardsigmoid",
    "hardswish", "hardswish_", "tanh", "elu", "leaky_relu", "mish", "softplus", "dropout", "dropout_", "alpha_dropout",
    "feature_alpha_dropout", "clone", "contiguous", "to", "float", "softmax", "log_softmax", "_softmax", "abs", "neg",
    "exp", "sqrt", "rsqrt", "pow", "__pow__", "clamp", "clamp_min", "erf", "layer_scale", "masked_fill",
    "add", "add_", "__add__", "__iadd__", "__radd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__",
    "mul", "mul_", "__mul__", "__imul__", "__rmul__", "div", "div_", "__truediv__", "__itruediv__", "__rtruediv__",
    "where", "stochastic_depth", "eq", "ne", "lt", "gt", "le", "ge", "__eq__", "__ne__", "__lt__", "__gt__",
    "__le__", "__ge__", "logical_not", "quantize_per_tensor", "dequantize_per_tensor", "quantize_per_channel",
    "dequantize_per_channel", "__and__", "__or__", "logical_and", "logical_or", rule="same")
def elementwise_function(ctx: Ctx) -> Cost:
    cin, cout = io(ctx)
    c = Cost("elementwise", cin, cout)
    channel_params(c, ctx.params)
    return acts(c, ctx)


@register_function("avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                   "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "mean", "sum", "interpolate", "upsample_nearest2d",
                   "upsample_bilinear2d", rule="same")
def pool_function(ctx: Ctx) -> Cost:
    cin, cout = io(ctx)
    c = Cost("pool", cin, cout)
    const_params(c, ctx.params)
    return acts(c, ctx)


@register_function("max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
                   "adaptive_max_pool3d", "max_pool2d_with_indices", "amax", rule="same")
def maxpool_function(ctx: Ctx) -> Cost:
    """Max pooling as a function (exported programs): the same class as the MaxPool modules."""
    cin, cout = io(ctx)
    c = Cost("maxpool", cin, cout, ksize=window(ctx.args[1] if len(ctx.args) > 1 else ctx.kwargs.get("kernel_size", 1)))
    const_params(c, ctx.params)
    return acts(c, ctx)


@register_function("cat", "concat", "concatenate", "stack", rule="cat")
def cat_function(ctx: Ctx) -> Cost:
    cin, cout = io(ctx)
    c = Cost("copy", cin, cout)
    y = ctx.outputs[0]
    # every input is read once and written once: the reads add up to the output
    c.add("act_in", y.per_chan, b=1)
    c.add("act_out", y.per_chan, b=1)
    return c


@register_function("flatten", "view", "reshape", "unsqueeze", "squeeze", "permute", "transpose", "t", "__getitem__",
                   "select", "narrow", "expand", "expand_as", "unflatten", "chunk", "split", "unbind", "unsafe_view",
                   "_unsafe_view", "detach", "movedim", "swapaxes", "swapdims", "alias", "view_as", "reshape_as", "slice", rule="reshape")
def view_function(ctx: Ctx) -> Cost:
    """Views move no data (a copy is costed where a later op needs one: contiguous, clone)."""
    cin, cout = io(ctx)
    c = Cost("view", cin, cout)
    if ctx.params:  # indexing a parameter table (e.g. relative position bias) reads it
        const_params(c, ctx.params)
        for t in ctx.outputs:
            c.add("act_out", t.numel)
    return c


@register_function("pad", "roll", "channel_shuffle", "native_channel_shuffle", "pixel_shuffle", "repeat", rule="reshape")
def copy_function(ctx: Ctx) -> Cost:
    cin, cout = io(ctx)
    c = Cost("copy", cin, cout)
    const_params(c, ctx.params)
    return acts(c, ctx)


@register_function("matmul", "__matmul__", "bmm", "mm", "einsum", "baddbmm", "addmm", rule="fixed")
def matmul_function(ctx: Ctx) -> Cost:
    cin, cout = io(ctx)
    c = Cost("gemm", cin, cout, channel_exact=False)
    ops = [t for t in ctx.inputs] + [TMeta(tuple(p.shape)) for p in ctx.params]
    a, b = (ops + [None, None])[:2]
    y = ctx.outputs[0]
    if a is not None:
        k = a.shape[-1]
        c.add("gemm_macs", y.numel * k)
    const_params(c, ctx.params)
    for t in ctx.inputs:
        c.add("act_in", t.numel)
    for t in ctx.outputs:
        c.add("act_out", t.numel)
    return c


@register_function("scaled_dot_product_attention", rule="fixed")
def sdpa_function(ctx: Ctx) -> Cost:
    q, k, v = ctx.inputs[:3]
    y = ctx.outputs[0]
    batch_heads = q.numel // (q.shape[-2] * q.shape[-1])
    lq, lk, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    c = Cost("attention", q.chan, y.chan, channel_exact=False)
    c.add("gemm_macs", batch_heads * lq * lk * (d + dv))
    c.add("act_in", sum(t.numel for t in ctx.inputs))
    c.add("act_out", y.numel)
    return c


@register_function("zeros", "ones", "full", "arange", "new_zeros", "new_ones", "new_full", "zeros_like", "ones_like",
                   "full_like", "empty", "empty_like", "tensor", "as_tensor", "meshgrid", "fill_", "zero_", rule="fixed")
def creation_function(ctx: Ctx) -> Cost:
    cin, cout = io(ctx)
    c = Cost("copy", cin, cout, channel_exact=False)
    for t in ctx.outputs:
        c.add("act_out", t.numel)
    return c
