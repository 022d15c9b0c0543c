"""The accuracy-drop estimator: sensitivity by channel masking, damage ordering, the recovery model learning
from truths (persisted), the data-free proxy, and the CLI/apply wiring."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from estimators.accuracy import RecoveryModel, damage, prior_c, proxy_score, recovery_path, sensitivity, trained_by
from estimators.analyze import analyze
from estimators.compress import estimate
from estimators.data import load_data
from estimators.modelspec import load_model
from estimators.strategy import parse_strategy
from flows.cli import app
from tasks.apply import apply_and_measure
from tasks.train import TrainConfig


@pytest.fixture(scope="module")
def cnn():
    loaded = load_model("demo:digits-cnn")
    return loaded, analyze(loaded), load_data("digits")


def test_sensitivity_masks_channels_and_is_cached(cnn):
    loaded, table, data = cnn
    s = sensitivity(loaded, table, data)
    assert s.base_accuracy >= 97.0 and s.samples == 450 and len(s.groups) == len(table.plan.groups) >= 3
    drops = np.array(s.drops)
    assert (drops >= 0).all() and drops[:, -1].max() > 5.0  # silencing 75% of a group's channels hurts
    assert (drops[:, -1] >= drops[:, 0] - 1.0).all()  # more channels silenced, not (much) less damage
    assert 0.0 <= s.quant_drop < 2.0
    assert sensitivity(loaded, table, data) is s  # cached per model weights and data


def test_damage_orders_candidates(cnn):
    loaded, table, data = cnn
    s = sensitivity(loaded, table, data)

    def dmg(text):
        st = parse_strategy(text)
        return damage(estimate(table, st), st, s)

    assert dmg("none") == 0.0
    assert 0 < dmg("prune:0.2") < dmg("prune:0.5") < dmg("prune:0.8")
    assert dmg("prune:0.5,quantize:int8") == pytest.approx(dmg("prune:0.5") + s.quant_drop)
    assert dmg("distill:width:0.5") == pytest.approx(dmg("prune:0.5"), rel=0.05)  # the same widths
    assert trained_by(parse_strategy("distill:width:0.5,prune:0.3")) == "distill"
    assert trained_by(parse_strategy("quantize:int8")) == "quantize"


def test_recovery_learns_a_hinge_and_persists(tmp_path):
    path = str(tmp_path / "rec.json")
    rec = RecoveryModel.load(path)
    assert rec.fit("prune", 3) == (prior_c("prune", 3), 0.0)  # the prior before any truth
    assert prior_c("prune", 1) > prior_c("prune", 3) > prior_c("prune", 5)  # more training leaves less
    for x in (10.0, 40.0, 80.0, 120.0, 160.0, 200.0):
        rec.observe("prune", 3, x, 0.02 * max(0.0, x - 40.0))
    c, d0 = RecoveryModel.load(path).fit("prune", 3)  # reloaded from disk
    assert d0 == 40.0 and c == pytest.approx(0.02, rel=1e-3)
    assert rec.fit("prune", 5) == (prior_c("prune", 5), 0.0)  # another budget has seen nothing
    st = parse_strategy("prune:0.5")
    assert rec.predict(st, 140.0, 0.0, 3, cap=90.0) == pytest.approx(2.0, rel=1e-3)
    assert rec.predict(st, 140.0, 0.0, 0, cap=90.0) == 90.0  # no training: the raw damage, capped at chance


def test_recovery_gains_count_as_no_loss_not_as_free_damage():
    """Fine-tuning that beat the original (a negative drop) must not teach that any damage is free: d0 moves
    past the truths' damage and c stays at the prior for what lies beyond."""
    rec = RecoveryModel()
    for x in (50.0, 80.0, 100.0):
        rec.observe("prune", 5, x, -0.7)
    c, d0 = rec.fit("prune", 5)
    assert d0 == 100.0 and c == pytest.approx(prior_c("prune", 5))
    st = parse_strategy("prune:0.5")
    assert rec.predict(st, 90.0, 0.0, 5, cap=90.0) == 0.0
    assert rec.predict(st, 400.0, 0.0, 5, cap=90.0) == pytest.approx(300.0 * prior_c("prune", 5))


def test_proxy_grows_with_pruning(cnn):
    _, table, _ = cnn
    scores = [proxy_score(estimate(table, parse_strategy(t))) for t in ("none", "prune:0.3", "prune:0.6", "prune:0.9")]
    assert scores[0] == 0.0 and scores == sorted(scores) and scores[-1] < 1.0


def test_estimate_cli_with_and_without_data():
    runner = CliRunner()
    r = runner.invoke(app, ["estimate", "demo:digits-cnn", "--strategy", "prune:0.6", "--data", "digits",
                            "--finetune-epochs", "2", "--json"])
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["pred"]["accuracy_drop"] >= 0 and d["accuracy_estimate"]["method"] == "sensitivity"
    assert d["accuracy_estimate"]["epochs"] == 2
    r = runner.invoke(app, ["estimate", "demo:digits-cnn", "--strategy", "prune:0.6", "--json"])
    d = json.loads(r.stdout)
    assert "accuracy_drop" not in d["pred"] and d["accuracy_proxy"]["method"] == "proxy"
    assert "not accuracy points" in d["accuracy_proxy"]["note"]


@pytest.mark.slow  # trains and measures on the data
def test_apply_records_the_truth(tmp_path):
    loaded = load_model("demo:digits-cnn")
    store = recovery_path(loaded.spec, "digits")
    before = len(RecoveryModel.load(store).truths)
    rep = apply_and_measure(loaded, parse_strategy("prune:0.4"), str(tmp_path), data_spec="digits",
                            train_cfg=TrainConfig(epochs=1))
    assert rep.pred.accuracy_drop is not None
    assert rep.err["accuracy_drop"] == pytest.approx(rep.pred.accuracy_drop - rep.meas.accuracy_drop,
                                                        abs=1e-3)  # in points
    truths = RecoveryModel.load(store).truths
    assert len(truths) == before + 1 and truths[-1]["method"] == "prune" and truths[-1]["epochs"] == 1


def test_int8_drop_credits_layers_kept_float(cnn):
    from estimators.accuracy import int8_drop

    loaded, table, data = cnn
    s = sensitivity(loaded, table, data)
    assert set(s.quant_layers) == {"features.0", "features.3", "features.7", "classifier"}
    assert int8_drop(parse_strategy("quantize:int8"), s) == s.quant_drop
    assert int8_drop(parse_strategy("prune:0.5"), s) == 0.0
    kept = int8_drop(parse_strategy("quantize:int8:keep_float=features.0+classifier"), s)
    assert kept == pytest.approx(max(0.0, s.quant_drop - s.quant_layers["features.0"] - s.quant_layers["classifier"]))
