"""The compression methods, one module each (prune, quantize, distill), registered here once.

A method module holds everything about its step (estimators.methods.base.Method): the pydantic step, the grammar
of its compact string, its parser, its estimate and its executor. Adding a method is one module that defines
`METHOD` and its name in `NAMES` below; the strategy parser, `estimators.compress.estimate` and
`tasks.executors.run_strategy` find it here.
"""
from __future__ import annotations

from importlib import import_module

from .base import Method, StepModel

NAMES = ("prune", "quantize", "distill")  # the method modules, in the order messages list them

METHODS: dict[str, Method] = {m.name: m for m in (import_module(f".{n}", __name__).METHOD for n in NAMES)}

__all__ = ["METHODS", "NAMES", "Method", "StepModel"]
