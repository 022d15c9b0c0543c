"""Calibration: fit the host profile to operators timed inside running networks on this machine.

Single-operator loops flatter a CPU: weights and inputs stay hot in the cache and no other operator
evicts them, so they miss by 30-60% against the same operator inside a model (seen here: BatchNorm
1.7x, a 5 MB classifier 4.9x slower in context). Calibration therefore times every operator *inside*
random synthetic CNNs (hardware.synthetic: strided stems, plain, residual, bottleneck, grouped,
inverted-residual and squeeze-excitation blocks, concatenation, pooling, linear heads; widths drawn
freely, aligned or not) exported as deployfit's artifacts are, at each calibrated batch size. That
covers GEMM, dense/depthwise/grouped convolutions over a spread of shapes, elementwise, pooling,
normalisation and copies. Per operator class a non-negative least-squares fit of the split model
(hardware.latency.split_terms: overhead, FLOPs, 1x1 and misaligned-channel FLOPs, weight bytes,
activation bytes in and beyond the cache, and eager PyTorch's convolution dispatch: oneDNN's fixed cost and
its slow reorders of activations whose channels are not multiples of 16, ATen's native kernel for small
batch-1 dense convolutions) on the rows' errors relative to their networks' totals gives the efficiencies;
the networks' untimed totals give the per-operator dispatch, per-call and per-byte costs outside the
operators (a network whose rows and totals disagree, a slow spell of this machine, is timed again). INT8
runs compiled (inductor with freezing), where operators cannot be timed one by one inside the graph: the oneDNN INT8
convolution and linear kernels the compiled graph calls are timed directly (prepacked weights, uint8
channels-last activations, the activation that follows each layer fused as a post-op; a SiLU is timed
with and without, for its cost per element; several hundred kernels of the synthetic networks' layers,
no compile) and fitted per class like FP32; quantized max pooling is timed the same way (its channels
beyond a multiple of 32 run a scalar tail). Whole quantized synthetic networks, compiled and profiled
(torch.profiler, inductor's kernel profile on), then split each call into oneDNN kernels, quantized
pooling, generated loops and the rest (Python wrapper, guards): what a graph adds to its kernels (per
kernel and per activation byte up to the cache's size; a least-absolute fit), the generated loops' cost
(per operator and per element moved; the graph's quantization of its float input is one of them, priced
per input element) and the
per-call and per-kernel wrapper costs are each fitted on their own part. Calibration never runs the
benchmark models, so bench/latency.py tests what it fitted. The float networks are paced: the pace network
(hardware.measure.PaceReference) is read before and after each, and each is brought to the calibration's median
pace before fitting (at_one_pace), which follows this VM's drift network by network; the profile's
`provenance.pace_ms` is that pace. How much of the pace network's drift a network's latency follows (on this VM
about 0.7 of it) is measured by timing the first networks' totals again at the end of the float part
(pace_elasticity: `provenance.pace_elasticity`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from estimators.errors import CALIBRATION_BUDGET_S, QUICK_CALIBRATION_S
from estimators.progress import status, step
from estimators.pruning import PrunePlan
from estimators.registry import Q_INDEX
from estimators.table import LayerTable, build_table, evaluate
from estimators.trace import trace_model

from .latency import (ALL_CLASSES, COL, GEMM_CLASSES, SPLIT_WIDTH, columns, _row_features, conv_shape, eager_terms, fused_mask,
                      in_place, input_elements, latency_kinds, misaligned, pointwise, remainder_share, split_terms)
from .measure import PaceClock, StateClock, at_pace, cpu_isa, cpu_name, dominant_state, measure_latency, same_state
from .profile import SUBCLASSES, Efficiency, HardwareProfile, Provenance

Progress = Callable[[str], None]
State = Callable[[], float]  # the machine's state now (hardware.measure.StateClock; a constant where not tracked)
Pace = Callable[..., float]  # the pace network's latency now, ms (hardware.measure.PaceClock; 0 where not read)


def _unread(fresh: bool = False) -> float:
    """A Pace that reads nothing."""
    return 0.0


def _around(before: float, after: float) -> float:
    """The pace while a sample was timed: the mean of readings before and after it (the one read where one was
    not). Not the lower of the two: that is biased low against the median the profile's pace is, and put +7.5% on
    every paced prediction of the benchmark (2026-11-29); a stall that hit one reading is dropped by PACE_BAND."""
    read = [p for p in (before, after) if p > 0]
    return float(np.mean(read)) if read else 0.0


# a sample timed while the pace network ran more than this factor away from the calibration's median is dropped:
# a stall of the VM hit its pace reading or it (one calibration read the pace network at up to 72 ms, its median
# 4.5 ms; the drift of every other reading of four calibrations stayed within 0.7-1.5x of their medians)
PACE_BAND = 2.0
PACE_LEAST = 3  # networks per batch kept however far from the pace they were timed (the nearest), to fit anything
# networks whose totals are timed again at the end of the float part (their first networks, a minute or so later):
# how much of the pace network's drift a network's latency follows (pace_elasticity), and the budget share kept
RETIMED = 8
RETIME_SHARE = 0.05
ELASTICITY_LEAST = 8  # pairs of timings of one network needed to measure the elasticity (1 without)
BATCHES = (1, 8)  # batch sizes calibrated; a prediction uses the nearest (hardware.profile.HardwareProfile.eff)
CHANNEL_MULTIPLE = 16  # oneDNN's channel blocking with AVX-512 (8 with AVX2 alone: channel_multiple)
CACHE_SHARE = 0.25  # activations up to this share of the last-level cache move at cache speed (best fit of 1/4, 1/2, 1)
INT8_LANES = 4  # int8 dot products (VNNI) do 4x the multiply-adds of fp32 FMA per instruction
# share of the budget for the float networks; the INT8 part's compiled networks (10-20 s each, compiling at two
# batches) get most of the rest: at 0.5 of 150 s only 3 were compiled, fitting 9 coefficients
FP32_SHARE = 0.45
QUICK_FIT_S = 8.0  # what a quick calibration keeps of its QUICK_CALIBRATION_S for its fit
QUICK_FP32_SHARE = 0.7  # a quick calibration's float share: the rest times INT8 kernels and quantized pooling
# the least a quick calibration times whatever its budget, and the least each fit needs: on a busy machine (another
# process on one of the two cores) a synthetic network took 6-9 s, and minimums of 3 networks, 24 kernels and 12
# pools took a 45 s quick calibration to 52 s; above the least, nothing is started that would end past the budget
QUICK_LEAST = {"fp32 networks": 1, "int8 kernels": 8, "int8 pools": 4}


def light_table(model: nn.Module, example: torch.Tensor, name: str = "bench") -> LayerTable:
    """Analysis without the pruning plan (micro-benchmarks need costs only)."""
    tr = trace_model(model, example)
    table, _ = build_table(name, tuple(example.shape), tr, PrunePlan())
    return table


def channel_multiple(isa: str) -> int:
    """oneDNN's channel block on a CPU with these features (hardware.measure.cpu_isa): 16 floats fill an AVX-512
    register, 8 an AVX2 one; CHANNEL_MULTIPLE where the features are unknown."""
    if not isa:
        return CHANNEL_MULTIPLE
    return 16 if "avx512f" in isa.split("+") else 8


def cache_bytes() -> int:
    """Last-level cache size from sysfs (8 MiB when unknown)."""
    best = 0
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (idx / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(size[-1:], 1)
        best = max(best, int(size.rstrip("KMG")) * mult)
    return best or 8 * 1024**2


def measure_peaks(progress: Progress) -> tuple[float, float, float, float]:
    """Peak FP32 GEMM throughput (GFLOP/s), DRAM and cache copy bandwidth (GB/s, read + write), DRAM read
    bandwidth (GB/s, a reduction over 256 MB)."""
    a = torch.randn(1024, 1024)
    b = torch.randn(1024, 1024)
    m = measure_latency(lambda x: torch.mm(x, b), a, warmup=2, min_runs=10, budget_s=1.0)
    gflops = 2 * 1024**3 / (m["latency_ms"] / 1e3) / 1e9
    big = torch.randn(64 * 1024 * 1024 // 4 * 2)  # 128 MB
    m2 = measure_latency(lambda x: x.clone(), big, warmup=2, min_runs=5, budget_s=1.0)
    gbs = 2 * big.numel() * 4 / (m2["latency_ms"] / 1e3) / 1e9
    small = torch.randn(256 * 1024)  # 1 MB: stays in cache
    m3 = measure_latency(lambda x: x.clone(), small, warmup=5, min_runs=50, budget_s=0.5)
    cbs = 2 * small.numel() * 4 / (m3["latency_ms"] / 1e3) / 1e9
    huge = torch.randn(64 * 1024 * 1024)  # 256 MB
    m4 = measure_latency(lambda x: x.sum(), huge, warmup=1, min_runs=5, budget_s=1.0)
    rbs = huge.numel() * 4 / (m4["latency_ms"] / 1e3) / 1e9
    progress(f"peak fp32 GEMM {gflops:.1f} GFLOP/s, DRAM copy {gbs:.1f} GB/s, DRAM read {rbs:.1f} GB/s, "
             f"cache copy {cbs:.1f} GB/s")
    return gflops, gbs, cbs, rbs


@dataclass
class NetSample:
    """One synthetic network timed in context: its analysis, every row's seconds, the untimed total."""

    label: str
    table: LayerTable
    row_seconds: np.ndarray
    total_seconds: float
    batch: int = 0  # the batch the rows were timed at (0: the table's)
    probe_us: float = 0.0  # the machine's state when it was timed (hardware.measure.StateClock; 0: not read)
    pace_ms: float = 0.0  # the pace network's latency then (hardware.measure.PaceClock; 0: not read)


def exported(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """The form deployfit's artifacts run in: the torch.export program (dynamic batch) as a module."""
    ex = torch.randn(max(2, shape[0]), *shape[1:])
    ep = torch.export.export(model, (ex,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    return ep.module()


def time_network(model: nn.Module, x: torch.Tensor, label: str, runs: int = 3, tries: int = 2) -> NetSample:
    """Analyse `model` and time every row of it in context, plus its untimed total (the mean of the medians
    measured before and after the rows). This machine slows down for seconds at a time (other tenants):
    when the rows add up to more than the untimed network or the two totals disagree by more than 15%, a
    slow spell overlapped the timing and it is repeated (up to `tries` times, keeping the most consistent)."""
    from .timing import row_times

    table = light_table(model, x, name=label)
    ops = int((np.array(table.kinds) != "param").sum())  # parameter rows (appended last) run nothing
    best: tuple[float, np.ndarray, float] | None = None
    for _ in range(max(1, tries)):
        before = measure_latency(model, x, warmup=1, min_runs=3, max_runs=20, budget_s=0.1)["latency_ms"] / 1e3
        rows = np.array(row_times(model, x, runs=runs, warmup=1))
        after = measure_latency(model, x, warmup=0, min_runs=3, max_runs=20, budget_s=0.1)["latency_ms"] / 1e3
        if len(rows) != ops:
            raise RuntimeError(f"{label}: timed {len(rows)} operators, analysed {ops}")
        total = 0.5 * (before + after)
        # inconsistency: rows beyond the total (the timer only adds), or totals apart
        bad = max(rows.sum() / total - 1.0, 0.0) + abs(before - after) / total
        if best is None or bad < best[0]:
            best = (bad, rows, total)
        if bad <= 0.15:
            break
    _, rows, total = best
    return NetSample(label, table, np.concatenate([rows, np.zeros(table.n - ops)]), total)


def network_samples(budget_s: float, progress: Progress, batches: tuple[int, ...] = BATCHES, max_nets: int = 400,
                    seed0: int = 0, min_nets: int = 4, state: State = lambda: 0.0, pace: Pace = _unread,
                    retime: int = RETIMED, tries: int = 2) -> tuple[dict[int, list[NetSample]], list[NetSample]]:
    """Time synthetic networks (hardware.synthetic), exported as artifacts are, operator by operator at every
    batch size until the budget is spent (and at least `min_nets`, so that a tiny budget still fits); then time
    the totals of the first `retime` of them again (retime_totals). Returns the samples by batch and the
    re-timings."""
    from .synthetic import synthetic_cnn

    out: dict[int, list[NetSample]] = {b: [] for b in batches}
    first: list[tuple[nn.Module, tuple[int, ...], list[NetSample]]] = []  # kept to be timed again
    t0 = time.perf_counter()
    main_s = budget_s * (1 - RETIME_SHARE) if retime else budget_s
    seed, n = seed0, 0
    timed = ""
    took: list[float] = []  # seconds per network so far: none is started that would end past the budget
    with step(progress, "fp32 networks", budget_s, "s") as counted:
        while n < max_nets and (n < min_nets or time.perf_counter() - t0 + _typical(took) < main_s):
            t_net = time.perf_counter()
            model, shape = synthetic_cnn(seed)
            seed += 1
            with torch.inference_mode():
                t1 = time.perf_counter()
                model(torch.randn(max(batches), *shape[1:]))
                if time.perf_counter() - t1 > 0.3:  # keep calibration inside its budget
                    continue
            gm = exported(model, shape)
            for b in batches:
                label = f"synthetic-{seed - 1} {(b,) + tuple(shape[1:])}"
                probe, before = state(), pace(fresh=True)
                sample = time_network(gm, torch.randn(b, *shape[1:]), label, tries=tries)
                out[b].append(dataclasses.replace(sample, probe_us=probe, pace_ms=_around(before, pace(fresh=True))))
            if len(first) < retime:
                first.append((gm, tuple(shape[1:]), [out[b][-1] for b in batches]))
            n += 1
            took.append(time.perf_counter() - t_net)
            timed = (f"{n} synthetic networks timed at batch {', '.join(map(str, batches))}: "
                     f"{sum(x.table.n for v in out.values() for x in v)} operators")
            counted.update(time.perf_counter() - t0, timed)
        again = retime_totals(first, state, pace)
        counted.finish(timed, done=time.perf_counter() - t0)
    if again:
        progress(f"fp32 networks: the first {len(first)} networks' totals timed again (how much their latency follows "
                 "the pace network)")
    return out, again


def _typical(took: list[float]) -> float:
    """What the next sample is expected to take: the median of those so far (0 before the first)."""
    return float(np.median(took)) if took else 0.0


def retime_totals(nets: list[tuple[nn.Module, tuple[int, ...], list[NetSample]]], state: State = lambda: 0.0,
                  pace: Pace = _unread) -> list[NetSample]:
    """The totals of networks timed earlier (time_network's samples, with the exported module and the input's
    shape after the batch), timed again now as time_network times a total, between two pace readings: the same
    network at another moment, usually another pace (pace_elasticity). The samples returned carry the new total
    and pace and no row times. Nothing is timed where the pace is not read."""
    out: list[NetSample] = []
    if pace() <= 0:
        return out
    for gm, shape, samples in nets:
        for sample in samples:
            x = torch.randn(sample.batch or sample.table.batch, *shape)
            probe, before = state(), pace(fresh=True)
            total = measure_latency(gm, x, warmup=1, min_runs=3, max_runs=20, budget_s=0.1)["latency_ms"] / 1e3
            out.append(dataclasses.replace(sample, row_seconds=np.zeros(0), total_seconds=total, probe_us=probe,
                                           pace_ms=_around(before, pace(fresh=True))))
    return out


# columns of latency.split_terms each class is fitted with (the others are held at zero); eager PyTorch's
# convolution dispatch columns are zero where `threads` is 0; grouped and depthwise convolutions always run on
# oneDNN, so their fixed cost is the overhead column and ATen's native kernel never runs them
_GROUPED = columns("overhead", "flops", "flops_misaligned", "weight_bytes", "act_cache_bytes", "act_memory_bytes",
                   "reorder_in_bytes", "reorder_out_bytes", "flops_padded")
SPLIT_COLUMNS = {"conv": list(range(SPLIT_WIDTH)), "gconv": _GROUPED, "dwconv": _GROUPED,
                 "gemm": columns("overhead", "flops", "flops_misaligned", "weight_bytes", "act_cache_bytes",
                                 "act_memory_bytes")}
OTHER_COLUMNS = columns("overhead", "flops", "weight_bytes", "act_cache_bytes", "act_memory_bytes")
FIT_FLOOR_S = 20e-6  # relative errors are floored: a 2 us row should not weigh like a 2 ms one


def _features(table: LayerTable, batch: int, multiple: int, cache: float, threads: int = 0):
    """The split model's columns of every row of `table` at `batch` (`threads`: convolutions dispatched as eager
    PyTorch does on that many threads; 0: a runtime that does not), the rows' classes and input channels."""
    ev = evaluate(table)
    flops, wbytes, abytes, kinds, cin, cout = _row_features(table, batch, ev)
    scale = batch / table.batch
    eager = eager_terms(conv_shape(table), cin, cout, ev.act_read_bytes * scale, ev.act_write_bytes * scale, batch,
                        threads, multiple)
    return split_terms(flops, wbytes, abytes, pointwise(table), misaligned(cin, cout, multiple), cache,
                       eager), kinds, cin


def _columns(table: LayerTable, batch: int, multiple: int, cache: float, threads: int = 0):
    """The split model's columns of every row of `table` at `batch`, and the rows' classes."""
    return _features(table, batch, multiple, cache, threads)[:2]


def _net_columns(net: NetSample, multiple: int, cache: float, threads: int = 0):
    return _columns(net.table, net.batch or net.table.batch, multiple, cache, threads)


def fit_split_model(nets: list[NetSample], multiple: int, cache: float, bound: dict[str, np.ndarray] | None = None,
                    threads: int = 0) -> tuple[dict[str, np.ndarray], float, float]:
    """Per class, non-negative least squares of every row's seconds on the split model's columns, each row's
    error relative to its network's total (what a network's prediction sums: fitting each row's own relative
    error let the many small rows pull the large ones down and under-predicted the synthetic networks by 5-9%
    in sample). A one-row sample (a kernel timed alone) is fitted on its relative error. `bound`: another
    batch's fit whose per-operator overheads (column 0) bound these from below (a larger batch does not
    dispatch an operator faster; a small budget's noise could say so). `threads`: the networks ran in eager
    PyTorch on that many threads (its convolution dispatch is fitted; 0: they did not).
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
        use = SPLIT_COLUMNS.get(cls, OTHER_COLUMNS)
        w = 1.0 / N[sel]
        A = C[sel][:, use] * w[:, None]
        # 1x1 rows' FLOPs at their own rate: column 1 takes the other rows' FLOPs, column 2 the 1x1 rows'; both
        # rates are non-negative, and the 1x1 rate less the other is the model's column 2 (a 1x1 factor below 1
        # where 1x1 convolutions run faster per FLOP, which a non-negative extra term could not say: with one, the
        # twelve pooled calibrations' 1x1 rows at batch 8 came out a median 3-7% too slow and the others 7% too
        # fast, in sample; fitted apart, 0.82 at batch 8 and 0.81 at batch 1 for float32, 2026-11-29)
        f_col, pw_col = COL["flops"], COL["flops_1x1"]
        split_pw = f_col in use and pw_col in use
        if split_pw:
            A[:, use.index(f_col)] -= A[:, use.index(pw_col)]
        scale = np.maximum(np.abs(A).max(0), 1e-30)  # columns differ by 12 orders of magnitude
        low = np.zeros(len(use))
        if bound is not None and cls in bound:
            low[0] = bound[cls][use[0]]  # use[0] is the overhead column, the per-operator overhead
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


def _glue_columns(net: NetSample) -> list[float]:
    return [_ops(net), 1.0, _written(net)]


# which of the glue terms (per operator, per call, per byte written) the first batch's fit bounds at larger batches:
# the per-byte term is free. Bounded by batch 1's 19.1 ns per KB, batch 8's came out at that bound, while fitted
# free it is 7.1 ns per KB (per operator 8.7 us and per call 576 us against batch 1's 9.7 and 156; figures before
# `unbiased`'s scaling): the outputs of a batch of 8 are fewer, larger blocks. With the bound, the twelve pooled
# calibrations' batch-8 networks with depthwise convolutions (inverted residuals write more bytes for their time
# than plain networks) came out over-predicted against those without: predicted over measured, summed, 1.016-1.018
# against 0.972; with the per-byte term free 0.989-1.002 against 0.971, network MAPE 9.3% against 9.7% (in sample,
# 2026-11-30)
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
    A = np.array([_glue_columns(n) for n in nets])
    w = 1.0 / np.array([n.total_seconds for n in nets])
    low = np.asarray(floor, dtype=float)
    x, _ = nnls(A * w[:, None], (np.maximum(y, 0.0) - A @ low) * w)
    return float(x[0] + low[0]), float(x[1] + low[1]), float(x[2] + low[2])


def network_error(nets: list[NetSample], coef, view_s: float, glue: tuple[float, float, float], multiple: int,
                  cache: float, threads: int = 0):
    """Relative error of every network's predicted total (rows + glue) against its untimed total."""
    pred = predict_rows(nets, coef, view_s, multiple, cache, threads)
    return np.array([(p.sum() + np.dot(_glue_columns(n), glue)) / n.total_seconds - 1 for n, p in zip(nets, pred)])


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




@dataclass
class Int8Sample:
    label: str
    table: LayerTable  # the int8 estimate of the synthetic network
    batch: int
    total_seconds: float
    kernel_seconds: float = 0.0  # of which in its oneDNN convolution/linear kernels (profiled)
    pool_seconds: float = 0.0  # in quantized max pooling
    loop_seconds: float = 0.0  # in the graph's generated loops and the ATen copies/concatenations it calls
    probe_us: float = 0.0  # the machine's state when it was timed


# profiled operators that move data outside the oneDNN kernels (the rest of a call is Python and guards)
_LOOP_OPS = ("aten::cat", "aten::copy_", "aten::clone", "aten::contiguous")


@contextlib.contextmanager
def _quiet_fds():
    """Silence file descriptors 1 and 2 (the profiler's C++ side prints its start and stop there)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [null]:
            os.close(fd)


def profiled_parts(fn: Callable, x: torch.Tensor, runs: int = 5) -> tuple[float, float, float]:
    """Seconds per call that compiled INT8 graph `fn` spends in oneDNN kernels, in quantized max pooling and in
    its generated loops (visible when compiled with inductor's cpp.enable_kernel_profile) and ATen copies
    (torch.profiler self times)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), _quiet_fds():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                fn(x)
    k = p = g = 0.0
    for e in prof.key_averages():
        t = e.self_cpu_time_total / runs / 1e6
        if e.key.startswith("onednn::"):
            k += t
        elif e.key == "quantized::max_pool2d":
            p += t
        elif e.key.startswith("graph_") or e.key in _LOOP_OPS:
            g += t
    return k, p, g


def int8_samples(budget_s: float, progress: Progress, batches: tuple[int, ...] = BATCHES, seed0: int = 100_000,
                 state: State = lambda: 0.0) -> list[Int8Sample]:
    """Quantize (Intel Neural Compressor static INT8), compile and time whole synthetic networks, and profile
    where each call goes (oneDNN kernels, quantized max pooling, generated loops; the rest is the Python
    wrapper and guards). The graphs compile with inductor's kernel profile, so the generated loops show.
    A graph compiles for one batch size (as deployed): each network is compiled and timed at one batch, the
    batches taken in turn, since compiling dominates (4-25 s a network here) and more networks at one batch
    each fit the graph's costs better than half as many at every batch."""
    import torch._inductor.config as inductor_config

    from estimators.quantize import estimate_quantize
    from estimators.strategy import QuantizeStep
    from tasks.quantize_exec import compile_for_inference, quantize

    from .synthetic import synthetic_cnn

    out: list[Int8Sample] = []
    t0 = time.perf_counter()
    seed, spent = seed0, []  # seconds each network took (quantize, compile, time): the next one's expected cost
    with step(progress, "int8 networks", budget_s, "s") as counted, \
            inductor_config.patch({"cpp.enable_kernel_profile": True}):  # graphs compile at their first call
        while time.perf_counter() - t0 + (float(np.mean(spent)) if spent else 0.0) < budget_s:
            model, shape = synthetic_cnn(seed)
            seed += 1
            with torch.inference_mode():
                t1 = time.perf_counter()
                model(torch.randn(max(batches), *shape[1:]))
                if time.perf_counter() - t1 > 0.15:  # compiled int8 networks cost compile time: keep them small
                    continue
            t1 = time.perf_counter()
            fn = compile_for_inference(quantize(model, torch.randn(2, *shape[1:]), "int8").program)
            table = estimate_quantize(light_table(model, torch.randn(1, *shape[1:]), name=f"synthetic-{seed - 1}"),
                                      QuantizeStep(dtype="int8"))
            b = batches[len(spent) % len(batches)]  # one batch a network, the batches in turn
            x = torch.randn(b, *shape[1:])
            probe = state()
            # this machine's speed drifts for seconds at a time: the mean of two medians, around the profile
            first = measure_latency(fn, x, warmup=2, min_runs=5, max_runs=50, budget_s=0.15)["latency_ms"]
            kern, pool, loops = profiled_parts(fn, x)
            second = measure_latency(fn, x, warmup=1, min_runs=5, max_runs=50, budget_s=0.15)["latency_ms"]
            out.append(Int8Sample(f"synthetic-{seed - 1} {(b,) + tuple(shape[1:])}", table, b,
                                  0.5 * (first + second) / 1e3, kern, pool, loops, probe))
            spent.append(time.perf_counter() - t1)
            counted.update(time.perf_counter() - t0, f"{len(out)} compiled and timed; {out[-1].label}: "
                           f"{out[-1].total_seconds * 1e3:.2f} ms, oneDNN kernels {out[-1].kernel_seconds * 1e3:.2f}, "
                           f"generated loops {out[-1].loop_seconds * 1e3:.2f}")
        counted.finish(f"{len(out)} synthetic networks quantized, compiled and timed", done=time.perf_counter() - t0)
    return out


FUSED_INT8 = ["norm", "elementwise"]  # inductor folds norms into the int8 conv and fuses activations and adds
# no INT8 convolution post-op: these run in the graph's generated loops (a squeeze-excitation's gate and product)
UNFUSED_INT8 = ["sigmoid", "sigmoid_", "hardsigmoid", "hardsigmoid_", "mul", "mul_", "__mul__", "__rmul__", "__imul__",
                "div", "div_", "__truediv__", "sub", "sub_", "__sub__", "__rsub__"]


# the oneDNN post-op an INT8 convolution/linear runs for the activation that follows it (inductor fuses these;
# others, e.g. sigmoid, stay apart): (attr, scalars)
POST_OPS = {nn.ReLU: ("relu", [None]), nn.ReLU6: ("hardtanh", [0.0, 6.0]), nn.SiLU: ("swish", [None]),
            nn.Hardswish: ("hardswish", [None])}


def _int8_kernel(m: nn.Module, shape: tuple[int, ...], post: str = "none", scalars: list | None = None
                 ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The oneDNN INT8 kernel an inductor-compiled INT8 graph calls for conv/linear `m` (uint8 activations,
    channels-last, prepacked int8 weights, uint8 output, post-op `post`), as a function of its uint8 input;
    None for other modules."""
    scalars = scalars if scalars is not None else [None]
    if isinstance(m, nn.Conv2d):
        g = m.groups
        w = torch.randint(-127, 127, (m.out_channels, m.in_channels // g, *m.kernel_size), dtype=torch.int8)
        ws, wz = torch.full((m.out_channels,), 0.01), torch.zeros(m.out_channels, dtype=torch.int64)
        args = (list(m.stride), list(m.padding), list(m.dilation), g)
        pw = torch.ops.onednn.qconv_prepack(w, ws, 0.02, 0, *args, list(shape))
        bias = torch.zeros(m.out_channels)
        return lambda x: torch.ops.onednn.qconv_pointwise(x, 0.02, 0, pw, ws, wz, bias, *args, 0.05, 0, None, post,
                                                          scalars, "")
    if isinstance(m, nn.Linear):
        w = torch.randint(-127, 127, (m.out_features, m.in_features), dtype=torch.int8)
        ws, wz = torch.full((m.out_features,), 0.01), torch.zeros(m.out_features, dtype=torch.int64)
        pw = torch.ops.onednn.qlinear_prepack(w, list(shape))
        return lambda x: torch.ops.onednn.qlinear_pointwise(x, 0.02, 0, pw, ws, wz, None, 0.05, 0, None, post, scalars,
                                                            "")
    return None


def _layer_inputs(model: nn.Module, example: torch.Tensor, keep: Callable[[nn.Module], bool]
                  ) -> list[tuple[nn.Module, tuple[int, ...]]]:
    """The modules of `model` that `keep` selects, in execution order, each with its input's shape."""
    seen: list[tuple[nn.Module, tuple[int, ...]]] = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m, tuple(i[0].shape))))
             for m in model.modules() if keep(m)]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _post_ops(model: nn.Module, example: torch.Tensor) -> list[tuple[nn.Module, tuple[int, ...], type | None]]:
    """The convolutions and linears of `model` in execution order, with their input shape and the activation
    module that runs right after them (BatchNorm, folded away, skipped), if any."""
    leaves = _layer_inputs(model, example, lambda m: not list(m.children()))
    out = []
    for j, (m, shape) in enumerate(leaves):
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        nxt = next((n for n, _ in leaves[j + 1:] if not isinstance(n, nn.BatchNorm2d)), None)
        out.append((m, shape, type(nxt) if type(nxt) in POST_OPS else None))
    return out


@dataclass
class ElementSample:
    """An INT8 kernel timed with and without a fused activation: what the activation adds per element."""

    act: str
    elements: int
    seconds: float
    probe_us: float = 0.0  # the machine's state when it was timed


def int8_op_samples(budget_s: float, progress: Progress, batches: tuple[int, ...] = BATCHES, seed0: int = 200_000,
                    min_ops: int = 24, state: State = lambda: 0.0
                    ) -> tuple[dict[int, list[NetSample]], list[ElementSample]]:
    """Time the oneDNN INT8 convolution and linear kernels that compiled INT8 graphs call, one per sample,
    for the convolutions and linears of synthetic networks (no compile, so hundreds fit in the budget),
    at every batch size, with the activation that follows each fused as the graph fuses it. Each sample
    is a one-row table (the INT8 estimate of that layer) timed without the activation's cost: a
    transcendental activation (SiLU) is timed both ways, and what it adds per element is an ElementSample."""
    from estimators.quantize import estimate_quantize
    from estimators.strategy import QuantizeStep

    from .synthetic import synthetic_cnn

    out: dict[int, list[NetSample]] = {b: [] for b in batches}
    elements: list[ElementSample] = []
    t0 = time.perf_counter()
    seed, n = seed0, 0
    took: list[float] = []
    counted = step(progress, "int8 kernels", budget_s, "s")
    while n < min_ops or time.perf_counter() - t0 + _typical(took) < budget_s:
        model, shape = synthetic_cnn(seed)
        seed += 1
        for m, in_shape, act in _post_ops(model, torch.randn(1, *shape[1:])):
            if n >= min_ops and time.perf_counter() - t0 + _typical(took) > budget_s:
                break
            t_op = time.perf_counter()
            table = estimate_quantize(light_table(nn.Sequential(m), torch.randn(in_shape), name=f"int8-op-{n}"),
                                      QuantizeStep(dtype="int8"))
            post, scalars = POST_OPS.get(act, ("none", [None]))
            out_elements = int(evaluate(table).q[0, Q_INDEX["act_out"]])  # at the table's batch of 1
            for b in batches:
                bshape = (b,) + in_shape[1:]
                x = torch.randint(0, 255, bshape, dtype=torch.uint8)
                if x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)

                def timed(p, sc):
                    with torch.inference_mode():
                        fn = _int8_kernel(m, bshape, p, sc)
                        return measure_latency(fn, x, warmup=2, min_runs=5, max_runs=30, budget_s=0.05)["latency_ms"] / 1e3

                probe = state()
                if post == "swish":  # the kernel without it, and what it adds per output element
                    sec = timed("none", [None])
                    elements.append(ElementSample("transcendental", out_elements * b, timed(post, scalars) - sec, probe))
                else:  # relu, hardtanh, hardswish post-ops cost next to nothing (<0.03 ns per element here)
                    sec = timed(post, scalars)
                out[b].append(NetSample(f"int8 {type(m).__name__} {bshape} {post}", table, np.array([sec]), sec, batch=b,
                                        probe_us=probe))
            n += 1
            took.append(time.perf_counter() - t_op)
            counted.update(time.perf_counter() - t0, f"{n} kernels timed")
    counted.finish(f"{n} INT8 convolution/linear kernels timed at batch {', '.join(map(str, batches))} "
                   f"({len(elements)} with and without a fused SiLU)", done=time.perf_counter() - t0)
    return out, elements


QPOOL_LANES = 32  # quantized max pooling vectorises 32 uint8 channels at a time; the rest run in a scalar tail


def int8_pool_samples(budget_s: float, progress: Progress, batches: tuple[int, ...] = BATCHES, seed0: int = 300_000,
                      min_ops: int = 12, state: State = lambda: 0.0) -> list[NetSample]:
    """Time the quantized max pooling compiled INT8 graphs call (`quantized::max_pool2d` on channels-last
    uint8) for the max pools of synthetic networks, each at its own channel count and at a random one (its
    speed depends on the channels beyond a multiple of QPOOL_LANES: 24 channels run 17x slower per element
    than 32 here), at every batch size."""
    import random
    import warnings

    from estimators.quantize import estimate_quantize
    from estimators.strategy import QuantizeStep

    from .synthetic import synthetic_cnn

    out: list[NetSample] = []
    rng = random.Random(seed0)
    t0 = time.perf_counter()
    seed, n = seed0, 0
    took: list[float] = []
    counted = step(progress, "int8 pools", budget_s, "s")
    while n < min_ops or time.perf_counter() - t0 + _typical(took) < budget_s:
        model, shape = synthetic_cnn(seed)
        seed += 1
        for m, in_shape in _layer_inputs(model, torch.randn(1, *shape[1:]), lambda m: isinstance(m, nn.MaxPool2d)):
            k, st, pad, dil = (list(v) if isinstance(v, (tuple, list)) else [v, v]
                               for v in (m.kernel_size, m.stride, m.padding, m.dilation))
            for c in (in_shape[1], rng.randint(8, 160)):
                if n >= min_ops and time.perf_counter() - t0 + _typical(took) > budget_s:
                    break
                t_op = time.perf_counter()
                cshape = (1, c) + in_shape[2:]
                table = estimate_quantize(light_table(nn.Sequential(m), torch.randn(cshape), name=f"int8-pool-{n}"),
                                          QuantizeStep(dtype="int8"))
                for b in batches:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # quantized tensors are deprecated; the graphs still use them
                        qx = torch.quantize_per_tensor(torch.randn((b,) + cshape[1:]), 0.05, 0, torch.quint8)
                    qx = qx.contiguous(memory_format=torch.channels_last)
                    fn = lambda t: torch.ops.quantized.max_pool2d(t, k, st, pad, dil, m.ceil_mode)  # noqa: E731
                    probe = state()
                    sec = measure_latency(fn, qx, warmup=2, min_runs=5, max_runs=30, budget_s=0.05)["latency_ms"] / 1e3
                    out.append(NetSample(f"int8 maxpool {(b,) + cshape[1:]}", table, np.array([sec]), sec, batch=b,
                                         probe_us=probe))
                n += 1
                took.append(time.perf_counter() - t_op)
                counted.update(time.perf_counter() - t0, f"{n} pools timed")
    counted.finish(f"{n} quantized max pools timed at batch {', '.join(map(str, batches))}",
                   done=time.perf_counter() - t0)
    return out


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
        flops, _, _, kinds, cin, _ = _row_features(s.table, s.batch)
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


def _int8_parts(sample: Int8Sample, coef8: dict[str, np.ndarray], cache: float,
                elem_ns: dict[str, float] | None = None, pool: np.ndarray | None = None,
                multiple: int = CHANNEL_MULTIPLE) -> np.ndarray:
    """A compiled INT8 network's INT8 estimate (fused rows dropped) as [1, convolutions and linears, other
    operators (generated loops, the input's quantization among them), elements those read and write, the
    convolutions' and linears' predicted seconds (the INT8 kernel fit, with fused transcendental activations
    at `elem_ns`), the activation bytes the convolutions and linears read and write, the max pools' predicted
    seconds (`pool`: fit_pool), the elements of those other operators that reorder memory (`permute`), the
    convolutions' and linears' activation bytes up to the cache's size]."""
    cols, kinds, cin = _features(sample.table, sample.batch, multiple, cache)
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


def fit_int8(samples: list[Int8Sample], coefs8: dict[int, dict[str, np.ndarray]], cache: float,
             elem_ns: dict[str, float] | None = None, pool: np.ndarray | None = None,
             multiple: int = CHANNEL_MULTIPLE) -> Int8Fit:
    """Kernels in a graph take longer than the same kernels timed alone, where their input stays in the cache:
    per batch, the networks' profiled oneDNN kernel time beyond the kernel fit's prediction on their kernel count
    and their activation bytes up to the cache's size (bytes beyond it come from memory alone too), non-negative
    and least absolute (l1_nnls): INT8 networks are not paced, and the same network timed by two calibrations
    differed by up to 1.9x in its kernels (2026-11-29), which pulled a least-squares fit to 1.4-3.6x what this
    one finds (the benchmark's INT8 depthwise networks at batch 8 were predicted 14-20% too slow; mobilenet_v2's
    kernels there ran within 7% of the same kernels timed alone). The generated loops' profiled time is
    fitted per other operator and per element those move; what remains of each call (the Python wrapper,
    guards, allocation) per call, per convolution/linear and per other operator. All on the networks'
    relative error."""
    from scipy.optimize import nnls

    near = np.array([nearest_batch(s.batch, list(coefs8)) for s in samples])
    A = np.array([_int8_parts(s, coefs8[b], cache, elem_ns, pool, multiple) for s, b in zip(samples, near)])
    T = np.array([s.total_seconds for s in samples])
    K = np.array([s.kernel_seconds for s in samples])
    P = np.array([s.pool_seconds for s in samples])
    G = np.array([s.loop_seconds for s in samples])
    per_k, per_b = {}, {}
    kern = A[:, 4].copy()
    for b in sorted(coefs8):
        sel = (near == b) & (K > 0)
        x = np.zeros(2)
        if sel.sum() >= 2:
            x = l1_nnls(A[sel][:, [1, 8]] / K[sel, None], (K[sel] - A[sel, 4]) / K[sel])
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
    # the rest of a call: per call, per operator (kernel or loop: the wrapper calls each alike) and per activation
    # byte (allocating outputs: 8-11 us an operator at batch 1, 15-48 at batch 8 in the same networks); fitting
    # kernels and loops apart, with no byte term, put 293 us on the call and nothing on a kernel (6 networks)
    wrap, _ = nnls(np.stack([A[:, 0], A[:, 1] + A[:, 2], A[:, 3] + A[:, 5]], 1) * w[:, None],
                   np.maximum(T - K - P - G, 0.0) * w)
    pred = wrap[0] + (A[:, 1] + A[:, 2]) * wrap[1] + (A[:, 3] + A[:, 5]) * wrap[2] + A[:, 2] * loop[0] \
        + A[:, 3] * loop[1] + A[:, 7] * loop[2] + kern + A[:, 6]
    return Int8Fit(per_k, per_b, float(wrap[0]), float(wrap[1]), float(wrap[1] + loop[0]), float(loop[1]),
                   float(np.abs(pred / T - 1).mean()) if len(T) else 0.0, float(loop[2]), float(wrap[2]))


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


def _int8_coef(coef: dict[str, np.ndarray], coef8: dict[str, np.ndarray], f: Int8Fit, batch: int,
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


@dataclass
class Samples:
    """Everything one calibration timed (collect_samples); fit_profile needs nothing else, so the samples can
    be kept (save_samples) and fitted again, alone or pooled with other calibrations' (merge_samples)."""

    peaks: tuple[float, float, float, float]  # measure_peaks
    peaks_other_state: bool  # the peaks were measured in another state than the dominant one
    llc: int  # last-level cache bytes
    threads: int
    nets: dict[int, list[NetSample]]  # fp32 synthetic networks per batch
    ops: dict[int, list[NetSample]]  # INT8 kernels per batch
    elems: list[ElementSample]
    pools: list[NetSample]
    q: list[Int8Sample]  # compiled INT8 synthetic networks
    readings: list[float]  # the machine's state throughout (sync probe, us)
    seconds: float
    quick: bool = False
    cpu: str = ""
    torch: str = ""
    runs: int = 1  # calibrations pooled
    seed_offset: int = 0  # added to every part's first seed (the largest of the pooled calibrations')
    peak_runs: list = dataclasses.field(default_factory=list)  # per pooled calibration: (its peaks, the state then)
    isa: str = ""  # the CPU's features (hardware.measure.cpu_isa; '' in samples kept before it was recorded)
    pace_readings: list = dataclasses.field(default_factory=list)  # the pace network throughout (ms; PaceClock)
    retimed: list = dataclasses.field(default_factory=list)  # float networks' totals timed again (retime_totals)


SEED_STRIDE = 1000  # seed offset between pooled calibrations (a part draws far fewer networks than this)
# pooled calibrations fit only the samples timed in their dominant state where at least this many are (about one
# calibration's worth); a single calibration fits all its samples (fitting only its dominant state's, 20-30%
# fewer, scored worse)
POOLED_LEAST = {"fp32": 40, "kernels": 300, "activations": 100, "pools": 20, "networks": 6}


def collect_samples(quick: bool = False, progress: Progress = lambda m: None, int8: bool = True,
                    budget_s: float = CALIBRATION_BUDGET_S, after: list[Samples] | None = None) -> Samples:
    """Time this machine: peaks, then FP32 operators in synthetic networks at every batch in BATCHES, then
    (int8=True) INT8 kernels and compiled INT8 synthetic networks. `budget_s` bounds the timing; `quick` is a
    small budget for tests. The machine's state is read throughout (hardware.measure.StateClock); the peaks are
    measured again at the end when they were taken in another state than the calibration's dominant one.
    `after`: earlier calibrations this one will be pooled with: it draws other synthetic networks than theirs."""
    offset = (max(s.seed_offset for s in after) + SEED_STRIDE) if after else 0
    t0 = time.perf_counter()
    if quick:
        # the whole quick calibration, its fit included, keeps to QUICK_CALIBRATION_S: no compiled INT8 networks (one
        # costs 5-35 s to compile here, and one or two of them fit nothing): INT8 is its oneDNN kernels timed alone,
        # the graph's costs around them taken from the float fit (fit_profile), and a prediction anchored on the
        # quantized original measured on this machine (hardware.anchor) gets the level
        budget_s = min(budget_s, QUICK_CALIBRATION_S - QUICK_FIT_S)
    clock, pace = StateClock(), PaceClock()
    with status(progress, "measuring this machine's peaks (GEMM, memory and cache bandwidth)"):
        pace()  # builds the pace network (an export) before anything is timed
        peaks_probes = [clock()]
        peaks = measure_peaks(progress)
    peaks_probes.append(clock(fresh=True))  # the state before and after the peaks
    spent = time.perf_counter() - t0  # the pace network's export and the peaks come out of the budget
    share = (QUICK_FP32_SHARE if quick else FP32_SHARE) if int8 else 1.0
    nets, retimed = network_samples(max(budget_s - spent, 0.0) * share, progress,
                                    seed0=offset, state=clock, pace=pace, retime=2 if quick else RETIMED,
                                    min_nets=QUICK_LEAST["fp32 networks"] if quick else 4, tries=1 if quick else 2)
    ops: dict[int, list[NetSample]] = {}
    elems: list[ElementSample] = []
    pools: list[NetSample] = []
    q: list[Int8Sample] = []
    if int8:
        left = max(budget_s - (time.perf_counter() - t0), 0.0)
        # INT8 is not paced: its samples brought to the pace predicted the benchmark's INT8 configurations worse
        # (paced MAPE 33.4% against 14.2% with the same samples as timed, 2026-11-29: the compiled networks' pace
        # readings, taken between compiles, ran 0.65x the calibration's median)
        ops, elems = int8_op_samples(0.15 * left, progress, seed0=200_000 + offset, state=clock,
                                     min_ops=QUICK_LEAST["int8 kernels"] if quick else 24)
        pools = int8_pool_samples(0.05 * left, progress, seed0=300_000 + offset, state=clock,
                                  min_ops=QUICK_LEAST["int8 pools"] if quick else 12)
        q = [] if quick else int8_samples(max(budget_s - (time.perf_counter() - t0), 0.0), progress,
                                          seed0=100_000 + offset, state=clock)
    clock(fresh=True)  # a last reading at the end
    ref = dominant_state(clock.readings)
    other = False
    peaks_state = float(np.median(peaks_probes))
    if ref is not None and not all(same_state(p, ref) for p in peaks_probes):
        if same_state(clock.readings[-1], ref) and not quick:  # the state at the end, just read
            progress("the peaks were measured in another state: measuring them again")
            peaks = measure_peaks(progress)
            peaks_state = clock.readings[-1]
        else:
            other = True
    return Samples(peaks, other, cache_bytes(), torch.get_num_threads(), nets, ops, elems, pools, q,
                   list(clock.readings), time.perf_counter() - t0, quick, cpu_name(), torch.__version__,
                   seed_offset=offset, peak_runs=[(tuple(peaks), peaks_state)], isa=cpu_isa(),
                   pace_readings=list(pace.readings), retimed=retimed)


SAMPLES_FORMAT = "deployfit-calibration-samples/1"


def _sample_classes() -> dict[str, type]:
    """The dataclasses a samples file may hold: nothing else is ever built from one."""
    from estimators.pruning import PruneGroup
    from estimators.table import State

    return {c.__name__: c for c in (Samples, NetSample, Int8Sample, ElementSample, LayerTable, State, PrunePlan,
                                    PruneGroup)}


def _encode(v, arrays: dict[str, np.ndarray], seen: dict[int, str], classes: dict[str, type]):
    """`v` as JSON, its arrays moved to `arrays` (an array shared by several samples stored once). Every
    container is tagged so that it comes back as the type it was: {"dataclass": NAME, "fields": {...}},
    {"array": KEY, "scalar": BOOL}, {"tuple": [...]}, {"dict": [[key, value], ...]}; lists and scalars as
    they are (a subclass of str, int, float or tuple, such as torch.__version__, comes back as its base type)."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        name = type(v).__name__
        if classes.get(name) is not type(v):
            raise TypeError(f"calibration samples cannot hold a {name}")
        return {"dataclass": name, "fields": {f.name: _encode(getattr(v, f.name), arrays, seen, classes)
                                              for f in dataclasses.fields(v)}}
    if isinstance(v, (np.ndarray, np.generic)):
        a = np.asarray(v)
        if a.dtype.hasobject:
            raise TypeError("calibration samples cannot hold an array of Python objects")
        key = seen.get(id(v))
        if key is None:
            key = seen[id(v)] = f"a{len(arrays)}"
            arrays[key] = a
        return {"array": key, "scalar": isinstance(v, np.generic)}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, tuple):
        return {"tuple": [_encode(x, arrays, seen, classes) for x in v]}
    if isinstance(v, list):
        return [_encode(x, arrays, seen, classes) for x in v]
    if isinstance(v, dict):
        return {"dict": [[_encode(k, arrays, seen, classes), _encode(x, arrays, seen, classes)] for k, x in v.items()]}
    raise TypeError(f"calibration samples cannot hold a {type(v).__name__}")


def _decode(v, arrays, classes: dict[str, type]):
    """The inverse of `_encode`: only the `classes`, arrays, tuples, dicts, lists and JSON scalars are built."""
    if isinstance(v, list):
        return [_decode(x, arrays, classes) for x in v]
    if not isinstance(v, dict):
        return v
    if "dataclass" in v:
        cls = classes.get(v["dataclass"])
        if cls is None:
            raise ValueError(f"unknown class {v['dataclass']!r}")
        return cls(**{k: _decode(x, arrays, classes) for k, x in v["fields"].items()})
    if "array" in v:
        a = arrays[v["array"]]
        return a[()] if v["scalar"] else a
    if "tuple" in v:
        return tuple(_decode(x, arrays, classes) for x in v["tuple"])
    if "dict" in v:
        return {_decode(k, arrays, classes): _decode(x, arrays, classes) for k, x in v["dict"]}
    raise ValueError(f"unknown entry with keys {sorted(v)}")


def save_samples(samples: Samples, path: str | Path) -> None:
    """Keep a calibration's samples: an npz of their arrays and one JSON entry describing the rest (data only;
    load_samples reads it without unpickling)."""
    import json

    arrays: dict[str, np.ndarray] = {}
    meta = {"format": SAMPLES_FORMAT, "samples": _encode(samples, arrays, {}, _sample_classes())}
    arrays["samples.json"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object: numpy appends no .npz to the user's name
        np.savez_compressed(f, **arrays)


def load_samples(path: str | Path) -> Samples:
    """A calibration's samples kept by save_samples. A file in the pickle format samples were once kept in is
    refused, never unpickled (it could run any code); anything else that is not samples is a ValueError."""
    import json
    import zipfile

    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ValueError(f"{path}: not a calibration's samples ({e})") from e
    if head[:1] == b"\x80":
        raise ValueError(f"{path}: calibration samples in the old pickle format, which is not loaded (unpickling can "
                         "run any code); calibrate again with --keep-samples to keep them in the current format")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop("samples.json").tobytes().decode())
        if meta.get("format") != SAMPLES_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {SAMPLES_FORMAT!r}")
        out = _decode(meta["samples"], arrays, _sample_classes())
    except (OSError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a calibration's samples ({type(e).__name__}: {e})") from e
    if not isinstance(out, Samples):
        raise ValueError(f"{path}: not a calibration's samples (a {type(out).__name__})")
    return out


def merge_samples(parts: list[Samples]) -> Samples:
    """Several calibrations of one machine as one: their samples pooled, the peaks' medians. Calibrations of
    another CPU, thread count or torch version are refused (their operators run differently)."""
    if not parts:
        raise ValueError("no samples to merge")
    first = parts[0]
    for p in parts[1:]:
        for field in ("cpu", "isa", "threads", "torch", "llc"):
            if getattr(p, field) != getattr(first, field):
                raise ValueError(f"samples of different machines or runtimes: {field} {getattr(first, field)!r} and "
                                 f"{getattr(p, field)!r}")
    if len({bool(p.pace_readings) for p in parts}) > 1:
        raise ValueError("samples timed against the pace network cannot be pooled with samples kept before it was "
                         "read (their speeds cannot be brought to one pace): fit those alone")
    if len(parts) == 1:
        return first

    def pooled(attr):
        batches = sorted({b for p in parts for b in getattr(p, attr)})
        return {b: [s for p in parts for s in getattr(p, attr).get(b, [])] for b in batches}

    peaks = tuple(float(np.median([p.peaks[i] for p in parts])) for i in range(4))
    return Samples(peaks, all(p.peaks_other_state for p in parts), first.llc, first.threads, pooled("nets"),
                   pooled("ops"), [e for p in parts for e in p.elems], [s for p in parts for s in p.pools],
                   [s for p in parts for s in p.q], [r for p in parts for r in p.readings],
                   sum(p.seconds for p in parts), any(p.quick for p in parts), first.cpu, first.torch,
                   sum(p.runs for p in parts), max(p.seed_offset for p in parts),
                   [r for p in parts for r in p.peak_runs], first.isa, [r for p in parts for r in p.pace_readings],
                   [r for p in parts for r in p.retimed])


def _count(samples: Samples) -> int:
    """The float networks timed (the samples that are paced)."""
    return sum(map(len, samples.nets.values()))


def pace_elasticity(samples: Samples) -> tuple[float, int]:
    """How much of the pace network's drift a network's latency follows, and the number of pairs that measured it:
    every two timings of one network (its label: a network re-timed at the end of a calibration, or timed by two
    pooled calibrations that drew the same seed) give the log ratio of their totals and of their paces; the
    elasticity is the least-squares slope of the first on the second through the origin, within [0, 1]. 1 (the
    latency follows the pace in proportion) where fewer than ELASTICITY_LEAST pairs, or paces within 5% of each
    other on average, measure it. Timings over PACE_BAND away from the calibration's median pace are left out.

    On this VM the pace network slows more than networks do: the same 178 synthetic networks timed by pooled
    calibrations gave a slope of 0.71 (correlation 0.76), and the benchmark's configurations, timed three times,
    0.67 across their rounds (2026-11-29): paced in proportion, slow spells were over-corrected."""
    if not samples.pace_readings:
        return 1.0, 0
    median = float(np.median(samples.pace_readings))
    timed: dict[str, list[NetSample]] = {}
    for x in [n for v in samples.nets.values() for n in v] + list(samples.retimed):
        if x.pace_ms > 0 and x.total_seconds > 0 and 1 / PACE_BAND <= x.pace_ms / median <= PACE_BAND:
            timed.setdefault(x.label, []).append(x)
    xs, ys = [], []
    for runs in timed.values():
        for i, a in enumerate(runs):
            for b in runs[i + 1:]:
                xs.append(np.log(a.pace_ms / b.pace_ms))
                ys.append(np.log(a.total_seconds / b.total_seconds))
    x, y = np.array(xs), np.array(ys)
    if len(x) < ELASTICITY_LEAST or np.sqrt(np.mean(x ** 2)) < 0.05:
        return 1.0, len(x)
    return float(np.clip(x @ y / (x @ x), 0.0, 1.0)), len(x)


def at_one_pace(samples: Samples, elasticity: float = 1.0) -> tuple[Samples, float]:
    """The float networks' samples brought to one pace of the machine, and that pace (ms; 0 where the pace network
    was not read, the samples then returned as they are): a network timed while the pace network ran p ms has its
    times scaled by (pace / p) ** elasticity (pace_elasticity), the pace being the median of the calibration's
    readings (hardware.measure.PaceReference); networks timed more than PACE_BAND away from it are dropped, unread
    ones (pace 0) kept as timed. INT8 samples are not paced (collect_samples)."""
    if not samples.pace_readings:
        return samples, 0.0
    pace = float(np.median(samples.pace_readings))

    def kept(parts: list[NetSample]) -> list[NetSample]:
        inside = [x for x in parts if x.pace_ms <= 0 or 1 / PACE_BAND <= x.pace_ms / pace <= PACE_BAND]
        if len(inside) < PACE_LEAST:  # a busy machine: the networks timed nearest its pace rather than too few to fit
            inside = sorted(parts, key=lambda x: abs(np.log(x.pace_ms / pace)) if x.pace_ms > 0 else 0.0)[:PACE_LEAST]
        return [dataclasses.replace(x, row_seconds=at_pace(x.row_seconds, x.pace_ms, pace, elasticity),
                                    total_seconds=at_pace(x.total_seconds, x.pace_ms, pace, elasticity))
                if x.pace_ms > 0 else x for x in parts if any(x is y for y in inside)]

    return dataclasses.replace(samples, nets={b: kept(v) for b, v in samples.nets.items()}), pace


def calibrate_host(quick: bool = False, progress: Progress = lambda m: None, int8: bool = True,
                   budget_s: float = CALIBRATION_BUDGET_S, keep: str | Path | None = None) -> HardwareProfile:
    """Calibrate this machine: collect_samples, then fit_profile. `keep`: also save the samples there."""
    samples = collect_samples(quick, progress, int8, budget_s)
    if keep:
        save_samples(samples, keep)
    return fit_profile(samples, progress)


def fit_profile(samples: Samples, progress: Progress = lambda m: None) -> HardwareProfile:
    """The host profile fitted to a calibration's samples.

    A VM can switch between states whose speeds differ by more than a prediction's error (this one: fork/join
    3.4-4.1 us and memory copy ~44 GB/s, or 4.7-5.8 us and ~80 GB/s, for minutes at a time). The profile records
    the state the calibration spent the most time in and, per part, how many samples were timed in another.
    One calibration fits every sample: three that fitted only the samples of their main state (20-30% fewer)
    predicted the benchmark worse than the four before them that fitted all (README). Pooled calibrations
    (merge_samples) fit the samples of their dominant state alone, part by part, where at least POOLED_LEAST
    remain (about one calibration's worth), and the peaks of the runs measured in it: pooled across the two
    states, three calibrations scored 56% within 10% in their dominant state, two in one state 81% (README).

    Float networks timed against the pace network (hardware.measure.PaceClock) are first brought to one pace
    (at_one_pace), which follows the machine's drift sample by sample; the profile's float predictions are then at
    that pace (`provenance.pace_ms`), and pooled calibrations fit every sample (no state is picked)."""
    t0 = time.perf_counter()
    timed = _count(samples)
    elasticity, pairs = pace_elasticity(samples)
    samples, pace_ms = at_one_pace(samples, elasticity)
    dropped = timed - _count(samples)
    threads, llc = samples.threads, samples.llc
    peak, bw, cbw, rbw = samples.peaks
    cache = CACHE_SHARE * llc
    multiple = channel_multiple(samples.isa)
    int8 = bool(samples.ops or samples.q)
    ref = dominant_state(samples.readings)
    share = float(np.mean([same_state(p, ref) for p in samples.readings])) if ref else 1.0
    fit: dict[str, float] = {}
    in_state_only = samples.runs > 1 and ref is not None and not pace_ms
    if samples.runs > 1:
        fit["calibrations_pooled"] = samples.runs
        same = [p for p, s in samples.peak_runs if same_state(s, ref)]
        if in_state_only and same:  # the peaks of the runs measured in the state fitted
            peak, bw, cbw, rbw = (float(np.median([p[i] for p in same])) for i in range(4))

    def chosen(parts: list, part: str, least: int) -> list:
        """A part's samples to fit, recording how many were timed in another state than `ref`: pooled
        calibrations fit those in `ref` alone where at least `least` are (one calibration fits all its samples)."""
        other = sum(not same_state(x.probe_us, ref) for x in parts) if ref else 0
        fit[f"state.{part}.other_state"] = other
        if in_state_only and other and len(parts) - other >= least:
            fit[f"state.{part}.fitted"] = len(parts) - other
            return [x for x in parts if same_state(x.probe_us, ref)]
        return parts

    nets = {b: chosen(ns, f"fp32.b{b}", POOLED_LEAST["fp32"]) for b, ns in samples.nets.items()}
    ops = {b: chosen(ns, f"int8.b{b}.kernels", POOLED_LEAST["kernels"]) for b, ns in samples.ops.items()}
    elems = chosen(samples.elems, "int8.activations", POOLED_LEAST["activations"])
    pools = chosen(samples.pools, "int8.pools", POOLED_LEAST["pools"])
    q = chosen(samples.q, "int8.networks", POOLED_LEAST["networks"])
    if samples.peaks_other_state:
        fit["state.peaks_in_other_state"] = 1.0
    coefs: dict[int, dict[str, np.ndarray]] = {}
    effs: dict[int, Efficiency] = {}
    first = BATCHES[0]
    glues: dict[int, tuple[float, float, float]] = {}
    views: dict[int, float] = {}
    for b, ns in sorted(nets.items()):  # larger batches bounded below by the first one's overheads
        coef, view_s, row_err = fit_split_model(ns, multiple, cache, coefs.get(first), threads)
        if not {"conv", "elementwise"} <= set(coef):
            raise RuntimeError(f"calibration budget too small: {len(ns)} networks timed at batch {b}, not enough "
                               "convolutions and elementwise operators to fit")
        glue = fit_glue(ns, glue_bound(glues.get(first, (0.0, 0.0, 0.0))))
        view_s = max(view_s, views.get(first, 0.0))
        coef, view_s, glue, level, net_err = unbiased(ns, coef, view_s, glue, multiple, cache, threads)
        net_err = np.abs(net_err)
        glues[b], views[b] = glue, view_s
        coefs[b] = coef
        effs[b] = split_efficiency(coef, view_s, peak, rbw, cbw, bw, glue, threads=threads)
        fit.update({f"fp32.b{b}.networks": len(ns), f"fp32.b{b}.operators": int(sum(n.table.n for n in ns)),
                    f"fp32.b{b}.row_error": round(row_err, 4), f"fp32.b{b}.network_mape": round(float(net_err.mean()), 4),
                    f"fp32.b{b}.level": round(level, 4), f"fp32.b{b}.glue_us_per_op": round(glue[0] * 1e6, 3),
                    f"fp32.b{b}.glue_ns_per_kb": round(glue[2] * 1e12, 4)})
        progress(f"fit fp32 batch {b}: {len(ns)} networks, operator error {100 * row_err:.1f}%, network MAPE "
                 f"{100 * net_err.mean():.1f}% (in sample), {glue[0] * 1e6:.1f} us per operator outside operators")
    peaks = {"fp32": round(peak, 2)}
    overrides: dict[int, Efficiency] = {}
    if int8:
        pool = fit_pool(pools)
        progress(f"fit int8 max pooling: {pool[0] * 1e6:.1f} us per call, {pool[1] * 1e9:.4f} ns per element x window, "
                 f"{pool[2] * 1e9:.3f} ns more on channels beyond a multiple of {QPOOL_LANES}")
        elem_ns = element_ns(elems)
        if elem_ns:
            progress("int8 fused activations: " + ", ".join(f"{k} {v:.3f} ns per element" for k, v in elem_ns.items()))
        coefs8: dict[int, dict[str, np.ndarray]] = {}
        for b, ns in ops.items():
            coefs8[b], _, op_err = fit_split_model(ns, multiple, cache, coefs8.get(first))
            fit[f"int8.b{b}.kernels"] = len(ns)
            fit[f"int8.b{b}.kernel_error"] = round(op_err, 4)
            progress(f"fit int8 kernels batch {b}: {len(ns)} kernels, error {100 * op_err:.1f}% (in sample)")
        if not q and coefs8:
            # no compiled networks (a quick calibration): the graph adds nothing measured to its kernels; its other
            # operators (generated loops) cost as the float fit's elementwise rows, per operator and per byte
            el = coefs[first].get("elementwise", np.zeros(SPLIT_WIDTH))
            f8 = Int8Fit({b: 0.0 for b in coefs8}, {b: 0.0 for b in coefs8}, 0.0, 0.0,
                         float(el[COL["overhead"]]), float(el[COL["act_cache_bytes"]]), 0.0)
            progress("int8: no compiled networks (quick): the kernels as timed alone, the graph's other operators "
                     "as the float fit's elementwise ones; predictions anchored on the quantized original get the level")
        if q or coefs8:
            f8 = fit_int8(q, coefs8, cache, elem_ns, pool, multiple) if q else f8
            peaks["int8"] = round(INT8_LANES * peak, 2)
            for b, coef in coefs.items():
                b8 = nearest_batch(b, list(coefs8))
                e8 = split_efficiency(_int8_coef(coef, coefs8[b8], f8, b8, pool), 0.0, INT8_LANES * peak, rbw, cbw,
                                      bw, (0.0, f8.call_s + f8.other_s, 0.0), fused=FUSED_INT8)
                overrides[b] = e8.model_copy(update={
                    "view_overhead_us": 0.0, "unfused_ops": UNFUSED_INT8, "element_ns": elem_ns,
                    "input_ns_per_element": round(2 * (f8.element_s + f8.byte_s) * 1e9, 5),  # quantizing the input
                    "remainder_ns": {"maxpool": round(float(pool[2]) * 1e9, 5)},
                    "remainder_multiple": {"maxpool": QPOOL_LANES}})
            fit.update({"int8.networks": len(q), "int8.network_mape": round(f8.mape, 4),
                        "int8.call_us": round(f8.call_s * 1e6, 2), "int8.kernel_wrapper_us": round(f8.kernel_s * 1e6, 2),
                        "int8.other_op_us": round(f8.other_s * 1e6, 2),
                        "int8.other_ns_per_element": round(f8.element_s * 1e9, 4),
                        "int8.permute_ns_per_element": round(f8.permute_s * 1e9, 4),
                        "int8.wrapper_ns_per_element": round(f8.byte_s * 1e9, 4),
                        "int8.maxpool_us": round(float(pool[0]) * 1e6, 3),
                        "int8.maxpool_ns_per_flop": round(float(pool[1]) * 1e9, 5),
                        "int8.maxpool_tail_ns_per_flop": round(float(pool[2]) * 1e9, 5),
                        **{f"int8.b{b}.kernel_context_us": round(v * 1e6, 3) for b, v in f8.kernel_s_ctx.items()},
                        **{f"int8.b{b}.kernel_context_ns_per_byte": round(v * 1e9, 5) for b, v in f8.byte_s_ctx.items()},
                        **{f"int8.{k}_ns_per_element": v for k, v in elem_ns.items()}})
            ctx = ", ".join(f"batch {b}: +{f8.kernel_s_ctx[b] * 1e6:.1f} us and {f8.byte_s_ctx[b] * 1e9:.3f} ns per "
                            "activation byte in the cache" for b in f8.kernel_s_ctx)
            per_batch = ", ".join(f"{sum(x.batch == b for x in q)} at batch {b}" for b in BATCHES)
            progress(f"fit int8: {len(q)} compiled networks ({per_batch}), MAPE "
                     f"{100 * f8.mape:.1f}% (in sample); a kernel in a graph against alone {ctx}; call "
                     f"{f8.call_s * 1e6:.0f} us, {f8.kernel_s * 1e6:.1f} us per kernel outside it and "
                     f"{f8.byte_s * 1e9:.3f} ns per element operators move, "
                     f"{f8.other_s * 1e6:.1f} us per other operator and {f8.element_s * 1e9:.2f} ns per element it "
                     f"moves (+{f8.permute_s * 1e9:.2f} ns where it reorders memory)")
        else:
            progress("int8: no time left in the budget; the profile has no int8 entry")
    readings = samples.readings
    if pace_ms:
        readings_ms = samples.pace_readings  # at_one_pace keeps them
        lo, hi = np.percentile(readings_ms, [5, 95])
        fit.update({"pace_ms": round(pace_ms, 4), "pace.readings": len(readings_ms),
                    "pace.p5_ms": round(float(lo), 4), "pace.p95_ms": round(float(hi), 4), "pace.dropped": dropped,
                    "pace.elasticity": round(elasticity, 4), "pace.pairs": pairs})
        measured = (f"{elasticity:.2f}, measured on {pairs} pairs of timings of one network" if pairs >= ELASTICITY_LEAST
                    else f"1 (not measured: {pairs} pairs of timings of one network)")
        progress(f"pace: the pace network ran {pace_ms:.2f} ms (median of {len(readings_ms)} readings, 5-95% "
                 f"{lo:.2f}-{hi:.2f} ms); the float networks brought to that pace before fitting (latency x (pace / "
                 f"pace then) ** elasticity, the elasticity {measured}), {dropped} of {timed} timed more than "
                 f"{PACE_BAND:g}x away from it dropped")
    fit.update({"sync_probe_us": round(ref, 3) if ref else 0.0,
                "sync_probe_range_us": round(max(readings) - min(readings), 3),
                "state.readings": len(readings), "state.in_state_share": round(share, 3),
                "state.memory_copy_gbs": round(bw, 2)})
    other = sum(v for k, v in fit.items() if k.startswith("state.") and k.endswith(".other_state"))
    progress(f"machine state: sync probe {ref:.2f} us (fork and join of all threads) in {100 * share:.0f}% of "
             f"{len(readings)} readings ({min(readings):.2f}-{max(readings):.2f} us), memory copy {bw:.1f} GB/s; "
             f"{other} samples timed in another state"
             + ("; the peaks too" if fit.get("state.peaks_in_other_state") else "")
             + (f"; pooled: {', '.join(k[6:-7] for k in fit if k.endswith('.fitted'))} fitted on this state's "
                "samples alone" if any(k.endswith(".fitted") for k in fit) else ""))
    fit["seconds"] = round(samples.seconds + time.perf_counter() - t0, 1)
    return HardwareProfile(
        name="host",
        description=f"this machine: {samples.cpu}" + (f" ({samples.isa})" if samples.isa else "")
                    + f", {threads} threads",
        runtime=f"PyTorch {samples.torch} on {threads} threads: float models as deployfit's exported program "
                "(ExportedProgram.module(), eager ATen); int8 as the inductor-compiled (freezing) Intel Neural "
                "Compressor graph",
        peak_gflops=peaks,
        memory_bandwidth_gbs=round(bw, 2),
        memory_read_bandwidth_gbs=round(rbw, 2),
        cache_bytes=int(cache),
        cache_bandwidth_gbs=round(cbw, 2),
        fast_dtypes=list(peaks),
        channel_multiple=multiple,
        float_runs_as="fp32",
        combine="sum",
        slow_dtypes={},
        efficiency=effs[first],
        dtype_overrides={"int8": overrides[first]} if overrides else {},
        batch_efficiency={b: {"fp32": effs[b], **({"int8": overrides[b]} if overrides else {})} for b in BATCHES[1:]},
        sources={
            "peak_gflops": "measured: 1024^3 fp32 torch.mm on this machine; int8 = 4 x that (VNNI: 4 int8 "
                           "multiply-adds per fp32 FMA lane)",
            "memory_bandwidth_gbs": "measured: clone of a 128 MB tensor (read + write)",
            "memory_read_bandwidth_gbs": "measured: sum over a 256 MB tensor",
            "cache_bandwidth_gbs": f"measured: clone of a 1 MB tensor (read + write); cache_bytes = {CACHE_SHARE} x the "
                                   f"{llc // 2**20} MiB last-level cache (sysfs), the share fitted best",
            "efficiency": "fitted by `deployfit calibrate` to operators timed inside synthetic networks (provenance)",
        },
        provenance=Provenance(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), cpu=samples.cpu,
                              threads=threads, torch=samples.torch, isa=samples.isa, pace_ms=round(pace_ms, 4),
                              pace_elasticity=round(elasticity, 4) if pace_ms else 1.0,
                              method="split model per operator class, non-negative least squares on the error "
                                     "(relative to each network's total) of operators timed in context in random "
                                     f"synthetic CNNs (exported), batches {', '.join(map(str, BATCHES))}; int8: oneDNN "
                                     "kernels and quantized max pooling timed alone, plus what compiled, profiled "
                                     "synthetic networks add (kernel context, generated loops, wrapper)"
                                     + (" [quick]" if samples.quick else "")
                                     + (f" [{samples.runs} calibrations pooled]" if samples.runs > 1 else ""),
                              fit=fit),
    )
