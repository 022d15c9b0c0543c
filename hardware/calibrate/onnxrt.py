"""Calibration for ONNX Runtime: this machine's profile refitted to whole networks timed in ONNX Runtime.

ONNX Runtime fuses and re-lays out operators, so they are not timed one by one: each synthetic network
(hardware.synthetic) is exported to ONNX as deployfit exports a candidate, float and INT8 QDQ (the caller's
`OrtBuilder`: exporting is the tasks layer's job), and timed whole in a session, in alternation with the pace
network's session (hardware.measure.measure_interleaved). That ratio, which the machine's drift barely moves, is
brought to seconds by the pace network's median over the whole calibration.

The profile keeps the host profile's machine (peaks, bandwidths, cache) and the roofline model of
hardware.latency (compute + memory + a time per operator and per call), and fits its efficiencies by
non-negative least squares on relative error (fit_runtime): per group of operator classes the share of peak
compute and of cache bandwidth reached, what a convolution off ONNX Runtime's blocked layout costs more (input
channels not a multiple of ORT_CHANNEL_MULTIPLE, unless a dense one on fewer than ORT_ALIGNED_BELOW), and the time
per operator, per view and per call; float first, then INT8 QDQ with the float rows of its networks priced by the
float fit. BatchNorm is folded into its convolution (fused).
"""
from __future__ import annotations

import datetime as _dt
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from estimators.defaults import ORT_CALIBRATION_S, QUICK_ORT_CALIBRATION_S
from estimators.progress import step
from estimators.table import LayerTable

from ..latency import fused_mask, off_multiple, roof_memory, row_features
from ..measure import measure_interleaved
from ..profile import Efficiency, HardwareProfile, Provenance
from .sampling import BATCHES, Progress, cache_bytes, light_table, typical

# ONNX Runtime's CPU provider runs a convolution in its blocked layout (NCHWc) where its input channels are a
# multiple of this, or it is dense on fewer input channels than its block (8 channels with AVX2, 16 with AVX-512: the
# caller says which), or it is grouped with channels per group, in and out, multiples of the block (docs/onnx.md)
ORT_CHANNEL_MULTIPLE = 4
ORT_FUSED = ["norm"]  # BatchNorm folded into the convolution before it by the graph optimiser
# the classes fitted together (a group's efficiencies are its classes'); groups of MISALIGNED fit their compute
# apart on rows off the blocked layout
FIT_GROUPS = {"conv": ("conv",), "gconv": ("gconv",), "dwconv": ("dwconv",), "gemm": ("gemm", "attention"),
              "pool": ("pool", "maxpool"),
              "other": ("elementwise", "transcendental", "permute", "copy", "norm")}
MISALIGNED = ("conv", "gconv", "dwconv")
OFF_INHERIT = {"gconv": "conv"}  # a group no misaligned row was timed for takes this group's factor
INHERIT = {"gconv": "conv", "dwconv": "conv", "gemm": "conv", "pool": "other"}  # a group no network had
MAX_COMPUTE, MAX_BANDWIDTH, FACTOR_RANGE = 4.0, 50.0, (0.25, 8.0)  # hardware.profile.Efficiency's ranges
LEAST_NETS = 6  # networks timed whatever the budget: fewer cannot fit a group's compute and bandwidth apart
SLOW_NET_S = 0.15  # a network whose eager call at the largest batch takes longer is skipped (timing it is long)
FOLDS = 4  # the fit is also scored on networks left out of it, in this many folds

# a float module, an example batch of 2, a folder and the modules to quantize -> the float ONNX model's session
# and the INT8 QDQ model's (None where `int8` is empty), as functions of torch tensors
OrtBuilder = Callable[[nn.Module, torch.Tensor, Path, list[str]], tuple[Callable, Callable | None]]


@dataclass
class OrtSample:
    label: str
    table: LayerTable  # the network's analysis (float) or its INT8 estimate
    batch: int
    dtype: str  # "fp32" or "int8": which fit the sample belongs to
    ratio: float  # its latency over the pace network's, timed in alternation
    seconds: float = 0.0  # the ratio at the calibration's pace network median (ort_samples)
    net: int = 0  # which network: samples of one network are left out of a fold together


def _int8_layers(table: LayerTable) -> list[str]:
    """The modules the INT8 estimate `table` quantizes (its convolutions and linears that compute in int8)."""
    dt = table.state.xdtype
    return sorted({table.module_names[i] for i in range(table.n)
                   if dt[i] == "int8" and table.kinds[i] in ("conv", "gemm") and table.module_names[i]})


def ort_samples(budget_s: float, progress: Progress, build: OrtBuilder, int8: bool = True,
                batches: tuple[int, ...] = BATCHES, seed0: int = 400_000, least: int = LEAST_NETS
                ) -> list[OrtSample]:
    """Export synthetic networks to ONNX (float and, with `int8`, INT8 QDQ) and time each at every batch in
    alternation with the pace network's float session; at least `least` networks, then none started that would end
    past `budget_s`."""
    from estimators.methods.quantize import estimate as estimate_quantize
    from estimators.strategy import QuantizeStep

    from ..synthetic import pace_network, synthetic_cnn

    out: list[OrtSample] = []
    pace_ms: dict[int, list[float]] = {b: [] for b in batches}
    t0 = time.perf_counter()
    took: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, step(progress, "ONNX Runtime networks", budget_s, "s") as counted:
        pace_model, pace_shape = pace_network()
        pace_fn, _ = build(pace_model.eval(), torch.randn(2, *pace_shape[1:]), Path(tmp) / "pace", [])
        seed, nets = seed0, 0
        skipped: list[str] = []
        while len(skipped) < 3 * least and (nets < least or time.perf_counter() - t0 + typical(took) < budget_s):
            model, shape = synthetic_cnn(seed)
            seed += 1
            model.eval()
            with torch.inference_mode():
                t1 = time.perf_counter()
                model(torch.randn(max(batches), *shape[1:]))
                if time.perf_counter() - t1 > SLOW_NET_S:
                    continue
            t1 = time.perf_counter()
            label = f"synthetic-{seed - 1}"
            table = light_table(model, torch.randn(1, *shape[1:]), name=label)
            qtable = estimate_quantize(table, QuantizeStep(dtype="int8")) if int8 else None
            try:
                float_fn, int8_fn = build(model, torch.randn(2, *shape[1:]), Path(tmp) / label,
                                          _int8_layers(qtable) if qtable is not None else [])
            except Exception as exc:  # noqa: BLE001 - a network that does not export is skipped, and said
                skipped.append(f"{label} ({type(exc).__name__}: {str(exc)[:120]})")
                continue
            for b in batches:
                fns = [pace_fn, float_fn] + ([int8_fn] if int8_fn is not None else [])
                x, xp = torch.randn(b, *shape[1:]), torch.randn(b, *pace_shape[1:])
                got = measure_interleaved(fns, [xp] + [x] * (len(fns) - 1), budget_s=0.3, min_rounds=5, max_rounds=15)
                pace_ms[b].append(got["latency_ms"][0])
                out.append(OrtSample(f"{label} b{b} float", table, b, "fp32", got["ratio"][1], net=nets))
                if int8_fn is not None:
                    out.append(OrtSample(f"{label} b{b} int8", qtable, b, "int8", got["ratio"][2], net=nets))
            nets += 1
            took.append(time.perf_counter() - t1)
            counted.update(time.perf_counter() - t0, f"{nets} networks exported and timed")
        counted.finish(f"{nets} synthetic networks exported to ONNX{' (float and INT8 QDQ)' if int8 else ''} and "
                       f"timed in ONNX Runtime at batch {', '.join(map(str, batches))}"
                       + (f"; {len(skipped)} did not export: {'; '.join(skipped[:3])}" if skipped else ""),
                       done=time.perf_counter() - t0)
    if not out:
        raise RuntimeError(f"no synthetic network exported to ONNX here: {'; '.join(skipped[:3])}")
    pace = {b: float(np.median(v)) / 1e3 for b, v in pace_ms.items() if v}
    for s in out:
        s.seconds = s.ratio * pace[s.batch]
    return out


def layout_rules(block: int | None) -> dict:
    """ONNX Runtime's blocked-layout rules for its NCHWc `block` on a CPU (None: no blocked layout there, and no
    channel count is off it), as the profile fields hardware.latency.channels_off reads."""
    return {"channel_multiple": ORT_CHANNEL_MULTIPLE if block else None, "misaligned_by": "input",
            "aligned_below": block or 0, "group_multiple": block}


def runtime_shape(base: HardwareProfile, runtime: str, block: int | None) -> HardwareProfile:
    """`base` (this machine's host profile) with ONNX Runtime's layout rules for its NCHWc `block` here
    (layout_rules) and fusion, its efficiencies still the
    host's: what fit_runtime fits the efficiencies of. Its cache is the whole last-level cache: ONNX Runtime read
    2 to 18 MB of 1x1 convolution weights per call at one rate on a 32 MiB L3 here, with no step at the quarter
    of it that eager PyTorch's fit takes (a float fit on 18 networks: 5.9% error in sample with the whole cache,
    14.8% with the quarter)."""
    return base.model_copy(update={
        "runtime": runtime, "combine": "sum", **layout_rules(block), "cache_bytes": cache_bytes(),
        "batch_efficiency": {}, "slow_dtypes": {}, "float_runs_as": "fp32"})


def design(table: LayerTable, profile: HardwareProfile, batch: int, dtype: str) -> tuple[dict[str, float], float]:
    """The fit's columns for the rows of `table` that compute in `dtype` at `batch` on `profile` (runtime_shape):
    per group its FLOPs over peak (apart on misaligned rows), its cache-resident bytes over the cache's bandwidth,
    and the counts of its operators, views and calls; with the seconds the fit does not scale (traffic that spills
    to memory). The latency model's roof branch (hardware.latency.LatencyModel) is these columns times the
    coefficients coefficients_of gives."""
    flops, wb, ab, kinds, cin, cout = row_features(table, batch)
    rows = np.array(table.state.xdtype) == dtype
    fused = fused_mask(table, kinds, ORT_FUSED, ()) & rows
    cache = profile.cache_bytes or 0
    streams = np.array([[cache > 0 and wb.sum() > cache]])
    unit, fixed = (v[0] for v in roof_memory(profile, wb[None], ab[None], streams))
    off = off_multiple(profile, kinds, cin[None], cout[None], table.groups)[0]
    peak = profile.peak_gflops[dtype] * 1e9
    cols: dict[str, float] = {"kernels": 0.0}
    spilled = 0.0
    for g, classes in FIT_GROUPS.items():
        sel = rows & ~fused & np.isin(kinds, classes)
        cols[f"{g}.flops"] = float(flops[sel].sum()) / peak
        if g in MISALIGNED:  # what a FLOP off the blocked layout costs on top of one on it: never less
            cols[f"{g}.flops_off"] = float(flops[sel & off].sum()) / peak
        cols[f"{g}.bytes"] = float(unit[sel].sum())
        spilled += float(fixed[sel].sum())
        cols["kernels"] += float(sel.sum())
    cols["views"] = float((rows & (kinds == "view")).sum())
    cols["call"] = 1.0 if rows.any() else 0.0
    return cols, spilled


COLUMNS = tuple([f"{g}.{c}" for g in FIT_GROUPS for c in (("flops", "flops_off") if g in MISALIGNED else ("flops",))]
                + [f"{g}.bytes" for g in FIT_GROUPS] + ["kernels", "views", "call"])


def efficiency_of(coef: dict[str, float]) -> Efficiency:
    """The roofline efficiencies of fitted coefficients (seconds per column unit), within Efficiency's ranges."""
    compute, bandwidth, factor = {}, {}, {}
    for g, classes in FIT_GROUPS.items():
        c = coef[f"{g}.flops"]
        eff = MAX_COMPUTE if c <= 1 / MAX_COMPUTE else 1 / c
        b = coef[f"{g}.bytes"]
        share = MAX_BANDWIDTH if b <= 1 / MAX_BANDWIDTH else 1 / b
        for cls in classes:
            compute[cls], bandwidth[cls] = eff, share
            if g in MISALIGNED:
                factor[cls] = float(np.clip(1.0 + coef[f"{g}.flops_off"] * eff, 1.0, FACTOR_RANGE[1]))
    return Efficiency(compute={k: float(v) for k, v in compute.items()},
                      bandwidth={k: float(v) for k, v in bandwidth.items()},
                      kernel_overhead_us=coef["kernels"] * 1e6, view_overhead_us=coef["views"] * 1e6,
                      call_overhead_us=coef["call"] * 1e6, fused=list(ORT_FUSED), misaligned_factor=factor)


def coefficients_of(eff: Efficiency) -> dict[str, float]:
    """The coefficients a profile's efficiencies price design's columns with (efficiency_of's inverse, after its
    ranges)."""
    coef = {}
    for g, classes in FIT_GROUPS.items():
        cls = classes[0]
        coef[f"{g}.flops"] = 1 / eff.compute_of(cls)
        coef[f"{g}.bytes"] = 1 / eff.bandwidth_of(cls)
        if g in MISALIGNED:
            coef[f"{g}.flops_off"] = (eff.misaligned_factor.get(cls, 1.0) - 1.0) / eff.compute_of(cls)
    coef.update(kernels=eff.kernel_overhead_us * 1e-6, views=eff.view_overhead_us * 1e-6,
                call=eff.call_overhead_us * 1e-6)
    return coef


def _nnls(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares of relative error: min sum(((A x - y) / y) ** 2), x >= 0."""
    from scipy.optimize import nnls

    w = 1.0 / np.maximum(y, 1e-12)
    return nnls(A * w[:, None], y * w, maxiter=50 * A.shape[1])[0]


def _fit_coef(X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Coefficients for COLUMNS from design rows `X` and target seconds `y`; a group no sample had inherits
    another's (INHERIT)."""
    present = X.sum(0) > 0
    x = np.zeros(len(COLUMNS))
    if present.any():
        x[present] = _nnls(X[:, present], y)
    coef = dict(zip(COLUMNS, x.tolist()))
    for g, src in INHERIT.items():
        for c in ("flops", "bytes"):
            if not present[COLUMNS.index(f"{g}.{c}")]:
                coef[f"{g}.{c}"] = coef[f"{src}.{c}"]
    for g in MISALIGNED:  # no misaligned rows: another group's factor (OFF_INHERIT), else as fast as aligned ones
        if not present[COLUMNS.index(f"{g}.flops_off")]:
            src = OFF_INHERIT.get(g)
            extra = coef[f"{src}.flops_off"] / coef[f"{src}.flops"] if src and coef[f"{src}.flops"] > 0 else 0.0
            coef[f"{g}.flops_off"] = coef[f"{g}.flops"] * extra
    return coef


def _rows(samples: list[OrtSample], shape: HardwareProfile, dtype: str, base_eff: Efficiency | None
          ) -> tuple[np.ndarray, np.ndarray]:
    """Design rows of the samples of `dtype` and the seconds left for their `dtype` rows to explain (less the
    spilled traffic, and for INT8 networks less their float rows priced by `base_eff`)."""
    fc = coefficients_of(base_eff) if base_eff is not None else None
    X, y = [], []
    for s in samples:
        cols, fixed = design(s.table, shape, s.batch, dtype)
        if fc is not None:
            fcols, ffixed = design(s.table, shape, s.batch, "fp32")
            fixed += ffixed + sum(fcols[k] * fc[k] for k in COLUMNS)
        X.append([cols[k] for k in COLUMNS])
        y.append(s.seconds - fixed)
    return np.array(X), np.array(y)


def _errors(X: np.ndarray, left: np.ndarray, seconds: np.ndarray, eff: Efficiency) -> np.ndarray:
    """The absolute relative errors of `eff`'s predictions of samples whose design rows are `X`, `left` of their
    `seconds` being what the columns must explain (_rows)."""
    c = coefficients_of(eff)
    return np.abs(X @ np.array([c[k] for k in COLUMNS]) - left) / seconds


def fit_runtime(samples: list[OrtSample], shape: HardwareProfile) -> tuple[dict[str, Efficiency], dict[str, float]]:
    """The efficiencies per dtype (fp32; int8 where INT8 networks were timed) fitted to `samples` on `shape`
    (runtime_shape), and the fit's statistics: per dtype its samples, MAPE in sample and over networks left out
    (FOLDS folds by network)."""
    effs: dict[str, Efficiency] = {}
    stats: dict[str, float] = {}
    for dtype in ("fp32", "int8"):
        mine = [s for s in samples if s.dtype == dtype]
        if not mine:
            continue
        X, y = _rows(mine, shape, dtype, effs.get("fp32") if dtype == "int8" else None)
        seconds = np.array([s.seconds for s in mine])
        eff = efficiency_of(_fit_coef(X, y))
        effs[dtype] = eff
        stats[f"{dtype}.samples"] = float(len(mine))
        stats[f"{dtype}.mape"] = round(float(np.mean(_errors(X, y, seconds, eff))), 4)
        nets = sorted({s.net for s in mine})
        if len(nets) >= FOLDS:
            net = np.array([s.net for s in mine])
            errs = []
            for k in range(FOLDS):
                held = np.isin(net, [n for i, n in enumerate(nets) if i % FOLDS == k])
                e = efficiency_of(_fit_coef(X[~held], y[~held]))
                errs.extend(_errors(X[held], y[held], seconds[held], e))
            stats[f"{dtype}.left_out_mape"] = round(float(np.mean(errs)), 4)
    return effs, stats


def runtime_profile(base: HardwareProfile, samples: list[OrtSample], runtime: str, seconds: float,
                    block: int | None) -> HardwareProfile:
    """This machine's profile for ONNX Runtime: `base`'s machine with ONNX Runtime's layout rules for its NCHWc
    `block` (runtime_shape), the efficiencies fit_runtime fits to `samples`, and a provenance naming `runtime`."""
    shape = runtime_shape(base, runtime, block)
    effs, stats = fit_runtime(samples, shape)
    prov = base.provenance
    nets = len({s.net for s in samples})
    stats.update(networks=float(nets), seconds=round(seconds, 1))
    provenance = Provenance(
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), cpu=prov.cpu if prov else "",
        threads=prov.threads if prov else torch.get_num_threads(), torch=prov.torch if prov else torch.__version__,
        isa=prov.isa if prov else "", method=f"{runtime}: {nets} synthetic networks timed whole in alternation with "
        "the pace network, roofline efficiencies fitted by non-negative least squares (hardware.calibrate.onnxrt)",
        fit=stats)
    sources = {**base.sources, "efficiency": f"fitted to {nets} synthetic networks timed in {runtime} on this "
               "machine (hardware.calibrate.onnxrt)",
               "cache_bytes": f"the whole {shape.cache_bytes // 2**20} MiB last-level cache (sysfs): ONNX Runtime reads "
               "a model's weights from it at one rate up to its size",
               "channel_multiple": (f"ONNX Runtime's blocked layout here: {block}-channel blocks, read from what its "
                                    "graph optimiser makes of grouped convolutions" if block else
                                    "ONNX Runtime has no blocked layout on this CPU")}
    return shape.model_copy(update={
        "efficiency": effs["fp32"], "dtype_overrides": {k: v for k, v in effs.items() if k != "fp32"},
        "sources": sources, "provenance": provenance,
        "description": f"{base.description}; {runtime}"})


def calibrate_runtime(base: HardwareProfile, build: OrtBuilder, runtime: str, block: int | None, quick: bool = False,
                      progress: Progress = lambda m: None, int8: bool = True, budget_s: float | None = None,
                      least: int = LEAST_NETS) -> HardwareProfile:
    """Calibrate this machine for ONNX Runtime on top of its host profile `base`: ort_samples, then
    runtime_profile. `budget_s` defaults to ORT_CALIBRATION_S (QUICK_ORT_CALIBRATION_S with `quick`)."""
    t0 = time.perf_counter()
    budget = budget_s if budget_s is not None else (QUICK_ORT_CALIBRATION_S if quick else ORT_CALIBRATION_S)
    samples = ort_samples(budget, progress, build, int8=int8 and "int8" in base.fast_dtypes, least=least)
    return runtime_profile(base, samples, runtime, time.perf_counter() - t0, block)
