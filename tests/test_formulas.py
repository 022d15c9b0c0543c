"""Hand-computed totals on a tiny net, for analysis and each estimator."""
import copy

import pytest
import torch
import torch_pruning as tp

from estimators.analyze import analyze
from estimators.compress import estimate
from estimators.modelspec import load_model
from estimators.strategy import parse_strategy
from estimators.table import totals
from hardware.measure import measure_peak_activation_bytes

SPEC = "tinynets:hand_net"
SHAPE = "1,3,8,8"


@pytest.fixture(scope="module")
def loaded():
    return load_model(SPEC, input_shape=SHAPE)


@pytest.fixture(scope="module")
def table(loaded):
    return analyze(loaded)


def test_hand_computed_totals(table):
    t = totals(table)
    # conv 8*3*9+8 = 224, bn 2*8 = 16, fc 128*10+10 = 1290
    assert t["params"] == 1530
    # conv 9*3*8*64 + 8*64 (bias) = 14336; bn 2*512; relu 512; maxpool 512 (input elements); fc 1280+10
    assert t["macs"] == 14336 + 1024 + 512 + 512 + 1290
    assert t["flops"] == 2 * t["macs"]
    # params + bn running stats (16) in fp32, + bn's int64 num_batches_tracked
    assert t["size_bytes"] == (1530 + 16) * 4 + 8
    # per layer: weights read + activations read + written (flatten is a view: 0)
    conv = 224 * 4 + 3 * 64 * 4 + 512 * 4
    bn = (16 + 16) * 4 + 8 + 512 * 4 + 512 * 4
    relu = 512 * 4 * 2
    pool = 512 * 4 + 128 * 4
    fc = 1290 * 4 + 128 * 4 + 10 * 4
    assert t["memory_access_bytes"] == conv + bn + relu + pool + fc
    # largest live set: the input (768 B, held by the caller) + conv and bn outputs (2 x 2048 B)
    assert t["peak_memory_bytes"] == t["size_bytes"] + 768 + 4096


def test_layer_rows_and_groups(table):
    names = [n for n in table.names]
    assert names[:5] == ["conv", "bn", "relu", "pool", "flatten"]
    assert [g.root for g in table.plan.groups] == ["conv"]
    assert table.plan.classifier == ["fc"]


def test_prune_hand_computed(loaded, table):
    t = totals(estimate(table, parse_strategy("prune:0.5")))
    # conv keeps 8 - int(8 * 0.5) = 4 channels: conv 4*27+4, bn 8, fc 64*10+10
    assert t["params"] == 112 + 8 + 650
    m = copy.deepcopy(loaded.model)
    pruner = tp.pruner.MetaPruner(m, loaded.example_input(), importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=[m.fc])
    pruner.step()
    assert sum(p.numel() for p in m.parameters()) == t["params"]


def test_quantize_hand_computed(table):
    t8 = totals(estimate(table, parse_strategy("quantize:int8")))
    # bn folds into conv; int8 weights + fp32 scale + int64 zero point per output channel + fp32 bias
    assert t8["size_bytes"] == (216 + 12 * 8 + 4 * 8) + (1280 + 12 * 10 + 4 * 10)
    t16 = totals(estimate(table, parse_strategy("quantize:fp16")))
    assert t16["size_bytes"] == (1530 + 16) * 2 + 8
    wo = totals(estimate(table, parse_strategy("quantize:int8-weight-only")))
    assert wo["size_bytes"] == (224 + 32) * 4 + 8 + (1280 + 4 * 10 + 4 * 10)
    assert t8["params"] == t16["params"] == 1530


def test_distill_width(table):
    w = totals(estimate(table, parse_strategy("distill:width:0.5")))
    p = totals(estimate(table, parse_strategy("prune:0.5")))
    assert w["params"] == p["params"]


def test_peak_matches_eager_measurement_on_hand_net(loaded, table):
    ex = loaded.example_input()
    weights = list(loaded.model.parameters()) + list(loaded.model.buffers())
    measured = measure_peak_activation_bytes(loaded.model, ex, weights)
    assert measured == 768 + 4096


def test_unsupported_ops_are_listed():
    t = analyze(load_model("tinynets:cumsum_net", input_shape="1,1,6,6"))
    assert [u["op"] for u in t.unsupported] == ["cumsum"]


def test_an_unsupported_operator_still_counts_what_it_stores():
    """An LSTM is named unsupported (its compute is not estimated), but its weights count in params and size."""
    from estimators.table import totals

    loaded = load_model("tinynets:lstm_net", input_shape="1,5,8")
    t = analyze(loaded)
    assert [u["op"] for u in t.unsupported] == ["lstm"]
    lstm = sum(p.numel() for p in loaded.model.lstm.parameters())
    assert t.unsupported[0]["stored_elements"] == lstm
    assert totals(t)["params"] == sum(p.numel() for p in loaded.model.parameters())
    assert totals(t)["size_bytes"] == 4 * sum(p.numel() for p in loaded.model.parameters())
