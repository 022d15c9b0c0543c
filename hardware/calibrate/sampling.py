"""Calibration's float part: synthetic networks timed operator by operator inside the running network.

Single-operator loops flatter a CPU (weights and inputs stay hot in the cache, nothing else evicts them), so every
operator is timed *inside* a random synthetic CNN (hardware.synthetic) exported as deployfit's artifacts are, at each
calibrated batch size; the network's untimed total is measured around the rows. The pace network
(hardware.measure.PaceClock) is read before and after each network, so that samples can later be brought to one
pace of this drifting machine (samples.at_one_pace).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from estimators.progress import step
from estimators.pruning import PrunePlan
from estimators.table import LayerTable, build_table
from estimators.trace import trace_model

from ..measure import measure_latency

Progress = Callable[[str], None]
State = Callable[[], float]  # the machine's state now (hardware.measure.StateClock; a constant where not tracked)
Pace = Callable[..., float]  # the pace network's latency now, ms (hardware.measure.PaceClock; 0 where not read)


def no_pace(fresh: bool = False) -> float:
    """A Pace that reads nothing."""
    return 0.0


def pace_around(before: float, after: float) -> float:
    """The pace while a sample was timed: the mean of readings before and after it (the one read where one was
    not). Not the lower of the two: that is biased low against the median the profile's pace is, and would put
    every paced prediction too high; a stall that hit one reading is dropped by PACE_BAND."""
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
    from ..timing import row_times

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
                    seed0: int = 0, min_nets: int = 4, state: State = lambda: 0.0, pace: Pace = no_pace,
                    retime: int = RETIMED, tries: int = 2) -> tuple[dict[int, list[NetSample]], list[NetSample]]:
    """Time synthetic networks (hardware.synthetic), exported as artifacts are, operator by operator at every
    batch size until the budget is spent (and at least `min_nets`, so that a tiny budget still fits); then time
    the totals of the first `retime` of them again (retime_totals). Returns the samples by batch and the
    re-timings."""
    from ..synthetic import synthetic_cnn

    out: dict[int, list[NetSample]] = {b: [] for b in batches}
    first: list[tuple[nn.Module, tuple[int, ...], list[NetSample]]] = []  # kept to be timed again
    t0 = time.perf_counter()
    main_s = budget_s * (1 - RETIME_SHARE) if retime else budget_s
    seed, n = seed0, 0
    timed = ""
    took: list[float] = []  # seconds per network so far: none is started that would end past the budget
    with step(progress, "fp32 networks", budget_s, "s") as counted:
        while n < max_nets and (n < min_nets or time.perf_counter() - t0 + typical(took) < main_s):
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
                out[b].append(dataclasses.replace(sample, probe_us=probe, pace_ms=pace_around(before, pace(fresh=True))))
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


def typical(took: list[float]) -> float:
    """What the next sample is expected to take: the median of those so far (0 before the first)."""
    return float(np.median(took)) if took else 0.0


def retime_totals(nets: list[tuple[nn.Module, tuple[int, ...], list[NetSample]]], state: State = lambda: 0.0,
                  pace: Pace = no_pace) -> list[NetSample]:
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
                                           pace_ms=pace_around(before, pace(fresh=True))))
    return out
