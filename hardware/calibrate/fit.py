"""Calibration's fits: the split model per operator class (float rows timed in context, INT8 kernels timed alone),
the glue outside operators, quantized max pooling, and what a compiled INT8 graph adds to its kernels.

Every fit is a non-negative least-squares (or least-absolute, l1_nnls) fit on relative errors: the columns are
hardware.latency.split_terms's, named by hardware.latency.COL.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from estimators.table import LayerTable, evaluate

from ..latency import (ALL_CLASSES, COL, GEMM_CLASSES, SPLIT_WIDTH, columns, conv_shape, eager_terms, fused_mask, in_place,
                       input_elements, latency_kinds, misaligned, pointwise, remainder_share, row_features, split_terms)
from ..profile import SUBCLASSES, Efficiency
from .int8 import QPOOL_LANES, ElementSample, Int8Sample, WrapperSample
from .sampling import CHANNEL_MULTIPLE, NetSample

# columns of latency.split_terms each class is fitted with (the others are held at zero); eager PyTorch's
# convolution dispatch columns are zero where `threads` is 0; grouped and depthwise convolutions always run on
# oneDNN, so their fixed cost is the overhead column and ATen's native kernel never runs them
_GROUPED = columns("overhead", "flops", "flops_misaligned", "weight_bytes", "act_cache_bytes", "act_memory_bytes",
                   "reorder_in_bytes", "reorder_out_bytes", "flops_padded")
SPLIT_COLUMNS = {"conv": list(range(SPLIT_WIDTH)), "gconv": _GROUPED, "dwconv": _GROUPED,
                 "gemm": columns("overhead", "flops", "flops_misaligned", "weight_bytes", "act_cache_bytes",
                                 "act_memory_bytes")}
# a float grouped convolution priced from its own timing (Efficiency.group_tap_ns, group_call_ns, group_fixed_us: per
# output element and tap, per image and group, per call) is fitted on its activations' traffic alone: the synthetic
# networks hold about ten grouped convolutions per batch, and fitting them on all of _GROUPED's columns gave weights 2%
# of the read bandwidth, pricing a RegNet's grouped convolutions at 2-4x their measured time and a pruned one's cut in
# weights as a speed-up it did not have; an overhead column of their own put 36 us on every one, where the timed
# parts alone came within 10% of a RegNet's at batch 8
TIMED_GROUPED = columns("act_cache_bytes", "act_memory_bytes")
OTHER_COLUMNS = columns("overhead", "flops", "weight_bytes", "act_cache_bytes", "act_memory_bytes")
FIT_FLOOR_S = 20e-6  # relative errors are floored: a 2 us row should not weigh like a 2 ms one


def features(table: LayerTable, batch: int, multiple: int, cache: float, threads: int = 0):
    """The split model's columns of every row of `table` at `batch` (`threads`: convolutions dispatched as eager
    PyTorch does on that many threads; 0: a runtime that does not), the rows' classes and input channels."""
    ev = evaluate(table)
    flops, wbytes, abytes, kinds, cin, cout = row_features(table, batch, ev)
    scale = batch / table.batch
    eager = eager_terms(conv_shape(table), cin, cout, ev.act_read_bytes * scale, ev.act_write_bytes * scale, batch,
                        threads, multiple)
    return split_terms(flops, wbytes, abytes, pointwise(table), misaligned(cin, cout, multiple), cache,
                       eager), kinds, cin


def _columns(table: LayerTable, batch: int, multiple: int, cache: float, threads: int = 0):
    """The split model's columns of every row of `table` at `batch`, and the rows' classes."""
    return features(table, batch, multiple, cache, threads)[:2]


def _net_columns(net: NetSample, multiple: int, cache: float, threads: int = 0):
    return _columns(net.table, net.batch or net.table.batch, multiple, cache, threads)


def fit_split_model(nets: list[NetSample], multiple: int, cache: float, bound: dict[str, np.ndarray] | None = None,
                    threads: int = 0, timed_groups: bool = False) -> tuple[dict[str, np.ndarray], float, float]:
    """Per class, non-negative least squares of every row's seconds on the split model's columns, each row's
    error relative to its network's total (what a network's prediction sums: fitting each row's own relative
    error let the many small rows pull the large ones down and under-predicted the synthetic networks by 5-9%
    in sample). A one-row sample (a kernel timed alone) is fitted on its relative error. `bound`: another
    batch's fit whose per-operator overheads (column 0) bound these from below (a larger batch does not
    dispatch an operator faster; a small budget's noise could say so). `threads`: the networks ran in eager
    PyTorch on that many threads (its convolution dispatch is fitted; 0: they did not). `timed_groups`: the rows'
    grouped convolutions have their timed compute taken out (calibrate.profile): they are fitted on TIMED_GROUPED.
    Returns (seconds per column unit per class, view seconds, mean relative error of the rows, floored)."""
    from scipy.optimize import nnls

    cols, kinds, t, whole = [], [], [], []
    for net in nets:
        c, k = _net_columns(net, multiple, cache, threads)
        cols.append(c)
        kinds.append(k)
        t.append(net.row_seconds)
        whole.append(np.full(len(k), net.total_seconds + FIT_FLOOR_S))
    C, K, T, N = np.concatenate(cols), np.concatenate(kinds), np.concatenate(t), np.concatenate(whole)
    coef: dict[str, np.ndarray] = {}
    err, wsum = 0.0, 0.0
    for cls in ALL_CLASSES:
        sel = K == cls
        if sel.sum() < 8:
            continue
        use = TIMED_GROUPED if timed_groups and cls == "gconv" else SPLIT_COLUMNS.get(cls, OTHER_COLUMNS)
        w = 1.0 / N[sel]
        A = C[sel][:, use] * w[:, None]
        # 1x1 rows' FLOPs at their own rate: column 1 takes the other rows' FLOPs, column 2 the 1x1 rows'; both
        # rates are non-negative, and the 1x1 rate less the other is the model's column 2. Why: 1x1 convolutions run
        # faster per FLOP, a factor below 1 that a non-negative extra term could not express
        f_col, pw_col = COL["flops"], COL["flops_1x1"]
        split_pw = f_col in use and pw_col in use
        if split_pw:
            A[:, use.index(f_col)] -= A[:, use.index(pw_col)]
        scale = np.maximum(np.abs(A).max(0), 1e-30)  # columns differ by 12 orders of magnitude
        low = np.zeros(len(use))
        if bound is not None and cls in bound and use[0] == COL["overhead"]:
            low[0] = bound[cls][use[0]]  # the per-operator overhead
        x, _ = nnls(A / scale, T[sel] * w - A @ low)
        full = np.zeros(C.shape[1])
        full[use] = x / scale + low
        if split_pw:
            full[pw_col] -= full[f_col]
        coef[cls] = full
        err += float((np.abs(C[sel] @ full - T[sel]) / (T[sel] + FIT_FLOOR_S)).sum())
        wsum += float(sel.sum())
    view = K == "view"
    view_s = float(np.median(T[view])) if view.any() else 0.0
    return coef, view_s, err / max(wsum, 1.0)


def predict_rows(nets: list[NetSample], coef: dict[str, np.ndarray], view_s: float, multiple: int, cache: float,
                 threads: int = 0):
    out = []
    for net in nets:
        c, k = _net_columns(net, multiple, cache, threads)
        p = np.zeros(len(k))
        for cls, x in coef.items():
            sel = k == cls
            p[sel] = c[sel] @ x
        p[k == "view"] = view_s
        out.append(p)
    return out


def _ops(net: NetSample) -> float:
    return float((np.array(net.table.kinds) != "param").sum())


def _written(net: NetSample) -> float:
    """Activation bytes the network's operators write into outputs they allocate (not in place: latency.in_place)."""
    written = np.where(in_place(net.table, latency_kinds(net.table)), 0.0, evaluate(net.table).act_write_bytes)
    return float(written.sum()) * (net.batch or net.table.batch) / net.table.batch


def glue_columns(net: NetSample) -> list[float]:
    return [_ops(net), 1.0, _written(net)]


# which of the glue terms (per operator, per call, per byte written) the first batch's fit bounds at larger batches:
# the per-byte term is free, because a larger batch writes fewer, larger output blocks and costs less per byte
# (bounding it over-predicted the networks that write the most bytes, inverted residuals)
GLUE_FLOOR_TERMS = (1.0, 1.0, 0.0)


def glue_bound(glue: tuple[float, float, float]) -> tuple[float, float, float]:
    """The lower bound the first batch's glue (fit_glue) sets on a larger batch's: its per-operator and per-call
    terms, not its per-byte one (GLUE_FLOOR_TERMS)."""
    return tuple(float(g) * keep for g, keep in zip(glue, GLUE_FLOOR_TERMS))


def fit_glue(nets: list[NetSample], floor: tuple[float, float, float] = (0.0, 0.0, 0.0)
             ) -> tuple[float, float, float]:
    """Seconds per operator, per call and per activation byte written that the untimed network spends outside
    its operators (the program's Python between calls; allocating and freeing outputs: the untimed time grows
    with the activations, 5 us per operator in networks of under 1 MB of weights, 10 in those of over 20 MB),
    non-negative least squares on the networks' relative error, bounded below by `floor` (another batch's: a
    larger batch does not run the Python between operators faster)."""
    from scipy.optimize import nnls

    y = np.array([n.total_seconds - n.row_seconds.sum() for n in nets])
    if not (y > 0).any():  # no networks, or none spends time outside its operators
        return floor
    A = np.array([glue_columns(n) for n in nets])
    w = 1.0 / np.array([n.total_seconds for n in nets])
    low = np.asarray(floor, dtype=float)
    x, _ = nnls(A * w[:, None], (np.maximum(y, 0.0) - A @ low) * w)
    return float(x[0] + low[0]), float(x[1] + low[1]), float(x[2] + low[2])


def network_error(nets: list[NetSample], coef, view_s: float, glue: tuple[float, float, float], multiple: int,
                  cache: float, threads: int = 0):
    """Relative error of every network's predicted total (rows + glue) against its untimed total."""
    pred = predict_rows(nets, coef, view_s, multiple, cache, threads)
    return np.array([(p.sum() + np.dot(glue_columns(n), glue)) / n.total_seconds - 1 for n, p in zip(nets, pred)])


def unbiased(nets: list[NetSample], coef: dict[str, np.ndarray], view_s: float, glue: tuple[float, float, float],
             multiple: int, cache: float, threads: int = 0):
    """The fit scaled so that the networks' mean relative error is zero: least squares on relative errors, with
    non-negative coefficients, leaves the networks' totals 2-3% under-predicted on average (in sample). Every term
    is linear in the coefficients, so one factor moves all predictions alike. Returns (coef, view_s, glue, factor,
    the networks' relative errors after scaling)."""
    err = network_error(nets, coef, view_s, glue, multiple, cache, threads)
    k = 1.0 / (1.0 + float(err.mean())) if len(err) else 1.0
    return {c: x * k for c, x in coef.items()}, view_s * k, tuple(g * k for g in glue), k, (1.0 + err) * k - 1.0


def split_efficiency(coef: dict[str, np.ndarray], view_s: float, peak: float, bwr: float, cbw: float, bw: float,
                     glue: tuple[float, float, float] = (0.0, 0.0, 0.0), fused: list[str] | None = None,
                     threads: int = 0) -> Efficiency:
    """The fitted seconds per unit as a profile's efficiencies (inverse of latency.split_coefficients); the
    per-operator glue joins every class's overhead, the per-call glue is the call overhead, the per-byte glue
    glue_ns_per_byte. `threads`: the eager dispatch was fitted for that many threads (eager_threads)."""
    fallback = coef.get("elementwise", next(iter(coef.values())))
    compute, bandwidth, wband, spill, over, pwf, misf = {}, {}, {}, {}, {}, {}, {}
    onednn, rin, rout, natf, pads = {}, {}, {}, {}, {}

    def share(x, ref):
        return float(min(50.0, 1.0 / (ref * x))) if x > 0 else 50.0

    for cls in ALL_CLASSES:
        x = coef.get(cls)
        if x is None:
            x = coef.get("gemm", fallback) if cls == "attention" else coef.get(SUBCLASSES.get(cls, ""), fallback)
        c_f = x[COL["flops"]] if x[COL["flops"]] > 0 else 1.0 / (4.0 * peak * 1e9)
        compute[cls] = float(min(4.0, 1.0 / (peak * 1e9 * c_f)))
        over[cls] = round(float((x[COL["overhead"]] + glue[0]) * 1e6), 3)
        # a fitted subclass states its zeros: a missing entry would fall back to its class's (gconv to conv's)
        own = cls in coef and cls in SUBCLASSES and cls in GEMM_CLASSES
        if x[COL["flops_1x1"]] != 0 or own:
            pwf[cls] = round(float(np.clip(1.0 + x[COL["flops_1x1"]] / c_f, 0.05, 8.0)), 4)
        if x[COL["flops_misaligned"]] > 0 or own:
            misf[cls] = round(float(min(8.0, 1.0 + x[COL["flops_misaligned"]] / c_f)), 4)
        if x[COL["onednn"]] > 0 or own:
            onednn[cls] = round(float(x[COL["onednn"]] * 1e6), 3)
        if x[COL["reorder_in_bytes"]] > 0 or own:
            rin[cls] = round(float(x[COL["reorder_in_bytes"]] * 1e9), 5)
        if x[COL["reorder_out_bytes"]] > 0 or own:
            rout[cls] = round(float(x[COL["reorder_out_bytes"]] * 1e9), 5)
        if x[COL["flops_native"]] > 0 or own:
            natf[cls] = round(float(min(8.0, 1.0 + x[COL["flops_native"]] / c_f)), 4)
        if x[COL["flops_padded"]] > 0 or own:
            pads[cls] = round(float(x[COL["flops_padded"]] * 1e9), 6)
        wband[cls] = share(x[COL["weight_bytes"]], bwr * 1e9)
        bandwidth[cls] = share(x[COL["act_cache_bytes"]], cbw * 1e9)
        spill[cls] = share(x[COL["act_memory_bytes"]], bw * 1e9)
    return Efficiency(compute=compute, bandwidth=bandwidth, kernel_overhead_us=float(np.median(list(over.values()))),
                      view_overhead_us=round((view_s + glue[0]) * 1e6, 3), call_overhead_us=round(glue[1] * 1e6, 3),
                      fused=list(fused or []), misaligned_factor=misf, overhead_us=over, weight_bandwidth=wband,
                      spill_bandwidth=spill, pointwise_factor=pwf, eager_threads=threads if onednn or rin or rout
                      or natf or pads else 0, onednn_us=onednn, reorder_in_ns=rin, reorder_out_ns=rout,
                      native_factor=natf, padding_ns=pads, glue_ns_per_byte=round(float(glue[2]) * 1e9, 6))


FUSED_INT8 = ["norm", "elementwise"]  # inductor folds norms into the int8 conv and fuses activations and adds
# no INT8 convolution post-op: these run in the graph's generated loops (a squeeze-excitation's gate and product)
UNFUSED_INT8 = ["sigmoid", "sigmoid_", "hardsigmoid", "hardsigmoid_", "mul", "mul_", "__mul__", "__rmul__", "__imul__",
                "div", "div_", "__truediv__", "sub", "sub_", "__sub__", "__rsub__"]


def _pool_columns(flops: np.ndarray, cin: np.ndarray) -> np.ndarray:
    """Quantized max pools' columns: 1, FLOPs (output elements x window), FLOPs on the channels beyond a multiple
    of QPOOL_LANES (fit_pool's coefficients price them)."""
    return np.stack([np.ones(len(flops)), flops, flops * remainder_share(cin, QPOOL_LANES)], 1)


def fit_pool(samples: list[NetSample]) -> np.ndarray:
    """Seconds per call, per FLOP (output elements x window) and per FLOP on the channels beyond a multiple of
    QPOOL_LANES, non-negative least squares on the relative error."""
    from scipy.optimize import nnls

    rows = []
    for s in samples:
        flops, _, _, kinds, cin, _ = row_features(s.table, s.batch)
        i = int(np.flatnonzero(kinds == "maxpool")[0])
        rows.append(_pool_columns(flops[i:i + 1], cin[i:i + 1])[0] / s.total_seconds)
    x, _ = nnls(np.array(rows), np.ones(len(rows)))
    return x


def element_ns(samples: list[ElementSample]) -> dict[str, float]:
    """Per class, nanoseconds per element (median over the samples, at least 0)."""
    out = {}
    for cls in sorted({s.act for s in samples}):
        v = [s.seconds / s.elements * 1e9 for s in samples if s.act == cls and s.elements > 0]
        if len(v) >= 3:
            out[cls] = round(max(0.0, float(np.median(v))), 5)
    return out


def int8_parts(sample: Int8Sample, coef8: dict[str, np.ndarray], cache: float,
                elem_ns: dict[str, float] | None = None, pool: np.ndarray | None = None,
                multiple: int = CHANNEL_MULTIPLE) -> np.ndarray:
    """A compiled INT8 network's INT8 estimate (fused rows dropped) as [1, convolutions and linears, other
    operators (generated loops, the input's quantization among them), elements those read and write, the
    convolutions' and linears' predicted seconds (the INT8 kernel fit, with fused transcendental activations
    at `elem_ns`), the activation bytes the convolutions and linears read and write, the max pools' predicted
    seconds (`pool`: fit_pool), the elements of those other operators that reorder memory (`permute`), the
    convolutions' and linears' activation bytes up to the cache's size]."""
    cols, kinds, cin = features(sample.table, sample.batch, multiple, cache)
    keep = ~fused_mask(sample.table, kinds, FUSED_INT8, UNFUSED_INT8) & (kinds != "param") & (kinds != "view")
    parts = np.zeros(9)
    parts[0] = 1.0
    if pool is not None:  # quantized max pooling: its own fit (column 1 of the split model is the FLOPs)
        mp = keep & (kinds == "maxpool")
        parts[6] = (_pool_columns(cols[mp, 1], cin[mp]) @ pool).sum()
        keep = keep & ~mp
    gemm = keep & np.isin(kinds, GEMM_CLASSES)
    parts[5] = cols[gemm][:, 5:7].sum()
    parts[8] = cols[gemm][:, 5].sum()  # of which up to the cache's size (what a kernel timed alone finds in it)
    for cls in set(kinds[gemm]):
        sel = gemm & (kinds == cls)
        parts[4] += (cols[sel] @ coef8.get(cls, coef8.get("conv"))).sum()
    parts[1] = gemm.sum()
    other = keep & ~gemm
    # the graph quantizes its float input in one more generated loop (read and written: two per element)
    parts[2] = other.sum() + 1
    parts[3] = cols[other][:, 5:7].sum() + 2 * input_elements(sample.table) * sample.batch  # INT8: a byte an element
    parts[7] = cols[other & (kinds == "permute")][:, 5:7].sum()
    for cls, ns in (elem_ns or {}).items():  # evaluated in the kernels' post-ops
        parts[4] += cols[kinds == cls, 1].sum() * ns * 1e-9
    return parts


@dataclass
class Int8Fit:
    """What a compiled INT8 graph adds to its oneDNN kernels timed alone."""

    kernel_s_ctx: dict[int, float]  # per batch: seconds a kernel in a graph adds to the same kernel timed alone
    byte_s_ctx: dict[int, float]  # per batch: seconds per activation byte up to the cache's size it adds
    call_s: float  # per call (guards, the compiled region's entry)
    kernel_s: float  # per convolution/linear outside its kernel (the Python wrapper's call)
    other_s: float  # per other operator (a generated loop)
    element_s: float  # per element a generated loop reads or writes
    mape: float
    permute_s: float = 0.0  # more per element a loop that reorders memory (a channel shuffle) reads or writes
    byte_s: float = 0.0  # outside kernels and loops, per activation byte (INT8: per element) operators move


def wrapper_costs(samples: list[WrapperSample], coef8: dict[str, np.ndarray] | None = None, cache: float = 0.0,
                  multiple: int = CHANNEL_MULTIPLE) -> tuple[float, float, float] | None:
    """Seconds a compiled INT8 graph adds per call (its input's quantizing loop left out: priced as another
    operator), per convolution/linear beyond its kernel alone, and per generated loop (its elements aside), from
    int8.WrapperChains: medians over the samples; None without any. With `coef8` (the batch-1 INT8 kernel
    fit) each sample's costs are taken at the fit's level: scaled by the fit's prediction for the chain's kernel over
    that kernel as timed with the chains (one calibration timed the chains and their kernel 1.6-1.8x slower than
    another minutes later; relative to the kernel, the call moved by 12%, a kernel's wrapper by 2x: a slow spell
    slows the Python wrapper more than oneDNN, hence several readings and their median)."""
    if not samples:
        return None
    out = []
    for s in samples:
        scale = 1.0
        if coef8 is not None and s.table is not None and s.alone_s > 0:
            fitted = int8_parts(Int8Sample("chain kernel", s.table, 1, 0.0), coef8, cache, multiple=multiple)[4]
            scale = fitted / s.alone_s if fitted > 0 else 1.0
        per_kernel = (s.long_s - s.short_s) / (s.long_ops - s.short_ops)
        other = max((s.gated_s - s.long_s) / s.long_ops, 0.0)
        out.append((max(s.short_s - s.short_ops * per_kernel - other, 0.0) * scale,
                    max(per_kernel - s.alone_s, 0.0) * scale, other * scale))
    return tuple(float(v) for v in np.median(np.array(out), axis=0))


def fit_int8(samples: list[Int8Sample], coefs8: dict[int, dict[str, np.ndarray]], cache: float,
             elem_ns: dict[str, float] | None = None, pool: np.ndarray | None = None,
             multiple: int = CHANNEL_MULTIPLE, wrapper: tuple[float, float, float] | None = None) -> Int8Fit:
    """Kernels in a graph take longer than the same kernels timed alone, where their input stays in the cache:
    per batch, the networks' profiled oneDNN kernel time beyond the kernel fit's prediction on their kernel count
    and their activation bytes up to the cache's size (bytes beyond it come from memory alone too), non-negative
    and least absolute (l1_nnls), because INT8 networks are not paced and a few timed in a slow spell would pull
    a least-squares fit far up. The generated loops' profiled time is
    fitted per other operator and per element those move; what remains of each call (the Python wrapper,
    guards, allocation) per call, per convolution/linear and per other operator. All on the networks'
    relative error. `wrapper` (wrapper_costs: the call, a kernel's wrapper and a generated loop, timed directly) takes
    the place of those three fitted prices and of the per-kernel context."""
    from scipy.optimize import nnls

    near = np.array([nearest_batch(s.batch, list(coefs8)) for s in samples])
    A = np.array([int8_parts(s, coefs8[b], cache, elem_ns, pool, multiple) for s, b in zip(samples, near)])
    T = np.array([s.total_seconds for s in samples])
    K = np.array([s.kernel_seconds for s in samples])
    P = np.array([s.pool_seconds for s in samples])
    G = np.array([s.loop_seconds for s in samples])
    per_k, per_b = {}, {}
    kern = A[:, 4].copy()
    # with the wrapper timed directly (wrapper_costs), what a graph adds per kernel is in its per-operator price, and
    # only the activation bytes in the cache are fitted here
    ctx = [8] if wrapper is not None else [1, 8]
    for b in sorted(coefs8):
        sel = (near == b) & (K > 0)
        x = np.zeros(2)
        if sel.sum() >= 2:
            x[2 - len(ctx):] = l1_nnls(A[sel][:, ctx] / K[sel, None], (K[sel] - A[sel, 4]) / K[sel])
        per_k[b], per_b[b] = float(x[0]), float(x[1])
        at = near == b
        kern[at] = A[at, 4] + A[at][:, [1, 8]] @ x
    w = 1.0 / T
    # per other operator and per element moved, on the networks without reordering loops (where there are some:
    # fitted together, three networks with channel shuffles let the per-operator cost take what their shuffles
    # cost, 51-154 us an operator); then what reordering adds per element, on the rest of the others' loop time
    plain = A[:, 7] == 0
    fit_on = plain if plain.sum() >= 2 else np.ones(len(A), dtype=bool)
    loop = np.zeros(3)
    loop[:2], _ = nnls(A[fit_on][:, [2, 3]] * w[fit_on, None], G[fit_on] * w[fit_on])
    if (~plain).any():
        rest = G - A[:, [2, 3]] @ loop[:2]
        loop[2:], _ = nnls(A[~plain][:, [7]] * w[~plain, None], rest[~plain] * w[~plain])
    # what is priced apart from the call, the operators' wrappers and the bytes moved: the kernels in context,
    # pooling and the generated loops' elements
    parts = A[:, 3] * loop[1] + A[:, 7] * loop[2] + kern + A[:, 6]
    moved = A[:, 3] + A[:, 5]
    if wrapper is not None:
        # timed directly: the call, a kernel's wrapper and a generated loop's whole price per operator (its
        # elements aside); what the networks' totals leave beyond those is fitted per activation byte moved,
        # least absolute (a network timed in a slow spell does not pull it up)
        call, per_kernel, per_other = wrapper
        left = T - (call + A[:, 1] * per_kernel + A[:, 2] * per_other + parts)
        byte = float(l1_nnls(moved[:, None] * w[:, None], left * w)[0]) if len(T) else 0.0
    else:
        # the rest of a call: per call, per operator (kernel or loop: the wrapper calls each alike) and per
        # activation byte (allocating outputs: 8-11 us an operator at batch 1, 15-48 at batch 8 in the same
        # networks); fitting kernels and loops apart, with no byte term, put 293 us on the call and nothing on a
        # kernel (6 networks)
        wrap, _ = nnls(np.stack([A[:, 0], A[:, 1] + A[:, 2], moved], 1) * w[:, None],
                       np.maximum(T - K - P - G, 0.0) * w)
        call, per_kernel, per_other, byte = float(wrap[0]), float(wrap[1]), float(wrap[1] + loop[0]), float(wrap[2])
    pred = call + A[:, 1] * per_kernel + A[:, 2] * per_other + moved * byte + parts
    return Int8Fit(per_k, per_b, call, per_kernel, per_other, float(loop[1]),
                   float(np.abs(pred / T - 1).mean()) if len(T) else 0.0, float(loop[2]), byte)


def l1_nnls(A: np.ndarray, y: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Non-negative x with the least sum of absolute residuals |A x - y| (iteratively reweighted non-negative least
    squares): a median-like fit, which a few samples timed during a slow spell do not pull as they pull a
    least-squares one."""
    from scipy.optimize import nnls

    x, _ = nnls(A, y)
    for _ in range(iterations):
        w = 1.0 / np.sqrt(np.maximum(np.abs(A @ x - y), 1e-4))
        nxt, _ = nnls(A * w[:, None], y * w)
        if np.allclose(nxt, x, rtol=1e-6, atol=1e-12):
            return nxt
        x = nxt
    return x


def nearest_batch(batch: int, calibrated: list[int]) -> int:
    return min(calibrated, key=lambda b: (abs(np.log2(b) - np.log2(batch)), b))


def int8_coef(coef: dict[str, np.ndarray], coef8: dict[str, np.ndarray], f: Int8Fit, batch: int,
               pool: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per class seconds per split-model unit for compiled INT8 at `batch`: the INT8 kernel fit (plus what a
    graph adds to a kernel and the wrapper's call) for convolutions and linears; for other operators a generated loop,
    per operator and per element moved (activation bytes: one per element)."""
    out = {}
    for cls in set(coef) | set(coef8) | {"permute"}:  # coef8 holds convolution/linear classes only
        if cls in GEMM_CLASSES:
            y = coef8.get(cls, coef8.get("conv", coef.get(cls))).copy()
            y[COL["overhead"]] += f.kernel_s + f.kernel_s_ctx[batch]
            y[COL["act_cache_bytes"]] += f.byte_s_ctx[batch] + f.byte_s
            y[COL["act_memory_bytes"]] += f.byte_s
        elif cls == "maxpool" and pool is not None:  # quantized max pooling (its channel tail: remainder_ns)
            y = np.zeros(SPLIT_WIDTH)
            y[COL["overhead"]], y[COL["flops"]] = pool[0] + f.kernel_s, pool[1]
        else:
            y = np.zeros(SPLIT_WIDTH)
            per = f.element_s + f.byte_s + (f.permute_s if cls == "permute" else 0.0)
            y[COL["overhead"]], y[COL["act_cache_bytes"]], y[COL["act_memory_bytes"]] = f.other_s, per, per
        out[cls] = y
    return out
