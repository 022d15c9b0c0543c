"""Compression estimators: pure functions LayerTable -> LayerTable, selected by step type.

    prune     reproduces torch-pruning's channel arithmetic on the table's groups (exact counts)
    quantize  rewrites bytes per element of weights/activations and adds what the executor stores
    distill   swaps in the student's table (a model spec) or scales the teacher's width (width:F)
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .errors import UserInputError
from .plugins import Registry
from .strategy import DistillStep, PruneStep, Strategy
from .table import LayerTable

Estimator = Callable[[LayerTable, Any], LayerTable]
ESTIMATORS = Registry("estimator")  # compression method -> estimator
register_estimator = ESTIMATORS.register


# ----------------------------------------------------------------------------------------------
# prune


def _layer_ratio_map(table: LayerTable, layers: dict[str, float]) -> dict[str, float]:
    """Expand module names to the prunable modules under them, as torch-pruning's pruning_ratio_dict does."""
    out: dict[str, float] = {}
    known = set(table.plan.prunable_modules)
    all_modules = set(table.module_names)
    for name, r in layers.items():
        hits = [m for m in table.plan.prunable_modules if m == name or m.startswith(name + ".")]
        if not hits and name not in all_modules:
            raise UserInputError(f"per-layer ratio names {name!r}, which is not a module of {table.model}")
        for m in hits:
            out[m] = r
        if name in known:
            out[name] = r
    return out


def prune_counts(table: LayerTable, step: PruneStep) -> np.ndarray:
    """Root channels torch-pruning removes from each followed group (MetaPruner._prune's arithmetic)."""
    plan = table.plan
    groups = plan.groups
    G = len(groups)
    if G == 0:
        return np.zeros(0, dtype=np.int64)
    gidx = np.array([g.index for g in groups])
    chg = np.array([g.ch_groups for g in groups], dtype=np.int64)
    kept = table.state.kept[gidx].astype(np.int64)
    full = np.array([g.channels for g in groups], dtype=np.int64)
    L = kept // chg  # importance entries per group
    fresh = bool((kept == full).all())
    n = np.zeros(G, dtype=np.int64)
    if step.scope == "uniform":
        r = np.full(G, step.ratio)
        if step.layers:
            lr = _layer_ratio_map(table, step.layers)
            for i, g in enumerate(groups):
                for m in g.scope_modules:
                    if m in lr:
                        r[i] = lr[m]
                        break
        n = L - np.floor(L * (1.0 - r)).astype(np.int64)
    else:
        if step.layers:
            raise UserInputError("per-layer ratios need scope uniform")
        cache = getattr(plan, "_global_cache", None)
        if fresh and cache is not None:
            all_imp, all_gid, sorted_imp = cache
        else:
            parts = [g.imp_sorted[len(g.imp_sorted) - int(k):] for g, k in zip(groups, L)]
            all_imp = np.concatenate(parts)
            all_gid = np.repeat(np.arange(G), [len(p) for p in parts])
            sorted_imp = np.sort(all_imp)
            if fresh:
                plan._global_cache = (all_imp, all_gid, sorted_imp)  # type: ignore[attr-defined]
        total = len(all_imp)
        n_tot = total - int(np.floor(total * (1.0 - step.ratio)))
        if n_tot > 0:
            thres = sorted_imp[n_tot - 1]
            n = np.bincount(all_gid[all_imp <= thres], minlength=G).astype(np.int64)
    if step.round_to:
        rt = step.round_to
        keep = kept - n
        rounded = keep - keep % rt
        n = np.where(n > 0, np.maximum(kept - rounded, 0), 0)
    P = n * chg
    # torch-pruning skips a group that would lose all channels, and groups already at one channel
    P = np.where((P >= kept) | (kept <= 1), 0, P)
    return P


@register_estimator("prune")
def estimate_prune(table: LayerTable, step: PruneStep) -> LayerTable:
    s = table.state.copy()
    P = prune_counts(table, step)
    if len(P):
        gidx = np.array([g.index for g in table.plan.groups])
        s.kept[gidx] -= P
    s.steps.append(step.model_dump(exclude_none=True))
    return table.with_state(s)


# ----------------------------------------------------------------------------------------------
# distill


@register_estimator("distill")
def estimate_distill(table: LayerTable, step: DistillStep) -> LayerTable:
    if step.width is not None:
        # the teacher at width F: every followed channel group keeps int(L * F) channels, which is exactly
        # torch-pruning's uniform arithmetic at ratio 1 - F (the executor builds the student that way)
        out = estimate_prune(table, PruneStep(ratio=round(1.0 - step.width, 12), scope="uniform"))
        out.state.steps[-1] = step.model_dump()
        return out
    from .analyze import analyze
    from .modelspec import format_input_shape, load_model

    student = analyze(load_model(step.student, input_shape=format_input_shape(table.input_shape)))
    s = student.state.copy()
    s.steps = list(table.state.steps) + [step.model_dump()]
    return student.with_state(s)


# ----------------------------------------------------------------------------------------------
# apply a strategy


def estimate(table: LayerTable, strategy: Strategy) -> LayerTable:
    for step in strategy.steps:
        fn = ESTIMATORS.get(step.method)
        if fn is None:
            raise UserInputError(f"no estimator for method {step.method!r}")
        table = fn(table, step)
    return table


from . import quantize as _quantize  # noqa: E402,F401  registers the quantize estimator
