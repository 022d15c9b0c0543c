"""What a compression method is: the one object that `estimators.methods` registers for it.

A method brings together everything deployfit does with one kind of step:

    step      its pydantic step model (the JSON form; `method` is the discriminator, `compact()` the string form)
    forms     the grammar of its compact string, for error messages
    parse     its compact string (what follows `name:`) -> the step's fields, or UserInputError
    estimate  LayerTable, step -> LayerTable: the predicted model after the step (pure, no torch)
    execute   Work, step -> Work: the step really done on the model (tasks.executors.run_strategy calls it)

The executor reaches its heavy machinery (training, Intel Neural Compressor) through the `Work` it is given
(tasks.executors.Work: `fit`, `quantize`, `accuracy`), so a method module never imports the tasks layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict

from ..table import LayerTable


class StepModel(BaseModel):
    """A step of a strategy: fields are the method's settings, unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    def compact(self) -> str:
        raise NotImplementedError

    def label(self) -> str:
        """The form tables show: compact() unless a method summarises long settings."""
        return self.compact()


@dataclass(frozen=True)
class Method:
    name: str
    step: type[StepModel]
    forms: str
    parse: Callable[[str, str], dict]
    estimate: Callable[[LayerTable, Any], LayerTable]
    execute: Callable[[Any, Any], Any]
