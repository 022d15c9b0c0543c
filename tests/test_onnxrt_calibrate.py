"""ONNX Runtime calibration (hardware.calibrate.onnxrt): the fit's columns price a network as the latency model
does, the fit recovers a runtime whose costs it is given, and a real calibration writes the profile that
`--runtime onnxruntime` then predicts with."""
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from estimators.methods.quantize import estimate as estimate_quantize
from estimators.strategy import QuantizeStep
from hardware.calibrate.onnxrt import (COLUMNS, OrtSample, coefficients_of, design, efficiency_of, fit_runtime,
                                       runtime_shape)
from hardware.calibrate.sampling import light_table
from hardware.latency import predict_latency
from hardware.profile import load_profile
from hardware.synthetic import synthetic_cnn
from hosts import ORT_COEFFICIENTS

SEEDS = range(8)


@pytest.fixture(scope="module")
def tables():
    """(float analysis, INT8 estimate) of synthetic networks."""
    out = []
    for seed in SEEDS:
        model, shape = synthetic_cnn(seed)
        table = light_table(model.eval(), torch.randn(1, *shape[1:]), name=f"synthetic-{seed}")
        out.append((table, estimate_quantize(table, QuantizeStep(dtype="int8"))))
    return out


def _profile(coef_fp32: dict, coef_int8: dict):
    shape = runtime_shape(load_profile("cpu-avx2"), "ONNX Runtime (test)", 8)
    return shape.model_copy(update={"efficiency": efficiency_of(coef_fp32),
                                    "dtype_overrides": {"int8": efficiency_of(coef_int8)}})


def test_design_columns_price_a_network_as_the_latency_model_does(tables):
    rng = np.random.default_rng(0)
    for k, (table, qtable) in enumerate(tables[:4]):
        coef = {c: float(rng.uniform(0.5, 3.0)) for c in COLUMNS}
        for g in ("conv", "gconv", "dwconv"):  # misaligned rows 1-3x slower than aligned ones
            coef[f"{g}.flops_off"] = coef[f"{g}.flops"] * float(rng.uniform(1.0, 3.0))
        coef.update(kernels=float(rng.uniform(1e-6, 5e-6)), views=float(rng.uniform(0, 1e-6)), call=1e-5)
        prof = _profile(coef, coef)
        for dtype, t in (("fp32", table), ("int8", qtable)):
            for batch in (1, 8):
                cols, fixed = design(t, prof, batch, dtype)
                c = coefficients_of(prof.eff(dtype))
                priced = sum(cols[n] * c[n] for n in COLUMNS) + fixed
                assert priced == pytest.approx(predict_latency(t, prof, batch).latency_ms / 1e3, rel=1e-9), \
                    (k, dtype, batch)


def test_fit_recovers_a_runtime_whose_costs_it_is_given(tables):
    truth = _profile(ORT_COEFFICIENTS, {**ORT_COEFFICIENTS, "conv.flops": 2.0, "conv.flops_off": 2.5})
    samples = [OrtSample(f"net{i} b{b} {dtype}", t, b, dtype, 1.0, predict_latency(t, truth, b).latency_ms / 1e3, i)
               for i, (table, qtable) in enumerate(tables) for dtype, t in (("fp32", table), ("int8", qtable))
               for b in (1, 8)]
    effs, stats = fit_runtime(samples, runtime_shape(load_profile("cpu-avx2"), "ONNX Runtime (test)", 8))
    assert set(effs) == {"fp32", "int8"}
    assert stats["fp32.samples"] == stats["int8.samples"] == 2 * len(tables)
    assert stats["fp32.mape"] < 1e-6 and stats["int8.mape"] < 1e-6
    fitted = truth.model_copy(update={"efficiency": effs["fp32"], "dtype_overrides": {"int8": effs["int8"]}})
    for s in samples:
        assert predict_latency(s.table, fitted, s.batch).latency_ms / 1e3 == pytest.approx(s.seconds, rel=1e-6)


def test_efficiencies_stay_in_the_profile_ranges_whatever_the_fit():
    zero = {c: 0.0 for c in COLUMNS}  # nothing costs: the largest efficiencies a profile allows
    eff = efficiency_of(zero)
    assert max(eff.compute.values()) == 4.0 and max(eff.bandwidth.values()) == 50.0
    slow = {**zero, "conv.flops": 1.0, "conv.flops_off": 100.0}
    assert efficiency_of(slow).misaligned_factor["conv"] == 8.0


@pytest.mark.slow
def test_calibrate_onnxruntime_writes_the_profile_that_predictions_use(tmp_path, monkeypatch):
    """A real calibration: synthetic networks exported to ONNX (float and INT8 QDQ) and timed in ONNX Runtime;
    its profile, kept beside the host profile, is what `estimate --runtime onnxruntime` predicts with."""
    from flows.cli import app
    from hardware.profile import load_profile_file
    from hosts import seed_host
    from tasks.onnx_runtime import ort_profile_path

    monkeypatch.setenv("DEPLOYFIT_CACHE_DIR", str(tmp_path / "cache"))
    seed_host()
    ort_profile_path().unlink()  # no ONNX Runtime profile yet
    r = CliRunner().invoke(app, ["calibrate", "--runtime", "onnxruntime", "--budget", "1", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["profile"] == str(ort_profile_path())
    prof = load_profile_file(ort_profile_path())
    fit = prof.provenance.fit
    assert prof.runtime.startswith("ONNX Runtime") and prof.channel_multiple == 4
    assert fit["networks"] >= 6 and fit["fp32.samples"] == fit["int8.samples"] == 2 * fit["networks"]
    assert 0 <= fit["fp32.mape"] < 1.0 and "int8" in prof.dtype_overrides
    r = CliRunner().invoke(app, ["estimate", "demo:digits-cnn", "--strategy", "prune:0.5:round_to=4", "--hardware",
                                 "host", "--runtime", "onnxruntime", "--no-anchor", "--json"])
    assert r.exit_code == 0, r.output
    est = json.loads(r.stdout)
    assert est["hardware"]["profile"]["runtime"] == prof.runtime
    assert est["latency_basis"] == "profile" and est["pred"]["latency_ms"] > 0


def test_calibrate_onnxruntime_refuses_the_pytorch_pooling_options():
    from flows.cli import app

    r = CliRunner().invoke(app, ["calibrate", "--runtime", "onnxruntime", "--refit", "--pool", "x.npz"])
    assert r.exit_code != 0 and "not with --runtime onnxruntime" in r.output


def test_plan_compares_runtimes_in_one_run():
    """`plan --runtime pytorch,onnxruntime`: one plan per runtime, each with its own profile (ONNX Runtime's keeps
    pruned widths in its blocked layout), and their recommendations compared, fastest first."""
    from flows.cli import app

    r = CliRunner().invoke(app, ["plan", "demo:digits-cnn", "--hardware", "host", "--runtime", "pytorch,onnxruntime",
                                 "--no-anchor", "--max-size-mb", "0.5", "--nsga-evals", "200", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    pt, ort = rep["runtimes"]["pytorch"], rep["runtimes"]["onnxruntime"]
    assert pt["profile"]["runtime"] == pt["profile"]["profile"]["runtime"]  # the host profile's own
    assert ort["profile"]["runtime"] == "onnxruntime"
    assert ort["profile"]["profile"]["runtime"].startswith("ONNX Runtime")
    assert ort["profile"]["profile"]["hash"] != pt["profile"]["profile"]["hash"]
    pruned = [t["compact"] for t in ort["top"] if "prune" in t["compact"]]
    assert pruned and all("round_to=4" in c for c in pruned)
    comp = rep["comparison"]
    assert [c["runtime"] for c in comp] == sorted(["pytorch", "onnxruntime"], key=lambda x: rep["runtimes"][x][
        "recommended"]["pred"]["latency_ms"])
    for c in comp:
        best = rep["runtimes"][c["runtime"]]["recommended"]
        assert c["recommended"] == best["compact"] and c["latency_ms"] == best["pred"]["latency_ms"]
        assert c["latency_basis"] == "profile"
    r = CliRunner().invoke(app, ["plan", "demo:digits-cnn", "--hardware", "host", "--runtime", "pytorch,pytorch"])
    assert r.exit_code == 2 and "without repeats" in r.output
