"""Strategy search: requirements (and their errors), the space per device (no INT8 without fast INT8),
non-dominated Pareto points, binding requirements, and the relaxation with exit code 3 when nothing fits."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from estimators.accuracy import proxy_score
from estimators.analyze import analyze
from estimators.errors import UserInputError
from estimators.modelspec import load_model
from flows.cli import app
from hardware.profile import load_profile
from search.plan import OBJECTIVES, candidate_space, plan
from search.requirements import Requirements, parse_requirements


@pytest.fixture(scope="module")
def table():
    return analyze(load_model("demo:digits-cnn"))


def _proxy(strat, est):
    return proxy_score(est), "proxy"


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
    req = Requirements(max_latency_ms=1e9, max_size_mb=0.15)
    rep = plan(table, load_profile("host"), req, _proxy)
    front = np.array([[r["pred"][o] for o in OBJECTIVES] for r in rep["pareto"]])
    for i, p in enumerate(front):
        others = np.delete(front, i, axis=0)
        assert not np.any(np.all(others <= p, axis=1) & np.any(others < p, axis=1))
    rec = rep["recommended"]["pred"]
    assert rec["size_bytes"] <= 0.15e6
    assert rep["top"][0]["compact"] == rep["recommended"]["compact"]
    assert [b["requirement"] for b in rep["binding"]] == ["max_size_mb"]  # the only limit that excludes better ones
    assert rep["candidates_evaluated"] == len(candidate_space(table, load_profile("host")))


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
