"""Jetson Nano: published batch-1 latencies vs deployfit's `jetson-nano` and `jetson-nano-pytorch` profiles.

    .venv/bin/python bench/jetson_nano.py          # the markdown table (docs/jetson-nano.md)
    .venv/bin/python bench/jetson_nano.py --fit    # re-derive the fitted profile numbers, plus sensitivity

Every row is a published figure with its source (MODELS below). Four roles:
- "held out": ResNet-18, ResNet-50, VGG-16, MobileNetV2 and ResNet-18 INT8, the evaluation rows. No
  profile number was derived from them.
- "fit": the torch2trt rows compute.conv, bandwidth.gemm and call_overhead_us were fitted on (least squares on
  log(predicted / published), `--fit`). Their error says how well the model can fit, not how well it predicts.
- "fit (dwconv)": Fast-SCNN (bench/jetson_nets.py) at five input sizes, trtexec on a Jetson Nano; the rows the
  depthwise-conv efficiencies were fitted on afterwards, with the numbers above held fixed.
- "check": published figures used for neither (GoogLeNet: a Caffe model timed by another harness).
Each row also says how its figure was timed (harness, see CALL and ENGINE): whether the profile's per-call term
belongs in its prediction.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jetson_nets  # noqa: E402  (bench/jetson_nets.py, beside this file)

# sources (repository and path of the stored public copy; see docs/jetson-nano.md)
T2T = "NVIDIA-AI-IOT/torch2trt benchmarks/JETSON_NANO.md"  # fp16_mode engine vs model.half(), latency column
IWATAKE = "iwatake2222/JetsonNanoTest TensorRT/mobilenet_v2/README.md"  # TensorRT C++, FP16 engine, 224x224
JKJUNG = "jkjung-avt/jkjung-avt.github.io _posts/2019-05-20-tensorrt-googlenet.md"  # "~16ms to inference each image"
T2T_255 = "NVIDIA-AI-IOT/torch2trt issue #255"  # ResNet-18 TensorRT INT8 21.35 ms on a Jetson Nano
# trtexec --onnx=fast_scnn_HxW.onnx --fp16 on a Jetson Nano ("NVIDIA Tegra X1", compute capability 5.3, TensorRT
# v8001, JetPack 4.6), batch 1; the "GPU Compute Time" mean of its performance summary
NOBUO = "NobuoTsukamoto/benchmarks tensorrt/jetson/fast_scnn/result/fast_scnn_{}_fp16.log"

HELD, FIT, FIT_DW, CHECK = "held out", "fit", "fit (dwconv)", "check"
# How a published figure was timed, and so whether the profile's call_overhead_us belongs in its prediction:
# CALL: one inference as the host calls it: torch2trt's Python TRTModule call (the table call_overhead_us was
#   fitted on), and likewise the C++ and Cython loops of the MobileNetV2 and GoogLeNet rows. The per-call term is
#   added, as the profile does by default.
# ENGINE: trtexec's "GPU Compute Time": the engine's kernels between CUDA events on its stream, with no Python
#   call and without the host-to-device input and device-to-host output copies (reported apart as "H2D/D2H
#   Latency"). No torch2trt call happens, so the per-call term is left out: these rows are predicted with
#   call_overhead_us set to 0. torch2trt's figures have no copies either (input and output stay on the GPU).
CALL, ENGINE = "call", "engine"
# model (torchvision or bench/jetson_nets.py name), role, TensorRT FP16 ms, its source, PyTorch FP16 ms, its source,
# harness. torch2trt's table is batch 1, 224x224, latency (not throughput) column. vgg16_bn (84.3 / 207 ms) is
# deliberately absent: once TensorRT folds BatchNorm it is the held-out VGG-16.
MODELS = [
    ("resnet18", HELD, 11.4, T2T, 34.7, T2T, CALL),
    ("resnet50", HELD, 29.8, T2T, 81.7, T2T, CALL),
    ("vgg16", HELD, 85.1, T2T, 201.0, T2T, CALL),
    ("mobilenet_v2", HELD, 17.65, IWATAKE, None, None, CALL),
    ("alexnet", FIT, 14.7, T2T, 22.1, T2T, CALL),
    ("squeezenet1_0", FIT, 7.6, T2T, 24.2, T2T, CALL),
    ("squeezenet1_1", FIT, 4.34, T2T, 14.0, T2T, CALL),
    ("resnet34", FIT, 20.2, T2T, 64.8, T2T, CALL),
    ("resnet101", FIT, 51.1, T2T, 141.0, T2T, CALL),
    ("resnet152", FIT, 72.3, T2T, 204.0, T2T, CALL),
    ("densenet121", FIT, 24.8, T2T, 84.5, T2T, CALL),
    ("densenet169", FIT, 31.2, T2T, 118.0, T2T, CALL),
    ("densenet201", FIT, 40.8, T2T, 141.0, T2T, CALL),
    ("densenet161", FIT, 65.8, T2T, 247.0, T2T, CALL),
    ("vgg11", FIT, 55.1, T2T, 114.0, T2T, CALL),
    ("vgg13", FIT, 68.7, T2T, 156.0, T2T, CALL),
    ("vgg11_bn", FIT, 54.8, T2T, 117.0, T2T, CALL),
    ("vgg13_bn", FIT, 68.5, T2T, 162.0, T2T, CALL),
    # Fast-SCNN, 19 classes, bilinear resize to the input size inside the engine (output 1x19xHxW, no argmax).
    # FP16 engines ("Precision: FP32+FP16", 16 MiB workspace), TensorRT 8.0 (the torch2trt table is 2019, TensorRT 5-6)
    ("fast_scnn_384x384", FIT_DW, 16.8028, NOBUO.format("384x384"), None, None, ENGINE),
    ("fast_scnn_384x576", FIT_DW, 23.3337, NOBUO.format("384x576"), None, None, ENGINE),
    ("fast_scnn_576x576", FIT_DW, 34.1507, NOBUO.format("576x576"), None, None, ENGINE),
    ("fast_scnn_576x768", FIT_DW, 45.3408, NOBUO.format("576x768"), None, None, ENGINE),
    ("fast_scnn_768x1344", FIT_DW, 103.031, NOBUO.format("768x1344"), None, None, ENGINE),
    # BVLC Caffe GoogLeNet (LRN, no BatchNorm, 5x5 branches) timed through a Cython wrapper on JetPack 4.2;
    # torchvision's googlenet (BatchNorm, 3x3 in the "5x5" branch) stands in for it: a rough check only
    ("googlenet", CHECK, 16.0, JKJUNG, None, None, CALL),
]
# the same logs' "Latency" mean (H2D copy + GPU Compute Time + D2H copy of the FP32 1x19xHxW output): only for the
# sensitivity table (what fitting on it instead would change)
FAST_SCNN_LATENCY = {"fast_scnn_384x384": 18.0395, "fast_scnn_384x576": 25.1983, "fast_scnn_576x576": 36.9446,
                     "fast_scnn_576x768": 49.0765, "fast_scnn_768x1344": 111.73}
INT8_R18 = (21.35, T2T_255)  # held out
FAMILIES = ("alexnet", "squeezenet1_0", "squeezenet1_1", "densenet121", "densenet169", "densenet201", "densenet161")


def names(role=None):
    return [m[0] for m in MODELS if role is None or m[1] == role]


def published(col: int) -> dict[str, float]:
    """{model: published ms} of the TensorRT (col 2) or PyTorch (col 4) column."""
    return {m[0]: m[col] for m in MODELS if m[col] is not None}


HARNESS = {m[0]: m[6] for m in MODELS}


def tables(models):
    out = {}
    for n in models:
        t = analyze(jetson_nets.loaded(n) if n in jetson_nets.NETS else load_model(f"torchvision:{n}"))
        out[n] = (t, evaluate(t))
    t8 = estimate(out["resnet18"][0], parse_strategy("quantize:int8"))
    out["resnet18:int8"] = (t8, evaluate(t8))
    return out


def ms(T, name: str, profile: HardwareProfile, per_call: bool | None = None) -> float:
    """Predicted ms of `name`; the per-call term as its harness says (HARNESS), or as `per_call` forces."""
    t, ev = T[name]
    if not (per_call if per_call is not None else HARNESS.get(name, CALL) == CALL):
        profile = _with(profile, call=0.0)
    return predict_latency(t, profile, batch_size=1, ev=ev).latency_ms


def err(pred, pub):
    return (pred - pub) / pub


def fmt_err(e):
    return f"{e * 100:+.1f}%"


# ------------------------------------------------------------------------------------------------
# the fit: least squares on log(predicted / published) over the "fit" rows


# compute.dwconv and bandwidth.dwconv before the fit (the reasons are in docs/jetson-nano.md); the fit scales both
# by one factor `dw`, so their ratio stays the prior's. gconv keeps its own prior (no grouped conv in any fit row)
DW_PRIOR = (0.25, 0.35)


def _with(profile: HardwareProfile, conv=None, bw_gemm=None, overhead=None, call=None, dw=None) -> HardwareProfile:
    d = profile.model_dump()
    e = d["efficiency"]
    if conv is not None:  # gemm and attention are tied to conv (see the profile's sources)
        for c in ("conv", "gemm", "attention"):
            e["compute"][c] = conv
    if dw is not None:
        e["compute"]["dwconv"], e["bandwidth"]["dwconv"] = DW_PRIOR[0] * dw, DW_PRIOR[1] * dw
    if bw_gemm is not None:
        e["bandwidth"]["gemm"] = bw_gemm
    if overhead is not None:
        e["kernel_overhead_us"] = overhead
    if call is not None:
        e["call_overhead_us"] = call
    return parse_profile(d, profile.name)


# parameter: (start, lower bound, upper bound)
BOUNDS = {"conv": (0.8, 0.05, 4.0), "bw_gemm": (0.5, 0.05, 1.0), "overhead": (10.0, 0.0, 2000.0),
          "call": (500.0, 0.0, 20000.0), "dw": (1.0, 0.005, 4.0)}


def fit(base: HardwareProfile, T, pub: dict[str, float], rows, free, per_call: bool | None = None,
        **fixed) -> tuple[HardwareProfile, float]:
    """The profile with `free` parameters fitted to the published `pub` latencies of `rows` (the rest at `fixed`
    or the profile's values); returns it and the fit's RMS log error. `per_call` as in ms()."""
    p0 = _with(base, **fixed) if fixed else base
    x0 = [BOUNDS[k][0] for k in free]

    def res(x):
        p = _with(p0, **dict(zip(free, x)))
        return [math.log(ms(T, n, p, per_call) / pub[n]) for n in rows]

    r = least_squares(res, x0, bounds=([BOUNDS[k][1] for k in free], [BOUNDS[k][2] for k in free]),
                      x_scale=[max(abs(v), 1e-3) for v in x0])
    return _with(p0, **dict(zip(free, r.x))), float(np.sqrt(np.mean(np.square(r.fun))))


TRT_FREE = ("conv", "bw_gemm", "call")
PT_FREE = ("conv", "overhead")
DW_FREE = ("dw",)


def fit_tensorrt(base: HardwareProfile, T, rows=None, free=TRT_FREE, **fixed):
    """compute.conv, bandwidth.gemm and call_overhead_us on the TensorRT FP16 fit rows; the rest at the priors."""
    return fit(base, T, published(2), rows or names(FIT), free, **fixed)


def fit_dwconv(trt: HardwareProfile, T, rows=None, pub=None, per_call=None):
    """The second stage: the dwconv scale on the Fast-SCNN rows, everything else as in `trt` (the first stage's
    result). The torch2trt fit rows have no depthwise conv, so the scale cannot change them, and fitting it
    afterwards keeps the Fast-SCNN rows (another TensorRT, another harness) from moving the dense-conv numbers."""
    return fit(trt, T, pub or published(2), rows or names(FIT_DW), DW_FREE, per_call=per_call)


def dw_scale(p: HardwareProfile) -> float:
    return p.efficiency.bandwidth["dwconv"] / DW_PRIOR[1]


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
    fd, rms_d = fit_dwconv(ft, T)
    fp, rms_p = fit_pytorch(pt, T, ft.efficiency.bandwidth["gemm"])
    fit_rows, dw_rows = names(FIT), names(FIT_DW)
    print(f"Stage 1 on the {len(fit_rows)} torch2trt fit rows ({', '.join(fit_rows)}); stage 2 (jetson-nano's dwconv "
          f"factor) on the {len(dw_rows)} Fast-SCNN rows ({', '.join(dw_rows)}), the stage-1 numbers fixed; all other "
          "numbers at the profiles' priors:\n")
    print("| profile | parameter | fitted | in the YAML |\n|---|---|---|---|")
    s = dw_scale(fd)
    getters = {
        "conv": ("efficiency.compute.conv (gemm, attention tied)", lambda p: p.efficiency.compute["conv"]),
        "gemm": ("efficiency.bandwidth.gemm", lambda p: p.efficiency.bandwidth["gemm"]),
        "call": ("efficiency.call_overhead_us", lambda p: p.efficiency.call_overhead_us),
        "overhead": ("efficiency.kernel_overhead_us", lambda p: p.efficiency.kernel_overhead_us),
        "dwc": (f"efficiency.compute.dwconv (stage 2: {s:.4g} x prior {DW_PRIOR[0]})",
                lambda p: p.efficiency.compute["dwconv"]),
        "dwb": (f"efficiency.bandwidth.dwconv (stage 2: {s:.4g} x prior {DW_PRIOR[1]})",
                lambda p: p.efficiency.bandwidth["dwconv"])}
    for prof, fitted, cur, keys in (("jetson-nano", fd, trt, ("conv", "gemm", "call", "dwc", "dwb")),
                                    ("jetson-nano-pytorch", fp, pt, ("conv", "overhead", "gemm"))):
        for k in keys:
            label, get = getters[k]
            label += " (from jetson-nano)" if prof != "jetson-nano" and k == "gemm" else ""
            print(f"| {prof} | {label} | {get(fitted):.4g} | {get(cur):g} |")
    print(f"\nRMS log error over the fit rows: jetson-nano stage 1 {rms_t:.3f}, stage 2 {rms_d:.3f}; "
          f"jetson-nano-pytorch {rms_p:.3f}")
    pub = published(2)
    print("\nStage 2 rows (predicted without the per-call term): " + ", ".join(
        f"{n} {ms(T, n, fd):.1f} ms vs {pub[n]:g} ms ({fmt_err(err(ms(T, n, fd), pub[n]))})" for n in dw_rows))

    held = [n for n, _ in _held_errors(T, trt)]
    print("\nSensitivity of the TensorRT fit (each refitted, stage 1 then stage 2; errors on the held-out rows):\n")
    print("| variant | conv | bw.gemm | kernel us | call us | dwconv factor | " + " | ".join(held) + " | mean abs |")
    print("|---|---|---|---|---|---|" + "---|" * (len(held) + 1))
    host = {**published(2), **FAST_SCNN_LATENCY}
    variants = [("as shipped (kernel overhead 10 us prior)", {}, TRT_FREE, None, {}),
                ("kernel overhead fitted too", {}, TRT_FREE + ("overhead",), None, {}),
                ("kernel overhead prior 5 us", {"overhead": 5.0}, TRT_FREE, None, {}),
                ("kernel overhead prior 20 us", {"overhead": 20.0}, TRT_FREE, None, {}),
                ("no per-call term (call 0)", {"call": 0.0}, ("conv", "bw_gemm", "overhead"), None, {}),
                ("other families only (AlexNet, SqueezeNet, DenseNet)", {}, TRT_FREE, list(FAMILIES), {}),
                ("stage 2 with the per-call term added to the Fast-SCNN rows", {}, TRT_FREE, None, {"per_call": True}),
                ("stage 2 on trtexec's Latency (with the H2D/D2H copies)", {}, TRT_FREE, None, {"pub": host}),
                ("stage 2 on Fast-SCNN 384x384 only", {}, TRT_FREE, None, {"rows": ["fast_scnn_384x384"]}),
                ("stage 2 on Fast-SCNN 768x1344 only", {}, TRT_FREE, None, {"rows": ["fast_scnn_768x1344"]}),
                ("one joint fit of all four on the 19 fit rows", {}, None, None, {})]
    for label, fixed, free, rows, dw in variants:
        if free is None:
            f, _ = fit(trt, T, published(2), fit_rows + dw_rows, TRT_FREE + DW_FREE)
        else:
            f, _ = fit_dwconv(fit_tensorrt(trt, T, rows=rows, free=free, **fixed)[0], T, **dw)
        e = f.efficiency
        es = [v for _, v in _held_errors(T, f)]
        print(f"| {label} | {e.compute['conv']:.3f} | {e.bandwidth['gemm']:.3f} | {e.kernel_overhead_us:.1f} | "
              f"{e.call_overhead_us:.0f} | {dw_scale(f):.3f} | " + " | ".join(fmt_err(v) for v in es)
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
    print("| model (batch 1; 224x224 unless named) | used for | TensorRT FP16 published | jetson-nano | error "
          "| PyTorch FP16 published | jetson-nano-pytorch | error | source |")
    print("|---|---|---|---|---|---|---|---|---|")
    errs = {(rt, role): [] for rt in ("trt", "pt") for role in (HELD, FIT, FIT_DW, CHECK)}
    for name, role, t_pub, t_src, p_pub, p_src, harness in MODELS:
        t_pred = ms(T, name, trt)
        et = err(t_pred, t_pub)
        errs[("trt", role)].append(et)
        if harness == ENGINE:  # a trtexec engine time: no PyTorch counterpart
            p_cells = "n/a | n/a | n/a"
            src = f"{t_src} (GPU Compute Time; predicted without the per-call term)"
        else:
            p_pred = ms(T, name, pt)
            ep = err(p_pred, p_pub) if p_pub else None
            if ep is not None:
                errs[("pt", role)].append(ep)
            p_cells = f"{p_pub:.1f} ms | {p_pred:.2f} ms | {fmt_err(ep)}" if p_pub else f"n/a | {p_pred:.2f} ms | n/a"
            src = t_src if (p_src in (None, t_src)) else f"{t_src}; {p_src}"
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
        dw = errs[(key, FIT_DW)]
        print(f"- {prof}: mean absolute error over the held-out rows ({held}): {mae(es)}; worst "
              f"{max(es, key=abs) * 100:+.1f}%; over the {len(errs[(key, FIT)])} fit rows {mae(errs[(key, FIT)])}"
              + (f"; over the {len(dw)} Fast-SCNN fit rows {mae(dw)}" if dw else ""))
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
