"""The host profile fitted to a calibration's samples (fit_profile), and a whole calibration (calibrate_host).

A VM can switch between states whose speeds differ by more than a prediction's error (fork/join and memory copy
both change, for minutes at a time). The profile records the state the calibration spent the most time in and, per
part, how many samples were timed in another. One calibration fits every sample (fitting only its main state's
leaves too few). Pooled calibrations (merge_samples) fit the samples of their dominant state alone, part by part,
where at least POOLED_LEAST remain, and the peaks of the runs measured in it. Float networks timed against the pace
network are first brought to one pace (at_one_pace); the profile's float predictions are then at that pace
(`provenance.pace_ms`), and pooled calibrations fit every sample (no state is picked).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from estimators.defaults import CALIBRATION_BUDGET_S

from ..latency import COL, SPLIT_WIDTH, group_tap_rows
from ..measure import dominant_state, same_state
from ..profile import Efficiency, HardwareProfile, Provenance
from .fit import (FUSED_INT8, UNFUSED_INT8, Int8Fit, element_ns, fit_glue, fit_int8, fit_pool, fit_split_model,
                  glue_bound, int8_coef, nearest_batch, split_efficiency, unbiased, wrapper_costs)
from .groups import group_call_tables, group_tap_table
from .int8 import QPOOL_LANES, Int8Builder, group_rule
from .samples import POOLED_LEAST, Samples, at_one_pace, collect_samples, pace_elasticity, paced_count, save_samples
from .sampling import BATCHES, CACHE_SHARE, ELASTICITY_LEAST, PACE_BAND, NetSample, Progress, channel_multiple

INT8_LANES = 4  # int8 dot products (VNNI) do 4x the multiply-adds of fp32 FMA per instruction


def calibrate_host(quick: bool = False, progress: Progress = lambda m: None, int8: bool = True,
                   budget_s: float = CALIBRATION_BUDGET_S, keep: str | Path | None = None,
                   build_int8: Int8Builder | None = None) -> HardwareProfile:
    """Calibrate this machine: collect_samples, then fit_profile. `keep`: also save the samples there.
    `build_int8`: what compiles INT8 networks (collect_samples)."""
    samples = collect_samples(quick, progress, int8, budget_s, build_int8=build_int8)
    if keep:
        save_samples(samples, keep)
    return fit_profile(samples, progress)


@dataclass
class _Fitting:
    """What every part of a fit shares: the machine's constants and the provenance's `fit` record."""

    multiple: int
    cache: float
    threads: int
    peaks: tuple[float, float, float, float]  # GEMM GFLOP/s, DRAM copy, cache copy, DRAM read (GB/s)
    ref: float | None  # the dominant state's sync probe (us)
    in_state_only: bool  # fit each part's samples of the dominant state alone
    record: dict[str, float] = field(default_factory=dict)

    def chosen(self, parts: list, part: str, least: int) -> list:
        """A part's samples to fit, recording how many were timed in another state than `ref`: pooled
        calibrations fit those in `ref` alone where at least `least` are (one calibration fits all its samples)."""
        other = sum(not same_state(x.probe_us, self.ref) for x in parts) if self.ref else 0
        self.record[f"state.{part}.other_state"] = other
        if self.in_state_only and other and len(parts) - other >= least:
            self.record[f"state.{part}.fitted"] = len(parts) - other
            return [x for x in parts if same_state(x.probe_us, self.ref)]
        return parts


def fit_profile(samples: Samples, progress: Progress = lambda m: None) -> HardwareProfile:
    """The host profile fitted to a calibration's samples (the module's docstring says which samples are fitted)."""
    t0 = time.perf_counter()
    timed = paced_count(samples)
    elasticity, pairs = pace_elasticity(samples)
    samples, pace_ms = at_one_pace(samples, elasticity)
    dropped = timed - paced_count(samples)
    ref = dominant_state(samples.readings)
    f = _Fitting(channel_multiple(samples.isa), CACHE_SHARE * samples.llc, samples.threads, samples.peaks, ref,
                 samples.runs > 1 and ref is not None and not pace_ms)
    if samples.runs > 1:
        f.record["calibrations_pooled"] = samples.runs
        same = [p for p, s in samples.peak_runs if same_state(s, ref)]
        if f.in_state_only and same:  # the peaks of the runs measured in the state fitted
            f.peaks = tuple(float(np.median([p[i] for p in same])) for i in range(4))
    nets = {b: f.chosen(ns, f"fp32.b{b}", POOLED_LEAST["fp32"]) for b, ns in samples.nets.items()}
    ops = {b: f.chosen(ns, f"int8.b{b}.kernels", POOLED_LEAST["kernels"]) for b, ns in samples.ops.items()}
    elems = f.chosen(samples.elems, "int8.activations", POOLED_LEAST["activations"])
    pools = f.chosen(samples.pools, "int8.pools", POOLED_LEAST["pools"])
    q = f.chosen(samples.q, "int8.networks", POOLED_LEAST["networks"])
    if samples.peaks_other_state:
        f.record["state.peaks_in_other_state"] = 1.0
    taps = _float_group_tables(f, samples.float_groups, list(nets), progress)
    nets = {b: [_without_taps(n, *taps.get(b, ({}, {}, {}))) for n in ns] for b, ns in nets.items()}
    # the grouped convolutions' call is timed (group_fixed_us) only in samples that timed it: older ones keep the
    # split model's overhead for it
    coefs, effs = _fit_float(f, nets, progress, timed_groups=any(t[2] for t in taps.values()))
    effs = {b: e.model_copy(update=dict(zip(("group_tap_ns", "group_call_ns", "group_fixed_us"), taps[b])))
            if taps.get(b, ({},))[0] else e for b, e in effs.items()}
    gflops = {"fp32": round(f.peaks[0], 2)}
    overrides: dict[int, Efficiency] = {}
    if samples.ops or samples.q:
        overrides = _fit_int8(f, coefs, ops, elems, pools, q, progress, samples.int8_wrapper)
        overrides = _with_group_rule(f, overrides, samples.groups, samples.group_graph_ns, progress)
        if overrides:
            gflops["int8"] = round(INT8_LANES * f.peaks[0], 2)
    if pace_ms:
        _record_pace(f, samples, pace_ms, elasticity, pairs, dropped, timed, progress)
    _record_state(f, samples, progress)
    f.record["seconds"] = round(samples.seconds + time.perf_counter() - t0, 1)
    return _host_profile(samples, f, gflops, effs, overrides, pace_ms, elasticity)


def _float_group_tables(f: _Fitting, samples: list, batches: list[int], progress: Progress
                        ) -> dict[int, tuple[dict, dict, dict]]:
    """Per float batch, the grouped convolutions' time per output element and tap, per image and group and per
    call, by channels per group (groups.group_tap_table and group_call_tables; Efficiency's
    group_tap_ns, group_call_ns and group_fixed_us), from the nearest batch timed; empty where none was timed
    (samples kept before they were)."""
    timed = sorted({x.batch for x in samples})
    out: dict[int, tuple[dict, dict, dict]] = {}
    for b in batches if timed else []:
        near = nearest_batch(b, timed)
        table = group_tap_table(samples, near)
        calls, fixed = group_call_tables(samples, near, table)
        out[b] = table, calls, fixed
        at = [pg for pg in (8, 11, 16, 24) if pg in table]
        for name, got in (("tap_ns", table), ("call_ns", calls), ("fixed_us", fixed)):
            f.record.update({f"fp32.b{b}.group_{name}_{pg}": got[pg] for pg in at if pg in got})
        text = f"fp32 batch {b} grouped convolutions at {', '.join(map(str, at))} channels per group: "
        text += ", ".join(f"{table[pg]:.3f}" for pg in at) + " ns per output element and tap"
        if calls:
            text += "; " + ", ".join(f"{calls.get(pg, 0.0):.0f}" for pg in at) + " ns per image and group; "
            text += ", ".join(f"{fixed.get(pg, 0.0):.1f}" for pg in at) + " us per call"
        progress(text)
    return out


def _without_taps(net: NetSample, tap_ns: dict | None, call_ns: dict | None = None,
                  fixed_us: dict | None = None) -> NetSample:
    """`net` less its float grouped convolutions' time per output element, per image and group and per call
    (group_tap_rows), which the profile prices from its own timing: the split model is fitted on the rest."""
    if not tap_ns:
        return net
    rows = group_tap_rows(net.table, tap_ns, net.batch or net.table.batch, call_ns, fixed_us)
    if not rows.any():
        return net
    return dataclasses.replace(net, row_seconds=np.asarray(net.row_seconds) - rows,
                               total_seconds=float(net.total_seconds - rows.sum()))


def _with_group_rule(f: _Fitting, overrides: dict[int, Efficiency], groups: list, graph_ns: list,
                     progress: Progress) -> dict[int, Efficiency]:
    """The INT8 efficiencies with the grouped-convolution rule read from `groups` (int8.group_rule): the channel
    multiple per group its fast kernel needs and the slow kernel's time per FLOP, the same at every batch: as timed
    in a compiled graph (`graph_ns`, int8.int8_group_graph_ns) where a full calibration did, else as timed alone."""
    multiple, s_per_flop = group_rule(groups)
    if multiple and graph_ns:
        f.record["int8.group_alone_ns"] = round(s_per_flop * 1e9, 4)
        s_per_flop = float(np.median(graph_ns)) * 1e-9
    if groups:
        f.record["int8.group_multiple"] = float(multiple or 0)
        f.record["int8.group_slow_ns"] = round(s_per_flop * 1e9, 4)
    if not overrides or not multiple:
        if groups:
            progress("int8 grouped convolutions: no slow path by channels per group")
        return overrides
    progress(f"int8 grouped convolutions: channels per group off a multiple of {multiple} run a slow kernel, "
             f"{s_per_flop * 1e9:.3f} ns per FLOP")
    return {b: e.model_copy(update={"group_multiple": multiple, "group_slow_ns": round(s_per_flop * 1e9, 4)})
            for b, e in overrides.items()}


def _fit_float(f: _Fitting, nets: dict, progress: Progress, timed_groups: bool = False
               ) -> tuple[dict[int, dict[str, np.ndarray]], dict[int, Efficiency]]:
    """Per batch, the split model, the glue and their efficiencies; larger batches are bounded below by the first
    one's overheads (a larger batch does not dispatch an operator faster). `timed_groups`: the networks' grouped
    convolutions have their timed compute taken out (fit.fit_split_model)."""
    peak, bw, cbw, rbw = f.peaks
    coefs: dict[int, dict[str, np.ndarray]] = {}
    effs: dict[int, Efficiency] = {}
    first = BATCHES[0]
    glues: dict[int, tuple[float, float, float]] = {}
    views: dict[int, float] = {}
    for b, ns in sorted(nets.items()):
        coef, view_s, row_err = fit_split_model(ns, f.multiple, f.cache, coefs.get(first), f.threads, timed_groups)
        if not {"conv", "elementwise"} <= set(coef):
            raise RuntimeError(f"calibration budget too small: {len(ns)} networks timed at batch {b}, not enough "
                               "convolutions and elementwise operators to fit")
        glue = fit_glue(ns, glue_bound(glues.get(first, (0.0, 0.0, 0.0))))
        view_s = max(view_s, views.get(first, 0.0))
        coef, view_s, glue, level, net_err = unbiased(ns, coef, view_s, glue, f.multiple, f.cache, f.threads)
        net_err = np.abs(net_err)
        glues[b], views[b] = glue, view_s
        coefs[b] = coef
        effs[b] = split_efficiency(coef, view_s, peak, rbw, cbw, bw, glue, threads=f.threads)
        f.record.update({f"fp32.b{b}.networks": len(ns), f"fp32.b{b}.operators": int(sum(n.table.n for n in ns)),
                         f"fp32.b{b}.row_error": round(row_err, 4),
                         f"fp32.b{b}.network_mape": round(float(net_err.mean()), 4),
                         f"fp32.b{b}.level": round(level, 4), f"fp32.b{b}.glue_us_per_op": round(glue[0] * 1e6, 3),
                         f"fp32.b{b}.glue_ns_per_kb": round(glue[2] * 1e12, 4)})
        progress(f"fit fp32 batch {b}: {len(ns)} networks, operator error {100 * row_err:.1f}%, network MAPE "
                 f"{100 * net_err.mean():.1f}% (in sample), {glue[0] * 1e6:.1f} us per operator outside operators")
    return coefs, effs


def _fit_int8(f: _Fitting, coefs: dict[int, dict[str, np.ndarray]], ops: dict, elems: list, pools: list, q: list,
              progress: Progress, chains: list | None = None) -> dict[int, Efficiency]:
    """The INT8 efficiencies per float batch: kernels, pooling and fused activations timed alone, and what compiled
    graphs add around them (fit_int8); a quick calibration (no compiled networks) prices the graph's other
    operators as the float fit's elementwise rows. Empty where nothing INT8 was timed."""
    peak, bw, cbw, rbw = f.peaks
    first = BATCHES[0]
    pool = fit_pool(pools)
    progress(f"fit int8 max pooling: {pool[0] * 1e6:.1f} us per call, {pool[1] * 1e9:.4f} ns per element x window, "
             f"{pool[2] * 1e9:.3f} ns more on channels beyond a multiple of {QPOOL_LANES}")
    elem_ns = element_ns(elems)
    if elem_ns:
        progress("int8 fused activations: " + ", ".join(f"{k} {v:.3f} ns per element" for k, v in elem_ns.items()))
    coefs8: dict[int, dict[str, np.ndarray]] = {}
    for b, ns in ops.items():
        coefs8[b], _, op_err = fit_split_model(ns, f.multiple, f.cache, coefs8.get(first))
        f.record[f"int8.b{b}.kernels"] = len(ns)
        f.record[f"int8.b{b}.kernel_error"] = round(op_err, 4)
        progress(f"fit int8 kernels batch {b}: {len(ns)} kernels, error {100 * op_err:.1f}% (in sample)")
    if not (q or coefs8):
        progress("int8: no time left in the budget; the profile has no int8 entry")
        return {}
    wrapper = wrapper_costs(chains or [], coefs8.get(first), f.cache, f.multiple) if first in coefs8 else None
    if q:
        f8 = fit_int8(q, coefs8, f.cache, elem_ns, pool, f.multiple, wrapper)
    else:
        # no compiled networks (a quick calibration): the graph adds nothing measured to its kernels; its other
        # operators (generated loops) cost as the float fit's elementwise rows, per operator and per byte
        el = coefs[first].get("elementwise", np.zeros(SPLIT_WIDTH))
        f8 = Int8Fit({b: 0.0 for b in coefs8}, {b: 0.0 for b in coefs8}, 0.0, 0.0,
                     float(el[COL["overhead"]]), float(el[COL["act_cache_bytes"]]), 0.0)
        progress("int8: no compiled networks (quick): the kernels as timed alone, the graph's other operators "
                 "as the float fit's elementwise ones; predictions anchored on the quantized original get the level")
    overrides: dict[int, Efficiency] = {}
    for b, coef in coefs.items():
        b8 = nearest_batch(b, list(coefs8))
        e8 = split_efficiency(int8_coef(coef, coefs8[b8], f8, b8, pool), 0.0, INT8_LANES * peak, rbw, cbw,
                              bw, (0.0, f8.call_s + f8.other_s, 0.0), fused=FUSED_INT8)
        overrides[b] = e8.model_copy(update={
            "view_overhead_us": 0.0, "unfused_ops": UNFUSED_INT8, "element_ns": elem_ns,
            "input_ns_per_element": round(2 * (f8.element_s + f8.byte_s) * 1e9, 5),  # quantizing the input
            "remainder_ns": {"maxpool": round(float(pool[2]) * 1e9, 5)},
            "remainder_multiple": {"maxpool": QPOOL_LANES}})
    _record_int8(f, f8, pool, elem_ns, q, progress, bool(q) and wrapper is not None)
    return overrides


def _record_int8(f: _Fitting, f8: Int8Fit, pool: np.ndarray, elem_ns: dict[str, float], q: list,
                 progress: Progress, timed: bool = False) -> None:
    """`timed`: the call's and the operators' prices were timed directly (fit.wrapper_costs), not fitted."""
    f.record.update({"int8.networks": len(q), "int8.network_mape": round(f8.mape, 4),
                     "int8.wrapper_timed": float(timed),
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
             f"{100 * f8.mape:.1f}% (in sample); a kernel in a graph against alone {ctx}; "
             f"{'timed in small graphs: ' if timed else ''}call "
             f"{f8.call_s * 1e6:.0f} us, {f8.kernel_s * 1e6:.1f} us per kernel outside it and "
             f"{f8.byte_s * 1e9:.3f} ns per element operators move, "
             f"{f8.other_s * 1e6:.1f} us per other operator and {f8.element_s * 1e9:.2f} ns per element it "
             f"moves (+{f8.permute_s * 1e9:.2f} ns where it reorders memory)")


def _record_pace(f: _Fitting, samples: Samples, pace_ms: float, elasticity: float, pairs: int, dropped: int,
                 timed: int, progress: Progress) -> None:
    readings_ms = samples.pace_readings  # at_one_pace keeps them
    lo, hi = np.percentile(readings_ms, [5, 95])
    f.record.update({"pace_ms": round(pace_ms, 4), "pace.readings": len(readings_ms),
                     "pace.p5_ms": round(float(lo), 4), "pace.p95_ms": round(float(hi), 4), "pace.dropped": dropped,
                     "pace.elasticity": round(elasticity, 4), "pace.pairs": pairs})
    measured = (f"{elasticity:.2f}, measured on {pairs} pairs of timings of one network" if pairs >= ELASTICITY_LEAST
                else f"1 (not measured: {pairs} pairs of timings of one network)")
    progress(f"pace: the pace network ran {pace_ms:.2f} ms (median of {len(readings_ms)} readings, 5-95% "
             f"{lo:.2f}-{hi:.2f} ms); the float networks brought to that pace before fitting (latency x (pace / "
             f"pace then) ** elasticity, the elasticity {measured}), {dropped} of {timed} timed more than "
             f"{PACE_BAND:g}x away from it dropped")


def _record_state(f: _Fitting, samples: Samples, progress: Progress) -> None:
    readings, ref, fit = samples.readings, f.ref, f.record
    share = float(np.mean([same_state(p, ref) for p in readings])) if ref else 1.0
    fit.update({"sync_probe_us": round(ref, 3) if ref else 0.0,
                "sync_probe_range_us": round(max(readings) - min(readings), 3),
                "state.readings": len(readings), "state.in_state_share": round(share, 3),
                "state.memory_copy_gbs": round(f.peaks[1], 2)})
    other = sum(v for k, v in fit.items() if k.startswith("state.") and k.endswith(".other_state"))
    progress(f"machine state: sync probe {ref:.2f} us (fork and join of all threads) in {100 * share:.0f}% of "
             f"{len(readings)} readings ({min(readings):.2f}-{max(readings):.2f} us), memory copy {f.peaks[1]:.1f} "
             f"GB/s; {other} samples timed in another state"
             + ("; the peaks too" if fit.get("state.peaks_in_other_state") else "")
             + (f"; pooled: {', '.join(k[6:-7] for k in fit if k.endswith('.fitted'))} fitted on this state's "
                "samples alone" if any(k.endswith(".fitted") for k in fit) else ""))


def _host_profile(samples: Samples, f: _Fitting, gflops: dict[str, float], effs: dict[int, Efficiency],
                  overrides: dict[int, Efficiency], pace_ms: float, elasticity: float) -> HardwareProfile:
    peak, bw, cbw, rbw = f.peaks
    threads, first = f.threads, BATCHES[0]
    method = ("split model per operator class, non-negative least squares on the error (relative to each network's "
              "total) of operators timed in context in random synthetic CNNs (exported), batches "
              f"{', '.join(map(str, BATCHES))}, float grouped convolutions' time per output timed alone by channels "
              "per group; int8: oneDNN kernels and quantized max pooling timed alone, what a compiled graph adds "
              "per call, per kernel and per generated loop timed in small compiled chains (relative to their kernel "
              "alone), what compiled, profiled synthetic networks add beyond (kernel context and bytes moved, "
              "generated loops' elements), and its grouped "
              "convolution at several channels per group (its slow kernel)"
              + (" [quick]" if samples.quick else "")
              + (f" [{samples.runs} calibrations pooled]" if samples.runs > 1 else ""))
    return HardwareProfile(
        name="host",
        description=f"this machine: {samples.cpu}" + (f" ({samples.isa})" if samples.isa else "")
                    + f", {threads} threads",
        runtime=f"PyTorch {samples.torch} on {threads} threads: float models as deployfit's exported program "
                "(ExportedProgram.module(), eager ATen); int8 as the inductor-compiled (freezing) Intel Neural "
                "Compressor graph",
        peak_gflops=gflops,
        memory_bandwidth_gbs=round(bw, 2),
        memory_read_bandwidth_gbs=round(rbw, 2),
        cache_bytes=int(f.cache),
        cache_bandwidth_gbs=round(cbw, 2),
        fast_dtypes=list(gflops),
        channel_multiple=f.multiple,
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
                                   f"{samples.llc // 2**20} MiB last-level cache (sysfs), the share fitted best",
            "efficiency": "fitted by `deployfit calibrate` to operators timed inside synthetic networks (provenance)",
        },
        provenance=Provenance(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), cpu=samples.cpu,
                              threads=threads, torch=samples.torch, isa=samples.isa, pace_ms=round(pace_ms, 4),
                              pace_elasticity=round(elasticity, 4) if pace_ms else 1.0, method=method, fit=f.record),
    )
