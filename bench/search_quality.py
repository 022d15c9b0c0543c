"""Strategy quality: is the recommended strategy, executed, as good as the best of an executed grid?

For each requirement scenario on the digits demo nets (host profile, the accuracy estimator with
`--epochs` of fine-tuning), the oracle executes a grid of candidates (prune 0.2-0.8 uniform and global, distillation widths, each with
and without INT8; every one fine-tuned and measured by `deployfit apply`) and takes the best measured
accuracy among those whose *measured* size, parameters, latency and accuracy drop meet the requirements.
`deployfit plan` then recommends a strategy and its top 3 are executed the same way. Pass when the
recommendation, executed, meets every requirement and its measured accuracy is within 0.5 points of the
best feasible grid candidate. A plan infeasible only by predicted accuracy executes, as `deployfit run` does,
the candidates that meet every other requirement (its `verify` list): one of them meeting every requirement as
measured becomes the recommendation (search.requirements.settle_infeasible); an infeasible verdict that stands
passes only when no grid candidate is feasible as measured. Prints the wall time of plan + top 3 against the
whole grid.

The planner learns as the product does: the recovery model starts at its prior (the first scenario of each
net is planned without any truth) and every executed top-3 candidate records its measured drop, which
later plans of that net use. The oracle's grid executions record into a separate store: no grid result
ever informs a plan.

    .venv/bin/python bench/search_quality.py [--epochs 5] [--nsga-evals 10000]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from estimators.accuracy import DropScorer  # noqa: E402
from estimators.analyze import analyze  # noqa: E402
from estimators.data import accuracy, load_data_for  # noqa: E402
from estimators.modelspec import load_model  # noqa: E402
from estimators.strategy import parse_strategy  # noqa: E402
from hardware.profile import load_profile  # noqa: E402
from search.plan import NSGA_EVALS, plan  # noqa: E402
from search.requirements import Requirements, broken_as_measured as meets  # noqa: E402
from search.requirements import settle_infeasible  # noqa: E402
from tasks.apply import apply_and_measure  # noqa: E402
from tasks.train import TrainConfig  # noqa: E402

GRID = (["none", "quantize:int8", "distill:width:0.75", "distill:width:0.5", "distill:width:0.75,quantize:int8",
         "distill:width:0.5,quantize:int8"]
        + [f"prune:{r}{s}{q}" for r in (0.2, 0.4, 0.6, 0.8) for s in ("", ":global") for q in ("", ",quantize:int8")])
SCENARIOS = [
    ("digits-cnn", {"max_latency_ms": 0.25, "max_size_mb": 0.05}),
    ("digits-resnet", {"max_size_mb": 0.05}),
    ("digits-resnet", {"max_params": 30000, "max_accuracy_drop": 1.0}),
    ("digits-cnn", {"max_params": 12000, "max_accuracy_drop": 0.5}),
]
WITHIN = 0.5  # points


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--nsga-evals", type=int, default=NSGA_EVALS)
    args = ap.parse_args()
    prof = load_profile("host")
    executed: dict[tuple[str, str], dict] = {}
    tmp = tempfile.mkdtemp(prefix="deployfit-quality-")
    stores = {"plan": f"{tmp}/planner", "grid": f"{tmp}/oracle"}  # truths stay out of the user's cache

    def execute(name: str, loaded, text: str, store: str) -> dict:
        key = (name, text, store)
        if key not in executed:
            os.environ["DEPLOYFIT_CACHE_DIR"] = stores[store]
            t0 = time.perf_counter()
            r = apply_and_measure(loaded, parse_strategy(text), f"{tmp}/{name}-{len(executed)}", hardware="host",
                                  data_spec="digits", train_cfg=TrainConfig(epochs=args.epochs))
            executed[key] = {"result": r, "meas": r.meas.given(), "seconds": time.perf_counter() - t0}
            m = executed[key]["meas"]
            print(f"  executed {name} {parse_strategy(text).label():58s} acc {m['accuracy']:6.2f}  size "
                  f"{m['size_bytes'] / 1e6:.4f} MB  params {m['params']:7d}  latency {m['latency_ms']:.3f} ms "
                  f"({executed[key]['seconds']:.1f} s)", flush=True)
        return executed[key]

    results = []
    for name, limits in SCENARIOS:
        loaded = load_model(f"demo:{name}")
        table = analyze(loaded)
        data = load_data_for("digits", loaded)
        base_acc = accuracy(loaded.model, data.val)
        req = Requirements(**limits)
        print(f"\n{name} {limits} (accuracy {base_acc:.2f}%)", flush=True)
        t0 = time.perf_counter()
        os.environ["DEPLOYFIT_CACHE_DIR"] = stores["plan"]
        scorer = DropScorer(loaded, table, data, args.epochs)
        truths = len(scorer.rec.truths)
        rep = plan(table, prof, req, scorer, top_k=3, nsga_evals=args.nsga_evals)
        plan_s = time.perf_counter() - t0
        chosen = rep.top or rep.verify  # verify: predicted infeasible by accuracy only, executed to check
        if not chosen:
            print(f"  plan: infeasible ({truths} executed truths): {rep.infeasible.message}")
            results.append((name, limits, False, "infeasible", plan_s, 0.0, 0.0))
            continue
        if rep.recommended is None:
            print(f"  plan: infeasible as predicted ({truths} executed truths): {rep.infeasible.message}")
        else:
            print(f"  plan: {rep.candidates_evaluated} candidates in {plan_s:.1f} s (with sensitivity; recovery "
                  f"model from {truths} executed truths); recommended {rep.recommended.label} (predicted drop "
                  f"{rep.recommended.pred.accuracy_drop:.2f})")
        top = [execute(name, loaded, r.compact, "plan") for r in chosen]
        top_s = sum(t["seconds"] for t in top)
        if rep.recommended is None:  # what `deployfit run` makes of the executed candidates
            rep = settle_infeasible(rep, [t["result"] for t in top])
            print(f"  executed: {(rep.infeasible or rep.predicted_infeasible).message}")
        grid = {text: execute(name, loaded, text, "grid") for text in GRID}
        grid_s = sum(g["seconds"] for g in grid.values())
        feas = {t: g for t, g in grid.items() if not meets(g["meas"], req)}
        if rep.recommended is None:
            ok = not feas
            print(f"  grid: {len(feas)}/{len(GRID)} candidates feasible as measured -> {'PASS' if ok else 'FAIL'}")
            results.append((name, limits, ok, "infeasible, executed" if not feas else "infeasible; grid has one",
                            plan_s, top_s, grid_s))
            continue
        rec = rep.recommended.meas.given() if rep.recommended.meas else top[0]["meas"]
        broken = meets(rec, req)
        best_t, best = max(feas.items(), key=lambda kv: kv[1]["meas"]["accuracy"]) if feas else (None, None)
        best_top = max((t["meas"]["accuracy"] for t in top if not meets(t["meas"], req)), default=None)
        ok = not broken and best is not None and rec["accuracy"] >= best["meas"]["accuracy"] - WITHIN
        print(f"  grid: {len(feas)}/{len(GRID)} candidates feasible as measured; best {best_t} "
              f"{best['meas']['accuracy']:.2f}%" if best else "  grid: no feasible candidate")
        print(f"  recommended, executed: accuracy {rec['accuracy']:.2f}% ({'meets every requirement' if not broken else 'breaks ' + ', '.join(broken)}); "
              f"best feasible of the top 3: {best_top if best_top is None else f'{best_top:.2f}%'}")
        print(f"  wall time: plan + top 3 {plan_s + top_s:.1f} s against the whole grid {grid_s:.1f} s "
              f"({grid_s / max(plan_s + top_s, 1e-9):.1f}x)  -> {'PASS' if ok else 'FAIL'}", flush=True)
        gap = rec["accuracy"] - best["meas"]["accuracy"] if best else float("nan")
        results.append((name, limits, ok, f"{gap:+.2f} points vs best feasible", plan_s, top_s, grid_s))
    print("\nscenario                                                    result  recommended vs grid   plan+top3   grid")
    for name, limits, ok, gap, plan_s, top_s, grid_s in results:
        print(f"{name + ' ' + str(limits):60s} {'PASS' if ok else 'FAIL':6s}  {gap:20s} {plan_s + top_s:8.1f} s "
              f"{grid_s:6.1f} s")
    sys.exit(0 if all(r[2] for r in results) else 1)


if __name__ == "__main__":
    main()
