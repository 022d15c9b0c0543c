"""Host latency: predicted vs measured for torchvision models x {none, prune 0.3, prune 0.6, int8} x batch {1, 8}.

Prints, side by side, MAPE, the share within +-10% and Kendall's tau for
  calibrated   the `host` profile fitted by `deployfit calibrate`
  roofline     the same peaks (measured GEMM FLOP/s and DRAM bandwidth) with no fitted efficiency/overhead
  flops        latency proportional to FLOPs (seconds per FLOP of the host's dense-conv fit)
Float models are measured eagerly, int8 ones inductor-compiled (the forms the host profile predicts).

    .venv/bin/python bench/latency.py [--models resnet18,...] [--strategies none,prune:0.3,...] [--batches 1,8]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
from scipy.stats import kendalltau  # noqa: E402

from estimators.analyze import analyze  # noqa: E402
from estimators.compress import estimate  # noqa: E402
from estimators.modelspec import load_model  # noqa: E402
from estimators.strategy import parse_strategy  # noqa: E402
from estimators.table import totals  # noqa: E402
from hardware.latency import predict_latency  # noqa: E402
from hardware.profile import Efficiency, load_profile  # noqa: E402
from tasks.apply import measure_artifact_latency  # noqa: E402
from tasks.executors import run_strategy, save_artifact  # noqa: E402
from tasks.quantize_exec import load_program  # noqa: E402

MODELS = "mobilenet_v2,mobilenet_v3_large,efficientnet_b0,shufflenet_v2_x1_0,regnet_y_400mf,resnet18,resnet50,vgg11"


def uncalibrated(host):
    ones = {c: 1.0 for c in host.efficiency.compute}
    flat = Efficiency(compute=ones, bandwidth=ones, kernel_overhead_us=0.0, view_overhead_us=0.0, fused=[])
    return host.model_copy(update={"name": "roofline", "efficiency": flat, "dtype_overrides": {}, "cache_bytes": None,
                                   "cache_bandwidth_gbs": None})


def stats(pred, meas):
    pred, meas = np.array(pred), np.array(meas)
    err = np.abs(pred - meas) / meas
    return 100 * err.mean(), 100 * (err <= 0.10).mean(), kendalltau(pred, meas)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--strategies", default="none,prune:0.3,prune:0.6,quantize:int8")
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args()
    host = load_profile("host")
    roof = uncalibrated(host)
    s_per_flop = 1.0 / (host.peak_gflops["fp32"] * 1e9 * host.efficiency.compute["conv"])
    rows = []
    print(f"{'model':20s} {'strategy':14s} {'b':>2s} {'meas ms':>9s} {'calibrated':>11s} {'roofline':>9s} {'flops':>9s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            loaded = load_model(f"torchvision:{name}")
            table = analyze(loaded)
            for text in args.strategies.split(","):
                strat = parse_strategy(text)
                est = estimate(table, strat)
                work = run_strategy(loaded, strat)
                ep = load_program(save_artifact(work, strat, f"{tmp}/{name}-{len(rows)}")["model"])
                for b in (int(x) for x in args.batches.split(",")):
                    meas = measure_artifact_latency(work, ep, b)["latency_ms"]
                    cal = predict_latency(est, host, b).latency_ms
                    rf = predict_latency(est, roof, b).latency_ms
                    fl = totals(est)["gemm_macs"] * 2 * b * s_per_flop * 1e3
                    rows.append((name, text, b, meas, cal, rf, fl))
                    print(f"{name:20s} {text:14s} {b:2d} {meas:9.2f} {cal:11.2f} {rf:9.2f} {fl:9.2f}", flush=True)
    meas = [r[3] for r in rows]
    print(f"\n{len(rows)} measurements on host ({host.provenance.cpu if host.provenance else ''}, "
          f"{host.provenance.threads if host.provenance else '?'} threads)")
    print(f"{'predictor':12s} {'MAPE %':>8s} {'within 10% (%)':>15s} {'Kendall tau':>12s}")
    for label, idx in (("calibrated", 4), ("roofline", 5), ("flops", 6)):
        mape, within, tau = stats([r[idx] for r in rows], meas)
        print(f"{label:12s} {mape:8.1f} {within:15.1f} {tau:12.3f}")


if __name__ == "__main__":
    main()
