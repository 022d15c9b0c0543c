"""Jetson Nano: published batch-1 latencies vs deployfit's `jetson-nano` and `jetson-nano-pytorch` profiles.

    .venv/bin/python bench/jetson_nano.py          # the markdown table (docs/jetson-nano.md)
    .venv/bin/python bench/jetson_nano.py --fit    # re-derive the fitted profile numbers, plus sensitivity

Every row is a published figure with its source (MODELS below). Three roles:
- "held out": ResNet-18, ResNet-50, VGG-16, MobileNetV2 and ResNet-18 INT8, the evaluation rows. No
  profile number was derived from them.
- "fit": the only latencies the fitted numbers were derived from (least squares on log(predicted /
  published), `--fit`). Their error says how well the model can fit, not how well it predicts.
- "check": published figures used for neither (GoogLeNet: a Caffe model timed by another harness).
Published figures and their sources: MODELS below, docs/jetson-nano.md and /work/shared/REFERENCE.md.
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
from scipy.optimize import least_squares  # noqa: E402

from estimators.analyze import analyze  # noqa: E402
from estimators.compress import estimate  # noqa: E402
from estimators.modelspec import load_model  # noqa: E402
from estimators.strategy import parse_strategy  # noqa: E402
from estimators.table import evaluate  # noqa: E402
from hardware.latency import predict_latency  # noqa: E402
from hardware.profile import HardwareProfile, load_profile, parse_profile  # noqa: E402

# sources (repository and path of the stored public copy; see docs/jetson-nano.md)
T2T = "NVIDIA-AI-IOT/torch2trt benchmarks/JETSON_NANO.md"  # fp16_mode engine vs model.half(), latency column
IWATAKE = "iwatake2222/JetsonNanoTest TensorRT/mobilenet_v2/README.md"  # TensorRT C++, FP16 engine, 224x224
JKJUNG = "jkjung-avt/jkjung-avt.github.io _posts/2019-05-20-tensorrt-googlenet.md"  # "~16ms to inference each image"
T2T_255 = "NVIDIA-AI-IOT/torch2trt issue #255"  # ResNet-18 TensorRT INT8 21.35 ms on a Jetson Nano

HELD, FIT, CHECK = "held out", "fit", "check"
# model (torchvision name), role, TensorRT FP16 ms, its source, PyTorch FP16 ms, its source.
# torch2trt's table is batch 1, 224x224, latency (not throughput) column. vgg16_bn (84.3 / 207 ms) is deliberately
# absent: once TensorRT folds BatchNorm it is the held-out VGG-16.
MODELS = [
    ("resnet18", HELD, 11.4, T2T, 34.7, T2T),
    ("resnet50", HELD, 29.8, T2T, 81.7, T2T),
    ("vgg16", HELD, 85.1, T2T, 201.0, T2T),
    ("mobilenet_v2", HELD, 17.65, IWATAKE, None, None),
    ("alexnet", FIT, 14.7, T2T, 22.1, T2T),
    ("squeezenet1_0", FIT, 7.6, T2T, 24.2, T2T),
    ("squeezenet1_1", FIT, 4.34, T2T, 14.0, T2T),
    ("resnet34", FIT, 20.2, T2T, 64.8, T2T),
    ("resnet101", FIT, 51.1, T2T, 141.0, T2T),
    ("resnet152", FIT, 72.3, T2T, 204.0, T2T),
    ("densenet121", FIT, 24.8, T2T, 84.5, T2T),
    ("densenet169", FIT, 31.2, T2T, 118.0, T2T),
    ("densenet201", FIT, 40.8, T2T, 141.0, T2T),
    ("densenet161", FIT, 65.8, T2T, 247.0, T2T),
    ("vgg11", FIT, 55.1, T2T, 114.0, T2T),
    ("vgg13", FIT, 68.7, T2T, 156.0, T2T),
    ("vgg11_bn", FIT, 54.8, T2T, 117.0, T2T),
    ("vgg13_bn", FIT, 68.5, T2T, 162.0, T2T),
    # BVLC Caffe GoogLeNet (LRN, no BatchNorm, 5x5 branches) timed through a Cython wrapper on JetPack 4.2;
    # torchvision's googlenet (BatchNorm, 3x3 in the "5x5" branch) stands in for it: a rough check only
    ("googlenet", CHECK, 16.0, JKJUNG, None, None),
]
INT8_R18 = (21.35, T2T_255)  # held out
FAMILIES = ("alexnet", "squeezenet1_0", "squeezenet1_1", "densenet121", "densenet169", "densenet201", "densenet161")


def names(role=None):
    return [m[0] for m in MODELS if role is None or m[1] == role]


def published(col: int) -> dict[str, float]:
    """{model: published ms} of the TensorRT (col 2) or PyTorch (col 4) column."""
    return {m[0]: m[col] for m in MODELS if m[col] is not None}


def tables(models):
    out = {}
    for n in models:
        t = analyze(load_model(f"torchvision:{n}"))
        out[n] = (t, evaluate(t))
    t8 = estimate(out["resnet18"][0], parse_strategy("quantize:int8"))
    out["resnet18:int8"] = (t8, evaluate(t8))
    return out


def ms(T, name: str, profile: HardwareProfile) -> float:
    t, ev = T[name]
    return predict_latency(t, profile, batch_size=1, ev=ev).latency_ms


def err(pred, pub):
    return (pred - pub) / pub


def fmt_err(e):
    return f"{e * 100:+.1f}%"


# ------------------------------------------------------------------------------------------------
# the fit: least squares on log(predicted / published) over the "fit" rows


def _with(profile: HardwareProfile, conv=None, bw_gemm=None, overhead=None, call=None) -> HardwareProfile:
    d = profile.model_dump()
    e = d["efficiency"]
    if conv is not None:  # gemm and attention are tied to conv (see the profile's sources)
        for c in ("conv", "gemm", "attention"):
            e["compute"][c] = conv
    if bw_gemm is not None:
        e["bandwidth"]["gemm"] = bw_gemm
    if overhead is not None:
        e["kernel_overhead_us"] = overhead
    if call is not None:
        e["call_overhead_us"] = call
    return parse_profile(d, profile.name)


# parameter: (start, lower bound, upper bound)
BOUNDS = {"conv": (0.8, 0.05, 4.0), "bw_gemm": (0.5, 0.05, 1.0), "overhead": (10.0, 0.0, 2000.0),
          "call": (500.0, 0.0, 20000.0)}


def fit(base: HardwareProfile, T, pub: dict[str, float], rows, free, **fixed) -> tuple[HardwareProfile, float]:
    """The profile with `free` parameters fitted to the published `pub` latencies of `rows` (the rest at `fixed`
    or the profile's values); returns it and the fit's RMS log error."""
    p0 = _with(base, **fixed) if fixed else base
    x0 = [BOUNDS[k][0] for k in free]

    def res(x):
        p = _with(p0, **dict(zip(free, x)))
        return [math.log(ms(T, n, p) / pub[n]) for n in rows]

    r = least_squares(res, x0, bounds=([BOUNDS[k][1] for k in free], [BOUNDS[k][2] for k in free]),
                      x_scale=[max(abs(v), 1e-3) for v in x0])
    return _with(p0, **dict(zip(free, r.x))), float(np.sqrt(np.mean(np.square(r.fun))))


TRT_FREE = ("conv", "bw_gemm", "call")
PT_FREE = ("conv", "overhead")


def fit_tensorrt(base: HardwareProfile, T, rows=None, free=TRT_FREE, **fixed):
    """compute.conv, bandwidth.gemm and call_overhead_us on the TensorRT FP16 fit rows; the rest at the priors."""
    return fit(base, T, published(2), rows or names(FIT), free, **fixed)


def fit_pytorch(base: HardwareProfile, T, bw_gemm: float, rows=None):
    """compute.conv and kernel_overhead_us on the PyTorch FP16 fit rows; bandwidth.gemm from the TensorRT fit."""
    return fit(base, T, published(4), rows or names(FIT), PT_FREE, bw_gemm=bw_gemm)


def _held_errors(T, trt: HardwareProfile) -> list[tuple[str, float]]:
    pub = published(2)
    out = [(n, err(ms(T, n, trt), pub[n])) for n in names(HELD)]
    return out + [("resnet18 int8", err(ms(T, "resnet18:int8", trt), INT8_R18[0]))]


def run_fit(T) -> None:
    trt, pt = load_profile("jetson-nano"), load_profile("jetson-nano-pytorch")
    ft, rms_t = fit_tensorrt(trt, T)
    fp, rms_p = fit_pytorch(pt, T, ft.efficiency.bandwidth["gemm"])
    fit_rows = names(FIT)
    print(f"Fitted on the {len(fit_rows)} fit rows ({', '.join(fit_rows)}); all other numbers at the profiles' "
          "priors:\n")
    print("| profile | parameter | fitted | in the YAML |\n|---|---|---|---|")
    for prof, fitted, keys in (("jetson-nano", ft, ("conv", "gemm", "call")), ("jetson-nano-pytorch", fp,
                                                                              ("conv", "overhead", "gemm"))):
        cur = trt if prof == "jetson-nano" else pt
        for k in keys:
            label, get = {
                "conv": ("efficiency.compute.conv (gemm, attention tied)", lambda p: p.efficiency.compute["conv"]),
                "gemm": ("efficiency.bandwidth.gemm" + (" (from jetson-nano)" if prof != "jetson-nano" else ""),
                         lambda p: p.efficiency.bandwidth["gemm"]),
                "call": ("efficiency.call_overhead_us", lambda p: p.efficiency.call_overhead_us),
                "overhead": ("efficiency.kernel_overhead_us", lambda p: p.efficiency.kernel_overhead_us)}[k]
            print(f"| {prof} | {label} | {get(fitted):.4g} | {get(cur):g} |")
    print(f"\nRMS log error over the fit rows: jetson-nano {rms_t:.3f}, jetson-nano-pytorch {rms_p:.3f}")

    held = [n for n, _ in _held_errors(T, trt)]
    print("\nSensitivity of the TensorRT fit (each refitted; errors on the held-out rows):\n")
    print("| variant | conv | bw.gemm | kernel us | call us | " + " | ".join(held) + " | mean abs |")
    print("|---|---|---|---|---|" + "---|" * (len(held) + 1))
    variants = [("as shipped (kernel overhead 10 us prior)", {}, TRT_FREE, None),
                ("kernel overhead fitted too", {}, TRT_FREE + ("overhead",), None),
                ("kernel overhead prior 5 us", {"overhead": 5.0}, TRT_FREE, None),
                ("kernel overhead prior 20 us", {"overhead": 20.0}, TRT_FREE, None),
                ("no per-call term (call 0)", {"call": 0.0}, ("conv", "bw_gemm", "overhead"), None),
                ("other families only (AlexNet, SqueezeNet, DenseNet)", {}, TRT_FREE, list(FAMILIES))]
    for label, fixed, free, rows in variants:
        f, _ = fit_tensorrt(trt, T, rows=rows, free=free, **fixed)
        e = f.efficiency
        es = [v for _, v in _held_errors(T, f)]
        print(f"| {label} | {e.compute['conv']:.3f} | {e.bandwidth['gemm']:.3f} | {e.kernel_overhead_us:.1f} | "
              f"{e.call_overhead_us:.0f} | " + " | ".join(fmt_err(v) for v in es)
              + f" | {sum(abs(v) for v in es) / len(es) * 100:.1f}% |")
    fo, _ = fit_pytorch(pt, T, ft.efficiency.bandwidth["gemm"], rows=list(FAMILIES))
    pub = published(4)
    es = [err(ms(T, n, fo), pub[n]) for n in names(HELD) if n in pub]
    print(f"\njetson-nano-pytorch fitted on the other families only: conv {fo.efficiency.compute['conv']:.3f}, "
          f"kernel overhead {fo.efficiency.kernel_overhead_us:.1f} us; held out "
          + ", ".join(f"{n} {fmt_err(v)}" for n, v in zip([n for n in names(HELD) if n in pub], es)))


# ------------------------------------------------------------------------------------------------
# the table


def run_table(T) -> None:
    trt, pt = load_profile("jetson-nano"), load_profile("jetson-nano-pytorch")
    print("| model (batch 1, 224x224) | used for | TensorRT FP16 published | jetson-nano | error "
          "| PyTorch FP16 published | jetson-nano-pytorch | error | source |")
    print("|---|---|---|---|---|---|---|---|---|")
    errs = {(rt, role): [] for rt in ("trt", "pt") for role in (HELD, FIT, CHECK)}
    for name, role, t_pub, t_src, p_pub, p_src in MODELS:
        t_pred, p_pred = ms(T, name, trt), ms(T, name, pt)
        et = err(t_pred, t_pub)
        ep = err(p_pred, p_pub) if p_pub else None
        errs[("trt", role)].append(et)
        if ep is not None:
            errs[("pt", role)].append(ep)
        src = t_src if (p_src in (None, t_src)) else f"{t_src}; {p_src}"
        p_cells = f"{p_pub:.1f} ms | {p_pred:.2f} ms | {fmt_err(ep)}" if p_pub else f"n/a | {p_pred:.2f} ms | n/a"
        print(f"| {name} | {role} | {t_pub:.2f} ms | {t_pred:.2f} ms | {fmt_err(et)} | {p_cells} | {src} |")
    i8 = ms(T, "resnet18:int8", trt)
    e8 = err(i8, INT8_R18[0])
    errs[("trt", HELD)].append(e8)
    print(f"| resnet18, quantize:int8 | {HELD} | {INT8_R18[0]:.2f} ms (TensorRT INT8) | {i8:.2f} ms | {fmt_err(e8)} "
          f"| n/a | {ms(T, 'resnet18:int8', pt):.2f} ms | n/a | {INT8_R18[1]} |")
    print()

    def mae(es):
        return f"{sum(abs(e) for e in es) / len(es) * 100:.1f}%"

    for key, prof, held in (("trt", "jetson-nano", "ResNet-18, ResNet-50, VGG-16, MobileNetV2, ResNet-18 INT8"),
                            ("pt", "jetson-nano-pytorch", "ResNet-18, ResNet-50, VGG-16")):
        es = errs[(key, HELD)]
        print(f"- {prof}: mean absolute error over the held-out rows ({held}): {mae(es)}; worst "
              f"{max(es, key=abs) * 100:+.1f}%; over the {len(errs[(key, FIT)])} fit rows {mae(errs[(key, FIT)])}")
    no_mb = [e for n, e in zip(names(HELD) + ["int8"], errs[("trt", HELD)]) if n != "mobilenet_v2"]
    print(f"- jetson-nano without MobileNetV2: {mae(no_mb)}; GoogLeNet check row {fmt_err(errs[('trt', CHECK)][0])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", action="store_true", help="re-derive the fitted numbers and show their sensitivity")
    args = ap.parse_args()
    T = tables(names())
    if args.fit:
        run_fit(T)
    else:
        run_table(T)


if __name__ == "__main__":
    main()
