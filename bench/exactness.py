"""Predicted vs measured on real artifacts: pruning (uniform/global), int8, fp16 and prune+int8.

Each row executes the strategy (torch-pruning, Intel Neural Compressor), saves model.pt2, loads it back
and measures it (tasks/apply.py). Prints the relative error of every prediction and a summary.

    .venv/bin/python bench/exactness.py [--models resnet18,resnet50,...] [--input-shape 1,3,224,224]
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

from estimators.modelspec import load_model  # noqa: E402
from estimators.strategy import parse_strategy  # noqa: E402
from tasks.apply import apply_and_measure  # noqa: E402

STRATEGIES = ["none", "prune:0.3", "prune:0.5", "prune:0.7", "prune:0.3:global", "prune:0.5:global",
              "prune:0.7:global", "quantize:int8", "quantize:fp16", "prune:0.5,quantize:int8"]


def pct(rep, key):
    e = rep["err"].get(key)
    return "" if e is None else f"{100 * e:+.2f}%"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,resnet50,mobilenet_v2,vgg11,densenet121,efficientnet_b0")
    ap.add_argument("--input-shape", default="1,3,224,224")
    ap.add_argument("--strategies", default=",".join(s.replace(",", "+") for s in STRATEGIES))
    args = ap.parse_args()
    strategies = [s.replace("+", ",") for s in args.strategies.split(",")]
    rows = []
    print(f"{'model':16s} {'strategy':24s} {'params':>13s} {'params ok':>9s} {'macs err':>9s} {'size err':>9s} "
          f"{'mem acc err':>11s} {'peak err':>9s} {'s':>6s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            spec = name if ":" in name else f"torchvision:{name}"
            loaded = load_model(spec, input_shape=args.input_shape if spec.startswith("torchvision:") else None)
            for text in strategies:
                t0 = time.perf_counter()
                rep = apply_and_measure(loaded, parse_strategy(text), f"{tmp}/{name}-{len(rows)}").dump()
                dt = time.perf_counter() - t0
                ok = rep["pred"]["params"] == rep["meas"]["params"]
                rows.append((spec, text, rep, ok))
                print(f"{name:16s} {text:24s} {rep['meas']['params']:13,d} {'yes' if ok else 'NO':>9s} "
                      f"{pct(rep, 'macs'):>9s} {pct(rep, 'size_bytes'):>9s} {pct(rep, 'memory_access_bytes'):>11s} "
                      f"{pct(rep, 'peak_memory_bytes'):>9s} {dt:6.1f}", flush=True)
    n = len(rows)
    exact = sum(ok for *_, ok in rows)
    macs_ok = sum(abs(r["err"].get("macs", 0)) <= 0.005 for _, _, r, _ in rows)
    size_ok = sum(abs(r["err"].get("size_bytes", 0)) <= 0.01 for _, _, r, _ in rows)
    peaks = [abs(r["err"]["peak_memory_bytes"]) for _, _, r, _ in rows if "peak_memory_bytes" in r["err"]]
    mems = [abs(r["err"]["memory_access_bytes"]) for _, _, r, _ in rows if "memory_access_bytes" in r["err"]]
    int8 = [(s, r) for s, t, r, _ in rows if t == "quantize:int8"]
    print(f"\nsummary over {n} executed candidates:")
    print(f"  params exact: {exact}/{n}; macs within 0.5%: {macs_ok}/{n}; size within 1%: {size_ok}/{n}")
    if peaks:
        print(f"  peak memory vs eager measurement: max |err| {100 * max(peaks):.1f}%, mean {100 * sum(peaks) / len(peaks):.1f}% "
              f"({len(peaks)} float artifacts)")
    if mems:
        print(f"  memory access vs ATen traffic count: max |err| {100 * max(mems):.1f}%, mean {100 * sum(mems) / len(mems):.1f}%")
    for s, r in int8:
        print(f"  {s} int8 stores {r['meas']['size_bytes']:,} B = {100 * r['meas']['size_bytes'] / (4 * r['meas']['params']):.1f}% of fp32 params")


if __name__ == "__main__":
    main()
