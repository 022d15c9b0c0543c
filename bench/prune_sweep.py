"""Estimate and apply agree on the torchvision zoo: every classification architecture at a small input, under
`prune:0.3` and `prune:0.5:global`, either prunes exactly as estimated (parameters equal, MACs within 0.5%) or is
left unpruned by both with a named reason. Nothing is timed.

    .venv/bin/python bench/prune_sweep.py [--models a,b] [--max-params-m 100] [--budget-min 20]

A row per (architecture, strategy): `exact`, `unpruned as estimated` (nothing prunable, and apply agrees),
`refused by estimate` (a clean error naming the reason, before anything runs), `mismatch` (with both counts),
`apply failed` or `estimate crashed` (the exception): the last three are defects.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from estimators.analyze import analyze  # noqa: E402
from estimators.errors import UserInputError  # noqa: E402
from estimators.compress import estimate  # noqa: E402
from estimators.modelspec import load_model  # noqa: E402
from estimators.strategy import parse_strategy  # noqa: E402
from estimators.table import totals  # noqa: E402
from hardware.measure import count_module  # noqa: E402
from tasks.executors import run_strategy  # noqa: E402

STRATEGIES = ["prune:0.3", "prune:0.5:global"]
SIZE = {"inception_v3": 96, "googlenet": 64}  # the others run at 64x64
NEEDS_224 = {"maxvit_t", "swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b"}


def names() -> list[str]:
    """The torchvision classification architectures (ViTs left out: their positional embedding fixes the input)."""
    import torchvision

    out = []
    for n in torchvision.models.list_models(module=torchvision.models):
        if n.startswith("vit_"):
            continue
        out.append(n)
    return sorted(out)


def one(name: str, text: str) -> dict:
    size = 224 if name in NEEDS_224 else SIZE.get(name, 64)
    loaded = load_model(f"torchvision:{name}", input_shape=f"1,3,{size},{size}")
    table = analyze(loaded)
    strategy = parse_strategy(text)
    pred = totals(estimate(table, strategy))
    base = totals(table)
    row = {"model": name, "strategy": text, "input": size, "groups": len(table.plan.groups),
           "unpruned": len([u for u in table.plan.unpruned if u["layer"] != "*"])}
    try:
        work = run_strategy(loaded, strategy, export=False)
    except Exception as exc:  # noqa: BLE001 - a defect this sweep exists to find
        return {**row, "result": f"apply failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    meas = count_module(work.model, loaded.example_input())
    same = pred["params"] == meas["params"] and abs(pred["macs"] - meas["macs"]) <= 0.005 * meas["macs"]
    if same:
        result = "exact" if pred["params"] < base["params"] else "unpruned as estimated"
    else:
        result = f"mismatch: params {int(pred['params'])} vs {int(meas['params'])}, MACs {int(pred['macs'])} vs {int(meas['macs'])}"
    return {**row, "result": result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="")
    ap.add_argument("--max-params-m", type=float, default=100.0, help="skip architectures larger than this")
    ap.add_argument("--budget-min", type=float, default=20.0)
    args = ap.parse_args()
    todo = [m for m in args.models.split(",") if m] or names()
    t0 = time.perf_counter()
    rows, skipped = [], []
    for name in todo:
        if time.perf_counter() - t0 > 60 * args.budget_min:
            skipped.append(f"{name} (past the budget)")
            continue
        import torchvision

        n_params = sum(p.numel() for p in torchvision.models.get_model(name, weights=None).parameters()) / 1e6
        if n_params > args.max_params_m:
            skipped.append(f"{name} ({n_params:.0f} M parameters)")
            continue
        for text in STRATEGIES:
            t1 = time.perf_counter()
            try:
                r = one(name, text)
            except UserInputError as exc:  # refused up front, with its reason: what a user would be told
                r = {"model": name, "strategy": text, "result": f"refused by estimate: {str(exc).splitlines()[0][:200]}"}
            except Exception as exc:  # noqa: BLE001 - a defect this sweep exists to find
                r = {"model": name, "strategy": text, "result": f"estimate crashed: {type(exc).__name__}: "
                                                                f"{str(exc).splitlines()[0][:160]}"}
            r["seconds"] = round(time.perf_counter() - t1, 1)
            rows.append(r)
            print(f"{name:22s} {text:18s} {r['result']}  ({r['seconds']} s)", file=sys.stderr, flush=True)
    print("| architecture | strategy | input | result |\n|---|---|---:|---|")
    for r in rows:
        print(f"| {r['model']} | {r['strategy']} | {r.get('input', '')} | {r['result']} |")
    bad = [r for r in rows if r["result"].startswith(("mismatch", "apply failed", "estimate crashed"))]
    refused = [r for r in rows if r["result"].startswith("refused by estimate")]
    print(f"\n{len(rows)} configurations of {len({r['model'] for r in rows})} architectures in "
          f"{(time.perf_counter() - t0) / 60:.1f} min: {len(rows) - len(bad) - len(refused)} as estimated, "
          f"{len(refused)} refused by estimate up front, {len(bad)} defects (mismatch, apply failed, estimate "
          "crashed).")
    if skipped:
        print("Skipped: " + "; ".join(skipped) + ".")


if __name__ == "__main__":
    main()
