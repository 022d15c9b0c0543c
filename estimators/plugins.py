"""A table from a key (a compression method, an operator) to its handler; a duplicate key raises."""
from __future__ import annotations

from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class Registry(dict):
    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, *keys: Any, value: Any = None) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            for k in keys:
                if k in self:
                    raise ValueError(f"duplicate {self.what} registration for {getattr(k, '__name__', k)!r}")
                self[k] = fn if value is None else (fn, value)
            return fn

        return deco
