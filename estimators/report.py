"""JSON-ready reports of a table, an estimate and a measurement."""
from __future__ import annotations

from typing import Any

from .compress import estimate
from .modelspec import LoadedModel, shape_json
from .strategy import Strategy
from .table import LayerTable, evaluate, layer_rows, totals

PUBLIC = ("params", "size_bytes", "macs", "flops", "memory_access_bytes", "peak_memory_bytes")


def public(t: dict[str, Any]) -> dict[str, Any]:
    return {k: t[k] for k in PUBLIC if k in t}


def groups_report(table: LayerTable) -> list[dict[str, Any]]:
    return [{"root": g.root, "channels": g.channels, "channel_groups": g.ch_groups,
             "members": [m for m, _ in g.out_deps]} for g in table.plan.groups]


def analysis_report(loaded: LoadedModel, table: LayerTable) -> dict[str, Any]:
    ev = evaluate(table)
    return {
        "model": loaded.spec,
        "input_shape": shape_json(loaded.input_shape),
        "totals": public(totals(table, ev)),
        "layers": layer_rows(table, ev),
        "unsupported_ops": table.unsupported,
        "channel_groups": groups_report(table),
        "unpruned": table.plan.unpruned,
    }


def estimate_report(loaded: LoadedModel, table: LayerTable, strategy: Strategy) -> dict[str, Any]:
    out = estimate(table, strategy)
    return {
        "model": loaded.spec,
        "input_shape": shape_json(loaded.input_shape),
        "strategy": strategy.model_dump(exclude_none=True),
        "compact": strategy.compact(),
        "pred": public(totals(out)),
        "unsupported_ops": out.unsupported,
        "unpruned": out.plan.unpruned if any(s.method in ("prune", "distill") for s in strategy.steps) else [],
    }


POINTS = ("accuracy", "accuracy_drop")  # in percentage points: their error is pred - meas, in points
# measured metrics checked against a prediction of another name
PREDICTED_BY: dict[str, str] = {}


def rel_err(pred: dict[str, Any], meas: dict[str, Any]) -> dict[str, float]:
    """Relative error (pred - meas) / meas of every measured metric; accuracy metrics in points instead."""
    err = {}
    for k, v in meas.items():
        if k in pred and k in POINTS and isinstance(v, (int, float)):
            err[k] = round(pred[k] - v, 4)
        elif PREDICTED_BY.get(k, k) in pred and isinstance(v, (int, float)) and v:
            err[k] = round((pred[PREDICTED_BY.get(k, k)] - v) / v, 6)
    return err
