"""ONNX export: real exports of executed strategies, run in real ONNX Runtime sessions and compared with the
PyTorch programs they were made from; the ONNX size against the estimator's ONNX layout."""
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

from estimators.analyze import analyze
from estimators.compress import estimate
from estimators.errors import UserInputError
from estimators.modelspec import load_model
from estimators.methods.quantize import onnx_layout
from estimators.strategy import parse_strategy
from estimators.table import totals
from flows.cli import app
from tasks.apply import apply_and_measure
from tasks.executors import export_program
from tasks.onnx_export import FLOAT_RTOL, export_float_onnx, session, session_fn, stored_bytes


def _apply(tmp_path, spec, strategy, data=None):
    return apply_and_measure(load_model(spec), parse_strategy(strategy), str(tmp_path / "out"), data_spec=data,
                             export=("pt2", "onnx"))


@pytest.mark.parametrize("spec,strategy", [
    ("demo:digits-cnn", "none"),
    pytest.param("demo:digits-resnet", "prune:0.5:global", marks=pytest.mark.slow),
    pytest.param("demo:digits-cnn", "quantize:fp16", marks=pytest.mark.slow),
])
def test_float_export_runs_in_onnx_runtime_as_the_program_does(tmp_path, spec, strategy):
    rep = _apply(tmp_path, spec, strategy)
    o = rep.onnx
    model = onnx.load(o["path"])
    onnx.checker.check_model(model, full_check=True)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert o["max_rel_diff"] <= (1e-2 if "fp16" in strategy else FLOAT_RTOL)
    # any batch runs, and equals the saved program's output
    from tasks.quantize_exec import load_program

    prog = load_program(rep.artifact["model"]).module()
    run = session_fn(session(o["path"]))
    x = torch.randn(5, 1, 8, 8)
    want = prog(x).detach().float().numpy()
    got = run(x)[0].astype(np.float32)
    assert got.shape == (5, 10)
    assert np.abs(got - want).max() <= (1e-2 if "fp16" in strategy else FLOAT_RTOL) * np.abs(want).max()
    # the ONNX form's size is predicted (BatchNorm folded by the exporter) within 1%
    assert rep.meas.onnx_size_bytes == stored_bytes(o["path"])
    assert abs(rep.err["onnx_size_bytes"]) <= 0.01


@pytest.mark.slow  # trains, quantizes twice, runs the validation set in two runtimes
def test_int8_export_is_symmetric_qdq_with_int8_weights_and_agrees_on_digits(tmp_path):
    rep = _apply(tmp_path, "demo:digits-cnn", "prune:0.3,quantize:int8", data="digits")
    o = rep.onnx
    assert o["form"] == "int8" and o["top1_agreement"] >= 0.99 and o["inputs"] == rep.data["val_size"]
    assert abs(rep.err["onnx_size_bytes"]) <= 0.01
    model = onnx.load(o["path"])
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    weights = 0
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2:
            assert not inits[n.input[2]].any(), "TensorRT takes zero points of 0 only"
            assert inits[n.input[2]].dtype == np.int8
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:  # a weight stored in INT8, per output channel
            w = inits[n.input[0]]
            assert w.dtype == np.int8 and inits[n.input[1]].shape == (w.shape[0],)
            assert {a.name: a.i for a in n.attribute}.get("axis", 1) == 0
            weights += 1
    assert weights == 4  # every conv and the classifier


def test_sessions_use_exact_int8_kernels_on_cpus_without_vnni(tmp_path):
    # without the option, an AVX2 machine's u8 x s8 kernels saturate: the digits CNN above agreed on 76% only
    x = torch.randn(2, 1, 8, 8)
    path = tmp_path / "m.onnx"
    export_float_onnx(export_program(torch.nn.Conv2d(1, 4, 3).eval(), x), x, path)
    opts = session(path).get_session_options()
    assert opts.get_session_config_entry("session.x64quantprecision") == "1"


@pytest.mark.slow  # Intel Neural Compressor, then the ONNX quantizer
def test_layers_left_in_float_stay_float_in_the_onnx(tmp_path):
    rep = _apply(tmp_path, "demo:digits-cnn", "quantize:int8:keep_float=classifier")
    model = onnx.load(rep.onnx["path"])
    int8 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1}
    assert "classifier.weight" in {t.name for t in model.graph.initializer}  # still fp32
    assert int8 and not any(n.startswith("classifier") for n in int8)
    assert abs(rep.err["onnx_size_bytes"]) <= 0.01


def test_onnx_layout_folds_batchnorm_and_stores_qdq_parameters():
    table = analyze(load_model("demo:digits-cnn"))
    fp32 = totals(estimate(table, parse_strategy("none")))["size_bytes"]
    # three BatchNorms of 32, 64, 64 channels fold into their convolutions: 4 tensors each become one bias;
    # num_batches_tracked (8 bytes each) is not stored
    assert totals(onnx_layout(estimate(table, parse_strategy("none"))))["size_bytes"] == fp32 - 3 * 160 * 4 - 3 * 8
    int8 = estimate(table, parse_strategy("quantize:int8"))
    # per output channel 5 bytes (fp32 scale, int8 zero point) instead of 12 (fp32 scale, int64 zero point)
    assert totals(int8)["size_bytes"] - totals(onnx_layout(int8))["size_bytes"] == 7 * (32 + 64 + 64 + 10)


class _Svd(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.linalg.svd(self.proj(x))[1]


@pytest.mark.slow  # the exporter runs to its failure
def test_an_operator_onnx_cannot_express_is_named(tmp_path):
    model = _Svd().eval()
    x = torch.randn(2, 8)
    with pytest.raises(UserInputError, match=r"operator aten\._linalg_svd\.default"):
        export_float_onnx(export_program(model, x), x, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_apply_cli_exports_onnx_and_refuses_what_it_cannot(tmp_path):
    r = CliRunner().invoke(app, ["apply", "demo:digits-cnn", "--strategy", "prune:0.3", "--out", str(tmp_path / "a"),
                                 "--export", "onnx", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["artifact"]["onnx"].endswith("model.onnx") and d["onnx"]["checker"] == "passed (full check)"
    assert "trtexec --onnx=model.onnx" in d["onnx"]["trtexec"]
    # refused before any work: nothing is written
    for args, words in ((["--strategy", "quantize:bf16", "--export", "onnx"], "no ONNX export for quantize:bf16"),
                        (["--export", "tflite"], "unknown export format")):
        out = tmp_path / "refused"
        r = CliRunner().invoke(app, ["apply", "demo:digits-cnn", "--out", str(out), *args, "--json"])
        assert r.exit_code == 2 and words in json.loads(r.stdout)["error"]
        assert not out.exists()


@pytest.mark.slow
def test_onnx_runtime_latency_is_anchored_on_the_original_measured_there(tmp_path):
    loaded = load_model("demo:digits-cnn")
    rep = apply_and_measure(loaded, parse_strategy("none"), str(tmp_path / "n"), hardware="host",
                            runtime="onnxruntime")
    hw = rep.hardware
    assert hw["runtime"] == "onnxruntime" and rep.latency_basis == "anchored"
    assert "ONNX Runtime" in hw["anchor"]["where"]
    # its second point: the original pruned by half as a plan for ONNX Runtime prunes (multiples of 4), exported
    # and timed in the same alternation
    assert hw["anchor"]["probe"]["strategy"] == "prune:0.5:round_to=4" and hw["anchor"]["probe"]["total_ms"] > 0
    # a candidate of `none` predicts the original as measured in ONNX Runtime, and is measured as model.onnx in a
    # session timed in alternation with the original's
    assert rep.pred.latency_ms == pytest.approx(hw["anchor"]["total_ms"], rel=1e-3)
    lat = rep.latency_measurement
    assert lat["runtime"].startswith("onnxruntime") and 0.7 < lat["ratio"] < 1.4
    assert rep.artifact["onnx"].endswith("model.onnx")  # the export is written for the runtime measured
    # the measured candidate is a truth of the ONNX Runtime anchor (kept apart from PyTorch's): the next
    # prediction of that runtime is refitted from it
    rep2 = apply_and_measure(loaded, parse_strategy("prune:0.3"), str(tmp_path / "p"), hardware="host",
                             runtime="onnxruntime")
    assert rep2.hardware["anchor"]["truths"] == 1
    from tasks.onnx_runtime import get_ort_anchor, load_ort_profile

    # kept under this machine's ONNX Runtime profile, which predicts for that runtime
    assert hw["profile"]["runtime"].startswith("ONNX Runtime")
    kept = get_ort_anchor(loaded, analyze(loaded), load_ort_profile(calibrate=False), 1, measure=False)
    assert [t["compact"] for t in kept.truths] == ["none", "prune:0.3"]


def test_onnx_runtime_is_for_this_machine_and_named_runtimes_only(tmp_path):
    for args, words in ((["--hardware", "jetson-nano", "--runtime", "onnxruntime"], "use --hardware host"),
                        (["--hardware", "host", "--runtime", "tensorrt"], "unknown runtime")):
        r = CliRunner().invoke(app, ["apply", "demo:digits-cnn", "--out", str(tmp_path / "x"), *args, "--json"])
        assert r.exit_code == 2 and words in json.loads(r.stdout)["error"], r.output
        assert not (tmp_path / "x").exists()
    # `run` refuses the same before its flow starts
    for args, words in ((["--hardware", "jetson-nano", "--runtime", "onnxruntime"], "use --hardware host"),
                        (["--runtime", "tensorrt"], "unknown runtime")):
        r = CliRunner().invoke(app, ["run", "demo:digits-cnn", "--out-dir", str(tmp_path / "runs"), *args, "--json"])
        assert r.exit_code == 2 and words in json.loads(r.stdout)["error"], r.output
        assert not (tmp_path / "runs").exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter: quick for one convolution
def test_the_blocked_layout_rules_are_onnx_runtimes_on_this_cpu(tmp_path):
    """The rules the ONNX Runtime profile prices the slow path by (hardware.latency.channels_off with this CPU's
    block, tasks.onnx_runtime.nchwc_block) say of single convolutions what ONNX Runtime's own graph optimiser
    does here: dense ones by input channels (a multiple of 4, or fewer than the block), depthwise ones by
    channels, grouped ones by channels per group (multiples of the block, in and out)."""
    import numpy as np

    from estimators.analyze import analyze
    from estimators.modelspec import LoadedModel
    from hardware.latency import latency_kinds
    from tasks.onnx_runtime import in_blocked_layout, nchwc_block, slow_path_convolutions

    block = nchwc_block()
    if block is None:
        pytest.skip("ONNX Runtime has no blocked layout on this CPU")
    assert block in (8, 16)
    cases = [(cin, 32, 1) for cin in (3, block - 2, block + 2, 12, 20, 18, 36)] \
        + [(c, c, c) for c in (12, 18, 20)] \
        + [(2 * pg_in, 2 * pg_out, 2) for pg_in, pg_out in ((block, block), (block // 2, block // 2),
                                                             (block + 4, block), (block, block + 4), (2 * block, block))]
    for i, (cin, cout, groups) in enumerate(cases):
        model = torch.nn.Conv2d(cin, cout, 3, padding=1, groups=groups)
        shape = (1, cin, 8, 8)
        table = analyze(LoadedModel(spec=f"conv{i}", kind="factory", model=model.eval(), input_shape=shape))
        assert np.isin(latency_kinds(table), ("conv", "gconv", "dwconv")).sum() == 1
        src = tmp_path / f"conv{i}.onnx"
        torch.onnx.export(model.eval(), (torch.randn(*shape),), str(src), dynamo=False, opset_version=18)
        fast = in_blocked_layout(src, tmp_path / f"conv{i}-opt.onnx")
        assert slow_path_convolutions(table) == (0 if fast else 1), (cin, cout, groups, fast)


def test_a_candidate_off_onnx_runtimes_fast_layout_says_so():
    """Pruned to input channels that are not multiples of 4, a convolution leaves ONNX Runtime's blocked layout
    (docs/onnx.md): estimate --runtime onnxruntime says how many more do than in the original, and that
    `:round_to=4` keeps them in it; rounded or unpruned, it says nothing."""
    from estimators.analyze import analyze
    from estimators.compress import estimate
    from estimators.modelspec import load_model
    from estimators.strategy import parse_strategy
    from tasks.onnx_runtime import slow_path_convolutions, slow_path_note

    table = analyze(load_model("torchvision:resnet18", input_shape="1,3,64,64"))
    assert slow_path_convolutions(table) == 0  # 64 to 512 channels, the stem on 3
    pruned = estimate(table, parse_strategy("prune:0.3"))  # 64 -> 45 channels, ...
    assert slow_path_convolutions(pruned) > 10
    assert "more convolution(s) than the original" in slow_path_note(table, pruned)
    assert slow_path_note(table, estimate(table, parse_strategy("prune:0.3:round_to=4"))) is None
    assert slow_path_note(table, table) is None
    out = []
    for strategy in ("prune:0.3", "prune:0.3:round_to=4"):
        r = CliRunner().invoke(app, ["estimate", "torchvision:resnet18", "--input-shape", "1,3,64,64", "--strategy",
                                     strategy, "--hardware", "host", "--runtime", "onnxruntime", "--no-anchor", "--json"])
        assert r.exit_code == 0, r.output
        out.append(json.loads(r.stdout).get("notes", []))
    assert any("round_to=4" in n for n in out[0]) and not out[1]
