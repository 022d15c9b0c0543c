"""Search speed: candidates estimated per second by `deployfit plan` (size, params, MACs, memory, latency on
the target, data-free accuracy proxy) for resnet50 on jetson-nano and on host, on a fine pruning grid.

    .venv/bin/python bench/search.py [--grid-step 0.01] [--nsga-evals 10000] [--model torchvision:resnet50]
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from estimators.accuracy import ProxyScorer  # noqa: E402
from estimators.analyze import analyze  # noqa: E402
from estimators.modelspec import load_model  # noqa: E402
from hardware.profile import load_profile  # noqa: E402
from search.plan import NSGA_EVALS, plan  # noqa: E402
from search.requirements import Requirements  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="torchvision:resnet50")
    ap.add_argument("--grid-step", type=float, default=0.01)
    ap.add_argument("--nsga-evals", type=int, default=NSGA_EVALS)
    args = ap.parse_args()
    t0 = time.perf_counter()
    table = analyze(load_model(args.model))
    print(f"analysis of {args.model}: {time.perf_counter() - t0:.1f} s (once per model; cached)")
    for hw, req in (("jetson-nano", Requirements(max_latency_ms=60.0, max_size_mb=40.0)),
                    ("host", Requirements(max_latency_ms=20.0, max_size_mb=40.0))):
        rep = plan(table, load_profile(hw), req, ProxyScorer(), grid_step=args.grid_step, nsga_evals=args.nsga_evals)
        rec = rep.recommended.label if rep.recommended else rep.infeasible.message
        s = rep.search
        print(f"{hw:12s} {rep.candidates_evaluated:6d} candidates in {rep.seconds:.2f} s = "
              f"{rep.candidates_per_second:,.0f} candidates/s ({s['structured']} structured in "
              f"{s['structured_seconds']:.2f} s, {s['nsga2']} by NSGA-II; {rep.distinct_candidates} distinct); "
              f"Pareto {len(rep.pareto)}; recommended {rec}")


if __name__ == "__main__":
    main()
