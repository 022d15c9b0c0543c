"""A calibration's samples: collected (collect_samples), kept as data only (save_samples, load_samples: an npz and
one JSON entry, never a pickle), pooled across calibrations of one machine (merge_samples), and brought to one
pace of the machine before fitting (pace_elasticity, at_one_pace).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from estimators.defaults import CALIBRATION_BUDGET_S, INT8_LEAST_NETWORKS, QUICK_CALIBRATION_S
from estimators.progress import status
from estimators.pruning import PrunePlan
from estimators.table import LayerTable

from ..measure import PaceClock, StateClock, at_pace, cpu_isa, cpu_name, dominant_state, same_state
from .groups import FloatGroupSample, float_group_samples
from .int8 import (ElementSample, GroupSample, Int8Builder, Int8Sample, WrapperChains, WrapperSample, group_rule,
                   int8_group_graph_ns, int8_group_samples, int8_op_samples, int8_pool_samples, int8_samples)
from .sampling import (ELASTICITY_LEAST, PACE_BAND, PACE_LEAST, RETIMED, NetSample, Progress, cache_bytes,
                       measure_peaks, network_samples)

# share of the budget for the float networks; the INT8 part's compiled networks (10-20 s each, compiling at two
# batches) get most of the rest: at 0.5 of 150 s only 3 were compiled, fitting 9 coefficients
FP32_SHARE = 0.45
QUICK_FIT_S = 8.0  # what a quick calibration keeps of its QUICK_CALIBRATION_S for its fit
QUICK_FP32_SHARE = 0.7  # a quick calibration's float share: the rest times INT8 kernels and quantized pooling
# the least a quick calibration times whatever its budget, and the least each fit needs: on a busy machine (another
# process on one of the two cores) a synthetic network took 6-9 s, and minimums of 3 networks, 24 kernels and 12
# pools took a 45 s quick calibration to 52 s; above the least, nothing is started that would end past the budget
QUICK_LEAST = {"fp32 networks": 1, "int8 kernels": 8, "int8 pools": 4}


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
    groups: list = dataclasses.field(default_factory=list)  # INT8 grouped convolutions (int8_group_samples)
    group_graph_ns: list = dataclasses.field(default_factory=list)  # their slow kernel in a graph (int8_group_graph_ns)
    float_groups: list = dataclasses.field(default_factory=list)  # float grouped convolutions (float_group_samples)
    int8_wrapper: list = dataclasses.field(default_factory=list)  # compiled INT8 chains (int8.WrapperChains)


SEED_STRIDE = 1000  # seed offset between pooled calibrations (a part draws far fewer networks than this)
# pooled calibrations fit only the samples timed in their dominant state where at least this many are (about one
# calibration's worth); a single calibration fits all its samples (fitting only its dominant state's, 20-30%
# fewer, scored worse)
POOLED_LEAST = {"fp32": 40, "kernels": 300, "activations": 100, "pools": 20, "networks": 6}


def collect_samples(quick: bool = False, progress: Progress = lambda m: None, int8: bool = True,
                    budget_s: float = CALIBRATION_BUDGET_S, after: list[Samples] | None = None,
                    build_int8: Int8Builder | None = None) -> Samples:
    """Time this machine: peaks, then FP32 operators in synthetic networks at every batch in BATCHES, then
    (int8=True) INT8 kernels and compiled INT8 synthetic networks. `budget_s` bounds the timing; `quick` is a
    small budget for tests. The machine's state is read throughout (hardware.measure.StateClock); the peaks are
    measured again at the end when they were taken in another state than the calibration's dominant one.
    `after`: earlier calibrations this one will be pooled with: it draws other synthetic networks than theirs.
    `build_int8` compiles the INT8 networks of a full INT8 calibration (tasks.quantize_exec.compiled_int8); a quick
    one compiles none."""
    if int8 and not quick and build_int8 is None:
        raise ValueError("a full INT8 calibration compiles INT8 networks: pass build_int8 "
                         "(tasks.quantize_exec.compiled_int8), or calibrate with quick=True or int8=False")
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
    float_groups = float_group_samples(progress)
    spent = time.perf_counter() - t0  # the pace network's export, the peaks and the grouped convolutions come out of it
    share = (QUICK_FP32_SHARE if quick else FP32_SHARE) if int8 else 1.0
    nets, retimed = network_samples(max(budget_s - spent, 0.0) * share, progress,
                                    seed0=offset, state=clock, pace=pace, retime=2 if quick else RETIMED,
                                    min_nets=QUICK_LEAST["fp32 networks"] if quick else 4, tries=1 if quick else 2)
    ops: dict[int, list[NetSample]] = {}
    elems: list[ElementSample] = []
    pools: list[NetSample] = []
    q: list[Int8Sample] = []
    groups: list[GroupSample] = []
    graph_ns: list[float] = []
    wrapper: list[WrapperSample] = []
    if int8:
        left = max(budget_s - (time.perf_counter() - t0), 0.0)
        # INT8 is not paced: the compiled networks' pace readings fall between compiles, away from the machine's
        # pace while the networks run, and pacing by them predicted INT8 worse
        ops, elems = int8_op_samples(0.15 * left, progress, seed0=200_000 + offset, state=clock,
                                     min_ops=QUICK_LEAST["int8 kernels"] if quick else 24)
        pools = int8_pool_samples(0.05 * left, progress, seed0=300_000 + offset, state=clock,
                                  min_ops=QUICK_LEAST["int8 pools"] if quick else 12)
        groups = int8_group_samples(progress)
        multiple = group_rule(groups)[0]
        if multiple and not quick:
            graph_ns = [int8_group_graph_ns(build_int8, multiple, progress)]
        if not quick:
            chains = WrapperChains(build_int8, progress)
            chains()
            q = int8_samples(max(budget_s - (time.perf_counter() - t0), 0.0), progress, build_int8,
                             seed0=100_000 + offset, state=clock, min_nets=INT8_LEAST_NETWORKS, between=chains)
            wrapper = chains.samples
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
                   pace_readings=list(pace.readings), retimed=retimed, groups=groups,
                   group_graph_ns=graph_ns, float_groups=float_groups, int8_wrapper=wrapper)


SAMPLES_FORMAT = "deployfit-calibration-samples/1"


def _sample_classes() -> dict[str, type]:
    """The dataclasses a samples file may hold: nothing else is ever built from one."""
    from estimators.pruning import PruneGroup
    from estimators.table import State

    return {c.__name__: c for c in (Samples, NetSample, Int8Sample, ElementSample, GroupSample, FloatGroupSample,
                                    WrapperSample, LayerTable, State, PrunePlan, PruneGroup)}


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
                   [r for p in parts for r in p.retimed], [g for p in parts for g in p.groups],
                   [x for p in parts for x in p.group_graph_ns], [x for p in parts for x in p.float_groups],
                   [x for p in parts for x in p.int8_wrapper])


def paced_count(samples: Samples) -> int:
    """The float networks timed (the samples that are paced)."""
    return sum(map(len, samples.nets.values()))


def pace_elasticity(samples: Samples) -> tuple[float, int]:
    """How much of the pace network's drift a network's latency follows, and the number of pairs that measured it:
    every two timings of one network (its label: a network re-timed at the end of a calibration, or timed by two
    pooled calibrations that drew the same seed) give the log ratio of their totals and of their paces; the
    elasticity is the least-squares slope of the first on the second through the origin, within [0, 1]. 1 (the
    latency follows the pace in proportion) where fewer than ELASTICITY_LEAST pairs, or paces within 5% of each
    other on average, measure it. Timings over PACE_BAND away from the calibration's median pace are left out.
    The pace network can slow more than the networks do (a slope below 1), and pacing in proportion would then
    over-correct slow spells."""
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
