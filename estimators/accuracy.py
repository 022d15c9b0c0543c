"""The accuracy-drop estimator: `pred.accuracy_drop` for any candidate before anything is executed.

1. Sensitivity (no training, once per model and data): on a validation subset, every prunable group has
   its least important channels (torch-pruning's own importance order, the channels the pruner would
   remove first) silenced at a few ratios, and the accuracy lost is recorded; likewise the whole model and
   each conv/linear layer alone with INT8 fake-quantized weights (per channel) and outputs (per tensor),
   so that layers kept in float are credited.
2. Damage of a candidate: each group's pruning ratio comes from the estimated table (uniform, global,
   per-layer and distillation widths alike); the group's curve is interpolated at it and the groups are
   summed, plus the quantization drop when the strategy quantizes (without training the prediction is
   the damage capped at what is left above chance).
3. Recovery: training (fine-tuning after pruning, distilling a student) wins most of the raw drop back.
   The share that remains is a per-method factor with a prior, updated from measured results
   (`RecoveryModel.observe`): the executed candidates' truths replace the guess as they come in.

Without data, `proxy_score` ranks candidates by the share of torch-pruning importance they remove (a
data-free proxy, flagged as such, not in accuracy points).
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .data import accuracy
from .progress import step
from .strategy import Strategy
from .table import LayerTable

Progress = Callable[[str], None]
RATIOS = (0.25, 0.5, 0.75)
MAX_SAMPLES = 512
# share of the raw drop left after training, before any truth is observed (per method that trains last), at
# one epoch, falling as epochs^-PRIOR_DECAY. Fitted (d0 = 0, measured gains as 0) on the digits demo nets'
# pruning and distillation candidates of bench/accuracy.py, 2 seeds: c = 0.102 at 1 epoch, 0.0048 at 5,
# 0.0021 at 10 (and ~0.02 at 3, the previous constant prior).
PRIOR = {"prune": 0.1, "distill": 0.1}
PRIOR_DECAY = 1.7
PRIOR_WEIGHT = 25.0  # how many squared points of evidence the prior is worth
_CACHE: dict[str, "Sensitivity"] = {}


@dataclass
class Sensitivity:
    model: str
    data: str
    base_accuracy: float
    samples: int
    ratios: list[float]
    groups: list[int]  # dependency-graph group indices (LayerTable.state.kept's index)
    drops: list[list[float]]  # per group, accuracy points lost at each ratio
    quant_drop: float
    chance: float
    seconds: float
    quant_layers: dict[str, float] = field(default_factory=dict)  # points lost with only that layer int8

    def curve(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return np.array([0.0, *self.ratios, 1.0]), np.array([0.0, *self.drops[i], self.base_accuracy - self.chance])


def _subset(data, max_samples: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out, n = [], 0
    for x, y in data.val:
        out.append((x, y))
        n += len(y)
        if n >= max_samples:
            break
    return out


def _mask_hooks(model: nn.Module, group, ratio: float) -> list:
    """Silence the `ratio` least important channels of a group on every module that outputs them."""
    channels = group.channels
    n_cut = channels - int(channels * (1.0 - ratio))  # torch-pruning's uniform arithmetic
    if n_cut <= 0 or group.order is None:
        return []
    cut = torch.as_tensor(group.order[:n_cut], dtype=torch.long)
    mods = dict(model.named_modules())
    hooks = []
    for name, count in group.out_deps:
        m = mods.get(name)
        if m is None or count != channels:
            continue

        def hook(mod, args, out, cut=cut):
            out = out.clone()
            if out.dim() >= 2:
                if isinstance(mod, nn.Linear):
                    out[..., cut] = 0
                else:
                    out[:, cut] = 0
            return out

        hooks.append(m.register_forward_hook(hook))
    return hooks


def _fake_quant(model: nn.Module, batches, only: set[str] | None = None) -> nn.Module:
    """INT8 fake quantization: weights per output channel (symmetric), conv/linear outputs per tensor with
    the range observed on the subset; every conv/linear layer, or those named in `only`."""
    q = copy.deepcopy(model).eval()
    layers = [m for n, m in q.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and (only is None or n in only)]
    with torch.no_grad():
        for m in layers:
            w = m.weight
            scale = w.abs().flatten(1).amax(1).clamp_min(1e-8) / 127.0
            shape = (-1,) + (1,) * (w.dim() - 1)
            m.weight.copy_(torch.round(w / scale.view(shape)).clamp(-127, 127) * scale.view(shape))
    ranges: dict[int, float] = {}
    hooks = [m.register_forward_hook(lambda mod, a, out: ranges.__setitem__(id(mod), max(ranges.get(id(mod), 0.0),
                                                                                         float(out.abs().max()))))
             for m in layers]
    accuracy(q, batches[:2])
    for h in hooks:
        h.remove()
    for m in layers:
        s = max(ranges.get(id(m), 1.0), 1e-8) / 127.0
        m.register_forward_hook(lambda mod, a, out, s=s: torch.round(out / s).clamp(-128, 127) * s)
    return q


def sensitivity(loaded, table: LayerTable, data, ratios=RATIOS, max_samples: int = MAX_SAMPLES,
                progress: Progress = lambda m: None) -> Sensitivity:
    """Accuracy lost per prunable group at `ratios` and under INT8 fake quantization (cached per model
    weights and data)."""
    key = f"{loaded.cache_key}|{data.spec}|{tuple(ratios)}|{max_samples}"
    if key in _CACHE:
        return _CACHE[key]
    t0 = time.perf_counter()
    model = loaded.model.eval()
    batches = _subset(data, max_samples)
    base = accuracy(model, batches)
    groups, drops = [], []
    layers = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    # one pass per group (every ratio), one with every layer in INT8, one per layer in INT8 alone
    with step(progress, "sensitivity", len(table.plan.groups) + 1 + len(layers), "passes") as counted:
        for gi, g in enumerate(table.plan.groups):
            row = []
            for r in ratios:
                hooks = _mask_hooks(model, g, r)
                try:
                    row.append(max(0.0, base - accuracy(model, batches)) if hooks else 0.0)
                finally:
                    for h in hooks:
                        h.remove()
            groups.append(g.index)
            drops.append(row)
            counted.update(gi + 1, f"{g.root} loses " + ", ".join(f"{d:.1f}" for d in row)
                           + f" points at {', '.join(f'{r:g}' for r in ratios)}")
        quant = max(0.0, base - accuracy(_fake_quant(model, batches), batches))
        counted.update(len(groups) + 1, f"int8 loses {quant:.2f} points")
        per_layer = {}
        for i, name in enumerate(layers):
            per_layer[name] = max(0.0, base - accuracy(_fake_quant(model, batches, {name}), batches))
            counted.update(len(groups) + 2 + i, f"{name} in int8 alone")
        counted.finish(line=False)  # the line below says it
    n = sum(len(y) for _, y in batches)
    sens = Sensitivity(loaded.spec, data.spec, base, n, list(ratios), groups, drops, quant, 100.0 / data.num_classes,
                       round(time.perf_counter() - t0, 2), per_layer)
    progress(f"sensitivity done in {sens.seconds:.1f} s on {n} validation inputs (int8: {quant:.2f} points)")
    _CACHE[key] = sens
    return sens


def group_ratios(est: LayerTable, sens: Sensitivity) -> np.ndarray:
    """Each sensed group's pruning ratio in an estimated table."""
    full = est.group_channels[sens.groups].astype(float)
    kept = est.state.kept[sens.groups].astype(float)
    return np.where(full > 0, 1.0 - kept / np.maximum(full, 1), 0.0)


def damage(est: LayerTable, strategy: Strategy, sens: Sensitivity) -> float:
    """Accuracy points the candidate's groups lose one at a time before any training, summed (not capped:
    past the point where the untrained model is at chance it still orders how much capacity went), plus the
    INT8 drop when the strategy quantizes."""
    if any(s.method == "distill" and s.width is None for s in strategy.steps):
        total = sens.base_accuracy - sens.chance  # another architecture, trained from scratch
    else:
        total = 0.0
        for i, ri in enumerate(group_ratios(est, sens)):
            if ri > 0:
                xs, ys = sens.curve(i)
                total += float(np.interp(ri, xs, ys))
    total += int8_drop(strategy, sens)
    return total


def int8_drop(strategy: Strategy, sens: Sensitivity) -> float:
    """Points the int8 step loses: the whole model's fake-quantized loss, less what the layers kept in float
    lose on their own."""
    step = next((s for s in strategy.steps if s.method == "quantize" and s.dtype == "int8"), None)
    if step is None:
        return 0.0
    return max(0.0, sens.quant_drop - sum(sens.quant_layers.get(n, 0.0) for n in step.keep_float))


def trained_by(strategy: Strategy) -> str:
    """The method whose training decides the recovery: distillation, else fine-tuning after pruning."""
    methods = [s.method for s in strategy.steps]
    if "distill" in methods:
        return "distill"
    if "prune" in methods:
        return "prune"
    if "quantize" in methods:
        return "quantize"
    return "none"


def prior_c(method: str, epochs: int) -> float:
    """The recovery model's prior share of damage left after `epochs` of training by `method`."""
    return PRIOR.get(method, 0.1) * max(epochs, 1) ** -PRIOR_DECAY


@dataclass
class RecoveryModel:
    """Share of the raw drop that training leaves, per method and training budget; learns from truths."""

    truths: list[dict] = field(default_factory=list)  # {"method", "epochs", "raw" (damage less int8), "measured"}
    path: str | None = None

    @classmethod
    def load(cls, path: str | None) -> "RecoveryModel":
        if path and Path(path).is_file():
            return cls(json.loads(Path(path).read_text()).get("truths", []), path)
        return cls([], path)

    def save(self) -> None:
        if self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.path).write_text(json.dumps({"truths": self.truths}, indent=1))

    def observe(self, method: str, epochs: int, raw: float, measured: float) -> None:
        """Add a truth; with a store, under a file lock and re-read first, so that candidates executed in
        parallel (several processes) all keep theirs."""
        truth = {"method": method, "epochs": int(epochs), "raw": float(raw), "measured": float(measured)}
        if not self.path:
            self.truths.append(truth)
            return
        import fcntl
        import os

        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            p = Path(self.path)
            self.truths = json.loads(p.read_text()).get("truths", []) if p.is_file() else []
            self.truths.append(truth)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            Path(tmp).write_text(json.dumps({"truths": self.truths}, indent=1))
            os.replace(tmp, self.path)

    def fit(self, method: str, epochs: int) -> tuple[float, float]:
        """(c, d0) of the hinge `points lost = c x max(0, damage - d0)`: training wins small damage back
        entirely and a share of the rest. For each d0 (0 and every observed damage), c minimises the squared
        error plus PRIOR_WEIGHT x (c - prior)^2; the d0 with the least such penalised error wins. A measured
        gain (negative drop: fine-tuning beat the original) counts as no loss, which the hinge can express:
        truths without loss move d0 past their damage and leave c at the prior for what lies beyond them,
        rather than teaching that any damage is free."""
        if method in ("quantize", "none") or epochs <= 0:
            return 1.0, 0.0
        c0 = prior_c(method, epochs)
        seen = [(t["raw"], t["measured"]) for t in self.truths if t["method"] == method and t["epochs"] == epochs]
        if not seen:
            return c0, 0.0
        x = np.array([a for a, _ in seen])
        y = np.maximum(np.array([b for _, b in seen]), 0.0)
        best = (np.inf, c0, 0.0)
        for d0 in (0.0, *sorted(set(x.tolist()))):
            h = np.maximum(x - d0, 0.0)
            c = max(0.0, (PRIOR_WEIGHT * c0 + h @ y) / (PRIOR_WEIGHT + h @ h))
            obj = float(((c * h - y) ** 2).sum()) + PRIOR_WEIGHT * (c - c0) ** 2
            if obj < best[0] - 1e-12:
                best = (obj, c, d0)
        return best[1], best[2]

    def predict(self, strategy: Strategy, dmg: float, quant: float, epochs: int, cap: float) -> float:
        """Predicted points lost: without training the damage (capped at chance); with training the
        recoverable part through the method's hinge, plus an int8 step's drop, which training before it
        does not win back."""
        method = trained_by(strategy)
        if method in ("quantize", "none") or epochs <= 0:
            return min(dmg, cap)
        c, d0 = self.fit(method, epochs)
        return min(c * max(0.0, dmg - quant - d0) + quant, cap)


def proxy_score(est: LayerTable) -> float:
    """Data-free proxy: the share of torch-pruning's group importance the candidate removes (0..1)."""
    plan = est.plan
    removed = total = 0.0
    for g in plan.groups:
        imp = g.imp_sorted.astype(float)
        cut = int(g.channels - est.state.kept[g.index]) // max(g.ch_groups, 1)
        removed += float(imp[:cut].sum())
        total += float(imp.sum())
    return removed / total if total else 0.0


def recovery_path(model_spec: str, data_spec: str) -> str:
    """Where the executed truths of a model on a data set are kept: $DEPLOYFIT_CACHE_DIR (default
    ~/.cache/deployfit)/recovery/<model>__<data>.json."""
    import os
    import re

    root = Path(os.environ.get("DEPLOYFIT_CACHE_DIR") or Path.home() / ".cache" / "deployfit")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model_spec}__{data_spec}")[:150]
    return str(root / "recovery" / f"{safe}.json")


def predict_drop(loaded, table: LayerTable, strategy: Strategy, data, epochs: int,
                 progress: Progress = lambda m: None, recovery: RecoveryModel | None = None) -> dict:
    """`pred.accuracy_drop` (points) of a candidate, with how it was obtained."""
    from .compress import estimate

    sens = sensitivity(loaded, table, data, progress=progress)
    est = estimate(table, strategy)
    dmg = damage(est, strategy, sens)
    quant = int8_drop(strategy, sens)
    rec = recovery or RecoveryModel.load(recovery_path(loaded.spec, data.spec))
    method = trained_by(strategy)
    c, d0 = rec.fit(method, epochs)
    drop = rec.predict(strategy, dmg, quant, epochs, sens.base_accuracy - sens.chance)
    n_truths = sum(1 for t in rec.truths if t["method"] == method and t["epochs"] == epochs)
    return {"accuracy_drop": round(drop, 4), "method": "sensitivity", "base_accuracy": round(sens.base_accuracy, 4),
            "damage_points": round(dmg, 4), "int8_points": round(quant, 4), "trained_by": method, "epochs": epochs,
            "recovery": {"c": round(c, 5), "d0": round(d0, 4), "truths": n_truths, "store": rec.path},
            "sensitivity": {"samples": sens.samples, "groups": len(sens.groups), "seconds": sens.seconds}}


def record_truth(pred: dict, measured_drop: float) -> None:
    """Teach the recovery model what an executed candidate really lost."""
    if pred.get("method") != "sensitivity" or pred["trained_by"] not in ("prune", "distill") or pred["epochs"] <= 0:
        return
    rec = RecoveryModel.load(pred["recovery"]["store"])
    rec.observe(pred["trained_by"], pred["epochs"], pred["damage_points"] - pred["int8_points"],
                measured_drop - pred["int8_points"])


def proxy_report(table: LayerTable, strategy: Strategy) -> dict:
    from .compress import estimate

    return {"score": round(proxy_score(estimate(table, strategy)), 5), "method": "proxy",
            "note": "data-free proxy (share of torch-pruning importance removed, 0..1): ranks candidates, is not "
                    "accuracy points; give --data for pred.accuracy_drop"}


# ----------------------------------------------------------------------------------------------
# many candidates at once (the search): the same predictions over a matrix of kept channels


def _family_kept_ratio(est: LayerTable, kept: np.ndarray, groups: list[int]) -> np.ndarray:
    full = est.group_channels[groups].astype(float)
    return np.where(full > 0, 1.0 - kept[:, groups] / np.maximum(full, 1), 0.0)


class ProxyScorer:
    """`proxy_score` for K candidates sharing a strategy's shape: kept (K x dependency-graph groups)."""

    unit = "proxy"

    def __init__(self) -> None:
        self._plans: dict[int, tuple] = {}

    def _tables(self, est: LayerTable):
        plan = est.plan
        hit = self._plans.get(id(plan))
        if hit is None or hit[0] is not plan:
            L = max((len(g.imp_sorted) for g in plan.groups), default=0)
            cum = np.zeros((len(plan.groups), L + 1))
            for i, g in enumerate(plan.groups):
                c = np.cumsum(g.imp_sorted.astype(float))
                cum[i, 1:len(c) + 1] = c
                cum[i, len(c) + 1:] = c[-1] if len(c) else 0.0
            hit = (plan, cum, np.array([g.index for g in plan.groups], dtype=np.int64),
                   np.array([g.channels for g in plan.groups]), np.array([max(g.ch_groups, 1) for g in plan.groups]),
                   float(sum(float(g.imp_sorted.astype(float).sum()) for g in plan.groups)))
            self._plans[id(plan)] = hit
        return hit[1:]

    def __call__(self, strategy: Strategy, est: LayerTable, kept: np.ndarray) -> np.ndarray:
        cum, gidx, chans, chg, total = self._tables(est)
        if not len(gidx) or not total:
            return np.zeros(len(kept))
        cut = np.clip((chans[None, :] - kept[:, gidx]) // chg[None, :], 0, cum.shape[1] - 1)
        return cum[np.arange(len(gidx))[None, :], cut].sum(1) / total

    def group_curves(self, table: LayerTable, ratios: np.ndarray) -> np.ndarray:
        """Per followed group (plan order), the share of all importance removed at each ratio alone."""
        cum, gidx, chans, chg, total = self._tables(table)
        L = chans // chg
        cut = L[:, None] - np.floor(L[:, None] * (1.0 - ratios[None, :])).astype(np.int64)
        return cum[np.arange(len(gidx))[:, None], np.clip(cut, 0, cum.shape[1] - 1)] / max(total, 1e-30)


class DropScorer:
    """`predict_drop` (points) for K candidates sharing a strategy's shape (same student, same quantization,
    with or without a pruning step): the sensitivity damage at each candidate's group ratios, through the
    recovery model of the method that trains."""

    unit = "points"

    @property
    def max_layer_ratio(self) -> float:
        """The largest ratio the sensitivity measured: a search should not give one group more."""
        return float(max(self.sens.ratios))

    def __init__(self, loaded, table: LayerTable, data, epochs: int, progress: Progress = lambda m: None,
                 recovery: RecoveryModel | None = None, sens: Sensitivity | None = None):
        """`sens`: the sensitivity analysis when the caller has it (a pipeline's cached step); else it is run
        on `loaded` and `data`."""
        self.sens = sens if sens is not None else sensitivity(loaded, table, data, progress=progress)
        self.rec = recovery or RecoveryModel.load(recovery_path(self.sens.model, self.sens.data))
        self.epochs = epochs
        self._fits: dict[str, tuple[float, float]] = {}
        s = self.sens
        self._curves = [s.curve(i) for i in range(len(s.groups))]

    def damage(self, strategy: Strategy, est: LayerTable, kept: np.ndarray) -> np.ndarray:
        s = self.sens
        if any(st.method == "distill" and st.width is None for st in strategy.steps):
            dmg = np.full(len(kept), s.base_accuracy - s.chance)
        else:
            r = _family_kept_ratio(est, kept, s.groups)
            dmg = np.zeros(len(kept))
            for i, (xs, ys) in enumerate(self._curves):
                dmg += np.interp(r[:, i], xs, ys)
        return dmg + int8_drop(strategy, s)

    def __call__(self, strategy: Strategy, est: LayerTable, kept: np.ndarray) -> np.ndarray:
        s = self.sens
        dmg = self.damage(strategy, est, kept)
        quant = int8_drop(strategy, s)
        cap = s.base_accuracy - s.chance
        method = trained_by(strategy)
        if method in ("quantize", "none") or self.epochs <= 0:
            return np.minimum(dmg, cap)
        if method not in self._fits:
            self._fits[method] = self.rec.fit(method, self.epochs)
        c, d0 = self._fits[method]
        return np.minimum(c * np.maximum(0.0, dmg - quant - d0) + quant, cap)

    def group_curves(self, table: LayerTable, ratios: np.ndarray) -> np.ndarray:
        """Per followed group (plan order), the points lost with that group alone pruned at each ratio."""
        where = {g: i for i, g in enumerate(self.sens.groups)}
        out = np.zeros((len(table.plan.groups), len(ratios)))
        for j, g in enumerate(table.plan.groups):
            if g.index in where:
                xs, ys = self._curves[where[g.index]]
                out[j] = np.interp(ratios, xs, ys)
        return out
