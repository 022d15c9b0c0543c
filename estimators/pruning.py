"""Structured-pruning plan from torch-pruning's own dependency graph and importance, without pruning.

`plan_pruning` builds torch-pruning's MetaPruner on the model (which only traces it), enumerates the
same channel groups that `pruner.step()` would prune, and stores per group what the count of pruned
channels depends on: the group's size, its channel grouping and its importance scores (for global
ranking). The estimator then reproduces torch-pruning's thresholding arithmetic vectorised, so it
predicts exactly the channels torch-pruning removes for any ratio, scope and round_to.

Groups the estimator cannot follow (a channel mapping through an op it does not track, an unwrapped
parameter) are left unpruned, and the executor is told to ignore them the same way (`ignored_roots`).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import signal
import threading
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .modelspec import as_inputs

log = logging.getLogger(__name__)

# torch-pruning's dependency graph can explode on some models (swin_t: > 20 GB and minutes in its index
# mapping); past this budget the model is treated as one torch-pruning cannot prune
GRAPH_BUDGET_S = float(os.environ.get("DEPLOYFIT_PRUNE_GRAPH_BUDGET_S", "45"))


class _Budget(Exception):
    pass


@contextlib.contextmanager
def time_budget(seconds: float):
    """Raise _Budget in the main thread after `seconds` (no limit elsewhere, where signals cannot go)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _alarm(signum, frame):
        raise _Budget()

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def make_importance():
    """The importance criterion shared by the estimator and the executor (group L2 magnitude)."""
    import torch_pruning as tp

    return tp.importance.GroupMagnitudeImportance(p=2)


@dataclass
class PruneGroup:
    index: int  # position in the dependency graph's group enumeration
    root: str  # root module (its output channels define the group)
    channels: int  # root output channels
    ch_groups: int  # channel grouping (group convs): indices are pruned in every group alike
    imp_sorted: np.ndarray  # per-index importance (averaged over channel groups), ascending, float32
    out_deps: list[tuple[str, int]]  # (module, channels of it in this group) pruned on their outputs
    scope_modules: list[str]  # modules whose layer-specific ratio applies, in torch-pruning's look-up order
    order: np.ndarray | None = None  # channel indices, least important first (what a ratio removes first)


@dataclass
class PrunePlan:
    groups: list[PruneGroup] = field(default_factory=list)
    n_dg_groups: int = 0
    module_out: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # module -> [(dg group, count)]
    module_in: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    group_channels: dict[int, int] = field(default_factory=dict)  # dg group -> root channels
    group_root: dict[int, str] = field(default_factory=dict)
    classifier: list[str] = field(default_factory=list)
    ignored_roots: list[str] = field(default_factory=list)  # passed to the executor's ignored_layers
    unpruned: list[dict] = field(default_factory=list)  # {"layer": ..., "reason": ...}
    prunable_modules: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def total_channels(self) -> int:
        return int(sum(len(g.imp_sorted) for g in self.groups))


def _names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def build_pruner(model: nn.Module, example: torch.Tensor, ignored: list[str], *, ratio: float = 0.5,
                 global_pruning: bool = False, round_to: int | None = None,
                 layer_ratios: dict[str, float] | None = None):
    """The MetaPruner configuration both the plan and the executor use. `example`: the model's example input, or
    for a model of several inputs the tuple of them, which torch-pruning feeds positionally (`model(*example)`)."""
    import torch_pruning as tp

    mods = dict(model.named_modules())
    ratio_dict = {mods[n]: r for n, r in (layer_ratios or {}).items()} or None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.enable_grad():
            return tp.pruner.MetaPruner(
                model, example, importance=make_importance(), pruning_ratio=ratio, global_pruning=global_pruning,
                ignored_layers=[mods[n] for n in ignored if n in mods], round_to=round_to, pruning_ratio_dict=ratio_dict,
            )


def plan_pruning(model: nn.Module, example: torch.Tensor, classifier: list[str]) -> tuple[PrunePlan, object]:
    """Enumerate torch-pruning's groups on `model` (unchanged) and compute their importance."""
    plan = PrunePlan(classifier=list(classifier))
    for c in classifier:
        plan.unpruned.append({"layer": c, "reason": "classifier outputs are never pruned"})
    try:
        with time_budget(GRAPH_BUDGET_S):
            pruner = build_pruner(model, example, classifier)
            dg_groups = list(pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                                      root_module_types=pruner.root_module_types))
    except _Budget:
        plan.error = (f"torch-pruning did not finish its dependency graph within {GRAPH_BUDGET_S:g} s "
                      "(DEPLOYFIT_PRUNE_GRAPH_BUDGET_S); the model is left unpruned")
        plan.unpruned.append({"layer": "*", "reason": plan.error})
        return plan, None
    except Exception as exc:  # noqa: BLE001 - torch-pruning cannot trace this model: nothing is pruned
        plan.error = f"torch-pruning cannot build a dependency graph: {type(exc).__name__}: {exc}"
        plan.unpruned.append({"layer": "*", "reason": plan.error})
        return plan, None
    import torch_pruning as tp

    DG = pruner.DG
    names = _names(model)
    prunable_types = tuple(tp.ops.type2class(t) for t in DG.REGISTERED_PRUNERS.keys())
    plan.prunable_modules = [n for n, m in model.named_modules() if n and isinstance(m, prunable_types)]
    plan.n_dg_groups = len(dg_groups)
    plan._dg_groups = dg_groups  # type: ignore[attr-defined]  # kept only while analysing
    plan._pruner = pruner  # type: ignore[attr-defined]
    for gi, group in enumerate(dg_groups):
        root_mod = group[0][0].target.module
        root = names.get(id(root_mod), "?")
        plan.group_root[gi] = root
        plan.group_channels[gi] = int(DG.get_out_channels(root_mod))
        for dep, idxs in group:
            mod = dep.target.module
            if dep.target.type == tp.ops.OPTYPE.PARAMETER:
                continue
            n = names.get(id(mod))
            if n is None:
                continue
            if DG.is_out_channel_pruning_fn(dep.handler):
                plan.module_out.setdefault(n, []).append((gi, len(idxs)))
            elif DG.is_in_channel_pruning_fn(dep.handler):
                plan.module_in.setdefault(n, []).append((gi, len(idxs)))
    return plan, pruner


TRIAL_RATIO = 0.5  # the trial step prunes every group by half: enough to touch every index mapping
TRIAL_ROUNDS = 4  # trial steps, each on a fresh copy ignoring the roots the previous ones failed on


def failing_roots(model: nn.Module, example: torch.Tensor, ignored: list[str]) -> dict[str, str]:
    """Roots of the groups torch-pruning's own step fails on, each with the error: some patterns (a grouped
    convolution after a concatenation) build a dependency graph but crash when pruned. A copy of `model` is
    pruned group by group as `pruner.step()` would (TRIAL_RATIO, `ignored` left alone) and run; the failing
    groups' roots are ignored and the trial repeats on a fresh copy until a step prunes cleanly and the
    pruned copy runs. `{"*": reason}` where that does not happen within TRIAL_ROUNDS steps."""
    failed: dict[str, str] = {}
    try:
        with time_budget(GRAPH_BUDGET_S):
            return _trial_steps(model, example, ignored, failed)
    except _Budget:
        log.warning("the trial pruning step did not finish within %g s: groups it did not reach are assumed "
                    "prunable", GRAPH_BUDGET_S)
        return failed


def _trial_steps(model: nn.Module, example: torch.Tensor, ignored: list[str], failed: dict[str, str]
                 ) -> dict[str, str]:
    for _ in range(TRIAL_ROUNDS):
        trial = copy.deepcopy(model)
        names = _names(trial)
        new: dict[str, str] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = build_pruner(trial, example, ignored + list(failed), ratio=TRIAL_RATIO)
            for group in pruner.step(interactive=True):
                root = names.get(id(group[0][0].target.module), "?")
                try:
                    with torch.no_grad():
                        group.prune()
                except Exception as exc:  # noqa: BLE001 - torch-pruning's own failure is what is recorded
                    first = (str(exc).strip().splitlines() or [""])[0][:200]
                    new[root] = f"torch-pruning fails to prune this group ({type(exc).__name__}: {first})"
        if not new:
            try:
                with torch.no_grad():
                    trial(*as_inputs(example))
                return failed
            except Exception as exc:  # noqa: BLE001
                return {**failed, "*": f"the model pruned by torch-pruning no longer runs ({type(exc).__name__}: "
                                       f"{(str(exc).strip().splitlines() or [''])[0][:200]})"}
        failed.update(new)
    return {**failed, "*": f"torch-pruning still fails after ignoring {len(failed)} groups"}


def finish_plan(plan: PrunePlan, pruner, unfollowed: dict[int, str]) -> PrunePlan:
    """Compute importance for the groups the estimator follows; record why the others stay unpruned."""
    if pruner is None:
        return plan
    import torch_pruning as tp

    DG = pruner.DG
    names = _names(pruner.model)
    for gi, group in enumerate(plan._dg_groups):  # type: ignore[attr-defined]
        root = plan.group_root[gi]
        if any(dep.target.type == tp.ops.OPTYPE.PARAMETER for dep, _ in group):
            unfollowed.setdefault(gi, "the group prunes an unwrapped nn.Parameter, which the estimator does not follow")
        if gi in unfollowed:
            plan.ignored_roots.append(root)
            plan.unpruned.append({"layer": root, "reason": unfollowed[gi]})
            continue
        if not pruner._check_pruning_ratio(group):
            plan.unpruned.append({"layer": root, "reason": "a layer of the group has a single channel"})
            continue
        ch_groups = pruner._get_channel_groups(group)
        with torch.no_grad():
            imp = pruner.estimate_importance(group)
        if imp is None:
            plan.unpruned.append({"layer": root, "reason": "torch-pruning's importance gives no score for this group"})
            continue
        dim_imp = imp.view(ch_groups, -1).mean(dim=0) if ch_groups > 1 else imp
        out_deps, scope = [], []
        for dep, idxs in group:
            for mod, fn in ((dep.source.module, dep.trigger), (dep.target.module, dep.handler)):
                n = names.get(id(mod))
                if n is not None and DG.is_out_channel_pruning_fn(fn) and n not in scope:
                    scope.append(n)
            n = names.get(id(dep.target.module))
            if n is not None and DG.is_out_channel_pruning_fn(dep.handler):
                out_deps.append((n, len(idxs)))
        imp_np = dim_imp.detach().float().cpu().numpy()
        plan.groups.append(PruneGroup(gi, root, plan.group_channels[gi], ch_groups, np.sort(imp_np), out_deps, scope,
                                      np.argsort(imp_np, kind="stable")))
    del plan._dg_groups  # type: ignore[attr-defined]
    del plan._pruner  # type: ignore[attr-defined]
    return plan
