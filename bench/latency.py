"""Host latency: predicted vs measured for torchvision models x {none, prune 0.3, prune 0.6, int8} x batch {1, 8}.

Prints, side by side, MAPE, the share within +-10% and Kendall's tau for
  calibrated   the `host` profile fitted by `deployfit calibrate`
  roofline     the same peaks (measured GEMM FLOP/s and DRAM bandwidth) with no fitted efficiency/overhead
  flops        latency proportional to FLOPs (seconds per FLOP of the host's dense-conv fit)
Every configuration is measured as its saved artifact runs: float programs as ExportedProgram.module(), int8
ones inductor-compiled (the forms the host profile predicts). Each model is measured in a process of its own,
as a deployment runs it: its artifacts are built and saved, what built them is dropped, they are loaded back.
(Measured all in one process holding the 64 configurations, one round against the median of four was within
10% for 78-88% of them in six runs; measured per model, 93% and 94% in two.) The models' processes are all
built first and then take the `--rounds` rounds in turn, every round measuring every model's configurations
(median of the rounds; the spread between rounds is printed as the noise floor): a model's rounds lie minutes
apart, so a slow spell of this VM (seconds to minutes) does not fall on all of them at once. Measured one
model after another, each model's rounds within two minutes, the same per-configuration model scored 76.6-90.6%
within 10% in six runs, while the median over those six runs of each configuration's ratio was within 10% for
92% of them (2026-11-29): most of a run's misses were one model's window of time. Five rounds by default: two
three-round runs pooled and scored on five of their six rounds came within 10% for 81.2-92.2% of the
configurations at the profile's pace (against 81.2-89.1% for the four three-round runs alone; host.yaml of
2026-11-30); a round costs about 2.5 minutes after the first (which waits for the INT8 graphs' compiles).

    .venv/bin/python bench/latency.py [--models resnet18,...] [--strategies none,prune:0.3,...] [--batches 1,8]
                                      [--rounds 5] [--profile host] [--compare PATH,...] [--calibrate OUT.yaml]
                                      [--state-wait SECONDS] [--dump OUT.json] [--rescore DUMP.json
                                      [--against OTHER.json]]

Every measurement times the configuration in alternation with the pace network (hardware.measure.PaceReference,
a fixed small CNN; measure_paced) and records the pace network's median beside it. This VM's speed drifts with
its neighbours' load, by 25-50% within a minute, and the drift is common to every workload, so a third score
brings each measurement to the profile's pace (its calibration's median pace network latency, which its
samples were fitted at: latency x (profile pace / pace beside it) ** the profile's pace elasticity, the share
of the pace network's drift a network's latency follows, measured by the calibration) before taking the median
of the rounds: the latency the configuration has when the machine runs as fast as it did when calibrated, which
is what a calibrated profile predicts. The raw medians are scored as before, beside it.

`--rescore DUMP.json --against OTHER.json` scores another run's measurements as one more predictor of the
rescored run's (raw, and both brought to one pace): two runs of this benchmark are the closest any predictor can
be expected to come to one run on this machine (on 2026-11-29 the ten pairs of five runs agreed within 10% for
20-50% of the configurations raw, 75-94% brought to one pace).

`--compare` adds other calibrated profiles (names or YAML paths, e.g. a previous calibration) as further
predictors of the same measurements: this machine's speed drifts between runs, so two calibrations are
only comparable measured together. `--calibrate OUT.yaml` first calibrates this machine (as `deployfit
calibrate --out OUT.yaml`, about 2.7 minutes; it never runs the models benchmarked here) and tests that
fresh profile, with `--profile` as the first comparison: the measurements then come minutes after the
calibration, as when a user calibrates before predicting.

This VM switches between two states for minutes at a time (hardware.measure.sync_probe_us, one elementwise
kernel split over all threads, mostly fork and join: 3.4-4.1 us with memory copies at ~44 GB/s, or 4.7-5.8 us
with ~80 GB/s; batch-1 networks ran up to 35% slower in the second at the medians of five runs). A
calibrated profile describes the state its calibration was fitted in (provenance `sync_probe_us`). The probe
is read before every measurement; after the rounds, the configurations with fewer than half their
measurements in the profile's state are measured again while the machine is in it, for at most
`--state-wait` seconds in all. The summary scores the median of all rounds and, beside it, the median of
each configuration's measurements taken in the profile's state. `--dump OUT.json` writes every measurement,
its probe and the predictions; `--rescore DUMP.json` measures nothing and scores `--profile` and `--compare`
against those measurements (in `--profile`'s state for the second score).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
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
from hardware.calibrate import calibrate_host  # noqa: E402
from hardware.profile import Efficiency, load_profile, save_profile  # noqa: E402
from hardware.measure import (STATE_TOLERANCE, PaceReference, at_pace, machine_note, measure_latency,  # noqa: E402
                              measure_paced, same_state, sync_probe_us)
from tasks.executors import run_strategy, save_artifact  # noqa: E402
from tasks.quantize_exec import compile_for_inference, load_program  # noqa: E402

MODELS = "mobilenet_v2,mobilenet_v3_large,efficientnet_b0,shufflenet_v2_x1_0,regnet_y_400mf,resnet18,resnet50,vgg11"


def uncalibrated(host):
    ones = {c: 1.0 for c in host.efficiency.compute}
    flat = Efficiency(compute=ones, bandwidth=ones, kernel_overhead_us=0.0, view_overhead_us=0.0, fused=[])
    return host.model_copy(update={"name": "roofline", "efficiency": flat, "dtype_overrides": {}, "batch_efficiency": {},
                                   "cache_bytes": None, "cache_bandwidth_gbs": None, "combine": "max"})


def stats(pred, meas):
    pred, meas = np.array(pred), np.array(meas)
    err = np.abs(pred - meas) / meas
    return 100 * err.mean(), 100 * (err <= 0.10).mean(), kendalltau(pred, meas)[0]


def by_dtype(pred, meas, is_int8) -> list[tuple[str, float, float]]:
    """(float or int8, MAPE %, within 10% %) for the configurations of each kind present."""
    pred, meas = np.asarray(pred), np.asarray(meas)
    return [(lab, *stats(pred[sel], meas[sel])[:2]) for lab, sel in (("float", ~is_int8), ("int8", is_int8))
            if sel.any()]


def in_state(meas: list[float], probes: list[float], state: float) -> list[float]:
    """A configuration's measurements taken in the machine state `state` (its probe before each)."""
    return [m for m, p in zip(meas, probes) if same_state(p, state)]


def in_state_medians(meas: list[list[float]], probes: list[list[float]], state: float | None) -> np.ndarray:
    """Per configuration, the median of its measurements taken in the machine state `state` (nan where none)."""
    out = np.full(len(meas), np.nan)
    if state is None:
        return out
    for i, (ms, ps) in enumerate(zip(meas, probes)):
        kept = in_state(ms, ps, state)
        if kept:
            out[i] = float(np.median(kept))
    return out


def score_lines(labels: list[str], preds: np.ndarray, meas: np.ndarray, is_int8: np.ndarray) -> list[str]:
    """One line per predictor (columns of `preds`): MAPE, within 10%, tau, and the float/int8 breakdown, on the
    configurations `meas` has a figure for. `meas`: one figure per configuration, or (paced) one column per
    predictor (the measurements at that predictor's profile's pace)."""
    cols = meas if meas.ndim == 2 else np.repeat(meas[:, None], preds.shape[1], 1)
    out = []
    width = max(12, *map(len, labels))
    for j, label in enumerate(labels):
        m = cols[:, j]
        ok = ~np.isnan(m)
        if not ok.any():
            out.append(f"{label:{width}s} (no measurement to score: a profile calibrated before the pace was read)")
            continue
        mape, within, tau = stats(preds[ok, j], m[ok])
        # the median signed error: a level shift (the machine faster or slower than when calibrated) moves it,
        # a structural error of some configurations hardly does
        bias = 100 * float(np.median(preds[ok, j] / m[ok] - 1))
        out.append(f"{label:{width}s} {mape:8.1f} {within:15.1f} {tau:12.3f}   " + ", ".join(
            f"{lab} {x:.1f}% / {w:.1f}%" for lab, x, w in by_dtype(preds[ok, j], m[ok], is_int8[ok]))
            + f"; median error {bias:+.1f}%")
    # a diagnostic, not a prediction: the first predictor's figures divided by their median ratio to these
    # measurements (what knowing the machine's level at measurement time would give; the shape of the model)
    ok = ~np.isnan(cols[:, 0])
    if not ok.any():
        return out
    level = float(np.median(preds[ok, 0] / cols[ok, 0]))
    mape, within, _ = stats(preds[ok, 0] / level, cols[ok, 0])
    out.append(f"  ({labels[0]} divided by its median ratio {level:.3f}, a diagnostic: MAPE {mape:.1f}%, within 10% "
               f"{within:.1f}%)")
    return out


def paced_medians(meas: np.ndarray, pace: np.ndarray, profiles: list) -> np.ndarray | None:
    """Per configuration (rows) and profile (columns), the median over the rounds of its measurements brought to the
    profile's pace with its elasticity (hardware.measure.at_pace); `meas` and `pace`: rounds x configurations. A
    profile without a pace has a column of nan; None where no profile has one or a measurement has none."""
    if not any(p.calibrated_pace() for p in profiles) or not np.all(pace > 0):
        return None
    return np.stack([np.median(at_pace(meas, pace, p.calibrated_pace(), p.pace_elasticity()), axis=0)
                     if p.calibrated_pace() else np.full(meas.shape[1], np.nan) for p in profiles], 1)


def other_run(data: dict, path: str) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """Another run's dump (`--against`) as a predictor of `data`'s configurations: its medians of the rounds, and
    its measurements and pace readings (rounds x configurations; None where it has no pace readings). Two runs of
    the same code on the same machine are the best any predictor can agree with a run: the share of
    configurations whose medians agree within 10% between runs is what that target can reach here."""
    other = json.loads(Path(path).read_text())
    by_key = {(c["model"], c["strategy"], c["batch"]): c for c in other["configs"]}
    missing = [k for k in ((c["model"], c["strategy"], c["batch"]) for c in data["configs"]) if k not in by_key]
    if missing:
        raise SystemExit(f"--against {path}: no measurement of {len(missing)} configurations of the rescored run, "
                         f"e.g. {missing[0]}")
    rows = [by_key[(c["model"], c["strategy"], c["batch"])] for c in data["configs"]]
    r = other["rounds"]
    raw = np.array([float(np.median(c["meas_ms"][:r])) for c in rows])
    if not all(c.get("pace_ms") for c in rows):
        return raw, None
    return raw, (np.array([c["meas_ms"][:r] for c in rows]).T, np.array([c["pace_ms"][:r] for c in rows]).T)


def rescore(path: str, profiles: list[str], against: str = "") -> None:
    """Score profiles against the measurements of an earlier run (`--dump`), without measuring again: on all of its
    rounds, and on the measurements taken in the first profile's machine state. `against`: another run's dump,
    scored as one more predictor (other_run)."""
    data = json.loads(Path(path).read_text())
    loaded = [(p, load_profile(p)) for p in profiles]
    tables: dict = {}
    preds, int8 = [], []
    rounds = data["rounds"]
    for c in data["configs"]:
        if c["model"] not in tables:
            tables[c["model"]] = analyze(load_model(f"torchvision:{c['model']}"))
        key = (c["model"], c["strategy"])
        if key not in tables:
            tables[key] = estimate(tables[c["model"]], parse_strategy(c["strategy"]))
        preds.append([predict_latency(tables[key], prof, c["batch"]).latency_ms for _, prof in loaded])
        int8.append(c["strategy"] == "quantize:int8")
    preds, int8 = np.array(preds), np.array(int8)
    meas = np.array([float(np.median(c["meas_ms"][:rounds])) for c in data["configs"]])
    state = loaded[0][1].calibrated_state()
    inst = in_state_medians([c["meas_ms"] for c in data["configs"]], [c["sync_probe_us"] for c in data["configs"]],
                            state)
    labels = [name for name, _ in loaded]
    run_raw, run_paced = other_run(data, against) if against else (None, None)
    print(f"{len(meas)} configurations measured in {path}")
    print(f"all rounds (median of {rounds}):  MAPE %, within 10% %, tau")
    if run_raw is not None:
        print("\n".join(score_lines(labels + [f"run {against}"], np.column_stack([preds, run_raw]), meas, int8)))
    else:
        print("\n".join(score_lines(labels, preds, meas, int8)))
    if all("pace_ms" in c for c in data["configs"]):
        run_meas = np.array([c["meas_ms"][:rounds] for c in data["configs"]]).T
        run_pace = np.array([c["pace_ms"][:rounds] for c in data["configs"]]).T
        paced = paced_medians(run_meas, run_pace, [prof for _, prof in loaded])
        p_labels, p_preds = labels, preds
        if paced is not None and run_paced is not None:
            # both runs brought to one pace (this run's median reading, the first profile's elasticity): the
            # other's medians predict this one's
            ref, (o_meas, o_pace) = float(np.median(run_pace)), run_paced
            e = loaded[0][1].pace_elasticity()
            p_labels = labels + [f"run {against}"]
            p_preds = np.column_stack([preds, np.median(at_pace(o_meas, o_pace, ref, e), axis=0)])
            paced = np.column_stack([paced, np.median(at_pace(run_meas, run_pace, ref, e), axis=0)])
        if paced is not None:
            print("at each profile's pace (every measurement x (the profile's pace / the pace network's median "
                  "beside it) ** the profile's pace elasticity):")
            print("\n".join(score_lines(p_labels, p_preds, paced, int8)))
    if state is not None:
        print(f"in {labels[0]}'s state (sync probe {state:.2f} us +-{100 * STATE_TOLERANCE:.0f}%): "
              f"{int((~np.isnan(inst)).sum())} of {len(meas)} configurations measured in it")
        print("\n".join(score_lines(labels, preds, inst, int8)))


def measure_in_state(runs: list[tuple], meas: list[list[float]], probes: list[list[float]], state: float, need: int,
                     wait_s: float) -> None:
    """Measure again, while the machine is in the state `state` (its sync probe within STATE_TOLERANCE), the
    configurations (`runs`: (fn, example) each) with fewer than `need` measurements in that state, for at most
    `wait_s` seconds; every measurement and its probe are appended to `meas` and `probes`."""
    t0 = time.perf_counter()
    added, last = 0, t0
    while time.perf_counter() - t0 < wait_s:
        lacking = [i for i in range(len(runs)) if len(in_state(meas[i], probes[i], state)) < need]
        if not lacking:
            break
        for i in lacking:
            if time.perf_counter() - t0 >= wait_s:
                break
            p = sync_probe_us(0.1)
            if not same_state(p, state):
                continue
            fn, ex = runs[i]
            meas[i].append(measure_latency(fn, ex, warmup=3, min_runs=10, budget_s=1.0)["latency_ms"])
            probes[i].append(p)
            added += 1
        if time.perf_counter() - last > 30:
            last = time.perf_counter()
            print(f"  [{last - t0:4.0f}/{wait_s:.0f} s] in the calibration's state ({state:.2f} us): {len(lacking)} "
                  f"configurations with fewer than {need} measurements in it; {added} measured again", flush=True)
    left = sum(len(in_state(meas[i], probes[i], state)) < need for i in range(len(runs)))
    print(f"measured again in the calibration's state: {added} measurements in {time.perf_counter() - t0:.0f} s; "
          f"{left} configurations still with fewer than {need}", flush=True)


def build_runs(name: str, strategies: list[str], batches: list[int]) -> list[tuple]:
    """Build one model's artifacts, save them and load them back as a deployment would: (strategy, batch, fn,
    example) per configuration, float programs as ExportedProgram.module(), INT8 ones inductor-compiled."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model(f"torchvision:{name}")
        saved = []
        for k, text in enumerate(strategies):
            strat = parse_strategy(text)
            work = run_strategy(loaded, strat)
            saved.append((text, save_artifact(work, strat, f"{tmp}/{name}-{k}")["model"],
                          work.quant is not None and work.quant.dtype == "int8", [work.example(b) for b in batches]))
        del loaded, work
        gc.collect()  # what built the artifacts is gone: the process holds what it serves
        for text, path, int8, examples in saved:
            ep = load_program(path)
            fn = compile_for_inference(ep) if int8 else ep.module()
            runs += [(text, b, fn, ex) for b, ex in zip(batches, examples)]
    return runs


def serve_model(conn, name: str, strategies: list[str], batches: list[int]) -> None:
    """One model's process: build its artifacts (build_runs), say "ready", then on each command from `conn`:
    "round" measures every configuration once (in alternation with the pace network, its sync probe before),
    ("state", state, need, wait_s) measures again in the calibration's state (measure_in_state), "result" sends
    every configuration's measurements and ends. Idle between commands (blocked on the pipe), so the models'
    processes take their rounds in turn."""
    runs = build_runs(name, strategies, batches)
    meas, probes, paces = [[] for _ in runs], [[] for _ in runs], [[] for _ in runs]
    reference = PaceReference()
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd == "round":
            for i, (_, _, fn, ex) in enumerate(runs):
                probes[i].append(sync_probe_us(0.1))
                got = measure_paced(fn, ex, reference, warmup=3, min_runs=10, budget_s=1.0)
                meas[i].append(got["latency_ms"])
                paces[i].append(got["pace_ms"])
            conn.send(float(np.median([p[-1] for p in probes])))
        elif isinstance(cmd, tuple) and cmd[0] == "state":
            _, state, need, wait_s = cmd
            measure_in_state([(x[2], x[3]) for x in runs], meas, probes, state, need=need, wait_s=wait_s)
            conn.send("done")
        else:  # "result"
            conn.send([{"model": name, "strategy": text, "batch": b, "meas_ms": meas[i], "sync_probe_us": probes[i],
                        "pace_ms": paces[i]} for i, (text, b, _, _) in enumerate(runs)])
            return


def measure_models(models: list[str], strategies: list[str], batches: list[int], rounds: int, state: float | None,
                   state_wait: float) -> dict[str, list[dict]]:
    """Every model in a process of its own (serve_model), all alive at once: each builds its artifacts in turn,
    then every round measures every model's configurations, model after model, so a model's rounds lie minutes
    apart (this VM's slow spells last seconds to minutes: measured one model at a time, a spell fell on all
    the rounds of a model's configurations together); then the configurations with fewer than half their
    rounds in the calibration's `state` are measured again in it, for `state_wait` seconds in all.
    Returns each model's configurations with their measurements."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    workers = []
    try:
        for name in models:
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=serve_model, args=(theirs, name, strategies, batches), daemon=True)
            proc.start()
            workers.append((name, proc, mine))
            t0 = time.perf_counter()
            if mine.recv() != "ready":
                raise RuntimeError(f"{name}: its process did not build its artifacts")
            print(f"{name}: artifacts built and loaded in a process of its own ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
        for r in range(rounds):
            t0 = time.perf_counter()
            probe = []
            for name, _, conn in workers:
                conn.send("round")
                probe.append(conn.recv())
            print(f"round {r + 1}/{rounds}: {len(models)} models measured in {time.perf_counter() - t0:.0f} s (sync "
                  f"probe median {np.median(probe):.2f} us)", flush=True)
        if state is not None and state_wait > 0:
            for name, _, conn in workers:
                conn.send(("state", state, (rounds + 1) // 2, state_wait / len(models)))
                conn.recv()
        out = {}
        for name, proc, conn in workers:
            conn.send("result")
            out[name] = conn.recv()
            proc.join(timeout=60)
        return out
    finally:
        for _, proc, _ in workers:
            if proc.is_alive():
                proc.terminate()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--strategies", default="none,prune:0.3,prune:0.6,quantize:int8")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=5, help="measure every configuration this many times, round-robin")
    ap.add_argument("--profile", default="host", help="the calibrated profile to test (name or YAML path)")
    ap.add_argument("--compare", default="", help="other calibrated profiles to test on the same measurements")
    ap.add_argument("--calibrate", default="", metavar="OUT.yaml",
                    help="calibrate this machine first, write the profile here and test it (--profile is compared)")
    ap.add_argument("--dump", default="", metavar="OUT.json",
                    help="write every measurement (with the machine's sync probe before it) and prediction here")
    ap.add_argument("--state-wait", type=float, default=600.0, metavar="SECONDS",
                    help="after the rounds, measure again while the machine is in the calibration's state the "
                         "configurations with fewer than half their rounds in it, for at most this long in all "
                         "(shared by the models; 0: no)")
    ap.add_argument("--rescore", default="", metavar="DUMP.json",
                    help="measure nothing: score --profile and --compare against an earlier run's --dump")
    ap.add_argument("--against", default="", metavar="DUMP.json",
                    help="with --rescore: score another run's measurements (its --dump) as one more predictor: how "
                         "closely two runs of this benchmark agree here")
    args = ap.parse_args()
    compare = [p for p in args.compare.split(",") if p]
    if args.against and not args.rescore:
        ap.error("--against scores another run against a --rescore DUMP.json: give both")
    if args.rescore:
        rescore(args.rescore, [args.profile] + compare, args.against)
        return
    if args.calibrate:
        out = Path(args.calibrate)
        if out.suffix not in (".yaml", ".yml"):
            ap.error("--calibrate takes the path of the profile to write, ending in .yaml")
        compare.insert(0, args.profile)
        load_profile(args.profile)  # a bad name fails before minutes of calibration
        save_profile(calibrate_host(progress=lambda m: print(f"  {m}", flush=True)), out)
        print(f"calibrated: {out}", flush=True)
        args.profile = str(out)
    host = load_profile(args.profile)
    others = [(p, load_profile(p)) for p in compare]
    for name, prof in [(args.profile, host)] + others:  # a profile of another CPU predicts nothing here
        note = machine_note(prof)
        if note:
            print(f"warning: {name}: {note}", flush=True)
    roof = uncalibrated(host)
    s_per_flop = 1.0 / (host.peak_gflops["fp32"] * 1e9 * host.efficiency.compute["conv"])
    models = args.models.split(",")
    state = host.calibrated_state()
    configs = []  # (name, strategy, batch, measurements, probes, predictions)
    measured = measure_models(models, args.strategies.split(","), [int(x) for x in args.batches.split(",")],
                              args.rounds, state, args.state_wait)
    for name in models:
        table = analyze(load_model(f"torchvision:{name}"))
        ests = {}
        for c in measured[name]:
            if c["strategy"] not in ests:  # one estimate per strategy, for its batches
                ests[c["strategy"]] = estimate(table, parse_strategy(c["strategy"]))
            est = ests[c["strategy"]]
            b = c["batch"]
            preds = (predict_latency(est, host, b).latency_ms, predict_latency(est, roof, b).latency_ms,
                     totals(est)["gemm_macs"] * 2 * b * s_per_flop * 1e3) + tuple(
                predict_latency(est, o, b).latency_ms for _, o in others)
            configs.append((name, c["strategy"], b, c["meas_ms"], c["sync_probe_us"], preds, c["pace_ms"]))
    every_m = [c[3] for c in configs]
    every_p = [c[4] for c in configs]
    meas = np.array([m[:args.rounds] for m in every_m]).T
    probe = np.array([p[:args.rounds] for p in every_p]).T
    med = np.median(meas, axis=0)
    if args.dump:
        Path(args.dump).write_text(json.dumps({
            "profile": args.profile, "compare": compare, "rounds": args.rounds,
            "configs": [{"model": c[0], "strategy": c[1], "batch": c[2], "meas_ms": every_m[i],
                         "sync_probe_us": every_p[i], "pace_ms": c[6], "pred_ms": list(c[5])}
                        for i, c in enumerate(configs)],
            "calibration_sync_probe_us": state,
            "profile_pace_ms": [host.calibrated_pace()] + [o.calibrated_pace() for _, o in others]},
            indent=1))
    inst = in_state_medians(every_m, every_p, state)
    print(f"\n{'model':20s} {'strategy':14s} {'b':>2s} {'meas ms':>9s} {'spread %':>8s} {'in state':>8s} {'calibrated':>11s} "
          f"{'roofline':>9s} {'flops':>9s}" + "".join(f" {'compare ' + str(j + 1):>10s}" for j in range(len(others))))
    for i, (name, text, b, _, _, preds, _) in enumerate(configs):
        spread = 100 * (meas[:, i].max() - meas[:, i].min()) / med[i]
        print(f"{name:20s} {text:14s} {b:2d} {med[i]:9.2f} {spread:8.1f} {inst[i]:8.2f} {preds[0]:11.2f} {preds[1]:9.2f} "
              f"{preds[2]:9.2f}" + "".join(f" {x:10.2f}" for x in preds[3:]))
    preds = np.array([c[5] for c in configs])
    is_int8 = np.array([c[1] == "quantize:int8" for c in configs])
    labels = ["calibrated", "roofline", "flops"] + [f"compare {j + 1}" for j in range(len(others))]
    print(f"\n{len(configs)} configurations x {args.rounds} rounds on host "
          f"({host.provenance.cpu if host.provenance else ''}, {host.provenance.threads if host.provenance else '?'} "
          "threads); median of the rounds against the predictions")
    print(f"{'predictor':12s} {'MAPE %':>8s} {'within 10% (%)':>15s} {'Kendall tau':>12s}   float / int8: MAPE % / within %")
    print("\n".join(score_lines(labels, preds, med, is_int8)))
    if args.rounds > 1:  # the noise floor: one round against the median of all
        single = np.abs(meas / med - 1)
        print(f"{'one round':12s} {100 * single.mean():8.1f} {100 * (single <= 0.10).mean():15.1f} {'':>12s}  "
              "(a single measurement against the median: the machine's own noise)")
    print(f"machine state (sync_probe_us: fork and join of all threads; higher in this VM's slow spells): "
          f"calibration {state if state is not None else 'not recorded'}, measurements median {np.median(probe):.2f}")
    for r in range(args.rounds):  # each round alone against the calibrated predictions, with its state
        mape, within, _ = stats(preds[:, 0], meas[r])
        print(f"  round {r + 1}: probe median {np.median(probe[r]):.2f} us, calibrated MAPE {mape:.1f}%, "
              f"within 10% {within:.1f}%")
    if state is not None:
        counts = [len(in_state(ms, ps, state)) for ms, ps in zip(every_m, every_p)]
        print(f"\nin the calibration's state (sync probe {state:.2f} us +-{100 * STATE_TOLERANCE:.0f}%): "
              f"{int((~np.isnan(inst)).sum())} of {len(configs)} configurations measured in it ({sum(counts)} "
              f"measurements, {sum(map(len, every_m)) - args.rounds * len(configs)} of them after the rounds); the "
              "median of each one's measurements in that state against the predictions")
        print("\n".join(score_lines(labels, preds, inst, is_int8)))
    pace = np.array([c[6][:args.rounds] for c in configs]).T
    host_pace = host.calibrated_pace()
    paced = paced_medians(meas, pace, [host, host, host] + [o for _, o in others])
    if paced is not None:
        print(f"\nat each profile's pace (the pace network, timed in alternation with every configuration, ran "
              f"{np.median(pace):.2f} ms here, {np.min(pace):.2f}-{np.max(pace):.2f}; in the calibration "
              f"{host_pace or 0:.2f} ms): each measurement x (the profile's pace / the pace beside it) ** the profile's "
              f"pace elasticity ({host.pace_elasticity():.3f}), the median of the rounds against the predictions "
              "(roofline and flops at the calibrated profile's pace)")
        print("\n".join(score_lines(labels, preds, paced, is_int8)))
        if args.rounds > 1 and host_pace:
            levelled = at_pace(meas, pace, host_pace, host.pace_elasticity())
            single = np.abs(levelled / np.median(levelled, axis=0) - 1)
            print(f"{'one round':12s} {100 * single.mean():8.1f} {100 * (single <= 0.10).mean():15.1f} {'':>12s}  "
                  "(a single paced measurement against the median: the noise left)")
    else:
        print("\nno profile was calibrated against the pace network: no paced scores")
    print(f"calibrated: {args.profile}" + (" (calibrated in this run)" if args.calibrate else ""))
    for j, (path, _) in enumerate(others):
        print(f"compare {j + 1}: {path}")


if __name__ == "__main__":
    main()
