"""Calibration on a tiny budget writes a profile that loads and predicts; hardware commands."""
import json

from typer.testing import CliRunner

from estimators.analyze import analyze
from estimators.modelspec import load_model
from flows.cli import app
from hardware.calibrate import calibrate_host
from hardware.latency import predict_latency
from hardware.profile import load_profile, save_profile


def test_quick_calibration_writes_loadable_profile(tmp_path):
    messages = []
    prof = calibrate_host(quick=True, int8=False, budget_s=6.0, progress=messages.append)
    path = tmp_path / "host.yaml"
    save_profile(prof, path)
    again = load_profile(str(path))
    assert again.provenance is not None and again.provenance.threads >= 1
    assert again.peak_gflops["fp32"] > 0 and again.memory_bandwidth_gbs > 0
    assert again.memory_read_bandwidth_gbs and again.efficiency.split
    assert 8 in again.batch_efficiency and again.eff("fp32", 8).split  # calibrated at batch 8 too
    assert again.provenance.fit["fp32.b1.networks"] >= 2 and again.provenance.fit["seconds"] < 60
    assert any(m.startswith("fit fp32 batch 1") for m in messages)  # progress is shown
    table = analyze(load_model("demo:digits-cnn"))
    p1 = predict_latency(table, again, 1).latency_ms
    p8 = predict_latency(table, again, 8).latency_ms
    assert 0 < p1 < p8


def test_int8_kernel_fit_predicts_kernels_it_has_not_seen():
    """The INT8 convolution/linear kernels compiled INT8 graphs call, timed directly on a small budget: a fit
    on half of them predicts the other half (median error within 50%, in the right order)."""
    import numpy as np
    from scipy.stats import spearmanr

    from hardware.calibrate import (CACHE_SHARE, CHANNEL_MULTIPLE, cache_bytes, fit_split_model, int8_op_samples,
                                    predict_rows)
    from hardware.latency import latency_kinds

    ops = int8_op_samples(3.0, lambda m: None, batches=(1,), min_ops=60)[1]
    assert len(ops) >= 60 and all(n.total_seconds > 0 and n.table.n == 1 for n in ops)
    cache = CACHE_SHARE * cache_bytes()
    coef, _, _ = fit_split_model(ops[::2], CHANNEL_MULTIPLE, cache)
    test = [n for n in ops[1::2] if latency_kinds(n.table)[0] in coef]
    pred = np.array([p.sum() for p in predict_rows(test, coef, 0.0, CHANNEL_MULTIPLE, cache)])
    meas = np.array([n.total_seconds for n in test])
    assert len(test) >= 20
    assert np.median(np.abs(np.log(pred / meas))) < np.log(1.5)
    assert spearmanr(pred, meas)[0] > 0.8


def test_hardware_commands_and_estimate_latency():
    runner = CliRunner()
    r = runner.invoke(app, ["hardware", "list", "--json"])
    assert r.exit_code == 0
    names = [p["name"] for p in json.loads(r.stdout)["profiles"]]
    assert "host" in names
    r = runner.invoke(app, ["hardware", "show", "host", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["name"] == "host"
    r = runner.invoke(app, ["estimate", "demo:digits-cnn", "--hardware", "host", "--batch-size", "4", "--json"])
    assert r.exit_code == 0
    d = json.loads(r.stdout)
    assert d["pred"]["latency_ms"] > 0 and d["hardware"]["batch_size"] == 4
    r = runner.invoke(app, ["estimate", "demo:digits-cnn", "--hardware", "no-such-device", "--json"])
    assert r.exit_code == 2 and "unknown hardware" in r.stderr
