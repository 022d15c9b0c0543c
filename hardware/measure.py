"""Measurement of real (compressed) models: what the estimates are checked against.

- `count_module`: parameters and MACs of an nn.Module with torch-pruning's own counter.
- `gemm_macs`: conv/linear/matmul MACs of any callable with torch's FlopCounterMode (FLOPs / 2).
- `stored_tensor_bytes`: bytes of every tensor an ExportedProgram stores (state_dict + constants).
- `measure_peak_activation_bytes`: the largest total of activation storages alive at once while the
  model runs eagerly, tracked at the ATen dispatcher: every op output's storage is counted from its
  creation until the last tensor viewing it is freed (weak references), so it measures the real
  lifetimes PyTorch's eager execution gives, not the estimator's liveness analysis.

Every `example` here is a model's input: one tensor, or for a model of several inputs the tuple of them, fed
positionally (`fn(*inputs)`, estimators.modelspec.as_inputs); a batch is the first input's first dimension.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import math
import statistics
import time
import weakref
from typing import Callable

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from estimators.modelspec import as_inputs


def count_module(model: torch.nn.Module, example) -> dict[str, float]:
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    # torch-pruning's counter feeds a tuple positionally and averages over the first input's batch
    macs, params = tp.utils.count_ops_and_params(model, example)
    model.train(was_training)
    macs = int(macs) if float(macs).is_integer() else float(macs)
    return {"params": int(params), "macs": macs, "flops": 2 * macs}


def gemm_macs(fn: Callable, example) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    xs = as_inputs(example)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fn(*xs)
    return int(fc.get_total_flops() // 2 // xs[0].shape[0])


def stored_tensors(ep) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor an ExportedProgram stores: its state_dict and its tensor constants."""
    items = [(n, t.data if isinstance(t, torch.nn.Parameter) else t) for n, t in ep.state_dict.items()]
    for name, t in ep.constants.items():
        if isinstance(t, torch.Tensor):
            items.append((name, t))
        else:  # a ScriptObject or similar cannot be sized here
            logging.getLogger(__name__).warning("program constant %s is a %s, not a tensor; not counted",
                                                name, type(t).__name__)
    return items


def stored_tensor_bytes(ep) -> int:
    """Bytes of all tensors the program stores, each storage counted once (tied weights, views)."""
    seen: dict[tuple, int] = {}
    for _, t in stored_tensors(ep):
        st = t.untyped_storage()
        key = (t.device.type, t.device.index, st.data_ptr()) if st.data_ptr() != 0 else ("obj", id(st))
        seen[key] = max(seen.get(key, 0), st.nbytes())
    return int(sum(seen.values()))


class _PeakTracker(TorchDispatchMode):
    def __init__(self, exclude: set[int]):
        super().__init__()
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0
        self.exclude = exclude

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st.data_ptr()
        if not st.nbytes() or key in self.exclude:
            return
        if key not in self.refs:
            self.refs[key] = 0
            self.sizes[key] = st.nbytes()
            self.live += st.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        if key in self.refs:
            self.refs[key] -= 1
            if self.refs[key] == 0:
                self.live -= self.sizes.pop(key)
                del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


def measure_peak_activation_bytes(fn: Callable, example, weights: list[torch.Tensor]) -> int:
    """Peak bytes of activation storages alive at once during one eager forward (inputs included)."""
    exclude = {w.untyped_storage().data_ptr() for w in weights if isinstance(w, torch.Tensor) and w.numel()}
    xs = [x.clone() for x in as_inputs(example)]
    tracker = _PeakTracker(exclude)
    with torch.no_grad():
        for x in xs:
            tracker.track(x)
        with tracker:
            out = fn(*xs)
        del out
    return tracker.peak


_VIEW_OPS = {"view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "select", "slice", "alias",
             "unsqueeze", "squeeze", "detach", "as_strided", "lift_fresh", "_reshape_alias"}


class _TrafficCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
        if name in _VIEW_OPS:
            return out
        ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        self.bytes += sum(t.numel() * t.element_size() for t in ins + outs)
        return out


def measure_memory_access_bytes(fn: Callable, example) -> int:
    """Bytes every non-view ATen op reads (its tensor arguments, weights included) and writes, summed."""
    xs = as_inputs(example)
    counter = _TrafficCounter()
    with torch.no_grad(), counter:
        fn(*xs)
    return counter.bytes


# the CPU features that change which kernels oneDNN and inductor run (vector width, INT8 dot products, AMX)
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def cpuinfo(key: str) -> str | None:
    """The value of the first `key` line of /proc/cpuinfo (None where there is none or it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo; the platform's processor or machine where it cannot be read)."""
    import platform

    return cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The ISA_FLAGS this CPU has, joined by '+' ('' where /proc/cpuinfo cannot be read). Two machines whose
    CPUs report the same name can differ here (seen: 'AMD EPYC' with and without AVX-512), and a profile
    calibrated on one mispredicts the other by 2-9x."""
    have = set((cpuinfo("flags") or "").split())
    return "+".join(x for x in ISA_FLAGS if x in have)


_ALLOCATOR: str | None = None


def steady_allocator() -> str:
    """Keep freed memory in the process, as a serving process's caching allocator does.

    glibc returns large blocks to the kernel when they are freed (mmap above a threshold that moves
    with the process's history, and heap trimming), so the same model pays a different number of page
    faults per call depending on what the process did before: mobilenet_v2 at batch 1 measured 8.4 to
    13.3 ms on this machine across fresh processes, the difference being ~1,000 page faults per call.
    Raising the mmap and trim thresholds (mallopt) makes every measurement the steady state. Returns a
    description of the allocator for the measurement record."""
    global _ALLOCATOR
    if _ALLOCATOR is not None:
        return _ALLOCATOR
    _ALLOCATOR = "default"
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        if libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1:
            _ALLOCATOR = "glibc: mmap threshold 1 GiB, trim threshold 2 GiB (freed memory kept, as a caching allocator)"
    except (OSError, AttributeError):
        pass
    return _ALLOCATOR


def sync_probe_us(seconds: float = 0.2) -> float:
    """Median time of one elementwise kernel just large enough to be split over all threads, in us, timed as
    every measurement is (measure_latency).

    It is mostly the cost of handing work to the other threads and waiting for them (fork and join), which
    tells a shared VM's states apart: a VM whose vCPUs move between sharing one cache and two reads distinct
    probe times, and its networks and memory copies run at distinct speeds with them. Calibration records the
    state it spent the most time in (StateClock, dominant_state)."""
    x = torch.randn(50_000 * max(1, torch.get_num_threads()))  # above ATen's grain (32,768) per thread
    return measure_latency(torch.relu, x, warmup=20, min_runs=50, max_runs=10**9, budget_s=seconds)["latency_ms"] * 1e3


# Readings of sync_probe_us within this share of each other are one state of the machine: two states of a VM
# read about 30% apart, and +-15% around either holds its own readings and not the other's.
STATE_TOLERANCE = 0.15


def same_state(probe_us: float, reference_us: float, tolerance: float = STATE_TOLERANCE) -> bool:
    """Whether a sync probe reading is in the state `reference_us` was read in (within +-tolerance, as a ratio)."""
    if probe_us <= 0 or reference_us <= 0:
        return False
    return abs(math.log(probe_us / reference_us)) <= math.log1p(tolerance)


def dominant_state(probes: list[float], tolerance: float = STATE_TOLERANCE) -> float | None:
    """The state most of `probes` were read in: the median of the largest group of readings within +-tolerance of
    one of them (None without readings). A reading between the states, or an outlier, joins no large group."""
    vals = sorted(p for p in probes if p > 0)
    if not vals:
        return None
    best: list[float] = []
    for v in vals:
        group = [p for p in vals if same_state(p, v, tolerance)]
        if len(group) > len(best):
            best = group
    return float(statistics.median(best))


class StateClock:
    """The machine's state while something long is timed: sync_probe_us read at most every `every_s` seconds
    (`probe_s` each, about 3% of the time at the defaults), the last reading returned to every caller in between.
    Every reading is kept (`readings`), so the state the work spent the most time in is dominant_state(readings)."""

    def __init__(self, every_s: float = 1.0, probe_s: float = 0.03):
        self.every_s, self.probe_s = every_s, probe_s
        self.readings: list[float] = []
        self._last = -math.inf

    def __call__(self, fresh: bool = False) -> float:
        """The state now: a new reading when `every_s` has passed since the last one (or `fresh`)."""
        if fresh or time.perf_counter() - self._last >= self.every_s:
            self.readings.append(self._read())
            self._last = time.perf_counter()
        return self.readings[-1]

    def _read(self) -> float:
        if not self.readings:
            sync_probe_us(self.probe_s)  # a fresh process's first parallel kernels read high (threads waking)
        return sync_probe_us(self.probe_s)


PACE_BURST = 3  # calls a pace reading makes (PaceReference.reading)


class PaceReference:
    """The pace network (hardware.synthetic.pace_network), exported as float artifacts are, on its fixed input:
    what every host measurement is paced against.

    A shared VM's speed drifts with its neighbours' load (whole networks run tens of percent slower for a minute
    and back), and the drift is common to every workload: a configuration's ratio to this network, timed in
    alternation, holds far steadier than its latency. Calibration records the network's latency beside every sample and fits the samples
    brought to one pace (the median of its readings: the profile's `provenance.pace_ms`), and a measurement
    timed in alternation with it (measure_paced) can be brought to the profile's pace: its latency were the
    machine as fast as when it was calibrated."""

    def __init__(self):
        from .synthetic import pace_network

        model, shape = pace_network()
        ex = torch.randn(max(2, shape[0]), *shape[1:], generator=torch.Generator().manual_seed(0))
        ep = torch.export.export(model, (ex,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
        self.fn = ep.module()
        self.x = ex[:shape[0]].clone()
        with torch.inference_mode():
            for _ in range(3):
                self.fn(self.x)

    def once(self) -> float:
        """Seconds of one call (inside inference mode, as measurements run)."""
        t0 = time.perf_counter()
        self.fn(self.x)
        return time.perf_counter() - t0

    def reading(self) -> float:
        """One reading of the pace, ms: PACE_BURST calls in a row, the fastest after the first. The first call after
        other work pays for what that work evicted (after vgg11's 500 MB of weights it ran 1.6-3.1x the network's
        usual time, after smaller networks 0.96-1.16x) and the others do not, so a reading means the same after a
        calibration's synthetic networks as after a large model."""
        with collector_paused(), torch.inference_mode():
            calls = [self.once() for _ in range(PACE_BURST)]
        return min(calls[1:]) * 1e3


class PaceClock(StateClock):
    """The pace network's latency while something long is timed, read as StateClock reads the state
    (PaceReference.reading at most every `every_s` seconds, about 3% of the time at the default; the network is
    built at the first reading)."""

    def __init__(self, every_s: float = 0.5):
        super().__init__(every_s)
        self._ref: PaceReference | None = None

    def _read(self) -> float:
        if self._ref is None:
            self._ref = PaceReference()
        return self._ref.reading()


@contextlib.contextmanager
def collector_paused():
    """Python's cyclic garbage collector off inside (timeit's convention for timing), as it was after."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def measure_latency(fn: Callable, example, warmup: int = 3, min_runs: int = 10, max_runs: int = 200,
                    budget_s: float = 2.0, between: Callable[[], float] | None = None) -> dict:
    """Median wall time of fn(example) after warm-up (with p90 and run count), threads and batch fixed.

    The allocator is put in its steady state first (`steady_allocator`), and Python's cyclic garbage collector is
    off while it runs (timeit's convention): in a process that had built 32 models, mobilenet_v2's compiled INT8
    graph at batch 1 measured 2.52-2.65 ms with it on, 2.31-2.38 ms with it off, as alone (2.34-2.37 ms).
    `between`: called after every timed call, outside its time; what it returns is listed under "between"
    (measure_paced reads the pace network there)."""
    allocator = steady_allocator()
    extra: list[float] = []
    xs = as_inputs(example)
    with collector_paused(), torch.inference_mode():
        for _ in range(warmup):
            fn(*xs)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
            t0 = time.perf_counter()
            fn(*xs)
            times.append(time.perf_counter() - t0)
            if between is not None:
                extra.append(between())
    times.sort()
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    out = {"latency_ms": statistics.median(times) * 1e3, "latency_p90_ms": p90 * 1e3, "latency_runs": len(times),
           "threads": torch.get_num_threads(), "batch_size": int(xs[0].shape[0]), "allocator": allocator}
    if between is not None:
        out["between"] = extra
    return out


def measure_paced(fn: Callable, example, reference: PaceReference, warmup: int = 3, min_runs: int = 10,
                  max_runs: int = 200, budget_s: float = 2.0) -> dict[str, float]:
    """measure_latency's figures for fn(example) timed in alternation with the pace network (a call, then a pace
    reading, in turn, so both see the same moments of the machine), plus `pace_ms`: the median of the readings.
    `latency_ms * profile_pace / pace_ms` is the latency at a profile's pace (PaceReference)."""
    got = measure_latency(fn, example, warmup, min_runs, max_runs, budget_s, between=reference.reading)
    readings = got.pop("between")
    return {**got, "pace_ms": statistics.median(readings)}


def at_pace(latency_ms: float, pace_ms: float, profile_pace_ms: float, elasticity: float = 1.0) -> float | None:
    """A latency measured while the pace network ran `pace_ms`, at the pace `profile_pace_ms` (None where either
    was not read): latency x (profile pace / pace) ** elasticity, the elasticity being how much of the pace
    network's drift a network's latency follows (a profile's `provenance.pace_elasticity`, measured by its
    calibration: hardware.calibrate.pace_elasticity). Latencies and paces may be arrays of one shape (None where
    any pace was not read)."""
    if np.any(np.asarray(pace_ms) <= 0) or profile_pace_ms <= 0:
        return None
    return latency_ms * (profile_pace_ms / pace_ms) ** elasticity


INTERLEAVE_ROUND_S = 0.02  # a round this short: the machine's stalls (seconds long) fall on both functions alike
INTERLEAVE_BUDGET_S = 2.0  # seconds per function per measurement


def burst_median(fn: Callable, x, round_s: float, min_calls: int) -> float:
    """Median seconds of fn(x) over a burst of at least `min_calls` calls and about `round_s` seconds (at most
    1000 calls): one round of an alternation."""
    xs = as_inputs(x)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or (time.perf_counter() - start < round_s and len(times) < 1000):
        t0 = time.perf_counter()
        fn(*xs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def describe_rounds(rounds: int | None) -> str:
    """How measure_interleaved alternates, in words, for `rounds` given (or None: its default)."""
    if rounds is None:
        return (f"alternation rounds of {1e3 * INTERLEAVE_ROUND_S:.0f} ms, as many as {INTERLEAVE_BUDGET_S:g} s per "
                "function buys")
    return f"{rounds} alternation rounds"


def measure_interleaved(fns: list[Callable], examples: list, rounds: int | None = None,
                        round_s: float = INTERLEAVE_ROUND_S, budget_s: float = INTERLEAVE_BUDGET_S,
                        min_calls: int = 3, warmup: int = 2, min_rounds: int = 9,
                        max_rounds: int = 60) -> dict[str, list[float]]:
    """Several functions timed in alternation in this process: each round times every function in turn (at least
    `min_calls` calls, about `round_s` seconds, its median), so all of them see the same moments of the machine.
    The first function is the reference: `ratio[i]` is the median over rounds of function i's round median over the
    reference's in that round. The order turns by one place every round (the rounds are a multiple of the
    functions' count), so each function comes first, second, ... equally often: two sessions of one ONNX model
    timed in a fixed order measured 1-6% apart, the later one slower, in a process that had exported and checked
    models before. This VM's speed drifts by tens of percent within minutes and stalls for seconds; a ratio taken
    over many short rounds barely moves with either (a stall spans rounds of both functions alike, and the median
    over rounds drops it), where two absolute times taken minutes apart do. `rounds` defaults to what `budget_s`
    seconds per function buy (at least `min_rounds`, at most `max_rounds`), judged from the warm-up calls; either
    is raised to a multiple of the functions' count. Returns per function `latency_ms` (the median of its round
    medians), `ratio` and `ratio_iqr` (the ratios' interquartile range, their spread), and `rounds`."""
    steady_allocator()
    per: list[list[float]] = [[] for _ in fns]
    with collector_paused(), torch.inference_mode():
        call_s = []
        for fn, x in zip(fns, examples):
            xs = as_inputs(x)
            for _ in range(max(warmup, 1)):
                t0 = time.perf_counter()
                fn(*xs)
                took = time.perf_counter() - t0
            call_s.append(took)
        n = len(fns)
        if rounds is None:
            round_total = sum(max(round_s, min_calls * c) for c in call_s)
            rounds = int(min(max(n * budget_s / max(round_total, 1e-9), min_rounds), max_rounds))
        rounds = -(-rounds // n) * n
        for r in range(rounds):
            for i in [(r + j) % n for j in range(n)]:
                per[i].append(burst_median(fns[i], examples[i], round_s, min_calls))
    ref = np.array(per[0])
    ratios = [np.array(p) / ref for p in per]
    return {"latency_ms": [statistics.median(p) * 1e3 for p in per],
            "ratio": [float(np.median(r)) for r in ratios],
            "ratio_iqr": [float(np.subtract(*np.percentile(r, [75, 25]))) for r in ratios],
            "rounds": rounds}
