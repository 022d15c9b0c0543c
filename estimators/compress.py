"""A strategy's estimate: each step's method (estimators.methods) applied to the table in turn, a pure function
LayerTable -> LayerTable per step."""
from __future__ import annotations

from .errors import UserInputError
from .methods import METHODS
from .strategy import Strategy
from .table import LayerTable


def estimate(table: LayerTable, strategy: Strategy) -> LayerTable:
    for step in strategy.steps:
        method = METHODS.get(step.method)
        if method is None:
            raise UserInputError(f"no estimator for method {step.method!r}")
        table = method.estimate(table, step)
    return table
