"""Latency prediction across architectures, on a development split and a held-out split (this machine, `host`).

Every architecture (the torchvision classification zoo at a reduced input, and the custom networks of bench/nets.py)
is compressed by each strategy of STRATEGIES at batch 1 and 8, executed for real (tasks.executors.run_strategy, no
data: pruned, quantized or an untrained student) and measured in the form its artifact runs (tasks.apply.fast_form:
the float program eager, an INT8 program inductor-compiled). Three predictors are scored against the measurements:

    anchored   hardware.latency.predict_latency with the model's anchor: the original measured here once per batch
               (tasks.anchoring.measure_anchor), the candidate predicted relative to it; no truths are recorded
    profile    predict_latency with the host profile alone (what a target that cannot be measured gets)
    flops      the anchor's measured total x FLOPs(candidate) / FLOPs(original); for a candidate that runs INT8 the
               anchor's measured INT8 original in place of the float one (so the baseline knows what INT8 does to
               this model as well as the anchored predictor does, and differs from it only in how it scales)

Protocol. This VM's speed drifts by tens of percent within minutes, so no absolute time taken at one moment is
compared with one taken at another. Every candidate is timed in alternation with the original, round by round
(tasks.apply.measure_candidate), and its measured latency is that ratio times the anchor's total at the same batch:
the latency it has on the anchor's scale, the scale the anchored prediction is on. An INT8 candidate is timed against
the anchor's own compiled INT8 original instead, times the anchor's INT8 total (a compiled INT8 graph's ratio to the
eager float original moves with the machine's state from minute to minute; two INT8 graphs timed together do not).
The drift moves both the candidate and its reference within a round and cancels in the ratio; the spread of the
ratios over the rounds is dumped with every row. The profile-only predictor is scored on the same scale, so a drift between calibration and
anchor counts against it (that is the error a user without the target would see).

`quantize:int8` alone is the anchor's own quantized original: its anchored prediction is a measurement of the same
program (compiled again, and timed against the anchor's build), so its error is the measurement's noise and the
difference between two builds. The scores are given with and without it.

The split: DEV are the architectures the latency model was developed on; HELD_OUT the others, never looked at while
developing it. Each split is scored separately (MAPE, share within +-10% and +-25%, Kendall's tau over the
configurations, and the mean tau within each model and batch), over all configurations and float / INT8 only.

Budget: an INT8 graph is compiled for each batch it runs at (5-30 s each, three per model and batch), so INT8
candidates are measured at batch 1 only (`--int8-batches`), float candidates at every batch. `--budget-min` stops
starting architectures once the next one (at the median time of those done) would end past it; the report lists
those not started and the time they need, and `--resume DUMP.json` measures them in a later run and adds them to the
dump (every architecture is measured against its own anchor within minutes, so runs combine). SKIPPED lists the
torchvision architectures left out, and why. `--split all` interleaves DEV and HELD_OUT, so a run cut short keeps
both.

    .venv/bin/python bench/latency.py [--split dev|held-out|all] [--models a,b,c] [--budget-min 30]
                                      [--batches 1,8] [--int8-batches 1] [--rounds N] [--profile host]
                                      [--dump OUT.json] [--resume DUMP.json] [--rescore DUMP.json]

Progress goes to stderr, the report (markdown) to stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import platform
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
from scipy.stats import kendalltau  # noqa: E402

import nets  # noqa: E402  (bench/nets.py, beside this file)
from estimators.analyze import analyze  # noqa: E402
from estimators.compress import estimate  # noqa: E402
from estimators.modelspec import LoadedModel, load_model  # noqa: E402
from estimators.strategy import parse_strategy  # noqa: E402
from estimators.table import totals  # noqa: E402
from hardware.anchor import runtime_of  # noqa: E402
from hardware.hostprofile import profile_hash  # noqa: E402
from hardware.latency import predict_latency  # noqa: E402
from hardware.measure import describe_rounds  # noqa: E402
from hardware.profile import load_profile  # noqa: E402
from tasks.anchoring import forget_int8_references, measure_anchor, original_program  # noqa: E402
from tasks.apply import fast_form, measure_candidate  # noqa: E402
from tasks.executors import run_strategy  # noqa: E402

STRATEGIES = ["prune:0.3", "prune:0.6:global", "quantize:int8", "prune:0.3,quantize:int8", "distill:width:0.5"]
ANCHOR_OWN = "quantize:int8"  # the anchor's own quantized original
PREDICTORS = ("anchored", "profile", "flops")

DEV = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x1_0", "vgg11",
       "squeezenet1_1"]
HELD_OUT = [  # roughly by cost, so that a run cut short by the budget keeps the most; with bench/nets.py's networks
    "se_net", "shufflenet_v2_x0_5", "mnasnet0_5", "dw_separable", "regnet_x_400mf", "encoder_vit",
    "mobilenet_v3_large", "regnet_y_400mf", "attention_vit", "efficientnet_b1", "mnasnet1_0", "concat_group",
    "squeezenet1_0", "googlenet", "regnet_x_800mf", "regnet_y_800mf", "shufflenet_v2_x2_0", "alexnet",
    "efficientnet_b3", "densenet121", "resnet34", "regnet_x_1_6gf", "regnet_y_1_6gf", "efficientnet_v2_s",
    "inception_v3", "resnext50_32x4d", "convnext_tiny", "vit_b_32", "vgg11_bn", "resnet101", "wide_resnet50_2",
    "vgg13", "vit_b_16",
]
SIZES = {"inception_v3": 96}  # input height = width where 64 is too small for the architecture
DEFAULT_SIZE = 64
SKIPPED = {  # torchvision classification architectures left out, and why
    "maxvit_t": "its window partition needs a 224 input: 10.9 GFLOPs, minutes per model on 2 cores",
    "swin_t": "its INT8 graph took 166 s to compile here (a loaded machine), and a model compiles three",
    "swin_v2_t": "analysis fails (IndexError in estimators/registry.py linear_module: the continuous position-bias "
                 "MLP's input is a buffer, not a traced tensor)",
    **{n: "analysis fails (IndexError in estimators/registry.py linear_module: the continuous position-bias MLP's input "
          "is a buffer, not a traced tensor)" for n in ("swin_v2_s", "swin_v2_b")},
    **{n: "a larger member of a family in the benchmark: over the time budget on 2 cores" for n in (
        "convnext_small", "convnext_base", "convnext_large", "densenet161", "densenet169", "densenet201",
        "efficientnet_b2", "efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7",
        "efficientnet_v2_m", "efficientnet_v2_l", "mnasnet0_75", "mnasnet1_3", "regnet_x_3_2gf", "regnet_x_8gf",
        "regnet_x_16gf", "regnet_x_32gf", "regnet_y_3_2gf", "regnet_y_8gf", "regnet_y_16gf", "regnet_y_32gf",
        "regnet_y_128gf", "resnet152", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet101_2",
        "shufflenet_v2_x1_5", "swin_s", "swin_b", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "vit_l_16",
        "vit_l_32", "vit_h_14")},
}


def split_of(name: str) -> str:
    return "dev" if name in DEV else "held-out"


def models_of(split: str) -> list[str]:
    """The architectures of a split, DEV and HELD_OUT interleaved for `all` (a run cut short by the budget keeps
    both splits)."""
    if split == "dev":
        return list(DEV)
    if split == "held-out":
        return list(HELD_OUT)
    out, held = [], list(HELD_OUT)
    for name in DEV:
        out += [name] + held[:3]
        held = held[3:]
    return out + held


def load_arch(name: str) -> LoadedModel:
    """An architecture of the benchmark as the estimators load it: a custom net of bench/nets.py, a ViT built at
    the reduced image size, or a torchvision model spec at its input size."""
    if name in nets.NETS:
        return nets.loaded(name)
    size = SIZES.get(name, DEFAULT_SIZE)
    if name.startswith("vit_"):
        import torch
        import torchvision

        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None, image_size=size).eval()
        return LoadedModel(spec=f"torchvision:{name}(image_size={size})", kind="factory", model=model,
                           input_shape=(1, 3, size, size))
    return load_model(f"torchvision:{name}", input_shape=(1, 3, size, size))


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def quiet_libraries() -> None:
    for name in ("neural_compressor", "torch._inductor", "torch._dynamo", "torch.export"):
        logging.getLogger(name).setLevel(logging.ERROR)


def release_compiled() -> None:
    """Drop what one model compiled and built before the next starts."""
    import torch

    forget_int8_references()
    torch._dynamo.reset()
    gc.collect()


def configurations(name: str, loaded: LoadedModel, profile, text: str, est, flops0: float, anchors: dict, original,
                   batches: list[int], int8_batches: list[int], rounds: int, times: dict) -> list[dict]:
    """One strategy executed and measured at each of its batches, with the three predictions: one row per batch.
    `times` accumulates the seconds spent executing and measuring."""
    t0 = time.perf_counter()
    work = run_strategy(loaded, parse_strategy(text))
    int8 = work.quant is not None and work.quant.dtype == "int8"
    times["execute_s"] += time.perf_counter() - t0
    ratio_flops = totals(est)["flops"] / flops0
    rows = []
    for b in batches:
        if int8 and b not in int8_batches:
            continue
        t0 = time.perf_counter()
        fn = fast_form(work.program, int8)  # a fresh graph per batch: an INT8 one compiles for the batch it runs
        anchor = anchors[b]
        got = measure_candidate(fn, loaded, b, anchor, original, int8=int8, rounds=rounds)
        times["measure_s"] += time.perf_counter() - t0
        base = anchor.runtimes["int8"]["measured_ms"] if int8 and "int8" in anchor.runtimes else anchor.total_ms
        anchored = predict_latency(est, profile, b, anchor=anchor)
        rows.append({
            "model": name, "split": split_of(name), "spec": loaded.spec, "input_shape": list(loaded.input_shape),
            "strategy": text, "batch": b, "runtime": runtime_of(est),
            "measured_ms": got["latency_ms"], "ratio": got["ratio"], "ratio_iqr": got["ratio_iqr"],
            "reference": got["reference"], "rounds": got["rounds"], "window_ms": got["window_ms"],
            "window_reference_ms": got["original_ms"],
            "anchor_ms": anchor.total_ms, "anchor_int8_ms": anchor.runtimes.get("int8", {}).get("measured_ms"),
            "pred_anchored_ms": anchored.latency_ms, "anchored_basis": anchored.basis,
            "pred_profile_ms": predict_latency(est, profile, b).latency_ms,
            "pred_flops_ms": base * ratio_flops, "flops_ratio": ratio_flops,
        })
        r = rows[-1]
        say(f"    {text:24s} b{b}: measured {r['measured_ms']:8.3f} ms (ratio {r['ratio']:.3f} +-{r['ratio_iqr']:.3f})"
            f"  anchored {r['pred_anchored_ms']:8.3f}  profile {r['pred_profile_ms']:8.3f}  flops "
            f"{r['pred_flops_ms']:8.3f}")
    return rows


def bench_model(name: str, profile, strategies: list[str], batches: list[int], int8_batches: list[int],
                rounds: int) -> tuple[list[dict], dict]:
    """Measure and predict every configuration of one architecture: (rows, timing of its phases in seconds)."""
    times = {}
    t0 = time.perf_counter()
    loaded = load_arch(name)
    table = analyze(loaded)
    flops0 = totals(table)["flops"]
    original = original_program(loaded).module()
    times["analyze_s"] = time.perf_counter() - t0
    int8_fast = "int8" in profile.fast_dtypes
    t0 = time.perf_counter()
    anchors = {b: measure_anchor(loaded, table, profile, b, int8=int8_fast and b in int8_batches,
                                 progress=lambda m: say(f"    {m}")) for b in batches}
    times["anchors_s"] = time.perf_counter() - t0
    rows: list[dict] = []
    times["execute_s"] = times["measure_s"] = 0.0
    for text in strategies:
        est = estimate(table, parse_strategy(text))
        try:
            rows += configurations(name, loaded, profile, text, est, flops0, anchors, original, batches, int8_batches,
                                   rounds, times)
        except Exception as exc:  # noqa: BLE001 - a strategy the executors cannot apply to this model: said, not fatal
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            say(f"    {text}: not executed or not measured ({type(exc).__name__}: {first})")
            rows.append({"model": name, "split": split_of(name), "strategy": text, "runtime": runtime_of(est),
                         "error": f"{type(exc).__name__}: {first}"})
    return rows, times


# ------------------------------------------------------------------------------------------------------------ scores
SUBSETS = [
    ("all", lambda r: True),
    (f"all but {ANCHOR_OWN}", lambda r: r["strategy"] != ANCHOR_OWN),
    ("float", lambda r: r["runtime"] == "float"),
    ("int8", lambda r: r["runtime"] == "int8"),
    (f"int8 but {ANCHOR_OWN}", lambda r: r["runtime"] == "int8" and r["strategy"] != ANCHOR_OWN),
]


def score(rows: list[dict], predictor: str) -> dict:
    """MAPE %, % within +-10% and +-25%, Kendall's tau over the rows, and the mean tau within each (model, batch)."""
    meas = np.array([r["measured_ms"] for r in rows])
    pred = np.array([r[f"pred_{predictor}_ms"] for r in rows])
    err = np.abs(pred - meas) / meas
    tau = kendalltau(pred, meas)[0] if len(rows) > 1 else float("nan")
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["batch"]), []).append(r)
    inner = [kendalltau([g[f"pred_{predictor}_ms"] for g in grp], [g["measured_ms"] for g in grp])[0]
             for grp in groups.values() if len(grp) >= 3]
    inner = [t for t in inner if np.isfinite(t)]
    return {"n": len(rows), "mape": 100 * float(err.mean()), "within10": 100 * float((err <= 0.10).mean()),
            "within25": 100 * float((err <= 0.25).mean()), "tau": float(tau),
            "tau_in_model": float(np.mean(inner)) if inner else float("nan")}


def split_table(rows: list[dict]) -> list[str]:
    out = ["| configurations | n | predictor | MAPE % | within ±10% | within ±25% | Kendall τ | τ within model |",
           "|---|---:|---|---:|---:|---:|---:|---:|"]
    for label, keep in SUBSETS:
        sub = [r for r in rows if keep(r)]
        if not sub:
            continue
        for p in PREDICTORS:
            s = score(sub, p)
            taus = " | ".join(f"{t:.3f}" if np.isfinite(t) else "–" for t in (s["tau"], s["tau_in_model"]))
            out.append(f"| {label} | {s['n']} | {p} | {s['mape']:.1f} | {s['within10']:.1f} | {s['within25']:.1f} | "
                       f"{taus} |")
    return out


def report(data: dict) -> str:
    """The markdown report of a run (or of a dump, rescored)."""
    rows = [r for r in data["rows"] if "error" not in r]
    lines = [f"`{data['command']}`", "",
             f"{data['machine']}; profile {data['profile']}; {data['date']}; strategies {', '.join(data['strategies'])}"
             f"; batches {', '.join(map(str, data['batches']))} (INT8 at batch "
             f"{', '.join(map(str, data['int8_batches']))} only); {describe_rounds(data['rounds'])} per "
             "configuration.", "",
             "Measured: each candidate timed in alternation with the original, x the anchor's total at that batch. "
             f"`{ANCHOR_OWN}` alone is the anchor's own quantized original (its anchored prediction is a measurement "
             "of the same program). flops: the anchor's measured total (INT8 original for INT8 candidates) x the FLOPs "
             "ratio.", ""]
    for split in ("dev", "held-out"):
        mine = [m for m in data["models"] if m["split"] == split]
        if not mine:
            continue
        done = [m for m in mine if m["status"] == "done"]
        srows = [r for r in rows if r["split"] == split]
        lines += [f"### {split}: {len(done)} architectures, {len(srows)} configurations", ""]
        if srows:
            lines += split_table(srows) + [""]
        lines.append("Architectures: " + ", ".join(f"{m['name']} ({m['input']}, {m['seconds']:.0f} s)" for m in done)
                     + ".")
        others = [m for m in mine if m["status"] != "done"]
        if others:
            lines.append("Not measured: " + "; ".join(f"{m['name']} ({m['status']})" for m in others) + ".")
        lines.append("")
    waiting = [m for m in data["models"] if m["status"].startswith("not started")]
    timed = [m["seconds"] for m in data["models"] if m["status"] == "done"]
    if waiting and timed:
        lines += [f"{len(waiting)} architectures not started: at the median {statistics.median(timed):.0f} s per "
                  f"architecture they need about {len(waiting) * statistics.median(timed) / 60:.0f} minutes more "
                  "(`--resume DUMP.json` measures them and adds them to the dump).", ""]
    failed = [r for r in data["rows"] if "error" in r]
    if failed:
        lines.append("Configurations not executed: " + "; ".join(f"{r['model']} {r['strategy']} ({r['error']})"
                                                                for r in failed) + ".")
        lines.append("")
    reasons: dict[str, list[str]] = {}
    for name, why in data["skipped"].items():
        reasons.setdefault(why, []).append(name)
    lines.append("Left out of the zoo: " + "; ".join(f"{', '.join(names)} ({why})" for why, names in reasons.items())
                 + ".")
    return "\n".join(lines)


def resumed(prev: dict, now: dict) -> dict:
    """A run's dump continued by this one: its measured architectures kept, the settings checked alike."""
    for key in ("strategies", "batches", "int8_batches", "rounds", "profile", "profile_hash", "machine"):
        if prev.get(key) != now[key]:
            raise SystemExit(f"--resume: the dump was run with {key} {prev.get(key)}, this run has {now[key]}")
    done = [m for m in prev["models"] if m["status"] == "done"]
    names = {m["name"] for m in done}
    return {**prev, "command": f"{prev['command']}; {now['command']}", "date": f"{prev['date']}; {now['date']}",
            "split": now["split"], "models": done, "rows": [r for r in prev["rows"] if r["model"] in names]}


def dump_split(prev: dict) -> str:
    """The split a dump's run measured: as it recorded it, else the one split of all its architectures (`all`
    where they are of both)."""
    if prev.get("split"):
        return prev["split"]
    splits = {m["split"] for m in prev.get("models", [])}
    return splits.pop() if len(splits) == 1 else "all"


def torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def machine() -> str:
    import torch

    from hardware.measure import cpuinfo

    return f"{cpuinfo('model name') or platform.processor()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=("dev", "held-out", "all"), default=None,
                    help="the architectures to run (default: all; with --resume, the split of the dump's run)")
    ap.add_argument("--models", default="", help="a subset of architectures (comma-separated), in place of --split")
    ap.add_argument("--budget-min", type=float, default=30.0,
                    help="start no model once the next one would end past this many minutes")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--int8-batches", default="1", help="the batches INT8 candidates are measured at")
    ap.add_argument("--rounds", type=int, default=None,
                    help="alternation rounds per measurement (default: rounds of 20 ms, as many as 2 s per function buys, 9-60)")
    ap.add_argument("--profile", default="host")
    ap.add_argument("--dump", default="", metavar="OUT.json", help="write every row here")
    ap.add_argument("--resume", default="", metavar="DUMP.json",
                    help="continue the run of this dump: measure the architectures it lacks, write them into it")
    ap.add_argument("--rescore", default="", metavar="DUMP.json", help="time nothing: score a --dump again")
    args = ap.parse_args()
    prev = json.loads(Path(args.resume).read_text()) if args.resume else None  # the run to continue
    if args.split is None:
        args.split = dump_split(prev) if prev else "all"
    if args.rescore:
        data = json.loads(Path(args.rescore).read_text())
        if args.split != "all":
            data["models"] = [m for m in data["models"] if m["split"] == args.split]
            data["rows"] = [r for r in data["rows"] if r["split"] == args.split]
        data["command"] += f"  (rescored: {' '.join(shlex.quote(a) for a in sys.argv)})"
        print(report(data))
        return
    quiet_libraries()
    names = [m for m in args.models.split(",") if m] or models_of(args.split)
    known = set(DEV) | set(HELD_OUT)
    unknown = [m for m in names if m not in known]
    if unknown:
        ap.error(f"not in the benchmark: {', '.join(unknown)} (DEV: {', '.join(DEV)}; HELD_OUT: {', '.join(HELD_OUT)})")
    batches = [int(b) for b in args.batches.split(",")]
    int8_batches = [int(b) for b in args.int8_batches.split(",") if b and int(b) in batches]
    with contextlib.redirect_stdout(sys.stderr):  # libraries that print: the report alone goes to stdout
        profile = load_profile(args.profile, progress=say)
    data = {"command": " ".join(shlex.quote(a) for a in ["python"] + sys.argv), "machine": machine(),
            "profile": args.profile, "profile_hash": profile_hash(profile), "date": time.strftime("%Y-%m-%d %H:%M"),
            "strategies": STRATEGIES, "batches": batches, "int8_batches": int8_batches, "rounds": args.rounds, "skipped": SKIPPED,
            "split": args.split, "models": [], "rows": []}
    if args.resume:
        data = resumed(prev, data)
        names = [n for n in names if n not in {m["name"] for m in data["models"]}]
        args.dump = args.dump or args.resume
    unlisted = [n for n in torchvision_names() if n not in set(DEV) | set(HELD_OUT) | set(SKIPPED)]
    if unlisted:
        say(f"torchvision architectures neither benchmarked nor listed as skipped: {', '.join(unlisted)}")
    start = time.perf_counter()
    durations: list[float] = []
    for k, name in enumerate(names):
        size = f"{SIZES.get(name, DEFAULT_SIZE)}x{SIZES.get(name, DEFAULT_SIZE)}"
        entry = {"name": name, "split": split_of(name), "input": size, "seconds": 0.0}
        elapsed = time.perf_counter() - start
        expected = statistics.median(durations) if durations else 0.0
        if elapsed + expected > 60 * args.budget_min:
            entry["status"] = f"not started: past the {args.budget_min:g}-minute budget"
            data["models"].append(entry)
            continue
        say(f"[{k + 1}/{len(names)}] {name} ({split_of(name)}, {size}) at {elapsed / 60:.1f} min")
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(sys.stderr):
                rows, times = bench_model(name, profile, STRATEGIES, batches, int8_batches, args.rounds)
            data["rows"] += rows
            entry.update(status="done", **{phase: round(v, 1) for phase, v in times.items()})
        except Exception as exc:  # noqa: BLE001 - one architecture the product cannot handle: said, not fatal
            import traceback

            say(traceback.format_exc())
            entry["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        durations.append(entry["seconds"])
        data["models"].append(entry)
        say(f"    {name}: {entry['status']} in {entry['seconds']:.0f} s"
            + (f" (analyze {entry['analyze_s']:.0f} s, anchors {entry['anchors_s']:.0f} s, execute "
               f"{entry['execute_s']:.0f} s, measure {entry['measure_s']:.0f} s)" if entry["status"] == "done" else ""))
        release_compiled()
        if args.dump:  # after every model: a run stopped midway keeps what it measured
            Path(args.dump).write_text(json.dumps(data, indent=1))
    data["total_min"] = round((time.perf_counter() - start) / 60, 1)
    if args.dump:
        Path(args.dump).write_text(json.dumps(data, indent=1))
    print(report(data))
    print(f"\n{len(data['rows'])} configurations in {data['total_min']} min.")


if __name__ == "__main__":
    main()
