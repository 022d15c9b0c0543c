"""The host's calibrated latency model: the split formula by hand, batch-calibrated efficiencies, the
in-context operator timer's alignment with the analysis, the synthetic networks, the fit recovering known
coefficients, and the steady-state allocator of every measurement."""
from __future__ import annotations

import copy
import functools
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from estimators.analyze import analyze
from estimators.errors import UserInputError
from estimators.modelspec import load_model
from estimators.table import evaluate
from hardware.calibrate.fit import fit_split_model, split_efficiency
from hardware.calibrate.sampling import NetSample, exported, light_table, time_network
from hardware.latency import COL, SPLIT_WIDTH, row_features, pointwise, predict_latency
from hardware.measure import measure_latency, steady_allocator
from hardware.profile import parse_profile
from hardware.synthetic import synthetic_cnn
from hardware.timing import row_times

from test_profiles import CONV1_FLOPS, CONV1_IN, CONV1_OUT, CONV1_W, CONV2_FLOPS, _valid


def _split_profile() -> dict:
    d = _valid()
    d.update(memory_read_bandwidth_gbs=20.0, cache_bytes=4096, cache_bandwidth_gbs=100.0, channel_multiple=16,
             combine="sum")
    d["sources"]["cache_bandwidth_gbs"] = "test"
    e = d["efficiency"]
    e["overhead_us"] = {"conv": 11.0}
    e["weight_bandwidth"] = {"conv": 0.5}
    e["spill_bandwidth"] = {"conv": 0.25}
    e["misaligned_factor"] = {"conv": 3.0}
    e["pointwise_factor"] = {"conv": 2.0}
    return d


@pytest.fixture(scope="module")
def table():
    return analyze(load_model("demo:digits-cnn"))


def test_split_formula_by_hand(table):
    p = parse_profile(_split_profile(), "test")
    pred = predict_latency(table, p)
    ms = lambda name: pred.per_row_ms[table.names.index(name)]  # noqa: E731
    # features.0: Conv2d(1, 32, 3): input channels 1 are not a multiple of 16 -> misaligned factor 3
    compute = CONV1_FLOPS / (100e9 * 0.25) * 3.0
    weights = CONV1_W / (20e9 * 0.5)
    act = CONV1_IN + CONV1_OUT  # 8,448 bytes: 4,096 from the cache, the rest from memory
    memory = 4096 / (100e9 * 0.8) + (act - 4096) / (10e9 * 0.25)
    assert ms("features.0") == pytest.approx((11e-6 + compute + weights + memory) * 1e3, rel=1e-9)
    # features.3: Conv2d(32, 64, 3): aligned, 3x3 (no pointwise factor)
    w2 = 64 * 32 * 9 * 4
    a2 = 32 * 64 * 4 + 64 * 64 * 4
    expect = 11e-6 + CONV2_FLOPS / (100e9 * 0.25) + w2 / (20e9 * 0.5) + 4096 / 80e9 + (a2 - 4096) / 2.5e9
    assert ms("features.3") == pytest.approx(expect * 1e3, rel=1e-9)
    # a class without split entries falls back to the kernel overhead and full-share bandwidths
    fc = table.names.index("classifier")
    flops, wb, ab, *_ = row_features(table, 1)
    expect = 7e-6 + flops[fc] / (100e9 * 0.4) + wb[fc] / 20e9 + min(ab[fc], 4096) / 80e9 + max(ab[fc] - 4096, 0) / 10e9
    assert pred.per_row_ms[fc] == pytest.approx(expect * 1e3, rel=1e-9)


def test_pointwise_factor_applies_to_1x1_convolutions():
    t = light_table(torch.nn.Sequential(torch.nn.Conv2d(16, 32, 1, bias=False)).eval(), torch.randn(1, 16, 8, 8))
    assert pointwise(t).tolist() == [True]
    d = _split_profile()
    d["cache_bytes"] = 1 << 30
    a = predict_latency(t, parse_profile(d, "test")).per_row_ms[0]
    d["efficiency"]["pointwise_factor"]["conv"] = 5.0
    b = predict_latency(t, parse_profile(d, "test")).per_row_ms[0]
    flops = 2 * 16 * 32 * 64
    assert b - a == pytest.approx(3.0 * flops / 25e9 * 1e3, rel=1e-9)  # (5 - 2) x compute time


def test_batch_efficiency_uses_the_nearest_calibrated_batch(table):
    d = _split_profile()
    e8 = copy.deepcopy(d["efficiency"])
    e8["overhead_us"] = {"conv": 500.0}
    d["batch_efficiency"] = {8: {"fp32": e8}}
    p = parse_profile(d, "test")
    assert p.eff("fp32", 1).overhead_us["conv"] == 11.0
    assert p.eff("fp32", 2).overhead_us["conv"] == 11.0  # log2: 1 from batch 1, 2 from batch 8
    for b in (4, 8, 64):
        assert p.eff("fp32", b).overhead_us["conv"] == 500.0
    i = table.names.index("features.0")
    base = parse_profile(_split_profile(), "test")
    assert predict_latency(table, p, 8).per_row_ms[i] - predict_latency(table, base, 8).per_row_ms[i] == \
        pytest.approx((500e-6 - 11e-6) * 1e3, rel=1e-9)
    d["batch_efficiency"] = {1: {"fp32": e8}}
    with pytest.raises(UserInputError, match="batch_efficiency"):
        parse_profile(d, "test")


def test_bad_split_fields_name_the_field():
    for path, value in (("weight_bandwidth", {"conv": 0.0}), ("spill_bandwidth", {"norm": 99.0}),
                        ("pointwise_factor", {"conv": 20.0}), ("overhead_us", {"conv": -1.0}),
                        ("element_ns", {"transcendental": -0.1}), ("remainder_ns", {"maxpool": -2.0}),
                        ("remainder_multiple", {"maxpool": 0})):
        d = _split_profile()
        d["efficiency"][path] = value
        with pytest.raises(UserInputError, match=path):
            parse_profile(d, "test")


@pytest.mark.slow  # times every operator of random networks
@pytest.mark.parametrize("seed", [0, 3])
def test_operator_timer_aligns_with_the_analysis(seed):
    model, shape = synthetic_cnn(seed)
    x = torch.randn(*shape)
    table = light_table(model, x)
    rows = row_times(model, x, runs=2, warmup=1)
    assert len(rows) == table.n and all(t > 0 for t in rows)
    net = time_network(exported(model, shape), x, f"seed {seed}", runs=2)  # raises if the rows do not align
    assert net.total_seconds > 0 and (net.row_seconds >= 0).all()
    assert net.row_seconds.sum() < 5 * net.total_seconds


def test_synthetic_networks_are_seeded_and_varied():
    a, sa = synthetic_cnn(7)
    b, sb = synthetic_cnn(7)
    assert str(a) == str(b) and sa == sb
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    shapes = {synthetic_cnn(s)[1] for s in range(12)}
    assert len(shapes) > 3
    kinds = set()
    for s in range(12):
        m, shape = synthetic_cnn(s)
        kinds |= set(light_table(m, torch.randn(1, *shape[1:])).kinds)
    assert {"conv", "dwconv", "gemm", "elementwise", "norm", "pool"} <= kinds


def test_shuffle_units_reorder_channels_and_are_priced_as_permutes():
    """The synthetic ShuffleNetV2 unit shuffles its two halves' channels (its output's channel 2i is the
    concatenation's i, 2i+1 its c/2+i); the strided copy that does it is the `permute` class, which a profile
    without it prices as elementwise; a contiguous() of a tensor that needs no reordering is not a permute."""
    from hardware.latency import latency_kinds
    from hardware.synthetic import _Shuffle

    unit = _Shuffle(8, 8, 1, nn.ReLU, 3).eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.inference_mode():
        a, b = x.chunk(2, dim=1)
        cat = torch.cat([a, unit.right(b)], 1)
        out = unit(x)
    assert torch.equal(out[:, 0::2], cat[:, :4]) and torch.equal(out[:, 1::2], cat[:, 4:])
    kinds = latency_kinds(light_table(exported(nn.Sequential(unit), (2, 8, 6, 6)), x))
    assert (kinds == "permute").sum() == 1

    class Plain(nn.Module):
        def forward(self, x):
            return torch.relu(x).contiguous() + 1

    assert "permute" not in set(latency_kinds(light_table(Plain(), x)))
    shuffles = [s for s in range(60) if any(isinstance(m, _Shuffle) for m in synthetic_cnn(s)[0].modules())]
    assert len(shuffles) >= 5  # the calibration's networks include them


@pytest.mark.parametrize("pw", [1e-12, -0.5e-12])
def test_fit_recovers_known_coefficients(pw):
    """Rows timed exactly by a known split model (eager PyTorch's convolution dispatch included): the per-class
    least squares gets the model back, a 1x1 convolution slower per FLOP than the others or faster (`pw`: its
    FLOPs' extra seconds; the fit keeps both rates non-negative, not the difference)."""
    from hardware.calibrate.fit import features

    z4 = [0.0] * 5
    known = {"conv": np.array([20e-6, 2e-12, pw, 3e-12, 5e-11, 1e-11, 8e-11, 25e-6, 2e-10, 1.5e-10, 1e-12, 1.2e-12]),
             "dwconv": np.array([30e-6, 1e-11, 0.0, 2e-12, 4e-11, 2e-11, 9e-11, 0.0, 1e-10, 1e-10, 0.0, 5e-12]),
             "gemm": np.array([10e-6, 4e-12, 0.0, 1e-12, 3e-11, 1e-11, 5e-11] + z4),
             "elementwise": np.array([3e-6, 1e-11, 0.0, 0.0, 0.0, 5e-12, 2e-11] + z4),
             "norm": np.array([5e-6, 2e-11, 0.0, 0.0, 1e-11, 6e-12, 2e-11] + z4)}
    cache = 2e6
    nets, seen = [], {cls: np.zeros(len(known["conv"]), dtype=bool) for cls in known}
    for seed in range(24):
        model, shape = synthetic_cnn(seed)
        table = light_table(model, torch.randn(*shape))
        cols, kinds, _ = features(table, table.batch, 16, cache, threads=2)
        t = np.zeros(table.n)
        for cls, x in known.items():
            t[kinds == cls] = cols[kinds == cls] @ x
            seen[cls] |= (cols[kinds == cls] != 0).any(axis=0)
        t[~np.isin(kinds, list(known))] = 1e-6
        nets.append(NetSample(f"seed {seed}", table, t, float(t.sum())))
    coef, view_s, err = fit_split_model(nets, 16, cache, threads=2)
    assert err < 1e-6
    # every row is reproduced (norm and elementwise FLOPs are proportional to their bytes, so only their
    # times are identifiable); the convolutions' columns are independent and come back one by one
    assert seen["conv"].all()
    assert coef["conv"] == pytest.approx(known["conv"], rel=1e-4, abs=1e-16)
    eff = split_efficiency(coef, view_s, peak=200.0, bwr=20.0, cbw=100.0, bw=10.0, threads=2)
    assert eff.compute["conv"] == pytest.approx(1 / (200e9 * 2e-12))
    assert eff.pointwise_factor["conv"] == pytest.approx(1 + pw / 2e-12)  # 1.5, or 0.75: 1x1 rows faster
    assert eff.overhead_us["dwconv"] == pytest.approx(30.0)
    assert eff.eager_threads == 2
    # depthwise convolutions always run on oneDNN (no column of their own); a fitted gconv states its zero
    assert eff.onednn_us == {"conv": pytest.approx(25.0), "gconv": 0.0}
    assert eff.reorder_in_ns["conv"] == pytest.approx(0.2) and eff.reorder_out_ns["conv"] == pytest.approx(0.15)
    assert eff.native_factor["conv"] == pytest.approx(1.5)
    assert eff.padding_ns["conv"] == pytest.approx(1.2e-3) and eff.padding_ns["dwconv"] == pytest.approx(5e-3)


def test_timed_grouped_convolutions_are_fitted_on_their_activations_alone():
    """fit_split_model(timed_groups=True): grouped convolutions whose compute and call the profile times alone are
    fitted on TIMED_GROUPED (activation bytes): a weight-byte term and an overhead in their times are left out,
    where the full grouped columns take them; the other classes' fits do not change."""
    from hardware.calibrate.fit import TIMED_GROUPED, features

    known = {"conv": np.array([20e-6, 2e-12, 0.0, 0.0, 5e-11, 1e-11, 8e-11] + [0.0] * 5),
             "gconv": np.array([40e-6, 0.0, 0.0, 0.0, 2e-10, 1e-11, 3e-11] + [0.0] * 5),
             "elementwise": np.array([3e-6, 1e-11, 0.0, 0.0, 0.0, 5e-12, 2e-11] + [0.0] * 5)}
    cache, nets = 2e6, []
    for seed in range(24):
        model, shape = synthetic_cnn(seed)
        table = light_table(model, torch.randn(*shape))
        cols, kinds, _ = features(table, table.batch, 16, cache)
        t = np.full(table.n, 1e-6)
        for cls, x in known.items():
            t[kinds == cls] = cols[kinds == cls] @ x
        nets.append(NetSample(f"seed {seed}", table, t, float(t.sum())))
    assert sum(int((features(n.table, n.table.batch, 16, cache)[1] == "gconv").sum()) for n in nets) >= 8
    full, _, _ = fit_split_model(nets, 16, cache)
    timed, _, _ = fit_split_model(nets, 16, cache, timed_groups=True)
    w = COL["weight_bytes"]
    assert full["gconv"][w] == pytest.approx(2e-10, rel=1e-3)
    assert timed["gconv"][w] == 0.0
    assert full["gconv"][COL["overhead"]] == pytest.approx(40e-6, rel=1e-3) and timed["gconv"][COL["overhead"]] == 0
    assert set(np.flatnonzero(timed["gconv"])) <= set(TIMED_GROUPED)
    for cls in ("conv", "elementwise"):
        assert np.array_equal(timed[cls], full[cls])


@pytest.mark.slow  # fits on real timed samples
def test_glue_fit_bounds_a_larger_batch_by_the_first_ones_python_not_its_bytes():
    """Networks whose untimed totals exceed their rows by known glue (per operator, per call, per activation byte
    written): fit_glue gets batch 1's back; batch 8's, bounded by batch 1's per-operator and per-call glue
    (glue_bound) and not its per-byte glue, gets a per-byte cost below batch 1's back; bounded by all three, the
    per-byte cost could not fall below batch 1's."""
    from hardware.calibrate.fit import fit_glue, glue_bound, glue_columns

    def nets(batch, glue):
        out = []
        for seed in range(16):
            model, shape = synthetic_cnn(seed)
            table = light_table(model, torch.randn(*shape))
            rows = np.full(table.n, 2e-5)
            net = NetSample(f"seed {seed}", table, rows, 0.0, batch=batch)
            out.append(dataclasses.replace(net, total_seconds=float(rows.sum() + np.dot(glue_columns(net), glue))))
        return out

    first = (10e-6, 150e-6, 2e-11)
    g1 = fit_glue(nets(1, first))
    assert g1 == pytest.approx(first, rel=1e-6)
    assert glue_bound(g1) == pytest.approx((10e-6, 150e-6, 0.0), rel=1e-6)
    eight = (10e-6, 500e-6, 7e-12)  # per call more, per byte less than batch 1
    b8 = nets(8, eight)
    assert fit_glue(b8, glue_bound(g1)) == pytest.approx(eight, rel=1e-6)
    assert fit_glue(b8, g1)[2] >= first[2]


INT8_CACHE = 2e6
INT8_COEF = {b: {"conv": np.array([8e-6, 1e-12, 0.0, 0.0, 2e-11, 1e-11, 2e-11] + [0.0] * 5)} for b in (1, 8)}


@functools.lru_cache(maxsize=1)
def _int8_networks():
    """Eight synthetic networks' INT8 estimates (three with channel shuffles), each at batch 1 and 8, with their
    parts (fit.int8_parts) under INT8_COEF: (an Int8Sample to time, its parts)."""
    from estimators.methods.quantize import estimate as estimate_quantize
    from estimators.strategy import QuantizeStep
    from hardware.calibrate.fit import int8_parts
    from hardware.calibrate.int8 import Int8Sample
    from hardware.synthetic import _Shuffle

    out, shuffled, plain = [], 0, 0
    for seed in range(60):
        model, shape = synthetic_cnn(seed)
        has = any(isinstance(m, _Shuffle) for m in model.modules())
        if (has and shuffled >= 3) or (not has and plain >= 5):
            continue
        table = estimate_quantize(light_table(model, torch.randn(1, *shape[1:])), QuantizeStep(dtype="int8"))
        for b in (1, 8):
            s = Int8Sample(f"seed {seed}", table, b, 1.0)
            out.append((s, int8_parts(s, INT8_COEF[b], INT8_CACHE)))
        shuffled += has
        plain += not has
    assert shuffled == 3 and plain == 5
    return tuple(out)


@pytest.mark.slow  # builds the estimates of 8 synthetic networks
def test_int8_graph_fit_recovers_known_costs():
    """Compiled INT8 synthetic networks whose profiled parts follow known costs (a kernel in a graph against alone,
    per kernel and per activation byte up to the cache's size; the generated loops per operator, per element and
    per element a channel shuffle reorders, the wrapper per call, per operator and per element moved): fit_int8
    gets them back, the shuffle's extra cost from the networks that have shuffles after the per-operator and
    per-element costs are fitted on those that do not. One network's kernels timed in a slow spell (1.8x) leave
    the kernels' context as it was (a least-absolute fit)."""
    from hardware.calibrate.fit import fit_int8
    from hardware.calibrate.int8 import Int8Sample

    ctx, per_byte, other, element, permute, call, op, moved = 3e-6, 2e-11, 6e-6, 1e-10, 3e-10, 20e-6, 9e-6, 4e-11
    samples = []
    for s, a in _int8_networks():
        kern = a[4] + ctx * a[1] + per_byte * a[8]
        loops = other * a[2] + element * a[3] + permute * a[7]
        rest = call + op * (a[1] + a[2]) + moved * (a[3] + a[5])
        samples.append(Int8Sample(s.label, s.table, s.batch, kern + loops + rest, kern, 0.0, loops))
    f = fit_int8(samples, INT8_COEF, INT8_CACHE)
    assert f.permute_s == pytest.approx(permute, rel=1e-3) and f.element_s == pytest.approx(element, rel=1e-3)
    assert f.other_s == pytest.approx(op + other, rel=1e-3) and f.kernel_s == pytest.approx(op, rel=1e-3)
    assert f.byte_s == pytest.approx(moved, rel=1e-3)
    assert f.call_s == pytest.approx(call, rel=1e-3) and f.kernel_s_ctx[8] == pytest.approx(ctx, rel=1e-3)
    assert f.byte_s_ctx[1] == pytest.approx(per_byte, rel=1e-3) and f.byte_s_ctx[8] == pytest.approx(per_byte, rel=1e-3)
    assert f.mape < 1e-3
    # the spilled bytes pay no context: some rows of these networks spill, so a context on all bytes would differ
    assert any(a[5] > a[8] for _, a in _int8_networks())
    slow = samples[9]
    samples[9] = Int8Sample(slow.label, slow.table, slow.batch, slow.total_seconds + 0.8 * slow.kernel_seconds,
                            1.8 * slow.kernel_seconds, 0.0, slow.loop_seconds)
    g = fit_int8(samples, INT8_COEF, INT8_CACHE)
    for b in (1, 8):
        assert g.kernel_s_ctx[b] == pytest.approx(ctx, rel=1e-2)
        assert g.byte_s_ctx[b] == pytest.approx(per_byte, rel=1e-2)


@pytest.mark.slow  # builds the estimates of 8 synthetic networks
def test_int8_graph_fit_takes_the_wrapper_timed_in_small_graphs():
    """With the call's and the operators' prices timed directly (wrapper_costs), fit_int8 keeps them as timed,
    fits what a graph adds to its kernels per activation byte in the cache only (a per-kernel context is in the
    timed per-kernel price), the generated loops per element (profiled), and what the totals leave per byte moved."""
    from hardware.calibrate.fit import fit_int8
    from hardware.calibrate.int8 import Int8Sample

    per_byte, loop_op, element, permute, call, per_kernel, per_loop, moved = \
        2e-11, 6e-6, 1e-10, 3e-10, 140e-6, 11e-6, 2e-6, 4e-11
    samples = []
    for s, a in _int8_networks():
        kern = a[4] + per_byte * a[8]
        loops = loop_op * a[2] + element * a[3] + permute * a[7]  # as profiled (the loops' own time)
        total = call + per_kernel * a[1] + kern + per_loop * a[2] + element * a[3] + permute * a[7] \
            + moved * (a[3] + a[5])
        samples.append(Int8Sample(s.label, s.table, s.batch, total, kern, 0.0, loops))
    f = fit_int8(samples, INT8_COEF, INT8_CACHE, wrapper=(call, per_kernel, per_loop))
    assert (f.call_s, f.kernel_s, f.other_s) == (call, per_kernel, per_loop)
    assert f.kernel_s_ctx == {1: 0.0, 8: 0.0}
    assert f.byte_s_ctx[1] == pytest.approx(per_byte, rel=1e-3) and f.byte_s_ctx[8] == pytest.approx(per_byte, rel=1e-3)
    assert f.element_s == pytest.approx(element, rel=1e-3) and f.permute_s == pytest.approx(permute, rel=1e-3)
    assert f.byte_s == pytest.approx(moved, rel=1e-3) and f.mape < 1e-3


def test_wrapper_costs_read_the_chains():
    """The chains' times give the call (less its input's quantizing loop, priced as another operator), a kernel's
    wrapper beyond the kernel alone and a generated loop's price; none without samples; never negative."""
    from hardware.calibrate.fit import wrapper_costs
    from hardware.calibrate.int8 import WrapperSample

    call, kernel, alone, loop = 120e-6, 12e-6, 30e-6, 2e-6
    sample = WrapperSample(2, 10, call + loop + 2 * (kernel + alone), call + loop + 10 * (kernel + alone),
                           call + loop + 10 * (kernel + alone + loop), alone)
    assert wrapper_costs([sample]) == pytest.approx((call, kernel, loop), rel=1e-9)
    assert wrapper_costs([]) is None
    odd = WrapperSample(2, 10, 1e-6, 50e-6, 40e-6, 100e-6)  # timed in a slow spell: nothing below zero
    assert min(wrapper_costs([odd])) == 0.0
    assert wrapper_costs([sample, sample, odd]) == pytest.approx((call, kernel, loop), rel=1e-9)
    # at the kernel fit's level: the fit predicts the chain's kernel at 1.5x its time with the chains, and the costs
    # read from them scale alike
    from estimators.methods.quantize import estimate as estimate_quantize
    from estimators.strategy import QuantizeStep
    from hardware.calibrate.fit import int8_parts
    from hardware.calibrate.int8 import Int8Sample

    table = estimate_quantize(light_table(nn.Sequential(nn.Conv2d(16, 16, 1)), torch.randn(1, 16, 8, 8)),
                              QuantizeStep(dtype="int8"))
    fitted = int8_parts(Int8Sample("k", table, 1, 0.0), INT8_COEF[1], INT8_CACHE)[4]
    assert fitted > 0
    slow = dataclasses.replace(sample, table=table, alone_s=fitted / 1.5)
    per_kernel = (slow.long_s - slow.short_s) / 8
    got = wrapper_costs([slow], INT8_COEF[1], INT8_CACHE)
    assert got == pytest.approx(((slow.short_s - 2 * per_kernel - loop) * 1.5, (per_kernel - slow.alone_s) * 1.5,
                                 loop * 1.5), rel=1e-9)


def test_efficiency_round_trips_the_fitted_coefficients():
    """split_efficiency and latency.split_coefficients are inverses for every fitted convolution class, zeros
    included: a fitted subclass (gconv) whose eager terms came out zero must not take its class's (conv's)."""
    from hardware.latency import split_coefficients

    z = np.zeros(SPLIT_WIDTH)
    conv = np.array([20e-6, 2e-12, 1e-12, 3e-12, 5e-11, 1e-11, 8e-11, 25e-6, 2e-10, 1.5e-10, 1e-12, 1.2e-12])
    gconv = np.array([30e-6, 4e-12, 0.0, 0.0, 4e-11, 2e-11, 9e-11, 0.0, 0.0, 1e-10, 0.0, 0.0])
    dwconv = np.array([40e-6, 1e-11, 0.0, 2e-12, 3e-11, 2e-11, 9e-11, 0.0, 1e-10, 0.0, 0.0, 5e-12])
    elem = z.copy()
    elem[[0, 1, 5]] = 3e-6, 1e-11, 5e-12
    coef = {"conv": conv, "gconv": gconv, "dwconv": dwconv, "elementwise": elem}
    eff = split_efficiency(coef, 0.0, peak=200.0, bwr=20.0, cbw=100.0, bw=10.0, threads=2)
    d = _split_profile()
    d["efficiency"] = eff.model_dump()
    prof = parse_profile(d, "test")
    for cls in ("conv", "gconv", "dwconv"):
        got = split_coefficients(prof, prof.efficiency, cls, 200e9)
        assert got == pytest.approx(coef[cls], rel=1e-3, abs=1e-18), cls
    assert eff.onednn_us["gconv"] == 0.0 and eff.padding_ns["gconv"] == 0.0 and eff.misaligned_factor["gconv"] == 1.0


def test_measurements_run_with_the_steady_allocator():
    desc = steady_allocator()
    m = measure_latency(torch.nn.ReLU(), torch.randn(4, 4), warmup=1, min_runs=3, budget_s=0.01)
    assert m["allocator"] == desc and desc


def test_measurements_pause_the_garbage_collector():
    """Timed as timeit times: the cyclic collector off while the model runs, as it was afterwards."""
    import gc

    seen = []

    def fn(x):
        seen.append(gc.isenabled())
        return x + 1

    assert gc.isenabled()
    measure_latency(fn, torch.zeros(2), warmup=1, min_runs=3, max_runs=3)
    assert seen == [False] * 4 and gc.isenabled()
    gc.disable()
    try:  # a caller that had it off keeps it off
        measure_latency(fn, torch.zeros(2), warmup=0, min_runs=1, max_runs=1)
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(ZeroDivisionError):  # on again after an error inside
        measure_latency(lambda x: 1 / 0, torch.zeros(2), warmup=1)
    assert gc.isenabled()


def test_machine_states_by_hand():
    """Sync probe readings within 15% of each other are one state; the dominant state is the median of the largest
    group (the two states this VM reads are 3.4-4.1 us and 4.7-5.8 us)."""
    from hardware.measure import StateClock, dominant_state, same_state

    assert same_state(3.7, 3.6) and same_state(4.0, 3.5) and not same_state(5.2, 3.7)
    assert same_state(1.15, 1.0) and same_state(1.0, 1.15) and not same_state(1.16, 1.0)
    assert not same_state(0.0, 1.0) and not same_state(1.0, 0.0)
    assert dominant_state([3.6, 5.2, 3.7, 5.3, 3.8, 3.65]) == pytest.approx(3.675)  # median of the four
    assert dominant_state([5.2, 3.6, 5.3, 5.4, 3.7]) == pytest.approx(5.3)
    assert dominant_state([]) is None and dominant_state([0.0]) is None
    clock = StateClock(every_s=3600, probe_s=0.005)
    first = clock()
    assert clock() == first and len(clock.readings) == 1  # within every_s: the last reading
    clock(fresh=True)
    assert len(clock.readings) == 2 and all(0.1 < r < 1000 for r in clock.readings)


def test_pace_network_is_fixed_and_measurements_carry_it():
    """The pace network is the same network and weights every time it is built; a paced measurement times it in
    alternation with the workload and reports its median; a latency is brought to a profile's pace by hand."""
    from hardware.measure import PaceClock, PaceReference, at_pace, measure_paced
    from hardware.synthetic import pace_network

    rng = torch.get_rng_state()
    (a, shape), (b, _) = pace_network(), pace_network()
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random state is left as it was
    assert shape == (1, 3, 96, 96) and not a.training
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    ref = PaceReference()
    assert 0.01 < ref.reading() < 1000
    model = load_model("demo:digits-cnn").model.eval()
    got = measure_paced(model, torch.randn(1, 1, 8, 8), ref, warmup=1, min_runs=5, budget_s=0.02)
    assert got["latency_runs"] >= 5 and got["latency_ms"] > 0 and 0.01 < got["pace_ms"] < 1000
    assert got["latency_p90_ms"] >= got["latency_ms"] and got["batch_size"] == 1 and "between" not in got
    calls = []  # measure_latency calls `between` once after every timed call, outside its time
    plain = measure_latency(lambda x: x + 1, torch.zeros(4), warmup=2, min_runs=7, max_runs=7,
                            between=lambda: calls.append(1) or 5.0)
    assert plain["latency_runs"] == 7 and len(calls) == 7 and plain["between"] == [5.0] * 7
    assert "between" not in measure_latency(lambda x: x + 1, torch.zeros(4), warmup=0, min_runs=2, max_runs=2)
    # 10 ms measured while the pace network ran 4 ms is 7.5 ms at a pace of 3 ms
    assert at_pace(10.0, 4.0, 3.0) == pytest.approx(7.5)
    assert at_pace(10.0, 0.0, 3.0) is None and at_pace(10.0, 4.0, 0.0) is None
    # with an elasticity the latency follows that power of the pace: 10 ms x (3 / 4) ** 0.5
    assert at_pace(10.0, 4.0, 3.0, 0.5) == pytest.approx(8.660254) and at_pace(10.0, 4.0, 3.0, 0.0) == 10.0
    got = at_pace(np.array([10.0, 6.0]), np.array([4.0, 2.0]), 3.0, 0.5)  # arrays of measurements and readings
    assert got == pytest.approx([8.660254, 7.348469]) and at_pace(np.ones(2), np.array([4.0, 0.0]), 3.0) is None
    clock = PaceClock(every_s=3600)
    first = clock()
    assert clock() == first and len(clock.readings) == 1  # within every_s: the last reading
    clock(fresh=True)
    assert len(clock.readings) == 2 and all(r > 0 for r in clock.readings)


def test_samples_are_brought_to_one_pace_by_hand():
    """Every float network's times scaled by the calibration's median pace over the pace it was timed at, those
    timed over PACE_BAND (2x) away from it dropped; unread ones (pace 0), INT8 samples and samples without pace
    readings as they are. A network's pace is the mean of the readings before and after it."""
    from hardware.calibrate.samples import Samples, at_one_pace
    from hardware.calibrate.sampling import pace_around

    def net(pace, sec):
        return NetSample("n", None, np.array([sec, 2 * sec]), 3 * sec, batch=1, pace_ms=pace)

    nets = {1: [net(2.0, 1.0), net(4.0, 1.0), net(0.0, 1.0), net(6.5, 1.0), net(1.4, 1.0)], 8: [net(6.0, 2.0)]}
    ops = {1: [net(6.0, 0.5)]}
    s = Samples((1.0, 1.0, 1.0, 1.0), False, 1, 2, nets, ops, [], [], [], [], 1.0, pace_readings=[2.0, 3.0, 4.0, 3.0, 9.0])
    out, pace = at_one_pace(s)
    assert pace == 3.0  # the median reading
    # 3 s at pace 2 is 4.5 s at pace 3; unread: as timed; timed at 6.5 and 1.4 ms, over 2x away: dropped
    assert [x.total_seconds for x in out.nets[1]] == pytest.approx([4.5, 2.25, 3.0])
    assert out.nets[1][0].row_seconds == pytest.approx([1.5, 3.0])
    assert out.nets[8][0].total_seconds == pytest.approx(3.0)  # 6 s at 6 ms: 2x away, kept (the band's edge)
    assert out.ops is s.ops  # INT8 samples are not paced
    assert s.nets[1][0].total_seconds == 3.0  # the samples themselves are left as they were
    unpaced = Samples(s.peaks, False, 1, 2, s.nets, s.ops, [], [], [], [], 1.0)
    assert at_one_pace(unpaced) == (unpaced, 0.0)
    half, _ = at_one_pace(s, 0.5)  # with an elasticity: 3 s at pace 2 is 3 x (3 / 2) ** 0.5 s at pace 3
    assert half.nets[1][0].total_seconds == pytest.approx(3 * 1.5 ** 0.5) and len(half.nets[1]) == 3
    assert pace_around(3.0, 5.0) == 4.0 and pace_around(0.0, 5.0) == 5.0 and pace_around(0.0, 0.0) == 0.0


def test_pace_elasticity_by_hand():
    """The slope (through the origin, within [0, 1]) of the log ratio of two timings of one network on the log ratio
    of the paces they were timed at, over every pair of timings of a network (samples and re-timings pooled); 1
    where fewer than ELASTICITY_LEAST pairs or paces about equal measure it; timings over PACE_BAND away from the
    median pace left out."""
    from hardware.calibrate.samples import Samples, pace_elasticity
    from hardware.calibrate.sampling import ELASTICITY_LEAST

    def net(label, pace, sec):
        return NetSample(label, None, np.zeros(0), sec, batch=1, pace_ms=pace)

    def samples(nets, again, readings=(3.0,)):
        return Samples((1.0,) * 4, False, 1, 2, {1: nets}, {}, [], [], [], [], 1.0, pace_readings=list(readings),
                       retimed=again)

    # ten networks, each timed at pace 3 and again at pace 2 or 4.5: their times follow the pace ** 0.6
    first = [net(f"n{i}", 3.0, 1.0 + i) for i in range(10)]
    again = [net(f"n{i}", p, (1.0 + i) * (p / 3.0) ** 0.6) for i, p in enumerate([2.0, 4.5] * 5)]
    assert pace_elasticity(samples(first, again)) == (pytest.approx(0.6), 10)
    # a third timing of n0 adds two pairs (with both others); a timing 2.5x away from the median is left out
    more = again + [net("n0", 4.5, 1.0 * 1.5 ** 0.6), net("n1", 7.6, 50.0)]
    assert pace_elasticity(samples(first, more)) == (pytest.approx(0.6), 12)
    # slopes beyond [0, 1] are clipped
    faster = [net(f"n{i}", p, (1.0 + i) * (p / 3.0) ** -0.3) for i, p in enumerate([2.0, 4.5] * 5)]
    assert pace_elasticity(samples(first, faster))[0] == 0.0
    steeper = [net(f"n{i}", p, (1.0 + i) * (p / 3.0) ** 1.4) for i, p in enumerate([2.0, 4.5] * 5)]
    assert pace_elasticity(samples(first, steeper))[0] == 1.0
    # too few pairs, paces within a few percent, or no pace readings: not measured (1)
    assert pace_elasticity(samples(first, again[:ELASTICITY_LEAST - 1])) == (1.0, ELASTICITY_LEAST - 1)
    same = [net(f"n{i}", 3.05, 2.0 + i) for i in range(10)]
    assert pace_elasticity(samples(first, same)) == (1.0, 10)
    assert pace_elasticity(samples(first, again, readings=())) == (1.0, 0)


def test_in_place_rows_count_what_they_read_by_hand():
    """An in-place elementwise row (ReLU(inplace=True)) costs the bytes it reads and not those it writes back, and
    allocates nothing (no glue per byte written); out of place it costs both. An in-place SiLU (transcendental,
    compute-bound: 0.96x out of place when timed) is costed as out of place."""
    from estimators.modelspec import LoadedModel
    from hardware.latency import in_place, latency_kinds

    def tab(inplace: bool):
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(inplace=inplace), nn.Conv2d(8, 8, 1),
                              nn.SiLU(inplace=inplace)).eval()
        return analyze(LoadedModel(f"test:inplace-{inplace}", "factory", model, (1, 3, 16, 16)))

    t_in, t_out = tab(True), tab(False)
    kinds = latency_kinds(t_in)
    relu = int(np.flatnonzero(kinds == "elementwise")[0])
    assert np.flatnonzero(in_place(t_in, kinds)).tolist() == [relu]
    assert not in_place(t_out, latency_kinds(t_out)).any()
    d = _split_profile()
    d["cache_bytes"] = 1 << 30  # every activation byte at cache speed: 100 GB/s x the class's share 0.8
    d["efficiency"]["glue_ns_per_byte"] = 1.0
    prof = parse_profile(d, "test")
    a, b = predict_latency(t_in, prof), predict_latency(t_out, prof)
    written = 8 * 16 * 16 * 4  # the ReLU's fp32 output
    diff = b.per_row_ms - a.per_row_ms
    assert diff[relu] == pytest.approx(written / (100e9 * 0.8) * 1e3, rel=1e-9)
    assert np.delete(diff, relu) == pytest.approx(0.0, abs=1e-12)  # the SiLU and the convolutions alike
    # the call's glue: 1 ns per byte written into an output the call allocates
    assert b.latency_ms - a.latency_ms == pytest.approx(diff[relu] + written * 1e-9 * 1e3, rel=1e-9)


def _tiny_table():
    """conv -> SiLU -> 2x2 max pool on 24 channels -> 1x1 conv -> sigmoid (a gate no INT8 conv fuses)."""
    from estimators.modelspec import LoadedModel

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 24, 3, padding=1, bias=False), torch.nn.SiLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Conv2d(24, 40, 1), torch.nn.Sigmoid()).eval()
    return analyze(LoadedModel("test:tiny", "factory", model, (1, 3, 16, 16)))


def test_transcendental_and_channel_tail_costs_by_hand():
    from hardware.latency import latency_kinds, remainder_share

    table = _tiny_table()
    kinds = latency_kinds(table)
    silu, pool, sig = (int(np.flatnonzero(kinds == k)[i]) for k, i in (("transcendental", 0), ("maxpool", 0),
                                                                       ("transcendental", 1)))
    assert remainder_share(np.array([24, 32, 40, 8]), 16).tolist() == [8 / 24, 0.0, 8 / 40, 8 / 8]
    base = parse_profile(_split_profile(), "test")
    d = _split_profile()
    d["efficiency"].update(element_ns={"transcendental": 0.5}, remainder_ns={"maxpool": 2.0},
                           remainder_multiple={"maxpool": 16})
    diff = predict_latency(table, parse_profile(d, "test")).per_row_ms - predict_latency(table, base).per_row_ms
    assert diff[silu] == pytest.approx(24 * 16 * 16 * 0.5e-9 * 1e3, rel=1e-9)  # its output elements at 0.5 ns
    assert diff[sig] == pytest.approx(40 * 8 * 8 * 0.5e-9 * 1e3, rel=1e-9)
    # max pooling: 24 x 8 x 8 outputs x a 4-element window; 8 of its 24 channels lie beyond a multiple of 16
    assert diff[pool] == pytest.approx(24 * 8 * 8 * 4 * (8 / 24) * 2e-9 * 1e3, rel=1e-9)
    others = np.ones(table.n, dtype=bool)
    others[[silu, pool, sig]] = False
    assert np.all(diff[others] == 0)


def test_unfused_ops_stay_out_of_the_convolution():
    from hardware.latency import fused_mask, latency_kinds

    table = _tiny_table()
    kinds = latency_kinds(table)
    silu, sig = np.flatnonzero(kinds == "transcendental")[:2]
    fused = fused_mask(table, kinds, ["elementwise"])  # a subclass fuses where its class does
    assert fused[silu] and fused[sig]
    fused = fused_mask(table, kinds, ["elementwise"], ["sigmoid"])
    assert fused[silu] and not fused[sig]


def _batched_equals_per_candidate(table, prof, batch: int, steps) -> np.ndarray:
    """The batch evaluator's latencies of `table` pruned by each of `steps`, each asserted equal to
    predict_latency on the estimated table; returned (ms)."""
    from estimators.compress import estimate
    from estimators.methods.prune import prune_counts
    from estimators.strategy import Strategy
    from search.batch import BatchEvaluator

    gidx = np.array([g.index for g in table.plan.groups])
    kept = np.tile(table.state.kept, (len(steps), 1))
    for k, st in enumerate(steps):
        kept[k, gidx] -= prune_counts(table, st)
    out = BatchEvaluator(table, prof, batch)(kept)["latency_ms"]
    for k, st in enumerate(steps):
        want = predict_latency(estimate(table, Strategy(steps=[st])), prof, batch).latency_ms
        assert out[k] == pytest.approx(want, rel=1e-9)
    return out


def test_batch_evaluator_prices_elements_and_channel_tails_as_predict_latency():
    from estimators.strategy import PruneStep

    d = _split_profile()
    d["efficiency"].update(element_ns={"transcendental": 0.5}, remainder_ns={"maxpool": 2.0},
                           remainder_multiple={"maxpool": 16})
    _batched_equals_per_candidate(_tiny_table(), parse_profile(d, "test"), 1,
                                  [PruneStep(ratio=r) for r in (0.1, 0.3, 0.55)])


def test_a_subclass_takes_its_class_element_cost_unless_named():
    from hardware.latency import latency_kinds

    table = _tiny_table()
    kinds = latency_kinds(table)
    silu = int(np.flatnonzero(kinds == "transcendental")[0])
    base = predict_latency(table, parse_profile(_split_profile(), "test")).per_row_ms[silu]
    d = _split_profile()
    d["efficiency"]["element_ns"] = {"elementwise": 0.5}
    assert predict_latency(table, parse_profile(d, "test")).per_row_ms[silu] - base == \
        pytest.approx(24 * 16 * 16 * 0.5e-9 * 1e3, rel=1e-9)
    d["efficiency"]["element_ns"] = {"elementwise": 0.5, "transcendental": 0.0}
    assert predict_latency(table, parse_profile(d, "test")).per_row_ms[silu] == pytest.approx(base, rel=1e-12)


def test_eager_dispatch_rule_matches_torch():
    """eager_onednn is ATen's own choice (torch._C._select_conv_backend) for float convolutions of every kind
    the analysis sees: dense, grouped, depthwise, 1x1, strided, batch 1 and more, small and large inputs."""
    from hardware.latency import ConvShape, eager_onednn

    rng = np.random.default_rng(0)
    threads = torch.get_num_threads()
    for _ in range(300):
        b = int(rng.choice([1, 1, 1, 2, 8, 16]))
        cin = int(rng.integers(1, 200))
        k = int(rng.choice([1, 1, 3, 3, 5, 7]))
        g = int(rng.choice([1, 1, 1, cin])) if rng.random() < 0.7 else int(np.gcd(cin, int(rng.choice([2, 4, 8]))))
        cout = g * int(rng.integers(1, 8))
        hw = int(rng.choice([1, 3, 7, 14, 28, 56]))
        s = int(rng.choice([1, 1, 2]))
        x, w = torch.empty(b, cin, hw, hw), torch.empty(cout, cin // g, k, k)
        want = torch._C._select_conv_backend(x, w, None, [s, s], [k // 2, k // 2], [1, 1], False, [0, 0], g,
                                             None).name == "Mkldnn"
        out_hw = (hw + 2 * (k // 2) - k) // s + 1
        shape = ConvShape(np.array([True]), np.array([float(hw * hw)]), np.array([k * k]), np.array([g]),
                          np.array([out_hw * out_hw < hw * hw]))
        got = bool(eager_onednn(shape, np.array([cin]), b, threads)[0])
        assert got == want, (b, cin, cout, k, g, hw, s)


def test_padded_share_by_hand():
    """oneDNN's blocked layout rounds channels up to its block: per group, input and output (dense, grouped);
    the channels alone (depthwise); the output alone for an input of up to 4 channels (plain layout there)."""
    from hardware.latency import ConvShape, padded_share

    rows = [(24, 40, 1, 9), (3, 24, 1, 9), (67, 67, 67, 9), (96, 96, 12, 9), (32, 48, 1, 1), (10, 10, 1, 1)]
    cin, cout = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    conv = np.array([True] * 5 + [False])  # the last row is not a convolution
    shape = ConvShape(conv, np.full(len(rows), 64.0), np.array([r[3] for r in rows]), np.array([r[2] for r in rows]),
                      np.zeros(len(rows), dtype=bool))
    got = padded_share(shape, cin, cout, 16)
    want = [(32 / 24) * (48 / 40) - 1, 32 / 24 - 1, 80 / 67 - 1, (16 / 8) * (16 / 8) - 1, 0.0, 0.0]
    assert got == pytest.approx(want)
    assert not padded_share(shape, cin, cout, None).any()


def test_eager_dispatch_costs_by_hand():
    """_tiny_table's 3x3 conv 3 -> 24 on 16x16 (768 input elements) and 1x1 conv 24 -> 40 on 8x8 (1536): at batch
    1 both run on ATen's native kernel (dense, kernels under 4x4, inputs under 20480 elements), at batch 16 on
    oneDNN, where channels that are not multiples of 16 pay the reorder per byte and the FLOPs the block's rounding
    adds (3 -> 24: output 24 -> 32; 24 -> 40: 32/24 x 48/40); the glue per byte written."""
    from hardware.latency import conv_shape, eager_onednn

    table = _tiny_table()
    kinds = np.array(table.kinds)
    conv0, conv1 = np.flatnonzero(kinds == "conv")[:2]
    shape = conv_shape(table)
    assert not eager_onednn(shape, np.array([3] * table.n), 1, 2)[conv0]  # 3 x 16 x 16 = 768 elements: native
    base = _split_profile()
    d = copy.deepcopy(base)
    d["efficiency"].update(eager_threads=2, onednn_us={"conv": 7.0}, reorder_in_ns={"conv": 0.5},
                           reorder_out_ns={"conv": 0.25}, native_factor={"conv": 1.5}, padding_ns={"conv": 0.03},
                           glue_ns_per_byte=0.125)
    p0, p1 = parse_profile(base, "test"), parse_profile(d, "test")
    c_f = 1.0 / (100e9 * 0.25)  # _valid's fp32 peak and conv efficiency
    for b in (1, 16):
        diff = predict_latency(table, p1, b).per_row_ms - predict_latency(table, p0, b).per_row_ms
        written = sum(float(np.prod(s[0])) for s in table.out_shapes if s) * 4 * b  # fp32 outputs of every row
        if b == 1:  # both on ATen's native kernel: their FLOPs at 1.5x
            for i, f in ((conv0, CONV_T_FLOPS[0]), (conv1, CONV_T_FLOPS[1])):
                assert diff[i] == pytest.approx(f * c_f * 0.5 * 1e3, rel=1e-9)
        else:  # on oneDNN: 3 input channels and 24 -> 40 are not multiples of 16
            pad0 = CONV_T_FLOPS[0] * b * 0.03e-9 * (32 / 24 - 1)
            pad1 = CONV_T_FLOPS[1] * b * 0.03e-9 * (32 / 24 * 48 / 40 - 1)
            reorder0 = 3 * 256 * 4 * b * 0.5e-9 + 24 * 256 * 4 * b * 0.25e-9
            reorder1 = 24 * 64 * 4 * b * 0.5e-9 + 40 * 64 * 4 * b * 0.25e-9
            assert diff[conv0] == pytest.approx((7e-6 + reorder0 + pad0) * 1e3)
            assert diff[conv1] == pytest.approx((7e-6 + reorder1 + pad1) * 1e3)
        others = np.ones(table.n, dtype=bool)
        others[[conv0, conv1]] = False
        assert np.all(diff[others] == 0)
        total = predict_latency(table, p1, b).latency_ms - predict_latency(table, p0, b).latency_ms
        assert total - diff.sum() == pytest.approx(written * 0.125e-9 * 1e3, rel=1e-6)


CONV_T_FLOPS = (2 * 3 * 24 * 9 * 16 * 16, 2 * 24 * 40 * 8 * 8)  # _tiny_table's two convolutions at batch 1


@pytest.mark.parametrize("batch", [1, 2])
def test_batch_evaluator_prices_the_eager_dispatch_as_predict_latency(batch):
    from estimators.strategy import PruneStep

    table = analyze(load_model("torchvision:mobilenet_v2", input_shape="1,3,64,64"))
    d = _split_profile()
    d["efficiency"].update(eager_threads=2, onednn_us={"conv": 7.0, "dwconv": 3.0}, reorder_in_ns={"conv": 0.5},
                           reorder_out_ns={"conv": 0.25, "dwconv": 0.3}, native_factor={"conv": 1.5},
                           padding_ns={"conv": 0.02, "dwconv": 0.05}, glue_ns_per_byte=0.125)
    steps = [PruneStep(ratio=r) for r in (0.0, 0.3, 0.55)] + [PruneStep(ratio=0.5, round_to=16)]
    out = _batched_equals_per_candidate(table, parse_profile(d, "test"), batch, steps)
    plain = _batched_equals_per_candidate(table, parse_profile(_split_profile(), "test"), batch, steps)
    assert (out > plain).all()


def test_input_quantization_costs_per_input_element():
    """input_ns_per_element: a per-call cost that scales with the model's input (an INT8 graph quantizing it),
    the same in the batch evaluator."""
    from search.batch import BatchEvaluator

    table = _tiny_table()
    base = _split_profile()
    d = copy.deepcopy(base)
    d["efficiency"]["input_ns_per_element"] = 0.25
    p0, p1 = parse_profile(base, "test"), parse_profile(d, "test")
    for b in (1, 4):
        diff = predict_latency(table, p1, b).latency_ms - predict_latency(table, p0, b).latency_ms
        assert diff == pytest.approx(3 * 16 * 16 * b * 0.25e-9 * 1e3, rel=1e-9)
        out = BatchEvaluator(table, p1, b)(table.state.kept[None, :])
        assert out["latency_ms"][0] == pytest.approx(predict_latency(table, p1, b).latency_ms, rel=1e-9)


def test_weights_beyond_the_cache_stream_at_memory_read_speed(table):
    """INT8 kernels are calibrated with their weights hot (faster than memory reads them): a model whose weights
    exceed the cache reads them from memory on every call, at memory's read bandwidth at best."""
    d = _split_profile()
    d["efficiency"]["weight_bandwidth"] = {"conv": 4.0}  # 80 GB/s: faster than memory's 20 GB/s read
    w2 = 64 * 32 * 9 * 4
    rest = 11e-6 + CONV2_FLOPS / (100e9 * 0.25) + 4096 / 80e9 + (32 * 64 * 4 + 64 * 64 * 4 - 4096) / 2.5e9
    streamed = predict_latency(table, parse_profile(d, "test"))  # 4 KiB cache: the weights stream
    assert streamed.per_row_ms[table.names.index("features.3")] == pytest.approx((rest + w2 / 20e9) * 1e3, rel=1e-9)
    d["cache_bytes"] = 64 * 2**20  # every weight fits: they stay hot at the calibrated rate
    hot = predict_latency(table, parse_profile(d, "test"))
    rest += (32 * 64 * 4 + 64 * 64 * 4 - 4096) * (1 / 80e9 - 1 / 2.5e9)  # the activations now fit as well
    assert hot.per_row_ms[table.names.index("features.3")] == pytest.approx((rest + w2 / 80e9) * 1e3, rel=1e-9)


def test_batch_evaluator_streams_weights_as_predict_latency():
    from estimators.strategy import PruneStep

    table = analyze(load_model("torchvision:mobilenet_v2", input_shape="1,3,64,64"))
    d = _split_profile()
    d["cache_bytes"] = 6 * 2**20  # mobilenet_v2's 14 MB of weights stream; pruned by 0.55 they fit
    d["efficiency"]["weight_bandwidth"] = {"conv": 4.0, "dwconv": 4.0, "gemm": 4.0}
    steps = [PruneStep(ratio=r) for r in (0.0, 0.3, 0.55)]
    _batched_equals_per_candidate(table, parse_profile(d, "test"), 1, steps)


def test_interleaved_measurement_gives_ratios_round_by_round():
    """Functions timed in alternation, round by round: each one's median and its ratio to the first. A function
    that waits twice as long runs about twice as long as the reference in every round (waits, not arithmetic: a
    busy machine stretches computation, not a sleep's length, so the test holds on a loaded CI runner)."""
    import time

    from hardware.measure import measure_interleaved

    x = torch.randn(4, 4)

    def once(t):
        time.sleep(0.004)
        return t

    def twice(t):
        time.sleep(0.008)
        return t

    got = measure_interleaved([once, twice, once], [x, x, x], rounds=5, round_s=0.04)
    assert got["rounds"] == 6 and len(got["ratio"]) == 3 and got["ratio"][0] == 1.0  # a multiple of 3
    assert 1.4 < got["ratio"][1] < 3.0 and 0.7 < got["ratio"][2] < 1.4
    assert all(v > 0 for v in got["latency_ms"]) and all(v >= 0 for v in got["ratio_iqr"])


def test_interleaved_rounds_give_every_function_every_place_equally_often():
    """The order of an alternation turns every round: each function leads as many rounds as every other, so a
    place in the round that runs slower (seen: the later of two ONNX Runtime sessions) weighs on all alike."""
    import collections

    from hardware.measure import measure_interleaved

    log: list[int] = []

    def timed(i):
        def fn(t):
            log.append(i)
            return t
        return fn

    x = torch.randn(2)
    got = measure_interleaved([timed(0), timed(1), timed(2)], [x, x, x], rounds=7, round_s=0.0, min_calls=1,
                              warmup=1)
    assert got["rounds"] == 9
    calls = log[3:]  # after one warm-up call each, one call per function per round
    rounds = [calls[k:k + 3] for k in range(0, len(calls), 3)]
    assert len(rounds) == 9 and all(sorted(r) == [0, 1, 2] for r in rounds)
    assert collections.Counter(r[0] for r in rounds) == {0: 3, 1: 3, 2: 3}
    assert collections.Counter(r[2] for r in rounds) == {0: 3, 1: 3, 2: 3}


def _grouped_table():
    """conv 3->48, a grouped 3x3 conv 48->48 in 4 groups (12 channels per group), a depthwise conv, a 1x1 conv."""
    from estimators.modelspec import LoadedModel

    model = nn.Sequential(nn.Conv2d(3, 48, 3, padding=1), nn.ReLU(), nn.Conv2d(48, 48, 3, padding=1, groups=4),
                          nn.ReLU(), nn.Conv2d(48, 48, 3, padding=1, groups=48), nn.Conv2d(48, 16, 1)).eval()
    return analyze(LoadedModel("test:grouped", "factory", model, (1, 3, 16, 16)))


def _int8_profile(group_multiple=None, group_slow_ns=0.0):
    d = _split_profile()
    d["peak_gflops"]["int8"] = 400.0
    d["fast_dtypes"].append("int8")
    d["dtype_overrides"] = {"int8": {**copy.deepcopy(d["efficiency"]), "group_multiple": group_multiple,
                                     "group_slow_ns": group_slow_ns}}
    return parse_profile(d, "test")


def test_int8_grouped_convolutions_off_their_multiple_take_the_slow_kernel_by_hand():
    """A dtype's group rule: an INT8 grouped (not depthwise) convolution whose channels per group are off
    group_multiple is priced at group_slow_ns per FLOP in place of its fast price; every other row, and every row of
    a candidate on the multiple, is priced as without the rule; the batch evaluator prices it as predict_latency."""
    from estimators.compress import estimate
    from estimators.strategy import parse_strategy
    from hardware.latency import group_slow_note, latency_kinds
    from search.batch import BatchEvaluator

    table = _grouped_table()
    plain, ruled = _int8_profile(), _int8_profile(4, 2.0)
    for text, per_group in (("quantize:int8", 12), ("prune:0.25,quantize:int8", 9)):
        est = estimate(table, parse_strategy(text))
        ev = evaluate(est)
        kinds = latency_kinds(est)
        g = int(np.flatnonzero(kinds == "gconv")[0])
        assert ev.cin[g] // 4 == per_group and ev.cout[g] // 4 == per_group
        a, b = predict_latency(est, plain, 1).per_row_ms, predict_latency(est, ruled, 1).per_row_ms
        others = np.arange(est.n) != g
        assert np.array_equal(a[others], b[others])
        if per_group % 4:
            flops = 2 * 16 * 16 * (4 * per_group) * per_group * 9
            assert b[g] == pytest.approx(flops * 2.0e-9 * 1e3, rel=1e-9) and b[g] > 10 * a[g]
        else:
            assert b[g] == a[g]
    # a candidate that puts grouped convolutions on the slow kernel says so, and how to keep them off it
    q, p = estimate(table, parse_strategy("quantize:int8")), estimate(table, parse_strategy("prune:0.25,quantize:int8"))
    assert group_slow_note(table, q, ruled) is None and group_slow_note(table, p, plain) is None
    assert "round_to=4" in group_slow_note(table, p, ruled)
    assert group_slow_note(table, estimate(table, parse_strategy("prune:0.25:round_to=4,quantize:int8")), ruled) is None
    # the float rows know no such rule
    assert np.array_equal(predict_latency(table, plain, 1).per_row_ms, predict_latency(table, ruled, 1).per_row_ms)
    q = estimate(table, parse_strategy("quantize:int8"))
    gidx = np.array([grp.index for grp in q.plan.groups])
    kept = np.tile(q.state.kept, (2, 1))
    kept[1, gidx] = np.maximum(kept[1, gidx] - 12, 1)
    out = BatchEvaluator(q, ruled, 1)(kept)["latency_ms"]
    assert out[0] == pytest.approx(predict_latency(q, ruled, 1).latency_ms, rel=1e-9)
    assert out[1] > 3 * out[0]


def test_group_rule_reads_the_multiple_and_the_slow_kernels_speed():
    from hardware.calibrate.int8 import GROUP_PROBE, GroupSample, group_rule

    def samples(slow_of, fast_s=2.5e-4, slow_ns=1.0):  # about this AMD EPYC's times at GROUP_PROBE_SHAPE
        flops = {pg: 2.0 * 4 * pg * pg * 9 * 32 * 32 for pg in GROUP_PROBE}
        return [GroupSample(pg, 4, flops[pg], flops[pg] * slow_ns * 1e-9 if slow_of(pg) else fast_s)
                for pg in GROUP_PROBE]

    m, s = group_rule(samples(lambda pg: pg % 4 != 0))
    assert m == 4 and s == pytest.approx(1e-9)
    assert group_rule(samples(lambda pg: pg % 8 != 0))[0] == 8
    assert group_rule(samples(lambda pg: pg % 2 != 0))[0] == 2
    assert group_rule(samples(lambda pg: False)) == (None, 0.0)  # no slow kernel
    assert group_rule(samples(lambda pg: pg == 10)) == (None, 0.0)  # slow, but not by a multiple
    assert group_rule([]) == (None, 0.0)


def _taps_profile(tap_ns: dict[int, float] | None):
    d = _split_profile()
    if tap_ns is not None:
        d["efficiency"]["group_tap_ns"] = dict(tap_ns)
    return parse_profile(d, "test")


def test_float_grouped_convolutions_take_their_time_per_output_by_channels_per_group():
    """Efficiency.group_tap_ns: a float grouped (not depthwise) convolution adds its output elements x kernel taps x
    the time timed at its channels per group (the nearer lower count where not timed, in proportion beyond the
    largest) to its split-model price; no other row changes; a pruned candidate off the fast count can cost more
    than the original on it; the batch evaluator prices it as predict_latency."""
    from estimators.compress import estimate
    from estimators.strategy import parse_strategy
    from hardware.latency import GroupTaps, latency_kinds
    from search.batch import BatchEvaluator

    taps = {pg: (0.2 if pg % 4 == 0 else 0.6) for pg in range(2, 17)}
    plain, timed = _taps_profile(None), _taps_profile(taps)
    table = _grouped_table()
    for text, per_group in (("none", 12), ("prune:0.25", 9)):
        est = estimate(table, parse_strategy(text))
        ev = evaluate(est)
        g = int(np.flatnonzero(latency_kinds(est) == "gconv")[0])
        assert ev.cin[g] // 4 == per_group
        a, b = predict_latency(est, plain, 1).per_row_ms, predict_latency(est, timed, 1).per_row_ms
        others = np.arange(est.n) != g
        assert np.array_equal(a[others], b[others])  # the depthwise convolution too
        out_taps = 16 * 16 * 4 * per_group * 9
        assert b[g] - a[g] == pytest.approx(out_taps * taps[per_group] * 1e-6, rel=1e-9)
    g = int(np.flatnonzero(latency_kinds(table) == "gconv")[0])
    orig = predict_latency(table, timed, 1).per_row_ms[g]
    assert predict_latency(estimate(table, parse_strategy("prune:0.25")), timed, 1).per_row_ms[g] > orig
    t = GroupTaps({8: 0.5, 16: 0.2, 24: 0.3})
    assert t.ns(np.array([8, 9, 15, 16, 20, 24])).tolist() == [0.5, 0.5, 0.5, 0.2, 0.2, 0.3]
    assert t.ns(np.array([48]))[0] == pytest.approx(48 * float(np.median([0.5 / 8, 0.2 / 16, 0.3 / 24])))
    est = estimate(table, parse_strategy("none"))
    kept = np.tile(est.state.kept, (2, 1))
    gidx = np.array([grp.index for grp in est.plan.groups])
    kept[1, gidx] = np.maximum(kept[1, gidx] - 12, 1)
    out = BatchEvaluator(est, timed, 1)(kept)["latency_ms"]
    assert out[0] == pytest.approx(predict_latency(est, timed, 1).latency_ms, rel=1e-9)


def test_float_grouped_convolutions_take_their_time_per_image_and_group_by_channels_per_group():
    """Efficiency.group_call_ns: beside its taps, a float grouped convolution adds batch x groups x the time per
    image and group timed at its channels per group; it scales with the batch and the groups, prices a pruned
    candidate off the fast count above its original, and the batch evaluator prices it as predict_latency."""
    from estimators.compress import estimate
    from estimators.strategy import parse_strategy
    from hardware.latency import GroupTaps, latency_kinds
    from search.batch import BatchEvaluator

    taps = {pg: 0.2 for pg in range(2, 17)}
    calls = {pg: (50.0 if pg % 4 == 0 else 500.0) for pg in range(2, 17)}
    d = _split_profile()
    d["efficiency"]["group_tap_ns"], d["efficiency"]["group_call_ns"] = dict(taps), dict(calls)
    both, only_taps = parse_profile(d, "test"), _taps_profile(taps)
    table = _grouped_table()
    for text, per_group in (("none", 12), ("prune:0.25", 9)):
        est = estimate(table, parse_strategy(text))
        g = int(np.flatnonzero(latency_kinds(est) == "gconv")[0])
        for batch in (1, 8):
            a, b = predict_latency(est, only_taps, batch).per_row_ms, predict_latency(est, both, batch).per_row_ms
            others = np.arange(est.n) != g
            assert np.array_equal(a[others], b[others])
            assert b[g] - a[g] == pytest.approx(batch * 4 * calls[per_group] * 1e-6, rel=1e-9)
    t = GroupTaps(taps, calls)
    got = t.seconds(np.array([36, 48]), np.array([4, 4]), np.array([100.0, 100.0]), np.array([9, 9]), 2)
    assert got.tolist() == pytest.approx([900 * 0.2e-9 + 8 * 500e-9, 900 * 0.2e-9 + 8 * 50e-9])
    fixed = GroupTaps(taps, calls, {8: 30.0, 12: 45.0, 16: 60.0})  # per call; beyond the largest count, its time
    got_fixed = fixed.seconds(np.array([36, 48, 400]), np.array([4, 4, 4]), np.full(3, 100.0), np.full(3, 9), 2)
    assert (got_fixed[:2] - got).tolist() == pytest.approx([30e-6, 45e-6])
    assert got_fixed[2] - t.seconds(np.array([400]), np.array([4]), np.array([100.0]), np.array([9]), 2)[0] == \
        pytest.approx(60e-6)
    est = estimate(table, parse_strategy("prune:0.25"))
    kept = np.tile(est.state.kept, (2, 1))
    out = BatchEvaluator(est, both, 8)(kept)["latency_ms"]
    assert out[0] == pytest.approx(predict_latency(est, both, 8).latency_ms, rel=1e-9)
    assert out[0] > predict_latency(est, only_taps, 8).latency_ms


def test_group_tap_table_is_the_slope_between_two_sizes_and_the_fit_leaves_it_out():
    """group_tap_table: per count, the time per output element and tap between the two spatial sizes it was timed
    at (a call's fixed cost cancels); fit_profile's networks have that time taken out of their grouped
    convolutions' rows and totals (the split model fits the rest), and nothing else."""
    from hardware.calibrate.groups import (FLOAT_GROUP_SMALL, FLOAT_WIDE_GROUPS, FloatGroupSample, group_call_tables,
                                           group_tap_table)
    from hardware.calibrate.profile import _without_taps
    from hardware.latency import group_tap_rows, latency_kinds

    def sample(b, pg, hw, ns, g=4, call_ns=0.0):
        x = FloatGroupSample(b, pg, g, hw, 0.0)
        # a fixed time per call by channels per group, then ns per tap, then call_ns per image and group
        return dataclasses.replace(x, seconds=fixed(pg) * 1e-6 + x.out_taps * ns * 1e-9 + b * g * call_ns * 1e-9)

    def call(pg):
        return 80.0 if pg % 8 == 0 else 500.0

    def fixed(pg):
        return 50.0 if pg % 8 == 0 else 35.0

    samples = [sample(b, pg, hw, 0.2 if pg % 8 == 0 else 0.6, 4, call(pg)) for b in (1, 8) for pg in (8, 11, 16)
               for hw in (7, 14)]
    assert group_tap_table(samples, 1) == pytest.approx({8: 0.2, 11: 0.6, 16: 0.2})
    assert group_tap_table(samples, 8) == pytest.approx({8: 0.2, 11: 0.6, 16: 0.2})
    assert group_tap_table(samples, 4) == {}  # no sample at that batch
    assert group_tap_table([s for s in samples if s.spatial == 7], 1) == {}  # one size: no slope
    assert group_call_tables(samples, 8, group_tap_table(samples, 8)) == ({}, {})  # no small, wide call
    small = [sample(b, pg, FLOAT_GROUP_SMALL, 0.2 if pg % 8 == 0 else 0.6, g, call(pg)) for b in (1, 8)
             for pg in (8, 11, 16) for g in (4, FLOAT_WIDE_GROUPS)]
    # the slope is the narrow calls' between the two sizes: neither the wide calls nor the small size change it
    assert group_tap_table(samples + small, 8) == pytest.approx({8: 0.2, 11: 0.6, 16: 0.2})
    for b in (1, 8):
        calls, fixed = group_call_tables(samples + small, b, group_tap_table(samples + small, b))
        assert calls == pytest.approx({8: 80.0, 11: 500.0, 16: 80.0}, abs=1e-3)
        assert fixed == pytest.approx({8: 50.0, 11: 35.0, 16: 50.0}, abs=1e-3)
    table = _grouped_table()
    rows = group_tap_rows(table, {12: 0.5}, 2)
    g = latency_kinds(table) == "gconv"
    assert rows[~g].sum() == 0 and rows[g][0] == pytest.approx(2 * 16 * 16 * 48 * 9 * 0.5e-9)
    with_calls = group_tap_rows(table, {12: 0.5}, 2, {12: 300.0}, {12: 40.0})
    assert with_calls[g][0] - rows[g][0] == pytest.approx(2 * 4 * 300e-9 + 40e-6)
    net = NetSample("n", table, np.full(table.n, 1e-3), 0.02, batch=2)
    less = _without_taps(net, {12: 0.5})
    assert np.allclose(less.row_seconds, net.row_seconds - rows)
    assert less.total_seconds == pytest.approx(0.02 - rows.sum())
    assert np.allclose(_without_taps(net, {12: 0.5}, {12: 300.0}, {12: 40.0}).row_seconds,
                       net.row_seconds - with_calls)
    assert _without_taps(net, {}) is net


@pytest.mark.timing
def test_float_grouped_convolutions_timed_alone_cost_by_their_channels_per_group():
    """float_group_samples on this machine: every count at both sizes and both batches with the narrow group count
    and at the small size with both group counts, positive times that grow with the size, and with the groups off
    the kernel's block; the tables have a time per output element and tap, per image and group and per call for
    every count at both batches."""
    from hardware.calibrate.groups import (FLOAT_GROUP_SMALL, FLOAT_GROUP_SPATIAL, FLOAT_GROUPS, FLOAT_WIDE_GROUPS,
                                           float_group_samples, group_call_tables, group_tap_table)

    counts = (8, 11, 16)
    samples = float_group_samples(lambda m: None, batches=(1, 8), counts=counts)
    assert len(samples) == 2 * 4 * len(counts) and all(s.seconds > 0 for s in samples)
    small = FLOAT_GROUP_SMALL
    for b in (1, 8):
        lo, hi = FLOAT_GROUP_SPATIAL[b]
        for pg in counts:
            t = {(s.spatial, s.groups): s.seconds for s in samples if s.batch == b and s.per_group == pg}
            assert t[hi, FLOAT_GROUPS] > t[lo, FLOAT_GROUPS]
            if pg == 11:
                # off the kernel's block the groups cost a time of their own (at 2x2, 32 groups 46 us against 33 for 4
                # at batch 1, 175 against 49 at batch 8); on it, at batch 1, the two calls differ by less than the
                # machine's noise (8 channels per group: 49 and 51 us)
                assert t[small, FLOAT_WIDE_GROUPS] > t[small, FLOAT_GROUPS]
        table = group_tap_table(samples, b)
        assert set(table) == set(counts) and all(v > 0 for v in table.values())
        calls, fixed = group_call_tables(samples, b, table)
        assert set(calls) == set(fixed) == set(counts) and all(v >= 0 for v in calls.values())
        assert all(v > 0 for v in fixed.values())
