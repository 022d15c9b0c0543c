"""ONNX export and ONNX Runtime latency across architectures (this machine).

For each architecture x {none, prune:0.5, prune:0.3:round_to=4, quantize:int8} at batch 1,
`apply --export onnx --runtime onnxruntime` as a user runs it (tasks.apply.apply_and_measure): the candidate is
executed, exported to ONNX, checked in ONNX Runtime (onnx.checker, outputs against the PyTorch program), its stored
bytes compared with the estimator's ONNX layout, and its ONNX Runtime latency predicted (anchored on the original and
the original pruned by half, measured in ONNX Runtime) and measured
(its session in alternation with the original's), and predicted by this machine's ONNX Runtime profile alone
(`--no-anchor`; calibrated first where there is none). The candidate's ONNX Runtime session is then timed in
alternation with the PyTorch program in the form that runs it fast (eager float, compiled INT8): their ratio says
which runtime serves the model faster here.

Architectures: the latency benchmark's (bench/latency.py), split the same way: DEV, the ones its latency model was
developed on, and HELD_OUT, never used to develop the ONNX Runtime prediction. Untrained torchvision weights, their
BatchNorm statistics and biases seeded as a trained network's are (trained_like): the INT8 top-1 agreement on
seeded inputs is reported, not enforced (apply enforces it on --data).

    .venv/bin/python bench/export.py [--models a,b] [--budget-min 30] [--dump out.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from latency import load_arch, quiet_libraries, release_compiled, say  # noqa: E402

STRATEGIES = ["none", "prune:0.5", "prune:0.3:round_to=4", "quantize:int8"]
# the ONNX Runtime anchor's own second point (tasks.onnx_runtime.probe_strategy: prune:0.5 kept to multiples of 4,
# for most architectures the very model prune:0.5 is): its prediction is that measurement, so the latency scores
# are given without it too; prune:0.3:round_to=4 is a candidate as a plan for ONNX Runtime makes it
PROBE_LIKE = "prune:0.5"
DEV = ["resnet18", "mobilenet_v2", "squeezenet1_1", "shufflenet_v2_x1_0"]
HELD_OUT = ["shufflenet_v2_x0_5", "mnasnet0_5", "regnet_x_400mf", "se_net", "mobilenet_v3_large", "regnet_y_400mf",
            "dw_separable", "efficientnet_b1", "mnasnet1_0", "encoder_vit", "squeezenet1_0", "googlenet",
            "concat_group", "attention_vit"]


def trained_like(loaded):
    """Seeded BatchNorm statistics, affine parameters and biases in place of an untrained network's zeros and
    ones, as a trained network has: ONNX's exporter stores identical tensors once, and an untrained network's
    folded biases (all zero) would collapse into one, which no trained network's do."""
    import torch

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in loaded.model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(0.0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.uniform_(0.5, 1.5, generator=gen)
            bias = getattr(m, "bias", None)
            if isinstance(bias, torch.nn.Parameter):
                bias.normal_(0.0, 0.05, generator=gen)
    return loaded


def run_one(name: str, text: str, out_root: Path, timed: bool = True) -> dict:
    from estimators.strategy import parse_strategy
    from hardware.measure import measure_interleaved
    from tasks.apply import apply_and_measure, fast_form
    from tasks.onnx_export import session, session_fn
    from tasks.quantize_exec import load_program

    loaded = trained_like(load_arch(name))
    row = {"model": name, "split": "dev" if name in DEV else "held-out", "strategy": text}
    t0 = time.perf_counter()
    try:
        rep = apply_and_measure(loaded, parse_strategy(text), str(out_root / f"{name}-{text.replace(':', '_')}"),
                                hardware="host" if timed else None, export=("pt2", "onnx"),
                                runtime="onnxruntime" if timed else "pytorch").dump()
    except Exception as exc:
        row.update(exported=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        return row
    o = rep["onnx"]
    row.update(exported=True, form=o["form"], max_rel_diff=o["max_rel_diff"], top1_agreement=o.get("top1_agreement"),
               onnx_size_bytes=o["size_bytes"], pred_onnx_size_bytes=rep["pred"]["onnx_size_bytes"],
               size_err=rep["err"]["onnx_size_bytes"], pt2_size_bytes=rep["meas"]["size_bytes"],
               pred_ms=rep["pred"].get("latency_ms"), measured_ms=rep["meas"].get("latency_ms"),
               latency_err=rep["err"].get("latency_ms"), basis=rep.get("latency_basis"),
               ratio_iqr=(rep.get("latency_measurement") or {}).get("ratio_iqr"))
    if not timed:
        return row
    if row["measured_ms"]:  # what the ONNX Runtime profile predicts without the anchor
        from estimators.analyze import analyze
        from estimators.compress import estimate
        from hardware.latency import predict_latency
        from tasks.onnx_runtime import load_ort_profile

        alone = predict_latency(estimate(analyze(loaded), parse_strategy(text)), load_ort_profile(), 1).latency_ms
        row.update(profile_ms=alone, profile_err=alone / row["measured_ms"] - 1)
    # which runtime serves it faster here: the ONNX Runtime session against the PyTorch program's fast form
    x = loaded.example_input(1)
    torch_fn = fast_form(load_program(rep["artifact"]["model"]), o["form"] == "int8")
    # long rounds: each runtime's thread pool wakes up slowly after the other's has run, and a round's median drops
    # the first calls of a round that pay for it
    got = measure_interleaved([torch_fn, session_fn(session(o["path"]))], [x, x], round_s=0.25, min_rounds=5,
                              max_rounds=9)
    row.update(ort_over_pytorch=got["ratio"][1], pytorch_ms=got["latency_ms"][0], seconds=time.perf_counter() - t0)
    return row


LATENCY_SUBSETS = [  # (label, which candidates' latency is scored, which error)
    ("all", lambda r: r["strategy"] != "none", "latency_err"),
    (f"all but {PROBE_LIKE}", lambda r: r["strategy"] not in ("none", PROBE_LIKE), "latency_err"),
    ("INT8", lambda r: r["form"] == "int8", "latency_err"),
    ("pruned float", lambda r: r["strategy"] != "none" and r["form"] != "int8", "latency_err"),
    (f"pruned float but {PROBE_LIKE}", lambda r: r["strategy"] not in ("none", PROBE_LIKE) and r["form"] != "int8",
     "latency_err"),
    # the ONNX Runtime profile alone (--no-anchor): the originals too, which the anchor measures
    ("profile only: all", lambda r: True, "profile_err"),
    ("profile only: float", lambda r: r["form"] != "int8", "profile_err"),
    ("profile only: INT8", lambda r: r["form"] == "int8", "profile_err"),
]


def summarise(rows: list[dict]) -> str:
    lines = ["| split | configurations | exported | float max rel diff | ONNX size within 1% "
             "| ONNX Runtime / PyTorch (median) |", "|---" * 6 + "|"]
    lat_lines = ["| split | latency of | configurations | MAPE | within ±10% | within ±25% |", "|---" * 6 + "|"]
    for split in ("dev", "held-out"):
        rs = [r for r in rows if r["split"] == split]
        if not rs:
            continue
        ok = [r for r in rs if r.get("exported")]
        fl = [r["max_rel_diff"] for r in ok if r["form"] != "int8"]
        sized = sum(abs(r["size_err"]) <= 0.01 for r in ok)
        speed = [r["ort_over_pytorch"] for r in ok if "ort_over_pytorch" in r] or [float("nan")]
        lines.append(f"| {split} | {len(rs)} | {len(ok)} | {max(fl):.1e} | {sized}/{len(ok)} | "
                     f"{statistics.median(speed):.2f} |")
        for label, keep, key in LATENCY_SUBSETS:
            lat = [abs(r[key]) for r in ok if keep(r) and r.get(key) is not None]
            if lat:
                lat_lines.append(f"| {split} | {label} | {len(lat)} | {100 * statistics.mean(lat):.1f}% | "
                                 f"{100 * sum(e <= 0.10 for e in lat) / len(lat):.0f}% | "
                                 f"{100 * sum(e <= 0.25 for e in lat) / len(lat):.0f}% |")
    return "\n".join(lines + [""] + (lat_lines if len(lat_lines) > 2 else []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated architectures (default: DEV and HELD_OUT)")
    ap.add_argument("--budget-min", type=float, default=30.0, help="stop starting architectures after this")
    ap.add_argument("--dump", help="write every row as JSON here")
    ap.add_argument("--no-latency", action="store_true", help="export, check and size only: nothing timed")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    quiet_libraries()
    for n in ("torch.onnx", "onnxscript", "onnx_ir"):
        logging.getLogger(n).setLevel(logging.ERROR)
    names = args.models.split(",") if args.models else DEV + HELD_OUT
    rows: list[dict] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if time.perf_counter() - start > args.budget_min * 60:
                say(f"budget of {args.budget_min} min spent: {name} and later not run")
                break
            say(f"{name}")
            for text in STRATEGIES:
                r = run_one(name, text, Path(tmp), timed=not args.no_latency)
                rows.append(r)
                if r.get("exported") and args.no_latency:
                    say(f"  {text:14s} {r['form']:5s} rel diff {r['max_rel_diff']:.1e}  size err "
                        f"{100 * r['size_err']:+.2f}%  top-1 agreement {r['top1_agreement']}")
                elif r.get("exported"):
                    say(f"  {text:14s} {r['form']:5s} rel diff {r['max_rel_diff']:.1e}  size err "
                        f"{100 * r['size_err']:+.2f}%  ORT latency pred {r['pred_ms']:.3f} meas {r['measured_ms']:.3f} "
                        f"({100 * (r['latency_err'] or 0):+.1f}%)  ORT/PyTorch {r['ort_over_pytorch']:.2f}")
                else:
                    say(f"  {text:14s} FAILED {r['error']}")
            release_compiled()
    print(summarise(rows))
    print(f"\n{len(rows)} configurations in {(time.perf_counter() - start) / 60:.1f} min")
    if args.dump:
        Path(args.dump).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
