"""The compression methods, one module each (prune, quantize, distill), registered here once.

A method module holds everything about its step (estimators.methods.base.Method): the pydantic step, the grammar
of its compact string, its parser, its estimate and its executor. Adding a method is one module that defines
`METHOD` and one entry in `_MODULES` below; the strategy parser, `estimators.compress.estimate` and
`tasks.executors.run_strategy` find it here.
"""
from __future__ import annotations

from . import distill, prune, quantize
from .base import Method, StepModel

_MODULES = (prune, quantize, distill)  # the order messages list them in

METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD for m in _MODULES}


def get(name: str) -> Method | None:
    return METHODS.get(name)


__all__ = ["METHODS", "Method", "StepModel", "get"]
