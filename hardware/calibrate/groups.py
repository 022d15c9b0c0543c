"""Float grouped convolutions by channels per group, timed alone (about 3 seconds of a calibration).

Eager PyTorch runs a float grouped convolution on oneDNN, whose kernel vectorizes within a group: below a few dozen
channels per group an output costs about the same whatever the channels per group, and more where they are off the
kernel's block. On a 2-vCPU AMD EPYC (AVX-512) an output element and kernel tap took 0.08 ns at 8 and 16 channels
per group and 0.2-0.23 ns at 11; pruning a RegNet's 16 channels per group to 11 halved its grouped convolutions'
FLOPs and slowed them, and its pruned float candidates at batch 8 measured about as slow as the original.

A call's time is priced in three parts, each timed per channel count, per calibrated batch:
- per output element and tap (group_tap_table, Efficiency.group_tap_ns): the slope between two FLOAT_GROUP_SPATIAL
  sizes with FLOAT_GROUPS groups, free of the call's fixed cost;
- per image and group (group_call_tables, Efficiency.group_call_ns): off the kernel's block a call pays a fixed time
  per image and group. At batch 8 with 2x2 outputs and 11 channels per group, 48 groups took 235 us where 4 took
  46 us (0.5 us per image and group, 0.05 us at 8 channels per group), so that a pruned RegNet's last stage (25
  groups, 2x2 outputs) nearly doubled while its taps priced +10%. It is the call with FLOAT_WIDE_GROUPS groups less
  the one with FLOAT_GROUPS groups, both at FLOAT_GROUP_SMALL, less their taps, per image and group added;
- per call (group_call_tables, Efficiency.group_fixed_us): the narrow call at FLOAT_GROUP_SMALL less its taps and
  its images x groups. The kernel's block costs a fixed time of its own: at batch 1, 11 channels per group took
  33 us a call where 16 took 49, so that the pruned RegNet's grouped convolutions got faster at batch 1.
The latency model adds the three to a float grouped convolution's split-model price (hardware.latency.GroupTaps),
and the split model is fitted on the rest of those rows' time, its call and activations' traffic (calibrate.profile).
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
FLOAT_WIDE_GROUPS = 32  # groups of the call that times the cost per image and group
# per batch, the two spatial sizes every count is timed at: the slope between them is the time per output element and
# tap, free of the call's fixed cost (40-75 us for a grouped convolution here)
FLOAT_GROUP_SPATIAL = {1: (14, 28), 8: (7, 14)}
# the spatial size of the calls that time the cost per image and group and per call: small, as in the late stages
# where a network's grouped convolutions have many groups and few outputs. Timed at 4x4, the parts priced a pruned
# RegNet's last stage (25 groups, 2x2 outputs) +45 us a convolution at batch 8, where those convolutions timed alone
# differed by +71 us and in the network by +74 us; timed at 2x2 they price +73 us
FLOAT_GROUP_SMALL = 2
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
    """Time float grouped convolutions at every channel count per group of `counts` and every batch of
    `batches`: with FLOAT_GROUPS groups at the batch's two FLOAT_GROUP_SPATIAL sizes and at FLOAT_GROUP_SMALL, and
    with FLOAT_WIDE_GROUPS groups at FLOAT_GROUP_SMALL; all of them once per round for FLOAT_GROUP_ROUNDS rounds (so
    that the machine's drift touches every count alike), keeping each one's fastest round (about 3 s)."""
    shapes = []
    for b in batches:
        lo, hi = FLOAT_GROUP_SPATIAL.get(b, FLOAT_GROUP_SPATIAL[8])
        calls = ((lo, FLOAT_GROUPS), (hi, FLOAT_GROUPS), (FLOAT_GROUP_SMALL, FLOAT_GROUPS),
                 (FLOAT_GROUP_SMALL, FLOAT_WIDE_GROUPS))
        shapes += [(b, hw, pg, g) for pg in counts for hw, g in calls]
    best: dict[tuple[int, int, int, int], float] = {}
    torch.manual_seed(0)
    with status(progress, "timing float grouped convolutions by channels per group"), torch.inference_mode():
        convs = {(pg, g): nn.Conv2d(pg * g, pg * g, 3, padding=1, groups=g, bias=False).eval()
                 for pg in counts for g in (FLOAT_GROUPS, FLOAT_WIDE_GROUPS)}
        inputs = {(b, hw, pg, g): torch.randn(b, pg * g, hw, hw) for b, hw, pg, g in shapes}
        for _ in range(FLOAT_GROUP_ROUNDS):
            for key in shapes:
                m, x = convs[key[2], key[3]], inputs[key]
                m(x)
                ts = []
                for _ in range(FLOAT_GROUP_RUNS):
                    t0 = time.perf_counter()
                    m(x)
                    ts.append(time.perf_counter() - t0)
                s = float(np.median(ts))
                best[key] = min(best.get(key, s), s)
    return [FloatGroupSample(b, pg, g, hw, s) for (b, hw, pg, g), s in sorted(best.items())]


def group_tap_table(samples: list[FloatGroupSample], batch: int) -> dict[int, float]:
    """Nanoseconds per output element and kernel tap, by channels per group, at `batch`: the slope between the two
    spatial sizes other than FLOAT_GROUP_SMALL a count was timed at with FLOAT_GROUPS groups (never negative; the
    median where several calibrations timed it); empty where no count was timed at two sizes at that batch."""
    per: dict[tuple[int, int], list[FloatGroupSample]] = {}
    for x in samples:
        if x.batch == batch and x.seconds > 0 and x.groups == FLOAT_GROUPS and x.spatial != FLOAT_GROUP_SMALL:
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


def group_call_tables(samples: list[FloatGroupSample], batch: int, taps: dict[int, float]
                      ) -> tuple[dict[int, float], dict[int, float]]:
    """(nanoseconds per image and group, microseconds per call), by channels per group, at `batch`, given `taps`
    (group_tap_table's at that batch). Per image and group: a count's call with FLOAT_WIDE_GROUPS groups less its
    call with FLOAT_GROUPS groups, both at FLOAT_GROUP_SMALL, less the difference of their output elements x taps at
    the tap table's time, over the images x groups added. Per call: the narrow call less its output elements x taps
    and its images x groups at that time per image and group. Neither is ever negative; each is the median where
    several calibrations timed the count; both are empty where no count was timed with both group counts."""
    calls: dict[tuple[int, int], list[FloatGroupSample]] = {}
    for x in samples:
        if x.batch == batch and x.seconds > 0 and x.spatial == FLOAT_GROUP_SMALL:
            calls.setdefault((x.per_group, x.groups), []).append(x)
    per: dict[int, list[tuple[float, float]]] = {}
    for (pg, g), wide in calls.items():
        narrow = calls.get((pg, FLOAT_GROUPS))
        if g != FLOAT_WIDE_GROUPS or not narrow or pg not in taps:
            continue
        tap_s = taps[pg] * 1e-9
        for a, b in zip(narrow, wide):  # one pair per calibration
            each = max((b.seconds - a.seconds - tap_s * (b.out_taps - a.out_taps)) / (batch * (b.groups - a.groups)),
                       0.0)
            fixed = max(a.seconds - tap_s * a.out_taps - each * batch * a.groups, 0.0)
            per.setdefault(pg, []).append((each * 1e9, fixed * 1e6))
    each_ns = {pg: round(float(np.median([e for e, _ in v])), 3) for pg, v in sorted(per.items())}
    fixed_us = {pg: round(float(np.median([f for _, f in v])), 3) for pg, v in sorted(per.items())}
    return each_ns, fixed_us
