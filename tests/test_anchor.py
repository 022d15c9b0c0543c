"""Anchored latency: the original measured on this machine corrects every candidate's prediction row by row; the
single prediction is the batch evaluator's K = 1 case; measured candidates refit the correction (closed loop)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from estimators.analyze import analyze
from estimators.compress import estimate
from estimators.modelspec import LoadedModel, load_model
from estimators.strategy import Strategy, parse_strategy
from estimators.table import METRICS, evaluate, totals
from hardware.anchor import CLASS_SLOPE_MAX, PROBE_FLOOR, PROBE_STRATEGY, build_anchor, load_anchor, runtime_of
from hardware.latency import LatencyModel, predict_latency
from hardware.profile import load_profile
from search.batch import BatchEvaluator
from hosts import seed_host


def own_cache(tmp_path, monkeypatch) -> None:
    """A cache of the test's own (this machine's host profile seeded), so that the anchors and truths it records
    are not another test's."""
    monkeypatch.setenv("DEPLOYFIT_CACHE_DIR", str(tmp_path / "cache"))
    seed_host()


def _loaded(model: nn.Module, shape: tuple[int, ...], spec: str) -> LoadedModel:
    return LoadedModel(spec=spec, kind="factory", model=model.eval(), input_shape=shape)


class OneHeavyConv(nn.Module):
    """Small rows around one convolution that costs far more than all of them together."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.heavy = nn.Conv2d(8, 96, 5, padding=2)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(96, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.act(self.heavy(self.stem(x)))), 1))


class HeavyBranch(nn.Module):
    """A residual block whose second branch holds the heavy convolution, then a concatenation."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.heavy = nn.Conv2d(4, 188, 7, padding=3)
        self.c = nn.Conv2d(192, 16, 1)  # channels aligned to oneDNN's block: no slow reorder

    def forward(self, x):
        y = torch.relu(self.a(x)) + x
        z = self.heavy(self.b(y))
        return self.c(torch.cat([y, z], 1)).mean((2, 3))


@pytest.mark.slow  # profiles timed runs of each network
@pytest.mark.parametrize("net,shape", [(OneHeavyConv, (1, 3, 40, 40)), (HeavyBranch, (1, 4, 32, 32))])
def test_measured_rows_map_onto_the_tables_rows(net, shape):
    """Every operator timed in the running model lands on its row of the analysis: the row that costs most is the
    heavy convolution, parameters cost nothing, and the rows and the time outside them add up to the total."""
    from tasks.anchoring import measure_anchor

    torch.manual_seed(0)
    loaded = _loaded(net(), shape, f"test:{net.__name__}")
    table = analyze(loaded)
    prof = load_profile("host")
    threads = torch.get_num_threads()
    # one thread: on a shared 2-core machine another process's load stalls every parallel kernel by a time slice
    torch.set_num_threads(1)
    try:
        anchor = measure_anchor(loaded, table, prof, 1, int8=False)
    finally:
        torch.set_num_threads(threads)
    rows = np.array(anchor.measured_rows_ms)
    assert anchor.names == list(table.names) and len(rows) == table.n
    assert table.names[int(np.argmax(rows))] == "heavy"
    params = np.array(table.kinds) == "param"
    assert (rows[params] == 0).all() and (rows[~params] > 0).all()
    assert rows.sum() + anchor.measured_outside_ms == pytest.approx(anchor.total_ms, rel=1e-9)
    # the original itself predicts exactly what was measured
    assert predict_latency(table, prof, 1, anchor=anchor).latency_ms == pytest.approx(anchor.total_ms, rel=1e-9)
    # the second point: the original pruned by half, its rows mapped onto the same rows and adding up to its total
    probe = anchor.probe
    assert probe["strategy"] == PROBE_STRATEGY and len(probe["measured_rows_ms"]) == table.n
    p_rows = np.array(probe["measured_rows_ms"])
    assert (p_rows[params] == 0).all() and (p_rows[~params] > 0).all()
    assert p_rows.sum() + probe["measured_outside_ms"] == pytest.approx(probe["total_ms"], rel=1e-9)
    assert table.names[int(np.argmax(p_rows))] == "heavy"


def _anchor(table, prof, batch=1, seed=0, probe=False):
    """An anchor from row times made up for the test (each row 0.5-3x its prediction), deterministic; `probe`: with
    a second point, the original pruned by half, whose rows are made up alike."""
    rng = np.random.default_rng(seed)
    ops = np.array(table.kinds) != "param"

    def made_up(t):
        pred = predict_latency(t, prof, batch)
        rows = pred.per_row_ms[ops] / 1e3 * rng.uniform(0.5, 3.0, int(ops.sum()))
        rows[0] = 0.0  # a row measured at nothing: not a factor, its time is fixed
        return rows, (rows.sum() * 1e3 + pred.outside_ms) * 1.3

    rows, total = made_up(table)
    point = None
    if probe:
        half = estimate(table, parse_strategy(PROBE_STRATEGY))
        point = (half, *made_up(half))
    q = predict_latency(estimate(table, Strategy.model_validate({"steps": [{"method": "quantize", "dtype": "int8"}]})),
                        prof, batch).latency_ms
    return build_anchor(table, prof, batch, rows, total, "test", {"int8": {"measured_ms": q * 0.6, "predicted_ms": q}},
                        probe=point)


@pytest.mark.parametrize("probe", [False, True], ids=["one point", "two points"])
@pytest.mark.parametrize("spec,shape", [("demo:digits-resnet", None), ("torchvision:mobilenet_v2", "1,3,32,32")])
def test_anchored_correction_is_exact_for_the_original_and_the_batch_path_equals_the_single(spec, shape, probe):
    table = analyze(load_model(spec, input_shape=shape))
    prof = load_profile("host")
    for batch in (1, 8):
        anchor = _anchor(table, prof, batch, probe=probe)
        assert bool(anchor.probe) == probe and bool(anchor.class_lines()) == probe
        none = predict_latency(estimate(table, parse_strategy("none")), prof, batch, anchor=anchor)
        assert none.latency_ms == pytest.approx(anchor.total_ms, rel=1e-9) and none.basis == "anchored"
        for s in ("none", "prune:0.3", "prune:0.6:global", "quantize:int8", "distill:width:0.5",
                  "distill:width:0.75,prune:0.4,quantize:int8"):
            est = estimate(table, parse_strategy(s))
            single = predict_latency(est, prof, batch, anchor=anchor)
            plain = predict_latency(est, prof, batch)
            for a, want in ((anchor, single), (None, plain)):
                out = BatchEvaluator(est, prof, batch, anchor=a)(est.state.kept[None, :])  # K = 1
                assert out["latency_ms"][0] == pytest.approx(want.latency_ms, rel=1e-9), (s, batch, a is None)
                for m, v in totals(est).items():
                    if m in METRICS:
                        assert out[m][0] == pytest.approx(v, rel=1e-12, abs=1e-9), (s, m)
            if runtime_of(est) == "int8":  # another runtime: the quantized original's measured ratio
                assert single.latency_ms == pytest.approx(0.6 * plain.latency_ms, rel=1e-9)
    # a profile alone says so
    assert predict_latency(table, prof, 1).basis == "profile"


def test_two_measured_points_put_every_class_on_its_line():
    """Where the original and the probe measure each class's rows on a line in the profile's prediction
    (measured = a + b x predicted per row), a third candidate is predicted on those lines, in the single path and the
    batch path alike, and the time outside the operators on its own line."""
    table = analyze(load_model("torchvision:mobilenet_v2", input_shape="1,3,32,32"))
    prof = load_profile("host")
    ops = np.array(table.kinds) != "param"
    kinds = LatencyModel(table, prof, 1).kinds
    # per class: a fixed part the profile over-prices (a < 0, as found at batch 1) and a slope
    line = {c: (-0.2 * predict_latency(table, prof, 1).per_row_ms[kinds == c].min(), 1.3 + 0.1 * i)
            for i, c in enumerate(sorted(set(kinds)))}
    out_line = (1.5, 0.01)

    def on_lines(t):
        pred = predict_latency(t, prof, 1)
        rows = np.array([line[c][0] + line[c][1] * p for c, p in zip(kinds, pred.per_row_ms)])
        outside = out_line[0] * pred.outside_ms + out_line[1]
        return rows, outside

    rows, outside = on_lines(table)
    half = estimate(table, parse_strategy(PROBE_STRATEGY))
    h_rows, h_outside = on_lines(half)
    anchor = build_anchor(table, prof, 1, rows[ops] / 1e3, rows.sum() + outside, "test",
                          probe=(half, h_rows[ops] / 1e3, h_rows.sum() + h_outside))
    assert anchor.measured_outside_ms == pytest.approx(outside, rel=1e-9)
    lines = anchor.class_lines()
    assert set(lines) == {c for c in line if predict_latency(table, prof, 1).per_row_ms[kinds == c].sum()
                          - predict_latency(half, prof, 1).per_row_ms[kinds == c].sum() > 0.02
                          * predict_latency(table, prof, 1).per_row_ms[kinds == c].sum()}
    for c, (a, b) in lines.items():
        assert (a, b) == pytest.approx(line[c], rel=1e-6)
    for s in ("prune:0.3", "prune:0.7", "prune:0.6:global"):
        est = estimate(table, parse_strategy(s))
        want_rows, want_out = on_lines(est)
        pred = predict_latency(est, prof, 1, anchor=anchor)
        on = np.isin(kinds, list(lines))
        assert pred.per_row_ms[on] == pytest.approx(want_rows[on], rel=1e-6), s
        q0, q1 = predict_latency(table, prof, 1).outside_ms, predict_latency(half, prof, 1).outside_ms
        if q0 - q1 > 0.02 * q0:  # the probe changes the predicted time outside: its line
            assert pred.outside_ms == pytest.approx(want_out, rel=1e-6), s
        else:  # else the single ratio
            assert pred.outside_ms == pytest.approx(outside / q0 * predict_latency(est, prof, 1).outside_ms, rel=1e-6)
        out = BatchEvaluator(est, prof, 1, anchor=anchor)(est.state.kept[None, :])
        assert out["latency_ms"][0] == pytest.approx(pred.latency_ms, rel=1e-9), s
    # the one-point ratio (no probe) would have predicted each pruned row at the original's ratio: more
    single = build_anchor(table, prof, 1, rows[ops] / 1e3, rows.sum() + outside, "test")
    est = estimate(table, parse_strategy("prune:0.7"))
    assert predict_latency(est, prof, 1, anchor=single).latency_ms > predict_latency(est, prof, 1,
                                                                                    anchor=anchor).latency_ms


def test_a_class_line_steeper_than_its_bound_keeps_the_single_ratio():
    """A class whose line is steeper than CLASS_SLOPE_MAX times its ratio at the original gets no line: a probe that
    changes the class's prediction by 4% and its measurement by 18% gives a slope that is the rows' noise
    (concat_group's grouped convolutions at batch 8: pruned candidates predicted at 2.5-4.9x). Its rows keep the
    original's ratio; a class line within the bound is kept."""
    table = analyze(load_model("torchvision:mobilenet_v2", input_shape="1,3,32,32"))
    prof = load_profile("host")
    ops = np.array(table.kinds) != "param"
    kinds = np.array(LatencyModel(table, prof, 1).kinds)[ops]
    half = estimate(table, parse_strategy(PROBE_STRATEGY))
    p0 = predict_latency(table, prof, 1).per_row_ms[ops]
    p1 = predict_latency(half, prof, 1).per_row_ms[ops]
    rows0, rows1 = 0.8 * p0, 0.8 * p1
    anchor = build_anchor(table, prof, 1, rows0 / 1e3, rows0.sum(), "test",
                          probe=(half, rows1 / 1e3, rows1.sum()))
    c = "conv"
    sel = kinds == c
    assert c in anchor.class_lines()
    # the probe's prediction for the class 4% below the original's, its measurement 18% below
    anchor.probe["predicted_rows_ms"] = list(np.where(sel, 0.96 * p0, anchor.probe["predicted_rows_ms"]))
    anchor.probe["measured_rows_ms"] = list(np.where(sel, 0.82 * rows0, anchor.probe["measured_rows_ms"]))
    assert (0.18 / 0.04) > CLASS_SLOPE_MAX and c not in anchor.class_lines()
    for s in ("prune:0.3", "prune:0.6:global"):
        est = estimate(table, parse_strategy(s))
        plain = predict_latency(est, prof, 1).per_row_ms[ops]
        got = predict_latency(est, prof, 1, anchor=anchor).per_row_ms[ops]
        assert got[sel] == pytest.approx(0.8 * plain[sel], rel=1e-6), s


def test_the_outside_line_never_falls_below_zero_before_the_prediction():
    """The time outside the operators takes the line through the original and the probe only where that line's
    intercept is not negative: a probe whose outside time was measured short (dw_separable at batch 8: 0.11 ms
    against 0.68 ms) would put pruned candidates near zero; it keeps the original's ratio instead."""
    table = analyze(load_model("torchvision:mobilenet_v2", input_shape="1,3,32,32"))
    prof = load_profile("host")
    ops = np.array(table.kinds) != "param"
    half = estimate(table, parse_strategy(PROBE_STRATEGY))
    r0 = predict_latency(table, prof, 1).per_row_ms[ops]
    r1 = predict_latency(half, prof, 1).per_row_ms[ops]
    q0 = predict_latency(table, prof, 1).outside_ms
    q1 = predict_latency(half, prof, 1).outside_ms
    assert q0 - q1 > 0.02 * q0  # the probe changes the predicted time outside
    for a_, b_, kept in ((0.3 * q0, 1.5, True), (-0.5 * q0, 3.0, False)):  # measured = a_ + b_ x predicted
        o0, o1 = a_ + b_ * q0, a_ + b_ * q1
        anchor = build_anchor(table, prof, 1, r0 / 1e3, r0.sum() + o0, "test",
                              probe=(half, r1 / 1e3, r1.sum() + o1))
        b, a = anchor.outside_line()
        if kept:
            assert a > 0 and a + b * q0 == pytest.approx(o0) and a + b * q1 == pytest.approx(o1)
        else:
            assert (b, a) == (pytest.approx(o0 / q0), 0.0)
        est = estimate(table, parse_strategy("prune:0.6:global"))
        q = predict_latency(est, prof, 1).outside_ms
        want = max(a + b * q, PROBE_FLOOR * q * o0 / q0)  # never below PROBE_FLOOR of the single ratio
        assert predict_latency(est, prof, 1, anchor=anchor).outside_ms == pytest.approx(want, rel=1e-6)


def test_totals_only_anchor_puts_candidates_on_the_line_of_the_two_totals():
    """ONNX Runtime is timed as a whole: its anchor's rows are the profile's brought to the measured total, the
    original's and the probe's (tasks.onnx_runtime.measure_ort_anchor). One class, its intercept the time outside the
    operators: every candidate then lies on the line through the two measured totals against the
    profile's predicted ones, the original and the probe exactly, a negative intercept included (the runtime's time
    falls faster with pruning than the profile's), in the single and the batch path."""
    table = analyze(load_model("torchvision:mobilenet_v2", input_shape="1,3,32,32"))
    prof = load_profile("host")
    ops = np.array(table.kinds) != "param"
    probe = "prune:0.5:round_to=4"
    half = estimate(table, parse_strategy(probe))

    def rows_at(t, total_ms):  # the profile's rows, all of the total in them
        pred = predict_latency(t, prof, 1).per_row_ms[ops]
        return pred * total_ms / pred.sum() / 1e3

    P0 = predict_latency(table, prof, 1).per_row_ms.sum()
    P1 = predict_latency(half, prof, 1).per_row_ms.sum()
    M0, M1 = 0.3 * P0, 0.3 * P0 * 0.5 * P1 / P0  # halving the profile's prediction's fall measured twice as steep
    anchor = build_anchor(table, prof, 1, rows_at(table, M0), M0, "test", probe=(half, rows_at(half, M1), M1),
                          probe_strategy=probe, totals_only=True)
    assert anchor.measured_outside_ms == pytest.approx(0.0, abs=1e-12) and anchor.probe["strategy"] == probe
    (a, b), = anchor.class_lines().values()
    A = a * int((np.array(anchor.predicted_rows_ms) > 0).sum())  # the line's intercept, the whole model's
    assert A < 0 and A + b * P0 == pytest.approx(M0) and A + b * P1 == pytest.approx(M1)
    for s in ("none", probe, "prune:0.3:round_to=4", "prune:0.6:global:round_to=4", "distill:width:0.75"):
        est = estimate(table, parse_strategy(s))
        pred = predict_latency(est, prof, 1, anchor=anchor)
        want = A + b * predict_latency(est, prof, 1).per_row_ms.sum()
        assert pred.latency_ms == pytest.approx(want, rel=1e-6), s
        out = BatchEvaluator(est, prof, 1, anchor=anchor)(est.state.kept[None, :])
        assert out["latency_ms"][0] == pytest.approx(pred.latency_ms, rel=1e-9), s
    # shared evenly by the rows instead, that negative intercept takes small rows below their floor: off the line
    even = build_anchor(table, prof, 1, rows_at(table, M0), M0, "test", probe=(half, rows_at(half, M1), M1),
                        probe_strategy=probe, totals_only=True)
    even.intercept = "rows"
    assert predict_latency(half, prof, 1, anchor=even).latency_ms > 1.05 * M1


def test_latency_model_has_named_columns():
    from hardware.latency import COL, SPLIT_COLUMNS, split_coefficients

    prof = load_profile("host")
    coef = split_coefficients(prof, prof.efficiency, "conv", prof.peak_gflops["fp32"] * 1e9)
    assert len(coef) == len(SPLIT_COLUMNS) and coef[COL["flops"]] == pytest.approx(
        1 / (prof.peak_gflops["fp32"] * 1e9 * prof.efficiency.compute_of("conv")))
    table = analyze(load_model("demo:digits-cnn"))
    assert LatencyModel(table, prof, 1).kinds.shape == (table.n,)


def test_int8_candidates_lie_on_the_line_of_the_two_int8_totals():
    """Where the anchor measured the quantized original and the quantized probe (tasks.anchoring.INT8_PROBE), an INT8
    candidate's total lies on the line through those two measured totals against the profile's INT8 predictions:
    both points exactly, a third candidate on the line, never below PROBE_FLOOR of the single ratio; single and
    batch path alike. A float candidate keeps its own correction."""
    table = analyze(load_model("torchvision:mobilenet_v2", input_shape="1,3,32,32"))
    prof = load_profile("host")
    plain = {s: predict_latency(estimate(table, parse_strategy(s)), prof, 1).latency_ms
             for s in ("quantize:int8", f"{PROBE_STRATEGY},quantize:int8", "prune:0.3,quantize:int8",
                       "prune:0.9,quantize:int8", "prune:0.3")}
    P0, P1 = plain["quantize:int8"], plain[f"{PROBE_STRATEGY},quantize:int8"]
    M0, M1 = 0.6 * P0, 0.6 * P0 * (0.5 + 0.5 * P1 / P0)  # pruning by half saves half what the profile says
    anchor = _anchor(table, prof, 1, probe=True)
    float_before = predict_latency(estimate(table, parse_strategy("prune:0.3")), prof, 1, anchor=anchor).latency_ms
    anchor.runtimes["int8"].update(measured_ms=M0, predicted_ms=P0, probe_measured_ms=M1, probe_predicted_ms=P1)
    a, b = anchor.runtime_line("int8")
    assert a > 0 and a + b * P0 == pytest.approx(M0) and a + b * P1 == pytest.approx(M1)
    for s, want in (("quantize:int8", M0), (f"{PROBE_STRATEGY},quantize:int8", M1),
                    ("prune:0.3,quantize:int8", a + b * plain["prune:0.3,quantize:int8"]),
                    ("prune:0.9,quantize:int8", max(a + b * plain["prune:0.9,quantize:int8"],
                                                    PROBE_FLOOR * M0 / P0 * plain["prune:0.9,quantize:int8"]))):
        est = estimate(table, parse_strategy(s))
        pred = predict_latency(est, prof, 1, anchor=anchor)
        assert pred.latency_ms == pytest.approx(want, rel=1e-6) and pred.basis == "anchored", s
        out = BatchEvaluator(est, prof, 1, anchor=anchor)(est.state.kept[None, :])
        assert out["latency_ms"][0] == pytest.approx(pred.latency_ms, rel=1e-9), s
    # the single ratio would have priced the pruned INT8 candidate lower (it scales the whole of it)
    assert a + b * plain["prune:0.3,quantize:int8"] > M0 / P0 * plain["prune:0.3,quantize:int8"]
    after = predict_latency(estimate(table, parse_strategy("prune:0.3")), prof, 1, anchor=anchor).latency_ms
    assert after == pytest.approx(float_before, rel=1e-12)
    # a probe that does not slope upwards leaves the single ratio
    anchor.runtimes["int8"]["probe_measured_ms"] = 1.01 * M0
    assert anchor.runtime_line("int8") is None
    est = estimate(table, parse_strategy("prune:0.3,quantize:int8"))
    assert predict_latency(est, prof, 1, anchor=anchor).latency_ms == pytest.approx(
        M0 / P0 * plain["prune:0.3,quantize:int8"], rel=1e-9)


def test_rows_on_a_slow_kernel_measured_alone_keep_their_price_when_anchored():
    """A grouped convolution the profile prices on its dtype's slow kernel (INT8, channels per group off the group
    rule's multiple) is priced by that kernel's own measured speed: the anchor's INT8 ratio, which is the original's
    fast kernels' against their prediction, leaves it as it is, while every other row takes the ratio; single and
    batch path alike."""
    from hardware.latency import LatencyModel

    model = nn.Sequential(nn.Conv2d(3, 48, 3, padding=1), nn.ReLU(), nn.Conv2d(48, 48, 3, padding=1, groups=4),
                          nn.ReLU(), nn.Conv2d(48, 16, 1)).eval()
    table = analyze(_loaded(model, (1, 3, 16, 16), "test:grouped"))
    base = load_profile("host")
    prof = base.model_copy(update={"dtype_overrides": {"int8": base.dtype_overrides["int8"].model_copy(
        update={"group_multiple": 4, "group_slow_ns": 1.5})}})
    anchor = _anchor(table, prof, 1)  # the INT8 original measured at 0.6x its prediction
    for text, slow in (("quantize:int8", False), ("prune:0.25,quantize:int8", True)):
        est = estimate(table, parse_strategy(text))
        plain = predict_latency(est, prof, 1)
        pred = predict_latency(est, prof, 1, anchor=anchor)
        ev = evaluate(est)
        mask = LatencyModel(est, prof, 1).slow_rows(ev.cin[None], ev.cout[None])[0]
        assert mask.sum() == int(slow)
        assert np.allclose(pred.per_row_ms[mask], plain.per_row_ms[mask], rtol=1e-12)
        assert np.allclose(pred.per_row_ms[~mask], 0.6 * plain.per_row_ms[~mask], rtol=1e-9)
        out = BatchEvaluator(est, prof, 1, anchor=anchor)(est.state.kept[None, :])
        assert out["latency_ms"][0] == pytest.approx(pred.latency_ms, rel=1e-9)
    # the slow kernel timed with the anchor at 2 ns per FLOP, where the profile prices it at 1.5: those rows follow
    anchor.runtimes["int8"]["group_slow_ns"] = 2.0
    est = estimate(table, parse_strategy("prune:0.25,quantize:int8"))
    ev = evaluate(est)
    mask = LatencyModel(est, prof, 1).slow_rows(ev.cin[None], ev.cout[None])[0]
    again = predict_latency(est, prof, 1, anchor=anchor).per_row_ms
    assert np.allclose(again[mask], 2.0 / 1.5 * predict_latency(est, prof, 1).per_row_ms[mask], rtol=1e-12)


@pytest.mark.slow
def test_an_int8_candidate_is_timed_against_the_int8_original(tmp_path, monkeypatch):
    """apply's measurement of an INT8 candidate: in alternation with the anchor's compiled INT8 original (kept by
    the process that measured the anchor), put on the anchor's INT8 scale; the anchor has the INT8 line's second
    point. A candidate of the same program as the anchor's INT8 original measures about that original's time."""
    from tasks.anchoring import forget_int8_references
    from tasks.apply import apply_and_measure

    own_cache(tmp_path, monkeypatch)
    loaded = load_model("demo:digits-cnn")
    table = analyze(loaded)
    prof = load_profile("host")
    rep = apply_and_measure(loaded, parse_strategy("quantize:int8"), str(tmp_path / "q"), hardware="host")
    anchor = load_anchor(table, prof, 1)
    point = anchor.runtimes["int8"]
    assert point["probe_predicted_ms"] < point["predicted_ms"] and point["probe_measured_ms"] > 0
    lat = rep.latency_measurement
    assert lat["reference"] == "INT8 original" and "INT8 original" in lat["scale"]
    assert rep.meas.latency_ms == pytest.approx(lat["ratio"] * anchor.total_ms, rel=1e-3)
    assert 0.7 < rep.meas.latency_ms / point["measured_ms"] < 1.4
    # a process that did not measure the anchor builds the INT8 original again to time against
    forget_int8_references()
    again = apply_and_measure(loaded, parse_strategy("prune:0.3,quantize:int8"), str(tmp_path / "p"),
                              hardware="host")
    assert again.latency_measurement["reference"] == "INT8 original" and again.meas.latency_ms > 0

@pytest.mark.slow
def test_truths_recorded_by_apply_change_the_next_prediction(tmp_path, monkeypatch):
    """apply measures the candidate in alternation with the original and stores it as a truth of the anchor; the
    next prediction of that model on this machine is refitted with it."""
    from tasks.apply import apply_and_measure

    own_cache(tmp_path, monkeypatch)
    loaded = load_model("demo:digits-cnn")
    table = analyze(loaded)
    prof = load_profile("host")
    strat = parse_strategy("prune:0.5")
    rep = apply_and_measure(loaded, strat, str(tmp_path / "a"), hardware="host")
    assert rep.latency_basis == "anchored" and rep.hardware["anchor"]["truths"] == 0
    lat = rep.latency_measurement
    assert lat["rounds"] >= 5 and lat["ratio"] > 0 and rep.meas.speedup == pytest.approx(1 / lat["ratio"], rel=1e-3)
    anchor = load_anchor(table, prof, 1)
    assert anchor is not None and len(anchor.truths) == 1 and anchor.truths[0]["compact"] == "prune:0.5"
    # the measured latency is on the anchor's scale: the ratio to the original times the original's anchored time
    assert rep.meas.latency_ms == pytest.approx(lat["ratio"] * anchor.total_ms, rel=1e-3)
    est = estimate(table, strat)
    before = rep.pred.latency_ms
    after = predict_latency(est, prof, 1, anchor=anchor).latency_ms
    k, n = anchor.truth_factor("float")
    assert n == 1 and after == pytest.approx(before * k, rel=1e-3) and after != pytest.approx(before, rel=1e-6)
    # refitted towards the truth: the error falls
    assert abs(after - rep.meas.latency_ms) <= abs(before - rep.meas.latency_ms)
    saved = json.loads((tmp_path / "a" / "strategy.json").read_text())
    assert saved["compact"] == "prune:0.5"
