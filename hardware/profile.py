"""Hardware profiles: one YAML file per device and runtime under hardware/profiles/, validated on load.

A profile is data (never an if-chain on device names): peak throughput per dtype, memory bandwidth,
the share of peak each operator class reaches, a per-kernel overhead, which dtypes run fast, how a
slow dtype really runs, which operators the runtime fuses into the preceding conv/linear, and the
source of every number. `dtype_overrides` lets one runtime path (e.g. inductor-compiled int8 on a
CPU) carry its own efficiencies, overhead and fusion.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from estimators.errors import UserInputError, read_yaml_mapping

PROFILE_DIR = Path(__file__).parent / "profiles"
OP_CLASSES = ("conv", "dwconv", "gemm", "attention", "elementwise", "norm", "pool", "copy")
# optional finer classes: a profile may give them, else they cost as their parent class
# gconv: grouped (not depthwise) convolutions; transcendental: elementwise ops that evaluate exp/tanh/erf (SiLU,
# sigmoid, GELU, ...), which cost far more per element than ReLU where the data is not the bottleneck
# permute: copies that reorder memory (contiguous() of a transposed view: ShuffleNet's channel shuffle), strided
SUBCLASSES = {"maxpool": "pool", "gconv": "conv", "transcendental": "elementwise", "permute": "elementwise"}
ALL_CLASSES = OP_CLASSES + tuple(SUBCLASSES)
Dtype = Literal["fp32", "fp16", "bf16", "int8"]
OpClass = Literal["conv", "dwconv", "gemm", "attention", "elementwise", "norm", "pool", "copy", "maxpool", "gconv",
                  "transcendental", "permute"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN or inf in a profile: refused on load


class SlowDtype(_Strict):
    runs_as: Dtype = Field(description="the dtype whose kernels the runtime really uses")
    factor: float = Field(gt=0, description="time multiplier against running in `runs_as`")
    source: str


class Efficiency(_Strict):
    """Share of peak compute (and of bandwidth) an operator class reaches; overhead per kernel."""

    compute: dict[OpClass, float] = Field(description="share of the dtype's peak FLOP/s per operator class")
    bandwidth: dict[OpClass, float] = Field(default_factory=dict, description="share of peak bandwidth (default 1)")
    kernel_overhead_us: float = Field(ge=0, description="fixed time per kernel launched")
    view_overhead_us: float = Field(default=0.0, ge=0, description="time of an op that moves no data (eager dispatch)")
    call_overhead_us: float = Field(default=0.0, ge=0, description="fixed time per model call (e.g. a compiled graph's guards)")
    fused: list[OpClass] = Field(default_factory=list, description="classes fused into the preceding conv/linear")
    unfused_ops: list[str] = Field(default_factory=list, description="operators (lower-case names) of a fused class "
                                   "the runtime does not fuse (e.g. sigmoid, mul: no INT8 convolution post-op)")
    misaligned_factor: dict[OpClass, float] = Field(
        default_factory=dict, description="time multiplier when a layer's channels are not multiples of the profile's "
                                          "channel_multiple (kernels fall back to slower paths)")
    group_multiple: Optional[int] = Field(
        default=None, ge=1, description="a grouped (not depthwise) convolution of this dtype runs its fast kernel only "
                                        "where its input and output channels per group are multiples of this; elsewhere "
                                        "it takes group_slow_ns per FLOP (None: no such rule)")
    group_slow_ns: float = Field(default=0.0, ge=0, description="nanoseconds per FLOP of a grouped convolution off "
                                                                "group_multiple (its slow kernel)")
    group_tap_ns: dict[int, float] = Field(
        default_factory=dict, description="a float grouped (not depthwise) convolution adds this many nanoseconds "
                                          "per output element and kernel tap to its split-model price, by its input "
                                          "channels per group (timed alone: hardware.calibrate.groups); beyond the "
                                          "largest count, the largest counts' time per channel per group (empty: no "
                                          "such term)")
    group_call_ns: dict[int, float] = Field(
        default_factory=dict, description="with group_tap_ns: a float grouped convolution adds this many nanoseconds "
                                          "per image and group of the call, by its input channels per group (timed "
                                          "alone: hardware.calibrate.groups; empty: no such term)")
    group_fixed_us: dict[int, float] = Field(
        default_factory=dict, description="with group_tap_ns: a float grouped convolution adds this many microseconds "
                                          "per call, by its input channels per group (timed alone: "
                                          "hardware.calibrate.groups; beyond the largest count, the largest count's; "
                                          "empty: no such term)")
    # the split memory model (a calibrated CPU): given when weights and activations move at different rates
    overhead_us: dict[OpClass, float] = Field(default_factory=dict, description="fixed time per kernel of a class "
                                              "(default kernel_overhead_us)")
    weight_bandwidth: dict[OpClass, float] = Field(
        default_factory=dict, description="share of memory_read_bandwidth_gbs at which a class reads its weights "
                                          "(given: weights are costed apart from activations, as in the split model)")
    spill_bandwidth: dict[OpClass, float] = Field(
        default_factory=dict, description="share of memory_bandwidth_gbs for activation traffic larger than the cache")
    pointwise_factor: dict[OpClass, float] = Field(
        default_factory=dict, description="compute-time multiplier of 1x1 convolutions against the class's efficiency")
    remainder_ns: dict[OpClass, float] = Field(
        default_factory=dict, description="nanoseconds per FLOP (per element for pooling: times the window) on the "
                                          "channels beyond the largest multiple of remainder_multiple (a kernel's "
                                          "scalar tail, e.g. quantized max pooling on 24 channels)")
    remainder_multiple: dict[OpClass, int] = Field(default_factory=dict, description="channel vector width of "
                                                   "remainder_ns (default the profile's channel_multiple)")
    element_ns: dict[OpClass, float] = Field(
        default_factory=dict, description="nanoseconds per output element a row of the class costs even when fused "
                                          "(e.g. SiLU evaluated as the post-op of an INT8 convolution)")
    # eager PyTorch's convolution dispatch (split model): oneDNN in a blocked layout, or ATen's native kernel
    eager_threads: int = Field(default=0, ge=0, description="float convolutions are dispatched as eager PyTorch does "
                               "on this many threads (hardware.latency.eager_onednn); 0: not an eager PyTorch runtime")
    onednn_us: dict[OpClass, float] = Field(default_factory=dict, description="fixed time a convolution on oneDNN "
                                            "adds (reorders to and from its blocked layout) with eager_threads")
    reorder_in_ns: dict[OpClass, float] = Field(
        default_factory=dict, description="nanoseconds per input activation byte of a convolution on oneDNN whose "
                                          "input channels are not multiples of channel_multiple (a slow reorder)")
    reorder_out_ns: dict[OpClass, float] = Field(
        default_factory=dict, description="the same per output activation byte, output channels not multiples")
    native_factor: dict[OpClass, float] = Field(
        default_factory=dict, description="compute-time multiplier of a convolution on ATen's native kernel")
    padding_ns: dict[OpClass, float] = Field(
        default_factory=dict, description="with eager_threads: nanoseconds a convolution on oneDNN spends per FLOP its "
                                          "blocked layout adds by rounding channels up to channel_multiple "
                                          "(hardware.latency.padded_share)")
    glue_ns_per_byte: float = Field(default=0.0, ge=0, description="nanoseconds per activation byte written that a "
                                    "call spends outside its operators (allocating and freeing outputs)")
    input_ns_per_element: float = Field(default=0.0, ge=0, description="nanoseconds per element of the model's input "
                                        "per call (an INT8 graph quantizing its float input in a generated loop)")

    def compute_of(self, cls: str) -> float:
        return self.compute.get(cls) or self.compute[SUBCLASSES.get(cls, cls)]

    def bandwidth_of(self, cls: str) -> float:
        return self.bandwidth.get(cls) or self.bandwidth.get(SUBCLASSES.get(cls, cls), 1.0)

    def _of(self, table: dict, cls: str, default: float) -> float:
        v = table.get(cls)
        if v is None:
            v = table.get(SUBCLASSES.get(cls, cls), default)
        return v

    def overhead_of(self, cls: str) -> float:
        return self._of(self.overhead_us, cls, self.kernel_overhead_us)

    @property
    def split(self) -> bool:
        return bool(self.weight_bandwidth)

    @model_validator(mode="after")
    def _ranges(self):
        for k, v in self.compute.items():
            if not 0 < v <= 4:
                raise ValueError(f"compute efficiency of {k} is {v}: expected a share of peak in (0, 4]")
        for k, v in self.bandwidth.items():
            # above 1 where working sets stay in cache (CPU), against the DRAM bandwidth
            if not 0 < v <= 50:
                raise ValueError(f"bandwidth efficiency of {k} is {v}: expected a share of peak in (0, 50]")
        for name in ("weight_bandwidth", "spill_bandwidth"):
            for k, v in getattr(self, name).items():
                if not 0 < v <= 50:
                    raise ValueError(f"{name} of {k} is {v}: expected a share in (0, 50]")
        for name in ("pointwise_factor", "misaligned_factor", "native_factor"):
            for k, v in getattr(self, name).items():
                if not 0 < v <= 8:
                    raise ValueError(f"{name} of {k} is {v}: expected a time multiplier in (0, 8]")
        for name in ("overhead_us", "element_ns", "remainder_ns", "onednn_us", "reorder_in_ns", "reorder_out_ns",
                     "padding_ns"):
            for k, v in getattr(self, name).items():
                if v < 0:
                    raise ValueError(f"{name} of {k} is {v}: expected at least 0")
        for k, v in self.remainder_multiple.items():
            if v < 1:
                raise ValueError(f"remainder_multiple of {k} is {v}: expected a channel count of at least 1")
        missing = [c for c in OP_CLASSES if c not in self.compute]
        if missing:
            raise ValueError(f"compute efficiency missing for {', '.join(missing)}")
        return self


class Provenance(_Strict):
    date: str
    cpu: str
    threads: int
    torch: str
    method: str
    isa: str = Field(default="", description="the CPU features it was calibrated with (hardware.measure.cpu_isa)")
    pace_ms: float = Field(default=0.0, ge=0, description="the pace network's latency the predictions are at "
                                                        "(hardware.measure.PaceReference; 0: not paced)")
    pace_elasticity: float = Field(default=1.0, ge=0, le=1,
                                   description="how much of the pace network's drift a network's latency follows: a "
                                               "latency at pace p is latency x (pace_ms / p) ** this at the profile's "
                                               "pace (hardware.measure.at_pace; 1 where not measured)")
    fit: dict[str, float] = Field(default_factory=dict)

    @field_validator("fit", mode="before")
    @classmethod
    def _finite_fit(cls, v):
        """The fit's statistics: one that is not a finite number (a score over no samples) is left out."""
        import math

        if isinstance(v, dict):
            return {k: x for k, x in v.items() if not (isinstance(x, float) and not math.isfinite(x))}
        return v


class HardwareProfile(_Strict):
    name: str
    description: str
    runtime: str = Field(description="what the prediction is for (engine, precision, threads)")
    peak_gflops: dict[Dtype, float] = Field(description="peak dense throughput per dtype, GFLOP/s (int8: GOP/s)")
    memory_bandwidth_gbs: float = Field(gt=0)
    memory_read_bandwidth_gbs: Optional[float] = Field(
        default=None, gt=0, description="read-only streaming bandwidth (weights); default memory_bandwidth_gbs")
    cache_bytes: Optional[int] = Field(default=None, gt=0, description="last-level cache; smaller working sets use cache bandwidth")
    cache_bandwidth_gbs: Optional[float] = Field(default=None, gt=0)
    fast_dtypes: list[Dtype]
    float_runs_as: Dtype = Field(default="fp32", description="the dtype an fp32 model is executed in")
    combine: Literal["max", "sum"] = Field(
        default="max", description="max: roofline max(compute, memory); sum: compute + memory (no overlap, as eager CPU kernels)")
    slow_dtypes: dict[Dtype, SlowDtype] = Field(default_factory=dict)
    efficiency: Efficiency
    dtype_overrides: dict[Dtype, Efficiency] = Field(default_factory=dict)
    batch_efficiency: dict[int, dict[Dtype, Efficiency]] = Field(
        default_factory=dict, description="efficiencies calibrated at other batch sizes (efficiency and dtype_overrides "
                                          "hold batch 1); a prediction uses the nearest calibrated batch")
    channel_multiple: Optional[int] = Field(default=None, ge=1, description="channel counts the kernels prefer")
    misaligned_by: Literal["channels", "input"] = Field(
        default="channels", description="which channel counts put a row off channel_multiple: `channels`, its input "
                                        "or output; `input`, its input alone (ONNX Runtime pads outputs to its block)")
    aligned_below: int = Field(default=0, ge=0, description="a dense convolution on fewer input channels than this "
                                                            "runs its fast path whatever they are (0: none does)")
    group_multiple: Optional[int] = Field(default=None, ge=1, description="a grouped (not depthwise) convolution runs "
                                          "its fast path only where its input and output channels per group are "
                                          "multiples of this (ONNX Runtime's blocked layout); None: channel_multiple's "
                                          "rule")
    sources: dict[str, str] = Field(description="where each number comes from")
    provenance: Optional[Provenance] = None

    @model_validator(mode="after")
    def _consistent(self):
        for d in self.fast_dtypes:
            if d not in self.peak_gflops:
                raise ValueError(f"fast dtype {d} has no peak_gflops entry")
        for v in self.peak_gflops.values():
            if v <= 0:
                raise ValueError("peak_gflops must be positive")
        if self.float_runs_as not in self.peak_gflops:
            raise ValueError(f"float_runs_as {self.float_runs_as} has no peak_gflops entry")
        for b in self.batch_efficiency:
            if b < 2:
                raise ValueError(f"batch_efficiency key {b}: batch 1 is `efficiency` itself; keys must be 2 or more")
        for d, s in self.slow_dtypes.items():
            if s.runs_as not in self.peak_gflops:
                raise ValueError(f"slow dtype {d} runs as {s.runs_as}, which has no peak_gflops entry")
        if (self.cache_bytes is None) != (self.cache_bandwidth_gbs is None):
            raise ValueError("cache_bytes and cache_bandwidth_gbs go together")
        for key in ("peak_gflops", "memory_bandwidth_gbs") + (("cache_bandwidth_gbs",) if self.cache_bytes else ()):
            if key not in self.sources:
                raise ValueError(f"sources must say where {key} comes from")
        return self

    def calibrated_state(self) -> float | None:
        """The machine state (hardware.measure.sync_probe_us, us) a calibrated profile was fitted in, where its
        provenance records it (hardware.calibrate.fit_profile); None for a datasheet profile."""
        probe = self.provenance.fit.get("sync_probe_us") if self.provenance else None
        return float(probe) if probe else None

    def calibrated_pace(self) -> float | None:
        """The pace network's latency (ms) a calibrated profile's predictions are at (hardware.measure.PaceReference);
        None for a datasheet profile or one calibrated before the pace was read."""
        return self.provenance.pace_ms if self.provenance and self.provenance.pace_ms else None

    def pace_elasticity(self) -> float:
        """The exponent that brings a latency to the profile's pace (hardware.measure.at_pace): 1 where the
        profile has no provenance."""
        return self.provenance.pace_elasticity if self.provenance else 1.0

    def runs(self, dtype: str) -> tuple[str, float]:
        """The dtype a tensor of `dtype` really runs in here, and the time factor that costs."""
        if dtype == "fp32":
            return self.float_runs_as, 1.0
        if dtype in self.fast_dtypes or (dtype in self.peak_gflops and dtype not in self.slow_dtypes):
            return dtype, 1.0
        if dtype in self.slow_dtypes:
            s = self.slow_dtypes[dtype]
            return s.runs_as, s.factor
        return self.float_runs_as, 1.0

    def eff(self, dtype: str, batch: int = 1) -> Efficiency:
        """The efficiencies for `dtype` at the calibrated batch nearest `batch` (log scale)."""
        import math

        if self.batch_efficiency:
            near = min([1, *self.batch_efficiency], key=lambda b: (abs(math.log2(b) - math.log2(max(batch, 1))), b))
            if near != 1:
                per = self.batch_efficiency[near]
                if dtype in per:
                    return per[dtype]
                if dtype in self.dtype_overrides:
                    return self.dtype_overrides[dtype]
                return per.get(self.float_runs_as, self.efficiency)
        return self.dtype_overrides.get(dtype, self.efficiency)


def profile_path(name: str) -> Path:
    """A profile the repository ships (hardware/profiles/NAME.yaml)."""
    return PROFILE_DIR / f"{name}.yaml"


def list_profiles() -> list[str]:
    """`host` (this machine, hardware.hostprofile) and the profiles the repository ships."""
    return ["host"] + sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def parse_profile(data: dict, origin: str) -> HardwareProfile:
    try:
        return HardwareProfile.model_validate(data)
    except ValidationError as exc:
        msgs = [f"{'.'.join(str(x) for x in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors()]
        raise UserInputError(f"invalid hardware profile {origin}: {'; '.join(msgs)}") from None


def load_profile_file(path: Path) -> HardwareProfile:
    return parse_profile(read_yaml_mapping(path, f"hardware profile {path}"), str(path))


def load_profile(name_or_path: str, progress=None) -> HardwareProfile:
    """A profile by name (`host`: this machine's, calibrated first where it has none: hardware.hostprofile; else
    one the repository ships) or by the path of a YAML file. `progress`: where a first calibration reports."""
    if name_or_path == "host":
        from .hostprofile import load_host

        return load_host(progress)
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = profile_path(name_or_path)
    if not path.is_file():
        raise UserInputError(f"unknown hardware {name_or_path!r}; profiles: {', '.join(list_profiles())} "
                             "(or a path to a profile YAML)")
    return load_profile_file(path)


def save_profile(profile: HardwareProfile, path: Path) -> None:
    path.write_text(yaml.safe_dump(profile.model_dump(exclude_none=True), sort_keys=False, width=110))
