"""The plan: every candidate of the space estimated (size, params, MACs, memory, latency on the target,
accuracy drop), the feasible ones ranked by predicted accuracy drop, the Pareto front over (latency,
accuracy drop, size), which requirements bind the recommendation, and, when nothing fits, the nearest
feasible relaxation.

The space (order distill -> prune -> quantize, each optional): students at width multipliers and from
`students`, pruning ratios on a 0.05 grid, uniform and global (and uniform with round_to the profile's
channel multiple), and only the dtypes the hardware profile runs fast (no INT8 for a device without fast
INT8). Exhaustive: the space is a few hundred to a few thousand candidates.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from estimators.compress import estimate
from estimators.report import public
from estimators.strategy import DistillStep, PruneStep, QuantizeStep, Strategy
from estimators.table import LayerTable, totals
from estimators.table import evaluate as evaluate_table
from hardware.latency import predict_latency
from hardware.profile import HardwareProfile

from .requirements import LIMITS, Requirements

def ratio_grid(step: float) -> tuple[float, ...]:
    """Pruning ratios from `step` to 0.90 in steps of `step`."""
    n = int(round(0.90 / step))
    return tuple(round(step * i, 4) for i in range(1, n + 1))


PRUNE_GRID = ratio_grid(0.05)  # 0.05 .. 0.90
WIDTHS = (0.75, 0.5)
QUANT_DTYPES = ("int8", "fp16", "bf16")
OBJECTIVES = ("latency_ms", "accuracy_drop", "size_bytes")


def quantize_dtypes(profile: HardwareProfile) -> list[str]:
    """Dtypes worth proposing: those the device runs fast (a slow one only costs what it saves)."""
    return [d for d in QUANT_DTYPES if d in profile.fast_dtypes]


def candidate_space(table: LayerTable, profile: HardwareProfile, students: tuple[str, ...] = (),
                    widths: tuple[float, ...] = WIDTHS, grid: tuple[float, ...] = PRUNE_GRID) -> list[Strategy]:
    prunable = bool(table.plan.groups)
    distills: list[list] = [[]] + ([[DistillStep(student=f"width:{w:g}")] for w in widths] if prunable else []) \
        + [[DistillStep(student=s)] for s in students]
    prunes: list[list] = [[]]
    if prunable:
        for r in grid:
            prunes.append([PruneStep(ratio=r, scope="uniform")])
            prunes.append([PruneStep(ratio=r, scope="global")])
            if profile.channel_multiple and profile.channel_multiple > 1:
                prunes.append([PruneStep(ratio=r, scope="uniform", round_to=profile.channel_multiple)])
    quants: list[list] = [[]] + [[QuantizeStep(dtype=d)] for d in quantize_dtypes(profile)]
    out = []
    for d in distills:
        for p in prunes:
            if d and p and d[0].width is not None:
                continue  # a narrower student, pruned again, is another width: the grid covers it
            for q in quants:
                out.append(Strategy(steps=d + p + q))
    return out


AccuracyFn = Callable[[Strategy, LayerTable], tuple[float, str]]  # (predicted drop or proxy, "points"|"proxy")


def evaluate(table: LayerTable, strategy: Strategy, profile: HardwareProfile, batch: int,
             accuracy: AccuracyFn, student_tables: dict[str, LayerTable] | None = None) -> dict[str, Any]:
    base = table
    for s in strategy.steps:
        if s.method == "distill" and s.width is None:
            base = (student_tables or {})[s.student]
    steps = [s for s in strategy.steps if not (s.method == "distill" and s.width is None)]
    est = estimate(base, Strategy(steps=steps))
    ev = evaluate_table(est)
    pred = public(totals(est, ev))
    # rounded as reported, so that the Pareto front is computed on the numbers the user sees
    pred["latency_ms"] = round(predict_latency(est, profile, batch, ev).latency_ms, 4)
    drop, unit = accuracy(strategy, est)
    pred["accuracy_drop"] = round(float(drop), 4)
    return {"strategy": strategy.model_dump(exclude_none=True), "compact": strategy.compact(), "pred": pred,
            "accuracy_unit": unit}


def violations(pred: dict, req: Requirements) -> dict[str, float]:
    """Requirement -> predicted value / limit for every requirement the prediction breaks."""
    out = {}
    for name, limit in req.active().items():
        metric, _, unit = LIMITS[name]
        if name == "max_accuracy_drop" and pred.get("accuracy_unit") == "proxy":
            continue
        v = pred[metric]
        if v > limit * unit + 1e-9:
            out[name] = v / (limit * unit)
    return out


def pareto_front(rows: list[dict]) -> list[dict]:
    """Rows no other row beats on every objective (minimised) while being strictly better on one."""
    pts = np.array([[r["pred"][o] for o in OBJECTIVES] for r in rows], dtype=float)
    keep = []
    for i, p in enumerate(pts):
        dominated = np.any(np.all(pts <= p, axis=1) & np.any(pts < p, axis=1))
        if not dominated:
            keep.append(rows[i])
    return keep


def _rank_key(r: dict):
    p = r["pred"]
    return (round(p["accuracy_drop"], 6), p["latency_ms"], p["size_bytes"])


def _fmt_limit(name: str, value: float) -> str:
    metric, _, unit = LIMITS[name]
    v = value / unit
    return {"max_latency_ms": f"{v:.3g} ms", "max_size_mb": f"{v:.3g} MB", "max_memory_mb": f"{v:.3g} MB",
            "max_accuracy_drop": f"{v:.2f} points"}.get(name, f"{v:,.0f}")


def plan(table: LayerTable, profile: HardwareProfile, req: Requirements, accuracy: AccuracyFn, top_k: int = 5,
         students: tuple[str, ...] = (), student_tables: dict[str, LayerTable] | None = None,
         progress: Callable[[str], None] = lambda m: None, grid_step: float = 0.05) -> dict[str, Any]:
    t0 = time.perf_counter()
    cands = candidate_space(table, profile, students, grid=ratio_grid(grid_step))
    rows = []
    for i, strat in enumerate(cands):
        row = evaluate(table, strat, profile, req.batch_size, accuracy, student_tables)
        row["pred"]["accuracy_unit"] = row["accuracy_unit"]
        row["violates"] = violations(row["pred"], req)
        rows.append(row)
        if (i + 1) % 500 == 0:
            progress(f"{i + 1}/{len(cands)} candidates estimated")
    seconds = time.perf_counter() - t0
    feasible = sorted((r for r in rows if not r["violates"]), key=_rank_key)
    out: dict[str, Any] = {"candidates_evaluated": len(rows), "seconds": round(seconds, 3),
                           "candidates_per_second": round(len(rows) / max(seconds, 1e-9), 1),
                           "hardware": profile.name, "requirements": req.model_dump(exclude_none=True),
                           "accuracy_unit": rows[0]["accuracy_unit"] if rows else "points",
                           "pareto": [_public(r) for r in sorted(pareto_front(rows), key=_rank_key)]}
    if feasible:
        rec = feasible[0]
        better = [r for r in rows if _rank_key(r) < _rank_key(rec)]
        counts: dict[str, int] = {}
        for r in better:
            for name in r["violates"]:
                counts[name] = counts.get(name, 0) + 1
        out.update(recommended=_public(rec), top=[_public(r) for r in feasible[:top_k]],
                   binding=[{"requirement": n, "limit": req.active()[n], "candidates_excluded": c}
                            for n, c in sorted(counts.items(), key=lambda kv: -kv[1])])
        return out
    # nothing fits: the candidate that breaks the requirements least (largest ratio over its limit)
    worst = min(rows, key=lambda r: (max(r["violates"].values()), _rank_key(r)))
    relaxed = {n: worst["pred"][LIMITS[n][0]] / LIMITS[n][2] for n in worst["violates"]}
    words = [f"{_fmt_limit(n, req.active()[n] * LIMITS[n][2])} is not reachable" for n in worst["violates"]]
    kept = [f"{_fmt_limit(n, v * LIMITS[n][2])}" for n, v in req.active().items() if n not in worst["violates"]]
    nearest = ", ".join(_fmt_limit(n, v * LIMITS[n][2]) for n, v in relaxed.items())
    msg = f"{' and '.join(words)}{' within ' + ', '.join(kept) if kept else ''}; the nearest is {nearest} with " \
          f"{worst['compact']}"
    out.update(recommended=None, top=[], binding=[{"requirement": n, "limit": req.active()[n]} for n in worst["violates"]],
               infeasible={"message": msg, "unreachable": sorted(worst["violates"]), "relaxed": relaxed,
                           "nearest": _public(worst)})
    return out


def _public(r: dict) -> dict:
    pred = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r["pred"].items() if k != "accuracy_unit"}
    return {"compact": r["compact"], "strategy": r["strategy"], "pred": pred}
