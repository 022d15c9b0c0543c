"""Structured pruning with torch-pruning: the step, its string form, its estimate (torch-pruning's channel
arithmetic on the table's groups, exact), its counts vectorised over candidates (the search's), and its executor
(torch-pruning's MetaPruner with the plan's ignored layers; with data, fine-tuned for the training budget,
optionally distilling from the original).

    prune:RATIO[:uniform|:global][:round_to=N][:layers=NAME=R+NAME=R]
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from ..errors import UserInputError
from ..table import LayerTable
from .base import Method, StepModel

FORMS = "prune:RATIO[:uniform|:global][:round_to=N][:layers=NAME=R+NAME=R]"


class PruneStep(StepModel):
    method: Literal["prune"] = "prune"
    ratio: float = Field(ge=0.0, lt=1.0, description="share of channels removed per group (uniform) or overall (global)")
    scope: Literal["uniform", "global"] = "uniform"
    round_to: int | None = Field(default=None, ge=1, description="keep channel counts multiples of this")
    layers: dict[str, float] | None = Field(default=None, description="per-layer ratios (module name -> ratio), uniform scope")

    @field_validator("layers")
    @classmethod
    def _layers(cls, v):
        if v:
            for k, r in v.items():
                if not 0.0 <= r < 1.0:
                    raise ValueError(f"ratio {r} for layer {k!r} is outside [0, 1)")
        return v

    def compact(self) -> str:
        s = "prune" if self.layers and self.ratio == 0 else f"prune:{self.ratio:g}"
        if self.scope != "uniform":
            s += f":{self.scope}"
        if self.round_to:
            s += f":round_to={self.round_to}"
        if self.layers:
            s += ":layers=" + "+".join(f"{k}={v:g}" for k, v in self.layers.items())
        return s

    def label(self) -> str:
        """compact(), with a per-layer list summarised (for tables and messages)."""
        if not self.layers:
            return self.compact()
        rs = list(self.layers.values())
        base = f"prune:{self.ratio:g}" if self.ratio else "prune"
        return f"{base}:per-layer({len(rs)} layers, {min(rs):g}-{max(rs):g})"


def parse(rest: str, tok: str) -> dict:
    parts = [p for p in rest.split(":") if p]
    if not parts:
        raise UserInputError("prune needs a ratio, e.g. prune:0.5")
    if parts[0].startswith(("layers=", "round_to=")) and any(x.startswith("layers=") for x in parts):
        parts.insert(0, "0")  # per-layer ratios only: groups not named are not pruned
    try:
        step: dict = {"method": "prune", "ratio": float(parts[0])}
    except ValueError:
        raise UserInputError(f"bad prune ratio {parts[0]!r}") from None
    for p in parts[1:]:
        if p.startswith("layers="):
            step["layers"] = _layer_ratios(p[len("layers="):], tok)
        elif p in ("uniform", "global"):
            step["scope"] = p
        elif p.startswith("round_to="):
            try:
                step["round_to"] = int(p.split("=", 1)[1])
            except ValueError:
                raise UserInputError(f"bad round_to in {tok!r}") from None
        else:
            raise UserInputError(f"unknown prune option {p!r} in {tok!r}")
    return step


def _layer_ratios(text: str, tok: str) -> dict[str, float]:
    layers = {}
    for item in text.split("+"):
        name, eq, val = item.rpartition("=")
        try:
            layers[name] = float(val)
        except ValueError:
            name = ""
        if not eq or not name:
            raise UserInputError(f"bad per-layer ratio {item!r} in {tok!r}: use layers=NAME=RATIO+NAME=RATIO")
    return layers


# ----------------------------------------------------------------------------------------------
# estimate: torch-pruning's arithmetic (MetaPruner._prune) on the plan's groups


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


def _group_arrays(table: LayerTable) -> tuple[np.ndarray, np.ndarray]:
    """Per followed group: its channels kept now and its channel grouping (importance entries = kept // chg)."""
    groups = table.plan.groups
    gidx = np.array([g.index for g in groups], dtype=np.int64)
    chg = np.array([g.ch_groups for g in groups], dtype=np.int64)
    return table.state.kept[gidx].astype(np.int64), chg


def _removed(n: np.ndarray, kept: np.ndarray, chg: np.ndarray, round_to: int | None) -> np.ndarray:
    """Root channels removed, from `n` importance entries removed per group: kept counts rounded down to
    multiples of `round_to`; torch-pruning skips a group that would lose all channels, and groups already at one."""
    if round_to:
        keep = kept - n
        rounded = keep - keep % round_to
        n = np.where(n > 0, np.maximum(kept - rounded, 0), 0)
    P = n * chg
    return np.where((P >= kept) | (kept <= 1), 0, P)


def counts_for_ratios(table: LayerTable, ratios: np.ndarray, round_to: int | None = None) -> np.ndarray:
    """Root channels torch-pruning removes from each followed group at per-group ratios, uniform scope:
    `ratios` K x groups (or one row) -> K x groups. The search evaluates thousands of candidates with it."""
    kept, chg = _group_arrays(table)
    L = kept // chg
    r = np.atleast_2d(ratios)
    n = L - np.floor(L * (1.0 - r)).astype(np.int64)
    return _removed(n, kept, chg, round_to)


def _global_counts(table: LayerTable, ratio: float, kept: np.ndarray, chg: np.ndarray) -> np.ndarray:
    """Importance entries removed per group when all groups are ranked together (global scope)."""
    plan = table.plan
    groups = plan.groups
    G = len(groups)
    L = kept // chg
    full = np.array([g.channels for g in groups], dtype=np.int64)
    fresh = bool((kept == full).all())
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
    n_tot = total - int(np.floor(total * (1.0 - ratio)))
    if n_tot <= 0:
        return np.zeros(G, dtype=np.int64)
    thres = sorted_imp[n_tot - 1]
    return np.bincount(all_gid[all_imp <= thres], minlength=G).astype(np.int64)


def prune_counts(table: LayerTable, step: PruneStep) -> np.ndarray:
    """Root channels torch-pruning removes from each followed group (MetaPruner._prune's arithmetic)."""
    groups = table.plan.groups
    if not groups:
        return np.zeros(0, dtype=np.int64)
    if step.scope == "uniform":
        r = np.full(len(groups), step.ratio)
        if step.layers:
            lr = _layer_ratio_map(table, step.layers)
            for i, g in enumerate(groups):
                for m in g.scope_modules:
                    if m in lr:
                        r[i] = lr[m]
                        break
        return counts_for_ratios(table, r, step.round_to)[0]
    if step.layers:
        raise UserInputError("per-layer ratios need scope uniform")
    kept, chg = _group_arrays(table)
    return _removed(_global_counts(table, step.ratio, kept, chg), kept, chg, step.round_to)


def estimate(table: LayerTable, step: PruneStep) -> LayerTable:
    s = table.state.copy()
    P = prune_counts(table, step)
    if len(P):
        gidx = np.array([g.index for g in table.plan.groups])
        s.kept[gidx] -= P
    s.steps.append(step.model_dump(exclude_none=True))
    return table.with_state(s)


# ----------------------------------------------------------------------------------------------
# execute


def prune_module(work, step: PruneStep) -> None:
    """torch-pruning's MetaPruner on `work.model`, configured as the plan was (its ignored layers)."""
    import torch

    from ..pruning import build_pruner

    plan = work.table.plan
    if plan.error:
        work.log.append(f"prune: nothing pruned ({plan.error})")
        return
    pruner = build_pruner(work.model, work.example(), plan.classifier + plan.ignored_roots, ratio=step.ratio,
                          global_pruning=step.scope == "global", round_to=step.round_to, layer_ratios=step.layers)
    with torch.no_grad():
        pruner.step()


def execute(work, step: PruneStep):
    if step.layers:
        missing = [n for n in step.layers if n not in dict(work.model.named_modules())]
        if missing:
            raise UserInputError(f"per-layer ratios name modules that {work.loaded.spec} lacks: {', '.join(missing)}")
    prune_module(work, step)
    work.log.append(f"pruned with torch-pruning: {step.compact()}")
    if work.trains():
        work.fit(f"fine-tune after {step.compact()}", work.teacher if work.train_cfg.kd_finetune else None)
    return work


METHOD = Method(name="prune", step=PruneStep, forms=FORMS, parse=parse, estimate=estimate, execute=execute)
