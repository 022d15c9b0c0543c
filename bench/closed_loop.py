"""The closed loop: how anchored latency predictions improve as measured candidates refit the anchor.

For a few held-out architectures (bench/latency.py's HELD_OUT, batch 1), every candidate of CANDIDATES (uniform and
global pruning at ratios 0.1-0.7, each with and without INT8) is executed without data
(tasks.executors.run_strategy) and measured as its artifact runs (tasks.apply.fast_form) in alternation with the
original (tasks.apply.measure_candidate); its measured latency is that ratio times the anchor's total, the
anchor being the original measured here once (tasks.anchoring.measure_anchor); an INT8 candidate is timed against
the anchor's INT8 original and put on that point's scale. The drift of this VM (tens of percent
within minutes) moves candidate and original alike within a round and cancels in the ratio.

Then, with no more timing, for n in 0, 3 and 10 truths and for each of `--orders` seeded orders of a model's
candidates: the first n of the order are truths, every other candidate j is predicted with a fresh copy of the anchor
(copy.deepcopy, `path` cleared so nothing is written) that recorded those n truths (Anchor.record_truth with each
truth's anchored prediction before any truth, as the product records them), through
hardware.latency.predict_latency. Truths refit the correction of their own runtime (float or INT8) only. The report
gives MAPE and the share within +-10% (and +-25%) after 0, 3 and 10 truths, over all candidates and per runtime.

    .venv/bin/python bench/closed_loop.py [--models a,b,c] [--orders 20] [--rounds N] [--budget-min 15]
                                          [--profile host] [--dump OUT.json] [--rescore DUMP.json]

Progress goes to stderr, the report (markdown) to stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import latency as bench  # bench/latency.py, beside this file (it puts the repository on sys.path)
from estimators.analyze import analyze
from estimators.compress import estimate
from estimators.strategy import parse_strategy
from hardware.anchor import Anchor, runtime_of
from hardware.latency import predict_latency
from hardware.measure import describe_rounds
from hardware.profile import load_profile
from tasks.anchoring import measure_anchor, original_program
from tasks.apply import fast_form, measure_candidate
from tasks.executors import run_strategy

MODELS = ["regnet_x_400mf", "mnasnet1_0", "resnet34", "googlenet"]
RATIOS = [("", r) for r in (0.1, 0.3, 0.5, 0.7)] + [(":global", r) for r in (0.3, 0.6)]
CANDIDATES = [f"prune:{r}{scope}{q}" for scope, r in RATIOS for q in ("", ",quantize:int8")]
TRUTHS = (0, 3, 10)
BATCH = 1


def measure_model(name: str, profile, rounds: int) -> tuple[Anchor, list[dict], object]:
    """The anchor of `name` at BATCH and every candidate measured: (the anchor; one row per candidate with
    its runtime, its anchored prediction before any truth and its measured latency on the anchor's scale; the
    model's LayerTable)."""
    loaded = bench.load_arch(name)
    table = analyze(loaded)
    original = original_program(loaded).module()
    anchor = measure_anchor(loaded, table, profile, BATCH, int8="int8" in profile.fast_dtypes,
                            progress=lambda m: bench.say(f"    {m}"))
    rows = []
    for text in CANDIDATES:
        est = estimate(table, parse_strategy(text))
        try:
            work = run_strategy(loaded, parse_strategy(text))
            int8 = work.quant is not None and work.quant.dtype == "int8"
            got = measure_candidate(fast_form(work.program, int8), loaded, BATCH, anchor, original, int8=int8,
                                    rounds=rounds)
        except Exception as exc:  # noqa: BLE001 - a candidate the executors cannot build or run: said, not fatal
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            bench.say(f"    {text}: not executed or not measured ({type(exc).__name__}: {first})")
            continue
        rows.append({"model": name, "strategy": text, "runtime": runtime_of(est),
                     "measured_ms": got["latency_ms"], "ratio": got["ratio"],
                     "ratio_iqr": got["ratio_iqr"],
                     "pred0_ms": predict_latency(est, profile, BATCH, anchor=anchor).latency_ms})
        r = rows[-1]
        bench.say(f"    {text:26s} measured {r['measured_ms']:8.3f} ms (ratio {r['ratio']:.3f} +-{r['ratio_iqr']:.3f})"
                  f"  anchored {r['pred0_ms']:8.3f}")
        del work
    return anchor, rows, table


def replay(name: str, table, anchor: Anchor, rows: list[dict], profile, orders: int) -> list[dict]:
    """Every prediction of the closed loop for one model (its LayerTable `table`): for each n in TRUTHS and each
    seeded order, each candidate after the first n predicted with a copy of `anchor` that recorded the first n as
    truths."""
    ests = {r["strategy"]: estimate(table, parse_strategy(r["strategy"])) for r in rows}
    out = []
    for n in TRUTHS:
        if n >= len(rows):
            continue
        for o in range(orders if n else 1):  # with no truth every order predicts the same
            order = list(range(len(rows)))
            random.Random(o).shuffle(order)
            refit = copy.deepcopy(anchor)
            refit.path = ""  # nothing is written to the anchor cache
            for t in order[:n]:
                refit.record_truth(rows[t]["strategy"], rows[t]["runtime"], rows[t]["pred0_ms"], rows[t]["measured_ms"])
            for j in order[n:]:
                r = rows[j]
                pred = predict_latency(ests[r["strategy"]], profile, BATCH, anchor=refit).latency_ms
                out.append({"model": name, "truths": n, "order": o, "strategy": r["strategy"],
                            "runtime": r["runtime"], "measured_ms": r["measured_ms"], "pred_ms": pred,
                            "truths_of_runtime": refit.truth_factor(r["runtime"])[1]})
    return out


def errors(evals: list[dict]) -> np.ndarray:
    return np.array([abs(e["pred_ms"] - e["measured_ms"]) / e["measured_ms"] for e in evals])


def scores(evals: list[dict]) -> list[str]:
    lines = ["| truths | candidates | predictions | MAPE % | within ±10% | within ±25% |", "|---:|---|---:|---:|---:|---:|"]
    for n in TRUTHS:
        for label, keep in (("all", lambda e: True), ("float", lambda e: e["runtime"] == "float"),
                            ("int8", lambda e: e["runtime"] == "int8")):
            sub = [e for e in evals if e["truths"] == n and keep(e)]
            if not sub:
                continue
            err = errors(sub)
            lines.append(f"| {n} | {label} | {len(sub)} | {100 * err.mean():.1f} | {100 * (err <= 0.10).mean():.1f} | "
                         f"{100 * (err <= 0.25).mean():.1f} |")
    return lines


def report(data: dict) -> str:
    done = [m for m in data["models"] if m["status"] == "done"]
    lines = [f"`{data['command']}`", "",
             f"{data['machine']}; profile {data['profile']}; {data['date']}; batch {BATCH}; {len(CANDIDATES)} "
             f"candidates per model ({', '.join(CANDIDATES)}); {describe_rounds(data['rounds'])} each; "
             f"{data['orders']} seeded orders of the candidates per model.", "",
             "Each candidate after the first n of an order is predicted with the anchor refitted from those n "
             "measured candidates (each runtime's correction from its own truths); measured: the ratio to the "
             "original timed in alternation x the anchor's total.", ""]
    lines += scores(data["evals"]) + [""]
    for m in done:
        per = [(n, [e for e in data["evals"] if e["model"] == m["name"] and e["truths"] == n]) for n in TRUTHS]
        lines.append(f"{m['name']} ({m['seconds']:.0f} s): "
                     + ", ".join(f"{n} truths MAPE {100 * errors(got).mean():.1f}%" for n, got in per if got))
    others = [m for m in data["models"] if m["status"] != "done"]
    if others:
        lines.append("Not measured: " + "; ".join(f"{m['name']} ({m['status']})" for m in others) + ".")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--orders", type=int, default=20, help="seeded orders of each model's candidates")
    ap.add_argument("--rounds", type=int, default=None,
                    help="alternation rounds per measurement (default: rounds of 20 ms, as many as 2 s per function buys, 9-60)")
    ap.add_argument("--budget-min", type=float, default=15.0,
                    help="start no model once the next one would end past this many minutes")
    ap.add_argument("--profile", default="host")
    ap.add_argument("--dump", default="", metavar="OUT.json")
    ap.add_argument("--rescore", default="", metavar="DUMP.json", help="time nothing: score a --dump again")
    args = ap.parse_args()
    if args.rescore:
        data = json.loads(Path(args.rescore).read_text())
        data["command"] += f"  (rescored: {' '.join(shlex.quote(a) for a in sys.argv)})"
        print(report(data))
        return
    bench.quiet_libraries()
    names = [m for m in args.models.split(",") if m]
    known = set(bench.DEV) | set(bench.HELD_OUT)
    if any(m not in known for m in names):
        ap.error(f"not in bench/latency.py: {', '.join(m for m in names if m not in known)}")
    with contextlib.redirect_stdout(sys.stderr):
        profile = load_profile(args.profile, progress=bench.say)
    data = {"command": " ".join(shlex.quote(a) for a in ["python"] + sys.argv), "machine": bench.machine(),
            "profile": args.profile, "date": time.strftime("%Y-%m-%d %H:%M"), "rounds": args.rounds,
            "orders": args.orders, "candidates": CANDIDATES, "models": [], "anchors": {}, "rows": [], "evals": []}
    start = time.perf_counter()
    durations: list[float] = []
    for k, name in enumerate(names):
        entry = {"name": name, "split": bench.split_of(name)}
        elapsed = time.perf_counter() - start
        if elapsed + (statistics.median(durations) if durations else 0.0) > 60 * args.budget_min:
            entry["status"] = f"not started: past the {args.budget_min:g}-minute budget"
            data["models"].append(entry)
            continue
        bench.say(f"[{k + 1}/{len(names)}] {name} at {elapsed / 60:.1f} min")
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(sys.stderr):
                anchor, rows, table = measure_model(name, profile, args.rounds)
                evals = replay(name, table, anchor, rows, profile, args.orders)
            data["anchors"][name] = dataclasses.asdict(anchor)
            data["rows"] += rows
            data["evals"] += evals
            entry["status"] = "done"
        except Exception as exc:  # noqa: BLE001 - one architecture the product cannot handle: said, not fatal
            import traceback

            bench.say(traceback.format_exc())
            entry["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        durations.append(entry["seconds"])
        data["models"].append(entry)
        bench.say(f"    {name}: {entry['status']} in {entry['seconds']:.0f} s")
        bench.release_compiled()
        if args.dump:
            Path(args.dump).write_text(json.dumps(data, indent=1))
    if args.dump:
        Path(args.dump).write_text(json.dumps(data, indent=1))
    print(report(data))


if __name__ == "__main__":
    main()
