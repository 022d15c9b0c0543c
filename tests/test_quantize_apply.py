"""Quantization and apply: real Intel Neural Compressor artifacts measured against the estimate."""
import json

import pytest
import torch

from estimators.analyze import analyze
from estimators.modelspec import load_model
from estimators.strategy import parse_strategy
from tasks.apply import apply_and_measure
from tasks.quantize_exec import load_program


@pytest.mark.parametrize("spec,strategy", [
    ("demo:digits-cnn", "quantize:int8"),
    pytest.param("demo:digits-resnet", "prune:0.5:global,quantize:int8", marks=pytest.mark.slow),
    ("demo:digits-resnet", "quantize:fp16"),
    ("demo:digits-cnn", "quantize:bf16"),
    ("demo:digits-cnn", "prune:0.3,quantize:int8-weight-only"),
    ("demo:digits-resnet", "distill:width:0.5"),
    ("demo:digits-cnn", "none"),
])
def test_apply_matches_prediction(tmp_path, spec, strategy):
    rep = apply_and_measure(load_model(spec), parse_strategy(strategy), str(tmp_path / "out"))
    assert rep.pred.params == rep.meas.params
    assert rep.pred.macs == rep.meas.macs
    assert abs(rep.err["size_bytes"]) <= 0.01
    ep = load_program(rep.artifact["model"])
    for batch in (1, 3):
        x = torch.randn(batch, 1, 8, 8)
        assert ep.module()(x).shape == (batch, 10)
    saved = json.loads((tmp_path / "out" / "strategy.json").read_text())
    assert saved["compact"] == parse_strategy(strategy).compact()


@pytest.mark.slow  # Intel Neural Compressor on resnet18
def test_resnet18_int8_stores_int8_weights(tmp_path):
    loaded = load_model("torchvision:resnet18", input_shape="1,3,64,64")
    rep = apply_and_measure(loaded, parse_strategy("quantize:int8"), str(tmp_path / "q"))
    fp32 = rep.pred.params * 4
    assert rep.meas.size_bytes <= 0.30 * fp32
    assert rep.err["size_bytes"] == 0
    ep = load_program(rep.artifact["model"])
    int8 = sum(t.numel() for t in list(ep.state_dict.values()) + list(ep.constants.values())
               if isinstance(t, torch.Tensor) and t.dtype == torch.int8)
    assert int8 >= 0.99 * sum(m.weight.numel() for m in loaded.model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))


@pytest.mark.slow
def test_mobilenet_prune_then_int8(tmp_path):
    loaded = load_model("torchvision:mobilenet_v2", input_shape="1,3,64,64")
    rep = apply_and_measure(loaded, parse_strategy("prune:0.5,quantize:int8"), str(tmp_path / "q"))
    assert rep.pred.params == rep.meas.params
    assert abs(rep.err["size_bytes"]) <= 0.01


@pytest.mark.parametrize("spec,shape", [("demo:digits-resnet", None), ("torchvision:resnet18", "1,3,64,64"),
                                        pytest.param("torchvision:mobilenet_v2", "1,3,64,64", marks=pytest.mark.slow),
                                        pytest.param("torchvision:densenet121", "1,3,64,64", marks=pytest.mark.slow)])
def test_peak_memory_within_20_percent_of_eager_measurement(tmp_path, spec, shape):
    rep = apply_and_measure(load_model(spec, input_shape=shape), parse_strategy("prune:0.3"), str(tmp_path / "p"))
    assert abs(rep.err["peak_memory_bytes"]) <= 0.20
    assert abs(rep.err["memory_access_bytes"]) <= 0.10


def test_quantize_must_be_last(tmp_path):
    from estimators.errors import UserInputError

    with pytest.raises(UserInputError, match="quantize must be the last step"):
        apply_and_measure(load_model("demo:digits-cnn"), parse_strategy("quantize:int8,prune:0.5"), str(tmp_path))
