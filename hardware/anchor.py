"""Anchored latency: candidates predicted relative to the original model measured on the target.

Users always have the original model, and where the target can run it (this machine, or a device through its
worker) it is measured once: its total as the artifact runs (ExportedProgram.module()), every row's time inside the
running model (hardware.timing.row_times: the analysis's own rows, in context), and, where the profile runs INT8,
the original quantized and compiled as INT8 artifacts are. A candidate's latency is then the profile's prediction
for that candidate corrected row by row by the ratio of the original's measured to predicted time for that row
(class by class where the rows differ, as for a student of another architecture), and the time outside the
operators by the same ratio for it. A candidate of `none` predicts exactly the measured original.

Where the original can be pruned, the anchor also measures a probe: the original pruned uniformly by half
(PROBE_STRATEGY), timed the same way in alternation with it. Two measured points per operator class give the
class's time as a line in the profile's prediction (measured = a + b x predicted), which a single ratio cannot:
on a 2-core Xeon at batch 1 the profile's per-operator fixed costs were too large for real networks, so halving
their widths measured 0.45-0.59x where one ratio predicted 0.53-0.70x. A row of a candidate is then the line at its
prediction times the row's own residual at the original (so the original still predicts exactly), and never below
PROBE_FLOOR of what the single ratio gives; the time outside the operators likewise.

A candidate that runs in another runtime than the original's float one (a compiled INT8 graph) is corrected by the
quantized original's measured total against the profile's prediction, and where the probe was quantized and measured
too, by the line through those two totals (Anchor.runtime_line), as a float class is by its two points. Every candidate measured afterwards (apply, run,
the benchmarks) is a truth: the correction of its runtime is refitted from the truths' measured-over-predicted
ratios (a geometric mean shrunk towards 1 by PRIOR_TRUTHS), so the next prediction on this model and target is
better (a closed loop). Anchors and their truths are kept per (model structure, profile, batch) in the cache
($DEPLOYFIT_CACHE_DIR/anchors).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from estimators.table import LayerTable

FLOAT = "float"
PRIOR_TRUTHS = 2.0  # truths' ratios are shrunk towards 1 as if this many truths had measured exactly the prediction
# a row whose measured time is more than this factor from its predicted one is one the profile cannot price (it
# predicts next to nothing for it): its measured time is kept as a fixed time instead of scaling its prediction
FACTOR_RANGE = (0.05, 20.0)
PROBE_STRATEGY = "prune:0.5"  # the second measured point of an anchor: the original pruned uniformly by half
PROBE_FLOOR = 0.2  # a row's two-point prediction is at least this share of its single-ratio prediction
TOTAL_CLASS = "total"  # the one class of an anchor of totals (build_anchor's totals_only)
PROBE_MIN_CHANGE = 0.02  # a class whose predicted time the probe changes less than this share has one point only
# an operator class's line is kept only where its slope is at most this many times the class's single ratio at the
# original: a steeper one comes from a probe that changes the class's prediction too little for its rows' noise
# (concat_group's grouped convolutions at batch 8: 4% in prediction, 18% in measurement, a slope 4.7x the ratio,
# and its pruned candidates predicted at 2.5-4.9x their measured latency); the steepest real one seen was about 1.5x
# (squeezenet1_1 at batch 1, whose widths halved measured 0.59x where one ratio predicted 0.71x). An anchor of
# totals (ONNX Runtime) has one line through two whole-model totals, which no class's noise steepens: not bounded
CLASS_SLOPE_MAX = 3.0


def table_fingerprint(table: LayerTable) -> str:
    """What a latency depends on in a model: its operators and their shapes (not its weights' values)."""
    h = hashlib.sha256(repr((table.names, table.ops, table.kinds, table.in_shapes, table.out_shapes,
                             table.batch)).encode())
    return h.hexdigest()[:16]


def runtime_of(table: LayerTable) -> str:
    """`float` for a table computed in fp32 throughout (as the original runs); else the other compute dtypes it
    uses (`int8`: a compiled INT8 graph), which run in another runtime."""
    other = sorted({str(d) for d in np.array(table.state.xdtype)} - {"fp32"})
    return "+".join(other) if other else FLOAT


@dataclass
class Correction:
    rows: np.ndarray  # multiplies each row's predicted seconds
    outside: float  # multiplies the predicted time outside the operators
    basis: str  # `anchored` or `profile`
    truths: int = 0  # measured candidates of this runtime the correction was refitted with
    fixed_s: float = 0.0  # measured time the profile cannot price (added as it is)
    add_s: np.ndarray | None = None  # per row, seconds added to the scaled prediction (two measured points)
    floor: np.ndarray | None = None  # per row, the least a row's corrected seconds are, per predicted second
    outside_add_s: float = 0.0
    outside_floor: float | None = 0.0  # None: the time outside may be negative (the total floor still holds)
    total_floor: float = 0.0  # the least a candidate's corrected total is, per predicted second (rows and outside)
    alone: float = 1.0  # multiplies rows priced by their kernel's own measured speed (the truths' factor)

    def apply(self, rows: np.ndarray, outside: np.ndarray, alone: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """The corrected seconds of K candidates' rows (K x rows) and of their time outside the operators (K).
        `alone` (K x rows): rows the profile prices by a kernel's own measured speed (a slow kernel the original
        does not run, hardware.latency.LatencyModel.slow_rows); the original's measured-over-predicted ratios say
        nothing of them, so they take the truths' factor alone."""
        out = rows * self.rows
        if self.add_s is not None:
            out = np.maximum(out + self.add_s, rows * self.floor)
        if alone is not None:
            out = np.where(alone, rows * self.alone, out)
        o = outside * self.outside + self.outside_add_s
        if self.outside_floor is not None:
            o = np.maximum(o, outside * self.outside_floor)
        if self.total_floor > 0:
            short = self.total_floor * (rows.sum(-1) + outside) - (out.sum(-1) + o)
            o = o + np.maximum(short, 0.0)
        return out, o + self.fixed_s

    def put_on_lines(self, on: np.ndarray, a_ms: np.ndarray, b: np.ndarray, single: np.ndarray, k: float) -> None:
        """Rows `on` take the line a_ms + b x predicted (ms); the others keep their single ratio `single`; every row
        is floored at PROBE_FLOOR of its single-ratio prediction. `k`: the truths' factor."""
        self.rows = np.where(on, b, single) * k
        self.add_s = np.where(on, a_ms, 0.0) * k / 1e3
        self.floor = PROBE_FLOOR * single * k


@dataclass
class Anchor:
    """The original model measured on a target, against the profile's prediction for it."""

    fingerprint: str
    profile: str  # the profile's name
    profile_hash: str
    batch: int
    names: list[str]  # the original table's rows
    kinds: list[str]  # their latency classes (hardware.latency.latency_kinds)
    measured_rows_ms: list[float]  # per row, as timed in context and brought to the measured total
    predicted_rows_ms: list[float]
    measured_outside_ms: float
    predicted_outside_ms: float
    total_ms: float  # the original as its artifact runs here
    measured_at: str
    where: str  # the machine that measured it
    # the original pruned by PROBE_STRATEGY, measured as the original is: {strategy, total_ms, measured_rows_ms,
    # predicted_rows_ms, measured_outside_ms, predicted_outside_ms}; empty where it could not be (one point only)
    probe: dict[str, Any]
    runtimes: dict[str, dict[str, float]] = field(default_factory=dict)  # other runtimes: {measured_ms, predicted_ms}
    truths: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # where a class line's time at zero prediction goes: `rows`, a fixed cost shared evenly by the class's rows; or
    # `outside`, the time outside the operators, every row taking the line's slope (an anchor of totals only, whose
    # rows are the profile's brought to a measured total: their one line is the whole model's, and its intercept,
    # negative where the runtime's time falls faster with pruning than the profile's, belongs to no row)
    intercept: str = "rows"
    path: str = ""

    # ------------------------------------------------------------------------------------------
    def _priced(self) -> np.ndarray:
        m, p = np.array(self.measured_rows_ms), np.array(self.predicted_rows_ms)
        f = m / np.where(p > 0, p, 1.0)
        return (p > 0) & (f >= FACTOR_RANGE[0]) & (f <= FACTOR_RANGE[1])

    def row_factors(self) -> np.ndarray:
        """Measured over predicted per row; 0 for rows the profile cannot price (their time is fixed_ms)."""
        m, p = np.array(self.measured_rows_ms), np.array(self.predicted_rows_ms)
        return np.where(self._priced(), m / np.where(p > 0, p, 1.0), 0.0)

    def fixed_ms(self) -> float:
        """Measured time the profile cannot price: rows it predicts next to nothing for, and the time outside the
        operators where it predicts none."""
        m = np.array(self.measured_rows_ms)
        out = float(m[~self._priced()].sum())
        return out + (self.measured_outside_ms if self.predicted_outside_ms <= 0 else 0.0)

    def class_factors(self) -> dict[str, float]:
        m, p = np.array(self.measured_rows_ms), np.array(self.predicted_rows_ms)
        kinds, priced = np.array(self.kinds), self._priced()
        out = {}
        for k in set(self.kinds):
            sel = (kinds == k) & priced
            if p[sel].sum() > 0:
                out[k] = float(m[sel].sum() / p[sel].sum())
        return out

    def outside_factor(self) -> float:
        if self.predicted_outside_ms <= 0:
            return 0.0  # the measured outside time is fixed_ms
        return self.measured_outside_ms / self.predicted_outside_ms

    def truth_factor(self, runtime: str) -> tuple[float, int]:
        """The refit from the truths of `runtime`: exp(sum of log(measured / predicted) / (n + PRIOR_TRUTHS))."""
        logs = [math.log(t["measured_ms"] / t["predicted_ms"]) for t in self.truths
                if t["runtime"] == runtime and t["predicted_ms"] > 0 and t["measured_ms"] > 0]
        if not logs:
            return 1.0, 0
        return math.exp(sum(logs) / (len(logs) + PRIOR_TRUTHS)), len(logs)

    def correction(self, table: LayerTable, model) -> Correction:
        """How to correct `table`'s rows as the latency model `model` (hardware.latency.LatencyModel of that table)
        prices them, truths included."""
        corr = self._correction(table, model)
        rt = runtime_of(table)
        corr.alone = self.truth_factor(rt)[0]
        now, priced = (self.runtimes.get(rt) or {}).get("group_slow_ns"), model.slow_kernel_ns(rt)
        if now and priced:  # the slow kernel as timed with the anchor, against the profile's price of it
            corr.alone *= now / priced
        return corr

    def _correction(self, table: LayerTable, model) -> Correction:
        rt = runtime_of(table)
        k, n = self.truth_factor(rt)
        if rt != FLOAT:
            run = self.runtimes.get(rt)
            if run is None or run["predicted_ms"] <= 0:
                return Correction(np.full(table.n, k), k, "anchored" if n else "profile", n)
            f = k * run["measured_ms"] / run["predicted_ms"]
            line = self.runtime_line(rt)
            if line is None:
                return Correction(np.full(table.n, f), f, "anchored", n)
            a, b = line  # the whole graph on the runtime's line, never below PROBE_FLOOR of its single ratio
            return Correction(np.full(table.n, b * k), b * k, "anchored", n, outside_add_s=a * k / 1e3,
                              outside_floor=None, total_floor=PROBE_FLOOR * f)
        lines = self.class_lines()
        o_mul, o_add = self.outside_line()
        o_floor = PROBE_FLOOR * self.outside_factor() * k
        if list(table.names) == self.names:
            f = self.row_factors()
            if lines and self.intercept == "outside":
                return self._outside_line(lines, f, k, n)
            corr = Correction(f * k, o_mul * k, "anchored", n, self.fixed_ms() * k / 1e3,
                              outside_add_s=o_add * k / 1e3, outside_floor=o_floor)
            if lines:  # each row on its class's line, times its own residual at the original
                has, a, b = _per_row(self.kinds, lines)
                at = a + b * np.array(self.predicted_rows_ms)
                on = has & (f > 0) & (at > 0)
                r = np.where(on, np.array(self.measured_rows_ms) / np.where(on, at, 1.0), 0.0)
                corr.put_on_lines(on, r * a, r * b, f, k)
            return corr
        # another architecture (a student): class by class, the whole model's ratio for classes it lacks
        per = self.class_factors()
        priced = self._priced()
        m, p = np.array(self.measured_rows_ms)[priced].sum(), np.array(self.predicted_rows_ms)[priced].sum()
        whole = float(m / p) if p > 0 else 1.0
        rows = np.array([per.get(str(c), whole) for c in model.kinds])
        corr = Correction(rows * k, (o_mul if self.predicted_outside_ms > 0 else whole) * k, "anchored", n,
                          outside_add_s=o_add * k / 1e3, outside_floor=o_floor)
        if lines:
            has, a, b = _per_row([str(c) for c in model.kinds], lines)
            corr.put_on_lines(has, a, b, rows, k)
        return corr

    def _outside_line(self, lines: dict[str, tuple[float, float]], f: np.ndarray, k: float, n: int) -> Correction:
        """The correction of an anchor of totals (intercept `outside`): every priced row at the line's slope, the
        line's intercept as the time outside the operators, and the candidate never below PROBE_FLOOR of its
        single-ratio total."""
        (a, b), = lines.values()
        priced = f > 0
        whole = sum(self.measured_rows_ms) / max(sum(self.predicted_rows_ms) + self.predicted_outside_ms, 1e-12)
        return Correction(np.where(priced, b, 0.0) * k, 0.0, "anchored", n,
                          outside_add_s=a * int(priced.sum()) * k / 1e3, outside_floor=None,
                          total_floor=PROBE_FLOOR * whole * k)

    def class_lines(self) -> dict[str, tuple[float, float]]:
        """Per operator class, the line through the original's and the probe's measured time against the profile's
        prediction: (ms per row at zero prediction, measured per predicted ms). Classes the probe leaves (almost)
        unchanged, whose two points do not slope upwards, or whose slope is over CLASS_SLOPE_MAX times their ratio
        at the original (per-row anchors), are left out (their single ratio holds)."""
        if not self.probe:
            return {}
        m0, p0 = np.array(self.measured_rows_ms), np.array(self.predicted_rows_ms)
        m1, p1 = np.array(self.probe["measured_rows_ms"]), np.array(self.probe["predicted_rows_ms"])
        kinds, priced = np.array(self.kinds), self._priced()
        out = {}
        for c in set(self.kinds):
            sel = (kinds == c) & priced
            M0, M1, P0, P1 = m0[sel].sum(), m1[sel].sum(), p0[sel].sum(), p1[sel].sum()
            if P0 <= 0 or P0 - P1 <= PROBE_MIN_CHANGE * P0 or M0 <= M1:
                continue
            b = (M0 - M1) / (P0 - P1)
            if self.intercept == "rows" and b > CLASS_SLOPE_MAX * M0 / P0:  # not an anchor of totals
                continue
            out[c] = (float((M0 - b * P0) / sel.sum()), float(b))
        return out

    def outside_line(self) -> tuple[float, float]:
        """The time outside the operators as (measured per predicted ms, ms added), through the original and the
        probe where both were measured, the probe changes its prediction and the line does not fall below zero
        before the prediction does; else (outside_factor(), 0)."""
        O0, Q0 = self.measured_outside_ms, self.predicted_outside_ms
        if not self.probe or Q0 <= 0:
            return self.outside_factor(), 0.0
        O1, Q1 = self.probe["measured_outside_ms"], self.probe["predicted_outside_ms"]
        if Q0 - Q1 <= PROBE_MIN_CHANGE * Q0 or O0 <= O1:
            return self.outside_factor(), 0.0
        b = (O0 - O1) / (Q0 - Q1)
        # the time outside is a call's fixed cost and its outputs' allocation, which no candidate takes below zero: a
        # line with a negative intercept comes from the probe's outside time, the difference of its total and its
        # rows' sum, measured short (dw_separable at batch 8: 0.11 ms for the probe, 0.68-0.77 ms for the original
        # and candidates pruned by 0.3 and 0.6, which that line put at 0.08-0.33 ms)
        if O0 - b * Q0 < 0:
            return self.outside_factor(), 0.0
        return float(b), float(O0 - b * Q0)

    def runtime_line(self, runtime: str) -> tuple[float, float] | None:
        """The total of another runtime (a compiled INT8 graph) as a line in the profile's prediction, through the
        quantized original and the quantized probe where both were measured: (ms at zero prediction, measured per
        predicted ms). None where there is one point, or the probe leaves the prediction (almost) unchanged, or the
        two points do not slope upwards (the single ratio holds)."""
        run = self.runtimes.get(runtime) or {}
        if "probe_measured_ms" not in run:
            return None
        M0, P0, M1, P1 = run["measured_ms"], run["predicted_ms"], run["probe_measured_ms"], run["probe_predicted_ms"]
        if P0 <= 0 or P0 - P1 <= PROBE_MIN_CHANGE * P0 or M0 <= M1:
            return None
        b = (M0 - M1) / (P0 - P1)
        return float(M0 - b * P0), float(b)

    # ------------------------------------------------------------------------------------------
    def record_truth(self, compact: str, runtime: str, predicted_ms: float, measured_ms: float) -> None:
        """A measured candidate: `predicted_ms` is its anchored prediction before the truths' refit (so that the
        refit does not chase itself), `measured_ms` its latency on the anchor's scale. Kept with the anchor."""
        if not (predicted_ms > 0 and measured_ms > 0 and math.isfinite(predicted_ms) and math.isfinite(measured_ms)):
            return
        self.truths.append({"compact": compact, "runtime": runtime, "predicted_ms": round(predicted_ms, 6),
                            "measured_ms": round(measured_ms, 6),
                            "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
        if self.path:
            self.save(Path(self.path))

    def summary(self) -> dict[str, Any]:
        """What a report and MLflow record of the anchor."""
        return {"total_ms": round(self.total_ms, 4), "predicted_ms": round(sum(self.predicted_rows_ms)
                                                                         + self.predicted_outside_ms, 4),
                "batch": self.batch, "measured_at": self.measured_at, "where": self.where,
                "runtimes": {k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in self.runtimes.items()},
                "truths": len(self.truths), "fingerprint": self.fingerprint, "notes": list(self.notes),
                "probe": ({"strategy": self.probe["strategy"], "total_ms": round(self.probe["total_ms"], 4),
                           "classes_on_lines": sorted(self.class_lines())} if self.probe else None)}

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        data.pop("path")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)  # atomic: a reader never sees half a file
        self.path = str(path)


def _per_row(kinds: list[str], lines: dict[str, tuple[float, float]]):
    """Per row of classes `kinds`: whether its class has a line (Anchor.class_lines), and the line's (a, b)."""
    has = np.array([c in lines for c in kinds], dtype=bool)
    a = np.array([lines[c][0] if c in lines else 0.0 for c in kinds])
    b = np.array([lines[c][1] if c in lines else 0.0 for c in kinds])
    return has, a, b


def anchor_path(fingerprint: str, profile_hash: str, batch: int) -> Path:
    from .hostprofile import cache_dir

    return cache_dir() / "anchors" / f"{fingerprint}-{profile_hash}-b{batch}.json"


def load_anchor(table: LayerTable, profile, batch: int) -> Anchor | None:
    """The cached anchor of `table`'s model on `profile` at `batch`, where one was measured."""
    from .hostprofile import profile_hash

    return read_anchor(anchor_path(table_fingerprint(table), profile_hash(profile), batch))


def read_anchor(path: Path) -> Anchor | None:
    """The anchor saved at `path`; None where there is none, or one from another version (measured again)."""
    if not path.is_file():
        return None
    try:
        return Anchor(**json.loads(path.read_text()), path=str(path))
    except (ValueError, TypeError):
        return None


def build_anchor(table: LayerTable, profile, batch: int, row_s: list[float] | np.ndarray, total_ms: float,
                 where: str, runtimes: dict[str, dict[str, float]] | None = None,
                 notes: list[str] | None = None,
                 probe: tuple[LayerTable, list[float] | np.ndarray, float] | None = None,
                 probe_strategy: str = PROBE_STRATEGY, totals_only: bool = False) -> Anchor:
    """An anchor from the original's measurement: `row_s`, the seconds of each of its operator rows timed in
    context (hardware.timing.row_times: the table's rows other than parameters, in order) and `total_ms`, the
    artifact's latency. The rows are brought to the total: the time the artifact spends outside them is the total
    less the rows (where the rows, timed with the eager model's own dispatch around them, add up to more than the
    artifact's total, they are scaled down to it and the time outside is the profile's share of the total).
    `probe`: (the estimated table of the original pruned by `probe_strategy`, its rows' seconds, its total in ms),
    measured the same way. `totals_only`: the rows were not timed one by one, only brought to a total (the
    profile's rows scaled to it): they are one class, whose line's intercept is the time outside them
    (Anchor.intercept `outside`); a line per class would only restate the profile's split between classes."""
    from .hostprofile import profile_hash
    from .latency import latency_kinds

    rows, outside, pred = _measured_rows(table, profile, batch, row_s, total_ms)
    point = {}
    if probe is not None:
        p_rows, p_outside, p_pred = _measured_rows(probe[0], profile, batch, probe[1], probe[2])
        point = {"strategy": probe_strategy, "total_ms": float(probe[2]),
                 "measured_rows_ms": [float(x) for x in p_rows],
                 "predicted_rows_ms": [float(x) for x in p_pred.per_row_ms], "measured_outside_ms": float(p_outside),
                 "predicted_outside_ms": float(p_pred.outside_ms)}
    kinds = [TOTAL_CLASS] * table.n if totals_only else latency_kinds(table)
    return Anchor(table_fingerprint(table), profile.name, profile_hash(profile), batch, list(table.names),
                  [str(k) for k in kinds], [float(x) for x in rows], [float(x) for x in pred.per_row_ms],
                  float(outside), float(pred.outside_ms), float(total_ms),
                  _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), where, point, dict(runtimes or {}),
                  notes=list(notes or []), intercept="outside" if totals_only else "rows")


def _measured_rows(table: LayerTable, profile, batch: int, row_s, total_ms: float):
    """(every row's measured ms brought to the total, the measured ms outside the rows, the profile's prediction)."""
    from .latency import predict_latency

    pred = predict_latency(table, profile, batch)
    ops = np.array(table.kinds) != "param"
    row_s = np.asarray(row_s, dtype=float)
    if len(row_s) != int(ops.sum()):
        raise RuntimeError(f"timed {len(row_s)} operators, the analysis has {int(ops.sum())}")
    rows = np.zeros(table.n)
    rows[ops] = row_s * 1e3
    total = float(total_ms)
    outside = total - rows.sum()
    if -1e-9 * total <= outside < 0:  # rows brought to the total exactly, but for rounding
        outside = 0.0
    if outside < 0 or rows.sum() <= 0:
        share = pred.outside_ms / pred.latency_ms if pred.latency_ms > 0 else 0.0
        outside = total * share
        rows = rows * (total - outside) / max(rows.sum(), 1e-12)
    return rows, outside, pred
