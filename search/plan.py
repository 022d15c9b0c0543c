"""The plan: every candidate of the space estimated (size, params, MACs, memory, latency on the target,
accuracy drop), the feasible ones ranked by predicted accuracy drop, the Pareto front over (latency,
accuracy drop, size), which requirements bind the recommendation, and, when nothing fits, the nearest
feasible relaxation.

The space, in the order distill -> prune -> quantize, each optional:
  students   the model itself, the model at width multipliers (distilled), and `students` (model specs)
  pruning    ratios on a fine grid (`grid_step`, default 0.01 up to 0.90), uniform and global, uniform with
             round_to the profile's channel multiple, and per-layer ratios allocated by sensitivity: for
             each trade-off lambda every group takes the ratio that minimises its predicted loss minus lambda
             x the latency (or size) it saves, so less sensitive groups are pruned harder. With `round_to`
             (a runtime whose fast kernels need channel counts in multiples of it: ONNX Runtime), every
             pruning candidate, NSGA-II's included, keeps its channel counts multiples of it
  quantize   only the dtypes the hardware profile runs fast (no INT8 for a device without fast INT8)
That structured space is evaluated exhaustively. Free per-layer ratios (up to 19 levels per group: 19^G
candidates) are searched by NSGA-II (search.nsga), seeded with the structured space's best, with the
requirements as constraints and (latency, accuracy drop, size) as objectives.

Candidates of one student and one quantization differ only in the channels their groups keep: they are
evaluated as matrices by search.batch.BatchEvaluator, tens of thousands per second.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from estimators.compress import estimate
from estimators.methods.prune import counts_for_ratios, prune_counts
from estimators.methods.quantize import DTYPES as STRATEGY_DTYPES, SINGLE_INPUT_DTYPES
from estimators.modelspec import n_inputs
from estimators.progress import status, step
from estimators.strategy import DistillStep, PruneStep, QuantizeStep, Strategy
from estimators.table import LayerTable
from hardware.profile import HardwareProfile

from .batch import BatchEvaluator
from .requirements import LIMITS, Requirements
from .results import Binding, Infeasible, PlannedCandidate, PlanReport, Prediction


def ratio_grid(step: float) -> tuple[float, ...]:
    """Pruning ratios from `step` to 0.90 in steps of `step`."""
    n = int(round(0.90 / step))
    return tuple(round(step * i, 4) for i in range(1, n + 1))


GRID_STEP = 0.01
LEVEL = 0.05  # per-layer ratios move in steps of this (0 .. 0.90: 19 levels)
LEVELS = np.round(np.arange(0, 0.90 + 1e-9, LEVEL), 4)
WIDTHS = (0.75, 0.5)
# the dtypes the search tries: every quantize step's dtype but weight-only INT8, which quantizes Linear layers
# only (a user asks for it by name)
QUANT_DTYPES = tuple(d for d in STRATEGY_DTYPES if d != "int8-weight-only")
OBJECTIVES = ("latency_ms", "accuracy_drop", "size_bytes")
METRICS = ("params", "size_bytes", "macs", "flops", "memory_access_bytes", "peak_memory_bytes", "latency_ms")
NSGA_EVALS = 10000
LAMBDAS = 160


class Scorer(Protocol):
    """Predicted accuracy drop (or a proxy) of K candidates of one strategy shape: estimators.accuracy's
    ProxyScorer and DropScorer."""

    unit: str

    def __call__(self, strategy: Strategy, est: LayerTable, kept: np.ndarray) -> np.ndarray: ...

    def group_curves(self, table: LayerTable, ratios: np.ndarray) -> np.ndarray: ...


def quantize_dtypes(profile: HardwareProfile, table: LayerTable | None = None) -> list[str]:
    """Dtypes worth proposing: those the device runs fast (a slow one only costs what it saves), and for a model
    of several inputs (`table`'s) only those it can be executed in (estimators.strategy.check_executable)."""
    several = table is not None and n_inputs(table.input_shape) > 1
    return [d for d in QUANT_DTYPES if d in profile.fast_dtypes and not (several and d in SINGLE_INPUT_DTYPES)]


@dataclass
class Family:
    """Candidates sharing a student and a quantization: one BatchEvaluator."""

    distill: DistillStep | None
    quant: QuantizeStep | None
    table: LayerTable  # the student (teacher, teacher at a width, or another model), unquantized
    evaluator: BatchEvaluator

    def strategy(self, prune: PruneStep | None) -> Strategy:
        return Strategy(steps=[s for s in (self.distill, prune, self.quant) if s is not None])


@dataclass
class Pool:
    """Every evaluated candidate: its family, its pruning (a descriptor), kept channels and predictions."""

    families: list[Family]
    fam: list[np.ndarray] = field(default_factory=list)
    desc: list = field(default_factory=list)
    kept: list[np.ndarray] = field(default_factory=list)
    metrics: list[dict[str, np.ndarray]] = field(default_factory=list)

    def add(self, fi: int, descs: list, kept: np.ndarray, scorer: Scorer) -> dict[str, np.ndarray]:
        f = self.families[fi]
        m = f.evaluator(kept)
        # one strategy shape per block: with or without a pruning step (decides who trains)
        has = np.array([d is not None for d in descs])
        drop = np.zeros(len(descs))
        for flag in (False, True):
            sel = has == flag
            if sel.any():
                shape = f.strategy(PruneStep(ratio=0.5) if flag else None)
                drop[sel] = scorer(shape, f.table, kept[sel])
        m["accuracy_drop"] = drop
        self.fam.append(np.full(len(descs), fi))
        self.desc.extend(descs)
        self.kept.append(kept)
        self.metrics.append(m)
        return m

    def arrays(self) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        fam = np.concatenate(self.fam)
        kept = np.concatenate(self.kept)
        m = {k: np.concatenate([x[k] for x in self.metrics]) for k in self.metrics[0]}
        return fam, kept, m


def layer_step(table: LayerTable, ratios: np.ndarray, round_to: int | None = None) -> PruneStep:
    """A per-layer PruneStep giving each followed group (plan order) its ratio: keyed by the first module of
    the group's torch-pruning look-up order, so the executor's pruning_ratio_dict finds the same ratio."""
    rs = [round(float(r), 4) for r in ratios]
    if len(set(rs)) == 1:
        return PruneStep(ratio=rs[0], scope="uniform", round_to=round_to)
    return PruneStep(ratio=0.0, scope="uniform", round_to=round_to,
                     layers={g.scope_modules[0]: r for g, r in zip(table.plan.groups, rs) if r > 0})


def _prune_step(table: LayerTable, desc) -> PruneStep | None:
    """The PruneStep a candidate's pruning descriptor stands for (per-layer ones keyed on `table`'s groups)."""
    if desc is None:
        return None
    kind = desc[0]
    if kind == "uniform":
        return PruneStep(ratio=desc[1], scope="uniform")
    if kind == "global":
        return PruneStep(ratio=desc[1], scope="global", round_to=desc[2] if len(desc) > 2 else None)
    if kind == "round_to":
        return PruneStep(ratio=desc[1], scope="uniform", round_to=desc[2])
    return layer_step(table, np.array(desc[1]), desc[2] if len(desc) > 2 else None)


def _kept_for(table: LayerTable, P: np.ndarray) -> np.ndarray:
    kept = np.tile(table.state.kept, (len(P), 1))
    gidx = np.array([g.index for g in table.plan.groups], dtype=np.int64)
    if len(gidx):
        kept[:, gidx] -= P
    return kept


def layer_levels(scorer: Scorer) -> np.ndarray:
    """Per-layer ratios the search may give one group: LEVELS up to what the scorer really measured (the
    sensitivity probes reach 0.75; past that a group's curve is only interpolated toward chance, and a
    search would exploit that guess: one group pruned to 10% recovered far worse than predicted)."""
    top = getattr(scorer, "max_layer_ratio", float(LEVELS[-1]))
    return LEVELS[LEVELS <= top + 1e-9]


def allocations(table: LayerTable, scorer: Scorer, base_eval: BatchEvaluator, n_lambda: int = LAMBDAS) -> np.ndarray:
    """Per-layer ratios allocated by sensitivity (rows: allocations, columns: followed groups).

    For a trade-off lambda every group takes, from layer_levels(scorer), the ratio minimising its own predicted loss
    (the scorer's single-group curve) minus lambda x what that ratio saves alone (latency, then size, in
    shares of the unpruned model): the cheapest accuracy per unit of gain first. Sweeping lambda runs from
    no pruning to the heaviest; distinct allocations are returned."""
    groups = table.plan.groups
    G = len(groups)
    if not G:
        return np.zeros((0, 0))
    levels = layer_levels(scorer)
    loss = scorer.group_curves(table, levels)  # G x levels
    # what each group saves alone at each level, from the evaluator (G x levels batch)
    R = np.zeros((G * len(levels), G))
    for j in range(G):
        R[j * len(levels):(j + 1) * len(levels), j] = levels
    kept = _kept_for(table, counts_for_ratios(table, R))
    m = base_eval(kept)
    base = base_eval(table.state.kept[None, :])
    out = []
    for metric in ("latency_ms" if "latency_ms" in m else "macs", "size_bytes"):
        gain = ((base[metric][0] - m[metric]) / max(base[metric][0], 1e-30)).reshape(G, len(levels))
        gain = np.maximum(gain, 0.0)
        # lambda spans the loss-per-gain ratios of the groups' levels
        with np.errstate(divide="ignore", invalid="ignore"):
            slopes = loss[:, 1:] / gain[:, 1:]
        slopes = slopes[np.isfinite(slopes) & (slopes > 0)]
        if not len(slopes):
            continue
        lams = np.geomspace(slopes.min() / 2, slopes.max() * 2, n_lambda)
        for lam in lams:
            pick = np.argmin(loss - lam * gain + 1e-12 * levels[None, :], axis=1)
            out.append(levels[pick])
    if not out:
        return np.zeros((0, G))
    arr = np.unique(np.round(np.array(out), 4), axis=0)
    return arr[arr.sum(1) > 0]


def build_families(table: LayerTable, profile: HardwareProfile, batch: int, students: tuple[str, ...] = (),
                   student_tables: dict[str, LayerTable] | None = None,
                   widths: tuple[float, ...] = WIDTHS, anchor=None) -> list[Family]:
    """The search's families (a student and a quantization each); `anchor`: the original measured on the target
    (hardware.anchor), which corrects every family's latency."""
    prunable = bool(table.plan.groups)
    distills: list[tuple[DistillStep | None, LayerTable]] = [(None, table)]
    if prunable:
        for w in widths:
            d = DistillStep(student=f"width:{w:g}")
            distills.append((d, estimate(table, Strategy(steps=[d]))))
    for s in students:
        st = (student_tables or {}).get(s)
        if st is None:
            raise ValueError(f"student {s!r} has no analysed table")
        distills.append((DistillStep(student=s), st))
    fams = []
    for d, base in distills:
        for q in [None] + [QuantizeStep(dtype=x) for x in quantize_dtypes(profile, table)]:
            qt = base if q is None else estimate(base, Strategy(steps=[q]))
            fams.append(Family(d, q, base, BatchEvaluator(qt, profile, batch, anchor=anchor)))
    return fams


def structured(fams: list[Family], profile: HardwareProfile, grid: tuple[float, ...],
               alloc: np.ndarray | None, round_to: int | None = None) -> list[tuple[int, list, np.ndarray]]:
    """(family, descriptors, kept) blocks of the structured space; `round_to`: every pruning candidate keeps its
    channel counts multiples of it (the uniform ones as `round_to` descriptors)."""
    blocks = []
    rt = (round_to,) if round_to else ()
    m = profile.channel_multiple
    for fi, f in enumerate(fams):
        t = f.table
        descs: list = [None]
        Ps = [np.zeros((1, len(t.plan.groups)), dtype=np.int64)]
        if t.plan.groups:
            width = f.distill is not None and f.distill.width is not None
            g = np.array(grid)
            if not width:  # a width student pruned uniformly is another width: the widths and grid cover it
                R = np.repeat(g[:, None], len(t.plan.groups), 1)
                descs += [("round_to", r, round_to) if round_to else ("uniform", r) for r in grid]
                Ps.append(counts_for_ratios(t, R, round_to=round_to))
                if m and m > 1 and m != round_to and (not round_to or m % round_to == 0):
                    descs += [("round_to", r, m) for r in grid]
                    Ps.append(counts_for_ratios(t, R, round_to=m))
            descs += [("global", r, *rt) for r in grid]
            Ps.append(np.array([prune_counts(t, PruneStep(ratio=r, scope="global", round_to=round_to)) for r in grid]))
            if f.distill is None and alloc is not None and len(alloc):
                descs += [("layers", tuple(a), *rt) for a in alloc]
                Ps.append(counts_for_ratios(t, alloc, round_to=round_to))
        blocks.append((fi, descs, _kept_for(t, np.concatenate(Ps))))
    return blocks


def _violation_ratios(m: dict[str, np.ndarray], req: Requirements, unit: str) -> dict[str, np.ndarray]:
    """Requirement -> predicted value / limit, per candidate (accuracy skipped for a proxy)."""
    out = {}
    for name, limit in req.active().items():
        metric, _, factor = LIMITS[name]
        if name == "max_accuracy_drop" and unit == "proxy":
            continue
        out[name] = m[metric] / (limit * factor)
    return out


def nsga(fams: list[Family], pool: Pool, scorer: Scorer, req: Requirements, evals: int, seeds: np.ndarray,
         seed_q: np.ndarray, seed: int = 0, progress: Callable[[str], None] = lambda m: None,
         round_to: int | None = None) -> int:
    """NSGA-II (search.nsga) over free per-layer ratios (layer_levels per followed group) and the quantization, for
    the model itself (no distillation); `round_to`: channel counts kept multiples of it. Every evaluated candidate
    goes into the pool. Returns evaluations."""
    from .nsga import minimize

    own = [i for i, f in enumerate(fams) if f.distill is None]
    table = fams[own[0]].table
    G = len(table.plan.groups)
    if not G or evals <= 0:
        return 0
    levels = layer_levels(scorer)
    n_lev = len(levels)
    names = [n for n in req.active() if not (n == "max_accuracy_drop" and scorer.unit == "proxy")]
    done = {"n": 0}

    def evaluate(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        F = np.zeros((len(X), 3))
        Gc = np.zeros((len(X), max(len(names), 1))) - 1.0
        for qi, fi in enumerate(own):
            sel = np.flatnonzero(X[:, G] == qi)
            if not len(sel):
                continue
            R = levels[X[sel, :G]]
            kept = _kept_for(table, counts_for_ratios(table, R, round_to=round_to))
            m = pool.add(fi, [("layers", tuple(r), *((round_to,) if round_to else ())) for r in R], kept, scorer)
            F[sel] = np.stack([m[o] for o in OBJECTIVES], 1)
            v = _violation_ratios(m, req, scorer.unit)
            for j, n in enumerate(names):
                Gc[sel, j] = v[n] - 1.0
        done["n"] += len(X)
        counted.update(done["n"])
        return F, Gc

    pop = max(40, min(200, evals // 20))
    X0 = np.concatenate([np.clip(np.round(seeds / LEVEL), 0, n_lev - 1), seed_q[:, None]], 1).astype(np.int64) \
        if len(seeds) else np.zeros((0, G + 1), dtype=np.int64)
    rng = np.random.default_rng(seed)
    if len(X0) < pop:
        rand = np.concatenate([rng.integers(0, n_lev, (pop - len(X0), G)), rng.integers(0, len(own), (pop - len(X0), 1))], 1)
        X0 = np.concatenate([X0, rand])
    with step(progress, "NSGA-II", evals, "per-layer candidates") as counted:  # evaluate() updates it
        n = minimize(evaluate, np.zeros(G + 1), np.array([n_lev - 1] * G + [len(own) - 1]), X0, pop, evals, seed=seed)
        counted.finish(done=n)
    return n


def pareto_mask(F: np.ndarray) -> np.ndarray:
    """Rows no other row beats on every objective (minimised) while being strictly better on one."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    mask = np.zeros(len(F), dtype=bool)
    if len(F):
        mask[NonDominatedSorting().do(F, only_non_dominated_front=True)] = True
    return mask


def _fmt_limit(name: str, value: float) -> str:
    metric, _, unit = LIMITS[name]
    v = value / unit
    return {"max_latency_ms": f"{v:.3g} ms", "max_size_mb": f"{v:.3g} MB", "max_memory_mb": f"{v:.3g} MB peak memory",
            "max_accuracy_drop": f"{v:.2f} points of accuracy", "max_params": f"{v:,.0f} parameters",
            "max_macs": f"{v:,.0f} MACs"}[name]


def _round_pred(m: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Predictions rounded as reported, so that ranking and the Pareto front use the numbers the user sees."""
    out = dict(m)
    for k in ("latency_ms", "accuracy_drop"):
        if k in out:
            out[k] = np.round(out[k], 4)
    return out


def plan(table: LayerTable, profile: HardwareProfile, req: Requirements, scorer: Scorer, top_k: int = 5,
         students: tuple[str, ...] = (), student_tables: dict[str, LayerTable] | None = None,
         progress: Callable[[str], None] = lambda m: None, grid_step: float = GRID_STEP,
         nsga_evals: int = NSGA_EVALS, seed: int = 0, keep_candidates: bool = False, anchor=None,
         round_to: int | None = None) -> PlanReport:
    """`keep_candidates`: also return the whole space as columns (`candidates`: strategy, label and every
    prediction per distinct candidate), for tracking. `anchor`: the original measured on the target at the
    requirements' batch (hardware.anchor): latencies are anchored on it (each candidate's `latency_basis`).
    `round_to`: every pruning candidate keeps its channel counts multiples of it (the module docstring)."""
    t0 = time.perf_counter()
    if anchor is not None and anchor.batch != req.batch_size:
        raise ValueError(f"the anchor was measured at batch {anchor.batch}, the requirements are for {req.batch_size}")
    with status(progress, "estimating the structured candidates", line=False):  # a spinner on a terminal
        fams = build_families(table, profile, req.batch_size, students, student_tables, anchor=anchor)
        pool = Pool(fams)
        own0 = next(i for i, f in enumerate(fams) if f.distill is None and f.quant is None)
        alloc = allocations(table, scorer, fams[own0].evaluator) if table.plan.groups else None
        for fi, descs, kept in structured(fams, profile, ratio_grid(grid_step), alloc, round_to):
            pool.add(fi, descs, kept, scorer)
    n_struct = sum(len(k) for k in pool.kept)
    t_struct = time.perf_counter() - t0
    progress(f"{n_struct} structured candidates estimated in {t_struct:.2f} s")
    n_nsga = 0
    if nsga_evals > 0 and table.plan.groups:
        # seeds: the structured candidates of the model itself with per-group ratios on LEVELS, best first
        fam, kept, m = pool.arrays()
        own = [i for i, f in enumerate(fams) if f.distill is None]
        viol = _violation_ratios(_round_pred(m), req, scorer.unit)
        worst = np.max(np.stack(list(viol.values())), 0) if viol else np.zeros(len(fam))
        order = np.lexsort((m["latency_ms"], m["accuracy_drop"], np.maximum(worst, 1.0)))
        seeds, seed_q = [], []
        uniform = ("uniform", "round_to") if round_to else ("uniform",)  # with round_to, its descriptors are uniform
        for i in order:
            d = pool.desc[i]
            if fam[i] not in own or d is None or d[0] not in (*uniform, "layers") or \
                    (d[0] == "round_to" and d[2] != round_to):
                continue
            R = np.full(len(table.plan.groups), d[1]) if d[0] in uniform else np.array(d[1])
            if np.allclose(np.round(R / LEVEL) * LEVEL, R) and R.max() <= layer_levels(scorer)[-1] + 1e-9:
                seeds.append(R)
                seed_q.append(own.index(int(fam[i])))
            if len(seeds) >= 60:
                break
        n_nsga = nsga(fams, pool, scorer, req, nsga_evals, np.array(seeds).reshape(-1, len(table.plan.groups)),
                      np.array(seed_q, dtype=np.int64), seed=seed, progress=progress, round_to=round_to)
    seconds = time.perf_counter() - t0
    return _report(table, profile, req, scorer, pool, top_k, seconds, n_struct, n_nsga, t_struct, keep_candidates)


def _report(table: LayerTable, profile: HardwareProfile, req: Requirements, scorer: Scorer, pool: Pool, top_k: int,
            seconds: float, n_struct: int, n_nsga: int, t_struct: float, keep_candidates: bool = False) -> PlanReport:
    fam, kept, m = pool.arrays()
    n_eval = len(fam)
    # distinct candidates: same student, quantization and kept channels predict the same; keep the first
    key = np.concatenate([fam[:, None], kept], 1)
    _, first = np.unique(key, axis=0, return_index=True)
    idx = np.sort(first)
    fam, kept = fam[idx], kept[idx]
    m = _round_pred({k: v[idx] for k, v in m.items()})
    desc = [pool.desc[i] for i in idx]
    viol = _violation_ratios(m, req, scorer.unit)
    V = np.stack(list(viol.values()), 1) if viol else np.zeros((len(idx), 0))
    breaks = V > 1.0 + 1e-9
    feasible = ~breaks.any(1)
    rank = np.lexsort((m["size_bytes"], m["latency_ms"], np.round(m["accuracy_drop"], 6)))  # best first
    pos = np.empty(len(rank), dtype=np.int64)
    pos[rank] = np.arange(len(rank))

    def row(i: int, full: bool = True) -> PlannedCandidate:
        f = pool.families[fam[i]]
        d = desc[i]
        step = _prune_step(f.table, d)
        strat = f.strategy(step)
        pred = {}
        for k in METRICS + ("accuracy_drop",):
            if k in m:
                v = float(m[k][i])
                pred[k] = int(v) if k != "latency_ms" and k != "accuracy_drop" and v.is_integer() else round(v, 4)
        return PlannedCandidate(
            compact=strat.compact(), label=strat.label(), pred=Prediction(**pred),
            latency_basis=f.evaluator.correction.basis if f.evaluator.correction is not None else "profile",
            strategy=strat.model_dump(exclude_none=True) if full else None)

    F = np.stack([m[o] for o in OBJECTIVES], 1)
    front = np.flatnonzero(pareto_mask(F))
    front = front[np.argsort(pos[front])]
    out: dict[str, Any] = {
        "candidates_evaluated": int(n_eval), "distinct_candidates": int(len(idx)), "seconds": round(seconds, 3),
        "candidates_per_second": round(n_eval / max(seconds, 1e-9), 1),
        "search": {"structured": int(n_struct), "structured_seconds": round(t_struct, 3), "nsga2": int(n_nsga)},
        "hardware": profile.name, "requirements": req.model_dump(exclude_none=True), "accuracy_unit": scorer.unit,
        "pareto": [row(i, full=False) for i in front]}  # compact strategies: the front can hold hundreds
    if keep_candidates:
        rows = [row(int(i), full=False) for i in rank]
        cols: dict[str, list] = {"strategy": [r.compact for r in rows], "label": [r.label for r in rows]}
        for k in rows[0].pred.given() if rows else []:
            cols[k] = [r.pred.get(k) for r in rows]
        cols["latency_basis"] = [r.latency_basis for r in rows]
        cols["feasible"] = [bool(feasible[i]) for i in rank]
        out["candidates"] = cols
    names = list(viol)
    if feasible.any():
        feas = rank[feasible[rank]]
        rec = int(feas[0])
        better = pos < pos[rec]
        counts = {n: int((breaks[better, j]).sum()) for j, n in enumerate(names) if (breaks[better, j]).any()}
        return PlanReport(**out, recommended=row(rec), top=[row(int(i)) for i in feas[:top_k]],
                          binding=[Binding(requirement=n, limit=req.active()[n], candidates_excluded=c)
                                   for n, c in sorted(counts.items(), key=lambda kv: -kv[1])])
    return PlanReport(**out, **_infeasible(m, V, breaks, names, pos, rank, req, row, top_k))


def _infeasible(m: dict[str, np.ndarray], V: np.ndarray, breaks: np.ndarray, names: list[str], pos: np.ndarray,
                rank: np.ndarray, req: Requirements, row: Callable[[int], PlannedCandidate], top_k: int) -> dict[str, Any]:
    """Where nothing fits: the candidate that breaks the requirements least (largest ratio over its limit), which
    requirements are out of reach (alone or only together), and the candidates that miss only the predicted
    accuracy, which executing them settles."""
    worst = V.max(1)
    i = int(np.lexsort((pos, worst))[0])
    broken = [n for j, n in enumerate(names) if breaks[i, j]]
    relaxed = {n: float(m[LIMITS[n][0]][i]) / LIMITS[n][2] for n in broken}
    lim = {n: _fmt_limit(n, req.active()[n] * LIMITS[n][2]) for n in broken}
    # a requirement some candidate meets is out of reach only together with the others
    together = [n for n in broken if not breaks[:, names.index(n)].all()]
    words = [f"{lim[n]} is not reachable" for n in broken if n not in together or len(together) == 1]
    if len(together) > 1:
        words.append(f"{' and '.join(lim[n] for n in together)} are not reachable together")
    kept_req = [_fmt_limit(n, v * LIMITS[n][2]) for n, v in req.active().items() if n not in broken]
    nearest = ", ".join(_fmt_limit(n, v * LIMITS[n][2]) for n, v in relaxed.items())
    r = row(i)
    msg = f"{' and '.join(words)}{' within ' + ', '.join(kept_req) if kept_req else ''}; the nearest is {nearest} " \
          f"with {r.label}"
    # accuracy is the one prediction no formula gives: candidates that meet every other requirement miss only by
    # the accuracy predictor's word, and executing them settles it (flows.pipeline: one that meets every
    # requirement as measured is recommended)
    verify = []
    if "max_accuracy_drop" in names:
        others = np.delete(breaks, names.index("max_accuracy_drop"), axis=1)
        verify = [row(int(k)) for k in rank[~others[rank].any(1)][:top_k]]  # least predicted drop first
        if verify:
            one = len(verify) == 1
            msg += f"; {len(verify)} candidate{' meets' if one else 's meet'} every other requirement and " \
                   f"miss{'es' if one else ''} only the predicted accuracy: executing {'it' if one else 'them'} " \
                   "checks it"
    return dict(recommended=None, top=[], binding=[Binding(requirement=n, limit=req.active()[n]) for n in broken],
                verify=verify, infeasible=Infeasible(message=msg, unreachable=sorted(broken), relaxed=relaxed, nearest=r))


def candidate_space(table: LayerTable, profile: HardwareProfile, students: tuple[str, ...] = (),
                    student_tables: dict[str, LayerTable] | None = None, grid_step: float = 0.05) -> list[Strategy]:
    """The structured space's strategies (without the sensitivity allocations, which need a scorer)."""
    fams = build_families(table, profile, 1, students, student_tables)
    out = []
    for fi, descs, _ in structured(fams, profile, ratio_grid(grid_step), None):
        for d in descs:
            out.append(fams[fi].strategy(_prune_step(fams[fi].table, d)))
    return out
