"""Latency prediction: a per-layer roofline with the profile's efficiencies plus per-kernel overhead.

For every row of an (estimated) LayerTable, at batch size B:
    compute_s = FLOPs / (peak[dtype] * efficiency[class])   (conv/linear/attention: 2 x MACs; others 1 op/element)
    memory_s  = (weight bytes + activation bytes x B / traced batch) / (bandwidth * bandwidth_efficiency[class])
    time      = max(compute_s, memory_s) x slow-dtype factor + kernel overhead
Rows of a class the runtime fuses into the preceding conv/linear cost nothing; views cost the
profile's view overhead (eager dispatch) and move no data. A dtype the device cannot run fast runs as
the profile's `slow_dtypes` says, at its measured factor.

A calibrated CPU profile (`efficiency.weight_bandwidth` given) uses the split model, fitted to operators
timed inside running networks (hardware.calibrate):
    time = overhead[class] + FLOPs / (peak x compute[class]) x (1x1 factor: below 1 where 1x1 runs faster)
           x (misaligned factor)
           + weight bytes / (memory read bandwidth x weight_bandwidth[class])
           + activation bytes up to cache_bytes / (cache bandwidth x bandwidth[class])
           + activation bytes beyond it / (memory bandwidth x spill_bandwidth[class])
           + (eager PyTorch, `eager_threads` given) on oneDNN: onednn_us + misaligned input bytes x reorder_in_ns
             + misaligned output bytes x reorder_out_ns + padded FLOPs x padding_ns;
             on ATen's native kernel: FLOPs x (native_factor - 1)
with the efficiencies of the calibrated batch nearest the requested one (profile.batch_efficiency). Eager
PyTorch runs a float convolution on oneDNN in a blocked channel layout, reordering its input and output to
and from it (slow where channels are not multiples of the block) and computing on channels rounded up to the
block (padded FLOPs: what the rounding adds), except small batch-1 dense ones, which run on ATen's native kernel
(eager_onednn: the rule of ATen's ConvParams::use_mkldnn). A call also spends
`glue_ns_per_byte` per activation byte written outside its operators (allocating and freeing outputs), and
`input_ns_per_element` per element of its input (an INT8 graph quantizes its float input).
Two per-element terms apply to every row of their class, fused or not: `element_ns` (e.g. a SiLU evaluated
as an INT8 convolution's post-op: fusion saves its memory traffic, not its exponentials) and
`remainder_ns` on the share of channels beyond a multiple of `remainder_multiple` (a kernel's scalar tail,
e.g. quantized max pooling on 24 channels). `unfused_ops` names operators of a fused class the runtime
does not fuse (an INT8 graph's sigmoid gate and product run as generated loops). Elementwise rows that
evaluate exp/tanh/erf form the `transcendental` subclass. In-place elementwise rows (`relu_`, `add_`) count the
bytes they read and not those they write, and allocate nothing (in_place).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from estimators.modelspec import input_shapes
from estimators.registry import Q_INDEX
from estimators.table import DTYPE_BYTES, LayerTable, evaluate

from .profile import ALL_CLASSES, SUBCLASSES, HardwareProfile

GEMM_CLASSES = ("conv", "gconv", "dwconv", "gemm", "attention")
__all__ = ["predict_latency", "LatencyModel", "LatencyPrediction", "GEMM_CLASSES", "ALL_CLASSES", "SPLIT_COLUMNS"]


@dataclass
class LatencyPrediction:
    latency_ms: float
    per_row_ms: np.ndarray
    batch_size: int
    profile: str
    runtime: str
    unsupported_rows: int
    basis: str = "profile"  # `anchored`: corrected by the original model measured on the target (hardware.anchor)
    outside_ms: float = 0.0  # time outside the operators (per-call overhead, glue), included in latency_ms

    def top(self, table: LayerTable, k: int = 10) -> list[dict]:
        order = np.argsort(-self.per_row_ms)[:k]
        return [{"name": table.names[i], "kind": table.kinds[i], "ms": round(float(self.per_row_ms[i]), 4)} for i in order]


# elementwise operators (module class or function names, lower case) that evaluate exp, tanh or erf
TRANSCENDENTAL = frozenset({"silu", "silu_", "sigmoid", "sigmoid_", "gelu", "tanh", "tanh_", "elu", "elu_", "mish",
                            "softplus", "exp", "erf", "softmax", "log_softmax", "_softmax", "selu", "celu", "logsigmoid"})


# views that reorder dimensions: a copy of one (contiguous, clone) reads memory with strides
REORDERING = frozenset({"transpose", "transpose_", "permute", "t", "swapaxes", "swapdims", "movedim"})
COPYING = frozenset({"contiguous", "clone"})
SHUFFLES = frozenset({"channel_shuffle", "native_channel_shuffle", "channelshuffle", "pixel_shuffle", "pixelshuffle",
                      "pixel_unshuffle", "pixelunshuffle"})


def latency_kinds(table: LayerTable) -> np.ndarray:
    """The analysis's kinds, with grouped (not depthwise) convolutions as `gconv`, elementwise rows that
    evaluate exp/tanh/erf as `transcendental` and copies that reorder memory (of a transposed or permuted view;
    channel and pixel shuffles) as `permute`."""
    kinds = np.array(table.kinds)
    if table.groups is not None:
        kinds = np.where((kinds == "conv") & (table.groups > 1), "gconv", kinds)
    ops = [op.lower() for op in table.ops]
    trans = np.array([op in TRANSCENDENTAL for op in ops])
    perm = np.array([op in SHUFFLES or (op in COPYING and 0 <= int(src) < len(ops) and ops[int(src)] in REORDERING)
                     for op, src in zip(ops, table.src_row)])
    kinds = np.where((kinds == "elementwise") & perm, "permute", kinds)
    return np.where((kinds == "elementwise") & trans, "transcendental", kinds)


def row_features(table: LayerTable, batch: int, ev=None):
    """FLOPs and bytes per row at `batch`, plus the class of each row and the dtype it computes in."""
    ev = ev if ev is not None else evaluate(table)
    scale = batch / table.batch
    q = ev.q
    gemm = q[:, Q_INDEX["gemm_macs"]] * 2 * scale
    elems = q[:, Q_INDEX["act_out"]] * scale
    kinds = latency_kinds(table)
    is_gemm = np.isin(kinds, GEMM_CLASSES)
    window = table.ksize if table.ksize is not None else np.ones(table.n)
    flops = np.where(is_gemm, gemm, np.where(kinds == "maxpool", elems * window, elems))
    act_bytes = (ev.act_read_bytes + np.where(in_place(table, kinds), 0.0, ev.act_write_bytes)) * scale
    return flops, ev.weight_bytes, act_bytes, kinds, ev.cin, ev.cout


def in_place(table: LayerTable, kinds: np.ndarray) -> np.ndarray:
    """Elementwise rows that write no storage of their own: in-place operators (`relu_`, `add_`, an activation
    built with inplace=True, as every torchvision architecture's are) and identities (dropout in eval). Their
    output goes back into the lines they just read, so the latency model counts what they read and not what
    they write: in-place ReLU-like rows run at about 0.6x their out-of-place time, which dropping the write
    reproduces, while compute-bound in-place activations (SiLU, transcendental) do not speed up, so that class is
    left as it is. Nor do they allocate an output: the glue a call spends per activation byte written
    (`glue_ns_per_byte`) leaves them out too."""
    produces = np.zeros(table.n, dtype=bool)
    produces[table.st_row[table.st_row >= 0]] = True
    return (kinds == "elementwise") & ~produces


def pointwise(table: LayerTable) -> np.ndarray:
    """Convolutions with a 1x1 kernel."""
    k = table.ksize if table.ksize is not None else np.ones(table.n, dtype=np.int64)
    return np.isin(np.array(table.kinds), ("conv", "gconv")) & (k == 1)


# the split model's columns (split_terms), by name: what each coefficient of split_coefficients multiplies
SPLIT_COLUMNS = ("overhead", "flops", "flops_1x1", "flops_misaligned", "weight_bytes", "act_cache_bytes",
                 "act_memory_bytes", "onednn", "reorder_in_bytes", "reorder_out_bytes", "flops_native", "flops_padded")
COL = {name: i for i, name in enumerate(SPLIT_COLUMNS)}
SPLIT_WIDTH = len(SPLIT_COLUMNS)


def columns(*names: str) -> list[int]:
    """Positions of the named split-model columns."""
    return [COL[n] for n in names]


def split_terms(flops, wbytes, abytes, pw, off, cache: float, eager=None):
    """The split model's columns (SPLIT_COLUMNS) for some rows, stacked on the last axis (any leading candidate
    axes): 1, FLOPs, FLOPs of 1x1 rows, FLOPs on padded channels (FLOPs of rows whose channels are not multiples of
    the profile's channel_multiple), weight bytes, activation bytes up to the cache's size, activation bytes beyond
    it (from memory), then eager PyTorch's convolution dispatch (`eager`: eager_terms of these rows; zeros without):
    on oneDNN, misaligned input bytes and misaligned output bytes there, FLOPs on ATen's native kernel, FLOPs oneDNN
    adds by rounding channels up to its block."""
    flops = np.asarray(flops, dtype=float)
    hot = np.minimum(abytes, cache) if cache else np.zeros(flops.shape)
    z = np.zeros(flops.shape)
    on, rin, wout, native, pad = eager if eager is not None else (z, z, z, z, z)
    return np.stack([np.ones(flops.shape), flops, flops * pw, flops * off, wbytes, hot, abytes - hot,
                     on, rin, wout, flops * native, flops * pad], -1)


@dataclass(frozen=True)
class ConvShape:
    """What eager PyTorch's convolution dispatch looks at, per row, that pruning does not change."""

    conv: np.ndarray  # convolution rows
    spatial: np.ndarray  # input elements per channel (per sample)
    ksize: np.ndarray  # kernel elements
    groups: np.ndarray
    strided: np.ndarray  # output smaller than input


def _per_structure(store: dict, anchor, key: tuple, build):
    """`build()`, cached in `store` for the estimated tables of one analysis: they share the structure object
    `anchor` (whose id is in `key`; a hit must be that very object, so a recycled id cannot match)."""
    hit = store.get(key)
    if hit is not None and hit[0] is anchor:
        return hit[1]
    out = build()
    if len(store) > 256:
        store.clear()
    store[key] = (anchor, out)
    return out


_SHAPE_CACHE: dict[tuple, tuple] = {}


def conv_shape(table: LayerTable) -> ConvShape:
    """The table's ConvShape (depends on its structure only)."""
    return _per_structure(_SHAPE_CACHE, table.in_shapes, (id(table.in_shapes),), lambda: _conv_shape(table))


def _conv_shape(table: LayerTable) -> ConvShape:
    kinds = np.array(table.kinds)
    conv = np.isin(kinds, ("conv", "gconv", "dwconv")) & np.array(
        ["conv" in op.lower() and "transpose" not in op.lower() for op in table.ops])
    sp_in = np.array([float(np.prod(s[0][2:])) if s and len(s[0]) >= 3 else 1.0 for s in table.in_shapes])
    sp_out = np.array([float(np.prod(s[0][2:])) if s and len(s[0]) >= 3 else 1.0 for s in table.out_shapes])
    ksize = table.ksize if table.ksize is not None else np.ones(table.n, dtype=np.int64)
    groups = table.groups if table.groups is not None else np.ones(table.n, dtype=np.int64)
    return ConvShape(conv, sp_in, ksize, groups, sp_out < sp_in)


def eager_onednn(shape: ConvShape, cin, batch: int, threads: int) -> np.ndarray:
    """Convolution rows eager PyTorch runs on oneDNN (float32 on a CPU), the rest on ATen's native kernel: the rule
    of ATen's ConvParams::use_mkldnn, with the kernel's sides taken from its element count (square kernels).
    `cin`: input channels per row (any leading candidate axes)."""
    c1 = shape.strided | (batch >= 16) | (shape.ksize != 1) | (threads > 1)
    c2 = (shape.groups > 1) | (shape.ksize >= 16) | (batch > 1) | (batch * cin * shape.spatial > 20480)
    return shape.conv & c1 & c2


def padded_share(shape: ConvShape, cin, cout, multiple: int | None) -> np.ndarray:
    """FLOPs a convolution in oneDNN's blocked layout adds by computing on channels rounded up to `multiple` (its
    block), as a share of its FLOPs: per group, input and output channels both rounded (dense and grouped), the
    channels alone for a depthwise one, the output's alone for an input of up to 4 channels (oneDNN reads a plain
    layout there). Zero for rows that are not convolutions; any leading candidate axes."""
    if not multiple or multiple <= 1:
        return np.zeros(np.broadcast_shapes(np.shape(cin), shape.conv.shape))
    cin, cout = np.asarray(cin, dtype=float), np.asarray(cout, dtype=float)
    g = np.maximum(shape.groups, 1)
    ci, co = np.maximum(cin / g, 1.0), np.maximum(cout / g, 1.0)

    def up(c):
        return np.ceil(c / multiple) * multiple / c

    depthwise = (g > 1) & (ci <= 1.0)
    ratio = np.where(depthwise, up(np.maximum(cout, 1.0)), np.where(cin <= 4, up(co), up(ci) * up(co)))
    return np.where(shape.conv, ratio - 1.0, 0.0)


def eager_terms(shape: ConvShape, cin, cout, read_bytes, write_bytes, batch: int, threads: int, multiple: int | None):
    """split_terms' eager columns: (on oneDNN, misaligned input bytes on oneDNN, misaligned output bytes on oneDNN,
    on ATen's native kernel, padded share on oneDNN) per row (any leading candidate axes; zeros for a runtime that
    is not eager PyTorch)."""
    if threads <= 0:
        z = np.zeros(np.broadcast_shapes(np.shape(cin), shape.conv.shape))
        return z, z, z, z, z
    on = eager_onednn(shape, cin, batch, threads)
    m = multiple if multiple and multiple > 1 else 1
    return (on.astype(float), read_bytes * (on & (cin % m != 0)), write_bytes * (on & (cout % m != 0)),
            (shape.conv & ~on).astype(float), padded_share(shape, cin, cout, multiple) * on)


def split_coefficients(profile: HardwareProfile, eff, cls: str, peak: float) -> np.ndarray:
    """Seconds per unit of each split_terms column (SPLIT_COLUMNS), from a profile's efficiencies."""
    c_f = 1.0 / (peak * eff.compute_of(cls))
    bwr = (profile.memory_read_bandwidth_gbs or profile.memory_bandwidth_gbs) * 1e9
    cbw = (profile.cache_bandwidth_gbs or profile.memory_bandwidth_gbs) * 1e9
    per = {"overhead": eff.overhead_of(cls) * 1e-6, "flops": c_f,
           "flops_1x1": c_f * (eff._of(eff.pointwise_factor, cls, 1.0) - 1.0),
           "flops_misaligned": c_f * (eff._of(eff.misaligned_factor, cls, 1.0) - 1.0),
           "weight_bytes": 1.0 / (bwr * eff._of(eff.weight_bandwidth, cls, 1.0)),
           "act_cache_bytes": 1.0 / (cbw * eff.bandwidth_of(cls)),
           "act_memory_bytes": 1.0 / (profile.memory_bandwidth_gbs * 1e9 * eff._of(eff.spill_bandwidth, cls, 1.0)),
           "onednn": eff._of(eff.onednn_us, cls, 0.0) * 1e-6,
           "reorder_in_bytes": eff._of(eff.reorder_in_ns, cls, 0.0) * 1e-9,
           "reorder_out_bytes": eff._of(eff.reorder_out_ns, cls, 0.0) * 1e-9,
           "flops_native": c_f * (eff._of(eff.native_factor, cls, 1.0) - 1.0),
           "flops_padded": eff._of(eff.padding_ns, cls, 0.0) * 1e-9}
    return np.array([per[name] for name in SPLIT_COLUMNS])


def streamed_weights(coef: np.ndarray, profile: HardwareProfile) -> np.ndarray:
    """Split-model coefficients for a model whose weights do not fit in the cache: every call reads them from
    memory again, so a weight byte costs at least memory's read time. (INT8 kernels are calibrated alone, timed
    in a loop with their weights hot in cache: vgg11's 103 MB first linear at batch 1 ran 1.81 ms inside the
    compiled graph, 2.1x what its weights' cached rate predicted; at 56 GB/s it is the memory's read speed.)"""
    bwr = (profile.memory_read_bandwidth_gbs or profile.memory_bandwidth_gbs) * 1e9
    out = coef.copy()
    out[COL["weight_bytes"]] = max(out[COL["weight_bytes"]], 1.0 / bwr)
    return out


def misaligned(cin: np.ndarray, cout: np.ndarray, multiple: int | None, both: bool = False) -> np.ndarray:
    """Rows whose channels are not multiples of `multiple`: either count, or (both=True) input and output."""
    if not multiple or multiple <= 1:
        return np.zeros(len(cin), dtype=bool)
    a, b = (cin % multiple) != 0, (cout % multiple) != 0
    return (a & b) if both else (a | b)


def channels_off(kinds: np.ndarray, cin: np.ndarray, cout: np.ndarray, channel_multiple: int | None,
                 misaligned_by: str = "channels", aligned_below: int = 0, groups: np.ndarray | None = None,
                 group_multiple: int | None = None) -> np.ndarray:
    """Rows (any shape of `cin`, rows last) whose channels are off `channel_multiple`: input or output
    (`misaligned_by` channels), or input alone (`input`); a dense convolution on fewer input channels than
    `aligned_below` never is. With `group_multiple` and the rows' `groups`, a grouped (not depthwise) convolution is
    off where its input or output channels per group are not multiples of it. The rules are the profile's fields
    of those names (off_multiple)."""
    if not channel_multiple or channel_multiple <= 1:
        return np.zeros(np.shape(cin), dtype=bool)
    off = misaligned(cin, cout, channel_multiple) if misaligned_by == "channels" else (cin % channel_multiple) != 0
    if aligned_below:
        off = off & ~((kinds == "conv") & (cin < aligned_below))
    if group_multiple and groups is not None:
        off = np.where(kinds == "gconv", per_group_off(cin, cout, groups, group_multiple), off)
    return off


def per_group_off(cin: np.ndarray, cout: np.ndarray, groups: np.ndarray, multiple: int) -> np.ndarray:
    """Rows (any leading candidate axes) whose input or output channels per group are not multiples of `multiple`."""
    g = np.maximum(np.asarray(groups), 1)
    return ((cin // g) % multiple != 0) | ((cout // g) % multiple != 0)


def off_multiple(profile: HardwareProfile, kinds: np.ndarray, cin: np.ndarray, cout: np.ndarray,
                 groups: np.ndarray | None = None) -> np.ndarray:
    """Rows (K x rows) whose channels put them off the profile's channel_multiple, by its `misaligned_by`,
    `aligned_below` and `group_multiple` rules (`groups`: the rows' convolution groups)."""
    return channels_off(kinds, cin, cout, profile.channel_multiple, profile.misaligned_by, profile.aligned_below,
                        groups, profile.group_multiple)


def roof_memory(profile: HardwareProfile, w: np.ndarray, a: np.ndarray, streams: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """The roofline's memory time of rows moving `w` weight and `a` activation bytes (K x rows, at the batch),
    as (seconds at the cache's full bandwidth, which a class's bandwidth share divides, seconds at the memory's,
    which it does not): a class's bandwidth share applies to cache-resident traffic, where calibration measures
    it; traffic that spills to memory, and weights streamed from memory on every call (`streams`: the model's
    weights exceed the cache), move at the memory's bandwidth."""
    bw_dram = profile.memory_bandwidth_gbs * 1e9
    cache = profile.cache_bytes or 0
    if not cache:
        return (w + a) / bw_dram, np.zeros(np.shape(w))
    cache_bw = profile.cache_bandwidth_gbs * 1e9
    work = w + a
    a_cached = a <= cache
    stream_unit = np.where(a_cached, a, 0.0) / cache_bw
    stream_fixed = (w + np.where(a_cached, 0.0, a)) / bw_dram
    fit_cached = work <= cache
    fit_unit = np.where(fit_cached, work, 0.0) / cache_bw
    fit_fixed = np.where(fit_cached, 0.0, work) / bw_dram
    return np.where(streams, stream_unit, fit_unit), np.where(streams, stream_fixed, fit_fixed)


def input_elements(table: LayerTable) -> float:
    """Elements of one sample of the model's input (of all its inputs, for a model of several)."""
    return float(sum(np.prod(s[1:]) if len(s) > 1 else 1.0 for s in input_shapes(table.input_shape)))


def parent_classes(kinds: np.ndarray) -> np.ndarray:
    """Every row's class, a subclass (profile.SUBCLASSES) replaced by the class it falls back to."""
    return np.array([SUBCLASSES.get(k, k) for k in kinds], dtype=kinds.dtype)


def of_class(kinds: np.ndarray, cls: str, given) -> np.ndarray:
    """Rows costed as `cls` by a per-class table whose keys are `given`: that class, and its subclasses the
    table does not name (a subclass falls back to its class)."""
    return (kinds == cls) | ((parent_classes(kinds) == cls) & ~np.isin(kinds, list(given)))


def remainder_share(channels: np.ndarray, multiple: int) -> np.ndarray:
    """Share of `channels` beyond the largest multiple of `multiple` (what a vectorised kernel leaves to its
    scalar tail)."""
    c = np.maximum(np.asarray(channels, dtype=float), 1.0)
    return np.mod(c, max(int(multiple), 1)) / c


_FUSED_CACHE: dict[tuple, tuple] = {}


def fused_mask(table: LayerTable, kinds: np.ndarray, fused: list[str], unfused_ops: list[str] | tuple = ()
               ) -> np.ndarray:
    """Rows of a fused class (or a subclass of one), not among `unfused_ops` (operator names, lower case), whose
    producer chain reaches a conv/linear only through fused rows (depends on the table's structure only)."""
    key = (id(table.src_row), tuple(fused), tuple(unfused_ops), kinds.tobytes())
    return _per_structure(_FUSED_CACHE, table.src_row, key, lambda: _fused_mask(table, kinds, fused, unfused_ops))


def _fused_mask(table: LayerTable, kinds: np.ndarray, fused: list[str], unfused_ops) -> np.ndarray:
    n = table.n
    out = np.zeros(n, dtype=bool)
    if not fused:
        return out
    fusable = np.isin(kinds, fused) | np.isin(parent_classes(kinds), fused)  # a subclass fuses where its class does
    if unfused_ops:
        fusable &= ~np.isin(np.char.lower(np.array(table.ops, dtype=str)), list(unfused_ops))
    anchor = np.isin(kinds, GEMM_CLASSES)
    for i in range(n):
        if not fusable[i]:
            continue
        src = int(table.src_row[i])
        if src >= 0 and (anchor[src] or out[src]):
            out[i] = True
    return out


def dtype_parts(table: LayerTable, kinds: np.ndarray, profile: HardwareProfile, batch_size: int):
    """Per dtype the table's rows compute in: (its rows, the efficiencies, peak FLOP/s, slow-dtype factor,
    byte scale, [(class, rows of that class not fused away)])."""
    xdtypes = np.array(table.state.xdtype)
    for dt in np.unique(xdtypes):
        rows = xdtypes == dt
        run, factor = profile.runs(str(dt))
        eff = profile.eff(run, batch_size)
        peak = profile.peak_gflops[run] * 1e9
        # an fp32 model run in half precision moves half the bytes
        byte_scale = DTYPE_BYTES[run] / DTYPE_BYTES[str(dt)] if str(dt) == "fp32" and run in ("fp16", "bf16") else 1.0
        fused = fused_mask(table, kinds, eff.fused, eff.unfused_ops) & rows
        classes = [(cls, sel) for cls in ALL_CLASSES if (sel := rows & (kinds == cls) & ~fused).any()]
        yield rows, eff, peak, factor, byte_scale, classes


class GroupTaps:
    """A float grouped convolution's time beyond its split-model price, by its input channels per group, timed alone
    (hardware.calibrate.groups), which the split model's fit leaves to it: per output element and kernel tap
    (Efficiency.group_tap_ns), per image and group (group_call_ns) and per call (group_fixed_us). The kernel
    vectorizes within a group, so that below a few dozen channels per group an output costs about the same whatever
    their count, and more off the kernel's block, where each image and group also costs a fixed time (pruning a
    RegNet's 16 channels per group to 11 halved its grouped convolutions' FLOPs and slowed them, most where its
    outputs were 2x2); the kernel's block has a fixed cost of its own per call. A count not timed takes the nearest
    lower count's times; beyond the largest, the times per output and per image and group grow in proportion to the
    channels per group from the largest BEYOND_COUNTS counts' (their kernel computes in proportion there), and the
    time per call is the largest count's."""

    BEYOND_COUNTS = 8

    def __init__(self, table: dict[int, float], calls: dict[int, float] | None = None,
                 fixed: dict[int, float] | None = None):
        self.taps = _ByCount(table)
        self.calls = _ByCount(calls) if calls else None
        self.fixed = _ByCount(fixed, proportional=False) if fixed else None

    def ns(self, per_group: np.ndarray) -> np.ndarray:
        """Nanoseconds per output element and tap at `per_group` channels per group (any shape)."""
        return self.taps(per_group)

    def seconds(self, cin: np.ndarray, groups: np.ndarray, out_elements: np.ndarray, taps: np.ndarray,
                batch: int) -> np.ndarray:
        """Per row (any leading axes): the time its output elements, its images x groups and its call take at its
        channels per group, at `batch`."""
        pg = cin // np.maximum(groups, 1)
        out = self.taps(pg) * 1e-9 * out_elements * taps
        if self.calls is not None:
            out = out + self.calls(pg) * 1e-9 * batch * np.maximum(groups, 1)
        if self.fixed is not None:
            out = out + self.fixed(pg) * 1e-6
        return out


class _ByCount:
    """A table by channels per group (GroupTaps), read at any count: the nearest lower count's value; beyond the
    largest, in proportion to the count (`proportional`) or the largest count's value."""

    def __init__(self, table: dict[int, float], proportional: bool = True):
        counts = sorted(int(c) for c in table)
        self.counts = np.array(counts)
        self.values = np.array([float(table[c]) for c in counts])
        n = GroupTaps.BEYOND_COUNTS
        self.per_channel = float(np.median(self.values[-n:] / self.counts[-n:])) if proportional else None

    def __call__(self, per_group: np.ndarray) -> np.ndarray:
        pg = np.asarray(per_group)
        at = np.clip(np.searchsorted(self.counts, pg, side="right") - 1, 0, len(self.counts) - 1)
        if self.per_channel is None:
            return self.values[at]
        return np.where(pg > self.counts[-1], pg * self.per_channel, self.values[at])


def group_tap_rows(table: LayerTable, tap_ns: dict[int, float], batch: int, call_ns: dict[int, float] | None = None,
                   fixed_us: dict[int, float] | None = None) -> np.ndarray:
    """Per row of `table` at `batch`, the seconds its float grouped convolutions take by the tables `tap_ns`,
    `call_ns` and `fixed_us` (Efficiency.group_tap_ns, group_call_ns and group_fixed_us, GroupTaps; zeros elsewhere,
    or where `tap_ns` is empty): the share of their time the split model's fit does not take
    (hardware.calibrate.profile)."""
    out = np.zeros(table.n)
    kinds = latency_kinds(table)
    sel = (kinds == "gconv") & (np.array(table.state.xdtype) == "fp32")
    if not tap_ns or table.groups is None or not sel.any():
        return out
    ev = evaluate(table)
    elems = ev.q[:, Q_INDEX["act_out"]] * batch / table.batch
    window = table.ksize if table.ksize is not None else np.ones(table.n)
    out[sel] = GroupTaps(tap_ns, call_ns, fixed_us).seconds(ev.cin[sel], np.asarray(table.groups)[sel], elems[sel],
                                                            window[sel], batch)
    return out


class LatencyModel:
    """The latency model of one table's rows on one profile at one batch, evaluated for K candidates at once.

    Candidates of one base table differ only in their channel counts (pruning): `seconds` takes their per-row
    quantities as K x rows arrays (what estimators.table.evaluate gives for one table, or search.batch for many)
    and returns every row's seconds and each candidate's time outside its operators (per-call overhead, the
    glue per activation byte written, the input's quantization). A single prediction (predict_latency) is the
    K = 1 case: the model is written once."""

    def __init__(self, table: LayerTable, profile: HardwareProfile, batch: int):
        if batch < 1:
            raise ValueError("batch size must be at least 1")
        t = table
        self.table, self.profile, self.batch = t, profile, batch
        self.kinds = latency_kinds(t)
        self.in_place = in_place(t, self.kinds)
        self.is_gemm = np.isin(self.kinds, GEMM_CLASSES)
        self.window = t.ksize if t.ksize is not None else np.ones(t.n)
        self.pw = pointwise(t)
        self.parts = []  # (row positions, how, parameters) per dtype and class
        self.glue = []  # (row positions of a dtype, seconds per activation byte written)
        self.const_rows = np.zeros(t.n)  # views: a fixed time per row
        self.group_slow = []  # (grouped-conv row positions of a dtype, its group_multiple, seconds per FLOP off it)
        self.group_taps = []  # (grouped-conv row positions of a dtype, their groups, its GroupTaps, slow-dtype factor)
        call_s = 0.0
        for rows, eff, peak, factor, bs, classes in dtype_parts(t, self.kinds, profile, batch):
            if eff.group_tap_ns and t.groups is not None and (gsel := rows & (self.kinds == "gconv")).any():
                self.group_taps.append((np.flatnonzero(gsel), np.asarray(t.groups)[gsel],
                                        GroupTaps(eff.group_tap_ns, eff.group_call_ns, eff.group_fixed_us), factor))
            if (eff.group_multiple and eff.group_multiple > 1 and t.groups is not None
                    and (gsel := rows & (self.kinds == "gconv")).any()):
                self.group_slow.append((np.flatnonzero(gsel), eff.group_multiple, eff.group_slow_ns * 1e-9 * factor))
            for cls, mask in classes:
                sel = np.flatnonzero(mask)
                if eff.split:
                    coef = split_coefficients(profile, eff, cls, peak)
                    self.parts.append((sel, "split", (coef, streamed_weights(coef, profile), bs, factor,
                                                      eff.eager_threads)))
                else:
                    self.parts.append((sel, "roof", (peak * eff.compute_of(cls), eff.bandwidth_of(cls), bs, factor,
                                                     eff.misaligned_factor.get(cls, 1.0), eff.kernel_overhead_us * 1e-6)))
            for cls, ns in eff.element_ns.items():  # per-element costs fusion does not remove
                self.parts.append((np.flatnonzero(rows & of_class(self.kinds, cls, eff.element_ns)), "element",
                                   (ns * 1e-9 * factor,)))
            for cls, ns in eff.remainder_ns.items():  # a kernel's scalar tail over channels beyond its vector width
                self.parts.append((np.flatnonzero(rows & of_class(self.kinds, cls, eff.remainder_ns)), "remainder",
                                   (ns * 1e-9 * factor, eff.remainder_multiple.get(cls, profile.channel_multiple or 1))))
            self.const_rows[rows & (self.kinds == "view")] = eff.view_overhead_us * 1e-6
            if eff.glue_ns_per_byte:
                self.glue.append((np.flatnonzero(rows), eff.glue_ns_per_byte * 1e-9 * bs))
            call_s += eff.call_overhead_us * 1e-6 + eff.input_ns_per_element * 1e-9 * input_elements(t) * batch
        self.call_s = call_s
        self.unsupported = int((self.kinds == "unsupported").sum())

    def slow_kernel_ns(self, dtype: str) -> float | None:
        """The nanoseconds per FLOP the profile prices `dtype`'s slow grouped-convolution kernel at (None: no rule)."""
        if dtype not in self.profile.peak_gflops:
            return None
        eff = self.profile.eff(self.profile.runs(dtype)[0], self.batch)
        return eff.group_slow_ns if eff.group_multiple and eff.group_slow_ns > 0 else None

    def slow_rows(self, cin: np.ndarray, cout: np.ndarray) -> np.ndarray | None:
        """K x rows: the rows `seconds` prices on a slow kernel by the kernel's own measured speed (a grouped
        convolution off its dtype's group_multiple), which an anchor's correction leaves as they are; None where the
        profile has no such rows for this table."""
        if not self.group_slow:
            return None
        out = np.zeros(np.shape(cin), dtype=bool)
        for sel, multiple, _ in self.group_slow:
            out[:, sel] = per_group_off(cin[:, sel], cout[:, sel], np.asarray(self.table.groups)[sel], multiple)
        return out

    def seconds(self, q: np.ndarray, cin: np.ndarray, cout: np.ndarray, wb: np.ndarray, arb: np.ndarray,
                awb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(K x rows seconds, K seconds outside the operators) of K candidates, from their per-row quantities at
        the traced batch: `q` (K x rows x estimators.table.NQ), channels in and out, weight bytes and activation
        bytes read and written (K x rows)."""
        prof, t = self.profile, self.table
        scale = self.batch / t.batch
        gemm = q[:, :, Q_INDEX["gemm_macs"]] * 2 * scale
        elems = q[:, :, Q_INDEX["act_out"]] * scale
        flops = np.where(self.is_gemm, gemm, np.where(self.kinds == "maxpool", elems * self.window, elems))
        awb_paid = np.where(self.in_place, 0.0, awb)  # in-place rows write back what they read (in_place)
        abytes = (arb + awb_paid) * scale
        eager = {}  # per thread count: eager PyTorch's convolution dispatch columns
        m = prof.channel_multiple
        off = off_multiple(prof, self.kinds, cin, cout, t.groups)
        cache = prof.cache_bytes or 0
        # weights of a model larger than the cache stream from memory on every call
        streams = (wb.sum(1) > cache)[:, None] if cache > 0 else np.zeros((len(q), 1), dtype=bool)
        out = np.zeros(flops.shape)
        out += self.const_rows
        for sel, how, par in self.parts:
            f, w, a = flops[:, sel], wb[:, sel], abytes[:, sel]
            if how == "element":
                out[:, sel] += f * par[0]
                continue
            if how == "remainder":
                out[:, sel] += f * remainder_share(cin[:, sel], par[1]) * par[0]
                continue
            if how == "split":
                c, c_stream, bs, factor, threads = par
                eg = None
                if threads:
                    if threads not in eager:
                        eager[threads] = eager_terms(conv_shape(t), cin, cout, arb * scale * bs, awb * scale * bs,
                                                     self.batch, threads, m)
                    eg = tuple(x[:, sel] for x in eager[threads])
                cols = split_terms(f, w * bs, a * bs, self.pw[sel], off[:, sel], cache, eg)
                per = np.where(streams, cols @ c_stream, cols @ c) * factor
            else:
                peak_eff, share, bs, factor, slow_f, kern = par
                comp = f / peak_eff
                unit, fixed = roof_memory(prof, w, a, streams)
                mem = (unit / share + fixed) * bs
                slow = np.where(off[:, sel], slow_f, 1.0)
                body = comp * slow + mem if prof.combine == "sum" else np.maximum(comp, mem) * slow
                per = body * factor + kern
            out[:, sel] += per
        for sel, groups, taps, factor in self.group_taps:
            out[:, sel] += taps.seconds(cin[:, sel], groups, elems[:, sel], self.window[sel], self.batch) * factor
        for sel, multiple, s_per_flop in self.group_slow:
            # off its per-group multiple a grouped convolution leaves the fast kernel for a slow one (oneDNN's INT8
            # grouped convolution on AVX2 ran 0.75-0.9 ns per FLOP there, 30-80x its fast kernel): priced by its FLOPs
            slow = per_group_off(cin[:, sel], cout[:, sel], np.asarray(t.groups)[sel], multiple)
            out[:, sel] = np.where(slow, flops[:, sel] * s_per_flop, out[:, sel])
        outside = np.full(len(q), self.call_s)
        for rows, s_per_byte in self.glue:
            outside += awb_paid[:, rows].sum(1) * scale * s_per_byte
        return out, outside


def group_slow_rows(table: LayerTable, profile: HardwareProfile, batch_size: int = 1) -> tuple[int, int | None]:
    """(how many grouped convolutions of `table` the profile prices on their dtype's slow kernel, channels per group
    off its group_multiple; that multiple, None where no dtype of the table has the rule)."""
    model = LatencyModel(table, profile, batch_size)
    ev = evaluate(table)
    n, multiple = 0, None
    for sel, m, _ in model.group_slow:
        n += int(per_group_off(ev.cin[sel], ev.cout[sel], np.asarray(table.groups)[sel], m).sum())
        multiple = m
    return n, multiple


def group_slow_note(table: LayerTable, candidate: LayerTable, profile: HardwareProfile, batch_size: int = 1
                    ) -> str | None:
    """A note where `candidate` (an estimate of the original `table`) puts grouped convolutions on the slow kernel
    the profile prices for its dtype (an INT8 grouped convolution off its channel multiple per group): such a
    candidate can run slower than its unpruned INT8 original. None where it puts none there."""
    n, multiple = group_slow_rows(candidate, profile, batch_size)
    if not n or n <= group_slow_rows(table, profile, batch_size)[0]:
        return None
    return (f"{n} grouped convolution(s) of this candidate have channels per group that are not multiples of "
            f"{multiple}: this runtime runs them on a slow kernel here (priced in the prediction), which can make "
            f"the candidate slower than its unpruned original; `:round_to={multiple}` on the prune step keeps them "
            "on the fast one")


def predict_latency(table: LayerTable, profile: HardwareProfile, batch_size: int = 1, ev=None,
                    anchor=None) -> LatencyPrediction:
    """The latency of one table: LatencyModel's K = 1 case. `ev`: the table's estimates.table.evaluate() when
    the caller has it already (searches do). `anchor`: a hardware.anchor.Anchor of the original model on this
    target (its measured per-row correction); None: the profile's prediction alone."""
    ev = ev if ev is not None else evaluate(table)
    model = LatencyModel(table, profile, batch_size)
    rows, outside = model.seconds(ev.q[None], ev.cin[None], ev.cout[None], ev.weight_bytes[None],
                                  ev.act_read_bytes[None], ev.act_write_bytes[None])
    basis = "profile"
    if anchor is not None:
        corr = anchor.correction(table, model)
        rows, outside = corr.apply(rows, outside, model.slow_rows(ev.cin[None], ev.cout[None]))
        basis = corr.basis
    per_row = rows[0]
    return LatencyPrediction(float((per_row.sum() + outside[0]) * 1e3), per_row * 1e3, batch_size, profile.name,
                             profile.runtime, model.unsupported, basis, float(outside[0] * 1e3))
