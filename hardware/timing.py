"""Per-row wall time of an eager model in context: every operator timed where the model runs it.

The rows are the analysis's rows (estimators.trace): the same module types timed as one row, the same
torch functions timed where no such module encloses them, in the same order. Timing a row inside the
running model sees what a single-operator loop hides: weights and activations that the rest of the
forward pass evicted from the cache, freshly allocated outputs, the dispatch of the calls around it.
Calibration fits the host's latency model to these times on synthetic networks.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from estimators import registry as R
from estimators.modelspec import as_inputs
from estimators.trace import IGNORED_CALLS


class _Timer(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.times: list[float] = []
        self.stack: list[float | None] = []
        self.suppress = 0
        self.quiet: list = []  # the DisableTorchFunction context of the module row being timed

    def pre_hook(self, module: nn.Module, args):
        if R.module_cost_fn(module) is not None:
            if self.suppress == 0:
                # inside a timed module no call is a row of its own: the calls it makes skip this mode, whose
                # Python dispatch per call (tens of microseconds over a norm layer's few calls) the artifact
                # never pays and which would otherwise be timed as the module's own cost
                self.quiet.append(torch._C.DisableTorchFunction())
                self.quiet[-1].__enter__()
                self.stack.append(time.perf_counter())
            else:
                self.stack.append(None)
            self.suppress += 1

    def hook(self, module: nn.Module, args, output):
        if R.module_cost_fn(module) is None:
            return
        t0 = self.stack.pop()
        self.suppress -= 1
        if t0 is not None:
            self.times.append(time.perf_counter() - t0)
            self.quiet.pop().__exit__(None, None, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.suppress or R.function_name(func) in IGNORED_CALLS:
            return func(*args, **kwargs)
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        dt = time.perf_counter() - t0
        if any(isinstance(o, torch.Tensor) for o in tree_flatten(out)[0]):
            self.times.append(dt)
        return out


def row_times(model: nn.Module, example, runs: int = 5, warmup: int = 2) -> list[float]:
    """Median in-context seconds of every analysis row of `model(example)` over `runs` forward passes (`example`:
    a tensor, or the tuple of a model's several inputs, fed positionally)."""
    from .measure import collector_paused, steady_allocator

    steady_allocator()
    with collector_paused(), torch.inference_mode():  # as measure_latency times
        per_run = [_timed_pass(model, example) for _ in range(warmup + runs)][warmup:]
    return _row_medians(per_run)


def _timed_pass(model: nn.Module, example) -> list[float]:
    """One forward pass of `model` with every analysis row timed (the hooks in place for this pass only)."""
    timer = _Timer()
    h1 = torch.nn.modules.module.register_module_forward_pre_hook(timer.pre_hook)
    h2 = torch.nn.modules.module.register_module_forward_hook(timer.hook)
    try:
        with timer:
            model(*as_inputs(example))
    finally:
        h1.remove()
        h2.remove()
        while timer.quiet:  # a module that raised leaves its context entered
            timer.quiet.pop().__exit__(None, None, None)
    return timer.times


def _row_medians(per_pass: list[list[float]]) -> list[float]:
    """Each row's median over passes (an error where passes ran different numbers of operators)."""
    n = len(per_pass[0])
    if any(len(r) != n for r in per_pass):
        raise RuntimeError("the model ran a different number of operators from one call to the next")
    return [statistics.median(r[i] for r in per_pass) for i in range(n)]


def row_shares(model: nn.Module, example, artifact, rounds: int = 15, round_s: float = 0.02,
               min_calls: int = 3) -> list[float]:
    """Every row's time as a share of the artifact's, both timed in alternation: each round times `artifact` (the
    median of a burst of about `round_s` seconds, hardware.measure.burst_median) and then one forward pass of
    `model` with the rows timed (after one untimed pass, so the eager weights are as warm as the artifact's were).
    A share is the median over rounds of the row's time over the artifact's in the same round, so the rows and
    the total they are brought to see the same moments of this drifting machine."""
    from .measure import burst_median, collector_paused, steady_allocator

    steady_allocator()
    per_round: list[list[float]] = []
    xs = as_inputs(example)
    with collector_paused(), torch.inference_mode():
        for _ in range(2):
            artifact(*xs)
            model(*xs)
        for _ in range(rounds):
            total = burst_median(artifact, example, round_s, min_calls)
            model(*xs)
            per_round.append([t / total for t in _timed_pass(model, example)])
    return _row_medians(per_round)
