"""Hardware profiles: the shipped YAMLs load and cite a source for every number; bad profiles fail with a
message that names the field; and predict_latency's roofline matches hand arithmetic on demo:digits-cnn."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from estimators.analyze import analyze
from estimators.compress import estimate
from estimators.errors import UserInputError
from estimators.modelspec import load_model
from estimators.strategy import parse_strategy
from hardware import profile as hp
from hardware.latency import predict_latency
from hardware.profile import OP_CLASSES, load_profile, parse_profile, profile_path

SHIPPED = ["jetson-nano", "jetson-nano-pytorch", "jetson-orin-nano", "raspberry-pi-4", "x86-laptop",
           "t4", "a100", "h100", "h200"]
# the Jetson Nano held-out evaluation rows (bench/jetson_nano.py), names lower-cased without "-", "_" or spaces:
# never fitted on (their siblings ResNet-34/101/152 and VGG-11/13 are fit rows)
EVAL_MODELS = ("resnet18", "resnet50", "vgg16", "mobilenetv2")


# ------------------------------------------------------------------------------------------------
# shipped profiles


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads(name):
    p = load_profile(name)
    assert p.name == name
    assert set(p.fast_dtypes) <= set(p.peak_gflops)
    assert p.float_runs_as in p.peak_gflops
    for d in ("fp32", "fp16", "bf16", "int8"):  # every dtype resolves to something the device can run
        run, factor = p.runs(d)
        assert run in p.peak_gflops and factor > 0


def _number_paths(p) -> list[str]:
    paths = [f"peak_gflops.{d}" for d in p.peak_gflops] + ["memory_bandwidth_gbs"]
    for key in ("cache_bytes", "cache_bandwidth_gbs", "channel_multiple"):
        if getattr(p, key) is not None:
            paths.append(key)
    effs = [("efficiency", p.efficiency)] + [(f"dtype_overrides.{d}", e) for d, e in p.dtype_overrides.items()]
    for prefix, e in effs:
        paths += [f"{prefix}.compute.{c}" for c in e.compute]
        paths += [f"{prefix}.bandwidth.{c}" for c in e.bandwidth]
        paths += [f"{prefix}.kernel_overhead_us", f"{prefix}.view_overhead_us"]
        if e.fused:
            paths.append(f"{prefix}.fused")
    return paths


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_cites_every_number(name):
    p = load_profile(name)
    keys = [k for k, v in p.sources.items() if v.strip()]
    missing = [path for path in _number_paths(p) if not any(path == k or path.startswith(k + ".") for k in keys)]
    assert not missing, f"{name}: no source for {missing}"
    assert all(s.source.strip() for s in p.slow_dtypes.values())


@pytest.mark.parametrize("name", SHIPPED)
def test_fitted_numbers_name_only_the_fit_models(name):
    """A number marked [fitted] names the published figures it was fitted on (the Jetson Nano fit rows include
    AlexNet and the DenseNets), never a held-out evaluation row."""
    for key, text in load_profile(name).sources.items():
        if text.lstrip().startswith("[fitted]"):
            assert "AlexNet" in text or "DenseNet" in text, key
            flat = text.lower().replace("-", "").replace("_", "").replace(" ", "")
            assert not any(m in flat for m in EVAL_MODELS), f"{name}: {key} names an evaluation model"


def test_fitted_source_check_catches_held_out_names():
    flat = "[fitted] on ResNet-50 and MobileNet V2".lower().replace("-", "").replace("_", "").replace(" ", "")
    assert [m for m in EVAL_MODELS if m in flat] == ["resnet50", "mobilenetv2"]
    ok = "ResNet-34, ResNet-101, ResNet-152, VGG-11, VGG-13".lower().replace("-", "").replace(" ", "")
    assert not any(m in ok for m in EVAL_MODELS)


@pytest.mark.parametrize("name", ["jetson-nano", "jetson-nano-pytorch", "jetson-orin-nano"])
def test_jetson_profiles_have_every_operator_class(name):
    """The GPU profiles give every class the CPU model has (profile.OP_CLASSES and the SUBCLASSES: gconv, maxpool,
    transcendental, permute) its own compute and bandwidth share, each with a source."""
    p = load_profile(name)
    assert set(hp.ALL_CLASSES) <= set(p.efficiency.compute)
    assert set(hp.ALL_CLASSES) <= set(p.efficiency.bandwidth)


def test_jetson_nano_per_call_overhead_once_per_call(table):
    """jetson-nano's fitted call_overhead_us is paid once per inference, on top of the rows, in the single and the
    batch path alike."""
    from search.batch import BatchEvaluator

    p = load_profile("jetson-nano")
    assert p.efficiency.call_overhead_us > 0
    pred = predict_latency(table, p)
    assert pred.latency_ms == pytest.approx(pred.per_row_ms.sum() + p.efficiency.call_overhead_us * 1e-3, rel=1e-9)
    kept = np.atleast_2d(table.state.kept)
    assert BatchEvaluator(table, p)(kept)["latency_ms"][0] == pytest.approx(pred.latency_ms, rel=1e-9)


def test_shipped_reference_cpu_profile_loads_and_is_not_host():
    """The repository ships reference CPU profiles under their own names (planning for such a machine from
    another one); `host` is never one of them (hardware.hostprofile)."""
    ref = load_profile("cpu-avx2")
    assert ref.name == "cpu-avx2" and ref.provenance is not None and "avx2" in ref.provenance.isa
    assert not profile_path("host").is_file()


def test_jetson_nano_has_no_fast_int8():
    p = load_profile("jetson-nano")
    assert "int8" not in p.fast_dtypes
    run, _ = p.runs("int8")
    assert run != "int8"
    assert p.runs("fp32") == ("fp16", 1.0)  # TensorRT FP16 engine


# ------------------------------------------------------------------------------------------------
# validation errors


def _valid() -> dict:
    return {
        "name": "synthetic", "description": "test profile", "runtime": "test",
        "peak_gflops": {"fp32": 100.0, "fp16": 200.0},
        "memory_bandwidth_gbs": 10.0,
        "fast_dtypes": ["fp32", "fp16"],
        "efficiency": {
            "compute": {c: 0.5 for c in OP_CLASSES} | {"conv": 0.25, "gemm": 0.4},
            "bandwidth": {c: 0.8 for c in OP_CLASSES},
            "kernel_overhead_us": 7.0,
            "view_overhead_us": 3.0,
        },
        "sources": {"peak_gflops": "test", "memory_bandwidth_gbs": "test"},
    }


def test_valid_synthetic_profile_parses():
    assert parse_profile(_valid(), "test").name == "synthetic"


def _set(d: dict, path: str, value) -> dict:
    keys = path.split(".")
    for k in keys[:-1]:
        d = d[k]
    if value is _DELETE:
        del d[keys[-1]]
    else:
        d[keys[-1]] = value


_DELETE = object()
BAD = [
    # (path, value, words the message must contain)
    ("memory_bandwidth_gbs", _DELETE, ["memory_bandwidth_gbs"]),
    ("peak_gflops", _DELETE, ["peak_gflops"]),
    ("efficiency.kernel_overhead_us", _DELETE, ["efficiency.kernel_overhead_us"]),
    ("efficiency.compute.dwconv", _DELETE, ["efficiency", "dwconv"]),
    ("efficiency.compute.conv", 0.0, ["efficiency", "conv"]),
    ("efficiency.compute.conv", -0.3, ["efficiency", "conv"]),
    ("efficiency.compute.conv", 1000.0, ["efficiency", "conv"]),
    ("efficiency.bandwidth.norm", 0.0, ["efficiency", "norm"]),
    ("efficiency.bandwidth.norm", 1000.0, ["efficiency", "norm"]),
    ("efficiency.kernel_overhead_us", -1.0, ["efficiency.kernel_overhead_us"]),
    ("peak_tflops", 5.0, ["peak_tflops"]),  # unknown key
    ("efficiency.fuse", ["norm"], ["efficiency.fuse"]),  # unknown nested key
    ("efficiency.compute.conv3d", 0.5, ["conv3d"]),  # unknown operator class
    ("peak_gflops.fp8", 100.0, ["fp8"]),  # unknown dtype
    ("fast_dtypes", ["fp32", "int8"], ["int8", "peak_gflops"]),  # fast dtype without a peak
    ("float_runs_as", "bf16", ["float_runs_as", "bf16"]),
    ("slow_dtypes", {"int8": {"runs_as": "bf16", "factor": 1.5, "source": "x"}}, ["int8", "bf16", "peak_gflops"]),
    ("slow_dtypes", {"int8": {"runs_as": "fp16", "factor": 0.0, "source": "x"}}, ["slow_dtypes.int8.factor"]),
    ("slow_dtypes", {"int8": {"runs_as": "fp16", "factor": 1.5}}, ["slow_dtypes.int8.source"]),
    ("sources", {"peak_gflops": "x"}, ["sources", "memory_bandwidth_gbs"]),
    ("memory_bandwidth_gbs", 0.0, ["memory_bandwidth_gbs"]),
]


@pytest.mark.parametrize("path,value,words", BAD, ids=[f"{p}={v!r}"[:40] for p, v, _ in BAD])
def test_bad_profile_names_the_field(path, value, words):
    d = copy.deepcopy(_valid())
    _set(d, path, value)
    with pytest.raises(UserInputError) as exc:
        parse_profile(d, "test")
    msg = str(exc.value)
    assert msg.startswith("invalid hardware profile test")
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def test_load_profile_errors(tmp_path):
    with pytest.raises(UserInputError, match="jetson-nano"):  # unknown name lists the shipped profiles
        load_profile("no-such-device")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(UserInputError, match="not valid YAML"):
        load_profile(str(bad))
    seq = tmp_path / "seq.yaml"
    seq.write_text("- 1\n- 2\n")
    with pytest.raises(UserInputError, match="mapping"):
        load_profile(str(seq))


# ------------------------------------------------------------------------------------------------
# the roofline by hand on demo:digits-cnn (input 1x1x8x8):
#   features.0 Conv2d(1, 32, 3, pad 1, no bias) -> BN -> ReLU -> Conv2d(32, 64, 3) -> BN -> ReLU
#   -> MaxPool2d(2) -> Conv2d(64, 64, 3) -> BN -> ReLU -> AdaptiveAvgPool(1) -> flatten -> Linear(64, 10)

OVH = 7e-6  # kernel overhead of _valid(), seconds
VIEW = 3e-6


@pytest.fixture(scope="module")
def table():
    return analyze(load_model("demo:digits-cnn"))


def _row(table, name):
    return table.names.index(name)


def _ms(pred, table, name):
    return pred.per_row_ms[_row(table, name)]


# hand-derived counts (fp32, batch 1)
CONV1_FLOPS = 2 * 32 * 1 * 9 * 8 * 8  # 2 x MACs = 36,864
CONV1_W = 32 * 1 * 9 * 4  # 1,152 bytes
CONV1_IN, CONV1_OUT = 1 * 8 * 8 * 4, 32 * 8 * 8 * 4  # 256, 8,192 bytes
CONV2_FLOPS = 2 * 64 * 32 * 9 * 8 * 8  # 2,359,296
CONV2_BYTES = 64 * 32 * 9 * 4 + 32 * 64 * 4 + 64 * 64 * 4  # 98,304
BN1_BYTES = (32 * 2 + 32 * 2) * 4 + 8 + 2 * 32 * 64 * 4  # weight+bias, running mean+var, int64 counter, in+out
FC_FLOPS = 2 * 64 * 10
FC_BYTES = (64 * 10 + 10) * 4 + 64 * 4 + 10 * 4


def test_conv_row_compute_bound(table):
    p = parse_profile(_valid(), "test")
    pred = predict_latency(table, p)
    compute = CONV1_FLOPS / (100e9 * 0.25)  # 1.475 us
    memory = (CONV1_W + CONV1_IN + CONV1_OUT) / (10e9 * 0.8)  # 1.2 us
    assert compute > memory
    assert _ms(pred, table, "features.0") == pytest.approx((compute + OVH) * 1e3, rel=1e-9)
    c2 = CONV2_FLOPS / (100e9 * 0.25)
    assert c2 > CONV2_BYTES / 8e9
    assert _ms(pred, table, "features.3") == pytest.approx((c2 + OVH) * 1e3, rel=1e-9)
    assert pred.latency_ms == pytest.approx(pred.per_row_ms.sum())
    assert pred.unsupported_rows == 0


def test_conv_row_memory_bound(table):
    d = _valid()
    d["peak_gflops"]["fp32"] = 1e6
    pred = predict_latency(table, parse_profile(d, "test"))
    memory = (CONV1_W + CONV1_IN + CONV1_OUT) / (10e9 * 0.8)
    assert _ms(pred, table, "features.0") == pytest.approx((memory + OVH) * 1e3, rel=1e-9)
    # norm row: 1 op per output element, memory-bound
    bn = max(32 * 64 / (1e6 * 1e9 * 0.5), BN1_BYTES / (10e9 * 0.8))
    assert _ms(pred, table, "features.1") == pytest.approx((bn + OVH) * 1e3, rel=1e-9)
    fc = max(FC_FLOPS / (1e6 * 1e9 * 0.4), FC_BYTES / (10e9 * 0.8))
    assert _ms(pred, table, "classifier") == pytest.approx((fc + OVH) * 1e3, rel=1e-9)
    assert _ms(pred, table, "flatten") == pytest.approx(VIEW * 1e3)


def test_batch_scales_activations_not_weights(table):
    d = _valid()
    d["peak_gflops"]["fp32"] = 1e6
    pred = predict_latency(table, parse_profile(d, "test"), batch_size=4)
    memory = (CONV1_W + 4 * (CONV1_IN + CONV1_OUT)) / (10e9 * 0.8)
    assert _ms(pred, table, "features.0") == pytest.approx((memory + OVH) * 1e3, rel=1e-9)
    d["peak_gflops"]["fp32"] = 1.0  # now compute-bound: 4x the FLOPs
    pred = predict_latency(table, parse_profile(d, "test"), batch_size=4)
    assert _ms(pred, table, "features.0") == pytest.approx((4 * CONV1_FLOPS / (1e9 * 0.25) + OVH) * 1e3, rel=1e-9)
    with pytest.raises(ValueError):
        predict_latency(table, parse_profile(d, "test"), batch_size=0)


def test_fused_rows_cost_nothing(table):
    d = _valid()
    d["efficiency"]["fused"] = ["norm", "elementwise"]
    pred = predict_latency(table, parse_profile(d, "test"))
    for name in ("features.1", "features.2", "features.4", "features.5", "features.8", "features.9"):
        assert _ms(pred, table, name) == 0.0, name
    assert _ms(pred, table, "features.6") > 0  # max pool is not fused
    unfused = predict_latency(table, parse_profile(_valid(), "test"))
    assert _ms(unfused, table, "features.1") > OVH * 1e3


def test_float_runs_as_half_moves_half_the_bytes(table):
    d = _valid()
    d["float_runs_as"] = "fp16"
    pred = predict_latency(table, parse_profile(d, "test"))
    compute = CONV1_FLOPS / (200e9 * 0.25)
    memory = (CONV1_W + CONV1_IN + CONV1_OUT) / 2 / (10e9 * 0.8)
    assert _ms(pred, table, "features.0") == pytest.approx((max(compute, memory) + OVH) * 1e3, rel=1e-9)
    d["peak_gflops"]["fp16"] = 1e6
    pred = predict_latency(table, parse_profile(d, "test"))
    assert _ms(pred, table, "features.0") == pytest.approx((memory + OVH) * 1e3, rel=1e-9)


def test_slow_dtype_runs_as_and_factor(table):
    t8 = estimate(table, parse_strategy("quantize:int8"))
    assert set(t8.state.xdtype) == {"int8"}
    fast = _valid()
    fast["peak_gflops"] = {"fp32": 100.0, "int8": 50.0}
    fast["fast_dtypes"] = ["fp32", "int8"]
    slow = _valid()
    slow["peak_gflops"] = {"fp32": 100.0, "fp16": 50.0}
    slow["slow_dtypes"] = {"int8": {"runs_as": "fp16", "factor": 1.7, "source": "test"}}
    pf = predict_latency(t8, parse_profile(fast, "test")).per_row_ms
    ps = predict_latency(t8, parse_profile(slow, "test")).per_row_ms
    kernels = np.array([k not in ("view", "param") for k in t8.kinds])
    assert ps[kernels] == pytest.approx((pf[kernels] - OVH * 1e3) * 1.7 + OVH * 1e3, rel=1e-9)
    assert ps[~kernels] == pytest.approx(pf[~kernels])


def test_dtype_override_replaces_efficiency(table):
    d = _valid()
    d["dtype_overrides"] = {"fp32": copy.deepcopy(d["efficiency"])}
    d["dtype_overrides"]["fp32"]["kernel_overhead_us"] = 100.0
    d["dtype_overrides"]["fp32"]["compute"]["conv"] = 0.125
    pred = predict_latency(table, parse_profile(d, "test"))
    assert _ms(pred, table, "features.0") == pytest.approx((CONV1_FLOPS / (100e9 * 0.125) + 100e-6) * 1e3, rel=1e-9)


def test_cache_bandwidth_for_small_working_sets(table):
    if "cache_bytes" not in hp.HardwareProfile.model_fields:
        pytest.skip("schema without a cache level")
    d = _valid()
    d["peak_gflops"]["fp32"] = 1e6
    d["sources"]["cache_bandwidth_gbs"] = "test"
    # a cache that holds all the model's weights: a row whose working set fits reads at cache bandwidth
    total_weights = 56554 * 4 + 3 * (2 * 64 * 4 + 8)  # params + BatchNorm stats and counters: 227,952 bytes
    d.update(cache_bytes=100_000 + total_weights, cache_bandwidth_gbs=100.0)
    pred = predict_latency(table, parse_profile(d, "test"))
    conv1 = CONV1_W + CONV1_IN + CONV1_OUT
    assert _ms(pred, table, "features.0") == pytest.approx((conv1 / (100e9 * 0.8) + OVH) * 1e3, rel=1e-9)
    # a cache smaller than the weights: weights stream from memory (bandwidth 10 GB/s, no class share),
    # activations that fit still come from the cache
    d.update(cache_bytes=10_000)
    pred = predict_latency(table, parse_profile(d, "test"))
    expect = CONV1_W / 10e9 + (CONV1_IN + CONV1_OUT) / (100e9 * 0.8) + OVH
    assert _ms(pred, table, "features.0") == pytest.approx(expect * 1e3, rel=1e-9)
    assert CONV2_BYTES > 10_000


def test_pool_row_and_maxpool_subclass(table):
    d = _valid()
    d["peak_gflops"]["fp32"] = 1e6
    pool_bytes = (64 * 8 * 8 + 64 * 4 * 4) * 4  # MaxPool2d(2): read 64x8x8, write 64x4x4
    pred = predict_latency(table, parse_profile(d, "test"))
    assert _ms(pred, table, "features.6") == pytest.approx((pool_bytes / (10e9 * 0.8) + OVH) * 1e3, rel=1e-9)
    if "maxpool" not in getattr(hp, "SUBCLASSES", {}):
        return
    d["efficiency"]["bandwidth"]["maxpool"] = 0.1  # a finer class overrides only the max-pool row
    pred2 = predict_latency(table, parse_profile(d, "test"))
    assert _ms(pred2, table, "features.6") == pytest.approx((pool_bytes / (10e9 * 0.1) + OVH) * 1e3, rel=1e-9)
    assert _ms(pred2, table, "pool") == pytest.approx(_ms(pred, table, "pool"))
