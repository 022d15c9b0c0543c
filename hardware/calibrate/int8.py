"""Calibration's INT8 part. INT8 runs compiled (inductor with freezing), where operators cannot be timed one by one
inside the graph, so four kinds of sample are taken:

- the oneDNN INT8 convolution and linear kernels the compiled graph calls, timed directly (prepacked weights,
  uint8 channels-last activations, the following activation fused as a post-op; a SiLU timed with and without,
  for its cost per element): hundreds of kernels, no compile;
- quantized max pooling, timed the same way (its channels beyond a multiple of QPOOL_LANES run a scalar tail);
- small compiled chains of convolutions (WrapperChains), timed in alternation with one of their kernels alone:
  what a graph adds per call, per kernel (the Python wrapper's call) and per generated loop;
- whole quantized synthetic networks, compiled and profiled (torch.profiler with inductor's kernel profile), each
  call split into oneDNN kernels, quantized pooling, generated loops and the rest (Python wrapper, guards).

Building a compiled INT8 program is the executor's job (tasks.quantize_exec); the caller passes it in
(`Int8Builder`), so that this layer does not reach up into tasks.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from estimators.progress import status, step
from estimators.registry import Q_INDEX
from estimators.table import LayerTable, evaluate

from ..measure import measure_latency
from .sampling import BATCHES, NetSample, Progress, State, light_table, typical

# a float module and an example batch -> the compiled INT8 program as a function of its float input
Int8Builder = Callable[[nn.Module, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]

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


def int8_samples(budget_s: float, progress: Progress, build: Int8Builder, batches: tuple[int, ...] = BATCHES,
                 seed0: int = 100_000, state: State = lambda: 0.0, min_nets: int = 0,
                 between: Callable[[], object] = lambda: None) -> list[Int8Sample]:
    """Quantize (Intel Neural Compressor static INT8), compile and time whole synthetic networks, and profile
    where each call goes (oneDNN kernels, quantized max pooling, generated loops; the rest is the Python
    wrapper and guards). The graphs compile with inductor's kernel profile, so the generated loops show.
    A graph compiles for one batch size (as deployed): each network is compiled and timed at one batch, the
    batches taken in turn, since compiling dominates (4-25 s a network here) and more networks at one batch
    each fit the graph's costs better than half as many at every batch. `build` makes the compiled program.
    At least `min_nets` are timed whatever the budget: the graph's costs around the kernels are fitted on them, and
    one or two networks fit none of those costs (a full calibration on a 2-vCPU AMD EPYC with AVX-512 compiled one
    network in its budget, and its profile predicted compiled INT8 torchvision networks at 0.3-0.65x their time).
    `between` runs after each network (WrapperChains: timed again)."""
    import torch._inductor.config as inductor_config

    from estimators.methods.quantize import estimate as estimate_quantize
    from estimators.strategy import QuantizeStep

    from ..synthetic import synthetic_cnn

    out: list[Int8Sample] = []
    t0 = time.perf_counter()
    seed, spent = seed0, []  # seconds each network took (quantize, compile, time): the next one's expected cost
    with step(progress, "int8 networks", budget_s, "s") as counted, \
            inductor_config.patch({"cpp.enable_kernel_profile": True}):  # graphs compile at their first call
        # the first network also pays the compiler's one-off start-up (it took 14-34 s here, later ones 10-15 s):
        # the next one's cost is predicted from those after it
        while len(out) < min_nets or time.perf_counter() - t0 + typical(spent[1:] or spent) < budget_s:
            model, shape = synthetic_cnn(seed)
            seed += 1
            with torch.inference_mode():
                t1 = time.perf_counter()
                model(torch.randn(max(batches), *shape[1:]))
                if time.perf_counter() - t1 > 0.15:  # compiled int8 networks cost compile time: keep them small
                    continue
            t1 = time.perf_counter()
            fn = build(model, torch.randn(2, *shape[1:]))
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
            between()
            spent.append(time.perf_counter() - t1)
            counted.update(time.perf_counter() - t0, f"{len(out)} compiled and timed; {out[-1].label}: "
                           f"{out[-1].total_seconds * 1e3:.2f} ms, oneDNN kernels {out[-1].kernel_seconds * 1e3:.2f}, "
                           f"generated loops {out[-1].loop_seconds * 1e3:.2f}")
        counted.finish(f"{len(out)} synthetic networks quantized, compiled and timed", done=time.perf_counter() - t0)
    return out


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


def _within_budget(budget_s: float, min_ops: int, seed0: int,
                   items: Callable[[nn.Module, tuple[int, ...]], Iterable]) -> Iterator:
    """The `items` of synthetic networks (seeded from `seed0` on) to time, one at a time with their count so far: at
    least `min_ops`, then none started that would end past `budget_s` (the median of those so far predicts the
    next). Each takes the time between its yield and the next request."""
    from ..synthetic import synthetic_cnn

    t0 = time.perf_counter()
    seed, n = seed0, 0
    took: list[float] = []
    while n < min_ops or time.perf_counter() - t0 + typical(took) < budget_s:
        model, shape = synthetic_cnn(seed)
        seed += 1
        for item in items(model, shape):
            if n >= min_ops and time.perf_counter() - t0 + typical(took) > budget_s:
                break
            t_op = time.perf_counter()
            yield n, item
            n += 1
            took.append(time.perf_counter() - t_op)


def int8_op_samples(budget_s: float, progress: Progress, batches: tuple[int, ...] = BATCHES, seed0: int = 200_000,
                    min_ops: int = 24, state: State = lambda: 0.0
                    ) -> tuple[dict[int, list[NetSample]], list[ElementSample]]:
    """Time the oneDNN INT8 convolution and linear kernels that compiled INT8 graphs call, one per sample,
    for the convolutions and linears of synthetic networks (no compile, so hundreds fit in the budget),
    at every batch size, with the activation that follows each fused as the graph fuses it. Each sample
    is a one-row table (the INT8 estimate of that layer) timed without the activation's cost: a
    transcendental activation (SiLU) is timed both ways, and what it adds per element is an ElementSample."""
    from estimators.methods.quantize import estimate as estimate_quantize
    from estimators.strategy import QuantizeStep

    out: dict[int, list[NetSample]] = {b: [] for b in batches}
    elements: list[ElementSample] = []
    t0 = time.perf_counter()
    n = 0
    counted = step(progress, "int8 kernels", budget_s, "s")
    layers = lambda model, shape: _post_ops(model, torch.randn(1, *shape[1:]))  # noqa: E731
    for i, (m, in_shape, act) in _within_budget(budget_s, min_ops, seed0, layers):
        table = estimate_quantize(light_table(nn.Sequential(m), torch.randn(in_shape), name=f"int8-op-{i}"),
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
        n = i + 1
        counted.update(time.perf_counter() - t0, f"{n} kernels timed")
    counted.finish(f"{n} INT8 convolution/linear kernels timed at batch {', '.join(map(str, batches))} "
                   f"({len(elements)} with and without a fused SiLU)", done=time.perf_counter() - t0)
    return out, elements


@dataclass
class GroupSample:
    """One INT8 grouped convolution kernel timed alone: its channels per group, groups, FLOPs and seconds."""

    per_group: int
    groups: int
    flops: float
    seconds: float


# channels per group timed for the INT8 grouped-convolution rule: the largest is the reference; multiples of 2, 4, 8
# and 16 are told apart by them. Four channels per group are not timed: a fast kernel of so few FLOPs is mostly
# overhead and a slow one of so few is not far above it
GROUP_PROBE = (16, 15, 14, 12, 10, 8, 6)
GROUP_PROBE_SHAPE = (4, 32)  # groups, spatial size (3x3, stride 1, batch 1)
GROUP_SLOW = 3.0  # a kernel this many times slower than the reference (which has the most FLOPs) is on a slow path


def int8_group_samples(progress: Progress) -> list[GroupSample]:
    """Time oneDNN's INT8 grouped convolution at the channels per group of GROUP_PROBE (a second or two): on this
    AMD EPYC (AVX2) a grouped convolution whose channels per group are not multiples of 4 ran 0.75-0.9 ns per FLOP,
    30-80x its fast kernel, so that pruning a RegNet to 11 channels per group made its INT8 program 2x slower than the
    unpruned one. Which multiple, and how slow, is read here on each machine (group_rule)."""
    g, hw = GROUP_PROBE_SHAPE
    out = []
    with status(progress, "timing INT8 grouped convolutions by channels per group"):
        for pg in GROUP_PROBE:
            c = pg * g
            m = nn.Conv2d(c, c, 3, padding=1, groups=g)
            shape = (1, c, hw, hw)
            x = torch.randint(0, 255, shape, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                fn = _int8_kernel(m, shape, "relu", [None])
                sec = measure_latency(fn, x, warmup=2, min_runs=5, max_runs=30, budget_s=0.1)["latency_ms"] / 1e3
            out.append(GroupSample(pg, g, 2.0 * c * pg * 9 * hw * hw, sec))
    return out


def group_rule(samples: list[GroupSample]) -> tuple[int | None, float]:
    """(the channel multiple per group INT8 grouped convolutions need for their fast kernel, the slow kernel's
    seconds per FLOP) from int8_group_samples: a kernel is slow where it took GROUP_SLOW x the reference's time
    (which has the most FLOPs); the multiple is the smallest of 2, 4, 8, 16 whose every timed multiple was fast.
    (None, 0) where none was slow or the samples fit no such rule."""
    if not samples:
        return None, 0.0
    ref = max(samples, key=lambda x: x.flops)
    slow = {x.per_group for x in samples if x.seconds > GROUP_SLOW * ref.seconds}
    if not slow:
        return None, 0.0
    for m in (2, 4, 8, 16):
        if all(x.per_group not in slow for x in samples if x.per_group % m == 0):
            if not all(x.per_group in slow for x in samples if x.per_group % m != 0):
                return None, 0.0  # some counts off the multiple were fast: no rule by multiples
            return m, float(np.median([x.seconds / x.flops for x in samples if x.per_group in slow]))
    return None, 0.0


def int8_group_graph_ns(build: Int8Builder, multiple: int, progress: Progress = lambda m: None) -> float:
    """Nanoseconds per FLOP of INT8 grouped convolutions off `multiple` channels per group inside a compiled INT8
    graph: three 3x3 grouped convolutions (with BatchNorm and ReLU; 4 groups, 16x16, batch 1) at one channel per
    group short of 4 x `multiple`, compiled by `build` and timed in alternation with their twin on 4 x `multiple`
    (whose time, scaled by FLOPs, is taken off: the call and the fast kernels' share): the price as the graph pays it,
    its own quantize and requantize steps around the kernel included."""
    from ..measure import measure_interleaved

    g, hw = 4, 16
    fns, xs, flops = [], [], []
    with status(progress, "timing INT8 grouped convolutions off their channel multiple in a compiled graph"):
        for pg in (4 * multiple, 4 * multiple - 1):
            c = g * pg
            model = nn.Sequential(*[m for _ in range(3) for m in (
                nn.Conv2d(c, c, 3, padding=1, groups=g, bias=False), nn.BatchNorm2d(c), nn.ReLU())]).eval()
            fns.append(build(model, torch.randn(2, c, hw, hw)))
            xs.append(torch.randn(1, c, hw, hw))
            flops.append(3 * 2.0 * c * pg * 9 * hw * hw)
        got = measure_interleaved(fns, xs, budget_s=0.5, min_rounds=6)
    fast, slow = (t / 1e3 for t in got["latency_ms"])
    return max(slow - fast * flops[1] / flops[0], 0.0) / flops[1] * 1e9


@dataclass
class WrapperSample:
    """Compiled INT8 chains of small convolutions timed in alternation with one of their kernels alone (seconds):
    what a compiled graph adds to its kernels per call and per operator (fit.wrapper_costs)."""

    short_ops: int  # convolutions (each with a fused ReLU) in the short chain
    long_ops: int  # in the long chains
    short_s: float
    long_s: float
    gated_s: float  # the long chain with a sigmoid after each convolution instead (a generated loop each)
    alone_s: float  # one of the chain's convolution kernels alone (int8_op_samples' kind of timing)
    table: LayerTable | None = None  # that convolution's INT8 estimate: the kernel fit's prediction for it


WRAPPER_CHAIN = (2, 10)  # convolutions in the short and long chains: the long ones take 8-12 s each to compile here
WRAPPER_SHAPE = (16, 8)  # channels, spatial size (1x1 convolutions, batch 1): the kernels are mostly their overhead


class WrapperChains:
    """What a compiled INT8 graph adds around its oneDNN kernels, timed directly: a short and a long chain of 1x1
    convolutions with fused ReLUs, and the long chain with a sigmoid after each convolution instead (inductor runs
    it in a generated loop), compiled by `build` once and timed, at each call of this object, in alternation with one
    of the convolutions' kernels alone (a WrapperSample appended to `samples`). The long chain's extra time per
    convolution, less the kernel alone, is the wrapper's price per operator; the gated chain's extra time per
    sigmoid is a generated loop's whole price (fit.wrapper_costs). Fitting these from whole networks' totals less
    their profiled kernels (a residual of 20-45% of a total, at times negative) put 10 to 34 us on every operator
    from one calibration to the next on a 2-vCPU AMD EPYC, where these chains measured 10-16 us in a quiet spell.
    In a slow one they measured 27, and their ratio to the kernel alone moved 2x: a calibration times them again
    between its compiled networks (about a second each time), and the fit takes the median."""

    def __init__(self, build: Int8Builder, progress: Progress = lambda m: None):
        from estimators.methods.quantize import estimate as estimate_quantize
        from estimators.strategy import QuantizeStep

        c, hw = WRAPPER_SHAPE
        short, long = WRAPPER_CHAIN

        def chain(n: int, act: type) -> nn.Module:
            return nn.Sequential(*[m for _ in range(n) for m in (nn.Conv2d(c, c, 1), act())]).eval()

        self.samples: list[WrapperSample] = []
        with status(progress, "compiling three small INT8 graphs (what a graph adds per call and per operator)"):
            self.fns = [build(chain(short, nn.ReLU), torch.randn(2, c, hw, hw)),
                        build(chain(long, nn.ReLU), torch.randn(2, c, hw, hw)),
                        build(chain(long, nn.Sigmoid), torch.randn(2, c, hw, hw))]
            x = torch.randn(1, c, hw, hw)
            xu = torch.randint(0, 255, (1, c, hw, hw), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
            conv = nn.Conv2d(c, c, 1)
            with torch.inference_mode():
                self.fns.append(_int8_kernel(conv, (1, c, hw, hw), "relu", [None]))
                for fn in self.fns[:3]:  # the graphs compile at their first call
                    fn(x)
            self.inputs = [x, x, x, xu]
            self.table = estimate_quantize(light_table(nn.Sequential(conv), torch.randn(1, c, hw, hw),
                                                       name="int8-chain-kernel"), QuantizeStep(dtype="int8"))

    def __call__(self) -> WrapperSample:
        from ..measure import measure_interleaved

        got = measure_interleaved(self.fns, self.inputs, budget_s=0.25, min_rounds=8)
        t = [v / 1e3 for v in got["latency_ms"]]
        self.samples.append(WrapperSample(*WRAPPER_CHAIN, t[0], t[1], t[2], t[3], self.table))
        return self.samples[-1]


QPOOL_LANES = 32  # quantized max pooling vectorises 32 uint8 channels at a time; the rest run in a scalar tail


def int8_pool_samples(budget_s: float, progress: Progress, batches: tuple[int, ...] = BATCHES, seed0: int = 300_000,
                      min_ops: int = 12, state: State = lambda: 0.0) -> list[NetSample]:
    """Time the quantized max pooling compiled INT8 graphs call (`quantized::max_pool2d` on channels-last
    uint8) for the max pools of synthetic networks, each at its own channel count and at a random one (its
    speed depends on the channels beyond a multiple of QPOOL_LANES: 24 channels run 17x slower per element
    than 32 here), at every batch size."""
    import random
    import warnings

    from estimators.methods.quantize import estimate as estimate_quantize
    from estimators.strategy import QuantizeStep

    out: list[NetSample] = []
    rng = random.Random(seed0)
    t0 = time.perf_counter()
    n = 0
    counted = step(progress, "int8 pools", budget_s, "s")

    def pools(model: nn.Module, shape: tuple[int, ...]):
        for m, in_shape in _layer_inputs(model, torch.randn(1, *shape[1:]), lambda m: isinstance(m, nn.MaxPool2d)):
            for c in (in_shape[1], rng.randint(8, 160)):
                yield m, (1, c) + in_shape[2:]

    for i, (m, cshape) in _within_budget(budget_s, min_ops, seed0, pools):
        k, st, pad, dil = (list(v) if isinstance(v, (tuple, list)) else [v, v]
                           for v in (m.kernel_size, m.stride, m.padding, m.dilation))
        table = estimate_quantize(light_table(nn.Sequential(m), torch.randn(cshape), name=f"int8-pool-{i}"),
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
        n = i + 1
        counted.update(time.perf_counter() - t0, f"{n} pools timed")
    counted.finish(f"{n} quantized max pools timed at batch {', '.join(map(str, batches))}",
                   done=time.perf_counter() - t0)
    return out
