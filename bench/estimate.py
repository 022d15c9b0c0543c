"""Estimate speed: one estimate vs the same apply + count on resnet50 (prints the ratio and estimates/s).

    .venv/bin/python bench/estimate.py [--model torchvision:resnet50] [--n 4000]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402

from estimators.analyze import analyze  # noqa: E402
from estimators.compress import estimate  # noqa: E402
from estimators.modelspec import load_model  # noqa: E402
from estimators.strategy import parse_strategy  # noqa: E402
from estimators.table import totals  # noqa: E402
from hardware.measure import count_module  # noqa: E402
from tasks.executors import run_strategy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="torchvision:resnet50")
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    loaded = load_model(args.model)
    t0 = time.perf_counter()
    table = analyze(loaded)
    t_analyze = time.perf_counter() - t0
    print(f"model {args.model}: analysis (once per model, cached) {t_analyze:.2f} s; "
          f"{len(table.names)} rows, {len(table.plan.groups)} channel groups")

    rng = np.random.default_rng(0)
    grid = [round(r, 2) for r in np.arange(0.05, 0.95, 0.05)]
    strategies = []
    for _ in range(args.n):
        steps = []
        if rng.random() < 0.8:
            steps.append(f"prune:{rng.choice(grid)}" + (":global" if rng.random() < 0.5 else ""))
        if rng.random() < 0.6:
            steps.append(f"quantize:{rng.choice(['int8', 'fp16', 'bf16', 'int8-weight-only'])}")
        strategies.append(parse_strategy(",".join(steps) or "none"))
    totals(estimate(table, strategies[0]))  # warm-up
    t0 = time.perf_counter()
    for s in strategies:
        totals(estimate(table, s))
    t_all = time.perf_counter() - t0
    per_est = t_all / len(strategies)
    print(f"{len(strategies)} mixed estimates (prune uniform/global x quantize) in {t_all:.2f} s: "
          f"{per_est * 1e3:.3f} ms each, {1 / per_est:,.0f} estimates/s")

    print(f"\n{'strategy':22s} {'estimate ms':>12s} {'apply+count s':>14s} {'ratio':>9s}  params pred = meas")
    for text in ("prune:0.5", "prune:0.5:global"):
        s = parse_strategy(text)
        n = 500
        t0 = time.perf_counter()
        for _ in range(n):
            pred = totals(estimate(table, s))
        t_est = (time.perf_counter() - t0) / n
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            work = run_strategy(loaded, s, export=False)
            meas = count_module(work.model, loaded.example_input())
            runs.append(time.perf_counter() - t0)
        t_apply = statistics.median(runs)
        print(f"{text:22s} {t_est * 1e3:12.3f} {t_apply:14.2f} {t_apply / t_est:9,.0f}x  "
              f"{pred['params']:,} = {meas['params']:,} {'yes' if pred['params'] == meas['params'] else 'NO'}")


if __name__ == "__main__":
    main()
