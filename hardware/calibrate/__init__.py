"""Calibration: fit the host profile to operators timed inside running networks on this machine.

Single-operator loops flatter a CPU: weights and inputs stay hot in the cache and no other operator evicts them,
so they miss against the same operator inside a model. Calibration therefore times every operator inside random
synthetic CNNs (hardware.synthetic) exported as deployfit's artifacts are, at each calibrated batch size, and fits
the split model (hardware.latency.split_terms) per operator class. INT8 runs compiled, where operators cannot be
timed one by one, so its kernels are timed alone and what a compiled graph adds around them is fitted on whole
compiled networks. Calibration never runs the benchmark models, so bench/latency.py tests what it fitted.

The package, in the order a calibration runs:

- `sampling`: the float networks, timed operator by operator in context, and the machine's peaks;
- `int8`: INT8 kernels and quantized pooling timed alone, and compiled INT8 networks profiled;
- `samples`: collecting all of it (collect_samples), keeping it as data (save/load/merge), pacing it;
- `fit`: the least-squares fits of the split model, the glue, pooling and the INT8 graph;
- `profile`: fit_profile, the host profile from the samples, and calibrate_host, the whole run;
- `onnxrt`: this machine's ONNX Runtime profile, the host profile refitted to whole synthetic networks timed in
  ONNX Runtime (calibrate_runtime; the export is the caller's).
"""
from .int8 import Int8Builder
from .profile import calibrate_host, fit_profile
from .samples import Samples, collect_samples, load_samples, merge_samples, save_samples

__all__ = ["Int8Builder", "Samples", "calibrate_host", "collect_samples", "fit_profile", "load_samples",
           "merge_samples", "save_samples"]
