"""Jetson Nano: published batch-1 latencies vs deployfit's `jetson-nano` and `jetson-nano-pytorch` profiles.

    .venv/bin/python bench/jetson_nano.py          # the markdown table (docs/jetson-nano.md)
    .venv/bin/python bench/jetson_nano.py --fit    # re-derive the fitted profile numbers, plus sensitivity

Held-out evaluation rows: ResNet-18, ResNet-50, VGG-16, MobileNetV2 and ResNet-18 INT8. Rows marked
"fit" (AlexNet, DenseNet-121) are the only latencies the profiles were fitted on, so their error is
~0 by construction and says nothing about accuracy. Published figures: /work/shared/REFERENCE.md.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from estimators.analyze import analyze  # noqa: E402
from estimators.compress import estimate  # noqa: E402
from estimators.modelspec import load_model  # noqa: E402
from estimators.strategy import parse_strategy  # noqa: E402
from hardware.latency import predict_latency  # noqa: E402
from hardware.profile import HardwareProfile, load_profile, parse_profile  # noqa: E402

T2T = "torch2trt benchmarks/JETSON_NANO.md"
# model, role, TensorRT FP16 ms, its source, PyTorch FP16 ms, its source
MODELS = [
    ("resnet18", "eval", 11.4, T2T, 34.7, T2T),
    ("resnet50", "eval", 29.8, T2T, 81.7, T2T),
    ("vgg16", "eval", 85.1, T2T, 201.0, T2T),
    ("mobilenet_v2", "eval", 17.65, "iwatake2222/JetsonNanoTest", None, None),
    ("alexnet", "fit", 14.7, T2T, 22.1, T2T),
    ("densenet121", "fit", 24.8, T2T, 84.5, T2T),
]
INT8_R18 = (21.35, "torch2trt issue #255")
FIT_TRT = {"densenet121": 24.8, "alexnet": 14.7}
FIT_PT = {"densenet121": 84.5, "alexnet": 22.1}


def tables(names):
    return {n: analyze(load_model(f"torchvision:{n}")) for n in names}


def ms(table, profile: HardwareProfile) -> float:
    return predict_latency(table, profile, batch_size=1).latency_ms


def err(pred, pub):
    return (pred - pub) / pub


def fmt_err(e):
    return f"{e * 100:+.1f}%"


# ------------------------------------------------------------------------------------------------
# the fit (only AlexNet and DenseNet-121)


def _with(profile: HardwareProfile, conv=None, bw_gemm=None, overhead=None) -> HardwareProfile:
    d = profile.model_dump()
    e = d["efficiency"]
    if conv is not None:  # gemm and attention are tied to conv (see the profile's sources)
        for c in ("conv", "gemm", "attention"):
            e["compute"][c] = conv
    if bw_gemm is not None:
        e["bandwidth"]["gemm"] = bw_gemm
    if overhead is not None:
        e["kernel_overhead_us"] = overhead
    return parse_profile(d, profile.name)


def _solve(f, target, lo, hi, increasing, tol=1e-5):
    """x in [lo, hi] with f(x) = target for a monotone f (bisection)."""
    for _ in range(100):
        mid = (lo + hi) / 2
        if (f(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol * max(1.0, abs(mid)):
            break
    return (lo + hi) / 2


def _alternate(solve_a, solve_b, b, tol: float, iters: int):
    """Alternate two one-dimensional solves until the second parameter settles; returns (a, b)."""
    for _ in range(iters):
        a = solve_a(b)
        new = solve_b(a)
        done = abs(new - b) < tol
        b = new
        if done:
            break
    return a, b


def fit_tensorrt(base: HardwareProfile, T, overhead=None):
    """compute.conv on DenseNet-121 and bandwidth.gemm on AlexNet (TensorRT FP16), the rest at the priors."""
    p = base if overhead is None else _with(base, overhead=overhead)
    # DenseNet hardly depends on bw.gemm, AlexNet mostly on it
    conv, bwg = _alternate(
        lambda b: _solve(lambda x: ms(T["densenet121"], _with(p, conv=x, bw_gemm=b)), FIT_TRT["densenet121"], 0.01, 4.0, False),
        lambda c: _solve(lambda x: ms(T["alexnet"], _with(p, conv=c, bw_gemm=x)), FIT_TRT["alexnet"], 0.01, 4.0, False),
        p.efficiency.bandwidth.get("gemm", 1.0), 1e-4, 30)
    return _with(p, conv=conv, bw_gemm=bwg)


def fit_pytorch(base: HardwareProfile, T, bw_gemm):
    """compute.conv and kernel_overhead_us on AlexNet and DenseNet-121 (PyTorch FP16); bandwidth.gemm given."""
    p = _with(base, bw_gemm=bw_gemm)
    conv, oh = _alternate(
        lambda o: _solve(lambda x: ms(T["alexnet"], _with(p, conv=x, overhead=o)), FIT_PT["alexnet"], 0.01, 4.0, False),
        lambda c: _solve(lambda x: ms(T["densenet121"], _with(p, conv=c, overhead=x)), FIT_PT["densenet121"], 0.0, 2000.0, True),
        p.efficiency.kernel_overhead_us, 1e-3, 60)
    return _with(p, conv=conv, overhead=oh)


def run_fit(T) -> None:
    trt, pt = load_profile("jetson-nano"), load_profile("jetson-nano-pytorch")
    ft = fit_tensorrt(trt, T)
    fp = fit_pytorch(pt, T, ft.efficiency.bandwidth["gemm"])
    print("Fitted on AlexNet + DenseNet-121 only (all other numbers at the profiles' priors):\n")
    print("| profile | parameter | fitted | in the YAML |\n|---|---|---|---|")
    print(f"| jetson-nano | efficiency.compute.conv | {ft.efficiency.compute['conv']:.4f} | {trt.efficiency.compute['conv']} |")
    print(f"| jetson-nano | efficiency.bandwidth.gemm | {ft.efficiency.bandwidth['gemm']:.4f} | {trt.efficiency.bandwidth['gemm']} |")
    print(f"| jetson-nano-pytorch | efficiency.compute.conv | {fp.efficiency.compute['conv']:.4f} | {pt.efficiency.compute['conv']} |")
    print(f"| jetson-nano-pytorch | efficiency.kernel_overhead_us | {fp.efficiency.kernel_overhead_us:.2f} | {pt.efficiency.kernel_overhead_us} |")
    print(f"| jetson-nano-pytorch | efficiency.bandwidth.gemm (from jetson-nano) | {fp.efficiency.bandwidth['gemm']:.4f} | {pt.efficiency.bandwidth['gemm']} |")

    evals = [m for m in MODELS if m[1] == "eval"]
    print("\nSensitivity of the TensorRT fit to the kernel-overhead prior (refit for each; held-out errors):\n")
    print("| overhead prior | fitted conv | fitted bw.gemm | " + " | ".join(m[0] for m in evals) + " | mean abs |")
    print("|---|---|---|" + "---|" * (len(evals) + 1))
    for oh in (5.0, 10.0, 20.0):
        f = fit_tensorrt(trt, T, overhead=oh)
        es = [err(ms(T[m[0]], f), m[2]) for m in evals]
        print(f"| {oh:g} us | {f.efficiency.compute['conv']:.3f} | {f.efficiency.bandwidth['gemm']:.3f} | "
              + " | ".join(fmt_err(e) for e in es) + f" | {sum(abs(e) for e in es) / len(es) * 100:.1f}% |")


# ------------------------------------------------------------------------------------------------
# the table


def run_table(T) -> None:
    trt, pt = load_profile("jetson-nano"), load_profile("jetson-nano-pytorch")
    print("| model (batch 1, 224x224) | used for | TensorRT FP16 published | jetson-nano | error "
          "| PyTorch FP16 published | jetson-nano-pytorch | error | source |")
    print("|---|---|---|---|---|---|---|---|---|")
    held = {"trt": [], "pt": []}
    for name, role, t_pub, t_src, p_pub, p_src in MODELS:
        t_pred, p_pred = ms(T[name], trt), ms(T[name], pt)
        et = err(t_pred, t_pub)
        ep = err(p_pred, p_pub) if p_pub else None
        if role == "eval":
            held["trt"].append(et)
            if ep is not None:
                held["pt"].append(ep)
        src = t_src if (p_src in (None, t_src)) else f"{t_src}; {p_src}"
        print(f"| {name} | {'fit' if role == 'fit' else 'held out'} | {t_pub:.2f} ms | {t_pred:.2f} ms | {fmt_err(et)} "
              f"| {f'{p_pub:.1f} ms' if p_pub else 'n/a'} | {p_pred:.2f} ms | {fmt_err(ep) if ep is not None else 'n/a'} | {src} |")
    t8 = estimate(T["resnet18"], parse_strategy("quantize:int8"))
    i8 = ms(t8, trt)
    e8 = err(i8, INT8_R18[0])
    held["trt"].append(e8)
    print(f"| resnet18, quantize:int8 | held out | {INT8_R18[0]:.2f} ms (TensorRT INT8) | {i8:.2f} ms | {fmt_err(e8)} "
          f"| n/a | {ms(t8, pt):.2f} ms | n/a | {INT8_R18[1]} |")
    print()
    for key, prof, n in (("trt", "jetson-nano", "ResNet-18, ResNet-50, VGG-16, MobileNetV2, ResNet-18 INT8"),
                         ("pt", "jetson-nano-pytorch", "ResNet-18, ResNet-50, VGG-16")):
        es = held[key]
        print(f"- {prof}: mean absolute error over the held-out rows ({n}): "
              f"{sum(abs(e) for e in es) / len(es) * 100:.1f}%; worst {max(es, key=abs) * 100:+.1f}%")
    no_mb = [e for e in held["trt"][:3] + held["trt"][4:]]
    print(f"- jetson-nano without MobileNetV2: {sum(abs(e) for e in no_mb) / len(no_mb) * 100:.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", action="store_true", help="re-derive the fitted numbers and show their sensitivity")
    args = ap.parse_args()
    if args.fit:
        run_fit(tables(["alexnet", "densenet121"] + [m[0] for m in MODELS if m[1] == "eval"]))
    else:
        run_table(tables([m[0] for m in MODELS]))


if __name__ == "__main__":
    main()
