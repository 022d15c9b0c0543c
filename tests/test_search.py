"""Strategy search: requirements (and their errors), the space per device (no INT8 without fast INT8),
non-dominated Pareto points, binding requirements, and the relaxation with exit code 3 when nothing fits."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from estimators.accuracy import ProxyScorer
from estimators.analyze import analyze
from estimators.errors import UserInputError
from estimators.modelspec import load_model
from flows.cli import app
from hardware.profile import load_profile
from search.plan import OBJECTIVES, candidate_space, plan
from search.requirements import Requirements, parse_requirements
from search.results import CandidateResult, Measurement


@pytest.fixture(scope="module")
def table():
    return analyze(load_model("demo:digits-cnn"))


def _proxy():
    return ProxyScorer()


def test_requirements_validation(tmp_path):
    assert parse_requirements({"max_latency_ms": 5.0}).max_latency_ms == 5.0
    for bad, words in (({"max_latency_ms": -1.0}, "max_latency_ms"), ({"max_size_mb": 0}, "max_size_mb"),
                       ({"max_accuracy_drop": 1.0, "min_accuracy": 90.0}, "not both"), ({"speed": 1}, "speed")):
        with pytest.raises(UserInputError, match=words):
            parse_requirements(bad)
    f = tmp_path / "req.yaml"
    f.write_text("max_latency_ms: 10\nmax_size_mb: 2\nbatch_size: 4\n")
    r = parse_requirements({"max_latency_ms": 3.0, "max_size_mb": None}, str(f))
    assert (r.max_latency_ms, r.max_size_mb, r.batch_size) == (3.0, 2.0, 4)  # flags win over the file
    with pytest.raises(UserInputError, match="does not exist"):
        parse_requirements({}, str(tmp_path / "nope.yaml"))
    with pytest.raises(UserInputError, match="above the model's own accuracy"):
        Requirements(min_accuracy=99.9).resolve_accuracy(98.0)
    assert Requirements(min_accuracy=97.0).resolve_accuracy(99.0).max_accuracy_drop == pytest.approx(2.0)


def test_no_int8_where_the_device_has_no_fast_int8(table):
    nano = candidate_space(table, load_profile("jetson-nano"))
    assert nano and not any(s.method == "quantize" and s.dtype == "int8" for c in nano for s in c.steps)
    assert any(s.method == "quantize" and s.dtype == "fp16" for c in nano for s in c.steps)
    host = candidate_space(table, load_profile("host"))
    assert any(s.method == "quantize" and s.dtype == "int8" for c in host for s in c.steps)
    assert all(len([s for s in c.steps if s.method == "quantize"]) <= 1 for c in host)


def test_pareto_points_are_non_dominated_and_recommendation_feasible(table):
    # 0.05 MB excludes plain INT8 (58,944 B), predicted to lose nothing: the size limit binds whatever the
    # profile's latencies (a tie on loss would be broken by latency, which the profile decides)
    req = Requirements(max_latency_ms=1e9, max_size_mb=0.05)
    rep = plan(table, load_profile("host"), req, _proxy(), nsga_evals=400)
    front = np.array([[r.pred.get(o) for o in OBJECTIVES] for r in rep.pareto])
    for i, p in enumerate(front):
        others = np.delete(front, i, axis=0)
        assert not np.any(np.all(others <= p, axis=1) & np.any(others < p, axis=1))
    rec = rep.recommended.pred
    assert rec.size_bytes <= 0.05e6
    assert rep.top[0].compact == rep.recommended.compact
    assert [b.requirement for b in rep.binding] == ["max_size_mb"]  # the only limit that excludes better ones
    assert rep.search["structured"] >= len(candidate_space(table, load_profile("host"), grid_step=0.01))
    assert rep.candidates_evaluated == rep.search["structured"] + rep.search["nsga2"]


@pytest.mark.slow  # a plan through the CLI with data: sensitivity and search
def test_infeasible_gives_the_relaxation_and_exit_3():
    runner = CliRunner()
    r = runner.invoke(app, ["plan", "demo:digits-cnn", "--hardware", "host", "--max-latency-ms", "0.001",
                            "--max-size-mb", "1", "--json"])
    assert r.exit_code == 3
    d = json.loads(r.stdout)
    inf = d["infeasible"]
    assert inf["unreachable"] == ["max_latency_ms"] and d["recommended"] is None
    assert "is not reachable within 1 MB; the nearest is" in inf["message"]
    assert inf["relaxed"]["max_latency_ms"] == pytest.approx(inf["nearest"]["pred"]["latency_ms"], rel=1e-3)
    assert d["verify"] == []  # latency is a formula's prediction: nothing to execute to check it


def test_plan_cli_with_data_and_errors():
    runner = CliRunner()
    r = runner.invoke(app, ["plan", "demo:digits-cnn", "--hardware", "host", "--max-accuracy-drop", "1.0",
                            "--max-size-mb", "0.1", "--data", "digits", "--finetune-epochs", "3", "--json"])
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["accuracy_unit"] == "points" and d["recommended"]["pred"]["accuracy_drop"] <= 1.0
    assert d["recommended"]["pred"]["size_bytes"] <= 0.1e6
    r = runner.invoke(app, ["plan", "demo:digits-cnn", "--hardware", "host", "--max-accuracy-drop", "1.0"])
    assert r.exit_code == 2 and "needs --data" in r.stderr
    r = runner.invoke(app, ["plan", "demo:digits-cnn", "--hardware", "host", "--min-accuracy", "99.99",
                            "--data", "digits"])
    assert r.exit_code == 2 and "above the model's own accuracy" in r.stderr


# ----------------------------------------------------------------------------------------------
# the batched evaluation equals the per-candidate estimators; per-layer allocation; NSGA-II

from estimators.accuracy import DropScorer, RecoveryModel, predict_drop, proxy_score  # noqa: E402
from estimators.compress import estimate  # noqa: E402
from estimators.methods.prune import counts_for_ratios, prune_counts  # noqa: E402
from estimators.data import load_data  # noqa: E402
from estimators.strategy import PruneStep, QuantizeStep, Strategy, parse_strategy  # noqa: E402
from estimators.table import totals  # noqa: E402
from hardware.latency import predict_latency  # noqa: E402
from search.batch import BatchEvaluator  # noqa: E402
from search.plan import allocations, build_families, layer_step  # noqa: E402

METRICS = ("params", "size_bytes", "macs", "flops", "memory_access_bytes", "peak_memory_bytes")


@pytest.fixture(scope="module")
def resnet():
    loaded = load_model("demo:digits-resnet")
    return loaded, analyze(loaded)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def _steps(table, rng):
    """Pruning steps of every kind the search makes: per-layer (as layer_step builds them), uniform,
    round_to, global."""
    G = len(table.plan.groups)
    out = [layer_step(table, rng.integers(0, 19, G) * 0.05) for _ in range(6)]
    out += [PruneStep(ratio=0.37), PruneStep(ratio=0.5, round_to=8), PruneStep(ratio=0.61, scope="global")]
    return out


@pytest.mark.parametrize("spec,shape", [("demo:digits-resnet", None), ("torchvision:mobilenet_v2", "1,3,32,32")])
def test_the_searchs_candidates_are_the_strategies_it_names(spec, shape):
    """What the search evaluates (channel counts from the pruning arithmetic, K candidates at once on a student's
    quantized table) is what estimating the strategy it reports gives, on every metric and the latency."""
    table = analyze(load_model(spec, input_shape=shape))
    rng = np.random.default_rng(1)
    gidx = np.array([g.index for g in table.plan.groups])
    for hw, batch in (("host", 1), ("host", 8), ("jetson-nano", 1)):
        prof = load_profile(hw)
        for pre in ([], [parse_strategy("distill:width:0.75").steps[0]]):
            base = estimate(table, Strategy(steps=pre))
            for q in (None, "int8", "fp16"):
                qt = base if q is None else estimate(base, Strategy(steps=[QuantizeStep(dtype=q)]))
                ev = BatchEvaluator(qt, prof, batch)
                steps = _steps(table, rng)
                kept = np.tile(base.state.kept, (len(steps), 1))
                for k, st in enumerate(steps):
                    kept[k, gidx] -= prune_counts(base, st)
                out = ev(kept)
                for k, st in enumerate(steps):
                    est = estimate(table, Strategy(steps=pre + [st] + ([QuantizeStep(dtype=q)] if q else [])))
                    want = totals(est)
                    for m in METRICS:
                        assert out[m][k] == pytest.approx(want[m], rel=1e-12, abs=1e-9), (hw, q, st.compact(), m)
                    assert out["latency_ms"][k] == pytest.approx(predict_latency(est, prof, batch).latency_ms, rel=1e-9)


def test_per_group_counts_and_layer_steps_agree(resnet):
    _, table = resnet
    rng = np.random.default_rng(2)
    R = rng.integers(0, 19, (20, len(table.plan.groups))) * 0.05
    P = counts_for_ratios(table, R)
    for r, p in zip(R, P):
        step = layer_step(table, r)
        assert (prune_counts(table, step) == p).all()
        assert parse_strategy(Strategy(steps=[step]).compact()) == Strategy(steps=[step])  # compact round-trips
    with pytest.raises(UserInputError, match="per-layer ratio"):
        parse_strategy("prune:layers=conv1")


def test_batched_scorers_equal_single_candidate_predictions(resnet, digits):
    loaded, table = resnet
    rng = np.random.default_rng(3)
    scorer = DropScorer(loaded, table, digits, 3)
    proxy = ProxyScorer()
    gidx = np.array([g.index for g in table.plan.groups])
    for tail in ([], [QuantizeStep(dtype="int8")]):
        for pre in ([], [parse_strategy("distill:width:0.5").steps[0]]):
            base = estimate(table, Strategy(steps=pre))
            steps = _steps(table, rng)
            kept = np.tile(base.state.kept, (len(steps), 1))
            for k, st in enumerate(steps):
                kept[k, gidx] -= prune_counts(base, st)
            shape = Strategy(steps=pre + [PruneStep(ratio=0.5)] + tail)
            drops, scores = scorer(shape, base, kept), proxy(shape, base, kept)
            for k, st in enumerate(steps):
                strat = Strategy(steps=pre + [st] + tail)
                assert drops[k] == pytest.approx(predict_drop(loaded, table, strat, digits, 3)["accuracy_drop"], abs=1e-4)
                assert scores[k] == pytest.approx(proxy_score(estimate(table, strat)), rel=1e-12)


def test_sensitivity_allocation_prunes_less_sensitive_groups_harder_and_executes_exactly(resnet, digits):
    from scipy.stats import spearmanr

    from hardware.measure import count_module
    from tasks.executors import run_strategy

    loaded, table = resnet
    scorer = DropScorer(loaded, table, digits, 3)
    fams = build_families(table, load_profile("host"), 1)
    alloc = allocations(table, scorer, fams[0].evaluator)
    assert len(alloc) >= 10 and alloc.shape[1] == len(table.plan.groups)
    loss = scorer.group_curves(table, np.array([0.25, 0.5, 0.75])).sum(1)
    rho = spearmanr(loss, alloc.mean(0)).statistic
    assert rho < -0.5, (loss, alloc.mean(0))  # the more a group's pruning costs, the less it is pruned
    assert alloc.mean(0)[np.argmin(loss)] == alloc.mean(0).max()  # the least sensitive group is pruned hardest
    for a in alloc[[len(alloc) // 3, 2 * len(alloc) // 3]]:
        strat = Strategy(steps=[layer_step(table, a)])
        pred = totals(estimate(table, strat))
        work = run_strategy(loaded, strat, export=False)
        meas = count_module(work.model, loaded.example_input())
        assert (pred["params"], pred["macs"]) == (meas["params"], meas["macs"])


def test_nsga2_explores_per_layer_ratios_reproducibly(table):
    req = Requirements(max_size_mb=0.05)
    a = plan(table, load_profile("host"), req, ProxyScorer(), nsga_evals=1500, seed=7)
    b = plan(table, load_profile("host"), req, ProxyScorer(), nsga_evals=1500, seed=7)
    assert a.search["nsga2"] >= 1500 and a.candidates_evaluated > a.search["structured"]
    assert a.recommended.compact == b.recommended.compact
    assert a.recommended.pred.size_bytes <= 0.05e6
    # the search can only improve on the structured space: NSGA-II candidates join the same pool
    c = plan(table, load_profile("host"), req, ProxyScorer(), nsga_evals=0)
    assert a.recommended.pred.accuracy_drop <= c.recommended.pred.accuracy_drop
    assert any("layers=" in r.compact for r in a.pareto)


def test_infeasible_by_predicted_accuracy_lists_candidates_to_execute(digits):
    """12,000 parameters need pruning, which is predicted to cost more than 0.01 points: infeasible as predicted,
    and the candidates that meet every other requirement are listed, least predicted drop first, to be executed."""
    from search.requirements import settle_infeasible

    loaded = load_model("demo:digits-cnn")
    table = analyze(loaded)
    req = Requirements(max_params=12000, max_accuracy_drop=0.01)
    # the recovery model's prior: truths that other tests' executed runs stored for this model and data (the
    # session's cache) moved the predicted drops from run to run (once a candidate above 12,000 parameters was
    # predicted within 0.01 points and became the nearest)
    scorer = DropScorer(loaded, table, digits, 1, recovery=RecoveryModel())
    rep = plan(table, load_profile("host"), req, scorer, top_k=3, nsga_evals=200)
    assert rep.recommended is None and "max_accuracy_drop" in rep.infeasible.unreachable
    v = rep.verify
    assert 2 <= len(v) <= 3 and f"{len(v)} candidates meet every other requirement and miss only the predicted " \
        "accuracy: executing them checks it" in rep.infeasible.message
    assert "12,000 parameters is not reachable" not in rep.infeasible.message  # pruning reaches it alone
    assert all(r.pred.params <= 12000 and r.pred.accuracy_drop > 0.01 for r in v)
    drops = [r.pred.accuracy_drop for r in v]
    assert drops == sorted(drops)
    # what the run flow makes of the executed candidates' measurements
    meas = [Measurement(params=v[0].pred.params, accuracy_drop=0.5), Measurement(params=11000, accuracy_drop=-0.1)]
    executed = [CandidateResult(model=loaded.spec, input_shape=[1, 1, 8, 8], batch_size=1, strategy=r.strategy,
                                compact=r.compact, label=r.label, artifact={}, pred=r.pred, meas=m)
                for r, m in zip(v, meas)]
    before = rep.model_dump_json()
    kept = settle_infeasible(rep, executed[:1])  # breaks the accuracy as measured too: the verdict stands, confirmed
    assert kept.recommended is None and kept.infeasible.verified
    assert "none of the 1 meets every requirement as measured" in kept.infeasible.message
    settled = settle_infeasible(rep, executed)  # the second meets both as measured: recommended
    assert settled.recommended.compact == v[1].compact and settled.recommended.by == "measurement"
    assert settled.infeasible is None and settled.recommended.meas == executed[1].meas
    assert "meets every requirement as measured" in settled.predicted_infeasible.message
    assert rep.model_dump_json() == before  # the plan's own report is left as it was


def test_a_plan_for_onnx_runtime_keeps_every_pruned_channel_count_a_multiple_of_four(resnet):
    """ONNX Runtime's fast convolutions take input channels in multiples of 4 (docs/onnx.md): with round_to every
    candidate of the space, NSGA-II's per-layer ones included, is pruned to such counts, estimated with that
    rounding, and names it in its strategy (torch-pruning executes it exactly: test_prune_exact)."""
    from estimators.table import evaluate
    from tasks.onnx_runtime import plan_round_to

    assert plan_round_to("onnxruntime") == 4 and plan_round_to("pytorch") is None
    _, table = resnet
    req = Requirements(max_macs=int(totals(table)["macs"] * 0.5))
    rep = plan(table, load_profile("host"), req, ProxyScorer(), top_k=5, nsga_evals=400, grid_step=0.1,
               keep_candidates=True, round_to=4)
    steps = [st for text in rep.candidates["strategy"] for st in parse_strategy(text).steps if st.method == "prune"]
    assert steps and all(st.round_to and st.round_to % 4 == 0 for st in steps)
    assert any(st.layers for st in steps) and any(st.scope == "global" for st in steps)  # NSGA-II's, global too
    base = evaluate(table).cin
    for text in [r.compact for r in rep.top] + rep.candidates["strategy"][:200]:
        cin = evaluate(estimate(table, parse_strategy(text))).cin
        convs = [i for i, k in enumerate(table.kinds) if k == "conv" and base[i] % 4 == 0]
        assert all(cin[i] % 4 == 0 for i in convs), text
