"""analyze: trace a loaded model once into a LayerTable (cached per model spec, input shape and weights)."""
from __future__ import annotations

import logging
import time

from .modelspec import LoadedModel
from .errors import UserInputError
from .pruning import PrunePlan, failing_roots, finish_plan, plan_pruning
from .table import LayerTable, build_table
from .trace import Trace, trace_model

log = logging.getLogger(__name__)
_CACHE: dict[str, LayerTable] = {}
CLASSIFIER_OPS = ("Linear", "Conv1d", "Conv2d", "Conv3d")


def find_classifier(tr: Trace) -> list[str]:
    """The module(s) whose outputs are the model's outputs (walking back through pass-through ops)."""
    found: list[str] = []
    for tid in tr.output_tids:
        row = tr.tensors[tid].producer
        seen = 0
        while row >= 0 and seen < 50:
            r = tr.rows[row]
            if r.is_module and r.op in CLASSIFIER_OPS:
                if r.module_name not in found:
                    found.append(r.module_name)
                break
            if not r.inputs:
                break
            row = tr.tensors[r.inputs[0]].producer
            seen += 1
    return found


def _trial_prune(loaded: LoadedModel, example, classifier: list[str], plan: PrunePlan,
                 unfollowed: dict[int, str]) -> None:
    """Groups torch-pruning builds but cannot prune (pruning.failing_roots) join the groups the estimator does
    not follow: estimate leaves them unpruned and names why, and apply ignores them alike. Where the model
    cannot be pruned at all, every group is."""
    ignored = classifier + [plan.group_root[g] for g in unfollowed]
    failed = failing_roots(loaded.model, example, ignored)
    for gi, root in plan.group_root.items():
        if root in failed:
            unfollowed.setdefault(gi, failed[root])
        elif "*" in failed:
            unfollowed.setdefault(gi, failed["*"])


def analyze(loaded: LoadedModel, use_cache: bool = True) -> LayerTable:
    key = loaded.cache_key
    if use_cache and key in _CACHE:
        return _CACHE[key]
    t0 = time.perf_counter()
    example = loaded.example_input()
    try:
        tr = trace_model(loaded.model, example)
    except UserInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a model the tracer cannot follow: one clean error, not a traceback
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise UserInputError(f"cannot analyse {loaded.spec}: tracing it failed ({type(exc).__name__}: {first}); an "
                             "operator of this model is one the estimators do not handle") from exc
    classifier = find_classifier(tr)
    if loaded.kind == "pt2":
        plan, pruner = PrunePlan(), None
        plan.error = "a .pt2 program has no nn.Module layers for torch-pruning to prune"
        plan.unpruned.append({"layer": "*", "reason": plan.error})
    else:
        plan, pruner = plan_pruning(loaded.model, example, classifier)
    table, unfollowed = build_table(loaded.spec, loaded.input_shape, tr, plan)
    if pruner is not None:
        _trial_prune(loaded, example, classifier, plan, unfollowed)
    finish_plan(plan, pruner, unfollowed)
    table.notes.append(f"analysed in {time.perf_counter() - t0:.2f} s")
    _CACHE[key] = table
    return table
