"""Accuracy-drop estimator against executed truths on the digits demo nets.

Every candidate is executed with the same training budget (`--epochs`, fine-tuning after pruning and
distillation alike) and its artifact's accuracy measured; the estimator predicts each candidate's drop
from the sensitivity analysis and a recovery model fitted on the *other* candidates' truths (leave one
out: a candidate never informs its own prediction). Side by side, the naive prior "drop grows with the
compression ratio" (points = k x (1 - predicted size / original size), k fitted the same leave-one-out way).
Prints Spearman's rho and the mean absolute error (points) of both.

    .venv/bin/python bench/accuracy.py [--epochs 3] [--seeds 3] [--models digits-cnn,digits-resnet]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from estimators.accuracy import RecoveryModel, damage, int8_drop, sensitivity, trained_by  # noqa: E402
from estimators.analyze import analyze  # noqa: E402
from estimators.compress import estimate  # noqa: E402
from estimators.data import load_data  # noqa: E402
from estimators.modelspec import load_model  # noqa: E402
from estimators.strategy import parse_strategy  # noqa: E402
from estimators.table import totals  # noqa: E402
from tasks.apply import apply_and_measure  # noqa: E402
from tasks.train import TrainConfig  # noqa: E402

CANDIDATES = ["prune:0.2", "prune:0.4", "prune:0.6", "prune:0.8", "prune:0.3:global", "prune:0.5:global",
              "prune:0.7:global", "prune:0.8:global", "quantize:int8", "distill:width:0.5", "prune:0.5,quantize:int8",
              "prune:0.7:global,quantize:int8"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--models", default="digits-cnn,digits-resnet")
    ap.add_argument("--seeds", type=int, default=3, help="execute every candidate with this many training seeds "
                                                          "and take the mean drop (450 validation images: 0.22 "
                                                          "points each)")
    args = ap.parse_args()
    data = load_data("digits")
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            loaded = load_model(f"demo:{name}")
            table = analyze(loaded)
            sens = sensitivity(loaded, table, data)
            size0 = totals(table)["size_bytes"]
            for text in CANDIDATES:
                strat = parse_strategy(text)
                est = estimate(table, strat)
                dmg = damage(est, strat, sens)
                quant = int8_drop(strat, sens)
                drops = [apply_and_measure(loaded, strat, f"{tmp}/{len(rows)}-{seed}", data_spec="digits",
                                           train_cfg=TrainConfig(epochs=args.epochs, seed=seed)).meas.accuracy_drop
                         for seed in range(args.seeds)]
                ratio = 1.0 - totals(est)["size_bytes"] / size0
                rows.append(dict(model=name, strategy=text, strat=strat, damage=dmg, quant=quant,
                                 cap=sens.base_accuracy - sens.chance, ratio=ratio, measured=float(np.mean(drops))))
                print(f"{name:14s} {text:30s} damage {dmg:7.2f}  measured drop {rows[-1]['measured']:+6.2f}", flush=True)
    exec_s = time.perf_counter() - t0
    # leave one out: the recovery model and the naive slope learn from every other candidate's truth
    for i, r in enumerate(rows):
        rec = RecoveryModel()
        for j, o in enumerate(rows):
            if j != i and trained_by(o["strat"]) in ("prune", "distill"):
                rec.observe(trained_by(o["strat"]), args.epochs, o["damage"] - o["quant"], o["measured"] - o["quant"])
        r["pred"] = rec.predict(r["strat"], r["damage"], r["quant"], args.epochs, r["cap"])
        others = [o for j, o in enumerate(rows) if j != i]
        x = np.array([o["ratio"] for o in others])
        y = np.array([o["measured"] for o in others])
        k = float(x @ y / max(x @ x, 1e-12))
        r["naive"] = k * r["ratio"]
    print(f"\n{'model':14s} {'strategy':30s} {'measured':>9s} {'deployfit':>10s} {'naive':>8s}")
    for r in rows:
        print(f"{r['model']:14s} {r['strategy']:30s} {r['measured']:+9.2f} {r['pred']:+10.2f} {r['naive']:+8.2f}")
    meas = np.array([r["measured"] for r in rows])
    print(f"\n{len(rows)} executed candidates, {args.epochs} training epoch(s) each, mean of {args.seeds} training "
          f"seed(s), executed in {exec_s:.0f} s")
    print(f"{'predictor':28s} {'Spearman':>9s} {'MAE (points)':>13s}")
    for label, key in (("deployfit (sensitivity+LOO)", "pred"), ("naive: k x compression", "naive")):
        p = np.array([r[key] for r in rows])
        print(f"{label:28s} {spearmanr(p, meas)[0]:9.3f} {np.abs(p - meas).mean():13.2f}")


if __name__ == "__main__":
    main()
