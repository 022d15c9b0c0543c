"""Float grouped convolutions by channels per group, timed alone (about 3 seconds of a calibration).

Eager PyTorch runs a float grouped convolution on oneDNN, whose kernel vectorizes within a group: below a few dozen
channels per group an output costs about the same whatever the channels per group, and more where they are off the
kernel's block. On a 2-vCPU AMD EPYC (AVX-512) an output element and kernel tap took 0.11-0.23 ns at 8 and 16
channels per group and 0.55-0.79 ns at 9-15, beyond a fixed 40-75 us per call; pruning a RegNet's 16 channels per
group to 11 halved its grouped convolutions' FLOPs and slowed them, and its pruned float candidates at batch 8
measured about as slow as the original. Every count is timed at two spatial sizes per batch; the slope between them
is the time per output element and tap (group_tap_table), which the profile keeps per calibrated batch
(Efficiency.group_tap_ns): the latency model adds it to a float grouped convolution's split-model price
(hardware.latency.GroupTaps), and the split model is fitted on the rest of those rows' time (calibrate.profile).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from estimators.progress import status

from .sampling import BATCHES, Progress

FLOAT_GROUP_PROBE = tuple(range(2, 49))  # channels per group timed (1 is a depthwise convolution, its own class)
FLOAT_GROUPS = 4  # groups of the timed convolutions (3x3, stride 1, padding 1)
# per batch, the two spatial sizes every count is timed at: the slope between them is the time per output element and
# tap, free of the call's fixed cost (40-75 us for a grouped convolution here, which the split model's overhead has)
FLOAT_GROUP_SPATIAL = {1: (14, 28), 8: (7, 14)}
FLOAT_GROUP_ROUNDS = 3  # every count timed once per round, round after round; its fastest round is kept
FLOAT_GROUP_RUNS = 5  # timed calls per count and round (their median), after one warm-up call
TAPS = 9  # kernel taps of the timed convolutions (3x3)


@dataclass
class FloatGroupSample:
    """One float grouped convolution timed alone (eager, as the exported float model runs it)."""

    batch: int
    per_group: int  # input (= output) channels per group
    groups: int
    spatial: int
    seconds: float

    @property
    def out_taps(self) -> float:
        """Output elements times kernel taps: what a grouped convolution's time follows beyond its fixed cost."""
        return float(self.batch * self.groups * self.per_group * self.spatial * self.spatial * TAPS)


def float_group_samples(progress: Progress, batches: tuple[int, ...] = BATCHES,
                        counts: tuple[int, ...] = FLOAT_GROUP_PROBE) -> list[FloatGroupSample]:
    """Time float grouped convolutions at every channel count per group of `counts`, every batch of `batches` and
    its two FLOAT_GROUP_SPATIAL sizes, all of them once per round for FLOAT_GROUP_ROUNDS rounds (so that the
    machine's drift touches every count alike), keeping each one's fastest round (about 3 s)."""
    g = FLOAT_GROUPS
    shapes = [(b, hw, pg) for b in batches for hw in FLOAT_GROUP_SPATIAL.get(b, FLOAT_GROUP_SPATIAL[8])
              for pg in counts]
    best: dict[tuple[int, int, int], float] = {}
    torch.manual_seed(0)
    with status(progress, "timing float grouped convolutions by channels per group"), torch.inference_mode():
        convs = {pg: nn.Conv2d(pg * g, pg * g, 3, padding=1, groups=g, bias=False).eval() for pg in counts}
        inputs = {(b, hw, pg): torch.randn(b, pg * g, hw, hw) for b, hw, pg in shapes}
        for _ in range(FLOAT_GROUP_ROUNDS):
            for key in shapes:
                m, x = convs[key[2]], inputs[key]
                m(x)
                ts = []
                for _ in range(FLOAT_GROUP_RUNS):
                    t0 = time.perf_counter()
                    m(x)
                    ts.append(time.perf_counter() - t0)
                s = float(np.median(ts))
                best[key] = min(best.get(key, s), s)
    return [FloatGroupSample(b, pg, g, hw, s) for (b, hw, pg), s in sorted(best.items())]


def group_tap_table(samples: list[FloatGroupSample], batch: int) -> dict[int, float]:
    """Nanoseconds per output element and kernel tap, by channels per group, at `batch`: the slope between the two
    spatial sizes a count was timed at (never negative; the median where several calibrations timed it); empty
    where no count was timed at two sizes at that batch."""
    per: dict[tuple[int, int], list[FloatGroupSample]] = {}
    for x in samples:
        if x.batch == batch and x.seconds > 0:
            per.setdefault((x.per_group, x.spatial), []).append(x)
    slopes: dict[int, list[float]] = {}
    for pg in sorted({k[0] for k in per}):
        sizes = sorted(hw for c, hw in per if c == pg)
        if len(sizes) < 2:
            continue
        lo, hi = per[(pg, sizes[0])], per[(pg, sizes[-1])]
        for a, b in zip(lo, hi):  # one pair per calibration
            slopes.setdefault(pg, []).append(max((b.seconds - a.seconds) / (b.out_taps - a.out_taps), 0.0) * 1e9)
    return {pg: round(float(np.median(v)), 5) for pg, v in slopes.items()}
