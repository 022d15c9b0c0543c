"""Calibration: fit a profile's factors from micro-benchmarks run on this machine.

The micro-benchmarks are single operators over a spread of shapes (GEMM, dense, depthwise and grouped
convolutions, elementwise, pooling, normalisation, memory copy; FP32 eager and INT8 in the
inductor-compiled form that runs fast on x86). Their FLOPs and bytes come from the same analysis the
predictor uses, so the fit is consistent with prediction. Calibration never runs the benchmark models.
Per operator class it fits the share of peak compute, the share of bandwidth and a per-kernel
overhead that minimise the squared relative error of the roofline-plus-overhead model.
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

from .latency import ALL_CLASSES, _row_features, fused_mask
from .measure import measure_latency
from .profile import OP_CLASSES, Efficiency, HardwareProfile, Provenance

Progress = Callable[[str], None]


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
        ("dwconv", block(144, 144, 3, 1, groups=144), (1, 144, 56, 56)),
        ("dwconv", block(672, 672, 5, 2, groups=672), (1, 672, 14, 14)),
        ("gemm", nn.Sequential(nn.Flatten(), nn.Linear(2048, 1000)), (1, 2048)),
    ]
    return cases[::2] if quick else cases


def _sample(cls: str, label: str, table: LayerTable, seconds: float, fused: list[str] | None = None) -> Sample:
    flops, wbytes, abytes, kinds = _row_features(table, table.batch)
    costed = np.isin(kinds, ALL_CLASSES)
    if fused:
        costed &= ~fused_mask(table, kinds, fused)
    main = costed & (kinds == cls) if (costed & (kinds == cls)).any() else costed
    return Sample(cls, float(flops[main].sum()), float((wbytes + abytes)[costed].sum()), int(costed.sum()),
                  int((kinds == "view").sum()), seconds, label)


def run_benchmarks(dtype: str, quick: bool, progress: Progress, budget_s: float) -> list[Sample]:
    torch.manual_seed(0)
    out: list[Sample] = []
    cases = _fp32_cases(quick) if dtype == "fp32" else _int8_cases(quick)
    per = max(0.2, budget_s / max(1, len(cases)))
    for i, (cls, mod, shape) in enumerate(cases):
        mod = mod.eval()
        x = torch.randn(*shape)
        label = f"{cls} {type(mod).__name__} {tuple(shape)}"
        if dtype == "fp32":
            table = light_table(mod, x)
            m = measure_latency(mod, x, warmup=3, min_runs=10, budget_s=per)
            out.append(_sample(cls, label, table, m["latency_ms"] / 1e3))
        else:
            from tasks.quantize_exec import compile_for_inference, quantize

            q = quantize(mod, x, "int8")
            fn = compile_for_inference(q.program)
            table = light_table(mod, x)
            from estimators.quantize import estimate_quantize
            from estimators.strategy import QuantizeStep

            table = estimate_quantize(table, QuantizeStep(dtype="int8"))
            m = measure_latency(fn, x, warmup=3, min_runs=10, budget_s=per)
            out.append(_sample(cls, label, table, m["latency_ms"] / 1e3, fused=["norm", "elementwise"]))
        progress(f"[{dtype} {i + 1}/{len(cases)}] {label}: {out[-1].seconds * 1e6:.0f} us")
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


def fit_class(samples: list[Sample], peak: float, bw: "np.ndarray", view_us: float) -> tuple[float, float, float, float]:
    """Grid-fit (compute share, bandwidth share, overhead s) minimising squared relative error; returns also MAPE.
    `bw` is each sample's bandwidth (GB/s): cache or DRAM by its working set."""
    F = np.array([s.flops for s in samples])
    B = np.array([s.bytes for s in samples])
    K = np.array([s.kernels for s in samples])
    V = np.array([s.views for s in samples])
    T = np.array([s.seconds for s in samples]) - V * view_us * 1e-6
    effs = np.geomspace(0.002, 4.0, 70)
    bws = np.geomspace(0.02, 50.0, 60)
    ovs = np.concatenate([[0.0], np.geomspace(0.5e-6, 200e-6, 50)])
    comp = F[None, :] / (peak * 1e9 * effs[:, None])  # e x n
    mem = B[None, :] / (np.asarray(bw)[None, :] * 1e9 * bws[:, None])  # b x n
    base = np.maximum(comp[:, None, :], mem[None, :, :])  # e x b x n
    pred = base[:, :, None, :] + ovs[None, None, :, None] * K[None, None, None, :]  # e x b x o x n
    err = ((pred - T) / T) ** 2
    loss = err.mean(axis=-1)
    i, j, k = np.unravel_index(np.argmin(loss), loss.shape)
    mape = float(np.abs((pred[i, j, k] - T) / T).mean())
    return float(effs[i]), float(bws[j]), float(ovs[k]), mape


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
    for cls in ALL_CLASSES:
        s = [x for x in fp32 if x.cls == cls]
        if cls == "attention":
            s = [x for x in fp32 if x.cls == "gemm"]
        e, b, o, mape = fit_class(s, peak, bws(s), view_us)
        compute[cls], bandwidth[cls] = e, b
        overheads.append((o, len(s)))
        fit[f"fp32.{cls}.mape"] = round(mape, 4)
        progress(f"fit fp32 {cls}: compute {e:.3f} of peak, bandwidth {b:.3f}, overhead {o * 1e6:.1f} us, MAPE {100 * mape:.1f}%")
    overhead_us = float(np.average([o for o, _ in overheads], weights=[n for _, n in overheads])) * 1e6
    eff = Efficiency(compute=compute, bandwidth=bandwidth, kernel_overhead_us=round(overhead_us, 3),
                     view_overhead_us=round(view_us, 3), fused=[])
    overrides = {}
    peaks = {"fp32": round(peak, 2)}
    if int8:
        q = run_benchmarks("int8", quick, progress, budget_s * 0.45)
        comp8, bw8, ovs = dict(compute), dict(bandwidth), []
        for cls in ("conv", "dwconv", "gemm"):
            s = [x for x in q if x.cls == cls]
            if not s:
                continue
            e, b, o, mape = fit_class(s, peak, bws(s), 0.0)
            comp8[cls], bw8[cls] = e, b
            ovs.append(o)
            fit[f"int8.{cls}.mape"] = round(mape, 4)
            progress(f"fit int8 {cls}: compute {e:.3f} of fp32 peak, bandwidth {b:.3f}, overhead {o * 1e6:.1f} us, MAPE {100 * mape:.1f}%")
        comp8["attention"] = comp8["gemm"]
        overrides["int8"] = Efficiency(compute=comp8, bandwidth=bw8, kernel_overhead_us=round(float(np.mean(ovs)) * 1e6, 3),
                                       view_overhead_us=0.0, fused=["norm", "elementwise"])
        peaks["int8"] = round(peak, 2)  # int8 efficiencies are expressed against the fp32 GEMM peak
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
        float_runs_as="fp32",
        slow_dtypes={},
        efficiency=eff,
        dtype_overrides=overrides,
        sources={
            "peak_gflops": "measured: 1024^3 fp32 torch.mm on this machine (int8 efficiencies are relative to it)",
            "memory_bandwidth_gbs": "measured: clone of a 128 MB tensor (read + write)",
            "cache_bandwidth_gbs": "measured: clone of a 1 MB tensor (read + write); cache_bytes from sysfs",
            "efficiency": "fitted by `deployfit calibrate` to single-operator micro-benchmarks (see provenance.fit)",
        },
        provenance=Provenance(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), cpu=_cpu_name(),
                              threads=threads, torch=torch.__version__,
                              method="roofline max(compute, memory) + overhead per kernel, grid-fit per class "
                                     "(squared relative error)" + (" [quick]" if quick else ""),
                              fit=fit),
    )
