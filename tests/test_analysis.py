"""Analysis totals against torch-pruning's counter and torch's FlopCounterMode."""
import pytest
import torch
import torch_pruning as tp
from torch.utils.flop_counter import FlopCounterMode

from estimators.analyze import analyze
from estimators.modelspec import load_model
from estimators.table import totals

SLOW = pytest.mark.slow  # a large network: outside the fast subset (-m "not slow")
MODELS = ["demo:digits-cnn", "demo:digits-resnet", "torchvision:resnet18", "torchvision:resnet50",
          "torchvision:mobilenet_v2", pytest.param("torchvision:vgg11", marks=SLOW), "torchvision:efficientnet_b0",
          "torchvision:shufflenet_v2_x1_0", pytest.param("torchvision:densenet121", marks=SLOW)]


@pytest.mark.parametrize("spec", MODELS)
def test_totals_equal_torch_pruning_and_flop_counter(spec):
    loaded = load_model(spec)
    table = analyze(loaded)
    t = totals(table)
    ex = loaded.example_input()
    macs, params = tp.utils.count_ops_and_params(loaded.model, ex)
    assert t["params"] == params
    assert t["macs"] == macs
    assert t["flops"] == 2 * macs
    # conv and linear FLOPs (FlopCounterMode counts them as 2 x MACs)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        loaded.model(ex)
    assert 2 * t["gemm_macs"] == fc.get_total_flops()
    assert table.unsupported == []


@pytest.mark.parametrize("name", [pytest.param("vit_b_16", marks=SLOW), pytest.param("swin_t", marks=SLOW)])
def test_transformers_cost_attention_and_matmul(name, monkeypatch):
    import estimators.pruning

    # torch-pruning's graph explodes on swin_t; a short budget keeps the test small (it is reported, not hidden)
    monkeypatch.setattr(estimators.pruning, "GRAPH_BUDGET_S", 8.0)
    loaded = load_model(f"torchvision:{name}")
    table = analyze(loaded)
    assert table.unsupported == []
    kinds = set(table.kinds)
    assert "attention" in kinds or "gemm" in kinds
    t = totals(table)
    assert t["params"] == sum(p.numel() for p in loaded.model.parameters())
    # the fused MHA fast path and CPU flash attention are invisible to FlopCounterMode: count the math path
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            loaded.model(loaded.example_input())
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    assert 2 * t["gemm_macs"] == pytest.approx(fc.get_total_flops(), rel=0.01)


def test_shufflenet_unpruned_with_reason():
    table = analyze(load_model("torchvision:shufflenet_v2_x1_0"))
    reasons = " ".join(u["reason"] for u in table.plan.unpruned)
    assert "torch-pruning cannot build a dependency graph" in reasons
    assert table.plan.groups == []
