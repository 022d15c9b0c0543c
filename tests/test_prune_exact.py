"""The pruning estimate equals what torch-pruning really produces, for both scopes and several ratios."""
import pytest

from estimators.analyze import analyze
from estimators.compress import estimate
from estimators.modelspec import load_model
from estimators.strategy import parse_strategy
from estimators.table import totals
from hardware.measure import count_module
from tasks.executors import run_strategy


def _model(spec: str, shape: str | None, slow: bool = False):
    """A model of the exactness check; `slow`: one of the large ones, outside the fast subset (-m "not slow")."""
    return pytest.param(spec, shape, id=spec, marks=[pytest.mark.slow] if slow else [])


MODELS = [_model("demo:digits-cnn", None), _model("demo:digits-resnet", None),
          _model("torchvision:resnet18", "1,3,64,64"), _model("torchvision:mobilenet_v2", "1,3,64,64"),
          _model("torchvision:vgg11", "1,3,64,64", slow=True), _model("torchvision:densenet121", "1,3,64,64", slow=True),
          _model("torchvision:efficientnet_b0", "1,3,64,64", slow=True), _model("tinynets:tiny_convnext", "1,3,8,8")]
STRATEGIES = ["prune:0.3", "prune:0.5", "prune:0.7", "prune:0.3:global", "prune:0.5:global", "prune:0.7:global"]


def state_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@pytest.mark.parametrize("spec,shape", MODELS)
def test_prune_estimate_equals_torch_pruning(spec, shape):
    loaded = load_model(spec, input_shape=shape)
    table = analyze(loaded)
    assert table.plan.groups, "the model has prunable groups"
    for text in STRATEGIES:
        strategy = parse_strategy(text)
        pred = totals(estimate(table, strategy))
        work = run_strategy(loaded, strategy, export=False)
        meas = count_module(work.model, loaded.example_input())
        assert pred["params"] == meas["params"], text
        assert pred["macs"] == pytest.approx(meas["macs"], rel=0.005), text
        assert pred["size_bytes"] == pytest.approx(state_bytes(work.model), rel=0.01), text


def test_round_to_and_layer_ratios_match():
    loaded = load_model("torchvision:resnet18", input_shape="1,3,64,64")
    table = analyze(loaded)
    for text in ['prune:0.4:round_to=8', '{"steps": [{"method": "prune", "ratio": 0.2, "layers": {"layer3": 0.6, "layer1.0.conv1": 0.5}}]}',
                 "prune:0.3,prune:0.3", "distill:width:0.5"]:
        strategy = parse_strategy(text)
        pred = totals(estimate(table, strategy))
        work = run_strategy(loaded, strategy, export=False)
        meas = count_module(work.model, loaded.example_input())
        assert pred["params"] == meas["params"], text
        assert pred["macs"] == meas["macs"], text
    rt = run_strategy(loaded, parse_strategy("prune:0.4:round_to=8"), export=False).model
    assert all(m.out_channels % 8 == 0 for n, m in rt.named_modules() if hasattr(m, "out_channels") and n != "conv1")


def test_classifier_outputs_never_pruned():
    loaded = load_model("torchvision:mobilenet_v2", input_shape="1,3,64,64")
    work = run_strategy(loaded, parse_strategy("prune:0.7:global"), export=False)
    assert work.model.classifier[1].out_features == 1000
    assert analyze(loaded).plan.unpruned[0] == {"layer": "classifier.1", "reason": "classifier outputs are never pruned"}


def test_groups_torch_pruning_cannot_prune_are_named_and_left_alone_by_both():
    """A grouped convolution after a concatenation: torch-pruning's step crashes on some groups. Analysis finds
    them by a trial step, estimate leaves them unpruned with the reason, apply prunes exactly as estimated."""
    loaded = load_model("tinynets:concat_grouped_net", input_shape="1,3,8,8")
    table = analyze(loaded)
    failing = [u for u in table.plan.unpruned if "torch-pruning fails to prune this group" in u["reason"]]
    assert failing and all(u["layer"] in table.plan.ignored_roots for u in failing)
    assert table.plan.groups, "the other groups stay prunable"
    for text in ["prune:0.3", "prune:0.5", "prune:0.6:global"]:
        strategy = parse_strategy(text)
        pred = totals(estimate(table, strategy))
        work = run_strategy(loaded, strategy, export=False)
        meas = count_module(work.model, loaded.example_input())
        assert (pred["params"], pred["macs"]) == (meas["params"], meas["macs"]), text
        assert pred["params"] < totals(table)["params"], text
