"""Calibration: fit a profile's factors from micro-benchmarks run on this machine.

The micro-benchmarks are single operators over a spread of shapes (GEMM, dense, depthwise and grouped
convolutions, elementwise, pooling, normalisation, memory copy; FP32 eager and INT8 in the
inductor-compiled form that runs fast on x86). Their FLOPs and bytes come from the same analysis the
predictor uses, so the fit is consistent with prediction. Calibration never runs the benchmark models.
Per operator class it fits the share of peak compute, the share of cache bandwidth, a per-kernel
overhead and a misaligned-channel factor by non-negative least squares on the relative error of
t = overhead + FLOPs / (peak x share) + bytes / (bandwidth x share).
"""
from __future__ import annotations

import datetime as _dt
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from estimators.pruning import PrunePlan
from estimators.table import LayerTable, build_table
from estimators.trace import trace_model

from .latency import ALL_CLASSES, _row_features, fused_mask, misaligned
from .measure import measure_latency
from .profile import OP_CLASSES, Efficiency, HardwareProfile, Provenance

Progress = Callable[[str], None]
BATCHES = (1, 8)  # every micro-benchmark runs at both: what does not scale with the batch is overhead
CHANNEL_MULTIPLE = 16  # oneDNN's channel blocking with AVX-512


def light_table(model: nn.Module, example: torch.Tensor, name: str = "bench") -> LayerTable:
    """Analysis without the pruning plan (micro-benchmarks need costs only)."""
    tr = trace_model(model, example)
    table, _ = build_table(name, tuple(example.shape), tr, PrunePlan())
    return table


@dataclass
class Sample:
    cls: str
    flops: float
    bytes: float
    kernels: int
    views: int
    seconds: float
    label: str
    misaligned: bool = False


class _Op(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fp32_cases(quick: bool) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    cases: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    conv = [(3, 64, 112, 7, 2), (64, 64, 56, 3, 1), (64, 256, 56, 1, 1), (128, 128, 28, 3, 1), (256, 64, 56, 1, 1),
            (256, 256, 14, 3, 1), (512, 512, 7, 3, 1), (32, 16, 112, 1, 1), (96, 24, 56, 1, 1), (1024, 256, 14, 1, 1),
            (128, 32, 28, 3, 1), (512, 2048, 7, 1, 1)]
    dw = [(32, 112, 3, 1), (96, 112, 3, 2), (144, 56, 3, 1), (192, 28, 3, 1), (384, 14, 3, 1), (960, 7, 3, 1),
          (240, 28, 5, 1), (672, 14, 5, 2)]
    grouped = [(64, 64, 56, 8), (128, 128, 28, 8), (256, 256, 14, 16), (440, 440, 7, 55)]
    gemm = [(1, 512, 1000), (1, 2048, 1000), (1, 25088, 4096), (8, 4096, 4096), (8, 1280, 1000), (197, 768, 768)]
    elem = [(64, 112), (256, 56), (512, 28), (1024, 14), (16, 112), (144, 56)]
    if quick:
        conv, dw, grouped, gemm, elem = conv[::3], dw[::3], grouped[::2], gemm[::2], elem[::3]
    for cin, cout, hw, k, s in conv:
        cases.append(("conv", nn.Conv2d(cin, cout, k, s, k // 2, bias=False), (1, cin, hw, hw)))
    for c, hw, k, s in dw:
        cases.append(("dwconv", nn.Conv2d(c, c, k, s, k // 2, groups=c, bias=False), (1, c, hw, hw)))
    # channel counts pruning leaves behind (not multiples of the SIMD width)
    odd_conv = [(45, 45, 56, 3, 1), (90, 179, 28, 1, 1), (179, 179, 14, 3, 1), (358, 90, 14, 1, 1), (25, 77, 56, 1, 1),
                (3, 45, 112, 7, 2)]
    odd_dw = [(67, 112, 3, 1), (134, 56, 3, 2), (269, 28, 3, 1), (538, 14, 5, 1)]
    if quick:
        odd_conv, odd_dw = odd_conv[::3], odd_dw[::2]
    for cin, cout, hw, k, s in odd_conv:
        cases.append(("conv", nn.Conv2d(cin, cout, k, s, k // 2, bias=False), (1, cin, hw, hw)))
    for c, hw, k, s in odd_dw:
        cases.append(("dwconv", nn.Conv2d(c, c, k, s, k // 2, groups=c, bias=False), (1, c, hw, hw)))
    for cin, cout, hw, g in grouped:
        cases.append(("conv", nn.Conv2d(cin, cout, 3, 1, 1, groups=g, bias=False), (1, cin, hw, hw)))
    for m, k, n in gemm:
        cases.append(("gemm", nn.Linear(k, n), (m, k)))
    for c, hw in elem:
        cases.append(("elementwise", nn.ReLU(), (1, c, hw, hw)))
        cases.append(("elementwise", _Op(lambda x: x + x), (1, c, hw, hw)))
        cases.append(("norm", nn.BatchNorm2d(c), (1, c, hw, hw)))
        cases.append(("maxpool", nn.MaxPool2d(3, 2, 1), (1, c, hw, hw)))
        cases.append(("pool", nn.AdaptiveAvgPool2d(1), (1, c, hw, hw)))
        cases.append(("copy", _Op(lambda x: torch.cat([x, x], 1)), (1, c, hw, hw)))
    return cases


def _int8_cases(quick: bool) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    def block(cin, cout, k, s, groups=1):
        return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    cases = [
        ("conv", block(64, 64, 3, 1), (1, 64, 56, 56)),
        ("conv", block(256, 64, 1, 1), (1, 256, 56, 56)),
        ("conv", block(256, 256, 3, 1), (1, 256, 14, 14)),
        ("conv", block(512, 2048, 1, 1), (1, 512, 7, 7)),
        ("conv", block(45, 90, 3, 1), (1, 45, 56, 56)),
        ("conv", block(179, 45, 1, 1), (1, 179, 28, 28)),
        ("dwconv", block(144, 144, 3, 1, groups=144), (1, 144, 56, 56)),
        ("dwconv", block(67, 67, 3, 1, groups=67), (1, 67, 56, 56)),
        ("dwconv", block(672, 672, 5, 2, groups=672), (1, 672, 14, 14)),
        ("gemm", nn.Sequential(nn.Flatten(), nn.Linear(2048, 1000)), (1, 2048)),
    ]
    return cases[::2] if quick else cases


def _sample(cls: str, label: str, table: LayerTable, seconds: float, fused: list[str] | None = None,
            multiple: int = 16) -> Sample:
    flops, wbytes, abytes, kinds, cin, cout = _row_features(table, table.batch)
    costed = np.isin(kinds, ALL_CLASSES)
    if fused:
        costed &= ~fused_mask(table, kinds, fused)
    main = costed & (kinds == cls) if (costed & (kinds == cls)).any() else costed
    return Sample(cls, float(flops[main].sum()), float((wbytes + abytes)[costed].sum()), int(costed.sum()),
                  int((kinds == "view").sum()), seconds, label, bool(misaligned(cin[main], cout[main], multiple).any()))


def run_benchmarks(dtype: str, quick: bool, progress: Progress, budget_s: float) -> list[Sample]:
    torch.manual_seed(0)
    out: list[Sample] = []
    cases = _fp32_cases(quick) if dtype == "fp32" else _int8_cases(quick)
    per = max(0.1, budget_s / max(1, len(cases) * len(BATCHES)))
    for i, (cls, mod, shape) in enumerate(cases):
        mod = mod.eval()
        fn = mod
        if dtype != "fp32":
            from tasks.quantize_exec import compile_for_inference, quantize

            fn = compile_for_inference(quantize(mod, torch.randn(*shape), "int8").program)
        for batch in BATCHES:
            x = torch.randn(batch, *shape[1:])
            label = f"{cls} {type(mod).__name__} {tuple(x.shape)}"
            table = light_table(mod, x)
            fused = None
            if dtype != "fp32":
                from estimators.quantize import estimate_quantize
                from estimators.strategy import QuantizeStep

                table = estimate_quantize(table, QuantizeStep(dtype="int8"))
                fused = ["norm", "elementwise"]
            m = measure_latency(fn, x, warmup=3, min_runs=8, budget_s=per)
            out.append(_sample(cls, label, table, m["latency_ms"] / 1e3, fused=fused))
        progress(f"[{dtype} {i + 1}/{len(cases)}] {label}: {out[-1].seconds * 1e6:.0f} us at batch {BATCHES[-1]}")
    return out


def cache_bytes() -> int:
    """Last-level cache size from sysfs (8 MiB when unknown)."""
    best = 0
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (idx / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(size[-1:], 1)
        best = max(best, int(size.rstrip("KMG")) * mult)
    return best or 8 * 1024**2


def measure_peaks(progress: Progress) -> tuple[float, float, float]:
    """Peak FP32 GEMM throughput (GFLOP/s), DRAM and cache copy bandwidth (GB/s, read + write)."""
    a = torch.randn(1024, 1024)
    b = torch.randn(1024, 1024)
    m = measure_latency(lambda x: torch.mm(x, b), a, warmup=2, min_runs=10, budget_s=1.0)
    gflops = 2 * 1024**3 / (m["latency_ms"] / 1e3) / 1e9
    big = torch.randn(64 * 1024 * 1024 // 4 * 2)  # 128 MB
    m2 = measure_latency(lambda x: x.clone(), big, warmup=2, min_runs=5, budget_s=1.0)
    gbs = 2 * big.numel() * 4 / (m2["latency_ms"] / 1e3) / 1e9
    small = torch.randn(256 * 1024)  # 1 MB: stays in cache
    m3 = measure_latency(lambda x: x.clone(), small, warmup=5, min_runs=50, budget_s=0.5)
    cbs = 2 * small.numel() * 4 / (m3["latency_ms"] / 1e3) / 1e9
    progress(f"peak fp32 GEMM {gflops:.1f} GFLOP/s, DRAM copy {gbs:.1f} GB/s, cache copy {cbs:.1f} GB/s")
    return gflops, gbs, cbs


def fit_sum(samples: list[Sample], peak: float, bw: "np.ndarray", view_us: float):
    """Non-negative least squares on relative error of t = overhead x kernels + FLOPs/(peak e) (x misaligned
    factor) + bytes/(bandwidth b). Returns (e, b, overhead s, MAPE, misaligned factor)."""
    from scipy.optimize import nnls

    K = np.array([s.kernels for s in samples], float)
    F = np.array([s.flops for s in samples]) / (peak * 1e9)
    B = np.array([s.bytes for s in samples]) / (np.asarray(bw) * 1e9)
    M = np.array([s.misaligned for s in samples], float)
    T = np.array([s.seconds - s.views * view_us * 1e-6 for s in samples])
    # traffic that spills out of the cache moves at memory bandwidth (no class share), as the predictor says
    llc = cache_bytes()
    spill = np.array([s.bytes > llc for s in samples])
    T = np.maximum(T - np.where(spill, B, 0.0), 1e-7)
    B = np.where(spill, 0.0, B)
    cols = np.stack([K, F, B, F * M], 1)
    x, _ = nnls(cols / T[:, None], np.ones(len(T)))
    mape = float(np.abs((cols @ x - T) / T).mean())
    o, inv_e, inv_b, extra = x
    e = 1.0 / inv_e if inv_e > 0.25 else 4.0
    b = 1.0 / inv_b if inv_b > 0.02 else 50.0
    factor = 1.0 + extra / inv_e if inv_e > 0 else 1.0
    return float(e), float(b), float(o), mape, float(min(factor, 8.0))


INT8_LANES = 4  # int8 dot products (VNNI) do 4x the multiply-adds of fp32 FMA per instruction
COMBINE = "sum"  # eager CPU kernels barely overlap compute and memory traffic: fitted additively


def calibrate_host(quick: bool = False, progress: Progress = lambda m: None, int8: bool = True,
                   budget_s: float = 150.0) -> HardwareProfile:
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    peak, bw, cbw = measure_peaks(progress)
    llc = cache_bytes()

    def bws(samples):
        return np.array([cbw if s.bytes <= llc else bw for s in samples])

    # view/dispatch overhead of an op that moves no data
    x = torch.randn(1, 64, 8, 8)
    view_us = measure_latency(lambda t: t.view(1, -1), x, warmup=5, min_runs=50, budget_s=0.3)["latency_ms"] * 1e3
    fp32 = run_benchmarks("fp32", quick, progress, budget_s * (0.45 if int8 else 0.9))
    fit: dict[str, float] = {}
    compute, bandwidth = {}, {}
    overheads = []
    misfit: dict[str, float] = {}
    for cls in ALL_CLASSES:
        s = [x for x in fp32 if x.cls == cls]
        if cls == "attention":
            s = [x for x in fp32 if x.cls == "gemm"]
        e, b, o, mape, mf = fit_sum(s, peak, bws(s), view_us)
        compute[cls], bandwidth[cls] = e, b
        if mf > 1.0:
            misfit[cls] = round(mf, 4)
        overheads.append((o, len(s)))
        fit[f"fp32.{cls}.mape"] = round(mape, 4)
        progress(f"fit fp32 {cls}: compute {e:.3f} of peak, bandwidth {b:.3f}, overhead {o * 1e6:.1f} us, MAPE {100 * mape:.1f}%")
    overhead_us = float(np.average([o for o, _ in overheads], weights=[n for _, n in overheads])) * 1e6
    eff = Efficiency(compute=compute, bandwidth=bandwidth, kernel_overhead_us=round(overhead_us, 3),
                     view_overhead_us=round(view_us, 3), fused=[], misaligned_factor=misfit)
    overrides = {}
    peaks = {"fp32": round(peak, 2)}
    if int8:
        # a compiled graph's fixed cost per call, measured on a near-empty quantized graph
        from tasks.quantize_exec import compile_for_inference, quantize

        tiny = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.ReLU()).eval()
        xt = torch.randn(1, 16, 4, 4)
        call_us = measure_latency(compile_for_inference(quantize(tiny, xt, "int8").program), xt, warmup=3, min_runs=50,
                                  budget_s=0.5)["latency_ms"] * 1e3
        progress(f"int8 compiled graph: {call_us:.1f} us per call")
        q = run_benchmarks("int8", quick, progress, budget_s * 0.45)
        for smp in q:
            smp.seconds = max(smp.seconds - call_us * 1e-6, 1e-7)
        comp8, bw8, ovs, mis8 = dict(compute), dict(bandwidth), [], dict(misfit)
        for cls in ("conv", "dwconv", "gemm"):
            s = [x for x in q if x.cls == cls]
            if not s:
                continue
            e, b, o, mape, mf = fit_sum(s, INT8_LANES * peak, bws(s), 0.0)
            comp8[cls], bw8[cls] = e, b
            mis8[cls] = round(mf, 4)
            ovs.append(o)
            fit[f"int8.{cls}.mape"] = round(mape, 4)
            progress(f"fit int8 {cls}: compute {e:.3f} of int8 peak, bandwidth {b:.3f}, overhead {o * 1e6:.1f} us, MAPE {100 * mape:.1f}%")
        comp8["attention"] = comp8["gemm"]
        overrides["int8"] = Efficiency(compute=comp8, bandwidth=bw8, kernel_overhead_us=round(float(np.mean(ovs)) * 1e6, 3),
                                       view_overhead_us=0.0, call_overhead_us=round(call_us, 3),
                                       fused=["norm", "elementwise"], misaligned_factor=mis8)
        peaks["int8"] = round(INT8_LANES * peak, 2)
    fit["seconds"] = round(time.perf_counter() - t0, 1)
    return HardwareProfile(
        name="host",
        description=f"this machine: {_cpu_name()}, {threads} threads",
        runtime=f"PyTorch {torch.__version__} eager on {threads} threads for float models; int8 as the "
                "inductor-compiled (freezing) Intel Neural Compressor Q/DQ graph",
        peak_gflops=peaks,
        memory_bandwidth_gbs=round(bw, 2),
        cache_bytes=llc,
        cache_bandwidth_gbs=round(cbw, 2),
        fast_dtypes=list(peaks),
        channel_multiple=CHANNEL_MULTIPLE,
        float_runs_as="fp32",
        combine=COMBINE,
        slow_dtypes={},
        efficiency=eff,
        dtype_overrides=overrides,
        sources={
            "peak_gflops": "measured: 1024^3 fp32 torch.mm on this machine; int8 = 4 x that (VNNI: 4 int8 "
                           "multiply-adds per fp32 FMA lane)",
            "memory_bandwidth_gbs": "measured: clone of a 128 MB tensor (read + write)",
            "cache_bandwidth_gbs": "measured: clone of a 1 MB tensor (read + write); cache_bytes from sysfs",
            "efficiency": "fitted by `deployfit calibrate` to single-operator micro-benchmarks (see provenance.fit)",
        },
        provenance=Provenance(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), cpu=_cpu_name(),
                              threads=threads, torch=torch.__version__,
                              method="per class: overhead x kernels + FLOPs/(peak e) x misaligned factor + bytes/"
                                     "(bandwidth b), non-negative least squares on relative error, batches 1 and 8"
                                     + (" [quick]" if quick else ""),
                              fit=fit),
    )
